"""fdmon-poll: wait with ``ppoll(2)`` and a nanosecond timeout.

What the kernel gives (ppoll(2)):

- ``ppoll(fds, nfds, tmo_p, sigmask)`` takes a ``struct timespec``;
  NULL waits forever, ``{0, 0}`` returns at once.  The kernel rounds the
  wait up to its timer slack (50 µs by default for normal threads), never
  down.  ``revents`` is filled for every entry; POLLERR, POLLHUP and
  POLLNVAL are reported even when not requested.
- A signal interrupts it with EINTR.  QEMU treats that as "nothing
  ready" and so do we: ``aio_poll`` returns and the interpreter runs the
  Python signal handler (KeyboardInterrupt included) right after.

What Python gives: ``select.poll.poll`` takes milliseconds and rounds a
fractional value up, so a 4 µs polling budget or a 10 µs timer deadline
would become a 1 ms sleep, and ``os.ppoll`` does not exist.  We call
glibc's ``ppoll`` through ``ctypes`` instead: the timeout keeps its
nanoseconds, and ctypes releases the GIL for the duration of the call,
as a blocking syscall must in a process with a thread pool.  The pollfd
array is a ctypes array rebuilt only when the handler set changed (QEMU
regathers it every time; the result is the same).

Like QEMU, the gathered entries are the non-deleted handlers with
events, newest first; when there are 64 or more and the context allows
it, the context upgrades to epoll (``fdmon_epoll_try_upgrade``) and the
wait is delegated to the new monitor.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING, ClassVar

from qiothread.fdmon import FdMonitor

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = ["PollFd", "PollMonitor", "ppoll_ns"]

#: Seconds are capped as QEMU caps them (INT32_MAX).
_INT32_MAX = 2**31 - 1


class PollFd(ctypes.Structure):
    """``struct pollfd``."""

    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short),
                ("revents", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_ppoll = _libc.ppoll
_ppoll.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                   ctypes.c_void_p]
_ppoll.restype = ctypes.c_int


def ppoll_ns(fds: ctypes.Array[PollFd], nfds: int, timeout_ns: int,
             ts: _Timespec | None = None) -> int:
    """``qemu_poll_ns``: ppoll with a ns timeout (-1: infinite).

    Returns the number of ready entries, 0 on timeout or EINTR.  The GIL
    is released while the kernel waits.
    """
    if timeout_ns < 0:
        tsp = None
    else:
        if ts is None:
            ts = _Timespec()
        sec, ns = divmod(timeout_ns, 1_000_000_000)
        ts.tv_sec = min(sec, _INT32_MAX)
        ts.tv_nsec = ns
        tsp = ctypes.byref(ts)
    r = _ppoll(fds, nfds, tsp, None)
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return 0
        raise OSError(err, os.strerror(err))
    return int(r)


class PollMonitor(FdMonitor):
    """QEMU's fdmon-poll."""

    name: ClassVar[str] = "poll"

    def __init__(self, ctx: AioContext) -> None:
        super().__init__(ctx)
        self._gen = -1
        self._nodes: list[AioHandler] = []
        self._fds: ctypes.Array[PollFd] = (PollFd * 8)()
        self._ts = _Timespec()

    def update(self, old: AioHandler | None,
               new: AioHandler | None) -> None:
        # The state lives in the handlers (QEMU: fdmon_poll_update is a
        # no-op); the context bumps its generation and we regather.
        pass

    def _gather(self) -> int:
        ctx = self.ctx
        nodes = [n for n in ctx.handlers if not n.deleted and n.events]
        fds = self._fds
        if len(fds) < len(nodes):
            size = len(fds)
            while size < len(nodes):
                size *= 2                      # QEMU's doubling
            fds = self._fds = (PollFd * size)()
        for i, n in enumerate(nodes):
            fds[i].fd = n.fd
            fds[i].events = n.events
        self._nodes = nodes
        self._gen = ctx.handlers_gen
        return len(nodes)

    def wait(self, ready: list[AioHandler], timeout_ns: int) -> int:
        ctx = self.ctx
        if self._gen != ctx.handlers_gen:
            self._gather()
        nodes = self._nodes
        nfds = len(nodes)
        if nfds >= ctx.EPOLL_ENABLE_THRESHOLD:
            upgraded = ctx.try_upgrade_to_epoll(nfds)
            if upgraded is not None:
                return upgraded.wait(ready, timeout_ns)
        fds = self._fds
        n = ppoll_ns(fds, nfds, timeout_ns, self._ts)
        if n > 0:
            add = ctx.add_ready_handler
            for i in range(nfds):
                rev = fds[i].revents
                if rev:
                    add(ready, nodes[i], rev)
        return n
