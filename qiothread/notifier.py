"""The cross-process wake-up of an AioContext: ``notify_me``/``notified``.

QEMU's ``aio_notify`` (reference §3) is a Dekker pair between the thread
that runs ``aio_poll`` and any thread that wants it to look again:

- the poller adds 2 to ``notify_me`` (a full barrier) and then reads
  ``notified``; if it is set, it does not block;
- the notifier stores ``notified = 1``, takes a full barrier, and then
  reads ``notify_me``; if it is non-zero, it writes the eventfd.

Each side stores its own flag before it loads the other's, so at least
one of them sees the other's store and the wake-up cannot be lost.  That
holds only if neither load may pass the preceding store, which the CPU
allows for plain accesses (a store-buffer reordering, even on x86), and
a Python statement is nothing but plain accesses.  Both fences therefore
come from :mod:`qiothread.barrier`: ``notify_me`` changes by a
sequentially consistent ``fetch_add``/``fetch_sub``, and the notifier
calls :func:`~qiothread.barrier.full_barrier` between its store and its
load.

Here the poller may live in another process than the notifier (a guest,
the main process, a thread-pool thread), so the two flags live in a
small shared mapping, the *control block*, and the eventfd is inherited.
:class:`AioNotifier` is the light handle other parties hold: it pickles
to its two descriptors (valid in a child that inherited them over
``fork`` or ``pass_fds``) and needs nothing else of the context.

Layout of the control block (native-endian u32 fields, each on its own
64-byte line so that the notifier's store and the poller's RMW do not
share a cache line with the other flag)::

    offset   0  magic   0x4f494151 ("QAIO")
    offset  64  notify_me   bits 1..31: 2 x active aio_poll calls
    offset 128  notified    1 after aio_notify, 0 after aio_notify_accept
"""

from __future__ import annotations

import mmap
import os
import platform

from qiothread.barrier import SharedU32, close_mapping, full_barrier
from qiothread.event_notifier import EventNotifier

__all__ = ["CONTROL_BLOCK_SIZE", "AioNotifier", "ControlBlock"]

#: Bytes of the control block (callers embedding it reserve this much).
CONTROL_BLOCK_SIZE = 192

_MAGIC = 0x4F494151
# Indexes into the u32 view (byte offset / 4).
_I_MAGIC = 0
_I_NOTIFY_ME = 16
_I_NOTIFIED = 32

# QEMU's aio_notify begins with smp_wmb() so that stores made before the
# call (a BH's flags, a ring index) are visible before ``notified``.  On
# x86 stores are never reordered with each other (TSO) and smp_wmb is a
# compiler barrier only; elsewhere we pay for a real fence.
_NEED_WMB = platform.machine() not in ("x86_64", "i686", "i386", "AMD64")


class ControlBlock:
    """The shared ``notify_me``/``notified`` pair of one AioContext.

    Created on a fresh memfd (:meth:`create`), or laid over ``buf`` at
    ``offset`` when the caller already shares a mapping with the other
    processes.  Any thread, any process that maps it.
    """

    __slots__ = ("_buf", "_owned", "fd", "notify_me", "offset", "u32")

    def __init__(self, buf: mmap.mmap, offset: int = 0,
                 fd: int | None = None, owned: bool = False) -> None:
        if offset % 64:
            raise ValueError(f"control block offset {offset} is not "
                             "64-byte aligned")
        if offset + CONTROL_BLOCK_SIZE > len(buf):
            raise ValueError("control block does not fit in the buffer")
        self._buf = buf
        self._owned = owned
        #: The memfd behind the mapping, if known (for pickling handles).
        self.fd = fd
        self.offset = offset
        #: Plain u32 view: ``notified`` is stored and loaded through it.
        self.u32 = memoryview(buf)[offset:offset + CONTROL_BLOCK_SIZE
                                   ].cast("I")
        #: Atomic view of ``notify_me`` (every operation a full barrier).
        self.notify_me = SharedU32(buf, offset + 4 * _I_NOTIFY_ME)
        if self.u32[_I_MAGIC] != _MAGIC:
            self.u32[_I_NOTIFIED] = 0
            self.notify_me.store(0)
            self.u32[_I_MAGIC] = _MAGIC

    @classmethod
    def create(cls) -> ControlBlock:
        """A new block on its own memfd (inherited across ``fork``)."""
        fd = os.memfd_create("qiothread-aioctx", 0)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            buf = mmap.mmap(fd, mmap.PAGESIZE)
        except BaseException:
            os.close(fd)
            raise
        return cls(buf, 0, fd=fd, owned=True)

    @classmethod
    def attach_fd(cls, fd: int, offset: int = 0) -> ControlBlock:
        """Map an inherited memfd (the receiving side of a pickle)."""
        buf = mmap.mmap(fd, mmap.PAGESIZE)
        return cls(buf, offset, fd=None, owned=True)

    @property
    def notified(self) -> bool:
        return self.u32[_I_NOTIFIED] != 0

    def close(self) -> None:
        """Release the views (and the mapping and memfd if ours).

        While an atomic field of the block still exists (``notify_me``
        here, or in a handle somebody keeps), the mapping cannot be
        closed; it is unmapped when its last user goes, so that a late
        notify never touches unmapped memory.
        """
        self.u32.release()
        del self.notify_me          # its export pins the mapping
        if self._owned:
            close_mapping(self._buf)
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class AioNotifier:
    """``aio_notify`` for one AioContext, usable from anywhere.

    Holds the context's eventfd and control block.  ``notify()`` may be
    called from any thread of any process that has both.
    """

    __slots__ = ("_block", "_set", "_u32")

    def __init__(self, event: EventNotifier, block: ControlBlock) -> None:
        self._block = block
        self._u32 = block.u32
        self._set = event.set

    def notify(self) -> None:
        """Make the context's current or next ``aio_poll`` return.

        Stores ``notified``, fences, and writes the eventfd only when an
        ``aio_poll`` may be blocked (``notify_me != 0``).
        """
        u32 = self._u32
        if _NEED_WMB:
            full_barrier()
        u32[_I_NOTIFIED] = 1
        # Pairs with the fetch_add on notify_me in aio_poll: our store of
        # notified must be visible before we read notify_me, or both
        # sides read the other's old value and the poller sleeps.
        full_barrier()
        if u32[_I_NOTIFY_ME]:
            self._set()

    def __reduce__(self) -> tuple[object, tuple[int, int, int]]:
        block = self._block
        if block.fd is None:
            raise TypeError(
                "this AioNotifier's control block has no memfd of its "
                "own; hand it to children by fork instead of pickling")
        # Descriptor numbers: valid in a child that inherited them.
        efd = self._set.__self__.fileno()  # type: ignore[attr-defined]
        return (_rebuild, (efd, block.fd, block.offset))


def _rebuild(efd: int, memfd: int, offset: int) -> AioNotifier:
    return AioNotifier(EventNotifier(efd),
                       ControlBlock.attach_fd(memfd, offset))
