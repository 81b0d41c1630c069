"""Timers of an AioContext (QEMU's ``QEMUTimer`` on one timer list).

QEMU keeps one timer list per clock type in each context; the event loop
of this project has a single clock (the context's, real or virtual), so
one list is enough.  The parts of QEMU's behaviour that are observable
from the loop (reference §4.9):

- the soonest deadline feeds ``aio_compute_timeout``;
- arming a timer so that it becomes the earliest one calls the list's
  notify callback, which is ``aio_notify``, so that a blocked
  ``aio_poll`` recomputes its timeout;
- ``aio_poll`` runs expired timers last, after the handlers, reading the
  clock once and running every timer due at that instant, each removed
  from the list before its callback runs (so it may re-arm itself).

The list is touched from the home thread only, as in QEMU (timers are
not a cross-thread API; other threads schedule a BH).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

__all__ = ["QEMUTimer", "TimerList"]


class QEMUTimer:
    """One timer (``timer_new_ns``).  Home thread only."""

    __slots__ = ("_list", "cb", "expire_time")

    def __init__(self, timer_list: TimerList,
                 cb: Callable[[], None]) -> None:
        self._list = timer_list
        self.cb = cb
        #: Absolute expiry in the context clock's ns; -1 when not armed.
        self.expire_time = -1

    def mod_ns(self, expire_abs_ns: int) -> None:
        """``timer_mod_ns``: (re-)arm to fire at ``expire_abs_ns``."""
        self._list.mod(self, expire_abs_ns)

    def del_(self) -> None:
        """``timer_del``: disarm (harmless if not armed)."""
        self._list.remove(self)

    def pending(self) -> bool:
        """``timer_pending``."""
        return self.expire_time >= 0

    def expired(self, now_ns: int) -> bool:
        """``timer_expired``: armed and due at ``now_ns``."""
        return 0 <= self.expire_time <= now_ns

    def __lt__(self, other: QEMUTimer) -> bool:
        return self.expire_time < other.expire_time


def _expire_time(t: QEMUTimer) -> int:
    return t.expire_time


class TimerList:
    """Armed timers in expiry order (earliest first)."""

    __slots__ = ("_notify", "_now", "timers")

    def __init__(self, now_ns: Callable[[], int],
                 notify: Callable[[], None]) -> None:
        self._now = now_ns
        self._notify = notify
        #: Sorted by ``expire_time``; equal times keep arming order.
        self.timers: list[QEMUTimer] = []

    def new(self, cb: Callable[[], None]) -> QEMUTimer:
        return QEMUTimer(self, cb)

    def remove(self, t: QEMUTimer) -> None:
        if t.expire_time >= 0:
            self.timers.remove(t)
            t.expire_time = -1

    def mod(self, t: QEMUTimer, expire: int) -> None:
        """``timer_mod_ns``: (re-)arm ``t`` for ``expire``.

        The place is found with ``expire`` as given, after every timer
        due at or before it; only the stored time is clamped at 0, so
        a timer armed in the past goes before one due at 0.
        """
        self.remove(t)
        timers = self.timers
        i = bisect.bisect_right(timers, expire, key=_expire_time)
        t.expire_time = max(0, expire)
        timers.insert(i, t)
        if i == 0:
            # The deadline moved earlier: a blocked aio_poll must look
            # again (QEMU's timerlist notify callback, aio_notify).
            self._notify()

    def deadline_ns(self) -> int:
        """ns until the earliest timer (0 if due), -1 if none armed."""
        if not self.timers:
            return -1
        return max(0, self.timers[0].expire_time - self._now())

    def run_timers(self) -> bool:
        """Run every timer due now; True if any ran (home thread)."""
        timers = self.timers
        if not timers:
            return False
        now = self._now()
        progress = False
        while timers and timers[0].expire_time <= now:
            t = timers.pop(0)
            t.expire_time = -1
            t.cb()
            progress = True
        return progress
