"""Fixtures: a QMP server on a temporary socket over the model backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qiothread.qmp.server import QMPServer
from tests.qmp.model import ModelBackend


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return str(path)


@pytest.fixture
def backend(image: str) -> Iterator[ModelBackend]:
    b = ModelBackend(image, ("io0", "io1"))
    yield b
    b.close()


@pytest.fixture
def server(backend: ModelBackend, tmp_path: Path) -> Iterator[QMPServer]:
    srv = QMPServer(backend, tmp_path / "qmp.sock")
    srv.start()
    yield srv
    srv.close()
