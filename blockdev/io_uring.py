"""aio=io_uring: one ring per AioContext (QEMU's block/io_uring.c, §11).

The kernel contract this relies on (io_uring_setup(2), io_uring_enter(2)):

- ``io_uring_setup(entries)`` creates a submission queue (SQ) and a
  completion queue (CQ, twice as deep by default) shared with the
  kernel through mmaps of the ring fd.  The application fills SQEs,
  publishes the SQ tail and calls ``io_uring_enter`` to submit; the
  kernel publishes CQEs at the CQ tail and the application consumes
  them by advancing the CQ head - in memory, without a syscall.
- The ring fd is readable (POLLIN) while the CQ is not empty, so it is
  the fd the event loop sleeps on, and "CQ tail != CQ head" is the
  ``io_poll`` callback (``io_uring_cq_ready``).
- A CQE carries the SQE's 64-bit ``user_data`` and ``res``: the byte
  count or ``-errno``.  A buffered read may come back short before end
  of file (a page-cache boundary), so a short read with ``res > 0`` is
  resubmitted for the remainder, and ``res == 0`` means end of file.
- FLUSH is ``IORING_OP_FSYNC`` with ``IORING_FSYNC_DATASYNC``
  (fdatasync), so unlike aio=native no flush goes to the thread pool.

The ring comes from the ``liburing`` package (a Zig binding of liburing
with liburing's C names; it works on this kernel, which the tests
check).  SQEs are prepared off-ring (``Sqe()``) when a request is
queued and copied into the ring when the queue is submitted, as QEMU
keeps ``luringcb->sqeq``.  The queue rules and the ``luring_*`` trace
events are QEMU 7.2's; ``aio-max-batch`` is not used, as in 7.2.
"""

from __future__ import annotations

import errno
import itertools
import sys
from collections import deque
from dataclasses import dataclass, field

from blockdev.per_context import PerContext
from blockdev.raw_aio import (
    AioContextLike,
    AioType,
    CompletionCB,
    RawAIOCB,
    iov_memset,
)
from qiothread import trace_events as trace
from qiothread.defer_call import deferred_calls
from qiothread.errors import BlockError

try:
    import liburing as _uring
except ImportError as _exc:  # the binding is missing: engine unavailable
    _uring = None
    _URING_IMPORT_ERROR = str(_exc)
else:
    _URING_IMPORT_ERROR = ""

__all__ = ["MAX_ENTRIES", "LuringAIOCB", "LuringState", "luring_get",
           "luring_put"]

#: SQ depth of each ring (io_uring_queue_init(MAX_ENTRIES)).
MAX_ENTRIES = 128


@dataclass(slots=True, eq=False)
class LuringAIOCB:
    """One request and its resubmission state (QEMU's LuringAIOCB)."""

    req: RawAIOCB
    cb: CompletionCB
    key: int
    #: The prepared SQE, copied into the ring by ioq_submit.
    sqeq: object = None
    #: Bytes a short read already brought in.
    total_read: int = 0
    #: Iovec objects the kernel may still be using.
    keep: list[object] = field(default_factory=list)
    ret: int = -errno.EINPROGRESS


def _res(cqe: object) -> int:
    # The binding raises OSError for a negative res; we want -errno.
    try:
        return int(cqe.res)  # type: ignore[attr-defined]
    except OSError as exc:
        return -(exc.errno or errno.EIO)


class LuringState:
    """The io_uring ring of one AioContext.  Home thread only."""

    handles_flush = True

    def __init__(self, ctx: AioContextLike) -> None:
        if _uring is None:
            raise BlockError(
                f"failed to init linux io_uring ring: {_URING_IMPORT_ERROR}")
        self.ctx = ctx
        self.ring = _uring.Ring()
        try:
            _uring.io_uring_queue_init(MAX_ENTRIES, self.ring)
        except OSError as exc:
            raise BlockError("failed to init linux io_uring ring: "
                             f"{exc.strerror or exc}") from exc
        if trace.luring_init_state.enabled:
            trace.luring_init_state(self, sys.getsizeof(self))
        self.ring_fd = int(self.ring.ring_fd)
        self.plugged = 0
        self.in_queue = 0
        self.in_flight = 0
        self.blocked = False
        self.submit_queue: deque[LuringAIOCB] = deque()
        self.inflight: dict[int, LuringAIOCB] = {}
        self.keys = itertools.count(1)
        self._cqe = _uring.Cqe()
        self._submitting = False
        self._deferred: list[LuringAIOCB] = []
        #: Counters for reports and tests.
        self.polled_completions = 0
        self.short_read_resubmits = 0
        self.completion_bh = ctx.bh_new(self._completion_bh, "luring")
        ctx.set_fd_handler(self.ring_fd, self._completion_cb, None,
                           self._poll_cb, self._poll_ready)

    def close(self) -> None:
        """luring_detach_aio_context + luring_cleanup."""
        self.ctx.set_fd_handler(self.ring_fd, None)
        self.completion_bh.delete()
        _uring.io_uring_queue_exit(self.ring)
        if trace.luring_cleanup_state.enabled:
            trace.luring_cleanup_state(self)

    # -- submission ------------------------------------------------------

    def submit(self, req: RawAIOCB, cb: CompletionCB,
               dev_max_batch: int) -> None:
        """luring_co_submit: READ, WRITE or FLUSH."""
        del dev_max_batch  # 7.2's io_uring ignores aio-max-batch
        luringcb = LuringAIOCB(req, cb, next(self.keys))
        if trace.luring_co_submit.enabled:
            trace.luring_co_submit(None, self, luringcb, req.fd,
                                   req.offset, req.nbytes,
                                   int(req.type.op))
        self._prep(luringcb, req.offset, req.iov)
        self.submit_queue.append(luringcb)
        self.in_queue += 1
        if trace.luring_do_submit.enabled:
            trace.luring_do_submit(self, self.blocked, self.plugged,
                                   self.in_queue, self.in_flight)
        if not self.blocked and (
                not self.plugged
                or self.in_flight + self.in_queue >= MAX_ENTRIES):
            ret = self._ioq_submit()
            if trace.luring_do_submit_done.enabled:
                trace.luring_do_submit_done(self, ret)

    def _prep(self, luringcb: LuringAIOCB, offset: int,
              iov: object) -> None:
        req = luringcb.req
        sqe = _uring.Sqe()
        op = req.type.op
        if op == AioType.FLUSH:
            _uring.io_uring_prep_fsync(sqe, req.fd,
                                       _uring.IORING_FSYNC_DATASYNC)
        else:
            vec = _uring.Iovec(list(iov))  # type: ignore[call-overload]
            luringcb.keep.append(vec)
            luringcb.keep.append(iov)
            if op == AioType.READ:
                _uring.io_uring_prep_readv(sqe, req.fd, vec, offset)
            else:
                _uring.io_uring_prep_writev(sqe, req.fd, vec, offset)
        sqe.user_data = luringcb.key
        luringcb.sqeq = sqe

    def _ioq_submit(self) -> int:
        ret = 0
        self._submitting = True
        try:
            while self.in_queue > 0:
                while self.submit_queue:
                    c = self.submit_queue[0]
                    if not _uring.put_sqe(self.ring, c.sqeq):
                        break
                    self.submit_queue.popleft()
                    self.inflight[c.key] = c
                try:
                    ret = int(_uring.io_uring_submit(self.ring))
                except OSError as exc:
                    ret = -(exc.errno or errno.EIO)
                if trace.luring_io_uring_submit.enabled:
                    trace.luring_io_uring_submit(self, ret)
                if ret <= 0:
                    if ret in (-errno.EAGAIN, -errno.EINTR):
                        continue
                    break
                self.in_flight += ret
                self.in_queue -= ret
            self.blocked = self.in_queue > 0
            if self.in_flight:
                self._process_completions()
        finally:
            self._submitting = False
        if self._deferred or (self.in_queue and not self.blocked):
            # Callbacks to run, or a short read resubmitted while we
            # reaped inline completions: 7.2 leaves such a request queued
            # until some other I/O comes by (a hang if none does); the
            # BH submits it.
            self.completion_bh.schedule()
        return ret

    def _resubmit(self, luringcb: LuringAIOCB) -> None:
        self.inflight.pop(luringcb.key, None)
        self.submit_queue.append(luringcb)
        self.in_queue += 1

    def _resubmit_short_read(self, luringcb: LuringAIOCB,
                             nread: int) -> None:
        if trace.luring_resubmit_short_read.enabled:
            trace.luring_resubmit_short_read(self, luringcb, nread)
        self.short_read_resubmits += 1
        luringcb.total_read += nread
        rest = []
        skip = luringcb.total_read
        for v in luringcb.req.iov:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        luringcb.keep.clear()
        self._prep(luringcb, luringcb.req.offset + luringcb.total_read,
                   rest)
        self._resubmit(luringcb)

    def io_plug(self) -> None:
        """Hold submissions (nested: counts)."""
        if trace.luring_io_plug.enabled:
            trace.luring_io_plug(self)
        self.plugged += 1

    def io_unplug(self, dev_max_batch: int) -> None:
        """Undo one io_plug; submit what is queued per QEMU's rule."""
        del dev_max_batch
        assert self.plugged > 0, "io_unplug without io_plug"
        if trace.luring_io_unplug.enabled:
            trace.luring_io_unplug(self, self.blocked, self.plugged,
                                   self.in_queue, self.in_flight)
        self.plugged -= 1
        if not self.plugged and not self.blocked and self.in_queue > 0:
            self._ioq_submit()

    # -- completion --------------------------------------------------------

    def _process_completions(self) -> None:
        # Armed while callbacks run: a nested aio_poll drains too.
        self.completion_bh.schedule()
        cqe = self._cqe
        while self._cq_ready_or_flush():
            _uring.io_uring_peek_cqe(self.ring, cqe)
            entry = cqe[0]
            key = int(entry.user_data)
            ret = _res(entry)
            _uring.io_uring_cqe_seen(self.ring, entry)
            self.in_flight -= 1
            luringcb = self.inflight.pop(key)
            if trace.luring_process_completion.enabled:
                trace.luring_process_completion(self, luringcb, ret)
            self._complete(luringcb, ret)
        self.completion_bh.cancel()
        if self._deferred:
            self.completion_bh.schedule()

    def _cq_ready_or_flush(self) -> bool:
        """Whether a CQE waits, after moving overflowed ones in.

        With more requests in flight than the CQ has entries (256), the
        kernel parks the extra completions on an overflow list and sets
        IORING_SQ_CQ_OVERFLOW; only an io_uring_enter with GETEVENTS
        moves them into the CQ.  QEMU gets that from io_uring_peek_cqe;
        testing the CQ alone would leave them there for ever (and the
        ring fd readable, so the loop would spin).
        """
        if _uring.io_uring_cq_ready(self.ring):
            return True
        if not _uring.io_uring_cq_has_overflow(self.ring):
            return False
        _uring.io_uring_get_events(self.ring)
        return bool(_uring.io_uring_cq_ready(self.ring))

    def _complete(self, luringcb: LuringAIOCB, ret: int) -> None:
        req = luringcb.req
        total = ret + luringcb.total_read
        if ret < 0:
            if ret in (-errno.EINTR, -errno.EAGAIN):
                # Not expected on files, seen with some SCSI devices.
                self._resubmit(luringcb)
                return
        elif req.type.op == AioType.FLUSH:
            pass
        elif total == req.nbytes:
            ret = 0
        elif req.type.op == AioType.READ:
            if ret > 0:
                self._resubmit_short_read(luringcb, ret)
                return
            iov_memset(req.iov, total, 0)
            ret = 0
        else:
            ret = -errno.ENOSPC
        luringcb.ret = ret
        luringcb.keep.clear()
        if self._submitting:
            self._deferred.append(luringcb)
        else:
            luringcb.cb(ret)

    def _process_completions_and_submit(self) -> None:
        # QEMU 8.2+: one defer section per batch (see linux_aio).
        with deferred_calls():
            self._process_completions()
            if not self.plugged and self.in_queue > 0:
                self._ioq_submit()

    def _completion_bh(self) -> None:
        deferred, self._deferred = self._deferred, []
        for luringcb in deferred:
            luringcb.cb(luringcb.ret)
        self._process_completions_and_submit()

    def _completion_cb(self) -> None:
        self._process_completions_and_submit()

    def _poll_cb(self) -> bool:
        # CQ tail != CQ head, read from the shared mapping: no syscall.
        return bool(_uring.io_uring_cq_ready(self.ring))

    def _poll_ready(self) -> None:
        self.polled_completions += 1
        self._process_completions_and_submit()


_states: PerContext[AioContextLike, LuringState] = PerContext(
    LuringState, LuringState.close)


def luring_get(ctx: AioContextLike) -> LuringState:
    """The LuringState of ``ctx`` (aio_setup_linux_io_uring); one user.

    :raises BlockError: the binding is missing or the kernel refused.
    """
    return _states.get(ctx)


def luring_put(ctx: AioContextLike) -> None:
    """Drop one user; the last one closes the ring."""
    _states.put(ctx)
