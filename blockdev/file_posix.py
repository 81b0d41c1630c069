"""driver=file and driver=host_device: QEMU's block/file-posix.c.

A node owns one file descriptor and serves the BlockDriverState surface
of docs/interfaces.md.  What it relies on (reference §12):

- The descriptor is opened once, in the main process, before the
  iothreads fork; O_DIRECT when ``cache.direct=on``.  ``file`` needs a
  regular file and ``host_device`` a block or character device, with
  QEMU's messages otherwise; a block device set read-only (BLKROGET)
  is refused for a writable node, as QEMU's ``check_hdev_writable``.
- The O_DIRECT alignment (``request_alignment``) is the device's
  logical block size (BLKSSZGET) or, for a file, what statx
  STATX_DIOALIGN reports, else what a probe read finds (blockdev.host).
  A read or write that breaks it is not refused: it goes to the thread
  pool with the MISALIGNED flag and a bounce buffer, whatever the
  ``aio`` engine, as QEMU's ``raw_co_prw`` does.
- The engine (``aio=threads|native|io_uring``) belongs to the
  AioContext, not the node: attaching looks up (or creates) that
  context's thread pool, LinuxAioState or LuringState.  If native or
  io_uring cannot start there, the node falls back to the thread pool
  and says so, as ``raw_aio_attach_aio_context`` does.
- DISCARD is a no-op that succeeds unless ``discard=unmap`` (QEMU's
  default is ``ignore``), and only then may WRITE_ZEROES deallocate.
- FLUSH is fdatasync (a no-op with ``cache.no-flush=on``), through
  io_uring's own fsync under aio=io_uring and through the thread pool
  otherwise; DISCARD and WRITE_ZEROES always run in the thread pool.
- Callbacks run in the attached context's thread.  Requests that
  finish without I/O (checks that fail, a FLUSH with no-flush) complete
  through a one-shot BH, never inside the submitting call, so that the
  caller is not re-entered.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from blockdev import host
from blockdev.faults import FaultInjector, FaultSpec
from blockdev.raw_aio import (
    AioContextLike,
    AioEngine,
    AioType,
    CompletionCB,
    RawAIOCB,
    handle_aiocb,
    iov_is_aligned,
    iov_length,
)
from blockdev.thread_pool import (
    ThreadPool,
    aio_get_thread_pool,
    aio_put_thread_pool,
)
from qiothread.errors import BlockError, ConfigError

_READ, _WRITE, _FLUSH = AioType.READ, AioType.WRITE, AioType.FLUSH
_MISALIGNED = int(AioType.MISALIGNED)

__all__ = ["FileOptions", "FilePosixNode"]

log = logging.getLogger("qiothread.blockdev")


@dataclass(slots=True)
class FileOptions:
    """The parsed options of a file or host_device node."""

    filename: str
    node_name: str
    driver: str = "file"
    aio: str = "threads"
    direct: bool = False
    no_flush: bool = False
    read_only: bool = False
    aio_max_batch: int = 0
    #: False for ``cache=writethrough``/``directsync``: writes are
    #: followed by a flush before they complete (the block layer's FUA
    #: emulation when the guest has no write cache).
    write_cache: bool = True
    #: ``discard=unmap`` (BDRV_O_UNMAP); QEMU's default ``ignore`` makes
    #: DISCARD a successful no-op and WRITE_ZEROES never deallocate.
    discard_unmap: bool = False
    faults: FaultSpec | None = None


class FilePosixNode:
    """A raw file or block device; the BlockDriverState of interfaces.md.

    Attributes are set at open (main process) and read-only afterwards;
    the data-path methods are iothread only (the attached context).
    """

    def __init__(self, opts: FileOptions) -> None:
        self.opts = opts
        self.node_name = opts.node_name
        self.filename = opts.filename
        self.read_only = opts.read_only
        self.direct = opts.direct
        self.no_flush = opts.no_flush
        self.write_cache = opts.write_cache
        self.aio_max_batch = opts.aio_max_batch
        self.discard_unmap = opts.discard_unmap
        #: The engine asked for; ``aio`` is the one in use after attach.
        self.aio_requested = opts.aio
        self.aio = opts.aio
        #: Read-modify-writes of the bounce path, one at a time.
        self.rmw_lock = threading.Lock()
        self.fd = self._open()
        try:
            self._probe()
        except BaseException:
            os.close(self.fd)
            raise
        self.ctx: AioContextLike | None = None
        self._pool: ThreadPool | None = None
        self._engine: AioEngine | None = None
        self.faults = (FaultInjector(opts.faults, self._engine_submit)
                       if opts.faults is not None else None)

    # -- open ----------------------------------------------------------

    def _open(self) -> int:
        # raw_open_common's order: open, then the aio=native rule, then
        # the file type; so a missing file is reported as such even
        # with aio=native and no cache.direct.
        flags = os.O_RDONLY if self.read_only else os.O_RDWR
        if self.direct:
            flags |= os.O_DIRECT
        fd = _qemu_open(self.filename, flags)
        try:
            # check_hdev_writable: a read-only block device opens O_RDWR
            # and would fail only at the first write.
            if (not self.read_only and host.is_block_device(fd)
                    and host.block_device_read_only(fd)):
                raise BlockError("The device is not writable: "
                                 f"{os.strerror(errno.EACCES)}")
            if self.aio_requested == "native" and not self.direct:
                raise ConfigError(
                    "aio=native was specified, but it requires "
                    "cache.direct=on, which was not specified.")
            self._check_type(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_type(self, st: os.stat_result) -> None:
        if self.opts.driver == "host_device":
            ok = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            msg = "to be either a character or block device"
        else:
            ok = stat.S_ISREG(st.st_mode)
            msg = "to be a regular file"
        if not ok:
            raise ConfigError(f"'{self.opts.driver}' driver requires "
                              f"'{self.filename}' {msg}")

    def _probe(self) -> None:
        self.is_blkdev = host.is_block_device(self.fd)
        if self.is_blkdev:
            self.length = host.block_device_size(self.fd)
            self.logical_block_size = host.logical_block_size(self.fd)
        else:
            self.length = os.fstat(self.fd).st_size
            self.logical_block_size = 512
        #: Where the O_DIRECT alignment came from, for reports.
        self.alignment_source = "buffered"
        self.request_alignment = 1
        self.mem_alignment = 1
        if not self.direct:
            return
        if self.is_blkdev:
            self.request_alignment = self.logical_block_size
            self.mem_alignment = self.logical_block_size
            self.alignment_source = "BLKSSZGET"
            return
        dio = host.dio_alignment(self.fd)
        if dio is not None:
            self.request_alignment, self.mem_alignment = dio
            self.alignment_source = "statx"
        else:
            self.request_alignment = host.probe_dio_alignment(self.fd)
            self.mem_alignment = self.request_alignment
            self.alignment_source = "probe"

    # -- AioContext ----------------------------------------------------

    def attach_aio_context(self, ctx: AioContextLike) -> None:
        """Bind the node to ``ctx``: its pool and its aio engine."""
        if self.ctx is not None:
            self.detach_aio_context()
        self.ctx = ctx
        self._pool = aio_get_thread_pool(ctx)
        if self.aio != "threads":
            self._engine = _start_engine(self.aio, ctx)
            if self._engine is None:
                # For good, as raw_aio_attach_aio_context clears
                # use_linux_aio / use_linux_io_uring.
                self.aio = "threads"
        if self.faults is not None:
            self.faults.attach(ctx)

    def detach_aio_context(self) -> None:
        """Drop the context's engines (the last user frees them)."""
        ctx = self.ctx
        if ctx is None:
            return
        if self.faults is not None:
            self.faults.detach()
        if self._engine is not None:
            _stop_engine(self.aio, ctx)
            self._engine = None
        aio_put_thread_pool(ctx)
        self._pool = None
        self.ctx = None

    def close(self) -> None:
        """Detach and close the descriptor.  Idempotent."""
        self.detach_aio_context()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- data path (iothread only) -------------------------------------

    def preadv(self, offset: int, iov: Sequence[memoryview],
               cb: CompletionCB) -> None:
        """Read into ``iov`` from ``offset``; ``cb(0)`` or ``-errno``."""
        self._rw(AioType.READ, offset, iov, cb)

    def pwritev(self, offset: int, iov: Sequence[memoryview],
                cb: CompletionCB) -> None:
        """Write ``iov`` at ``offset``; ``cb(0)`` or ``-errno``."""
        if self.read_only:
            self._complete_soon(cb, -errno.EPERM)
            return
        if not self.write_cache:
            cb = self._then_flush(cb)
        self._rw(AioType.WRITE, offset, iov, cb)

    def flush(self, cb: CompletionCB) -> None:
        """FLUSH: fdatasync, or nothing with ``cache.no-flush=on``."""
        if self.no_flush or self.read_only:
            self._complete_soon(cb, 0)
            return
        self._submit(RawAIOCB(AioType.FLUSH, self.fd, 0, 0), cb)

    def pdiscard(self, offset: int, nbytes: int, cb: CompletionCB) -> None:
        """DISCARD: punch a hole (file) or BLKDISCARD (device).

        A no-op that succeeds unless the node has ``discard=unmap``.
        """
        if self._bad_range(offset, nbytes, cb, write=True):
            return
        if not self.discard_unmap:
            self._complete_soon(cb, 0)
            return
        self._submit(RawAIOCB(self._dev_flags(AioType.DISCARD), self.fd,
                              offset, nbytes, align=self.request_alignment),
                     cb)

    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: CompletionCB) -> None:
        """WRITE_ZEROES: ZERO_RANGE / BLKZEROOUT, else written zeroes."""
        if self._bad_range(offset, nbytes, cb, write=True):
            return
        t = self._dev_flags(AioType.WRITE_ZEROES)
        if may_unmap and self.discard_unmap:
            t |= AioType.MAY_UNMAP
        # raw_open_common: BLKZEROOUT on a block device only with
        # O_DIRECT (it could leave stale data in the page cache).
        self._submit(RawAIOCB(t, self.fd, offset, nbytes,
                              align=self.request_alignment,
                              rmw_lock=self.rmw_lock,
                              has_write_zeroes=self.direct
                              or not self.is_blkdev), cb)

    def io_plug(self) -> None:
        """Hold submissions back until the matching io_unplug."""
        if self._engine is not None:
            self._engine.io_plug()

    def io_unplug(self) -> None:
        """Release what io_plug held, in one batch."""
        if self._engine is not None:
            self._engine.io_unplug(self.aio_max_batch)

    def _dev_flags(self, t: AioType) -> AioType:
        return t | AioType.BLKDEV if self.is_blkdev else t

    def _rw(self, t: AioType, offset: int, iov: Sequence[memoryview],
            cb: CompletionCB) -> None:
        nbytes = iov_length(iov)
        if self._bad_range(offset, nbytes, cb, write=t == AioType.WRITE):
            return
        if self.direct and not iov_is_aligned(
                offset, iov, self.request_alignment, self.mem_alignment):
            t |= AioType.MISALIGNED
        self._submit(RawAIOCB(t, self.fd, offset, nbytes, iov,
                              self.request_alignment, self.rmw_lock), cb)

    def _bad_range(self, offset: int, nbytes: int, cb: CompletionCB,
                   write: bool) -> bool:
        if write and self.read_only:
            self._complete_soon(cb, -errno.EPERM)
            return True
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            self._complete_soon(cb, -errno.EIO)
            return True
        return False

    def _submit(self, req: RawAIOCB, cb: CompletionCB) -> None:
        if self.ctx is None:
            raise BlockError(
                f"node '{self.node_name}' has no AioContext attached")
        if self.faults is not None:
            self.faults.submit(req, cb)
        else:
            self._engine_submit(req, cb)

    def _engine_submit(self, req: RawAIOCB, cb: CompletionCB) -> None:
        op = req.type.op
        eng = self._engine
        # int(): a flag test on the enum builds a member (slow, per
        # request).
        if eng is not None and not int(req.type) & _MISALIGNED and (
                op in (_READ, _WRITE)
                or (op == _FLUSH and eng.handles_flush)):
            eng.submit(req, cb, self.aio_max_batch)
            return
        assert self._pool is not None
        # No file_paio_submit here: QEMU 7.2 emits it only in
        # file-win32.c; on Linux the pool's own thread_pool_submit is
        # the trace of this step.
        self._pool.submit(lambda: handle_aiocb(req), cb)

    def _complete_soon(self, cb: CompletionCB, ret: int) -> None:
        if self.ctx is None:
            raise BlockError(
                f"node '{self.node_name}' has no AioContext attached")
        self.ctx.bh_schedule_oneshot(lambda: cb(ret))

    def _then_flush(self, cb: CompletionCB) -> CompletionCB:
        def after_write(ret: int) -> None:
            if ret < 0 or self.no_flush:
                cb(ret)
                return
            self._submit(RawAIOCB(AioType.FLUSH, self.fd, 0, 0), cb)
        return after_write

    def __repr__(self) -> str:
        return (f"<FilePosixNode {self.node_name} {self.filename} "
                f"aio={self.aio} direct={self.direct}>")


def _qemu_open(filename: str, flags: int) -> int:
    """``qemu_open``: open, with QEMU's messages for its failures.

    A filesystem that refuses O_DIRECT fails the open with EINVAL; QEMU
    then tries again without O_DIRECT only to tell that case apart, and
    says so instead of "Invalid argument".
    """
    try:
        return os.open(filename, flags)
    except OSError as exc:
        reason = exc.strerror
        if exc.errno == errno.EINVAL and flags & os.O_DIRECT:
            try:
                os.close(os.open(filename,
                                 flags & ~os.O_DIRECT))
            except OSError:
                pass
            else:
                reason = "filesystem does not support O_DIRECT"
        raise BlockError(
            f"Could not open '{filename}': {reason}") from exc


def _start_engine(aio: str, ctx: AioContextLike) -> AioEngine | None:
    try:
        if aio == "native":
            import blockdev.linux_aio as linux_aio
            return linux_aio.laio_get(ctx)
        import blockdev.io_uring as io_uring
        return io_uring.luring_get(ctx)
    except BlockError as exc:
        what = "native AIO" if aio == "native" else "linux io_uring"
        log.warning("Unable to use %s, falling back to thread pool: %s",
                    what, exc)
        return None


def _stop_engine(aio: str, ctx: AioContextLike) -> None:
    if aio == "native":
        import blockdev.linux_aio as linux_aio
        linux_aio.laio_put(ctx)
    else:
        import blockdev.io_uring as io_uring
        io_uring.luring_put(ctx)
