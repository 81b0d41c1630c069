"""The VMM's shared pieces: counters across processes and block
accounting."""

from __future__ import annotations

import os

import pytest

from qiothread.vmm_acct import AccountedNode
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


@pytest.mark.parametrize("nqueues", [0, 1, 64])
def test_mapping_sizes(nqueues: int) -> None:
    with VmmShared(nqueues=nqueues, ndevices=1) as shared:
        for q in range(nqueues):
            shared.acct_words(q)[_IX["rd_operations"]] = q + 1
        for q in range(nqueues):
            assert shared.read_acct(q)["rd_operations"] == q + 1


@pytest.mark.parametrize(("drive_cache", "device_wc", "expect"), [
    ("writeback", "auto", None),
    ("writethrough", "auto", False),
    ("directsync", "auto", False),
    ("writethrough", "on", True),
    ("none", "off", False),
])
def test_write_cache_the_guest_sees(drive_cache: str, device_wc: str,
                                    expect: bool | None) -> None:
    from qiothread.machine import Machine
    from qiothread.options import build_machine_config
    from qiothread.qemu_opts import split_argv

    qemu, _ = split_argv([
        "-drive", f"if=none,id=d0,file=/tmp/x,format=raw,"
                  f"cache={drive_cache}",
        "-device", f"virtio-blk-pci,drive=d0,write-cache={device_wc}"])
    cfg = build_machine_config(qemu, 1)
    opts = Machine._node_options(cfg.nodes[0], cfg.devices[0])
    assert opts.get("write-cache") is expect


def test_poll_ns_values_of_qemus_rule() -> None:
    from qiothread.vmm_stats import poll_ns_values

    # QEMU's defaults: 0, 4000 and doubling, capped at 32768.
    assert poll_ns_values(32768, 0, 0) == {0, 4000, 8000, 16000, 32000,
                                           32768}
    assert poll_ns_values(0, 0, 0) == {0}
    assert poll_ns_values(100000, 4, 0) == {0, 4000, 16000, 64000,
                                            100000}
    # Halving on the way down reaches the powers of two below the cap.
    assert {16384, 8192, 2000} <= poll_ns_values(32768, 0, 2)


def test_poll_ns_buckets_get_exact_values_where_unambiguous() -> None:
    from qiothread.vmm_stats import _label, poll_ns_values

    # bucket k: values with bit_length() == k (qiothread.stats).
    hist = {0: 5, 12: 7, 15: 11, 16: 13}
    assert _label(hist, poll_ns_values(32768, 0, 0)) == {
        0: 5, 4000: 7, 32000: 11, 32768: 13}
    # Without a known rule: the buckets' lower bounds.
    assert _label(hist, None) == {0: 5, 2048: 7, 16384: 11, 32768: 13}
    # Two reachable values in one bucket: its lower bound.
    assert _label({15: 3}, {20000, 30000}) == {16384: 3}


def test_monitor_reports_broken_devices_once_and_sums_blockstats(
        ) -> None:
    """The QMP view of a machine: counters of a device served by two
    iothreads add up; a broken device gives one event."""
    from types import SimpleNamespace

    from qiothread.options import build_machine_config
    from qiothread.qemu_opts import split_argv
    from qiothread.vmm_qmp import MachineMonitor

    qemu, _ = split_argv([
        "-object", "iothread,id=a", "-object", "iothread,id=b",
        "-drive", "if=none,id=d0,file=/tmp/x,format=raw",
        "-device", '{"driver":"virtio-blk-pci","id":"v0","drive":"d0",'
                   '"num-queues":2,"iothread-vq-mapping":'
                   '[{"iothread":"a"},{"iothread":"b"}]}'])
    cfg = build_machine_config(qemu, 2)
    with VmmShared(nqueues=2, ndevices=1) as shared:
        queues = [SimpleNamespace(qslot=q, dslot=0, index=q)
                  for q in range(2)]
        machine = SimpleNamespace(config=cfg, shared=shared,
                                  queues=queues)
        monitor = MachineMonitor(machine)  # type: ignore[arg-type]
        events: list[object] = []
        monitor.add_event_listener(events.append)
        for q, ops in ((0, 3), (1, 4)):
            w = shared.acct_words(q)
            w[_IX["rd_operations"]] = ops
            w[_IX["rd_bytes"]] = ops * 4096
            w[_IX["wr_highest_offset"]] = 1000 * (q + 1)
            shared.queue_stats(q).merges = 1
        (stats,) = monitor.query_blockstats()
        assert (stats.device, stats.qdev) == (
            "d0", "/machine/peripheral/v0/virtio-backend")
        assert (stats.rd_operations, stats.rd_bytes) == (7, 7 * 4096)
        assert stats.wr_highest_offset == 2000      # a maximum, not a sum
        assert stats.rd_merged == 2                 # reads only: theirs
        monitor.check_broken()
        assert events == []
        shared.mark_broken(0, "Guest says index 300 is available")
        monitor.check_broken()
        monitor.check_broken()
        (event,) = events
        assert event.name == "X_QIOTHREAD_DEVICE_BROKEN"  # type: ignore
        assert event.data == {  # type: ignore[attr-defined]
            "device": "d0",
            "qdev": "/machine/peripheral/v0/virtio-backend", "queue": 0,
            "reason": "Guest says index 300 is available"}
