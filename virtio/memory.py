"""Guest memory: one memfd mapping shared by the VMM, iothreads and guests.

The kernel contract this relies on:

- ``memfd_create(2)`` gives an anonymous file; ``ftruncate`` sizes it
  and its pages are allocated on first touch (zero-filled).  Without
  ``MFD_CLOEXEC`` the descriptor survives ``exec`` as well as ``fork``,
  so a child started with ``pass_fds`` can map it too
  (:meth:`GuestMemory.attach`).
- ``mmap(MAP_SHARED)`` of that file in several processes shows every
  process the same physical pages: a store by the guest process is seen
  by the iothread process with no copy, as a vhost-user backend sees
  guest RAM.  A mapping inherited through ``fork`` stays shared.
- A field that another process reads while we write it (ring indices,
  flags, event indices) must change with one store instruction and be
  read with one load.  ``struct.pack_into`` does not give that: it
  zeroes the destination before it writes the value, so a reader can
  see 0 in between (a ring index going 4899 -> 0 -> 4900), and the
  little-endian unpackers read byte by byte.  :attr:`GuestMemory.u16`
  and :attr:`GuestMemory.u32` are typed views whose item access is a
  single aligned load or store of the native (little-endian) width.
- Guest-physical addresses here are offsets into the file.  Page 0 is
  reserved (address 0 means "not set up" for a ring, as in QEMU) and
  holds a small header with the allocator's bump pointer, advanced with
  an atomic fetch-and-add so that the VMM and every guest process can
  allocate from the same memory without colliding.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from types import TracebackType

from qiothread.barrier import SharedU64
from qiothread.errors import ConfigError

__all__ = ["FIRST_ADDR", "GuestMemory"]

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - no such host here
    raise ImportError("virtio rings are little-endian; the typed views "
                      "of GuestMemory need a little-endian host")

#: "qiothrGM" little-endian: marks a mapping made by :meth:`create`.
_MAGIC = int.from_bytes(b"qiothrGM", "little")
_HDR_MAGIC = 0
_HDR_BUMP = 8
#: The first allocatable address; below it: the header.
FIRST_ADDR = 4096


class GuestMemory:
    """A shared, memfd-backed guest RAM with a bump allocator.

    Any process that holds the mapping may read and write it; the
    allocator is safe across processes.  ``buf`` and ``mv`` are the
    mapping itself (an ``mmap``) and a memoryview over all of it.
    """

    __slots__ = ("_bump", "buf", "fd", "mv", "size", "u16", "u32", "u64")

    def __init__(self, fd: int, size: int) -> None:
        #: The memfd (inheritable).
        self.fd = fd
        #: Bytes of guest memory.
        self.size = size
        #: The shared mapping.
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        #: A view of the whole mapping; slices of it are guest buffers.
        self.mv = memoryview(self.buf)
        #: 16-bit items: ``u16[addr >> 1]`` is one aligned load/store.
        self.u16 = self.mv.cast("H")
        #: 32-bit items: ``u32[addr >> 2]`` likewise.
        self.u32 = self.mv.cast("I")
        #: 64-bit items: ``u64[addr >> 3]`` likewise (live counters).
        self.u64 = self.mv.cast("Q")
        self._bump = SharedU64(self.buf, _HDR_BUMP)

    @classmethod
    def create(cls, size: int) -> GuestMemory:
        """Make ``size`` bytes of zeroed guest memory.

        :raises ConfigError: if ``size`` is too small to hold anything.
        """
        if size < 2 * FIRST_ADDR:
            raise ConfigError(
                f"guest memory size {size} is too small "
                f"(at least {2 * FIRST_ADDR} bytes)")
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = os.memfd_create("qiothread-guest-ram", 0)
        try:
            os.set_inheritable(fd, True)
            os.ftruncate(fd, size)
            mem = cls(fd, size)
        except BaseException:
            os.close(fd)
            raise
        mem.buf[_HDR_MAGIC:_HDR_MAGIC + 8] = _MAGIC.to_bytes(8, "little")
        mem._bump.store(FIRST_ADDR)
        return mem

    @classmethod
    def attach(cls, fd: int, size: int) -> GuestMemory:
        """Map guest memory made by :meth:`create` in another process.

        The fd is adopted (:meth:`close` closes it) unless this fails.

        :raises ConfigError: if ``fd`` is not such a memory.
        """
        mem = cls(fd, size)
        if int.from_bytes(mem.buf[:8], "little") != _MAGIC:
            mem._unmap()            # the fd stays the caller's
            raise ConfigError(f"fd {fd} is not qiothread guest memory")
        return mem

    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes aligned to ``align``; return the address.

        Any process.  Memory is never given back: allocate rings and
        buffers once, up front.

        :raises ConfigError: when guest memory is exhausted.
        """
        if length <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(
                f"bad allocation: length {length}, align {align}")
        # Over-reserve by align - 1 so that one atomic add suffices,
        # with no compare-and-swap loop between processes.
        start = self._bump.fetch_add(length + align - 1)
        addr = (start + align - 1) & ~(align - 1)
        if addr + length > self.size:
            raise ConfigError(
                f"guest memory exhausted: {length} bytes wanted, "
                f"{max(0, self.size - start)} of {self.size} left")
        return addr

    @property
    def used(self) -> int:
        """Bytes handed out so far, header included."""
        return min(self._bump.load(), self.size)

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` lies inside guest memory."""
        return addr >= 0 and addr + length <= self.size

    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest memory (valid until :meth:`close`).

        :raises ValueError: if the range is outside guest memory.
        """
        if not (addr >= 0 and length >= 0 and addr + length <= self.size):
            raise ValueError(
                f"guest range 0x{addr:x}+{length} is outside guest "
                f"memory of {self.size} bytes")
        return self.mv[addr:addr + length]

    def read(self, addr: int, length: int) -> bytes:
        """A copy of guest memory ``[addr, addr + length)``."""
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        self.view(addr, len(data))[:] = data

    def close(self) -> None:
        """Unmap and close the memfd.  Idempotent.

        Views still held elsewhere keep the pages mapped until they are
        garbage-collected; the descriptor is closed in any case.
        """
        if self.fd < 0:
            return
        self._unmap()
        os.close(self.fd)
        self.fd = -1

    def _unmap(self) -> None:
        self.u16.release()
        self.u32.release()
        self.u64.release()
        self.mv.release()
        try:
            self.buf.close()
        except BufferError:
            # Some view outlives us (a request still in flight when a
            # test fails, say).  The mapping goes with the last view.
            log.debug("guest memory views still exported at close")

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, et: type[BaseException] | None,
                 ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestMemory(fd={self.fd}, size={self.size})"
