"""fdmon-epoll: wait with ``epoll(7)`` once a context has many fds.

The kernel contract (epoll(7), epoll_ctl(2), epoll_wait(2)):

- Registrations are keyed by (file description, fd number) and live in
  the kernel, so a wait costs O(ready) rather than O(registered); that is
  why QEMU switches from poll at ``EPOLL_ENABLE_THRESHOLD`` = 64 fds.
- We register level-triggered (no EPOLLET, no EPOLLONESHOT), as QEMU
  does: an fd that stays readable is reported by every wait, the same
  semantics as ppoll, so the loop code cannot tell the monitors apart.
- ``epoll_wait`` takes a timeout in milliseconds.  QEMU's rule keeps ns
  precision anyway: for a positive timeout it first ``ppoll``s the epoll
  fd itself (an epoll fd is readable when any registered fd is ready)
  with the ns timeout, returns 0 if that times out, and otherwise calls
  ``epoll_wait`` with timeout 0.  Only 0 and -1 (infinite) ever reach
  ``epoll_wait``.
- A signal ends ``epoll_wait`` with EINTR, and QEMU takes that as
  "nothing ready": ``aio_poll`` returns.  Python's ``epoll.poll``
  instead retries after running the signal handlers (PEP 475) and
  would keep an infinite wait blocked, so the wait calls glibc's
  ``epoll_wait`` through ``ctypes`` (which also releases the GIL).
  ``struct epoll_event`` is packed on x86-64 only: 12 bytes there, 16
  elsewhere; the fd is the first member of its ``data`` union.
  Registration stays with ``select.epoll``, which puts the fd there.
- At most 128 events per wait; the rest stay ready for the next one
  (level-triggered).
- EPOLLIN/OUT/ERR/HUP have the POLL* values, so events pass through.

There is no downgrade when the count falls again; an epoll_ctl failure
disables epoll for the context for good and falls back to poll, as
QEMU's ``fdmon_epoll_disable``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
from typing import TYPE_CHECKING, ClassVar

from qiothread.fdmon import FdMonitor
from qiothread.fdmon_poll import PollFd, ppoll_ns

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = ["EPOLL_ENABLE_THRESHOLD", "EPOLL_MAX_EVENTS", "EpollMonitor"]

#: Gathered fds at which fdmon-poll upgrades (``fdmon-epoll.c``).
EPOLL_ENABLE_THRESHOLD = 64
#: Events taken per ``epoll_wait``.
EPOLL_MAX_EVENTS = 128


class EpollEvent(ctypes.Structure):
    """``struct epoll_event``, reading ``data`` as its ``fd`` member."""

    _fields_ = (
        [("events", ctypes.c_uint32), ("fd", ctypes.c_int32),
         ("_rest", ctypes.c_uint32)]
        if platform.machine() in ("x86_64", "AMD64") else
        [("events", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
         ("fd", ctypes.c_int32), ("_rest", ctypes.c_uint32)])


_libc = ctypes.CDLL(None, use_errno=True)
_epoll_wait = _libc.epoll_wait
_epoll_wait.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                        ctypes.c_int]
_epoll_wait.restype = ctypes.c_int


def epoll_wait(epfd: int, events: ctypes.Array[EpollEvent],
               timeout_ms: int) -> int:
    """``epoll_wait(2)``; the number of events, 0 on timeout or EINTR."""
    r = _epoll_wait(epfd, events, len(events), timeout_ms)
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return 0
        raise OSError(err, os.strerror(err))
    return int(r)


class EpollMonitor(FdMonitor):
    """QEMU's fdmon-epoll."""

    name: ClassVar[str] = "epoll"

    def __init__(self, ctx: AioContext) -> None:
        super().__init__(ctx)
        self._ep = select.epoll()
        self._pfd = (PollFd * 1)()
        self._pfd[0].fd = self._ep.fileno()
        self._pfd[0].events = select.POLLIN
        self._events = (EpollEvent * EPOLL_MAX_EVENTS)()

    def fileno(self) -> int:
        return self._ep.fileno()

    def add_all(self, nodes: list[AioHandler]) -> None:
        """Register every live node (the upgrade).  Raises OSError."""
        for n in nodes:
            self._ep.register(n.fd, n.events)

    def update(self, old: AioHandler | None,
               new: AioHandler | None) -> None:
        try:
            if new is None:
                if old is not None:
                    self._ep.unregister(old.fd)
            elif old is None:
                self._ep.register(new.fd, new.events)
            else:
                self._ep.modify(new.fd, new.events)
        except OSError:
            self.ctx.disable_epoll(self)

    def wait(self, ready: list[AioHandler], timeout_ns: int) -> int:
        if timeout_ns > 0:
            # ns precision: sleep on the epoll fd with ppoll first.
            if ppoll_ns(self._pfd, 1, timeout_ns) == 0:
                return 0
            timeout_ns = 0
        events = self._events
        n = epoll_wait(self._ep.fileno(), events,
                       -1 if timeout_ns < 0 else 0)
        if n:
            ctx = self.ctx
            by_fd = ctx.fd_handlers
            add = ctx.add_ready_handler
            for i in range(n):
                ev = events[i]
                node = by_fd.get(ev.fd)
                if node is not None:
                    add(ready, node, ev.events)
        return n

    def close(self) -> None:
        self._ep.close()

