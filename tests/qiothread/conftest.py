from __future__ import annotations

from collections.abc import Iterator

import pytest

from qiothread.aio import AioContext
from qiothread.clock import VirtualClock

from .aio_helpers import FDMONS


@pytest.fixture(params=FDMONS)
def fdmon(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ctx(fdmon: str) -> Iterator[AioContext]:
    c = AioContext(fdmon=fdmon)
    yield c
    c.close()


@pytest.fixture
def vclock() -> VirtualClock:
    return VirtualClock(1_000_000_000)
