"""Clocks for the event loop: the real monotonic one and a virtual one.

The adaptive polling rule of QEMU (reference §4.5) is a function of
elapsed time, and ``aio_poll`` reads the clock at fixed points: at its
start, around every polling pass, after the fd monitor returned, and when
it runs timers.  Taking the clock as a parameter lets tests replay that
algorithm in virtual time and assert exact ``poll_ns`` sequences, which
no test could do against the wall clock on a loaded machine.

:class:`MonotonicClock` is ``CLOCK_MONOTONIC`` in nanoseconds, the clock
every process of the project uses, so that timestamps taken in different
processes compare directly (QEMU's polling uses QEMU_CLOCK_REALTIME,
which is monotonic too).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MonotonicClock", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    """What the event loop needs of a clock: nanoseconds, never decreasing.

    ``now_ns`` is looked up once per context and called directly on the
    polling path, so it should be a cheap callable.
    """

    def now_ns(self) -> int: ...


class MonotonicClock:
    """``CLOCK_MONOTONIC`` in ns (any thread, any process)."""

    __slots__ = ()

    #: Bound to the C function itself: no Python frame per call.
    now_ns = staticmethod(time.monotonic_ns)

    def __repr__(self) -> str:
        return "MonotonicClock()"


class VirtualClock:
    """A clock that only moves when told to (tests).

    Advance it from inside handlers, poll functions or a scripted fd
    monitor to say "this much time passed here".  Any thread may advance
    it; reads are plain attribute loads.
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return self._now

    def advance(self, delta_ns: int) -> int:
        """Move time forward by ``delta_ns``; return the new time."""
        if delta_ns < 0:
            raise ValueError(f"time cannot go back ({delta_ns} ns)")
        with self._lock:
            self._now += delta_ns
            return self._now

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns``, which must not be in the past."""
        with self._lock:
            if now_ns < self._now:
                raise ValueError(
                    f"time cannot go back ({now_ns} < {self._now})")
            self._now = now_ns

    def __repr__(self) -> str:
        return f"VirtualClock(now_ns={self._now})"
