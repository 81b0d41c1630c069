"""Bottom halves: QEMU's deferred callbacks (``util/async.c``, ref. §4.8).

A bottom half (BH) is a callback that runs once, in the context's home
thread, the next time ``aio_poll`` drains BHs.  Scheduling is the only
way other threads of the process (thread-pool workers) hand work to the
loop, so :meth:`QEMUBH.schedule` is thread-safe and ends with
``aio_notify``.

The queue discipline is QEMU's, because the order is observable:

- an enqueue pushes at the head of ``bh_list``, once (PENDING guards);
- ``aio_bh_poll`` moves the whole list into a *slice*, appends the slice
  to ``bh_slice_list`` and pops from the head of the first slice: BHs run
  in LIFO order of scheduling, and one scheduled while BHs run lands in
  the fresh ``bh_list`` and runs in the next ``aio_bh_poll``;
- a nested ``aio_bh_poll`` (from a BH that runs ``aio_poll``) drains its
  parents' slices first, since it always takes from the first slice;
- an idle BH is not progress and caps the poll timeout at 10 ms.

QEMU's lock-free list becomes a ``threading.Lock`` around the flag
read-modify-writes and the list moves: the critical sections are a few
bytecodes, and the GIL would serialise them anyway.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

__all__ = ["IDLE_BH_TIMEOUT_NS", "QEMUBH", "BHFlags", "BHList"]

#: ``aio_compute_bh_timeout``: an idle BH makes the loop wake within this.
IDLE_BH_TIMEOUT_NS = 10_000_000


class BHFlags(enum.IntFlag):
    """QEMU's ``BH_*`` flags, with its values."""

    #: Already on ``bh_list`` (enqueue pushes only once).
    PENDING = 1
    #: Run the callback on the next ``aio_bh_poll``.
    SCHEDULED = 2
    #: Free without running.
    DELETED = 4
    #: Free after running once (``aio_bh_schedule_oneshot``).
    ONESHOT = 8
    #: Idle BH: not progress; caps the timeout at 10 ms.
    IDLE = 16


_NONE = BHFlags(0)
_CLEAR_ON_DEQUEUE = BHFlags.PENDING | BHFlags.SCHEDULED | BHFlags.IDLE
_KEEP_ON_DEQUEUE = ~_CLEAR_ON_DEQUEUE


class QEMUBH:
    """One bottom half of an AioContext (``qemu_bh_new``)."""

    __slots__ = ("_bhs", "cb", "flags", "name")

    def __init__(self, bhs: BHList, cb: Callable[[], None],
                 name: str = "") -> None:
        self._bhs = bhs
        #: The callback, run in the context's home thread.
        self.cb = cb
        #: For debugging and traces (QEMU's BH name).
        self.name = name or getattr(cb, "__qualname__", repr(cb))
        #: Current flags; changed under the list's lock (any thread).
        self.flags = _NONE

    def schedule(self) -> None:
        """``qemu_bh_schedule``: run once soon.  Any thread."""
        self._bhs.enqueue(self, BHFlags.SCHEDULED)

    def schedule_idle(self) -> None:
        """``qemu_bh_schedule_idle``: run soon, not as progress.

        Any thread.
        """
        self._bhs.enqueue(self, BHFlags.SCHEDULED | BHFlags.IDLE)

    def cancel(self) -> None:
        """``qemu_bh_cancel``: unschedule; no enqueue, no notify."""
        with self._bhs.lock:
            self.flags &= ~BHFlags.SCHEDULED

    def delete(self) -> None:
        """``qemu_bh_delete``: free on the next drain without running."""
        self._bhs.enqueue(self, BHFlags.DELETED)

    # The names of the thread-safe entry points, as asyncio spells them.
    schedule_threadsafe = schedule
    schedule_idle_threadsafe = schedule_idle

    def __repr__(self) -> str:
        return f"<QEMUBH {self.name} {self.flags!r}>"


class BHList:
    """``bh_list`` plus ``bh_slice_list`` of one context."""

    __slots__ = ("_notify", "bh_list", "lock", "slices")

    def __init__(self, notify: Callable[[], None]) -> None:
        #: Guards flags and both lists (any thread).
        self.lock = threading.Lock()
        #: Newest at the end: the end is QEMU's list head.
        self.bh_list: list[QEMUBH] = []
        #: Slices of running ``aio_bh_poll`` calls, outermost first.
        self.slices: list[list[QEMUBH]] = []
        self._notify = notify

    def enqueue(self, bh: QEMUBH, new_flags: BHFlags) -> None:
        """``aio_bh_enqueue``: any thread; ends with ``aio_notify``."""
        with self.lock:
            old = bh.flags
            bh.flags = old | BHFlags.PENDING | new_flags
            if not old & BHFlags.PENDING:
                self.bh_list.append(bh)
        self._notify()

    def schedule_oneshot(self, cb: Callable[[], None],
                         name: str = "") -> None:
        """``aio_bh_schedule_oneshot``: a BH freed after it ran."""
        self.enqueue(QEMUBH(self, cb, name),
                     BHFlags.SCHEDULED | BHFlags.ONESHOT)

    def compute_timeout(self) -> int:
        """The BH part of ``aio_compute_timeout``, in ns (-1: none)."""
        timeout = -1
        with self.lock:
            for lst in (self.bh_list, *self.slices):
                for bh in lst:
                    f = bh.flags
                    if f & BHFlags.SCHEDULED and not f & BHFlags.DELETED:
                        if not f & BHFlags.IDLE:
                            return 0
                        timeout = IDLE_BH_TIMEOUT_NS
        return timeout

    def poll(self) -> bool:
        """``aio_bh_poll``: run the queued BHs; True if any non-idle ran.

        Home thread only.
        """
        lock = self.lock
        with lock:
            if not self.bh_list and not self.slices:
                return False
            mine = self.bh_list
            self.bh_list = []
        slices = self.slices
        slices.append(mine)
        progress = False
        # A callback that raises leaves the rest of the slices queued;
        # the next aio_bh_poll drains them first.
        while slices:
            first = slices[0]
            if not first:
                slices.pop(0)
                continue
            bh = first.pop()                # the head: LIFO
            with lock:
                flags = bh.flags
                bh.flags = flags & _KEEP_ON_DEQUEUE
            if flags & BHFlags.SCHEDULED and not flags & BHFlags.DELETED:
                if not flags & BHFlags.IDLE:
                    progress = True
                bh.cb()
            # DELETED / ONESHOT: dropping the last reference frees it.
        return progress
