"""Regressions found by reviewing virtio/ against QEMU 7.2.

Each test names the divergence it pins down; all drive the real ring
in real shared memory.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qiothread.errors import ConfigError, VirtioError
from tests.virtio.harness import make_disk, raw_driver
from tests.virtio.test_merge import K4, one_kick, writes
from tests.virtio.test_merge import disk as merge_disk
from tests.virtio.test_virtqueue import (
    BASE,
    EVENT_IDX,
    IND,
    N_,
    Q,
    W,
    make_q,
    preset_indices,
)
from virtio.blk import VirtIOBlock
from virtio.blk_defs import OUTHDR, VirtIOBlkConf
from virtio.blk_defs import VirtioBlkStatus as S
from virtio.blk_defs import VirtioBlkType as T
from virtio.guest import GuestBlkDriver
from virtio.memory import FIRST_ADDR
from virtio.ring import DESC, USED_ELEM, avail_event_offset

# -- a broken device writes nothing more into the used ring --------------


def test_regression_fill_into_a_broken_device_writes_no_used_element(
) -> None:
    q = make_q()
    try:
        b = q.buf
        q.desc(0, b, 16, N_, 1)
        q.desc(1, b + 64, 1, W)
        q.publish_raw(0)
        elem = q.vq.pop()
        assert elem is not None and q.vq.inuse == 1
        # A second chain with a zero-length buffer breaks the device
        # while the first is still in flight.
        q.desc(2, b, 0, 0)
        q.publish_raw(2)
        with pytest.raises(Exception, match="zero sized"):
            q.vq.pop()
        assert q.vdev.broken
        slot0 = q.vq.used + 4
        USED_ELEM.pack_into(q.mem.buf, slot0, 0xAAAA, 0xBBBB)
        # The in-flight request completes into the broken device: QEMU's
        # virtqueue_fill returns at virtio_device_disabled, and flush
        # only does the accounting.
        q.vq.push(elem, 17)
        assert USED_ELEM.unpack_from(q.mem.buf, slot0) == (0xAAAA, 0xBBBB)
        assert q.u16(q.vq.used + 2) == 0 and q.vq.used_idx == 0
        assert q.vq.inuse == 0
    finally:
        q.kick.close()
        q.call.close()
        q.mem.close()


def test_regression_blk_completion_after_break_leaves_used_ring_alone(
) -> None:
    # End to end: a read in flight in the backend, then a malformed
    # request breaks the device; the read's completion must publish
    # nothing, and the malformed element is detached (inuse 0).
    d = make_disk(guest=False)
    try:
        drv = raw_driver(d)
        hdr, data, st = (d.mem.alloc(16), d.mem.alloc(512),
                         d.mem.alloc(1))
        OUTHDR.pack_into(d.mem.buf, hdr, int(T.IN), 0, 0)
        drv.add([(hdr, 16)], [(data, 512), (st, 1)])
        drv.add([], [(st, 1)])                 # missing headers: fatal
        used_before = bytes(d.mem.buf[d.dev.vqs[0].used:
                                      d.dev.vqs[0].used + 4 + 8 * 16])
        d.dev.handle_vq(0)
        assert d.dev.broken_reason == "virtio-blk missing headers"
        d.settle()
        assert d.bs.ops["read"] == 1
        vq = d.dev.vqs[0]
        assert bytes(d.mem.buf[vq.used:vq.used + 4 + 8 * 16]) == \
            used_before
        assert vq.inuse == 0
    finally:
        d.close()


# -- page 0 is the shared allocator header, not guest RAM ----------------


@pytest.mark.parametrize("addr", [0, 8, FIRST_ADDR - 1])
def test_regression_buffer_in_the_reserved_header_page_is_bogus(
        addr: int) -> None:
    q = make_q()
    try:
        header = q.mem.read(0, 16)
        q.desc(0, q.buf, 16, N_, 1)
        q.desc(1, addr, 1, W)
        q.publish_raw(0)
        with pytest.raises(Exception,
                           match="bogus descriptor or out of resources"):
            q.vq.pop()
        assert q.vdev.broken
        assert q.mem.read(0, 16) == header
        assert q.vq.inuse == 0
    finally:
        q.kick.close()
        q.call.close()
        q.mem.close()


def test_regression_indirect_table_in_the_header_page_cannot_be_mapped(
) -> None:
    q = make_q()
    try:
        q.desc(0, 0, 32, IND)
        q.publish_raw(0)
        with pytest.raises(Exception, match="Cannot map indirect buffer"):
            q.vq.pop()
        assert q.vdev.broken_reason == "Cannot map indirect buffer"
    finally:
        q.kick.close()
        q.call.close()
        q.mem.close()


def test_regression_guest_read_into_page_zero_cannot_corrupt_allocator(
) -> None:
    # Without the check a read request aimed at address 0 overwrote the
    # magic and the bump pointer that every process allocates from.
    d = make_disk(guest=False)
    try:
        d.bs.write_data(0, b"\xff" * 512)
        drv = raw_driver(d)
        hdr, st = d.mem.alloc(16), d.mem.alloc(1)
        OUTHDR.pack_into(d.mem.buf, hdr, int(T.IN), 0, 0)
        header = d.mem.read(0, 16)
        drv.add([(hdr, 16)], [(0, 512), (st, 1)])
        d.dev.handle_vq(0)
        d.settle()
        assert d.dev.broken
        assert d.mem.read(0, 16) == header
        assert d.mem.alloc(16) > FIRST_ADDR
    finally:
        d.close()


# -- property integers are parsed as qemu_strtou64 does ------------------


@pytest.mark.parametrize(("text", "value"), [
    ("010", 8),            # strtoull base 0: a leading 0 is octal
    ("0x10", 16), ("0X10", 16), (" 16", 16), ("+16", 16), ("16", 16),
])
def test_regression_property_integers_parse_like_strtoull(
        text: str, value: int) -> None:
    c = VirtIOBlkConf.from_props({"queue-size": text})
    assert c.queue_size == value


@pytest.mark.parametrize("text", [
    "16 ", "1_6", "0o20", "0b10000", "08", "0x", "", "-", "sixteen",
    "1.5", "99999999999999999999999", "-99999999999999999999999",
])
def test_regression_property_integer_garbage_expects_integer(
        text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        VirtIOBlkConf.from_props({"queue-size": text})
    assert str(ei.value) == "Parameter 'queue-size' expects integer"


@pytest.mark.parametrize(("props", "message"), [
    ({"queue-size": "0"}, "invalid queue-size property (0), must be > 2"),
    ({"queue-size": "1"}, "invalid queue-size property (1), must be > 2"),
    ({"queue-size": "3"}, "invalid queue-size property (3), must be a "
                          "power of 2 (max 1024)"),
    ({"queue-size": "-1"}, "Parameter 'queue-size' expects uint16_t"),
    ({"queue-size": "65536"}, "Parameter 'queue-size' expects uint16_t"),
    ({"num-queues": "65536"}, "Parameter 'num-queues' expects uint16_t"),
    ({"num-queues": "x"}, "Parameter 'num-queues' expects integer"),
    # realize checks queue-size before virtio_add_queue runs out of
    # queues: the queue-size message wins.
    ({"num-queues": "2048", "queue-size": "3"},
     "invalid queue-size property (3), must be a power of 2 (max 1024)"),
    ({"num-queues": "2048", "max-discard-sectors": "0"},
     "invalid max-discard-sectors property (0), must be between 1 and "
     "4194303"),
])
def test_regression_property_edge_cases_and_message_order(
        props: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        VirtIOBlkConf.from_props(props).realize()
    assert str(ei.value) == message


@pytest.mark.parametrize(("props", "nq", "qs"), [
    ({"num-queues": "1", "queue-size": "4"}, 1, 4),
    ({"num-queues": "3", "queue-size": "1024"}, 3, 1024),
    ({"num-queues": "1024", "queue-size": "0x100"}, 1024, 256),
])
def test_property_edge_values_accepted(props: dict[str, str], nq: int,
                                       qs: int) -> None:
    c = VirtIOBlkConf.from_props(props)
    c.realize()
    assert (c.num_queues, c.queue_size) == (nq, qs)


# -- GET_ID buffers of 1, 19, 20 and 21 bytes ----------------------------


@pytest.mark.parametrize(("serial", "buflen", "expect"), [
    ("", 1, b"\0"),
    ("abc", 1, b"a"),
    ("s" * 19, 19, b"s" * 19),                 # no room for the NUL
    ("s" * 19, 20, b"s" * 19 + b"\0"),
    ("s" * 19, 21, b"s" * 19 + b"\0" + b"\xee"),
    ("t" * 20, 20, b"t" * 20),
    ("t" * 20, 21, b"t" * 20 + b"\xee"),       # capped at 20 bytes
    ("u" * 21, 21, b"u" * 20 + b"\xee"),
])
def test_get_id_buffer_sizes(serial: str, buflen: int,
                             expect: bytes) -> None:
    d = make_disk(conf=VirtIOBlkConf(num_queues=1, queue_size=16,
                                     serial=serial))
    try:
        b = d.mem.alloc(buflen)
        d.mem.write(b, b"\xee" * buflen)
        d.guests[0].submit(T.GET_ID, 0, [(b, buflen)])
        d.dev.handle_vq(0)
        d.settle()
        (c,) = d.guests[0].reap()
        assert (c.status, c.used_len) == (S.OK, buflen + 1)
        assert d.mem.read(b, buflen) == expect
    finally:
        d.close()


def test_get_id_with_status_sharing_the_id_buffer() -> None:
    # One 21-byte writable buffer: 20 bytes of id, then the status.
    d = make_disk(guest=False, conf=VirtIOBlkConf(
        num_queues=1, queue_size=16, serial="v" * 25))
    try:
        drv = raw_driver(d)
        hdr, buf = d.mem.alloc(16), d.mem.alloc(21)
        d.mem.write(buf, b"\xee" * 21)
        OUTHDR.pack_into(d.mem.buf, hdr, int(T.GET_ID), 0, 0)
        drv.add([(hdr, 16)], [(buf, 21)])
        d.dev.handle_vq(0)
        d.settle()
        got = drv.get_buf()
        assert got is not None and got[1] == 21
        assert d.mem.read(buf, 21) == b"v" * 20 + bytes([S.OK])
    finally:
        d.close()


# -- a blocking reap does not hang on a device that stopped answering ----


@pytest.mark.parametrize("poll_queue", [False, True],
                         ids=["interrupts", "polled"])
def test_regression_blocking_reap_returns_after_a_stalled_wait(
        poll_queue: bool) -> None:
    # The device never runs (nobody reads the kick).  Before the fix
    # reap(block=True) counted the stall and went back to sleep for
    # ever, so the "lost kick" checks of the two-process tests could
    # only hang, never fail.
    d = make_disk(guest=False)
    try:
        q = d.queues[0]
        g = GuestBlkDriver(d.mem, q.layout, d.dev.guest_features,
                           q.host_notifier, q.guest_notifier,
                           poll_queue=poll_queue,
                           wait_deadline_ns=30_000_000)
        d.guests.append(g)
        buf = d.mem.alloc(512)
        g.submit(T.IN, 0, [(buf, 512)])
        assert g.reap(block=True) == []
        assert g.counters["stalled_waits"] == 1
        assert g.in_flight == 1
        # The device answers after all: the next reap gets it.
        d.dev.handle_vq(0)
        d.settle()
        (c,) = g.reap(block=True)
        assert c.status == S.OK and g.counters["completed"] == 1
    finally:
        d.close()


# -- indirect tables and addresses: QEMU's exact treatment ---------------


def _q_case() -> Q:
    return make_q()


def _close(q: Q) -> None:
    q.kick.close()
    q.call.close()
    q.mem.close()


def test_nested_indirect_is_a_plain_buffer_as_in_qemu() -> None:
    # virtqueue_split_pop looks at INDIRECT on the ring's head only; an
    # entry of the table that says INDIRECT is mapped as a buffer.
    q = _q_case()
    try:
        table = q.mem.alloc(48, 16)
        q.desc(0, q.buf, 16, IND | N_, 1, table=table)
        q.desc(1, q.buf + 64, 1, W, table=table)
        q.desc(0, table, 32, IND)
        q.publish_raw(0)
        elem = q.vq.pop()
        assert elem is not None and not q.vdev.broken
        assert [len(v) for v in elem.out_sg] == [16]
        assert elem.out_addr == [q.buf] and elem.in_addr == [q.buf + 64]
    finally:
        _close(q)


def test_indirect_head_with_next_ignores_next() -> None:
    # The head's NEXT (and its next index, even out of range) no longer
    # matters once the walk has switched to the table.
    q = _q_case()
    try:
        table = q.mem.alloc(32, 16)
        q.desc(0, q.buf, 16, N_, 1, table=table)
        q.desc(1, q.buf + 64, 1, W, table=table)
        q.desc(0, table, 32, IND | N_, 999)
        q.publish_raw(0)
        elem = q.vq.pop()
        assert elem is not None and not q.vdev.broken
        assert elem.index == 0 and q.vq.inuse == 1
        assert [len(v) for v in elem.in_sg] == [1]
    finally:
        _close(q)


@pytest.mark.parametrize("length", [0, 8, 15, 17, 40])
def test_indirect_length_not_a_multiple_of_16(length: int) -> None:
    q = _q_case()
    try:
        q.desc(0, q.buf, length, IND)
        q.publish_raw(0)
        with pytest.raises(VirtioError,
                           match=r"^Invalid size for indirect buffer table$"):
            q.vq.pop()
        # The head was consumed, nothing is in use, nothing pushed.
        assert (q.vq.last_avail_idx, q.vq.inuse, q.vq.used_idx) == (1, 0, 0)
        assert q.vq.pop() is None and q.vq.is_empty()
    finally:
        _close(q)


@pytest.mark.parametrize(("addr", "length", "flags", "message"), [
    (2**64 - 16, 32, 0, "virtio: bogus descriptor or out of resources"),
    (2**64 - 1, 1, W, "virtio: bogus descriptor or out of resources"),
    (FIRST_ADDR, 0xFFFFFFFF, 0,
     "virtio: bogus descriptor or out of resources"),
    (2**64 - 16, 16, IND, "Cannot map indirect buffer"),
    (FIRST_ADDR, 0xFFFFFFF0, IND, "Cannot map indirect buffer"),
])
def test_addresses_outside_guest_memory_are_clean_errors(
        addr: int, length: int, flags: int, message: str) -> None:
    q = _q_case()
    try:
        q.desc(0, addr, length, flags)
        q.publish_raw(0)
        with pytest.raises(VirtioError) as ei:
            q.vq.pop()
        assert str(ei.value) == message == q.vdev.broken_reason
        assert q.vq.inuse == 0
    finally:
        _close(q)


# -- used.len is every writable byte, whatever the outcome ---------------

_SEG = struct.Struct("<QII")
# (type, sector, DWZ segment or None, expected status)
_CASES = [
    (T.IN, 0, None, S.OK),
    (T.OUT, 0, None, S.OK),
    (T.FLUSH, 0, None, S.OK),
    (T.GET_ID, 0, None, S.OK),
    (T.IN, 1 << 40, None, S.IOERR),                   # past the end
    (T.OUT, 1, None, S.OK),
    (T.SCSI_CMD, 0, None, S.IOERR),
    (99, 0, None, S.UNSUPP),
    (T.DISCARD, 0, (0, 8, 0), S.OK),
    (T.DISCARD, 0, (0, 8, 1), S.UNSUPP),              # UNMAP on discard
    (T.WRITE_ZEROES, 0, (0, 8, 1), S.OK),
    (T.WRITE_ZEROES, 0, (0, 8, 2), S.UNSUPP),         # unknown flag
    (T.WRITE_ZEROES, 0, (0, 0xFFFFFFFF, 0), S.IOERR),  # > max sectors
    (T.DISCARD, 0, (1 << 40, 8, 0), S.IOERR),          # out of range
]


@pytest.mark.parametrize(("rtype", "sector", "seg", "status"), _CASES)
@pytest.mark.parametrize("writable", [[1], [512, 1], [7, 3, 9]],
                         ids=["status", "data+status", "three"])
def test_used_len_is_all_writable_bytes(rtype: int, sector: int,
                                        seg: tuple[int, int, int] | None,
                                        status: int,
                                        writable: list[int]) -> None:
    d = make_disk(guest=False)
    try:
        hdr = d.mem.alloc(16)
        OUTHDR.pack_into(d.mem.buf, hdr, int(rtype), 0, sector)
        out = [(hdr, 16)]
        if seg is not None:
            a = d.mem.alloc(16)
            _SEG.pack_into(d.mem.buf, a, *seg)
            out.append((a, 16))
        elif rtype == T.OUT:
            out.append((d.mem.alloc(512), 512))
        ins = [(d.mem.alloc(n), n) for n in writable]
        drv = raw_driver(d)
        drv.add(out, ins)
        d.dev.handle_vq(0)
        d.settle()
        got = drv.get_buf()
        assert got is not None and not d.dev.broken
        last_addr, last_len = ins[-1]
        expect = status
        if (rtype, writable) == (T.IN, [7, 3, 9]) and status == S.OK:
            expect = S.IOERR          # 18 data bytes: not whole sectors
        if rtype == T.SCSI_CMD:
            expect = S.IOERR          # one out segment: too few for SCSI
        assert d.mem.buf[last_addr + last_len - 1] == expect
        assert got[1] == sum(writable)
    finally:
        d.close()


# -- EVENT_IDX decisions exactly at the 65535 -> 0 wrap -------------------


def test_event_idx_kicks_and_interrupts_across_the_wrap() -> None:
    q = make_q(num=4, features=BASE | EVENT_IDX)
    try:
        preset_indices(q, 65534)
        q.vq.signalled_used_valid = True
        avail_event = q.vq.used + avail_event_offset(4)

        def publish() -> bool:
            q.drv.add([(q.buf, 1)], [])
            return q.drv.kick_prepare()

        # The device wants a kick at 65534 (what enabling wrote).
        q.vq.set_notification(True)
        assert q.u16(avail_event) == 65534
        assert publish() is True                 # 65534 -> 65535
        e1 = q.vq.pop()
        assert e1 is not None and q.u16(avail_event) == 65535
        assert publish() is True                 # 65535 -> 0 passes it
        e2 = q.vq.pop()
        assert e2 is not None and q.vq.last_avail_idx == 0
        assert q.u16(avail_event) == 0
        # Kicks off (poll mode): avail_event stays at 0.
        q.vq.set_notification(False)
        assert publish() is True                 # 0 -> 1 passes 0
        assert publish() is False                # 1 -> 2 does not
        assert q.u16(avail_event) == 0
        e3, e4 = q.vq.pop(), q.vq.pop()
        assert e3 is not None and e4 is not None
        assert q.u16(avail_event) == 0           # pop writes nothing

        # Interrupts: the guest wants one when used.idx passes 65535.
        q.set_used_event(65535)
        q.vq.push(e1, 0)                         # used 65534 -> 65535
        assert q.vq.should_notify() is False
        q.vq.push(e2, 0)                         # 65535 -> 0: passes it
        assert q.vq.should_notify() is True
        assert q.vq.signalled_used == 0
        q.set_used_event(0)
        q.vq.fill(e3, 0, 0)
        q.vq.fill(e4, 0, 1)
        q.vq.flush(2)                            # 0 -> 2 passes 0
        assert q.vq.should_notify() is True
        assert (q.vq.used_idx, q.vq.inuse) == (2, 0)
    finally:
        _close(q)


# -- merging limits ------------------------------------------------------


def test_flush_in_the_middle_splits_the_writes_around_it() -> None:
    d = merge_disk()
    try:
        reqs = writes(d, [0, K4])
        reqs.append((int(T.FLUSH), 0, []))
        reqs += writes(d, [2 * K4, 3 * K4])
        got = one_kick(d, reqs)
        assert [c.status for c in got] == [S.OK] * 5
        assert d.bs.log == [("write", 0, 2 * K4, 2), ("flush", 0, 0, 0),
                            ("write", 2 * K4, 2 * K4, 2)]
    finally:
        d.close()


def test_max_transfer_is_rounded_down_to_the_request_alignment() -> None:
    # blk_get_max_transfer: 10000 bytes rounded down to 4096 -> 8192,
    # so runs of two 4 KiB writes; a 12 KiB request larger than that
    # merges with nothing and goes alone.
    d = merge_disk()
    try:
        d.bs.max_transfer = 10000
        d.bs.request_alignment = 4096
        d.dev = VirtIOBlock(d.bs, d.dev.conf, d.queues, mem=d.mem)
        assert d.dev.max_transfer == 8192
        reqs = writes(d, [0, K4, 2 * K4])
        reqs += writes(d, [3 * K4], size=3 * K4)
        reqs += writes(d, [6 * K4])
        one_kick(d, reqs)
        assert [(e[1], e[2]) for e in d.bs.log] == [
            (0, 2 * K4), (2 * K4, K4), (3 * K4, 3 * K4), (6 * K4, K4)]
        assert d.dev.stats[0].merges == 1
    finally:
        d.close()


# -- a guest that never reaps --------------------------------------------


@pytest.mark.parametrize("event_idx", [True, False],
                         ids=["event_idx", "no_event_idx"])
def test_guest_that_never_reaps(event_idx: bool) -> None:
    d = make_disk(features_off=0 if event_idx else EVENT_IDX)
    try:
        g, vq = d.guests[0], d.dev.vqs[0]
        buf = d.mem.alloc(512)
        n = 0
        while g.can_submit(1):
            g.submit(T.IN, 0, [(buf, 512)], kick=False)
            n += 1
        assert n == 16 // 3 and g.kick()
        d.dev.host_notifier_read(0)
        d.settle()
        # Everything completed into the used ring; nothing is in use
        # and the device is idle, not broken, with the ring full of
        # unreaped completions.
        assert (vq.inuse, vq.used_idx, d.dev.broken) == (0, n, False)
        st = d.dev.stats[0]
        if event_idx:
            # used_event was never armed (0): the first completion is
            # signalled (nothing signalled yet), the rest pass nothing.
            assert (st.interrupts, st.interrupts_suppressed) == (1, n - 1)
        else:
            assert (st.interrupts, st.interrupts_suppressed) == (n, 0)
        with pytest.raises(BlockingIOError):
            g.submit(T.IN, 0, [(buf, 512)])
        # Reaping late loses nothing.
        assert [c.status for c in g.reap()] == [S.OK] * n
        g.submit(T.IN, 0, [(buf, 512)])
        d.dev.host_notifier_read(0)
        d.settle()
        assert [c.status for c in g.reap()] == [S.OK]
    finally:
        d.close()


# -- logical_block_size: the block-size property's own checks ------------


@pytest.mark.parametrize(("text", "message"), [
    ("256", "Property .logical_block_size doesn't take value 256 "
            "(minimum: 512, maximum: 2097152)"),
    ("4194304", "Property .logical_block_size doesn't take value 4194304 "
                "(minimum: 512, maximum: 2097152)"),
    ("1000", "Property .logical_block_size doesn't take value '1000', "
             "it's not a power of 2"),
])
def test_regression_logical_block_size_is_checked(text: str,
                                                  message: str) -> None:
    # Before: accepted, and 1000 gave a sector mask that failed every
    # request with IOERR.
    with pytest.raises(ConfigError) as ei:
        VirtIOBlkConf.from_props({"logical_block_size": text})
    assert str(ei.value) == message


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("512", 512),
                                             ("4096", 4096)])
def test_logical_block_size_values(text: str, value: int) -> None:
    c = VirtIOBlkConf.from_props({"logical_block_size": text})
    assert c.logical_block_size == value


# -- any descriptor bytes at all: only QEMU's errors, never a crash -------

_MESSAGES = (
    "Guest moved used index from", "Virtqueue size exceeded",
    "Guest says index", "Invalid size for indirect buffer table",
    "Cannot map indirect buffer", "Incorrect order for descriptors",
    "Looped descriptor", "Desc next is",
    "virtio: zero sized buffers are not allowed",
    "virtio: too many write descriptors in indirect table",
    "virtio: bogus descriptor or out of resources",
    "virtio-blk missing headers", "virtio-blk request outhdr too short",
    "virtio-blk discard/write_zeroes header too short",
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_descriptor_fields_only_give_qemu_errors(
        data: st.DataObject) -> None:
    d = make_disk(guest=False, mem_size=1 << 20)
    try:
        vq = d.dev.vqs[0]
        region = d.mem.alloc(8192, 4096)
        size = d.mem.size
        addr = st.one_of(
            st.integers(0, FIRST_ADDR - 1),                 # header page
            st.integers(region, region + 8191),             # real buffers
            st.integers(size - 64, size + 64),              # the end
            st.integers(2**64 - 64, 2**64 - 1),             # wraps in C
            st.integers(0, 2**64 - 1))
        length = st.one_of(st.integers(0, 64), st.sampled_from(
            [512, 4096, 0xFFFFFFF0, 0xFFFFFFFF]))
        desc = st.tuples(addr, length, st.integers(0, 0xFFFF),
                         st.integers(0, 0xFFFF))
        for table in (vq.desc, region + 4096):
            for i, (a, n, f, x) in enumerate(
                    data.draw(st.lists(desc, min_size=16, max_size=16))):
                DESC.pack_into(d.mem.buf, table + 16 * i, a, n, f & 7,
                               x if x < 32 else x % 20)
        heads = data.draw(st.lists(st.integers(0, 17), min_size=16,
                                   max_size=16))
        for i, h in enumerate(heads):
            d.mem.u16[(vq.avail >> 1) + 2 + i] = h
        d.mem.write(region, data.draw(st.binary(min_size=64,
                                                max_size=64)))
        d.mem.u16[(vq.avail >> 1) + 1] = data.draw(st.sampled_from(
            [1, 2, 5, 16, 17, 0xFFFF]))
        d.dev.handle_vq(0)
        d.settle()
        assert vq.inuse == 0
        if d.dev.broken:
            assert d.dev.broken_reason is not None
            assert d.dev.broken_reason.startswith(_MESSAGES)
        else:
            assert vq.used_idx == vq.last_avail_idx
    finally:
        d.close()
