"""Fixtures for blockdev tests: a real-disk directory and an AioContext."""

from __future__ import annotations

import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev.images import real_disk_dir
from qiothread.aio import AioContext

REPO = Path(__file__).resolve().parents[2]


def make_context(poll_ns: int = 0, **kw: Any) -> AioContext:
    """A real AioContext; ``poll_ns`` > 0 sets poll-max-ns."""
    ctx = AioContext(name="blockdev-test", **kw)
    if poll_ns:
        ctx.set_poll_params(poll_ns, 0, 0)
    return ctx


@pytest.fixture
def ctx() -> Iterator[Any]:
    c = make_context()
    yield c
    c.close()


@pytest.fixture(scope="session")
def disk_dir() -> Path:
    """A directory on a real disk (not tmpfs), for O_DIRECT files."""
    base = real_disk_dir(os.environ.get("QIOTHREAD_TEST_DIR", "/var/tmp"),
                         REPO)
    return base


@pytest.fixture
def workdir(disk_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Path]:
    d = disk_dir / f"qiothread-blockdev-{os.getpid()}-{time.time_ns()}"
    d.mkdir()
    yield d
    # Whole trees: a failed test may leave a mount point or a subdir.
    shutil.rmtree(d)


def run_until(ctx: Any, pred: Callable[[], bool],
              timeout_s: float = 60.0) -> None:
    """Run ``ctx.aio_poll(True)`` until ``pred()``; fail after timeout.

    A timer wakes the loop every 100 ms so that a lost wake-up turns
    into a clear failure instead of a hang.  It re-arms itself from its
    callback only: re-arming the earliest timer is an aio_notify, and
    doing that before every aio_poll would keep the loop from ever
    waiting on its fds (QEMU 7.2 skips the wait when notified is set
    and polling is allowed).
    """
    deadline = time.monotonic() + timeout_s

    def rearm() -> None:
        tick.mod_ns(ctx.clock.now_ns() + 100_000_000)

    tick = ctx.timer_new_ns(rearm)
    rearm()
    try:
        while not pred():
            if time.monotonic() > deadline:
                pytest.fail("condition not reached within "
                            f"{timeout_s} s")
            ctx.aio_poll(True)
    finally:
        tick.del_()


class Waiter:
    """Collects completion results: ``cb = w.cb(tag)``; ``w.results``."""

    def __init__(self) -> None:
        self.results: dict[Any, int] = {}
        self.order: list[Any] = []

    def cb(self, tag: Any) -> Callable[[int], None]:
        def done(ret: int) -> None:
            assert tag not in self.results, f"{tag} completed twice"
            self.results[tag] = ret
            self.order.append(tag)
        return done

    def done(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.results) >= n


def aligned_buffer(size: int) -> memoryview:
    """A view of a page-aligned anonymous mapping (kept alive by it)."""
    return memoryview(mmap.mmap(-1, size))
