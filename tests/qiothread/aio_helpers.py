"""Shared pieces of the AioContext tests: fixtures' building blocks.

``ScriptedMonitor`` is the one fake: it stands at the boundary where
time passes while the loop is blocked.  It advances a VirtualClock by a
scripted amount per wait and then asks the real monitor (ppoll or
epoll, real eventfds) with timeout 0, so the loop never really sleeps
and the test knows ``block_ns`` exactly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from qiothread import trace
from qiothread.aio import AioContext, AioHandler
from qiothread.clock import VirtualClock
from qiothread.fdmon import FdMonitor
from qiothread.fdmon_epoll import EpollMonitor
from qiothread.fdmon_poll import PollMonitor

FDMONS = ["poll", "epoll"]


class ScriptedMonitor(FdMonitor):
    """A real monitor whose waits take scripted virtual time."""

    name: ClassVar[str] = "scripted"

    def __init__(self, ctx: AioContext, inner: FdMonitor,
                 clock: VirtualClock) -> None:
        super().__init__(ctx)
        self.inner = inner
        self.clock = clock
        #: ns each coming wait takes; when empty, ``default_ns``.
        self.script: list[int] = []
        self.default_ns = 0
        #: (timeout_ns, advanced_ns) of every wait, for assertions.
        self.waits: list[tuple[int, int]] = []
        #: If set, called with the timeout instead of the script; it
        #: returns the ns to advance (it may also set fds).
        self.hook: Callable[[int], int] | None = None

    def update(self, old: AioHandler | None,
               new: AioHandler | None) -> None:
        self.inner.update(old, new)

    def need_wait(self) -> bool:
        return self.inner.need_wait()

    def wait(self, ready: list[AioHandler], timeout_ns: int) -> int:
        if self.hook is not None:
            step = self.hook(timeout_ns)
        elif self.script:
            step = self.script.pop(0)
        else:
            step = self.default_ns
        if timeout_ns >= 0:
            step = min(step, timeout_ns)
        self.clock.advance(step)
        self.waits.append((timeout_ns, step))
        return self.inner.wait(ready, 0)

    def close(self) -> None:
        self.inner.close()


def kick_when_blocked(ctx: AioContext) -> threading.Thread:
    """A thread that notifies once ``ctx`` is blocked in aio_poll."""

    def run() -> None:
        while ctx.notify_me == 0:
            time.sleep(0.0005)
        ctx.notify()

    t = threading.Thread(target=run)
    t.start()
    return t


def warm_notifier(ctx: AioContext) -> None:
    """Make the ctx notifier join the poll set, as its first wake-up
    through the eventfd does on QEMU (``poll_add ... revents 0x1``)."""
    ctx.aio_poll(False)
    t = kick_when_blocked(ctx)
    ctx.aio_poll(True)
    t.join()
    assert ctx.fd_handlers[ctx.notifier.fileno()].in_poll


def make_ctx(fdmon: str, clock: VirtualClock | None = None,
             **kw: object) -> AioContext:
    ctx = AioContext(fdmon=fdmon, clock=clock, **kw)  # type: ignore[arg-type]
    return ctx


def scripted(ctx: AioContext, clock: VirtualClock) -> ScriptedMonitor:
    """Wrap the context's real monitor in a ScriptedMonitor."""
    inner = ctx.fdmon
    assert isinstance(inner, PollMonitor | EpollMonitor)
    mon = ScriptedMonitor(ctx, inner, clock)
    ctx.fdmon = mon
    return mon


@contextmanager
def captured_trace(path: Path, *patterns: str) -> Iterator[Path]:
    """Trace ``patterns`` into ``path`` for the duration."""
    trace.configure(patterns, file=str(path))
    try:
        yield path
    finally:
        trace.disable_all()
        fd = trace.sink_fileno()
        trace.flush_to(2)
        os.close(fd)


def trace_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()
