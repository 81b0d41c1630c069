"""Requests of a raw POSIX node and the synchronous work behind them.

What QEMU's ``include/block/raw-aio.h`` and the ``handle_aiocb_*``
functions of ``block/file-posix.c`` are for us: the request types with
QEMU's numbers (they appear in the ``luring_co_submit`` trace), the
one request record every engine
takes, and the blocking functions a thread-pool worker runs.

The kernel contracts relied on:

- ``preadv``/``pwritev`` transfer at most the requested bytes.  On a
  regular file a read returns fewer bytes only at end of file; a write
  returns fewer bytes when the filesystem is full.  QEMU turns a short
  read into success with the rest of the buffer zeroed, and a short
  write into ENOSPC; so do we.
- With ``O_DIRECT`` the file offset, every length and every buffer
  address must be multiples of the device's or filesystem's alignment,
  else EINVAL.  A request that breaks this is served through an aligned
  bounce buffer (QEMU's ``QEMU_AIO_MISALIGNED`` path): read the aligned
  range enclosing it, copy, and for writes write the range back.
- ``fdatasync`` makes written data durable; it is FLUSH.

Data-path results are ints: ``>= 0`` success, ``-errno`` failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockdev import host
from qiothread.event_notifier import EventNotifier

__all__ = [
    "AioContextLike",
    "AioEngine",
    "AioType",
    "BHLike",
    "CompletionCB",
    "RawAIOCB",
    "TimerLike",
    "buffer_address",
    "handle_aiocb",
    "iov_is_aligned",
    "iov_length",
    "iov_memset",
]

#: ``cb(ret)``: ``ret >= 0`` success, ``-errno`` failure.
CompletionCB = Callable[[int], None]


class AioType(enum.IntFlag):
    """QEMU's ``QEMU_AIO_*`` request types and flags (raw-aio.h)."""

    READ = 0x0001
    WRITE = 0x0002
    IOCTL = 0x0004
    FLUSH = 0x0008
    DISCARD = 0x0010
    WRITE_ZEROES = 0x0020
    #: Buffers or offsets break O_DIRECT alignment: use a bounce buffer.
    MISALIGNED = 0x1000
    #: The node is a block device (BLKDISCARD / BLKZEROOUT).
    BLKDEV = 0x2000
    #: WRITE_ZEROES may deallocate (``BDRV_REQ_MAY_UNMAP``): QEMU marks
    #: it with the DISCARD bit (``WRITE_ZEROES | DISCARD``, type 0x30).
    MAY_UNMAP = 0x0010

    @property
    def op(self) -> AioType:
        """The operation without the flags (WRITE_ZEROES wins over the
        DISCARD bit that marks MAY_UNMAP)."""
        # Read several times per request: flag arithmetic builds new
        # members through the enum machinery (microseconds each), so
        # each value's answer is computed once.  Any thread: a racing
        # first computation stores the same member twice.
        op = _OPS.get(self)
        if op is None:
            op = (AioType.WRITE_ZEROES if self & AioType.WRITE_ZEROES
                  else self & 0x00FF)
            _OPS[self] = op
        return op


#: ``AioType.op`` by type value (filled on first use).
_OPS: dict[int, AioType] = {}


@dataclass(slots=True, eq=False)
class RawAIOCB:
    """One request, as every engine takes it (QEMU's RawPosixAIOData).

    Owned by the iothread until handed to an engine; a thread-pool worker
    reads it while it runs and writes nothing back but the result.
    """

    type: AioType
    fd: int
    offset: int
    nbytes: int
    iov: Sequence[memoryview] = ()
    #: O_DIRECT offset/length alignment of the node (bounce path).
    align: int = 1
    #: Serialises the node's read-modify-writes (bounce path; any
    #: worker thread).
    rmw_lock: threading.Lock | None = None
    #: file-posix's has_write_zeroes: False for a block device without
    #: O_DIRECT, where BLKZEROOUT is not trusted (page cache), so zeroes
    #: are written as data instead.
    has_write_zeroes: bool = True


class BHLike(Protocol):
    """What blockdev uses of a QEMUBH."""

    def schedule(self) -> None: ...
    def cancel(self) -> None: ...
    def delete(self) -> None: ...


class TimerLike(Protocol):
    """What blockdev uses of a QEMUTimer."""

    def mod_ns(self, expire_abs_ns: int) -> None: ...
    def del_(self) -> None: ...


class ClockLike(Protocol):
    """What blockdev uses of the context's clock."""

    def now_ns(self) -> int: ...


class AioContextLike(Protocol):
    """The AioContext surface blockdev relies on (docs/interfaces.md)."""

    aio_max_batch: int
    clock: ClockLike

    def set_fd_handler(
        self, fd: int,
        io_read: Callable[[], None] | None,
        io_write: Callable[[], None] | None = None,
        io_poll: Callable[[], bool] | None = None,
        io_poll_ready: Callable[[], None] | None = None,
    ) -> None: ...

    def set_event_notifier(
        self, n: EventNotifier,
        io_read: Callable[[], None] | None,
        io_poll: Callable[[], bool] | None = None,
        io_poll_ready: Callable[[], None] | None = None,
    ) -> None: ...

    def notify(self) -> None: ...
    def bh_new(self, cb: Callable[[], None], name: str = "") -> BHLike: ...
    def bh_schedule_oneshot(self, cb: Callable[[], None]) -> None: ...
    def timer_new_ns(self, cb: Callable[[], None]) -> TimerLike: ...


class AioEngine(Protocol):
    """A per-AioContext submission engine (LinuxAioState, LuringState).

    Home thread only.  ``dev_max_batch`` is the node's ``aio-max-batch``.
    """

    #: Whether FLUSH goes to the engine (io_uring) or the pool (native).
    handles_flush: bool

    def submit(self, req: RawAIOCB, cb: CompletionCB,
               dev_max_batch: int) -> None: ...
    def io_plug(self) -> None: ...
    def io_unplug(self, dev_max_batch: int) -> None: ...


def buffer_address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte; None if read-only.

    The caller keeps ``view`` alive while the address is in use.
    """
    if view.readonly:
        return None
    if len(view) == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def iov_length(iov: Sequence[memoryview]) -> int:
    """Total bytes of a scatter-gather list."""
    return sum(map(len, iov))


def iov_is_aligned(offset: int, iov: Sequence[memoryview],
                   align: int, mem_align: int) -> bool:
    """Whether an O_DIRECT transfer needs no bounce buffer.

    Offset and every segment length must be multiples of ``align``,
    and every segment address a multiple of ``mem_align``; a read-only
    buffer (no address to hand the kernel) counts as misaligned.
    """
    if offset % align:
        return False
    for v in iov:
        if len(v) % align:
            return False
        addr = buffer_address(v)
        if addr is None or addr % mem_align:
            return False
    return True


def iov_memset(iov: Sequence[memoryview], start: int, value: int) -> None:
    """Fill ``iov`` from byte ``start`` to its end with ``value``."""
    pos = 0
    for v in iov:
        end = pos + len(v)
        if end > start:
            lo = max(start - pos, 0)
            v[lo:] = bytes([value]) * (len(v) - lo)
        pos = end


def _copy_out(src: memoryview, iov: Sequence[memoryview]) -> None:
    pos = 0
    for v in iov:
        v[:] = src[pos:pos + len(v)]
        pos += len(v)


def _copy_in(iov: Sequence[memoryview], dst: memoryview) -> None:
    pos = 0
    for v in iov:
        dst[pos:pos + len(v)] = v
        pos += len(v)


def _rw_direct(req: RawAIOCB) -> int:
    """One preadv/pwritev; QEMU's short-transfer rules."""
    try:
        if req.type.op == AioType.READ:
            n = os.preadv(req.fd, req.iov, req.offset)
        else:
            n = os.pwritev(req.fd, req.iov, req.offset)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    if n == req.nbytes:
        return 0
    if req.type.op == AioType.READ:
        iov_memset(req.iov, n, 0)
        return 0
    return -errno.ENOSPC


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Read until ``buf`` is full or EOF; zero the rest; bytes read."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    buf[done:] = bytes(len(buf) - done)
    return done


def _rw_bounce(req: RawAIOCB) -> int:
    """A misaligned O_DIRECT request through an aligned bounce buffer.

    The mapping is page aligned, so any memory alignment up to 4 KiB is
    met.  A write reads the enclosing aligned range first and writes it
    back (read-modify-write), under the node's ``rmw_lock`` so that two
    such writes sharing a block cannot lose each other's bytes.  An
    aligned write racing with a read-modify-write of the same block can
    still be undone by it: QEMU serialises those with tracked requests,
    which we do not have (a guest that issues aligned I/O never meets
    this).
    """
    align = req.align
    start = req.offset - req.offset % align
    end = -(-(req.offset + req.nbytes) // align) * align
    bounce = mmap.mmap(-1, end - start)
    view = memoryview(bounce)
    head = req.offset - start
    try:
        if req.type.op == AioType.READ:
            got = _pread_full(req.fd, view, start)
            del got  # short reads are zero-filled by _pread_full
            _copy_out(view[head:head + req.nbytes], req.iov)
            return 0
        with req.rmw_lock or contextlib.nullcontext():
            _pread_full(req.fd, view, start)
            _copy_in(req.iov, view[head:head + req.nbytes])
            n = os.pwritev(req.fd, [view], start)
        return 0 if n == len(view) else -errno.ENOSPC
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    finally:
        view.release()
        bounce.close()


def _write_zero_buffers(req: RawAIOCB) -> int:
    """Write zeroes as data (the block layer's fall-back), 1 MiB a go."""
    zeros = mmap.mmap(-1, min(1 << 20, max(req.nbytes, 1)))
    view = memoryview(zeros)
    try:
        pos = 0
        while pos < req.nbytes:
            n = min(len(zeros), req.nbytes - pos)
            with view[:n] as part:
                sub = RawAIOCB(AioType.WRITE, req.fd, req.offset + pos, n,
                               [part], req.align, req.rmw_lock)
                ret = (_rw_direct(sub) if n % req.align == 0
                       and (req.offset + pos) % req.align == 0
                       else _rw_bounce(sub))
            if ret < 0:
                return ret
            pos += n
        return 0
    finally:
        # Every export released first, else close() raises BufferError
        # (which the worker turned into EIO for every such request).
        view.release()
        zeros.close()


_NOT_SUPPORTED = (-errno.EOPNOTSUPP, -errno.ENOTTY, -errno.EINVAL)


def _discard(req: RawAIOCB) -> int:
    if req.type & AioType.BLKDEV:
        ret = host.blkdiscard(req.fd, req.offset, req.nbytes)
    else:
        ret = host.fallocate(
            req.fd, host.FallocFlags.PUNCH_HOLE | host.FallocFlags.KEEP_SIZE,
            req.offset, req.nbytes)
    # Discard is advisory: the block layer ignores ENOTSUP, so do we.
    return 0 if ret in _NOT_SUPPORTED else ret


def _write_zeroes(req: RawAIOCB) -> int:
    if req.type & AioType.BLKDEV:
        ret = -errno.EOPNOTSUPP
        if req.type & AioType.MAY_UNMAP:
            # As handle_aiocb_write_zeroes_unmap: deallocate-and-zero
            # first (a device's fallocate), then BLKZEROOUT.
            ret = host.fallocate(
                req.fd,
                host.FallocFlags.PUNCH_HOLE | host.FallocFlags.KEEP_SIZE,
                req.offset, req.nbytes)
            if ret == -errno.EBUSY:
                ret = -errno.EOPNOTSUPP
        if ret in _NOT_SUPPORTED and req.has_write_zeroes:
            ret = host.blkzeroout(req.fd, req.offset, req.nbytes)
    else:
        ret = -errno.EOPNOTSUPP
        if req.type & AioType.MAY_UNMAP:
            ret = host.fallocate(
                req.fd,
                host.FallocFlags.PUNCH_HOLE | host.FallocFlags.KEEP_SIZE,
                req.offset, req.nbytes)
        if ret in _NOT_SUPPORTED:
            ret = host.fallocate(req.fd, host.FallocFlags.ZERO_RANGE,
                                 req.offset, req.nbytes)
    if ret in _NOT_SUPPORTED:
        # As the block layer does when the driver cannot: write zeroes.
        return _write_zero_buffers(req)
    return ret


def _flush(req: RawAIOCB) -> int:
    try:
        os.fdatasync(req.fd)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return 0


def handle_aiocb(req: RawAIOCB) -> int:
    """Run one request to the end, blocking (a thread-pool worker)."""
    op = req.type.op
    if op in (AioType.READ, AioType.WRITE):
        if req.type & AioType.MISALIGNED:
            return _rw_bounce(req)
        return _rw_direct(req)
    if op == AioType.FLUSH:
        return _flush(req)
    if op == AioType.DISCARD:
        return _discard(req)
    if op == AioType.WRITE_ZEROES:
        return _write_zeroes(req)
    return -errno.ENOTSUP
