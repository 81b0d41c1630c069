"""Request merging (MultiReqBuffer) and FLUSH ordering, reference §15.4.

Every request goes through the real rings in one kick; what the backend
receives is read from its request log.
"""

from __future__ import annotations

import random

import pytest

from tests.virtio.harness import Disk, make_disk
from virtio.blk_defs import VirtIOBlkConf
from virtio.blk_defs import VirtioBlkStatus as S
from virtio.blk_defs import VirtioBlkType as T
from virtio.guest import Completion, GuestBlkDriver

K4 = 4096


def disk(merging: bool = True, queue_size: int = 128,
         use_indirect: bool = False, max_transfer: int = 0) -> Disk:
    d = make_disk(size=8 << 20, mem_size=16 << 20, record=True,
                  use_indirect=use_indirect,
                  conf=VirtIOBlkConf(num_queues=1, queue_size=queue_size,
                                     request_merging=merging))
    d.bs.max_transfer = max_transfer
    if max_transfer:
        from virtio.blk import VirtIOBlock
        d.dev = VirtIOBlock(d.bs, d.dev.conf, d.queues, mem=d.mem)
    return d


def one_kick(d: Disk, reqs: list[tuple[int, int, list[tuple[int, int]]]]
             ) -> list[Completion]:
    g = d.guests[0]
    for kind, offset, bufs in reqs:
        g.submit(kind, offset, bufs, kick=False)
    g.kick()
    d.dev.host_notifier_read(0)
    got: list[Completion] = []

    def all_done() -> bool:
        got.extend(g.reap())
        return len(got) == len(reqs)

    d.run(all_done)
    d.settle()
    return sorted(got, key=lambda c: c.tag)


def writes(d: Disk, offsets: list[int], size: int = K4
           ) -> list[tuple[int, int, list[tuple[int, int]]]]:
    out = []
    for off in offsets:
        b = d.mem.alloc(size, 4096)
        d.mem.write(b, off.to_bytes(8, "little") * (size // 8))
        out.append((int(T.OUT), off, [(b, size)]))
    return out


def test_32_adjacent_writes_become_one_backend_request() -> None:
    d = disk()
    try:
        got = one_kick(d, writes(d, [i * K4 for i in range(32)]))
        assert [c.status for c in got] == [S.OK] * 32
        assert d.bs.log == [("write", 0, 32 * K4, 32)]
        st = d.dev.queue_stats(0)
        assert (st["requests"], st["merges"], st["rw_submits"]) == (
            32, 31, 1)
    finally:
        d.close()


def test_a_gap_splits_the_run() -> None:
    d = disk()
    try:
        offs = [i * K4 for i in range(16)] + [(17 + i) * K4
                                              for i in range(16)]
        one_kick(d, writes(d, offs))
        assert d.bs.log == [("write", 0, 16 * K4, 16),
                            ("write", 17 * K4, 16 * K4, 16)]
        assert d.dev.stats[0].merges == 30
    finally:
        d.close()


def test_the_33rd_request_starts_a_new_buffer() -> None:
    d = disk()
    try:
        one_kick(d, writes(d, [i * K4 for i in range(33)]))
        assert d.bs.log == [("write", 0, 32 * K4, 32),
                            ("write", 32 * K4, K4, 1)]
    finally:
        d.close()


def test_requests_are_sorted_by_sector_before_merging() -> None:
    d = disk()
    try:
        offs = [i * K4 for i in range(32)]
        random.Random(7).shuffle(offs)
        one_kick(d, writes(d, offs))
        assert d.bs.log == [("write", 0, 32 * K4, 32)]
        # The concatenated iovec is in sector order: the data landed
        # where each request said.
        for i in range(32):
            assert d.bs.read_data(i * K4, 8) == (i * K4).to_bytes(
                8, "little")
    finally:
        d.close()


def test_reads_merge_too() -> None:
    d = disk()
    try:
        reqs = [(int(T.IN), i * K4, [(d.mem.alloc(K4, 4096), K4)])
                for i in range(8)]
        got = one_kick(d, reqs)
        assert d.bs.log == [("read", 0, 8 * K4, 8)]
        assert all(c.used_len == K4 + 1 for c in got)
    finally:
        d.close()


def test_request_merging_off() -> None:
    d = disk(merging=False)
    try:
        one_kick(d, writes(d, [i * K4 for i in range(32)]))
        assert d.bs.log == [("write", i * K4, K4, 1) for i in range(32)]
        assert d.dev.stats[0].merges == 0
    finally:
        d.close()


def test_a_change_of_direction_submits_the_buffer() -> None:
    d = disk()
    try:
        reqs = writes(d, [0, K4, 2 * K4])
        reqs += [(int(T.IN), (3 + i) * K4, [(d.mem.alloc(K4), K4)])
                 for i in range(3)]
        one_kick(d, reqs)
        assert d.bs.log == [("write", 0, 3 * K4, 3),
                            ("read", 3 * K4, 3 * K4, 3)]
    finally:
        d.close()


def test_flush_goes_after_pending_writes_but_not_reads() -> None:
    d = disk()
    try:
        one_kick(d, [*writes(d, [0, K4]), (int(T.FLUSH), 0, [])])
        assert [e[0] for e in d.bs.log] == ["write", "flush"]
        d.bs.log.clear()
        one_kick(d, [(int(T.IN), 0, [(d.mem.alloc(K4), K4)]),
                     (int(T.FLUSH), 0, [])])
        # A pending read stays in the buffer and goes after the flush.
        assert [e[0] for e in d.bs.log] == ["flush", "read"]
    finally:
        d.close()


def test_max_transfer_limits_a_run() -> None:
    d = disk(max_transfer=4 * K4)
    try:
        one_kick(d, writes(d, [i * K4 for i in range(10)]))
        assert [e[2] for e in d.bs.log] == [4 * K4, 4 * K4, 2 * K4]
    finally:
        d.close()


def test_iov_max_limits_a_run() -> None:
    d = disk(use_indirect=True)
    try:
        q = d.queues[0]
        d.guests[0].close()
        d.guests[0] = GuestBlkDriver(d.mem, q.layout, d.dev.guest_features,
                                     q.host_notifier, q.guest_notifier,
                                     use_indirect=True, max_segments=40)
        reqs = []
        for i in range(32):
            b = d.mem.alloc(40 * 512, 512)
            reqs.append((int(T.OUT), i * 40 * 512,
                         [(b + 512 * j, 512) for j in range(40)]))
        one_kick(d, reqs)
        # 25 requests of 40 iovecs fit in 1024; the 26th would not.
        assert [e[3] for e in d.bs.log] == [25 * 40, 7 * 40]
    finally:
        d.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merged_results_equal_unmerged(seed: int) -> None:
    rng = random.Random(seed)
    plan = []
    for _ in range(6):                     # six kicks of up to 40 requests
        batch = []
        # Requests in flight together must not overlap: neither QEMU
        # nor a disk orders them, merged or not.
        free = list(range(0, 64, 2))
        rng.shuffle(free)
        for _ in range(rng.randrange(8, 33)):
            kind = rng.choice([T.IN, T.OUT, T.OUT, T.FLUSH])
            off = free.pop() * K4
            n = rng.choice([1, 2, 2, 2]) * K4
            batch.append((kind, off, n, rng.randbytes(n)))
        plan.append(batch)
    results = []
    for merging in (True, False):
        d = disk(merging=merging, queue_size=256)
        try:
            reads: list[bytes] = []
            statuses: list[int] = []
            for batch in plan:
                reqs, rbufs = [], []
                for kind, off, n, data in batch:
                    b = d.mem.alloc(max(n, 1), 4096)
                    if kind == T.OUT:
                        d.mem.write(b, data)
                    elif kind == T.IN:
                        rbufs.append((b, n))
                    reqs.append((int(kind), off,
                                 [] if kind == T.FLUSH else [(b, n)]))
                got = one_kick(d, reqs)
                statuses += [c.status for c in got]
                reads += [d.mem.read(b, n) for b, n in rbufs]
            results.append((statuses, reads, d.bs.read_data(0, 68 * K4),
                            d.dev.stats[0].merges))
        finally:
            d.close()
    merged, unmerged = results
    assert merged[:3] == unmerged[:3]
    assert merged[3] > 0 and unmerged[3] == 0
