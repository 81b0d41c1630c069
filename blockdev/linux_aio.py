"""aio=native: Linux AIO per AioContext (QEMU's block/linux-aio.c, §10).

The kernel contract this relies on (io_setup(2), io_submit(2), fs/aio.c):

- ``io_setup(nr)`` maps a completion ring into the process and returns
  its address as the context handle.  The ring starts with a header of
  eight 32-bit words (``id, nr, head, tail, magic, compat_features,
  incompat_features, header_length``) followed by ``nr`` 32-byte
  ``io_event`` records (``data, obj, res, res2``).  The kernel writes
  events at ``tail`` and advances it; the consumer reads from ``head``
  and advances ``head`` itself.  Reading the ring and storing ``head``
  is what libaio's ``io_getevents`` fast path and QEMU do, so a
  completion can be found and consumed **without a syscall**.  That is
  our ``io_poll``.
- An iocb with ``IOCB_FLAG_RESFD`` makes the kernel add 1 to that
  eventfd when the request completes: the fd the event loop sleeps on.
- ``io_submit`` takes an array of iocbs and returns how many it
  accepted, or ``-errno`` when it accepted none.  EAGAIN means "no
  resources now" (retry after completions); any other error belongs to
  the first iocb of the array.
- ``res`` is the byte count or ``-errno``.  O_DIRECT is required for
  the submission to be really asynchronous; without it ``io_submit``
  does the I/O synchronously, which is why QEMU insists on
  ``cache.direct=on`` for aio=native.

QEMU's queue rules are kept as they are: batches of
``min_nonzero(device aio-max-batch, iothread aio-max-batch or 32,
1024 - in_flight)``, nested plugging, EAGAIN leaves the queue "blocked"
until the next completion, another error fails only the head request,
completions are processed right after a submission when anything is in
flight, and the completion BH is armed while callbacks run so that a
nested event loop still drains the ring.  There are no laio trace
events in QEMU, so there are none here.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from blockdev.per_context import PerContext
from blockdev.raw_aio import (
    AioContextLike,
    AioType,
    CompletionCB,
    RawAIOCB,
    buffer_address,
    iov_memset,
)
from qiothread.barrier import full_barrier
from qiothread.defer_call import deferred_calls
from qiothread.errors import BlockError
from qiothread.event_notifier import EventNotifier

try:
    from libaio import libaio as _aio
except OSError as _exc:  # libaio.so.1 missing: engine unavailable
    _aio = None
    _AIO_IMPORT_ERROR: str = str(_exc)
else:
    _AIO_IMPORT_ERROR = ""

__all__ = [
    "DEFAULT_MAX_BATCH",
    "MAX_EVENTS",
    "LinuxAioState",
    "laio_get",
    "laio_max_batch",
    "laio_put",
]

#: io_setup depth and the cap on requests in flight.
MAX_EVENTS = 1024
#: Batch size when neither the iothread nor the device sets one.
DEFAULT_MAX_BATCH = 32
_AIO_RING_MAGIC = 0xA10A10A1
_RING_HEADER = 32
_EVENT_SIZE = 32
#: ``struct iocb`` (linux/aio_abi.h, little-endian): aio_data, aio_key,
#: aio_rw_flags, aio_lio_opcode, aio_reqprio, aio_fildes, aio_buf,
#: aio_nbytes, aio_offset, aio_reserved2, aio_flags, aio_resfd.  One
#: pack of it costs what a single field store through libaio's ctypes
#: helpers does (io_prep_* plus io_set_eventfd are ~20 us a request).
_IOCB = struct.Struct("<QIIhhIQQqQII")
#: ``struct io_event``: data, obj, res, res2.
_IO_EVENT = struct.Struct("<QQqq")
#: ``struct iovec``: iov_base, iov_len.
_IOVEC = struct.Struct("<QQ")
_IOCB_CMD_PREADV = 7
_IOCB_CMD_PWRITEV = 8
_IOCB_FLAG_RESFD = 1


def _min_nonzero(a: int, b: int) -> int:
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)


def laio_max_batch(ctx_max_batch: int, dev_max_batch: int,
                   in_flight: int) -> int:
    """``laio_max_batch``: how many requests to gather per io_submit."""
    b = ctx_max_batch or DEFAULT_MAX_BATCH
    b = _min_nonzero(dev_max_batch, b)
    return _min_nonzero(MAX_EVENTS - in_flight, b)


@dataclass(slots=True, eq=False)
class LaioCB:
    """One request on its way through the kernel (qemu_laiocb)."""

    req: RawAIOCB
    cb: CompletionCB
    key: int
    #: The iocb and its iovecs, in one C buffer kept until completion.
    iocb: object = None
    #: The iocb's address (what io_submit's array holds).
    iocb_ptr: int = 0
    #: Buffer exports kept alive until completion.
    keep: list[object] = field(default_factory=list)
    ret: int = -errno.EINPROGRESS


class _Ring:
    """The kernel's ``struct aio_ring`` at the context handle's address.

    Home thread only; only ``head`` is ever written from user space.
    """

    def __init__(self, addr: int) -> None:
        hdr = (ctypes.c_uint * 8).from_address(addr)
        if hdr[4] != _AIO_RING_MAGIC:
            raise BlockError("linux AIO ring has an unknown layout")
        self.nr = int(hdr[1])
        self._hdr = hdr
        self.events = (_aio.io_event * self.nr).from_address(
            addr + _RING_HEADER)
        #: The whole ring as bytes: events are unpacked from it with
        #: struct (a ctypes record per event costs several times more).
        self.raw = memoryview((ctypes.c_char * (
            _RING_HEADER + _EVENT_SIZE * self.nr)).from_address(addr))

    @property
    def head(self) -> int:
        return int(self._hdr[2])

    @head.setter
    def head(self, value: int) -> None:
        self._hdr[2] = value

    @property
    def tail(self) -> int:
        return int(self._hdr[3])

    def pending(self) -> bool:
        """Whether the kernel has published events we have not consumed."""
        return self._hdr[3] != self._hdr[2]


class LinuxAioState:
    """The Linux AIO context of one AioContext.  Home thread only."""

    handles_flush = False

    def __init__(self, ctx: AioContextLike) -> None:
        if _aio is None:
            raise BlockError(
                f"failed to create linux AIO context: {_AIO_IMPORT_ERROR}")
        self.ctx = ctx
        self.e = EventNotifier()
        self.io_ctx = _aio.io_context_t()
        try:
            _aio.io_setup(MAX_EVENTS, ctypes.byref(self.io_ctx))
        except OSError as exc:
            self.e.close()
            raise BlockError("failed to create linux AIO context: "
                             f"{exc.strerror or exc}") from exc
        addr = ctypes.cast(self.io_ctx, ctypes.c_void_p).value
        assert addr is not None
        self.ring = _Ring(addr)
        # io_submit's iocb pointer array, reused by every submission.
        self._iocbs = (ctypes.c_void_p * MAX_EVENTS)()
        self._iocbs_arg = ctypes.cast(self._iocbs, _aio.iocb_pp)
        # The io_queue of QEMU's LinuxAioState.
        self.plugged = 0
        self.in_queue = 0
        self.in_flight = 0
        self.blocked = False
        self.pending: deque[LaioCB] = deque()
        self.inflight: dict[int, LaioCB] = {}
        self.keys = itertools.count(1)
        # Nested-safe progress through one peeked batch of events.
        self.event_idx = 0
        self.event_max = 0
        self._peek_head = 0
        # Completions found while submitting run from the BH, not inside
        # the submitter (QEMU defers them to the coroutine's wakeup
        # queue the same way).
        self._submitting = False
        self._deferred: list[LaioCB] = []
        #: The syscall, replaceable at this boundary by tests that need
        #: an EAGAIN the kernel will not give on demand.
        self.io_submit: Callable[[int, object], int] = self._io_submit
        #: Counters for reports and tests.
        self.submit_calls = 0
        self.polled_completions = 0
        self.completion_bh = ctx.bh_new(self._completion_bh, "laio")
        ctx.set_event_notifier(self.e, self._completion_cb,
                               self._poll_cb, self._poll_ready)

    def close(self) -> None:
        """laio_detach_aio_context + laio_cleanup: waits for in-flight."""
        self.ctx.set_event_notifier(self.e, None)
        self.completion_bh.delete()
        _aio.io_destroy(self.io_ctx)
        self.e.close()

    # -- submission ------------------------------------------------------

    def submit(self, req: RawAIOCB, cb: CompletionCB,
               dev_max_batch: int) -> None:
        """laio_co_submit: queue one READ/WRITE; maybe io_submit now."""
        laiocb = LaioCB(req, cb, next(self.keys))
        self._prep(laiocb)
        self.pending.append(laiocb)
        self.in_queue += 1
        if not self.blocked and (
                not self.plugged
                or self.in_queue >= self._max_batch(dev_max_batch)):
            self._ioq_submit()

    def _prep(self, laiocb: LaioCB) -> None:
        req = laiocb.req
        iov = req.iov
        # The iocb, then its iovec array, in one zeroed C buffer.
        cbuf = (ctypes.c_char * (_IOCB.size + _IOVEC.size
                                 * max(len(iov), 1)))()
        base = ctypes.addressof(cbuf)
        pos = _IOCB.size
        for v in iov:
            addr = buffer_address(v)
            if addr is None:
                raise BlockError("aio=native needs writable buffers")
            laiocb.keep.append(v)
            _IOVEC.pack_into(cbuf, pos, addr, len(v))
            pos += _IOVEC.size
        # io_prep_preadv/pwritev + io_set_eventfd: buf is the iovec
        # array, nbytes its count.
        _IOCB.pack_into(
            cbuf, 0, laiocb.key, 0, 0,
            _IOCB_CMD_PREADV if req.type.op == AioType.READ
            else _IOCB_CMD_PWRITEV, 0, req.fd, base + _IOCB.size,
            len(iov), req.offset, 0, _IOCB_FLAG_RESFD, self.e.fileno())
        laiocb.iocb = cbuf
        laiocb.iocb_ptr = base

    def _max_batch(self, dev_max_batch: int) -> int:
        return laio_max_batch(self.ctx.aio_max_batch, dev_max_batch,
                              self.in_flight)

    def _io_submit(self, n: int, array: object) -> int:
        try:
            return int(_aio.io_submit(self.io_ctx, n, array))
        except OSError as exc:
            return -(exc.errno or errno.EIO)

    def _ioq_submit(self) -> None:
        self._submitting = True
        try:
            while self.in_flight < MAX_EVENTS and self.pending:
                n = min(len(self.pending), MAX_EVENTS - self.in_flight)
                iocbs = self._iocbs
                for i, c in enumerate(itertools.islice(self.pending, n)):
                    iocbs[i] = c.iocb_ptr
                self.submit_calls += 1
                ret = self.io_submit(n, self._iocbs_arg)
                if ret == -errno.EAGAIN:
                    break
                if ret < 0:
                    # The error is the head request's: fail it alone
                    # and go on with the rest.
                    head = self.pending.popleft()
                    self.in_queue -= 1
                    head.ret = ret
                    self._finish(head)
                    continue
                for _ in range(ret):
                    c = self.pending.popleft()
                    self.inflight[c.key] = c
                self.in_flight += ret
                self.in_queue -= ret
                if ret != n:
                    break
            self.blocked = self.in_queue > 0
            if self.in_flight:
                # Something may have completed already: take it now.
                self._process_completions()
        finally:
            self._submitting = False
        if self._deferred:
            self.completion_bh.schedule()

    def io_plug(self) -> None:
        """Hold submissions (nested: counts)."""
        self.plugged += 1

    def io_unplug(self, dev_max_batch: int) -> None:
        """Undo one io_plug; submit what is queued per QEMU's rule."""
        assert self.plugged > 0, "io_unplug without io_plug"
        self.plugged -= 1
        if self.in_queue >= self._max_batch(dev_max_batch) or (
                not self.plugged and not self.blocked and self.pending):
            self._ioq_submit()

    # -- completion --------------------------------------------------------

    def _advance_and_peek(self, consumed: int) -> int:
        ring = self.ring
        head = ring.head
        if consumed:
            head = (head + consumed) % ring.nr
            ring.head = head
        tail = ring.tail
        # Read the events only after the tail that published them.
        full_barrier()
        self._peek_head = head
        return tail - head if tail >= head else ring.nr - head

    def _process_completions(self) -> None:
        # Armed while callbacks run: a nested aio_poll drains too.
        self.completion_bh.schedule()
        ring = self.ring
        while True:
            self.event_max = self._advance_and_peek(self.event_idx)
            if not self.event_max:
                break
            self.event_idx = 0
            while self.event_idx < self.event_max:
                key, _obj, res, _res2 = _IO_EVENT.unpack_from(
                    ring.raw, _RING_HEADER + _EVENT_SIZE
                    * (self._peek_head + self.event_idx))
                laiocb = self.inflight.pop(key)
                laiocb.ret = res
                self.in_flight -= 1
                self.event_idx += 1
                self._finish(laiocb)
        self.completion_bh.cancel()
        self.event_max = 0
        self.event_idx = 0
        if self._deferred:
            self.completion_bh.schedule()

    def _finish(self, laiocb: LaioCB) -> None:
        """qemu_laio_process_completion: QEMU's result rules."""
        req = laiocb.req
        ret = laiocb.ret
        if ret == req.nbytes:
            ret = 0
        elif ret >= 0:
            if req.type.op == AioType.READ:
                iov_memset(req.iov, ret, 0)
                ret = 0
            else:
                ret = -errno.ENOSPC
        laiocb.ret = ret
        laiocb.keep.clear()
        if self._submitting:
            self._deferred.append(laiocb)
        else:
            laiocb.cb(ret)

    def _process_completions_and_submit(self) -> None:
        # QEMU 8.2+: one defer section around the batch, so a device
        # that defers its guest notification (poll-policy=8.2) writes
        # the irqfd once for every request completed here.
        with deferred_calls():
            self._process_completions()
            if not self.plugged and self.pending:
                self._ioq_submit()

    def _completion_bh(self) -> None:
        deferred, self._deferred = self._deferred, []
        for laiocb in deferred:
            laiocb.cb(laiocb.ret)
        self._process_completions_and_submit()

    def _completion_cb(self) -> None:
        if self.e.test_and_clear():
            self._process_completions_and_submit()

    def _poll_cb(self) -> bool:
        # No syscall: the kernel's ring is in our memory.
        return self.ring.pending()

    def _poll_ready(self) -> None:
        self.polled_completions += 1
        self._process_completions_and_submit()


_states: PerContext[AioContextLike, LinuxAioState] = PerContext(
    LinuxAioState, LinuxAioState.close)


def laio_get(ctx: AioContextLike) -> LinuxAioState:
    """The LinuxAioState of ``ctx`` (aio_setup_linux_aio); counts a user.

    :raises BlockError: libaio is missing or io_setup failed.
    """
    return _states.get(ctx)


def laio_put(ctx: AioContextLike) -> None:
    """Drop one user; the last one closes the state."""
    _states.put(ctx)
