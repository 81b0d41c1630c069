"""Hypothesis fuzzing of descriptor tables, avail rings and headers.

Whatever the guest writes: nothing but the device's own handling runs
(no exception escapes handle_vq), the drain ends, and the device is
broken exactly when QEMU 7.2 would break it, with QEMU's message.  The
oracle below re-derives QEMU's checks (virtqueue_split_pop,
virtqueue_map_desc, virtio_blk_handle_request) independently of the
implementation, as a plain walk over the bytes the test wrote.

Addresses are kept so that device writes (status bytes, read data)
cannot land on anything the oracle reads later: readable buffers live
in one region, writable ones in another, tables in a third, and a
"bad" address lies past the end of guest memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.virtio.harness import make_disk
from virtio.blk_defs import OUTHDR
from virtio.ring import DESC, U16

NUM = 8
TABLE_ENTRIES = 16
NEXT, WRITE, INDIRECT = 1, 2, 4
TYPES = [0, 1, 4, 8, 11, 13, 10, 12, 2, 99, 0x80000001, 0xFFFFFFFF]


Desc = tuple[str, int, int, int, int]      # region, offset, len, flags, next


def well_formed(n: int) -> list[Desc]:
    """Pairs of (16-byte header -> 1-byte status), one per 64 bytes."""
    out: list[Desc] = []
    for k in range(n // 2):
        out.append(("ok", 64 * (k % 4), 16, NEXT, 2 * k + 1))
        out.append(("ok", 64 * (k % 4), 1 + 8 * (k % 2), WRITE, 0))
    return out


@st.composite
def mutated(draw: st.DrawFn, n: int) -> list[Desc]:
    """A well-formed table with a few fields overwritten."""
    descs = well_formed(n)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, n - 1))
        r, off, ln, f, x = descs[i]
        what = draw(st.sampled_from(
            ["len", "flags", "next", "addr", "indirect", "data"]))
        if what == "len":
            ln = draw(st.sampled_from([0, 1, 8, 15, 17, 32, 48, 64, 512]))
        elif what == "flags":
            f = draw(st.integers(0, 7))
        elif what == "next":
            x = draw(st.integers(0, TABLE_ENTRIES + 2))
        elif what == "addr":
            r = draw(st.sampled_from(["ok", "bad"]))
            off = draw(st.integers(0, 3)) * 64 + draw(
                st.sampled_from([0, 5]))
        elif what == "indirect":
            f = INDIRECT | draw(st.sampled_from([0, NEXT]))
            off = 32 * draw(st.integers(0, 7))
            ln = draw(st.sampled_from([16, 32, 48, 64, 24, 0, 256, 4096]))
        else:
            # A data buffer between header and status: keep the chain.
            f |= NEXT if not f & WRITE else 0
            ln = draw(st.sampled_from([16, 64, 512]))
        descs[i] = (r, off, ln, f, x)
    return descs


@dataclass
class Scenario:
    ring: list[Desc]
    table: list[Desc]
    heads: list[int]
    avail_idx: int
    #: Per readable slot: type, sector, DWZ num_sectors, DWZ flags.
    headers: list[tuple[int, int, int, int]]


@st.composite
def scenario(draw: st.DrawFn) -> Scenario:
    heads = [2 * (k % (NUM // 2)) for k in range(NUM)]
    for _ in range(draw(st.integers(0, 2))):
        heads[draw(st.integers(0, NUM - 1))] = draw(st.integers(0, NUM + 1))
    return Scenario(
        ring=draw(mutated(NUM)),
        table=draw(mutated(TABLE_ENTRIES)),
        heads=heads,
        avail_idx=draw(st.sampled_from([0, 1, 2, 3, 4, 4, 8, 9, 200])),
        headers=draw(st.lists(
            st.tuples(st.sampled_from(TYPES), st.integers(0, 40),
                      st.integers(0, 70), st.integers(0, 3)),
            min_size=4, max_size=4)))


class Oracle:
    """QEMU 7.2's verdict on one drain of the ring the test wrote."""

    def __init__(self, buf: bytes | bytearray, mem_size: int,
                 desc: int) -> None:
        self.buf = buf
        self.size = mem_size
        self.desc = desc

    def read_desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        a, n, f, x = DESC.unpack_from(self.buf, table + 16 * i)
        return a, n, f, x

    def chain(self, head: int) -> tuple[list[tuple[int, int]],
                                        list[tuple[int, int]]]:
        """The element, or raises AssertionError(message) like pop."""
        table, limit = self.desc, NUM
        a, n, f, x = self.read_desc(table, head)
        if f & INDIRECT:
            if n == 0 or n % 16:
                raise AssertionError("Invalid size for indirect buffer "
                                     "table")
            if a + n > self.size:
                raise AssertionError("Cannot map indirect buffer")
            table, limit = a, n // 16
            a, n, f, x = self.read_desc(table, 0)
        outs: list[tuple[int, int]] = []
        ins: list[tuple[int, int]] = []
        count = 0
        while True:
            if not f & WRITE and ins:
                raise AssertionError("Incorrect order for descriptors")
            if n == 0:
                raise AssertionError(
                    "virtio: zero sized buffers are not allowed")
            if a + n > self.size:
                raise AssertionError(
                    "virtio: bogus descriptor or out of resources")
            (ins if f & WRITE else outs).append((a, n))
            count += 1
            if count > limit:
                raise AssertionError("Looped descriptor")
            if not f & NEXT:
                return outs, ins
            if x >= limit:
                raise AssertionError(f"Desc next is {x}")
            a, n, f, x = self.read_desc(table, x)

    def request(self, outs: list[tuple[int, int]],
                ins: list[tuple[int, int]]) -> None:
        """virtio_blk_handle_request's fatal checks."""
        if not outs or not ins:
            raise AssertionError("virtio-blk missing headers")
        data = b"".join(bytes(self.buf[a:a + n]) for a, n in outs)
        if len(data) < 16:
            raise AssertionError("virtio-blk request outhdr too short")
        rtype = struct.unpack_from("<I", data)[0]
        if rtype & ~0x80000001 & 0xFFFFFFFF in (10, 12):
            rest = len(data) - 16
            if rtype & 1 and rest < 16:
                raise AssertionError(
                    "virtio-blk discard/write_zeroes header too short")

    def verdict(self, heads: list[int], avail_idx: int) -> tuple[
            str | None, list[tuple[int, int]]]:
        """(first error message or None, (head, used.len) of each
        well-formed request before it)."""
        if avail_idx > NUM:
            return f"Guest moved used index from 0 to {avail_idx}", []
        good: list[tuple[int, int]] = []
        for k in range(avail_idx):
            head = heads[k % NUM]
            try:
                if head >= NUM:
                    raise AssertionError(
                        f"Guest says index {head} is available")
                outs, ins = self.chain(head)
                self.request(outs, ins)
            except AssertionError as e:
                return str(e), good
            good.append((head, sum(n for _, n in ins)))
        return None, good


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_fuzzed_rings_break_the_device_exactly_as_qemu(
        sc: Scenario) -> None:
    d = make_disk(guest=False, queue_size=NUM, mem_size=1 << 16,
                  size=64 * 512)
    try:
        mem = d.mem
        readable = mem.alloc(256, 64)
        writable = mem.alloc(256 + 512, 64)
        table = mem.alloc(16 * TABLE_ENTRIES, 16)
        bad = mem.size - 4

        def addr(region: str, off: int, flags: int) -> int:
            if region == "bad":
                return bad + off
            if flags & INDIRECT:
                return table + off % (16 * TABLE_ENTRIES)
            return (writable if flags & WRITE else readable) + off

        for i, (t, sector, nsec, flags) in enumerate(sc.headers):
            base = readable + 64 * i
            OUTHDR.pack_into(mem.buf, base, t, 0, sector)
            struct.pack_into("<QII", mem.buf, base + 16, sector, nsec,
                             flags)
            mem.buf[base + 32:base + 64] = bytes(range(32))
        vq = d.dev.vqs[0]
        for i, (r, off, n, f, x) in enumerate(sc.ring):
            DESC.pack_into(mem.buf, vq.desc + 16 * i, addr(r, off, f), n, f,
                           x)
        for i, (r, off, n, f, x) in enumerate(sc.table):
            # Inside a table, an INDIRECT flag is just a flag: aim the
            # address at a buffer region anyway.
            DESC.pack_into(mem.buf, table + 16 * i,
                           addr(r, off, f & ~INDIRECT), n, f, x)
        heads = sc.heads
        for i, h in enumerate(heads):
            U16.pack_into(mem.buf, vq.avail + 4 + 2 * i, h)
        avail_idx = sc.avail_idx
        U16.pack_into(mem.buf, vq.avail + 2, avail_idx)

        expect_error, good = Oracle(
            bytes(mem.buf), mem.size, vq.desc).verdict(heads, avail_idx)
        event(f"verdict {expect_error} good {min(len(good), 2)}")

        d.dev.host_notifier_poll_ready(0)      # the drain, as polling does
        d.settle()

        assert d.dev.broken_reason == expect_error
        assert d.dev.broken is (expect_error is not None)
        assert vq.inuse == 0
        assert d.bs.in_flight == 0
        used = [struct.unpack_from("<II", mem.buf, vq.used + 4 + 8 * i)
                for i in range(vq.used_idx)]
        if expect_error is None:
            assert vq.is_empty() and vq.last_avail_idx == avail_idx
            assert sorted(used) == sorted(good)
        else:
            # Requests in flight when the device broke complete into a
            # disabled device: QEMU's virtqueue_flush publishes nothing
            # then.  Those answered before are a subset of the good ones.
            assert len(used) <= len(good)
            assert all(u in good for u in used)
    finally:
        d.close()
