"""The device's view of a split virtqueue, as QEMU 7.2's hw/virtio/virtio.c.

What the device may assume, and what it must not (reference §13):

- The guest owns the descriptor table and the avail ring and may write
  anything there at any time.  Every value read from them is checked
  before use; a violation is reported with QEMU's own message, marks
  the device *broken* (``virtio_error``: NEEDS_RESET with VERSION_1),
  and from then on the queue reads as empty and pops nothing.  Nothing
  a guest writes can raise anything but :class:`VirtioError` here, and
  no walk is unbounded: a chain is cut at ``max`` entries.
- ``avail.idx`` is read before the slots it publishes
  (:func:`~virtio.ring.read_barrier`).  The device keeps a shadow of the
  last value read, so "is the ring non-empty" costs no guest-memory
  access while unconsumed entries remain, and never a syscall: that is
  what the AioContext polls.
- The used element is written before ``used.idx``
  (:func:`~virtio.ring.write_barrier`).
- Two Dekker pairs cross the process boundary and take a full barrier
  between their store and their load:

  * re-enabling guest kicks (``set_notification(True)``) stores
    ``avail_event`` or clears ``VRING_USED_F_NO_NOTIFY``, and the caller
    then re-reads ``avail.idx``; the guest stores ``avail.idx`` and then
    reads the suppression state (``virtio.driver``);
  * ``should_notify`` follows the ``used.idx`` store and reads
    ``used_event`` / ``avail.flags``; the guest stores ``used_event``
    and then re-reads ``used.idx`` before it sleeps.

- With EVENT_IDX, writing ``avail_event`` is skipped while the queue's
  own ``notification`` is off: disabling notification writes nothing at
  all (reference §22 (i)), the guest simply stops kicking once it has
  passed the last ``avail_event`` published.

All state here is iothread-only: one AioContext owns a queue.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from qiothread import trace_events as trace
from qiothread.barrier import full_barrier
from qiothread.errors import VirtioError
from qiothread.event_notifier import EventNotifier
from virtio.memory import FIRST_ADDR, GuestMemory
from virtio.ring import (
    DESC,
    USED_ELEM,
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_AVAIL_FLAGS,
    VRING_AVAIL_IDX,
    VRING_USED_F_NO_NOTIFY,
    VRING_USED_FLAGS,
    VRING_USED_IDX,
    VirtioFeature,
    VringDescFlag,
    VringLayout,
    avail_event_offset,
    has_feature,
    read_barrier,
    used_event_offset,
    vring_need_event,
    write_barrier,
)

__all__ = [
    "VirtIODevice",
    "VirtQueue",
    "VirtQueueElement",
    "VirtioStatus",
]

log = logging.getLogger(__name__)

_NEXT = int(VringDescFlag.NEXT)
_WRITE = int(VringDescFlag.WRITE)
_INDIRECT = int(VringDescFlag.INDIRECT)


class VirtioStatus(enum.IntFlag):
    """``VIRTIO_CONFIG_S_*``: the device status byte."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    #: Set by ``virtio_error`` on a VERSION_1 device.
    NEEDS_RESET = 0x40
    FAILED = 0x80


class VirtIODevice:
    """What every device shares: features, status and the broken flag.

    Iothread only, except :attr:`broken` which any thread may read.
    """

    def __init__(self, name: str, host_features: int) -> None:
        #: For messages, e.g. ``virtio-blk``.
        self.name = name
        #: Features the device offers.
        self.host_features = host_features
        #: Features the driver accepted (``virtio_set_features``).
        self.guest_features = host_features
        #: The status byte.
        self.status = VirtioStatus(0)
        #: ``vdev->broken``: a guest error stopped the device.
        self.broken = False
        #: The message of the first ``virtio_error``.
        self.broken_reason: str | None = None
        #: Every ``virtio_error`` message, in order.
        self.errors: list[str] = []
        #: The ISR byte (bit 0: a queue interrupt, as virtio-pci has it).
        self.isr = 0
        #: Called after ``virtio_error`` (the config interrupt).
        self.config_notify: Callable[[], None] | None = None
        self.vqs: list[VirtQueue] = []

    def has_feature(self, bit: int) -> bool:
        """``virtio_vdev_has_feature``: was ``bit`` negotiated?"""
        return has_feature(self.guest_features, bit)

    def set_features(self, features: int) -> None:
        """``virtio_set_features``: what the driver accepted.

        Bits the device did not offer are dropped, as QEMU does.
        """
        self.guest_features = features & self.host_features
        for vq in self.vqs:
            vq.update_features()

    def virtio_error(self, msg: str) -> VirtioError:
        """Report a guest error and mark the device broken.

        Returns the exception for the caller to raise, so that the
        raise is visible at the call site.
        """
        log.error("%s", msg)
        if self.has_feature(VirtioFeature.VERSION_1):
            self.status |= VirtioStatus.NEEDS_RESET
            if self.config_notify is not None:
                self.config_notify()
        self.errors.append(msg)
        if not self.broken:
            self.broken = True
            self.broken_reason = msg
        return VirtioError(msg)


class VirtQueueElement:
    """One popped descriptor chain (``VirtQueueElement``).

    ``out_sg`` are the device-readable buffers and ``in_sg`` the
    device-writable ones, as views into guest memory, in chain order.
    """

    __slots__ = ("in_addr", "in_sg", "index", "ndescs", "out_addr",
                 "out_sg")

    def __init__(self, index: int, out_addr: list[int],
                 out_sg: list[memoryview], in_addr: list[int],
                 in_sg: list[memoryview]) -> None:
        #: The head descriptor's index, returned in the used element.
        self.index = index
        #: Always 1 for split rings.
        self.ndescs = 1
        self.out_addr = out_addr
        self.out_sg = out_sg
        self.in_addr = in_addr
        self.in_sg = in_sg

    def __repr__(self) -> str:
        return (f"VirtQueueElement(index={self.index}, "
                f"out={[len(v) for v in self.out_sg]}, "
                f"in={[len(v) for v in self.in_sg]})")


class VirtQueue:
    """The device side of one split virtqueue in shared guest memory.

    Iothread only.  The fields are QEMU's, with its meaning.
    """

    def __init__(self, vdev: VirtIODevice, queue_index: int,
                 mem: GuestMemory, layout: VringLayout | None,
                 host_notifier: EventNotifier | None = None,
                 guest_notifier: EventNotifier | None = None,
                 handle_output: Callable[[], None] | None = None) -> None:
        self.vdev = vdev
        self.queue_index = queue_index
        self.mem = mem
        self._buf = mem.buf
        self._mv = mem.mv
        # Fields the guest writes or reads concurrently go through u16:
        # one aligned load or store each (see virtio.memory).
        self._u16 = mem.u16
        #: The guest -> device eventfd (KVM's ioeventfd).
        self.host_notifier = host_notifier
        #: The device -> guest eventfd (the irqfd).
        self.guest_notifier = guest_notifier
        #: The device's queue handler (``vq->handle_output``).
        self.handle_output = handle_output
        #: Next avail entry to consume.
        self.last_avail_idx = 0
        #: The last value of ``avail.idx`` read.
        self.shadow_avail_idx = 0
        #: The device's own copy of ``used.idx``.
        self.used_idx = 0
        #: Elements popped and not yet pushed.
        self.inuse = 0
        #: ``used_idx`` when the guest was last notified.
        self.signalled_used = 0
        self.signalled_used_valid = False
        #: The device's own notify-enable state (``vq->notification``).
        self.notification = True
        self.num = 0
        self.desc = self.avail = self.used = 0
        self._avail_idx_at = self._used_idx_at = 0
        self._avail_event_at = self._used_event_at = 0
        self._event_idx = False
        self._notify_on_empty = False
        if layout is not None:
            self.set_rings(layout)
        vdev.vqs.append(self)
        self.update_features()

    def set_rings(self, layout: VringLayout) -> None:
        """Point the queue at its rings (the driver wrote the addresses).

        :raises ConfigError: if the rings do not fit in guest memory
            (QEMU would refuse to map them).
        """
        layout.check_within(self.mem.size)
        self.num = layout.num
        self.desc, self.avail, self.used = (
            layout.desc, layout.avail, layout.used)
        self._avail_idx_at = layout.avail + VRING_AVAIL_IDX
        self._used_idx_at = layout.used + VRING_USED_IDX
        self._avail_event_at = layout.used + avail_event_offset(layout.num)
        self._used_event_at = layout.avail + used_event_offset(layout.num)

    def update_features(self) -> None:
        """Cache the negotiated ring features (after set_features)."""
        self._event_idx = self.vdev.has_feature(VirtioFeature.RING_EVENT_IDX)
        self._notify_on_empty = self.vdev.has_feature(
            VirtioFeature.NOTIFY_ON_EMPTY)

    # -- guest memory accessors -----------------------------------------

    def _avail_idx(self) -> int:
        """``vring_avail_idx``: read ``avail.idx``, refresh the shadow."""
        idx: int = self._u16[self._avail_idx_at >> 1]
        self.shadow_avail_idx = idx
        return idx

    def _set_avail_event(self, val: int) -> None:
        """``vring_set_avail_event``: nothing while notification is off."""
        if not self.notification:
            return
        self._u16[self._avail_event_at >> 1] = val

    # -- empty check and pop --------------------------------------------

    def is_empty(self) -> bool:
        """``virtio_queue_empty``: no new avail entries (no syscall).

        A broken device or a queue without rings reads as empty.  While
        the shadow shows unconsumed entries, guest memory is not read.
        """
        if self.vdev.broken or not self.desc:
            return True
        if self.shadow_avail_idx != self.last_avail_idx:
            return False
        return self._avail_idx() == self.last_avail_idx

    def _error(self, msg: str) -> VirtioError:
        return self.vdev.virtio_error(msg)

    def pop(self) -> VirtQueueElement | None:
        """``virtqueue_pop``: take the next available chain, or None.

        :raises VirtioError: on any malformed ring or chain; the device
            is then broken and every later pop returns None.
        """
        if self.vdev.broken or self.is_empty():
            return None
        num = self.num
        last = self.last_avail_idx
        # virtqueue_num_heads' sanity check: a guest cannot publish
        # more entries than it has descriptors.  QEMU 7.2 runs it in
        # virtqueue_get_avail_bytes, not in pop (which would go on to
        # pop stale slots); we run it here, as reference §13.4 lists it.
        if (self.shadow_avail_idx - last) & 0xFFFF > num:
            raise self._error(
                f"Guest moved used index from {last} to "
                f"{self.shadow_avail_idx}")
        # The slot must be read after the avail.idx that published it.
        read_barrier()

        if self.inuse >= num:
            raise self._error("Virtqueue size exceeded")
        head: int = self._u16[(self.avail >> 1) + 2 + last % num]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= num:
            raise self._error(f"Guest says index {head} is available")
        if self._event_idx:
            self._set_avail_event(self.last_avail_idx)

        elem = self._read_chain(head)
        self.inuse += 1
        if trace.virtqueue_pop.enabled:
            trace.virtqueue_pop(self, elem, len(elem.in_sg),
                                len(elem.out_sg))
        return elem

    def _read_chain(self, head: int) -> VirtQueueElement:
        """Walk the chain at ``head`` (direct or indirect) and map it."""
        buf = self._buf
        mv = self._mv
        size = self.mem.size
        table = self.desc
        limit = self.num
        addr, length, flags, nxt = DESC.unpack_from(buf, table + 16 * head)
        if flags & _INDIRECT:
            if not length or length % 16:
                raise self._error("Invalid size for indirect buffer table")
            if addr < FIRST_ADDR or addr + length > size:
                raise self._error("Cannot map indirect buffer")
            table = addr
            limit = length // 16
            addr, length, flags, nxt = DESC.unpack_from(buf, table)

        out_addr: list[int] = []
        out_sg: list[memoryview] = []
        in_addr: list[int] = []
        in_sg: list[memoryview] = []
        entries = 0
        while True:
            # virtqueue_map_desc: the checks, in QEMU's order.
            if flags & _WRITE:
                max_sg = VIRTQUEUE_MAX_SIZE - len(out_sg)
                sg, addrs = in_sg, in_addr
            else:
                if in_sg:
                    raise self._error("Incorrect order for descriptors")
                max_sg = VIRTQUEUE_MAX_SIZE
                sg, addrs = out_sg, out_addr
            if not length:
                raise self._error(
                    "virtio: zero sized buffers are not allowed")
            if len(sg) == max_sg:
                raise self._error(
                    "virtio: too many write descriptors in indirect table")
            # Page 0 holds the allocator's header shared by every
            # process: it is not guest RAM, and a guest that points a
            # buffer there is refused as QEMU refuses an address that
            # maps no RAM.
            if addr < FIRST_ADDR or addr + length > size:
                raise self._error(
                    "virtio: bogus descriptor or out of resources")
            sg.append(mv[addr:addr + length])
            addrs.append(addr)

            entries += 1
            if entries > limit:
                raise self._error("Looped descriptor")
            if not flags & _NEXT:
                break
            if nxt >= limit:
                raise self._error(f"Desc next is {nxt}")
            addr, length, flags, nxt = DESC.unpack_from(
                buf, table + 16 * nxt)
        return VirtQueueElement(head, out_addr, out_sg, in_addr, in_sg)

    def detach_element(self, elem: VirtQueueElement) -> None:
        """``virtqueue_detach_element``: forget ``elem``, no used entry."""
        self.inuse -= elem.ndescs

    # -- push -----------------------------------------------------------

    def fill(self, elem: VirtQueueElement, length: int, idx: int = 0) -> None:
        """``virtqueue_fill``: write used element ``used_idx + idx``."""
        if trace.virtqueue_fill.enabled:
            trace.virtqueue_fill(self, elem, length, idx)
        if self.vdev.broken:
            # virtio_device_disabled: a broken device writes nothing
            # more into the used ring (flush still does the accounting).
            return
        slot = (self.used_idx + idx) % self.num
        USED_ELEM.pack_into(self._buf, self.used + 4 + 8 * slot,
                            elem.index, length)

    def flush(self, count: int) -> None:
        """``virtqueue_flush``: publish ``count`` filled used elements."""
        if self.vdev.broken:
            # virtio_device_disabled: account, publish nothing.
            self.inuse -= count
            return
        # The used elements must be visible before the index moves.
        write_barrier()
        if trace.virtqueue_flush.enabled:
            trace.virtqueue_flush(self, count)
        old = self.used_idx
        new = (old + count) & 0xFFFF
        self._u16[self._used_idx_at >> 1] = new
        self.used_idx = new
        self.inuse -= count
        # If used_idx just moved past signalled_used, the latter no
        # longer says anything about what the guest has seen.
        since = (new - self.signalled_used) & 0xFFFF
        if since >= 0x8000:
            since -= 0x10000
        if since < ((new - old) & 0xFFFF):
            self.signalled_used_valid = False

    def push(self, elem: VirtQueueElement, length: int) -> None:
        """``virtqueue_push``: fill at 0, then flush one."""
        self.fill(elem, length, 0)
        self.flush(1)

    # -- notification suppression ----------------------------------------

    def set_notification(self, enable: bool) -> None:
        """``virtio_queue_set_notification``: ask for (no) guest kicks.

        Without EVENT_IDX this sets or clears ``VRING_USED_F_NO_NOTIFY``.
        With EVENT_IDX it writes ``avail_event = avail.idx``, which the
        helper skips while ``notification`` is off: disabling writes
        nothing.  Enabling ends with a full barrier, so the caller's
        next :meth:`is_empty` cannot miss an entry the guest published
        before it saw the new suppression state.
        """
        self.notification = enable
        if not self.desc:
            return
        if self._event_idx:
            self._set_avail_event(self._avail_idx())
        else:
            at = (self.used + VRING_USED_FLAGS) >> 1
            flags: int = self._u16[at]
            if enable:
                flags &= ~VRING_USED_F_NO_NOTIFY & 0xFFFF
            else:
                flags |= VRING_USED_F_NO_NOTIFY
            self._u16[at] = flags
        if enable:
            # Pairs with the guest's barrier between its avail.idx store
            # and its read of avail_event / used.flags.
            full_barrier()

    def should_notify(self) -> bool:
        """``virtio_split_should_notify``: does the guest want an interrupt?

        Updates ``signalled_used`` when EVENT_IDX is negotiated.
        """
        # Pairs with the guest's barrier between its used_event store
        # and its re-read of used.idx before sleeping.
        full_barrier()
        if (self._notify_on_empty and not self.inuse
                and self.is_empty()):
            return True
        if not self._event_idx:
            aflags: int = self._u16[(self.avail + VRING_AVAIL_FLAGS) >> 1]
            return not aflags & VRING_AVAIL_F_NO_INTERRUPT
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        used_event: int = self._u16[self._used_event_at >> 1]
        return not valid or vring_need_event(used_event, new, old)

    def notify_irqfd(self) -> bool:
        """``virtio_notify_irqfd``: interrupt the guest if it wants one.

        Sets ISR bit 0 and writes the guest notifier.  Returns whether
        it did (False: suppressed by the guest).
        """
        if not self.should_notify():
            return False
        if trace.virtio_notify_irqfd.enabled:
            trace.virtio_notify_irqfd(self.vdev, self)
        self.vdev.isr |= 1
        if self.guest_notifier is not None:
            self.guest_notifier.set()
        return True

    def notify_irqfd_decide(self) -> bool:
        """QEMU 8.2's ``virtio_notify_irqfd`` up to the write: decide and
        set ISR bit 0; the caller defers :meth:`notify_irqfd_deferred_fn`
        (``qiothread.defer_call``) when this returns True."""
        if not self.should_notify():
            return False
        if trace.virtio_notify_irqfd.enabled:
            trace.virtio_notify_irqfd(self.vdev, self)
        self.vdev.isr |= 1
        return True

    def notify_irqfd_deferred_fn(self) -> None:
        """``virtio_notify_irqfd_deferred_fn``: the guest-notifier write."""
        if trace.virtio_notify_irqfd_deferred_fn.enabled:
            trace.virtio_notify_irqfd_deferred_fn(self.vdev, self)
        if self.guest_notifier is not None:
            self.guest_notifier.set()

    def notify(self) -> bool:
        """``virtio_notify``: the same decision outside dataplane (the
        emulation path), traced as QEMU traces it there."""
        if not self.should_notify():
            return False
        if trace.virtio_notify.enabled:
            trace.virtio_notify(self.vdev, self)
        self.vdev.isr |= 1
        if self.guest_notifier is not None:
            self.guest_notifier.set()
        return True

    # -- host notifier hooks (reference §14) ----------------------------

    def notify_vq(self) -> None:
        """``virtio_queue_notify_vq``: run the queue handler."""
        if not self.desc or self.handle_output is None or self.vdev.broken:
            return
        if trace.virtio_queue_notify.enabled:
            trace.virtio_queue_notify(self.vdev, self.queue_index, self)
        self.handle_output()

    def host_notifier_read(self) -> bool:
        """The host notifier's read handler: consume the kick, handle.

        Returns whether there was a kick to consume.
        """
        if self.host_notifier is None:
            return False
        if not self.host_notifier.test_and_clear():
            return False
        self.notify_vq()
        return True

    def host_notifier_poll(self) -> bool:
        """The io_poll callback: rings set up and not empty (no syscall)."""
        return bool(self.desc) and not self.is_empty()

    def host_notifier_poll_ready(self) -> None:
        """io_poll_ready: handle without reading the eventfd."""
        self.notify_vq()

    def host_notifier_poll_begin(self) -> None:
        """Poll mode begins: ask the guest not to kick."""
        self.set_notification(False)

    def host_notifier_poll_end(self) -> None:
        """Poll mode ends: ask for kicks again (then the loop re-polls)."""
        self.set_notification(True)

    def __repr__(self) -> str:
        return (f"VirtQueue({self.queue_index}, num={self.num}, "
                f"last_avail={self.last_avail_idx}, used={self.used_idx}, "
                f"inuse={self.inuse})")
