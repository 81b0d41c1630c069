"""The VMM's shared pieces: counters across processes, block accounting,
single-store ring fields, and the QMP view of a machine's counters."""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest

from qiothread.vmm_acct import AccountedNode
from qiothread.vmm_compat import AtomicU16, install
from qiothread.vmm_shared import ACCT_FIELDS, QUEUE_STAT_FIELDS, VmmShared

_IX = {n: i for i, n in enumerate(ACCT_FIELDS)}


def test_queue_counters_written_in_a_child_are_read_by_the_parent(
        ) -> None:
    with VmmShared(nqueues=3, ndevices=2) as shared:
        stats = shared.queue_stats(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                for _ in range(1000):
                    stats.kicks += 1
                stats.merges = 7
                stats.interrupts_suppressed += 3
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        got = shared.read_queue(1)
        assert got["kicks"] == 1000
        assert got["merges"] == 7
        assert got["interrupts_suppressed"] == 3
        assert set(got) == set(QUEUE_STAT_FIELDS)
        # Neighbouring slots untouched.
        assert all(v == 0 for v in shared.read_queue(0).values())
        assert all(v == 0 for v in shared.read_queue(2).values())


def test_stop_word_and_broken_devices() -> None:
    with VmmShared(nqueues=1, ndevices=2) as shared:
        assert not shared.stop_requested()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            shared.mark_broken(1, "Guest says index 300 is available")
            shared.mark_broken(1, "a second error is not recorded")
            os._exit(0)
        os.waitpid(pid, 0)
        assert shared.broken(0) is None
        assert shared.broken(1) == "Guest says index 300 is available"
        shared.request_stop()
        assert shared.stop_requested()


class _Node:
    """A node double that completes at once with a chosen result."""

    length = 1 << 20
    ret = 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def preadv(self, offset: int, iov: list[memoryview], cb: object) -> None:
        self.calls.append("r")
        cb(self.ret)  # type: ignore[operator]

    def pwritev(self, offset: int, iov: list[memoryview],
                cb: object) -> None:
        self.calls.append("w")
        cb(self.ret)  # type: ignore[operator]

    def flush(self, cb: object) -> None:
        cb(self.ret)  # type: ignore[operator]

    def pdiscard(self, offset: int, nbytes: int, cb: object) -> None:
        cb(self.ret)  # type: ignore[operator]

    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: object) -> None:
        cb(self.ret)  # type: ignore[operator]


def test_block_accounting_counts_as_query_blockstats_reports() -> None:
    words = memoryview(bytearray(8 * len(ACCT_FIELDS))).cast("q")
    inner = _Node()
    node = AccountedNode(inner, words)
    results: list[int] = []
    buf = memoryview(bytearray(8192))
    node.preadv(0, [buf[:4096]], results.append)
    node.pwritev(65536, [buf[:4096], buf[4096:]], results.append)
    node.flush(results.append)
    node.pdiscard(0, 1 << 16, results.append)
    node.pwrite_zeroes(1 << 20, 512, False, results.append)
    inner.ret = -5
    node.preadv(0, [buf[:512]], results.append)
    assert results == [0, 0, 0, 0, 0, -5]
    w = {n: words[i] for n, i in _IX.items()}
    assert (w["rd_operations"], w["rd_bytes"]) == (1, 4096)
    assert (w["wr_operations"], w["wr_bytes"]) == (2, 8192 + 512)
    assert w["wr_highest_offset"] == 65536 + 8192
    assert w["flush_operations"] == 1
    assert (w["unmap_operations"], w["unmap_bytes"]) == (1, 1 << 16)
    assert w["failed_rd_operations"] == 1
    assert w["last_completion_ns"] > 0
    assert w["rd_total_time_ns"] >= 0
    # Everything else is the node's own.
    assert node.length == 1 << 20
    assert inner.calls == ["r", "w", "r"]


def test_atomic_u16_is_a_drop_in_for_struct() -> None:
    buf = bytearray(16)
    AtomicU16.pack_into(buf, 4, 0xBEEF)
    assert struct.unpack_from("<H", buf, 4) == (0xBEEF,)
    assert AtomicU16.unpack_from(buf, 4) == (0xBEEF,)
    AtomicU16.pack_into(buf, 7, 0x1234)       # odd offsets still work
    assert AtomicU16.unpack_from(buf, 7) == (0x1234,)
    assert AtomicU16.size == 2


def _race(pack: object, unpack: object, seconds: float) -> int:
    """Writer child flips a field between two values; count the reads
    in the parent that saw anything else."""
    m = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    values = (0x0F00, 0x10FF)          # every byte differs
    pack(m, 10, values[0])  # type: ignore[operator]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for v in values:
                pack(m, 10, v)  # type: ignore[operator]
        os._exit(0)
    bad = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        v = unpack(m, 10)[0]  # type: ignore[operator]
        if v not in values:
            bad += 1
    os.waitpid(pid, 0)
    m.close()
    return bad


def test_regression_torn_ring_index() -> None:
    """Ring indexes written by one process and read by another are never
    seen half-written (or zeroed: ``struct.pack_into`` memsets first),
    which made the device fail with "Guest moved used index from N to
    0" in runs with two queues."""
    assert _race(AtomicU16.pack_into, AtomicU16.unpack_from, 0.5) == 0


def test_install_leaves_no_struct_u16_in_virtio_ring_code() -> None:
    import virtio.driver
    import virtio.virtqueue

    install()
    install()   # idempotent
    for module in (virtio.virtqueue, virtio.driver):
        # Either virtio stores its own way now, or it has ours.
        assert not isinstance(getattr(module, "U16", None), struct.Struct)


@pytest.mark.parametrize("nqueues", [0, 1, 64])
def test_mapping_sizes(nqueues: int) -> None:
    with VmmShared(nqueues=nqueues, ndevices=1) as shared:
        for q in range(nqueues):
            shared.acct_words(q)[_IX["rd_operations"]] = q + 1
        for q in range(nqueues):
            assert shared.read_acct(q)["rd_operations"] == q + 1
