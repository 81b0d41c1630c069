"""AioHandler: one registered fd of an AioContext (reference §1.2, §2).

A handler is created for every ``set_fd_handler`` call that registers
something, including a replacement: QEMU allocates a new node then, and
that is why a replaced handler loses its poll hooks, its place in the
poll set and its idle timeout (invariant (h)).  A node that is removed
while somebody walks the handler list stays allocated, marked deleted,
until the last walker frees it.

Nodes belong to the context's home thread.
"""

from __future__ import annotations

from collections.abc import Callable
from select import POLLERR, POLLHUP, POLLIN, POLLOUT

__all__ = ["READ_EVENTS", "WRITE_EVENTS", "AioHandler", "soonest"]

#: What a read handler asks for: G_IO_IN | G_IO_HUP | G_IO_ERR.
READ_EVENTS = POLLIN | POLLHUP | POLLERR
#: What a write handler asks for: G_IO_OUT | G_IO_ERR.
WRITE_EVENTS = POLLOUT | POLLERR


_U64 = (1 << 64) - 1


def soonest(a: int, b: int) -> int:
    """``qemu_soonest_timeout``: the smaller of two ns timeouts.

    Compared as unsigned 64-bit values, as QEMU does: -1 (infinite) is
    later than any other timeout, and any negative value is later than
    every non-negative one.
    """
    return a if (a & _U64) < (b & _U64) else b


class AioHandler:
    """One registered fd (QEMU's ``AioHandler``).  Home thread only."""

    __slots__ = (
        "deleted", "events", "fd", "in_poll", "io_poll", "io_poll_begin",
        "io_poll_end", "io_poll_ready", "io_read", "io_write",
        "is_notifier", "poll_idle_timeout", "poll_ns", "poll_ready",
        "ready_list", "revents",
    )

    def __init__(self, fd: int, io_read: Callable[[], None] | None,
                 io_write: Callable[[], None] | None,
                 io_poll: Callable[[], bool] | None,
                 io_poll_ready: Callable[[], None] | None) -> None:
        self.fd = fd
        self.io_read = io_read
        self.io_write = io_write
        self.io_poll = io_poll
        self.io_poll_ready = io_poll_ready
        self.io_poll_begin: Callable[[], None] | None = None
        self.io_poll_end: Callable[[], None] | None = None
        #: POLL* mask asked of the fd monitor.
        self.events = (READ_EVENTS if io_read else 0) | (
            WRITE_EVENTS if io_write else 0)
        #: What the fd monitor reported (0 when found by polling).
        self.revents = 0
        #: Found ready by io_poll (QEMU's ``poll_ready``).
        self.poll_ready = False
        #: ns of the context clock; 0 = unset (idle removal, §4.4).
        self.poll_idle_timeout = 0
        #: For per-handler polling policies (10.0+); 7.2 ignores it.
        self.poll_ns = 0
        #: On ``deleted_aio_handlers`` (or already unlinked).
        self.deleted = False
        #: On ``poll_aio_handlers``.
        self.in_poll = False
        #: The ready list this node is on, if any.
        self.ready_list: list[AioHandler] | None = None
        #: The context's own notifier: never progress.
        self.is_notifier = False

    def __repr__(self) -> str:
        return (f"<AioHandler fd={self.fd} events={self.events:#x}"
                f"{' deleted' if self.deleted else ''}"
                f"{' polled' if self.in_poll else ''}>")
