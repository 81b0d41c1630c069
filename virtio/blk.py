"""The virtio-blk device, as QEMU 7.2's hw/block/virtio-blk.c runs it.

What happens to a kick (reference §15.3-15.5):

1. ``handle_vq`` drains the queue.  Unless the queue is in poll mode
   (its ``notification`` is already off), guest kicks are turned off
   while draining and back on after; "on" ends with a full barrier, and
   the loop repeats until the ring reads empty *after* re-enabling, so a
   request published in the window is never left behind.
2. Each chain is parsed: the out header, then by type.  Reads and writes
   go to a ``MultiReqBuffer`` of up to 32 requests of one direction;
   FLUSH first submits pending *writes*.  Malformed headers are fatal
   (the device is broken); bad ranges complete with IOERR and unknown
   types with UNSUPP, without touching the backend.
3. At the end of the drain the buffer is submitted: sorted by sector and
   cut into runs of contiguous requests within the backend's limits;
   each run is one backend request with the iovecs concatenated.
4. Completion stores the status byte, pushes the element with
   ``used.len`` = all writable bytes, then notifies: with EVENT_IDX
   negotiated at once through ``should_notify``; without it (7.2's
   ``batch_notifications``) by marking the queue and scheduling a BH
   that notifies every marked queue once.

The device knows nothing of the event loop: the BH scheduler is a
callable handed in by ``qiothread.dataplane``, and the host notifier
hooks are plain methods the wiring registers.  Iothread only.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable
from dataclasses import fields

from qiothread import trace_events as trace
from qiothread.defer_call import defer_call, defer_call_begin, defer_call_end
from qiothread.errors import ConfigError, VirtioError
from virtio.blk_defs import (
    BDRV_REQUEST_MAX_SECTORS,
    DWZ_SEGMENT,
    IOV_MAX,
    OUTHDR,
    VIRTIO_BLK_AUTO_NUM_QUEUES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_MAX_MERGE_REQS,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlockBackend,
    QueueSetup,
    VirtIOBlkConf,
    VirtioBlkFeature,
    VirtioBlkStatus,
    VirtioBlkType,
    VirtQueueStats,
)
from virtio.driver import read_driver_stats
from virtio.memory import GuestMemory
from virtio.ring import VirtioFeature, feature_bit
from virtio.virtqueue import VirtIODevice, VirtQueue, VirtQueueElement

__all__ = [
    "BlockBackend",
    "QueueSetup",
    "VirtIOBlock",
    "VirtIOBlockReq",
    "VirtQueueStats",
]

_OUT = int(VirtioBlkType.OUT)
_TYPE_MASK = ~(_OUT | int(VirtioBlkType.BARRIER)) & 0xFFFFFFFF
_INT_MAX = 0x7FFFFFFF
_OK = int(VirtioBlkStatus.OK)
_IOERR = int(VirtioBlkStatus.IOERR)
_UNSUPP = int(VirtioBlkStatus.UNSUPP)
#: One stage-stamp entry: t_pickup, t_done (docs/interfaces.md).
_STAMP = struct.Struct("<QQ")


class VirtIOBlockReq:
    """One request in flight (``VirtIOBlockReq``)."""

    __slots__ = ("elem", "in_len", "qiov", "qiov_size", "sector_num",
                 "status", "t_done", "t_pickup", "type", "vq")

    def __init__(self, vq: VirtQueue, elem: VirtQueueElement) -> None:
        self.vq = vq
        self.elem = elem
        self.type = 0
        self.sector_num = 0
        self.in_len = 0
        #: The status byte (the last writable byte of the chain).
        self.status: memoryview | None = None
        #: Data buffers after the headers were trimmed off.
        self.qiov: list[memoryview] = []
        self.qiov_size = 0
        #: CLOCK_MONOTONIC ns at pop and at backend completion (when
        #: the queue has a stamp table).
        self.t_pickup = 0
        self.t_done = 0


class MultiReqBuffer:
    """``MultiReqBuffer``: reads or writes waiting to be merged."""

    __slots__ = ("is_write", "reqs")

    def __init__(self) -> None:
        self.reqs: list[VirtIOBlockReq] = []
        self.is_write = False


def _iov_discard_front(iov: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for v in iov:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def _iov_from_buf(iov: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in iov:
        if pos >= len(data):
            break
        chunk = data[pos:pos + len(v)]
        v[:len(chunk)] = chunk
        pos += len(chunk)


class VirtIOBlock(VirtIODevice):
    """A virtio-blk device over ``bs`` with ``len(queues)`` virtqueues.

    :raises ConfigError: for bad properties (QEMU's messages) or queues
        that do not match them.
    """

    def __init__(self, bs: BlockBackend, conf: VirtIOBlkConf,
                 queues: list[QueueSetup], *, mem: GuestMemory,
                 name: str = "virtio-blk") -> None:
        if conf.num_queues == VIRTIO_BLK_AUTO_NUM_QUEUES:
            conf.realize(vcpus=max(1, len(queues)))
        else:
            conf.realize()
        if len(queues) != conf.num_queues:
            raise ConfigError(
                f"{name}: {len(queues)} queues set up for "
                f"num-queues={conf.num_queues}")
        super().__init__(name, self._offered_features(conf, bs))
        self.bs = bs
        self.conf = conf
        self.mem = mem
        #: The guest-visible block size: the device's property (512 by
        #: default), not the host's; blockdev bounces what the host's
        #: alignment refuses.
        self.lbs = conf.logical_block_size
        self._sector_mask = self.lbs // 512 - 1
        align = max(1, bs.request_alignment)
        bs_max = getattr(bs, "max_transfer", 0) or _INT_MAX
        #: ``blk_get_max_transfer``: bytes per backend request.
        self.max_transfer = min(_INT_MAX, bs_max) // align * align
        self.stats: list[VirtQueueStats] = []
        self._driver_stats: list[int] = []
        self._stamps: list[int] = []
        for i, q in enumerate(queues):
            if q.layout.num > conf.queue_size:
                raise ConfigError(
                    f"{name}: queue {i} has {q.layout.num} entries, "
                    f"more than queue-size={conf.queue_size}")
            VirtQueue(self, i, mem, q.layout, q.host_notifier,
                      q.guest_notifier,
                      handle_output=self._output_handler(i))
            self.stats.append(VirtQueueStats())
            self._driver_stats.append(q.driver_stats)
            self._stamps.append(q.stamp_table)
        #: Dataplane started (notifications go through the BH path).
        self.dataplane_started = False
        #: 7.2: batch guest notifications in a BH when no EVENT_IDX.
        self.batch_notifications = False
        #: 8.2 (``poll-policy=8.2``): defer each queue's irqfd write to
        #: the end of the thread's defer_call section instead.
        self.defer_notifications = False
        self._deferred_irq: list[Callable[[], None]] = []
        self._notify_bh_schedule: Callable[[], None] | None = None
        self._notify_pending: set[int] = set()

    @staticmethod
    def _offered_features(conf: VirtIOBlkConf, bs: BlockBackend) -> int:
        bits = [VirtioFeature.VERSION_1, VirtioFeature.NOTIFY_ON_EMPTY,
                VirtioBlkFeature.SEG_MAX, VirtioBlkFeature.GEOMETRY,
                VirtioBlkFeature.TOPOLOGY, VirtioBlkFeature.BLK_SIZE,
                VirtioBlkFeature.FLUSH]
        if conf.config_wce:
            bits.append(VirtioBlkFeature.CONFIG_WCE)
        if bs.read_only:
            bits.append(VirtioBlkFeature.RO)
        if conf.num_queues > 1:
            bits.append(VirtioBlkFeature.MQ)
        if conf.discard:
            bits.append(VirtioBlkFeature.DISCARD)
        if conf.write_zeroes:
            bits.append(VirtioBlkFeature.WRITE_ZEROES)
        if conf.event_idx:
            bits.append(VirtioFeature.RING_EVENT_IDX)
        if conf.indirect_desc:
            bits.append(VirtioFeature.RING_INDIRECT_DESC)
        mask = 0
        for b in bits:
            mask |= feature_bit(b)
        return mask

    def _output_handler(self, index: int) -> Callable[[], None]:
        return lambda: self.handle_vq(index)

    # -- host notifier hooks (the AioContext calls these) ----------------

    def host_notifier_read(self, index: int) -> None:
        """Read handler of queue ``index``'s host notifier."""
        if self.vqs[index].host_notifier_read():
            self.stats[index].kicks += 1

    def host_notifier_poll(self, index: int) -> bool:
        """io_poll: queue ``index`` is set up and non-empty (no syscall)."""
        return self.vqs[index].host_notifier_poll()

    def host_notifier_poll_ready(self, index: int) -> None:
        """io_poll_ready: handle the queue without reading the eventfd."""
        self.stats[index].polled += 1
        self.vqs[index].host_notifier_poll_ready()

    def host_notifier_poll_begin(self, index: int) -> None:
        """Poll mode begins: no guest kicks wanted."""
        self.vqs[index].host_notifier_poll_begin()

    def host_notifier_poll_end(self, index: int) -> None:
        """Poll mode ends: guest kicks wanted again."""
        self.vqs[index].host_notifier_poll_end()

    # -- dataplane -------------------------------------------------------

    def dataplane_start(self, notify_bh_schedule: Callable[[], None],
                        defer_notifications: bool = False) -> None:
        """Enter dataplane mode (``virtio_blk_data_plane_start`` step 1/4).

        ``notify_bh_schedule`` schedules a BH that calls
        :meth:`notify_guest_bh` in the iothread.  With
        ``defer_notifications`` (QEMU 8.2+) there is no notification BH:
        each completion decides at once and defers the irqfd write with
        ``qiothread.defer_call``, one write per queue and section.
        """
        self.defer_notifications = defer_notifications
        # One callable per queue, so that defer_call collapses them.
        self._deferred_irq = [functools.partial(self._deferred_irqfd, i)
                              for i in range(len(self.vqs))]
        self.batch_notifications = not defer_notifications and \
            not self.has_feature(VirtioFeature.RING_EVENT_IDX)
        self._notify_bh_schedule = notify_bh_schedule
        self.dataplane_started = True

    def dataplane_stop(self) -> None:
        """Leave dataplane mode; a last chance to notify (step 4)."""
        self.notify_guest_bh()
        self.dataplane_started = False
        self._notify_bh_schedule = None

    def notify_guest_bh(self) -> None:
        """``notify_guest_bh``: notify every queue marked since last run."""
        pending = self._notify_pending
        self._notify_pending = set()
        for index in sorted(pending):
            self._notify_irqfd(index)

    def _notify_irqfd(self, index: int) -> None:
        self._count_notify(index, self.vqs[index].notify_irqfd())

    def _deferred_irqfd(self, index: int) -> None:
        self.vqs[index].notify_irqfd_deferred_fn()
        self.stats[index].interrupts += 1

    def _count_notify(self, index: int, sent: bool) -> None:
        if sent:
            self.stats[index].interrupts += 1
        else:
            self.stats[index].interrupts_suppressed += 1

    def _notify(self, vq: VirtQueue) -> None:
        """``virtio_blk_data_plane_notify`` / ``virtio_notify``."""
        if not self.dataplane_started:
            self._count_notify(vq.queue_index, vq.notify())
        elif self.defer_notifications:
            index = vq.queue_index
            if vq.notify_irqfd_decide():
                defer_call(self._deferred_irq[index])   # counts the write
            else:
                self.stats[index].interrupts_suppressed += 1
        elif self.batch_notifications and self._notify_bh_schedule:
            self._notify_pending.add(vq.queue_index)
            self._notify_bh_schedule()
        else:
            self._notify_irqfd(vq.queue_index)

    # -- the drain loop --------------------------------------------------

    def handle_vq(self, index: int) -> None:
        """``virtio_blk_handle_vq``: drain queue ``index`` (reference §15.3).

        Guest errors mark the device broken and end the drain; nothing
        raises out of here for anything the guest wrote.
        """
        vq = self.vqs[index]
        mrb = MultiReqBuffer()
        suppress = vq.notification
        self.bs.io_plug()
        # 8.2's blk_io_plug() is defer_call_begin(): requests completed
        # during the drain share one deferred notification.
        defer_call_begin()
        try:
            while True:
                if suppress:
                    vq.set_notification(False)
                self._drain(vq, mrb)
                if suppress:
                    vq.set_notification(True)
                if vq.is_empty():
                    break
            if mrb.reqs:
                self._submit_multireq(mrb)
        finally:
            self.bs.io_unplug()
            defer_call_end()

    def _drain(self, vq: VirtQueue, mrb: MultiReqBuffer) -> None:
        stats = self.stats[vq.queue_index]
        stamps = self._stamps[vq.queue_index]
        while True:
            try:
                elem = vq.pop()
            except VirtioError:
                # The device is broken and the error was
                # reported; pop returns None from now on.
                return
            if elem is None:
                return
            stats.requests += 1
            req = VirtIOBlockReq(vq, elem)
            if stamps:
                req.t_pickup = time.monotonic_ns()
            if self._handle_request(req, mrb):
                vq.detach_element(elem)
                return

    def _handle_request(self, req: VirtIOBlockReq,
                        mrb: MultiReqBuffer) -> bool:
        """``virtio_blk_handle_request``; True when fatal (device broken)."""
        elem = req.elem
        if not elem.out_sg or not elem.in_sg:
            self.virtio_error("virtio-blk missing headers")
            return True
        first = elem.out_sg[0]
        if len(first) >= OUTHDR.size:
            # The usual chain: the whole header in its first buffer,
            # read in place (no copy).
            rtype, _ioprio, sector = OUTHDR.unpack_from(first)
        else:
            hdr = b"".join(bytes(v[:16]) for v in elem.out_sg[:16])[:16]
            if len(hdr) < OUTHDR.size:
                self.virtio_error("virtio-blk request outhdr too short")
                return True
            rtype, _ioprio, sector = OUTHDR.unpack(hdr)
        out_iov = _iov_discard_front(elem.out_sg, OUTHDR.size)
        last = elem.in_sg[-1]
        if len(last) < 1:
            self.virtio_error("virtio-blk request inhdr too short")
            return True
        # We always touch the last byte: the status.
        req.in_len = sum(map(len, elem.in_sg))
        req.status = last[len(last) - 1:]
        in_iov = elem.in_sg[:-1]
        if len(last) > 1:
            in_iov.append(last[:len(last) - 1])
        req.type = rtype
        kind = rtype & _TYPE_MASK
        if kind == VirtioBlkType.IN:
            self._handle_rw(req, mrb, rtype & _OUT != 0, sector,
                            out_iov if rtype & _OUT else in_iov)
        elif kind == VirtioBlkType.FLUSH:
            self._handle_flush(req, mrb)
        elif kind == VirtioBlkType.GET_ID:
            serial = self.conf.serial.encode()
            size = min(len(serial) + 1, req.in_len - 1,
                       VIRTIO_BLK_ID_BYTES)
            _iov_from_buf(in_iov, (serial + b"\0")[:size])
            self._req_complete(req, _OK)
        elif kind == VirtioBlkType.SCSI_CMD:
            self._handle_scsi(req)
        elif kind in (VirtioBlkType.DISCARD & ~_OUT,
                      VirtioBlkType.WRITE_ZEROES & ~_OUT):
            return self._handle_dwz(req, out_iov)
        else:
            self._req_complete(req, _UNSUPP)
        return False

    def _sect_range_ok(self, sector: int, size: int) -> bool:
        """``virtio_blk_sect_range_ok``."""
        nb_sectors = size >> 9
        if nb_sectors > BDRV_REQUEST_MAX_SECTORS:
            return False
        if sector & self._sector_mask:
            return False
        if size % self.lbs:
            return False
        total = self.bs.length >> 9
        return sector <= total and nb_sectors <= total - sector

    def _handle_rw(self, req: VirtIOBlockReq, mrb: MultiReqBuffer,
                   is_write: bool, sector: int,
                   qiov: list[memoryview]) -> None:
        req.sector_num = sector
        req.qiov = qiov
        req.qiov_size = size = sum(map(len, qiov))
        ev = (trace.virtio_blk_handle_write if is_write
              else trace.virtio_blk_handle_read)
        if ev.enabled:
            ev(self, req, sector, size // 512)
        if not self._sect_range_ok(sector, size):
            self._req_complete(req, _IOERR)
            return
        if mrb.reqs and (len(mrb.reqs) == VIRTIO_BLK_MAX_MERGE_REQS
                         or is_write != mrb.is_write
                         or not self.conf.request_merging):
            self._submit_multireq(mrb)
        mrb.reqs.append(req)
        mrb.is_write = is_write

    def _handle_flush(self, req: VirtIOBlockReq,
                      mrb: MultiReqBuffer) -> None:
        # Outstanding writes reach the backend before the flush does;
        # pending reads may stay behind it.
        if mrb.is_write and mrb.reqs:
            self._submit_multireq(mrb)
        self.bs.flush(lambda ret: self._simple_complete(req, ret))

    def _handle_scsi(self, req: VirtIOBlockReq) -> None:
        """SCSI passthrough (``scsi=off``, as always from 9.1): refused."""
        elem = req.elem
        if len(elem.out_sg) < 2 or len(elem.in_sg) < 3:
            self._req_complete(req, _IOERR)
            return
        # "errors" of the virtio_scsi_inhdr, in the second-to-last
        # writable buffer: anything non-zero fails the ioctl.
        errs = elem.in_sg[-2]
        n = min(4, len(errs))
        errs[:n] = (255).to_bytes(4, "little")[:n]
        self._req_complete(req, _UNSUPP)

    def _handle_dwz(self, req: VirtIOBlockReq,
                    out_iov: list[memoryview]) -> bool:
        """DISCARD and WRITE_ZEROES; True when fatal."""
        is_wz = (req.type & ~int(VirtioBlkType.BARRIER)
                 == VirtioBlkType.WRITE_ZEROES)
        out_len = sum(len(v) for v in out_iov)
        # Only one segment is supported, and the OUT bit must be set.
        if not req.type & _OUT or out_len > DWZ_SEGMENT.size:
            self._req_complete(req, _UNSUPP)
            return False
        if out_len < DWZ_SEGMENT.size:
            self.virtio_error(
                "virtio-blk discard/write_zeroes header too short")
            return True
        seg = b"".join(bytes(v) for v in out_iov)
        sector, num_sectors, flags = DWZ_SEGMENT.unpack(seg)
        max_sectors = (self.conf.max_write_zeroes_sectors if is_wz
                       else self.conf.max_discard_sectors)
        if num_sectors > max_sectors:
            self._req_complete(req, _IOERR)
            return False
        nbytes = num_sectors << 9
        if not self._sect_range_ok(sector, nbytes):
            self._req_complete(req, _IOERR)
            return False
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            self._req_complete(req, _UNSUPP)
            return False

        def done(ret: int) -> None:
            self._simple_complete(req, ret)

        if is_wz:
            self.bs.pwrite_zeroes(
                sector << 9, nbytes,
                bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), done)
        elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            self._req_complete(req, _UNSUPP)
        else:
            self.bs.pdiscard(sector << 9, nbytes, done)
        return False

    # -- merging and submission (reference §15.4) ------------------------

    def _submit_multireq(self, mrb: MultiReqBuffer) -> None:
        """``virtio_blk_submit_multireq``: sort, cut into runs, submit."""
        reqs = mrb.reqs
        if len(reqs) == 1:
            self._submit_requests(mrb, 0, 1)
            mrb.reqs = []
            return
        # Stable, by sector (QEMU's qsort with a three-way compare).
        reqs.sort(key=lambda r: r.sector_num)
        max_transfer = self.max_transfer
        start = num = 0
        sector_num = nb_sectors = niov = 0
        for i, req in enumerate(reqs):
            if num and (sector_num + nb_sectors != req.sector_num
                        or niov > IOV_MAX - len(req.qiov)
                        or req.qiov_size > max_transfer
                        or nb_sectors > (max_transfer - req.qiov_size)
                        // 512):
                self._submit_requests(mrb, start, num)
                num = 0
            if not num:
                sector_num = req.sector_num
                nb_sectors = niov = 0
                start = i
            nb_sectors += req.qiov_size // 512
            niov += len(req.qiov)
            num += 1
        self._submit_requests(mrb, start, num)
        mrb.reqs = []

    def _submit_requests(self, mrb: MultiReqBuffer, start: int,
                         num: int) -> None:
        """``submit_requests``: one backend request for
        ``mrb.reqs[start:start + num]``."""
        run = mrb.reqs[start:start + num]
        is_write = mrb.is_write
        first = run[0]
        stats = self.stats[first.vq.queue_index]
        stats.rw_submits += 1
        offset = first.sector_num << 9
        if num > 1:
            qiov = [v for r in run for v in r.qiov]
            if trace.virtio_blk_submit_multireq.enabled:
                trace.virtio_blk_submit_multireq(
                    self, mrb, start, num, offset,
                    sum(r.qiov_size for r in run), is_write)
            stats.merges += num - 1
        else:
            qiov = first.qiov

        def done(ret: int) -> None:
            self._rw_complete(run, ret)

        if is_write:
            self.bs.pwritev(offset, qiov, done)
        else:
            self.bs.preadv(offset, qiov, done)

    # -- completion (reference §15.5) ------------------------------------

    def _rw_complete(self, run: list[VirtIOBlockReq], ret: int) -> None:
        """``virtio_blk_rw_complete``: complete every request of a run."""
        for req in run:
            if trace.virtio_blk_rw_complete.enabled:
                trace.virtio_blk_rw_complete(self, req, ret)
            self._simple_complete(req, ret)

    def _simple_complete(self, req: VirtIOBlockReq, ret: int) -> None:
        if self._stamps[req.vq.queue_index]:
            req.t_done = time.monotonic_ns()
        # rerror=report / werror=enospc without a VM to stop: every
        # backend error reaches the guest as IOERR.
        if ret < 0:
            self._req_complete(req, _IOERR)
        else:
            self._req_complete(req, _OK)

    def _req_complete(self, req: VirtIOBlockReq, status: int) -> None:
        """``virtio_blk_req_complete``: status, push, notify."""
        if trace.virtio_blk_req_complete.enabled:
            trace.virtio_blk_req_complete(self, req, status)
        if req.status is not None:
            req.status[0] = status
        index = req.vq.queue_index
        stamps = self._stamps[index]
        if stamps:
            # Published by the used.idx store in push (write barrier).
            _STAMP.pack_into(self.mem.buf, stamps + 16 * req.elem.index,
                             req.t_pickup, req.t_done or req.t_pickup)
        stats = self.stats[index]
        if status == _IOERR:
            stats.ioerr += 1
        elif status == _UNSUPP:
            stats.unsupp += 1
        req.vq.push(req.elem, req.in_len)
        self._notify(req.vq)

    # -- reporting -------------------------------------------------------

    def queue_stats(self, index: int) -> dict[str, int]:
        """Device counters of queue ``index`` and, when the guest driver
        publishes its own, the driver's (prefixed ``guest_``)."""
        out = {f.name: getattr(self.stats[index], f.name)
               for f in fields(VirtQueueStats)}
        if self._driver_stats[index]:
            drv = read_driver_stats(self.mem, self._driver_stats[index])
            out.update({f"guest_{k}": v for k, v in drv.items()})
        return out
