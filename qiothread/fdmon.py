"""The fd-monitor interface (QEMU's ``FDMonOps``, reference §7).

An AioContext hands "which fds, which events" to one fd monitor and asks
it to wait.  QEMU has three (poll, epoll, io_uring) behind an ops table
of three functions; this project has the same seam, one module per
monitor, so that a loop test body runs against each of them:

``update(old, new)``
    A handler was added (``old`` None), replaced or removed (``new``
    None).  Called by ``set_fd_handler`` before the old node is unlinked.
``wait(ready, timeout_ns)``
    Block for at most ``timeout_ns`` (-1: forever, 0: do not block) until
    a registered fd has events, then put each ready node on ``ready``
    through ``ctx.add_ready_handler``.  Returns the number of ready fds.
``need_wait()``
    True when userspace polling cannot stand in for the syscall.  For
    poll and epoll that is ``poll_disable_cnt != 0`` (one handler without
    ``io_poll``); a monitor whose readiness shows up in shared memory
    (io_uring's CQ ring) answers from that instead.
``supports_polling``
    False when ``need_wait`` is the generic "polling disabled" test.
    Only then does the context remove idle poll handlers after 7 s
    (``fdmon_supports_polling``, reference §4.4).

Monitors run in the context's home thread only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = ["FdMonitor"]


class FdMonitor(ABC):
    """One way of waiting for fd readiness, bound to one context."""

    #: QEMU's name for it: ``poll``, ``epoll``.
    name: ClassVar[str]
    #: ``fdmon_supports_polling``: need_wait is not aio_poll_disabled.
    supports_polling: ClassVar[bool] = False

    def __init__(self, ctx: AioContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def update(self, old: AioHandler | None,
               new: AioHandler | None) -> None:
        """A handler was added, replaced or deleted."""

    @abstractmethod
    def wait(self, ready: list[AioHandler], timeout_ns: int) -> int:
        """Wait for readiness; add ready nodes to ``ready``."""

    def need_wait(self) -> bool:
        """``aio_poll_disabled``: a handler without io_poll exists."""
        return self.ctx.poll_disable_cnt != 0

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release kernel objects (nothing by default)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
