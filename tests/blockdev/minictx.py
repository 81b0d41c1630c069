"""A small real event loop for blockdev tests while H1's AioContext lands.

Real epoll, a real eventfd notifier, BHs and timers; it implements the
AioContext surface blockdev uses (blockdev.raw_aio.AioContextLike) and,
when ``poll_ns`` > 0, spins over the registered ``io_poll`` callbacks
for up to that long before blocking, as QEMU's poll mode does.  It is
not QEMU's aio_poll (no adaptive window, no dispatch-order fidelity):
blockdev tests use :func:`make_context`, which prefers the real one.
"""

from __future__ import annotations

import heapq
import itertools
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from qiothread.event_notifier import EventNotifier


class _Clock:
    def now_ns(self) -> int:
        return time.monotonic_ns()


class MiniBH:
    def __init__(self, ctx: MiniContext, cb: Callable[[], None]) -> None:
        self.ctx = ctx
        self.cb = cb
        self.scheduled = False
        self.deleted = False

    def schedule(self) -> None:
        with self.ctx.lock:
            if not self.scheduled:
                self.scheduled = True
                self.ctx.bhs.append(self)
        self.ctx.notify()

    def cancel(self) -> None:
        with self.ctx.lock:
            self.scheduled = False

    def delete(self) -> None:
        self.deleted = True
        self.cancel()


class MiniTimer:
    def __init__(self, ctx: MiniContext, cb: Callable[[], None]) -> None:
        self.ctx = ctx
        self.cb = cb
        self.expire = -1
        self.gen = 0

    def mod_ns(self, expire_abs_ns: int) -> None:
        self.gen += 1
        self.expire = expire_abs_ns
        heapq.heappush(self.ctx.timers,
                       (expire_abs_ns, next(self.ctx.seq), self.gen, self))

    def del_(self) -> None:
        self.gen += 1
        self.expire = -1


class MiniContext:
    """See the module docstring.  Home thread: the one calling aio_poll."""

    def __init__(self, poll_ns: int = 0) -> None:
        self.aio_max_batch = 0
        self.clock: Any = _Clock()
        self.poll_ns = poll_ns
        self.lock = threading.Lock()
        self.bhs: list[MiniBH] = []
        self.timers: list[tuple[int, int, int, MiniTimer]] = []
        self.seq = itertools.count()
        self.ep = select.epoll()
        self.notifier = EventNotifier()
        self.notified = False
        self.ep.register(self.notifier.fileno(), select.EPOLLIN)
        #: fd -> (read, poll, poll_ready)
        self.handlers: dict[int, tuple[Any, Any, Any]] = {}
        self.polled_progress = 0

    def set_fd_handler(self, fd: int, io_read: Any, io_write: Any = None,
                       io_poll: Any = None, io_poll_ready: Any = None
                       ) -> None:
        if io_read is None and io_write is None and io_poll is None:
            if fd in self.handlers:
                del self.handlers[fd]
                self.ep.unregister(fd)
            return
        if fd not in self.handlers:
            self.ep.register(fd, select.EPOLLIN)
        self.handlers[fd] = (io_read, io_poll, io_poll_ready)

    def set_event_notifier(self, n: EventNotifier, io_read: Any,
                           io_poll: Any = None, io_poll_ready: Any = None
                           ) -> None:
        self.set_fd_handler(n.fileno(), io_read, None, io_poll,
                            io_poll_ready)

    def notify(self) -> None:
        self.notified = True
        self.notifier.set()

    def bh_new(self, cb: Callable[[], None], name: str = "") -> MiniBH:
        return MiniBH(self, cb)

    def bh_schedule_oneshot(self, cb: Callable[[], None]) -> None:
        MiniBH(self, cb).schedule()

    def timer_new_ns(self, cb: Callable[[], None]) -> MiniTimer:
        return MiniTimer(self, cb)

    def _run_bhs(self) -> bool:
        with self.lock:
            todo, self.bhs = self.bhs, []
        progress = False
        for bh in reversed(todo):
            with self.lock:
                run = bh.scheduled and not bh.deleted
                bh.scheduled = False
            if run:
                bh.cb()
                progress = True
        return progress

    def _run_timers(self) -> bool:
        progress = False
        now = self.clock.now_ns()
        while self.timers and self.timers[0][0] <= now:
            _, _, gen, t = heapq.heappop(self.timers)
            if gen == t.gen and t.expire >= 0:
                t.expire = -1
                t.cb()
                progress = True
        return progress

    def _timeout_s(self) -> float:
        with self.lock:
            if self.bhs:
                return 0.0
        while self.timers and (self.timers[0][2] != self.timers[0][3].gen
                               or self.timers[0][3].expire < 0):
            heapq.heappop(self.timers)
        if self.timers:
            return max(self.timers[0][0] - self.clock.now_ns(), 0) / 1e9
        return -1.0

    def _poll_once(self) -> bool:
        if self.notified:
            return True
        for read, poll, ready in list(self.handlers.values()):
            del read
            if poll is not None and poll():
                if ready is not None:
                    ready()
                self.polled_progress += 1
                return True
        return False

    def aio_poll(self, blocking: bool) -> bool:
        progress = False
        if blocking and self.poll_ns > 0:
            end = time.monotonic_ns() + self.poll_ns
            while time.monotonic_ns() < end:
                if self._poll_once():
                    progress = True
                    break
        timeout = self._timeout_s() if blocking and not progress else 0.0
        events = self.ep.poll(timeout)
        self.notified = False
        for fd, _ in events:
            if fd == self.notifier.fileno():
                self.notifier.test_and_clear()
                continue
            h = self.handlers.get(fd)
            if h is not None and h[0] is not None:
                h[0]()
                progress = True
        progress |= self._run_bhs()
        progress |= self._run_timers()
        return progress

    def close(self) -> None:
        self.ep.close()
        self.notifier.close()
