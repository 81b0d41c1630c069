"""Host facts a raw backend asks the kernel for: sizes, alignment, holes.

The kernel contracts this module relies on:

- ``BLKSSZGET`` (``ioctl(fd, _IO(0x12, 104), int *)``) gives a block
  device's logical block size: the smallest unit the device accepts, and
  the O_DIRECT alignment of offsets and lengths on it.  ``BLKPBSZGET``
  gives the physical block size (only a hint).  ``BLKROGET`` says
  whether the device was set read-only (``blockdev --setro``, a
  read-only loop device), which an O_RDWR open does not refuse.
  ``BLKGETSIZE64`` gives the size in bytes; ``lseek(SEEK_END)`` gives
  the same for a device.
- ``statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN)`` (Linux 6.1+) reports,
  for a regular file, the O_DIRECT alignment the filesystem needs for
  file offsets (``stx_dio_offset_align``) and for memory
  (``stx_dio_mem_align``).  Both are 0, or the STATX_DIOALIGN bit is
  missing from ``stx_mask``, when the filesystem does not say; then we
  probe as QEMU's ``raw_probe_alignment`` does: try O_DIRECT reads of
  growing sizes and keep the first one the kernel accepts.
- ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` deallocates
  a range of a file (reads then return zeroes); ``FALLOC_FL_ZERO_RANGE``
  makes a range read as zeroes and keeps it allocated.  Filesystems that
  lack either fail with EOPNOTSUPP.
- ``BLKDISCARD`` and ``BLKZEROOUT`` take ``uint64_t[2] = {start, len}``,
  both aligned to the logical block size, and do the same on a device.

Python 3.11 has no ``os.statx`` and no ``os.fallocate`` with a mode, so
both go through ``ctypes`` to glibc (2.28+ has both wrappers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import fcntl
import mmap
import os
import stat
import struct

__all__ = [
    "BLKDISCARD",
    "BLKZEROOUT",
    "FallocFlags",
    "blkdiscard",
    "blkzeroout",
    "block_device_read_only",
    "block_device_size",
    "dio_alignment",
    "fallocate",
    "is_block_device",
    "logical_block_size",
    "physical_block_size",
    "probe_dio_alignment",
]

# <linux/fs.h>: _IO(0x12, nr) and _IOR(0x12, 114, size_t).
BLKSSZGET = 0x1268
BLKROGET = 0x125E
BLKPBSZGET = 0x127B
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

#: statx mask bit asking for the direct-I/O alignment fields.
STATX_DIOALIGN = 0x2000
AT_EMPTY_PATH = 0x1000
#: Offsets of the two fields in ``struct statx`` (256 bytes in all).
_STX_MASK = 0
_STX_DIO_MEM_ALIGN = 152
_STX_DIO_OFFSET_ALIGN = 156

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                    use_errno=True)
_statx = _libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                   ctypes.c_uint, ctypes.c_void_p]
_statx.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                       ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class FallocFlags(enum.IntFlag):
    """``fallocate(2)`` modes (<linux/falloc.h>)."""

    #: Do not change the file size.
    KEEP_SIZE = 0x01
    #: Deallocate the range (needs KEEP_SIZE).
    PUNCH_HOLE = 0x02
    #: Make the range read as zeroes, keep it allocated.
    ZERO_RANGE = 0x10


def is_block_device(fd: int) -> bool:
    """Whether ``fd`` is open on a block device."""
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack(fmt, buf)[0]
    return value


def logical_block_size(fd: int) -> int:
    """BLKSSZGET: the logical block size of a block device."""
    return _ioctl_int(fd, BLKSSZGET, "i")


def physical_block_size(fd: int) -> int:
    """BLKPBSZGET: the physical block size of a block device."""
    return _ioctl_int(fd, BLKPBSZGET, "I")


def block_device_read_only(fd: int) -> bool:
    """BLKROGET: whether a block device is set read-only.

    Such a device still opens O_RDWR (the flag is not a permission);
    only the writes fail, with EPERM.
    """
    return _ioctl_int(fd, BLKROGET, "i") != 0


def block_device_size(fd: int) -> int:
    """BLKGETSIZE64: the size in bytes of a block device."""
    return _ioctl_int(fd, BLKGETSIZE64, "Q")


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """statx STATX_DIOALIGN: ``(offset_align, mem_align)`` or None.

    None when the kernel or the filesystem does not report it (before
    Linux 6.1, or a filesystem that leaves the fields at 0).
    """
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf) != 0:
        return None
    mask, = struct.unpack_from("I", buf.raw, _STX_MASK)
    mem, off = struct.unpack_from("II", buf.raw, _STX_DIO_MEM_ALIGN)
    if not mask & STATX_DIOALIGN or not off or not mem:
        return None
    return off, mem


def probe_dio_alignment(fd: int, max_align: int = 4096) -> int:
    """Find the O_DIRECT offset alignment of ``fd`` by trying reads.

    The fallback when statx does not say, as QEMU 7.2's
    ``raw_probe_alignment``: read ``n`` bytes at offset 0 into a page
    aligned buffer for n = 1, 512, 1024, 2048, 4096 and keep the first
    size the kernel does not refuse with EINVAL.  A filesystem that
    takes even a 1-byte read (tmpfs since Linux 6.6) says nothing about
    alignment, so QEMU falls back to the safe ``max_align`` then, and so
    do we.  A file shorter than the probe still works: a read at EOF
    returns 0 rather than EINVAL.
    """
    buf = mmap.mmap(-1, max_align)
    try:
        for size in (1, 512, 1024, 2048, 4096):
            if size > max_align:
                break
            try:
                os.preadv(fd, [memoryview(buf)[:size]], 0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return size if size != 1 else max_align
                continue
            return size if size != 1 else max_align
    finally:
        buf.close()
    return max_align


def fallocate(fd: int, mode: FallocFlags, offset: int, length: int) -> int:
    """``fallocate(2)``: 0, or the negative errno (data-path style)."""
    if _fallocate(fd, int(mode), offset, length) == 0:
        return 0
    return -ctypes.get_errno()


def _range_ioctl(fd: int, request: int, offset: int, length: int) -> int:
    try:
        fcntl.ioctl(fd, request, struct.pack("QQ", offset, length))
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return 0


def blkdiscard(fd: int, offset: int, length: int) -> int:
    """BLKDISCARD on a block device: 0 or a negative errno."""
    return _range_ioctl(fd, BLKDISCARD, offset, length)


def blkzeroout(fd: int, offset: int, length: int) -> int:
    """BLKZEROOUT on a block device: 0 or a negative errno."""
    return _range_ioctl(fd, BLKZEROOUT, offset, length)
