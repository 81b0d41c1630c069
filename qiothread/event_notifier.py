"""EventNotifier: an eventfd, as QEMU's util/event_notifier-posix.c uses it.

The kernel contract this relies on (eventfd(2)):

- An eventfd holds a 64-bit counter.  ``write`` of an 8-byte value adds
  to it; ``read`` returns the counter and resets it to 0 (we never use
  EFD_SEMAPHORE).  A read of a zero counter on a non-blocking fd fails
  with EAGAIN; so does a write that would overflow, which only happens
  after 2**64 - 2 unconsumed signals and can be ignored, as QEMU does.
- The fd is readable (POLLIN) exactly while the counter is non-zero, so
  one ``set`` wakes every ppoll/epoll waiter until somebody reads it.
- The fd survives ``fork``: that is how the guest, the iothreads and the
  main process share kicks and interrupts.  We do not set EFD_CLOEXEC so
  that a child started with ``pass_fds`` may inherit it as well.
"""

from __future__ import annotations

import os

__all__ = ["EventNotifier"]

_ONE = (1).to_bytes(8, "little")


class EventNotifier:
    """A non-blocking eventfd with QEMU's set / test-and-clear pair.

    Safe to use from any thread and any process that holds the fd.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int | None = None) -> None:
        #: The eventfd.  Adopted when given (inherited from a parent).
        self._fd = os.eventfd(0, os.EFD_NONBLOCK) if fd is None else fd

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        """Signal the notifier (any thread, any process)."""
        try:
            os.write(self._fd, _ONE)
        except BlockingIOError:
            # The counter is saturated: the fd is readable anyway.
            pass

    def test_and_clear(self) -> bool:
        """Consume pending signals; return whether there were any."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"EventNotifier(fd={self._fd})"
