"""The driver's (guest's) view of a split virtqueue, as Linux's virtio_ring.

The contract the driver keeps with the device (reference §13, §16):

- It owns the descriptor table: free descriptors are on a free list and
  a chain is written completely before its head is published.
- Publishing: write ``avail.ring[avail_idx % N] = head``, then (write
  barrier) store ``avail.idx``.  A batch of publications is followed by
  one kick decision.
- Kick decision (``virtqueue_kick_prepare``): a *full* barrier between
  the ``avail.idx`` store and the load of the device's suppression state
  (``avail_event`` with EVENT_IDX, ``used.flags`` without).  The device
  pairs it with the barrier after re-enabling notification; without the
  pair both sides could read stale values and the request would sit in
  the ring with nobody looking.  Kicks the device suppressed are counted.
- Completions: read ``used.idx`` (read barrier) before the element it
  publishes.  While callbacks are enabled, after each element the driver
  stores ``used_event = last_used_idx`` with a full barrier; before it
  sleeps it re-arms and re-reads ``used.idx`` (``virtqueue_enable_cb``):
  the pair of the device's barrier in ``should_notify``.
- A polled queue (callbacks disabled) sets ``VRING_AVAIL_F_NO_INTERRUPT``
  and stops updating ``used_event``; with EVENT_IDX the device may
  still interrupt when ``used.idx`` happens to pass the stale value.

Single-threaded: one guest process drives one :class:`VringDriver`.
"""

from __future__ import annotations

from typing import Final

from qiothread.barrier import full_barrier
from qiothread.errors import VirtioError
from qiothread.event_notifier import EventNotifier
from virtio.memory import GuestMemory
from virtio.ring import (
    DESC,
    USED_ELEM,
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
    "DRIVER_STATS_FIELDS",
    "DRIVER_STATS_SIZE",
    "VringDriver",
    "alloc_vring",
    "read_driver_stats",
]

_NEXT = int(VringDescFlag.NEXT)
_WRITE = int(VringDescFlag.WRITE)
_INDIRECT = int(VringDescFlag.INDIRECT)

#: Counters a guest driver publishes in guest memory, in this order
#: (u64 each), so that the VMM can read them while the guest runs.
DRIVER_STATS_FIELDS: Final = (
    "submitted",          # requests made available
    "completed",          # used elements consumed
    "kicks",              # host-notifier writes
    "kicks_suppressed",   # kicks skipped: the device asked for none
    "interrupt_waits",    # times the driver slept on the call eventfd
    "interrupts",         # wake-ups with the call eventfd set
    "lost_interrupts",    # a wait passed its deadline with work in used
    "stalled_waits",      # a wait passed its deadline with nothing used
)
#: Bytes of the counter block (8-byte aligned).
DRIVER_STATS_SIZE: Final = 8 * len(DRIVER_STATS_FIELDS)


def read_driver_stats(mem: GuestMemory, addr: int) -> dict[str, int]:
    """The counters a guest driver last published at ``addr`` (any
    process; each counter is read with one aligned load)."""
    base = addr >> 3
    return {k: int(mem.u64[base + i])
            for i, k in enumerate(DRIVER_STATS_FIELDS)}


def alloc_vring(mem: GuestMemory, num: int) -> VringLayout:
    """Allocate and zero a split ring of ``num`` entries in ``mem``.

    :raises ConfigError: for a bad ``num`` or when memory runs out.
    """
    VringLayout.check_num(num)
    dsz, asz, usz = VringLayout.sizes(num)
    layout = VringLayout(num, mem.alloc(dsz, 16), mem.alloc(asz, 2),
                         mem.alloc(usz, 4))
    for addr, size in ((layout.desc, dsz), (layout.avail, asz),
                       (layout.used, usz)):
        mem.buf[addr:addr + size] = bytes(size)
    return layout


class VringDriver:
    """The guest side of one split ring.

    ``features`` are the negotiated ones.  Not thread-safe: one guest
    process (or thread) only.
    """

    def __init__(self, mem: GuestMemory, layout: VringLayout,
                 features: int,
                 host_notifier: EventNotifier | None = None,
                 stats_addr: int = 0) -> None:
        self.mem = mem
        self.layout = layout
        self.num = layout.num
        self._buf = mem.buf
        # Shared fields go through u16: one aligned load or store each.
        self._u16 = mem.u16
        self.host_notifier = host_notifier
        self.event_idx = has_feature(features, VirtioFeature.RING_EVENT_IDX)
        self.indirect = has_feature(features,
                                    VirtioFeature.RING_INDIRECT_DESC)
        #: Free descriptor indices (a stack: the last freed is reused).
        self._free = list(range(layout.num - 1, -1, -1))
        #: Descriptors of each in-flight chain, by head.
        self._chains: dict[int, list[int]] = {}
        #: The ``avail.idx`` last published.
        self.avail_idx = 0
        #: Publications since the last kick decision.
        self.num_added = 0
        #: The next used index to consume.
        self.last_used_idx = 0
        #: Our ``avail.flags`` (NO_INTERRUPT while callbacks are off).
        self.avail_flags_shadow = 0
        self.kicks = 0
        self.kicks_suppressed = 0
        self.stats_addr = stats_addr
        self._avail_idx_at = layout.avail + VRING_AVAIL_IDX
        self._avail_ring_at = layout.avail + 4
        self._used_idx_at = layout.used + VRING_USED_IDX
        self._used_ring_at = layout.used + 4
        self._used_event_at = layout.avail + used_event_offset(layout.num)
        self._avail_event_at = layout.used + avail_event_offset(layout.num)

    @property
    def num_free(self) -> int:
        """Descriptors free for new chains."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains published and not yet consumed from the used ring."""
        return len(self._chains)

    def next_head(self) -> int:
        """The head the next :meth:`add` will use (its first free
        descriptor), so callers can key per-request scratch by it.

        :raises BlockingIOError: when no descriptor is free.
        """
        if not self._free:
            raise BlockingIOError("virtqueue full: no free descriptor")
        return self._free[-1]

    # -- publishing ------------------------------------------------------

    def add(self, out: list[tuple[int, int]], in_: list[tuple[int, int]],
            indirect_table: int = 0) -> int:
        """Write a chain (``out`` readable, then ``in_`` writable buffers,
        as ``(addr, len)``) and publish it; return its head.

        With ``indirect_table`` (an address with room for all entries)
        the chain goes there and takes a single ring descriptor.

        :raises BlockingIOError: when there are not enough free
            descriptors (reap completions first).
        """
        nbufs = len(out) + len(in_)
        if not nbufs:
            raise ValueError("a descriptor chain needs at least one buffer")
        buf = self._buf
        free = self._free
        pack = DESC.pack_into
        # One pass per table, no per-buffer tuples: this runs for every
        # request.  Entry i links to entry i + 1 (its index in an
        # indirect table, the next popped descriptor in the ring's).
        if indirect_table:
            last = nbufs - 1
            i = 0
            for a, n in out:
                pack(buf, indirect_table + 16 * i, a, n,
                     _NEXT if i < last else 0, i + 1 if i < last else 0)
                i += 1
            for a, n in in_:
                pack(buf, indirect_table + 16 * i, a, n,
                     _WRITE | _NEXT if i < last else _WRITE,
                     i + 1 if i < last else 0)
                i += 1
            if not free:
                raise BlockingIOError(
                    "virtqueue full: 1 descriptors wanted, 0 free")
            descs = [free.pop()]
            pack(buf, self.layout.desc + 16 * descs[0], indirect_table,
                 16 * nbufs, _INDIRECT, 0)
        else:
            if nbufs > len(free):
                raise BlockingIOError(
                    f"virtqueue full: {nbufs} descriptors wanted, "
                    f"{len(free)} free")
            descs = free[:-nbufs - 1:-1]
            del free[-nbufs:]
            table = self.layout.desc
            last = nbufs - 1
            i = 0
            for a, n in out:
                pack(buf, table + 16 * descs[i], a, n,
                     _NEXT if i < last else 0,
                     descs[i + 1] if i < last else 0)
                i += 1
            for a, n in in_:
                pack(buf, table + 16 * descs[i], a, n,
                     _WRITE | _NEXT if i < last else _WRITE,
                     descs[i + 1] if i < last else 0)
                i += 1
        head = descs[0]
        self._chains[head] = descs
        u16 = self._u16
        u16[(self._avail_ring_at >> 1) + self.avail_idx % self.num] = head
        # The slot and the chain must be visible before the index.
        write_barrier()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        u16[self._avail_idx_at >> 1] = self.avail_idx
        self.num_added += 1
        return head

    def kick_prepare(self) -> bool:
        """``virtqueue_kick_prepare``: does the device want a kick?

        Counts a suppressed kick when it does not.
        """
        # Our avail.idx store before the device's suppression state:
        # pairs with the barrier in VirtQueue.set_notification(True).
        full_barrier()
        new = self.avail_idx
        old = (new - self.num_added) & 0xFFFF
        added = self.num_added
        self.num_added = 0
        if not added:
            return False
        if self.event_idx:
            event: int = self._u16[self._avail_event_at >> 1]
            need = vring_need_event(event, new, old)
        else:
            flags: int = self._u16[(self.layout.used + VRING_USED_FLAGS)
                                   >> 1]
            need = not flags & VRING_USED_F_NO_NOTIFY
        if not need:
            self.kicks_suppressed += 1
        return need

    def notify(self) -> None:
        """``virtqueue_notify``: write the host notifier."""
        self.kicks += 1
        if self.host_notifier is not None:
            self.host_notifier.set()

    def kick(self) -> bool:
        """Kick unless suppressed; return whether a kick was sent."""
        if self.kick_prepare():
            self.notify()
            return True
        return False

    # -- consuming -------------------------------------------------------

    def more_used(self) -> bool:
        """Whether the device has published used elements we have not
        consumed (one load, no barrier)."""
        used_idx: int = self._u16[self._used_idx_at >> 1]
        return self.last_used_idx != used_idx

    def get_buf(self) -> tuple[int, int] | None:
        """``virtqueue_get_buf``: the next ``(head, len)``, or None.

        :raises VirtioError: if the device returned a head that is not
            in flight (Linux marks the ring broken).
        """
        if not self.more_used():
            return None
        # The element after the used.idx that published it.
        read_barrier()
        slot = self.last_used_idx % self.num
        head, length = USED_ELEM.unpack_from(
            self._buf, self._used_ring_at + 8 * slot)
        descs = self._chains.pop(head, None)
        if descs is None:
            raise VirtioError(f"id {head} is not a head!")
        self._free.extend(reversed(descs))
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            # virtio_store_mb: the device must see how far we got
            # before we look at used.idx again.
            self._u16[self._used_event_at >> 1] = self.last_used_idx
            full_barrier()
        return head, length

    def disable_cb(self) -> None:
        """``virtqueue_disable_cb``: ask for no interrupts."""
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            return
        self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            # What Linux writes: any fixed value does, the device only
            # fires when used.idx passes it, once per 65536 elements.
            self._u16[self._used_event_at >> 1] = 0
        else:
            self._u16[(self.layout.avail + VRING_AVAIL_FLAGS) >> 1] = (
                self.avail_flags_shadow)

    def enable_cb(self) -> bool:
        """``virtqueue_enable_cb``: re-arm interrupts, then re-check.

        Returns False if used elements arrived meanwhile (consume them
        before sleeping), True if it is safe to wait for an interrupt.
        """
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._u16[(self.layout.avail + VRING_AVAIL_FLAGS)
                          >> 1] = self.avail_flags_shadow
        if self.event_idx:
            self._u16[self._used_event_at >> 1] = self.last_used_idx
        # Our re-arm before the used.idx re-read: pairs with the barrier
        # at the start of VirtQueue.should_notify.
        full_barrier()
        return not self.more_used()

    def publish_stats(self, counters: dict[str, int]) -> None:
        """Write the counter block (if there is one) for the VMM."""
        if not self.stats_addr:
            return
        counters = dict(counters, kicks=self.kicks,
                        kicks_suppressed=self.kicks_suppressed)
        # One aligned store per counter: the VMM may be reading.
        u64 = self.mem.u64
        base = self.stats_addr >> 3
        for i, k in enumerate(DRIVER_STATS_FIELDS):
            u64[base + i] = counters.get(k, 0)
