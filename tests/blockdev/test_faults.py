"""Fault and latency injection, in virtual time with exact values."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev.faults import FaultInjector, FaultSpec
from blockdev.images import create_pattern_image, first_mismatch
from blockdev.options import open_blockdev
from blockdev.raw_aio import AioType, CompletionCB, RawAIOCB
from qiothread.clock import VirtualClock
from qiothread.errors import ConfigError
from tests.blockdev.conftest import (
    Waiter,
    aligned_buffer,
    make_context,
    run_until,
)

US, MS, S = 1_000, 1_000_000, 1_000_000_000


def test_parse_every_option() -> None:
    spec = FaultSpec.parse(
        "latency=200us; jitter=50us; stall=1s+200ms:5s+1s; "
        "eio=0+4096:1M-2M; eio-fraction=0.25; iops=1000; bps=10M; seed=3")
    assert spec == FaultSpec(
        latency_ns=200 * US, jitter_ns=50 * US,
        stalls=((S, S + 200 * MS), (5 * S, 6 * S)),
        eio_ranges=((0, 4096), (1 << 20, 2 << 20)),
        eio_fraction=0.25, iops=1000, bps=10 << 20, seed=3)


@pytest.mark.parametrize(("text", "msg"), [
    ("bogus=1", "Invalid parameter 'faults.bogus'"),
    ("latency=fast", "invalid duration 'fast'"),
    ("eio-fraction=2", "Parameter 'faults.eio-fraction' expects a number "
                       "between 0 and 1"),
    ("eio=12", "invalid range '12'"),
    ("latency", "invalid fault option 'latency'"),
])
def test_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(ConfigError) as exc:
        FaultSpec.parse(text)
    assert str(exc.value) == msg


class Recorder:
    """A downstream engine in virtual time: completes after ``service``.

    The boundary under test is the injector's; the engine behind it is
    replaced by one whose timing the test controls exactly.
    """

    def __init__(self, ctx: Any, clock: VirtualClock,
                 service_ns: int = 0) -> None:
        self.ctx, self.clock, self.service_ns = ctx, clock, service_ns
        self.started: list[tuple[int, int]] = []   # (time, offset)

    def __call__(self, req: RawAIOCB, cb: CompletionCB) -> None:
        self.started.append((self.clock.now_ns(), req.offset))
        t = self.ctx.timer_new_ns(lambda: cb(0))
        t.mod_ns(self.clock.now_ns() + self.service_ns)


@pytest.fixture
def vctx() -> Iterator[tuple[Any, VirtualClock]]:
    clock = VirtualClock(10 * S)
    ctx = make_context(clock=clock)
    yield ctx, clock
    ctx.close()


def _step(ctx: Any, clock: VirtualClock, to_ns: int) -> None:
    clock.set(to_ns)
    for _ in range(3):
        ctx.aio_poll(False)


def _req(off: int, n: int = 4096) -> RawAIOCB:
    return RawAIOCB(AioType.READ, -1, off, n)


def _completions(spec: FaultSpec, ctx: Any, clock: VirtualClock,
                 rec: Recorder, n: int, until_ns: int, step_ns: int
                 ) -> list[tuple[int, int]]:
    inj = FaultInjector(spec, rec)
    inj.attach(ctx)
    done: list[tuple[int, int]] = []
    for i in range(n):
        inj.submit(_req(i * 4096),
                   lambda ret, i=i: done.append((clock.now_ns(), i)))
    t = clock.now_ns()
    while t < until_ns:
        t += step_ns
        _step(ctx, clock, t)
    inj.detach()
    return done


def test_fixed_latency_is_exact_and_keeps_order(vctx: Any) -> None:
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock, service_ns=10 * US)
    done = _completions(FaultSpec(latency_ns=200 * US), ctx, clock, rec,
                        3, t0 + MS, US)
    # Engine done at t0+10us, then 200 us more; order kept.
    assert done == [(t0 + 210 * US, 0), (t0 + 210 * US, 1),
                    (t0 + 210 * US, 2)]


def test_stall_holds_completions_to_the_window_end(vctx: Any) -> None:
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock, service_ns=1500 * US)
    # Window [1 ms, 3 ms) after attach; the engine finishes at 1.5 ms.
    done = _completions(FaultSpec(stalls=((MS, 3 * MS),)), ctx, clock,
                        rec, 2, t0 + 5 * MS, 100 * US)
    assert done == [(t0 + 3 * MS, 0), (t0 + 3 * MS, 1)]


def test_iops_throttle_starts_requests_in_order(vctx: Any) -> None:
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock)
    done = _completions(FaultSpec(iops=1000), ctx, clock, rec, 4,
                        t0 + 5 * MS, 100 * US)
    assert rec.started == [(t0, 0), (t0 + MS, 4096), (t0 + 2 * MS, 8192),
                           (t0 + 3 * MS, 12288)]
    assert [i for _, i in done] == [0, 1, 2, 3]


def test_bandwidth_throttle(vctx: Any) -> None:
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock)
    # 4 KiB at 4 MiB/s: one request per 976_562.5 ns, rounded per step.
    _completions(FaultSpec(bps=4 << 20), ctx, clock, rec, 3,
                 t0 + 3 * MS, 1 * US)
    assert [t - t0 for t, _ in rec.started] == [0, 977 * US, 1954 * US]


def test_random_latency_is_repeatable(vctx: Any) -> None:
    ctx, clock = vctx
    t0 = clock.now_ns()
    spec = FaultSpec(latency_ns=100 * US, jitter_ns=100 * US, seed=11)
    done = _completions(spec, ctx, clock, Recorder(ctx, clock), 5,
                        t0 + MS, US)
    rng = random.Random(11)
    # The engine's timer fires on the first 1 us step; the release time
    # adds 100 us plus the seeded draw; the release happens on the first
    # step at or after it.
    base = t0 + US + 100 * US
    want = sorted((base + rng.randint(0, 100 * US), i) for i in range(5))
    assert [(-(-(t - t0) // US) * US + t0, i) for t, i in want] == done


def test_regression_overlapping_stalls_hold_to_the_last_end(
        vctx: Any) -> None:
    """A window's end inside an earlier-listed window was let through.

    With stalls [2, 4) ms and [0, 3) ms, an engine done at 1 ms was
    moved to 3 ms, which the first window covers: it must wait to 4 ms.
    """
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock, service_ns=MS)
    spec = FaultSpec(stalls=((2 * MS, 4 * MS), (0, 3 * MS)))
    done = _completions(spec, ctx, clock, rec, 1, t0 + 6 * MS, 100 * US)
    assert done == [(t0 + 4 * MS, 0)]


def test_regression_reattach_resumes_held_and_throttled(
        vctx: Any) -> None:
    """Requests held at detach were never released after re-attach."""
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock)
    inj = FaultInjector(FaultSpec(iops=1000, latency_ns=500 * US), rec)
    inj.attach(ctx)
    done: list[tuple[int, int]] = []
    for i in range(3):
        inj.submit(_req(i * 4096),
                   lambda ret, i=i: done.append((clock.now_ns(), i)))
    _step(ctx, clock, t0)
    # Request 0 started and its engine finished; its release is held.
    assert rec.started == [(t0, 0)] and len(inj.held) == 1
    assert len(inj.throttled) == 2
    inj.detach()
    inj.attach(ctx)
    for t in range(1, 31):
        _step(ctx, clock, t0 + t * 100 * US)
    inj.detach()
    assert [i for _, i in done] == [0, 1, 2]
    assert done[0] == (t0 + 500 * US, 0)
    assert [t - t0 for t, _ in rec.started] == [0, MS, 2 * MS]


@pytest.mark.parametrize("key", ["iops", "seed"])
def test_regression_bad_integer_option_is_a_config_error(key: str) -> None:
    """``iops=fast`` escaped as a bare ValueError."""
    for bad in ("fast", "-3"):
        with pytest.raises(ConfigError) as exc:
            FaultSpec.parse(f"{key}={bad}")
        assert str(exc.value) == (f"Parameter 'faults.{key}' expects a "
                                  "non-negative integer")


@pytest.fixture
def image(workdir: Path) -> Path:
    return create_pattern_image(workdir / "f.img", 1 << 20, seed=2).path


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
def test_injected_eio_hits_exactly_the_chosen_requests(
        image: Path, ctx: Any, aio: str) -> None:
    node = open_blockdev({
        "driver": "file", "filename": str(image), "aio": aio,
        "cache.direct": "on", "faults.eio": "8192+4096:64k-68k",
        "faults.eio-fraction": "0.2", "faults.seed": "5"})
    node.attach_aio_context(ctx)
    try:
        views = [aligned_buffer(4096) for _ in range(40)]
        w = Waiter()
        for i in range(40):
            node.preadv(i * 4096, [views[i]], w.cb(i))
        run_until(ctx, w.done(40))
        rng = random.Random(5)
        want = {}
        for i in range(40):
            in_range = i * 4096 in (8192, 65536)
            hit = in_range or rng.random() < 0.2
            want[i] = -errno.EIO if hit else 0
        assert w.results == want
        assert node.faults.injected_eio == sum(
            1 for v in want.values() if v)
        for i, ret in w.results.items():
            if ret == 0:
                assert first_mismatch(views[i], i * 4096, seed=2) is None
        # Writes and write-zeroes in the range fail too; FLUSH never.
        node.pwritev(8192, [views[0]], w.cb("w"))
        node.pwrite_zeroes(65536, 512, False, w.cb("z"))
        node.flush(w.cb("f"))
        run_until(ctx, w.done(43))
        assert (w.results["w"], w.results["z"], w.results["f"]) == (
            -errno.EIO, -errno.EIO, 0)
    finally:
        node.close()


def test_regression_late_timer_never_releases_inside_a_stall(
        vctx: Any) -> None:
    """A release timer firing late let completions out inside a stall.

    latency 100 us, stall [1.2, 2.1) ms, iops 1000, three reads, a loop
    that looks only at 0, 1 and 2 ms, then every 100 us: request 0 goes
    at 1 ms (late, but before the window); request 1, throttled to 1 ms,
    is due at 1.1 ms, and its late timer released it at 2 ms, inside the
    window.  It must wait for the window's end, and request 2 (started
    at 2 ms, due at 2.1 ms) comes after it.
    """
    ctx, clock = vctx
    t0 = clock.now_ns()
    rec = Recorder(ctx, clock)
    spec = FaultSpec(latency_ns=100 * US, stalls=((1200 * US, 2100 * US),),
                     iops=1000)
    inj = FaultInjector(spec, rec)
    inj.attach(ctx)
    done: list[tuple[int, int]] = []
    for i in range(3):
        inj.submit(_req(i * 4096),
                   lambda ret, i=i: done.append((clock.now_ns() - t0, i)))
    for t in [0, MS, 2 * MS] + [2 * MS + k * 100 * US for k in range(1, 20)]:
        _step(ctx, clock, t0 + t)
    inj.detach()
    assert done == [(MS, 0), (2100 * US, 1), (2100 * US, 2)]
