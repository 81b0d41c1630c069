"""The virtio-blk device end to end in one process: real guest memory,
real rings and eventfds, the real guest driver, the in-memory backend
completing through BHs of a real AioContext."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from qiothread.errors import ConfigError
from tests.virtio.harness import Disk, make_disk, raw_driver
from virtio.blk_defs import (
    BDRV_REQUEST_MAX_SECTORS,
    OUTHDR,
    VirtIOBlkConf,
)
from virtio.blk_defs import VirtioBlkStatus as S
from virtio.blk_defs import VirtioBlkType as T
from virtio.guest import Completion
from virtio.ring import VirtioFeature, feature_bit

EVENT_IDX = feature_bit(VirtioFeature.RING_EVENT_IDX)


@pytest.fixture
def disk() -> Iterator[Disk]:
    d = make_disk(record=True)
    yield d
    d.close()


def kick_and_run(d: Disk, n: int = 1, q: int = 0) -> list[Completion]:
    """Deliver the kick like the host notifier would, then reap ``n``."""
    d.dev.host_notifier_read(q)
    out: list[Completion] = []

    def done() -> bool:
        out.extend(d.guests[q].reap())
        return len(out) >= n

    d.run(done)
    return out


def one(d: Disk, kind: int, offset: int = 0,
        buffers: list[tuple[int, int]] | None = None,
        nbytes: int = 0, flags: int = 0) -> Completion:
    d.guests[0].submit(kind, offset, buffers, nbytes=nbytes, flags=flags)
    (c,) = kick_and_run(d)
    return c


def test_write_then_read_back_with_used_len(disk: Disk) -> None:
    m = disk.mem
    wb, rb = m.alloc(8192, 4096), m.alloc(8192, 4096)
    m.write(wb, bytes(range(256)) * 32)
    c = one(disk, T.OUT, 4096, [(wb, 4096), (wb + 4096, 4096)])
    assert (c.status, c.used_len) == (S.OK, 1)   # used.len: writable only
    assert disk.bs.read_data(4096, 8192) == bytes(range(256)) * 32
    c = one(disk, T.IN, 4096, [(rb, 8192)])
    assert (c.status, c.used_len) == (S.OK, 8193)
    assert m.read(rb, 8192) == bytes(range(256)) * 32
    assert disk.bs.log == [("write", 4096, 8192, 2), ("read", 4096, 8192, 1)]


def test_flush(disk: Disk) -> None:
    c = one(disk, T.FLUSH)
    assert (c.status, c.used_len) == (S.OK, 1)
    assert disk.bs.ops["flush"] == 1


@pytest.mark.parametrize(("serial", "buflen", "expect"), [
    ("", 20, b"\0" + b"\xee" * 19),
    ("disk-7", 20, b"disk-7\0" + b"\xee" * 13),
    ("x" * 25, 20, b"x" * 20),                 # no room for the NUL
    ("abcdef", 4, b"abcd"),
])
def test_get_id(serial: str, buflen: int, expect: bytes) -> None:
    d = make_disk(conf=VirtIOBlkConf(num_queues=1, queue_size=16,
                                     serial=serial))
    try:
        b = d.mem.alloc(buflen)
        d.mem.write(b, b"\xee" * buflen)
        c = one(d, T.GET_ID, 0, [(b, buflen)])
        assert (c.status, c.used_len) == (S.OK, buflen + 1)
        assert d.mem.read(b, buflen) == expect
        assert d.bs.ops == dict.fromkeys(d.bs.OPS, 0)
    finally:
        d.close()


def test_discard_and_write_zeroes(disk: Disk) -> None:
    disk.bs.write_data(0, b"\xff" * 16384)
    c = one(disk, T.DISCARD, 4096, nbytes=4096)
    assert c.status == S.OK
    assert disk.bs.read_data(0, 16384) == (
        b"\xff" * 4096 + bytes(4096) + b"\xff" * 8192)
    c = one(disk, T.WRITE_ZEROES, 8192, nbytes=4096, flags=1)
    assert c.status == S.OK and c.used_len == 1
    assert disk.bs.read_data(8192, 4096) == bytes(4096)
    assert disk.bs.log[-1] == ("write_zeroes", 8192, 4096, 0)


@pytest.mark.parametrize(("kind", "nbytes", "flags", "status"), [
    (T.DISCARD, 4096, 1, S.UNSUPP),          # discard never unmaps
    (T.WRITE_ZEROES, 4096, 2, S.UNSUPP),     # unknown flag
    (T.DISCARD, 4096, 0x80, S.UNSUPP),
    (T.DISCARD, (1 << 20) + 512, 0, S.IOERR),  # past the end
    (T.WRITE_ZEROES, 0, 0, S.OK),            # empty range is fine
])
def test_discard_write_zeroes_checks(disk: Disk, kind: int, nbytes: int,
                                     flags: int, status: int) -> None:
    c = one(disk, kind, 0, nbytes=nbytes, flags=flags)
    assert c.status == status
    if status != S.OK:
        assert disk.bs.log == []             # the backend saw nothing


def test_dwz_over_max_sectors_is_ioerr() -> None:
    d = make_disk(conf=VirtIOBlkConf(num_queues=1, queue_size=16,
                                     max_discard_sectors=8))
    try:
        assert one(d, T.DISCARD, 0, nbytes=8 * 512).status == S.OK
        assert one(d, T.DISCARD, 0, nbytes=9 * 512).status == S.IOERR
    finally:
        d.close()


def hand_request(d: Disk, out: list[tuple[int, int]],
                 in_: list[tuple[int, int]]) -> int:
    drv = raw_driver(d)
    head = drv.add(out, in_)
    d.dev.host_notifier_read(0) if drv.kick() else d.dev.handle_vq(0)
    d.settle()
    return head


def header(d: Disk, rtype: int, sector: int = 0) -> int:
    a = d.mem.alloc(16)
    OUTHDR.pack_into(d.mem.buf, a, rtype, 0, sector)
    return a


def used_status(d: Disk, status_addr: int) -> tuple[int, int]:
    vq = d.dev.vqs[0]
    used_len = int.from_bytes(d.mem.read(vq.used + 4 + 4, 4), "little")
    return d.mem.buf[status_addr], used_len


@pytest.mark.parametrize("rtype", [T.DISCARD & ~1, T.WRITE_ZEROES & ~1])
def test_dwz_without_out_bit_is_unsupp(rtype: int) -> None:
    d = make_disk(guest=False)
    try:
        seg, st = d.mem.alloc(16), d.mem.alloc(1)
        hand_request(d, [(header(d, rtype), 16), (seg, 16)], [(st, 1)])
        assert used_status(d, st) == (S.UNSUPP, 1)
    finally:
        d.close()


def test_dwz_with_two_segments_is_unsupp_and_short_is_fatal() -> None:
    d = make_disk(guest=False)
    try:
        seg, st = d.mem.alloc(32), d.mem.alloc(1)
        hand_request(d, [(header(d, T.DISCARD), 16), (seg, 32)], [(st, 1)])
        assert used_status(d, st) == (S.UNSUPP, 1)
        hand_request(d, [(header(d, T.DISCARD), 16), (seg, 8)], [(st, 1)])
        assert d.dev.broken_reason == (
            "virtio-blk discard/write_zeroes header too short")
        assert d.dev.vqs[0].inuse == 0       # the element was detached
    finally:
        d.close()


@pytest.mark.parametrize(("rtype", "status"), [
    (99, S.UNSUPP), (T.SCSI_CMD, S.IOERR), (T.BARRIER | T.FLUSH, S.OK),
    (T.GET_ID | T.OUT, S.OK), (3, S.IOERR),
])
def test_other_types(rtype: int, status: int) -> None:
    d = make_disk(guest=False)
    try:
        st = d.mem.alloc(1)
        hand_request(d, [(header(d, rtype), 16)], [(st, 1)])
        assert used_status(d, st) == (status, 1)
        assert not d.dev.broken
    finally:
        d.close()


def test_scsi_cmd_with_all_segments_is_unsupp_and_sets_errors() -> None:
    d = make_disk(guest=False)
    try:
        cdb, sense, scsi, st = (d.mem.alloc(16) for _ in range(4))
        hand_request(d, [(header(d, T.SCSI_CMD), 16), (cdb, 16)],
                     [(sense, 16), (scsi, 16), (st, 1)])
        assert used_status(d, st) == (S.UNSUPP, 33)
        assert d.mem.read(scsi, 4) == (255).to_bytes(4, "little")
    finally:
        d.close()


@pytest.mark.parametrize(("out", "in_", "message"), [
    ([16], [], "virtio-blk missing headers"),
    ([], [1], "virtio-blk missing headers"),
    ([8], [1], "virtio-blk request outhdr too short"),
])
def test_fatal_header_errors_break_the_device(out: list[int],
                                              in_: list[int],
                                              message: str) -> None:
    d = make_disk(guest=False)
    try:
        a = d.mem.alloc(64)
        hand_request(d, [(a, n) for n in out], [(a + 32, n) for n in in_])
        assert d.dev.broken and d.dev.broken_reason == message
        assert d.dev.vqs[0].inuse == 0
        assert d.dev.vqs[0].used_idx == 0     # nothing was pushed
    finally:
        d.close()


def test_header_split_over_two_buffers_is_fine() -> None:
    d = make_disk(guest=False)
    try:
        h = header(d, T.FLUSH)
        st = d.mem.alloc(1)
        hand_request(d, [(h, 5), (h + 5, 11)], [(st, 1)])
        assert used_status(d, st) == (S.OK, 1)
    finally:
        d.close()


@pytest.mark.parametrize(("lbs", "offset", "size"), [
    (4096, 512, 4096),            # sector not aligned to the block
    (4096, 0, 512),               # size not a multiple of the block
    (512, 0, 700),                # size not a multiple of 512
    (512, 1 << 20, 512),          # starts at the end
    (512, (1 << 20) - 512, 1024),  # runs past the end
])
def test_range_and_alignment_give_ioerr_without_backend(
        lbs: int, offset: int, size: int) -> None:
    d = make_disk(lbs=lbs, record=True)
    try:
        b = d.mem.alloc(8192)
        for kind in (T.IN, T.OUT):
            c = one(d, kind, offset, [(b, size)])
            assert c.status == S.IOERR
            assert c.used_len == (size + 1 if kind == T.IN else 1)
        assert d.bs.log == []
        assert d.dev.stats[0].ioerr == 2
    finally:
        d.close()


def test_regression_block_size_is_the_device_property() -> None:
    """The device took the host's 4096-byte block size, so 512-byte
    requests failed its range check; QEMU's is the device property,
    512 unless set, whatever the host's (the block layer bounces)."""
    d = make_disk(lbs=4096, record=True,
                  conf=VirtIOBlkConf(num_queues=1, queue_size=16))
    try:
        assert d.dev.lbs == 512
        b = d.mem.alloc(512)
        for kind in (T.OUT, T.IN):
            assert one(d, kind, 512, [(b, 512)]).status == S.OK
        assert len(d.bs.log) == 2
    finally:
        d.close()
    d = make_disk(lbs=512, conf=VirtIOBlkConf(
        num_queues=1, queue_size=16, logical_block_size=4096,
        physical_block_size=4096))
    try:
        assert d.dev.lbs == 4096
        b = d.mem.alloc(512)
        assert one(d, T.IN, 0, [(b, 512)]).status == S.IOERR
    finally:
        d.close()


def test_request_at_the_last_sector_is_fine(disk: Disk) -> None:
    b = disk.mem.alloc(512)
    assert one(disk, T.IN, (1 << 20) - 512, [(b, 512)]).status == S.OK


def test_max_request_size_check() -> None:
    d = make_disk(guest=False)
    try:
        assert not d.dev._sect_range_ok(0, (BDRV_REQUEST_MAX_SECTORS + 1)
                                        * 512)
    finally:
        d.close()


@pytest.mark.parametrize("op", ["read", "write", "flush"])
def test_backend_error_reaches_the_guest_as_ioerr(disk: Disk,
                                                  op: str) -> None:
    disk.bs.inject_error(op, errno.EIO)
    kind = {"read": T.IN, "write": T.OUT, "flush": T.FLUSH}[op]
    b = disk.mem.alloc(512)
    c = one(disk, kind, 0, [] if op == "flush" else [(b, 512)])
    assert c.status == S.IOERR
    assert not disk.dev.broken
    assert one(disk, kind, 0, [] if op == "flush" else [(b, 512)]
               ).status == S.OK


def test_stage_stamps_are_ordered() -> None:
    d = make_disk(guest=False)
    try:
        q = d.queues[0]
        q.stamp_table = d.mem.alloc(16 * q.layout.num, 8)
        from virtio.blk import VirtIOBlock
        from virtio.guest import GuestBlkDriver
        dev = VirtIOBlock(d.bs, VirtIOBlkConf(num_queues=1, queue_size=16),
                          [q], mem=d.mem)
        g = GuestBlkDriver(d.mem, q.layout, dev.guest_features,
                           q.host_notifier, q.guest_notifier,
                           stamp_table=q.stamp_table)
        b = d.mem.alloc(512)
        g.submit(T.IN, 0, [(b, 512)])
        g.submit(T.IN, 1 << 30, [(b, 512)])      # IOERR: no backend
        dev.host_notifier_read(0)
        got: list[Completion] = []

        def two() -> bool:
            got.extend(g.reap())
            return len(got) == 2

        d.run(two)
        ok, bad = sorted(got, key=lambda c: c.tag)
        assert ok.t_submit <= ok.t_pickup <= ok.t_done <= ok.t_complete
        assert ok.t_pickup < ok.t_done
        assert bad.status == S.IOERR and bad.t_done == bad.t_pickup
        g.close()
    finally:
        d.close()


# -- drain loop and counters ----------------------------------------------


def test_drain_reenables_notification_and_counts_kicks(disk: Disk) -> None:
    g = disk.guests[0]
    b = disk.mem.alloc(512)
    for _ in range(3):
        g.submit(T.IN, 0, [(b, 512)], kick=False)
    assert g.kick() is True
    kick_and_run(disk, 3)
    vq = disk.dev.vqs[0]
    assert vq.notification is True
    st = disk.dev.queue_stats(0)
    assert st["requests"] == 3 and st["kicks"] == 1
    # A kick without the eventfd set is not counted.
    disk.dev.host_notifier_read(0)
    assert disk.dev.queue_stats(0)["kicks"] == 1
    g.publish_stats()
    st = disk.dev.queue_stats(0)
    assert st["guest_submitted"] == 3 and st["guest_kicks"] == 1


def test_drain_in_poll_mode_leaves_notification_off(disk: Disk) -> None:
    vq = disk.dev.vqs[0]
    disk.dev.host_notifier_poll_begin(0)
    g = disk.guests[0]
    b = disk.mem.alloc(512)
    g.submit(T.IN, 0, [(b, 512)])
    assert g.vring.kicks_suppressed == 0      # EVENT_IDX: first kick
    g.submit(T.IN, 0, [(b, 512)])
    assert g.vring.kicks_suppressed == 1      # device still polling
    assert disk.dev.host_notifier_poll(0)
    disk.dev.host_notifier_poll_ready(0)
    assert vq.notification is False
    disk.run(lambda: vq.inuse == 0)
    disk.dev.host_notifier_poll_end(0)
    assert vq.notification is True


def test_batched_notifications_without_event_idx() -> None:
    d = make_disk(features_off=EVENT_IDX)
    try:
        bh_runs: list[int] = []

        def notify_bh() -> None:
            bh_runs.append(1)
            d.dev.notify_guest_bh()

        bh = d.ctx.bh_new(notify_bh)
        d.dev.dataplane_start(bh.schedule)
        assert d.dev.batch_notifications
        g = d.guests[0]
        b = d.mem.alloc(512)
        for _ in range(5):
            g.submit(T.IN, 0, [(b, 512)], kick=False)
        g.kick()
        got = kick_and_run(d, 5)
        assert len(got) == 5
        # The guest saw the used ring before the notify BH ran: it was
        # scheduled from the backend's BH, so it runs in the next drain.
        assert d.dev.queue_stats(0)["interrupts"] == 0
        d.settle()
        st = d.dev.queue_stats(0)
        # Five completions in one BH slice: one interrupt.
        assert st["interrupts"] == 1 and len(bh_runs) == 1
        assert d.queues[0].guest_notifier.test_and_clear()
    finally:
        d.close()


def test_event_idx_notifies_per_completion_as_the_guest_asks(
        disk: Disk) -> None:
    disk.dev.dataplane_start(lambda: None)
    assert not disk.dev.batch_notifications
    g = disk.guests[0]
    b = disk.mem.alloc(512)
    for _ in range(5):
        g.submit(T.IN, 0, [(b, 512)], kick=False)
    g.kick()
    kick_and_run(disk, 5)
    st = disk.dev.queue_stats(0)
    # The guest does not consume between completions, so used_event
    # stays 0: the first push interrupts (signalled_used not valid),
    # the next four are suppressed.
    assert (st["interrupts"], st["interrupts_suppressed"]) == (1, 4)


# -- properties ------------------------------------------------------------


def test_property_defaults() -> None:
    c = VirtIOBlkConf()
    assert (c.num_queues, c.queue_size, c.serial, c.request_merging,
            c.event_idx) == (65535, 256, "", True, True)
    c.realize(vcpus=4)
    assert c.num_queues == 4 and c.seg_max == 254
    c = VirtIOBlkConf()
    c.realize(vcpus=4, transport="mmio")
    assert c.num_queues == 1


@pytest.mark.parametrize(("props", "message"), [
    ({"queue-size": "2"}, "invalid queue-size property (2), must be > 2"),
    ({"queue-size": "100"}, "invalid queue-size property (100), must be "
                            "a power of 2 (max 1024)"),
    ({"queue-size": "2048"}, "invalid queue-size property (2048), must be "
                             "a power of 2 (max 1024)"),
    ({"num-queues": "0"}, "num-queues property must be larger than 0"),
    ({"queue-size": "abc"}, "Parameter 'queue-size' expects integer"),
    ({"queue-size": "70000"}, "Parameter 'queue-size' expects uint16_t"),
    ({"request-merging": "maybe"},
     "Parameter 'request-merging' expects 'on' or 'off'"),
    ({"bogus": "1"}, "Property 'virtio-blk-pci.bogus' not found"),
    ({"max-discard-sectors": "0"},
     "invalid max-discard-sectors property (0), must be between 1 and "
     "4194303"),
])
def test_property_errors(props: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        VirtIOBlkConf.from_props(props).realize()
    assert str(ei.value) == message


def test_property_values_parse() -> None:
    c = VirtIOBlkConf.from_props({
        "queue-size": "0x80", "request-merging": "off", "serial": "s1",
        "event_idx": "off", "num-queues": "2"})
    c.realize()
    assert (c.queue_size, c.request_merging, c.serial, c.event_idx,
            c.num_queues) == (128, False, "s1", False, 2)


def test_event_idx_off_is_not_offered() -> None:
    d = make_disk(conf=VirtIOBlkConf(num_queues=1, queue_size=16,
                                     event_idx=False))
    try:
        assert not d.dev.has_feature(VirtioFeature.RING_EVENT_IDX)
        assert not d.guests[0].vring.event_idx
    finally:
        d.close()


def test_queues_must_match_num_queues() -> None:
    d = make_disk(guest=False)
    try:
        from virtio.blk import VirtIOBlock
        with pytest.raises(ConfigError, match="1 queues set up for "
                                              "num-queues=2"):
            VirtIOBlock(d.bs, VirtIOBlkConf(num_queues=2, queue_size=16),
                        d.queues, mem=d.mem)
    finally:
        d.close()


def test_several_queues_are_independent() -> None:
    d = make_disk(num_queues=3)
    try:
        b = d.mem.alloc(512)
        for q in range(3):
            for _ in range(q + 1):
                d.guests[q].submit(T.IN, 0, [(b, 512)])
        for q in range(3):
            assert len(kick_and_run(d, q + 1, q)) == q + 1
        assert [d.dev.stats[q].requests for q in range(3)] == [1, 2, 3]
        assert d.dev.has_feature(12)          # VIRTIO_BLK_F_MQ
    finally:
        d.close()
