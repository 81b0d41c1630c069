"""Polling statistics: exact in virtual time, readable from elsewhere."""

from __future__ import annotations

import mmap
import multiprocessing
import os

import pytest

from qiothread.aio import AioContext
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier
from qiothread.stats import FIELDS, STATS_SIZE, PollStats

from .aio_helpers import scripted

pytestmark = pytest.mark.timeout(60)


def test_time_weighted_poll_ns_distribution(fdmon: str) -> None:
    clock = VirtualClock(0)
    ctx = AioContext(fdmon=fdmon, clock=clock)
    mon = scripted(ctx, clock)
    e = EventNotifier()
    try:
        ctx.set_event_notifier(e, e.test_and_clear)   # no polling
        ctx.set_poll_params(32768, 0, 0)
        ctx.aio_poll(False)
        clock.advance(1000)
        # Blocks of 32.5 µs: 0 -> 4000 -> 8000 -> 16000, then two long
        # blocks: 16000 -> 0, 0 -> 0.
        for b in (32_500, 32_500, 32_500, 10**6, 10**6):
            mon.script.append(b)
            ctx.aio_poll(True)
        snap = ctx.stats.snapshot(clock.now_ns() + 500)
        # poll_ns was 0 for 1000 + 32500 ns, 4000 for 32500, 8000 for
        # 32500, 16000 for 10**6, then 0 again for 10**6 + 500.
        assert snap["poll_ns_hist"] == {
            0: 1000 + 32_500 + 10**6 + 500,
            (4000).bit_length(): 32_500,
            (8000).bit_length(): 32_500,
            (16000).bit_length(): 10**6,
        }
        total = 1000 + 3 * 32_500 + 2 * 10**6 + 500
        mean = (4000 * 32_500 + 8000 * 32_500 + 16000 * 10**6) / total
        assert snap["poll_ns_mean"] == pytest.approx(mean, rel=1e-12)
        assert snap["grow"] == 3 and snap["shrink"] == 2
        assert snap["iterations"] == 6
        assert snap["blocking_waits"] == 5
        assert snap["ns_blocked"] == 3 * 32_500 + 2 * 10**6
        assert snap["poll_rounds"] == 0
    finally:
        ctx.close()
        e.close()


def _child(buf: mmap.mmap, go: int, done: int) -> None:
    ctx = AioContext(stats=PollStats(buf, 64))
    for _ in range(1000):
        ctx.aio_poll(False)
    os.write(done, b"x")
    os.read(go, 1)              # stay alive while the parent reads
    ctx.close()


def test_another_process_reads_the_counters_live() -> None:
    buf = mmap.mmap(-1, 64 + STATS_SIZE)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    p = multiprocessing.get_context("fork").Process(
        target=_child, args=(buf, go_r, done_w))
    p.start()
    try:
        os.read(done_r, 1)
        reader = PollStats.attach(buf, 64)
        snap = reader.snapshot()
        assert snap["iterations"] == 1000
        assert snap["nonblocking_waits"] == 0   # nothing needed a wait
        reader.close()
    finally:
        os.write(go_w, b"x")
        p.join(30)
        for fd in (go_r, go_w, done_r, done_w):
            os.close(fd)
    assert p.exitcode == 0
    buf.close()


def test_attach_refuses_a_buffer_without_statistics() -> None:
    with pytest.raises(ValueError, match="no poll statistics"):
        PollStats.attach(bytearray(STATS_SIZE))
    with pytest.raises(ValueError, match="aligned"):
        PollStats(bytearray(STATS_SIZE + 8), 4)


def test_fields_are_all_reported() -> None:
    snap = PollStats().snapshot()
    assert set(FIELDS) <= set(snap)
    assert snap["poll_ns_hist"] == {} and snap["poll_ns_mean"] == 0.0
