"""The device view of the split ring, driven by the real driver view.

Every QEMU check in virtqueue_pop gives QEMU's message, marks the device
broken, and leaves the queue reading as empty; notification suppression
is checked field by field in guest memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qiothread.errors import VirtioError
from qiothread.event_notifier import EventNotifier
from virtio.driver import VringDriver, alloc_vring
from virtio.memory import GuestMemory
from virtio.ring import (
    DESC,
    U16,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    VirtioFeature,
    VringDescFlag,
    avail_event_offset,
    feature_bit,
    used_event_offset,
)
from virtio.virtqueue import VirtIODevice, VirtioStatus, VirtQueue

EVENT_IDX = feature_bit(VirtioFeature.RING_EVENT_IDX)
BASE = (feature_bit(VirtioFeature.VERSION_1)
        | feature_bit(VirtioFeature.RING_INDIRECT_DESC))
W = int(VringDescFlag.WRITE)
N_ = int(VringDescFlag.NEXT)
IND = int(VringDescFlag.INDIRECT)


@dataclass
class Q:
    mem: GuestMemory
    vdev: VirtIODevice
    vq: VirtQueue
    drv: VringDriver
    kick: EventNotifier
    call: EventNotifier
    buf: int

    def u16(self, addr: int) -> int:
        v: int = U16.unpack_from(self.mem.buf, addr)[0]
        return v

    @property
    def avail_event(self) -> int:
        return self.u16(self.vq.used + avail_event_offset(self.vq.num))

    @property
    def used_flags(self) -> int:
        return self.u16(self.vq.used)

    def set_used_event(self, v: int) -> None:
        U16.pack_into(self.mem.buf, self.vq.avail
                      + used_event_offset(self.vq.num), v)

    def publish_raw(self, head: int, idx: int | None = None) -> None:
        """Put ``head`` in the next avail slot and move avail.idx."""
        a = self.drv.avail_idx
        U16.pack_into(self.mem.buf, self.vq.avail + 4 + 2 * (a % self.vq.num),
                      head)
        self.drv.avail_idx = (a + 1) & 0xFFFF if idx is None else idx
        U16.pack_into(self.mem.buf, self.vq.avail + 2, self.drv.avail_idx)

    def desc(self, i: int, addr: int, length: int, flags: int,
             nxt: int = 0, table: int | None = None) -> None:
        base = self.vq.desc if table is None else table
        DESC.pack_into(self.mem.buf, base + 16 * i, addr, length, flags, nxt)


def make_q(num: int = 16, features: int = BASE) -> Q:
    mem = GuestMemory.create(1 << 20)
    vdev = VirtIODevice("virtio-test", features)
    layout = alloc_vring(mem, num)
    kick, call = EventNotifier(), EventNotifier()
    vq = VirtQueue(vdev, 0, mem, layout, kick, call)
    drv = VringDriver(mem, layout, features, kick)
    return Q(mem, vdev, vq, drv, kick, call, mem.alloc(65536, 4096))


@pytest.fixture
def q() -> Iterator[Q]:
    qq = make_q()
    yield qq
    qq.kick.close()
    qq.call.close()
    qq.mem.close()


@pytest.fixture
def qe() -> Iterator[Q]:
    qq = make_q(features=BASE | EVENT_IDX)
    yield qq
    qq.kick.close()
    qq.call.close()
    qq.mem.close()


def test_pop_maps_a_direct_chain(q: Q) -> None:
    b = q.buf
    q.mem.write(b, b"hello")
    head = q.drv.add([(b, 5), (b + 8, 3)], [(b + 100, 10)])
    assert not q.vq.is_empty()
    elem = q.vq.pop()
    assert elem is not None
    assert elem.index == head
    assert [bytes(v) for v in elem.out_sg] == [b"hello", bytes(3)]
    assert [len(v) for v in elem.in_sg] == [10]
    assert elem.out_addr == [b, b + 8] and elem.in_addr == [b + 100]
    assert q.vq.inuse == 1 and q.vq.pop() is None
    elem.in_sg[0][:2] = b"ok"
    q.vq.push(elem, 10)
    assert q.vq.inuse == 0
    assert q.drv.get_buf() == (head, 10)
    assert q.mem.read(b + 100, 2) == b"ok"


def test_pop_follows_an_indirect_table(q: Q) -> None:
    b = q.buf
    table = q.mem.alloc(64, 16)
    head = q.drv.add([(b, 16)], [(b + 512, 512), (b + 2048, 1)],
                     indirect_table=table)
    assert q.drv.num_free == 15          # one ring descriptor only
    elem = q.vq.pop()
    assert elem is not None and elem.index == head
    assert [len(v) for v in elem.out_sg] == [16]
    assert [len(v) for v in elem.in_sg] == [512, 1]


def test_is_empty_reads_no_guest_memory_while_the_shadow_says_more(
        q: Q) -> None:
    q.drv.add([(q.buf, 1)], [])
    q.drv.add([(q.buf, 1)], [])
    assert not q.vq.is_empty()
    # Scribble avail.idx back: the shadow still knows of two entries.
    U16.pack_into(q.mem.buf, q.vq.avail + 2, 0)
    assert not q.vq.is_empty()
    assert q.vq.shadow_avail_idx == 2


def broken_with(q: Q, message: str) -> None:
    with pytest.raises(VirtioError) as ei:
        q.vq.pop()
    assert str(ei.value) == message
    assert q.vdev.broken and q.vdev.broken_reason == message
    assert q.vdev.status & VirtioStatus.NEEDS_RESET
    # Broken: empty, nothing more is popped, nothing raises.
    assert q.vq.is_empty()
    assert q.vq.pop() is None
    assert not q.vq.host_notifier_poll()


def test_head_out_of_range(q: Q) -> None:
    q.publish_raw(16)
    broken_with(q, "Guest says index 16 is available")
    assert q.vq.last_avail_idx == 1      # QEMU consumed the slot


def test_looped_chain(q: Q) -> None:
    q.desc(0, q.buf, 8, N_, 1)
    q.desc(1, q.buf, 8, N_, 0)
    q.publish_raw(0)
    broken_with(q, "Looped descriptor")


def test_zero_length_buffer(q: Q) -> None:
    q.desc(3, q.buf, 0, 0)
    q.publish_raw(3)
    broken_with(q, "virtio: zero sized buffers are not allowed")


def test_readable_after_writable(q: Q) -> None:
    q.desc(0, q.buf, 8, W | N_, 1)
    q.desc(1, q.buf, 8, 0)
    q.publish_raw(0)
    broken_with(q, "Incorrect order for descriptors")


def test_next_out_of_range(q: Q) -> None:
    q.desc(0, q.buf, 8, N_, 20)
    q.publish_raw(0)
    broken_with(q, "Desc next is 20")


def test_buffer_outside_guest_memory(q: Q) -> None:
    q.desc(0, q.mem.size - 4, 8, 0)
    q.publish_raw(0)
    broken_with(q, "virtio: bogus descriptor or out of resources")


def test_indirect_table_of_bad_size(q: Q) -> None:
    q.desc(0, q.buf, 24, IND)
    q.publish_raw(0)
    broken_with(q, "Invalid size for indirect buffer table")


def test_indirect_table_outside_memory(q: Q) -> None:
    q.desc(0, q.mem.size - 16, 32, IND)
    q.publish_raw(0)
    broken_with(q, "Cannot map indirect buffer")


def test_indirect_loop_is_bounded_by_the_table(q: Q) -> None:
    table = q.mem.alloc(32, 16)
    q.desc(0, q.buf, 8, N_, 1, table=table)
    q.desc(1, q.buf, 8, N_, 0, table=table)
    q.desc(0, table, 32, IND)
    q.publish_raw(0)
    broken_with(q, "Looped descriptor")


def test_more_than_1024_buffers(q: Q) -> None:
    n = 1100
    table = q.mem.alloc(16 * n, 16)
    for i in range(n):
        q.desc(i, q.buf, 1, W | N_ if i < n - 1 else W, i + 1, table=table)
    q.desc(0, table, 16 * n, IND)
    q.publish_raw(0)
    broken_with(q, "virtio: too many write descriptors in indirect table")


def test_too_many_in_flight(q: Q) -> None:
    for _ in range(16):
        q.drv.add([(q.buf, 1)], [])
    for _ in range(16):
        assert q.vq.pop() is not None
    q.publish_raw(0)                      # a 17th, with nothing pushed
    broken_with(q, "Virtqueue size exceeded")


def test_index_moved_too_far(q: Q) -> None:
    q.publish_raw(0, idx=17)
    broken_with(q, "Guest moved used index from 0 to 17")


def test_broken_device_still_lets_other_queues_work() -> None:
    qq = make_q()
    try:
        other = VirtQueue(qq.vdev, 1, qq.mem, alloc_vring(qq.mem, 4))
        qq.publish_raw(99)
        with pytest.raises(VirtioError):
            qq.vq.pop()
        # virtio_error stops the whole device, as in QEMU.
        assert other.is_empty() and other.pop() is None
    finally:
        qq.mem.close()


# -- notification suppression -------------------------------------------


def test_set_notification_without_event_idx_toggles_the_flag(q: Q) -> None:
    q.vq.set_notification(False)
    assert q.used_flags & VRING_USED_F_NO_NOTIFY
    q.drv.add([(q.buf, 1)], [])
    assert q.drv.kick_prepare() is False
    assert q.drv.kicks_suppressed == 1
    q.vq.set_notification(True)
    assert not q.used_flags & VRING_USED_F_NO_NOTIFY
    q.drv.add([(q.buf, 1)], [])
    assert q.drv.kick_prepare() is True


def test_event_idx_disabling_writes_nothing(qe: Q) -> None:
    for _ in range(3):
        qe.drv.add([(qe.buf, 1)], [])
    used_area = qe.mem.read(qe.vq.used, 6 + 8 * qe.vq.num)
    qe.vq.set_notification(False)
    assert qe.mem.read(qe.vq.used, 6 + 8 * qe.vq.num) == used_area
    assert not qe.vq.notification
    # ...and pop does not move avail_event while notification is off.
    assert qe.vq.pop() is not None
    assert qe.avail_event == 0
    qe.vq.set_notification(True)
    assert qe.avail_event == 3          # enabling writes avail.idx
    assert qe.used_flags == 0           # flags are not used with EVENT_IDX


def test_event_idx_pop_publishes_avail_event(qe: Q) -> None:
    qe.drv.add([(qe.buf, 1)], [])
    qe.drv.add([(qe.buf, 1)], [])
    assert qe.vq.pop() is not None
    assert qe.avail_event == 1


def test_event_idx_kick_decisions_hand_computed(qe: Q) -> None:
    # avail_event = 0: the first publication (old 0 -> new 1) kicks.
    qe.drv.add([(qe.buf, 1)], [])
    assert qe.drv.kick_prepare() is True
    # Device in poll mode: disabling wrote nothing, avail_event stays 0;
    # publishing 1 -> 3 does not pass 0: no kick.
    qe.vq.set_notification(False)
    qe.drv.add([(qe.buf, 1)], [])
    qe.drv.add([(qe.buf, 1)], [])
    assert qe.drv.kick_prepare() is False
    # Device pops everything while polling; avail_event still 0.
    while qe.vq.pop() is not None:
        pass
    # Poll mode ends: avail_event = avail.idx = 3.  The guest's 3 -> 4
    # passes 3: kick.
    qe.vq.set_notification(True)
    qe.drv.add([(qe.buf, 1)], [])
    assert qe.drv.kick_prepare() is True
    # Device has not popped entry 3, so avail_event is still 3; the
    # guest's 4 -> 5 does not pass it: the device is known to be busy.
    qe.drv.add([(qe.buf, 1)], [])
    assert qe.drv.kick_prepare() is False
    assert qe.drv.kicks_suppressed == 2


def push_one(q: Q) -> None:
    elem = q.vq.pop()
    assert elem is not None
    q.vq.push(elem, 0)


def test_should_notify_without_event_idx(q: Q) -> None:
    q.drv.add([(q.buf, 1)], [])
    push_one(q)
    assert q.vq.should_notify() is True
    q.drv.disable_cb()
    assert q.u16(q.vq.avail) & VRING_AVAIL_F_NO_INTERRUPT
    assert q.vq.should_notify() is False
    assert q.drv.enable_cb() is False     # an element is waiting


def test_should_notify_with_event_idx_hand_computed(qe: Q) -> None:
    for _ in range(4):
        qe.drv.add([(qe.buf, 1)], [])
    # First notification: signalled_used is not valid yet, so notify.
    push_one(qe)                           # used 0 -> 1
    assert qe.vq.should_notify() is True
    assert qe.vq.signalled_used == 1 and qe.vq.signalled_used_valid
    # Guest wants an interrupt when used passes 1 (used_event = 1).
    qe.set_used_event(1)
    push_one(qe)                           # used 1 -> 2: passes 1
    assert qe.vq.should_notify() is True
    # used_event still 1; 2 -> 3 does not pass it: suppressed.
    push_one(qe)
    assert qe.vq.should_notify() is False
    # Guest catches up to 3 and asks for 3: 3 -> 4 passes it.
    qe.set_used_event(3)
    push_one(qe)
    assert qe.vq.should_notify() is True


def test_should_notify_notify_on_empty() -> None:
    qq = make_q(features=BASE | EVENT_IDX
                | feature_bit(VirtioFeature.NOTIFY_ON_EMPTY))
    try:
        qq.drv.add([(qq.buf, 1)], [])
        qq.drv.add([(qq.buf, 1)], [])
        push_one(qq)                       # used 1, one still available
        assert qq.vq.should_notify() is True   # first: not yet valid
        assert qq.vq.signalled_used == 1
        qq.set_used_event(500)             # guest wants nothing soon
        push_one(qq)                       # used 2; inuse 0, ring empty
        assert qq.vq.should_notify() is True   # NOTIFY_ON_EMPTY wins
        assert qq.vq.signalled_used == 1   # ...returning early
        qq.drv.add([(qq.buf, 1)], [])
        qq.drv.add([(qq.buf, 1)], [])
        push_one(qq)                       # used 3; ring not empty
        # EVENT_IDX: 1 -> 3 does not pass 500.
        assert qq.vq.should_notify() is False
    finally:
        qq.mem.close()


def preset_indices(q: Q, start: int) -> None:
    """Both sides as if ``start`` requests had already gone through."""
    q.vq.last_avail_idx = q.vq.shadow_avail_idx = start
    q.vq.used_idx = q.vq.signalled_used = start
    q.drv.avail_idx = q.drv.last_used_idx = start
    U16.pack_into(q.mem.buf, q.vq.avail + 2, start)
    U16.pack_into(q.mem.buf, q.vq.used + 2, start)


@pytest.mark.parametrize("event_idx", [False, True])
def test_wrap_around_65535_both_views(event_idx: bool) -> None:
    qq = make_q(num=4, features=BASE | (EVENT_IDX if event_idx else 0))
    try:
        preset_indices(qq, 65530)
        seen = []
        for i in range(12):                    # crosses 65535 -> 0
            data = struct.pack("<I", i)
            qq.mem.write(qq.buf + 4 * i, data)
            head = qq.drv.add([(qq.buf + 4 * i, 4)], [(qq.buf + 512, 4)])
            assert qq.drv.kick_prepare() is True or event_idx
            elem = qq.vq.pop()
            assert elem is not None and elem.index == head
            assert bytes(elem.out_sg[0]) == data
            qq.vq.push(elem, 4)
            assert qq.vq.should_notify() is True
            got = qq.drv.get_buf()
            assert got == (head, 4)
            seen.append(qq.vq.used_idx)
        assert seen == [(65531 + i) & 0xFFFF for i in range(12)]
        assert qq.vq.last_avail_idx == 6 and qq.drv.avail_idx == 6
        assert not qq.vdev.broken
    finally:
        qq.mem.close()


def test_signalled_used_invalidated_when_flush_wraps_past_it(qe: Q) -> None:
    preset_indices(qe, 65534)
    qe.vq.signalled_used_valid = True
    # The guest was told up to 65535, then the device rewound (as after
    # a device reset): the flush 65534 -> 1 passes 65535 again.
    qe.vq.signalled_used = 65535
    for _ in range(3):
        qe.drv.add([(qe.buf, 1)], [])
    elems = [qe.vq.pop() for _ in range(3)]
    for i, e in enumerate(elems):
        assert e is not None
        qe.vq.fill(e, 0, i)
    qe.vq.flush(3)                       # 65534 -> 1: passes 65535
    assert qe.vq.used_idx == 1
    assert qe.vq.signalled_used_valid is False
    assert qe.vq.should_notify() is True  # must notify, whatever used_event


def test_signalled_used_at_the_old_index_stays_valid(qe: Q) -> None:
    preset_indices(qe, 65534)
    qe.vq.signalled_used_valid = True
    qe.drv.add([(qe.buf, 1)], [])
    qe.drv.add([(qe.buf, 1)], [])
    for i in range(2):
        e = qe.vq.pop()
        assert e is not None
        qe.vq.fill(e, 0, i)
    qe.vq.flush(2)                       # 65534 -> 0; signalled = old
    assert qe.vq.signalled_used_valid is True


def test_guest_rejects_a_head_it_did_not_publish(q: Q) -> None:
    q.drv.add([(q.buf, 1)], [])
    elem = q.vq.pop()
    assert elem is not None
    elem.index = 7
    q.vq.push(elem, 0)
    with pytest.raises(VirtioError, match="id 7 is not a head!"):
        q.drv.get_buf()
