"""A virtio-blk guest driver: the "vCPU" side of one queue.

It runs in its own process (forked from the VMM after guest memory and
the eventfds exist) and behaves as Linux's virtio_blk over virtio_ring:

- each request is a real descriptor chain in guest memory: the 16-byte
  out header, the data buffers (or the 16-byte DISCARD / WRITE_ZEROES
  segment), and a 1-byte status, optionally through an indirect table;
- after a batch of submissions it kicks the host notifier unless the
  device suppressed kicks (``avail_event`` / ``VRING_USED_F_NO_NOTIFY``),
  counting the kicks it skipped;
- it reaps by waiting on the call eventfd (interrupt mode), arming
  ``used_event`` and re-checking the used ring before each sleep, or by
  spinning on the used ring (a polled queue: interrupts disabled);
- every request is stamped with CLOCK_MONOTONIC nanoseconds when it is
  submitted and when its completion is seen, so that the timestamps of
  different processes compare directly.

The API is low level on purpose, for a workload runner at any queue
depth: :meth:`GuestBlkDriver.submit` returns a tag, :meth:`reap` returns
completions.  Buffers are guest addresses (``GuestMemory.alloc``).
"""

from __future__ import annotations

import select
import struct
import time
from dataclasses import dataclass

from qiothread.event_notifier import EventNotifier
from virtio.blk_defs import (
    DWZ_SEGMENT,
    OUTHDR,
    VirtioBlkFeature,
    VirtioBlkType,
)
from virtio.driver import VringDriver
from virtio.memory import GuestMemory
from virtio.ring import (
    VRING_DESC_SIZE,
    VirtioFeature,
    VringLayout,
    feature_bit,
)

__all__ = ["DRIVER_FEATURES", "Completion", "GuestBlkDriver",
           "negotiate_features"]

#: Per-head scratch: out header (16), DWZ segment (16), status (1).
_SLOT = 48
_HDR, _DWZ, _STATUS = 0, 16, 32
#: The status byte before the device writes it: not a valid status.
STATUS_UNSET = 0xFF
_STAMP = struct.Struct("<QQ")
# Request types as plain ints: submit() tests them for every request,
# and an enum attribute lookup costs more than the comparison.
_T_IN, _T_OUT, _T_GET_ID = (int(VirtioBlkType.IN), int(VirtioBlkType.OUT),
                            int(VirtioBlkType.GET_ID))
_T_DWZ = (int(VirtioBlkType.DISCARD), int(VirtioBlkType.WRITE_ZEROES))


def _mask(*bits: int) -> int:
    m = 0
    for b in bits:
        m |= feature_bit(b)
    return m


#: What Linux's virtio_blk and virtio_ring accept: its device features
#: and the transport features it keeps (NOTIFY_ON_EMPTY is legacy-only
#: and not among them, so a modern Linux guest never negotiates it).
DRIVER_FEATURES = _mask(
    VirtioBlkFeature.SIZE_MAX, VirtioBlkFeature.SEG_MAX,
    VirtioBlkFeature.GEOMETRY, VirtioBlkFeature.RO,
    VirtioBlkFeature.BLK_SIZE, VirtioBlkFeature.FLUSH,
    VirtioBlkFeature.TOPOLOGY, VirtioBlkFeature.CONFIG_WCE,
    VirtioBlkFeature.MQ, VirtioBlkFeature.DISCARD,
    VirtioBlkFeature.WRITE_ZEROES, VirtioFeature.RING_INDIRECT_DESC,
    VirtioFeature.RING_EVENT_IDX, VirtioFeature.VERSION_1)


def negotiate_features(host_features: int,
                       driver_features: int = DRIVER_FEATURES) -> int:
    """The features a Linux guest would accept from ``host_features``."""
    return host_features & driver_features


@dataclass(slots=True)
class Completion:
    """One finished request, as the guest saw it."""

    tag: int
    #: The status byte (``VirtioBlkStatus`` value; 0xFF if unwritten).
    status: int
    #: CLOCK_MONOTONIC ns just before the chain was published.
    t_submit: int
    #: CLOCK_MONOTONIC ns when the guest consumed the used element.
    t_complete: int
    #: ``used.len`` as the device reported it.
    used_len: int
    #: The request type.
    kind: int
    #: Device stage stamps (CLOCK_MONOTONIC ns; 0 without a stamp
    #: table): when the device popped the request, and when the
    #: backend completed it.
    t_pickup: int = 0
    t_done: int = 0


class GuestBlkDriver:
    """The guest driver of one virtio-blk queue (one process, one thread).

    ``poll_queue`` makes it a polled queue (no interrupts, spin on the
    used ring).  ``wait_deadline_ns`` bounds each sleep; a sleep that
    reaches it is counted as a *lost interrupt* if completions were
    waiting meanwhile, or as a *stalled wait* if none were (and the
    blocking :meth:`reap` then returns empty-handed).
    """

    def __init__(self, mem: GuestMemory, layout: VringLayout,
                 features: int, host_notifier: EventNotifier,
                 guest_notifier: EventNotifier, *,
                 poll_queue: bool = False, use_indirect: bool = False,
                 max_segments: int = 32,
                 wait_deadline_ns: int = 10_000_000_000,
                 stats_addr: int = 0, stamp_table: int = 0) -> None:
        self.mem = mem
        self.vring = VringDriver(mem, layout, features, host_notifier,
                                 stats_addr)
        self.guest_notifier = guest_notifier
        self.poll_queue = poll_queue
        self.use_indirect = use_indirect and self.vring.indirect
        self.max_segments = max_segments
        self.wait_deadline_ns = wait_deadline_ns
        self.stamp_table = stamp_table
        num = layout.num
        self._slots = mem.alloc(_SLOT * num, 64)
        self._tables = (mem.alloc(VRING_DESC_SIZE * (max_segments + 3)
                                  * num, 16) if self.use_indirect else 0)
        self._table_stride = VRING_DESC_SIZE * (max_segments + 3)
        #: head -> (tag, kind, t_submit)
        self._inflight: dict[int, tuple[int, int, int]] = {}
        self._next_tag = 0
        self._batch_heads: list[int] = []
        self.counters = {
            "submitted": 0, "completed": 0, "interrupt_waits": 0,
            "interrupts": 0, "lost_interrupts": 0, "stalled_waits": 0,
        }
        if poll_queue:
            self.vring.disable_cb()
        self._poller = select.poll()
        self._poller.register(guest_notifier.fileno(), select.POLLIN)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet reaped."""
        return len(self._inflight)

    def can_submit(self, nbuffers: int = 1) -> bool:
        """Whether a request with ``nbuffers`` data buffers fits now."""
        need = 1 if self.use_indirect else nbuffers + 2
        return self.vring.num_free >= need

    def submit(self, kind: int, offset: int,
               buffers: list[tuple[int, int]] | None = None, *,
               nbytes: int = 0, flags: int = 0, kick: bool = True) -> int:
        """Make one request available; return its tag.

        ``kind`` is a ``VirtioBlkType`` (any u32 is sent as it is);
        ``offset`` is in bytes and must be a multiple of 512 (the wire
        carries sectors).  ``buffers`` are ``(guest_addr, length)``: the
        data to write (OUT), to read into (IN), or the GET_ID buffer.
        DISCARD and WRITE_ZEROES take ``nbytes`` and ``flags`` instead.
        With ``kick=False`` the kick decision waits for :meth:`kick`.

        :raises ValueError: for an offset not in 512-byte units, or more
            buffers than ``max_segments`` with indirect descriptors.
        :raises BlockingIOError: when the ring has no room.
        """
        if offset % 512 or offset < 0:
            raise ValueError(f"offset {offset} is not a multiple of 512")
        buffers = buffers or []
        if self.use_indirect and len(buffers) > self.max_segments:
            raise ValueError(
                f"{len(buffers)} buffers, more than max_segments="
                f"{self.max_segments}")
        sector = offset // 512
        vr = self.vring
        if not self.can_submit(len(buffers)):
            raise BlockingIOError(
                f"virtqueue full ({vr.in_flight} requests in flight)")
        # Per-request scratch (headers, status) is keyed by the head.
        head_guess = vr.next_head()
        slot = self._slots + _SLOT * head_guess
        buf = self.mem.buf
        OUTHDR.pack_into(buf, slot + _HDR, kind & 0xFFFFFFFF, 0, sector)
        buf[slot + _STATUS] = STATUS_UNSET
        status = (slot + _STATUS, 1)
        out: list[tuple[int, int]] = [(slot + _HDR, OUTHDR.size)]
        in_: list[tuple[int, int]]
        if kind == _T_OUT:
            out += buffers
            in_ = [status]
        elif kind in (_T_IN, _T_GET_ID):
            in_ = [*buffers, status]
        elif kind in _T_DWZ:
            DWZ_SEGMENT.pack_into(buf, slot + _DWZ, sector, nbytes // 512,
                                  flags)
            out.append((slot + _DWZ, DWZ_SEGMENT.size))
            in_ = [status]
        else:
            out += buffers
            in_ = [status]
        table = (self._tables + self._table_stride * head_guess
                 if self.use_indirect else 0)
        t_submit = time.monotonic_ns()
        head = vr.add(out, in_, table)
        if head != head_guess:  # pragma: no cover - add() pops the top
            raise AssertionError("descriptor free list out of order")
        tag = self._next_tag
        self._next_tag += 1
        self._inflight[head] = (tag, kind, t_submit)
        self.counters["submitted"] += 1
        if kick:
            vr.kick()
        return tag

    def kick(self) -> bool:
        """Kick for everything submitted with ``kick=False``, unless
        suppressed.  Returns whether the host notifier was written."""
        return self.vring.kick()

    def _collect(self, out: list[Completion]) -> None:
        vr = self.vring
        buf = self.mem.buf
        while True:
            got = vr.get_buf()
            if got is None:
                return
            head, used_len = got
            tag, kind, t_submit = self._inflight.pop(head)
            status = buf[self._slots + _SLOT * head + _STATUS]
            c = Completion(tag, status, t_submit, time.monotonic_ns(),
                           used_len, kind)
            if self.stamp_table:
                c.t_pickup, c.t_done = _STAMP.unpack_from(
                    buf, self.stamp_table + 16 * head)
            out.append(c)

    def reap(self, block: bool = False) -> list[Completion]:
        """Completions seen so far; with ``block``, wait for at least one.

        A blocking reap gives up after one wait of ``wait_deadline_ns``
        that saw nothing (counted in ``stalled_waits``) and returns an
        empty list, so that a device that stopped answering (broken, or
        a lost kick) is noticed by the caller instead of hanging it.
        Blocking with nothing in flight returns an empty list at once.
        """
        out: list[Completion] = []
        self._collect(out)
        if block and not out and self._inflight:
            if self.poll_queue:
                self._spin(out)
            else:
                self._wait(out)
        self.counters["completed"] += len(out)
        return out

    def _spin(self, out: list[Completion]) -> None:
        deadline = time.monotonic_ns() + self.wait_deadline_ns
        vr = self.vring
        while not out:
            if vr.more_used():
                self._collect(out)
            elif time.monotonic_ns() > deadline:
                self.counters["stalled_waits"] += 1
                return

    def _wait(self, out: list[Completion]) -> None:
        c = self.counters
        timeout_ms = max(1, self.wait_deadline_ns // 1_000_000)
        while not out:
            if not self.vring.enable_cb():
                # Completions arrived while we were arming.
                self._collect(out)
                continue
            c["interrupt_waits"] += 1
            if self._poller.poll(timeout_ms):
                if self.guest_notifier.test_and_clear():
                    c["interrupts"] += 1
            elif self.vring.more_used():
                c["lost_interrupts"] += 1
            else:
                c["stalled_waits"] += 1
                return
            self._collect(out)

    def publish_stats(self) -> None:
        """Write the counters where the VMM reads them (if configured)."""
        self.vring.publish_stats(self.counters)

    def close(self) -> None:
        """Stop watching the call eventfd (the fds belong to the VMM)."""
        try:
            self._poller.unregister(self.guest_notifier.fileno())
        except (KeyError, ValueError):
            pass
