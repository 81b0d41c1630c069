"""Property: injected faults never lose, duplicate or reorder others.

Hypothesis draws a fault spec (latency, stall windows, EIO ranges, an
EIO fraction, an IOPS or bandwidth throttle) and a stream of requests
with submission times, and runs them in virtual time through a
FaultInjector whose downstream engine serves requests in order after a
fixed service time.  Every quantity is a multiple of 100 µs and the
clock jumps from one timer deadline to the next, so every completion
time is exact.  A drawn loop grain makes the loop look at the clock
only every so many ticks, as a busy iothread does: timers then fire
late.  What must hold for every draw:

- each request completes exactly once;
- a request overlapping an EIO range fails with -EIO and never reaches
  the engine; with no EIO fraction, every other request succeeds;
- the engine sees the surviving requests in submission order, and they
  complete in that order (a fixed latency and a stall cannot reorder);
- no completion lands inside a stall window, and none comes before its
  submission plus the fixed latency.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockdev.faults import FaultInjector, FaultSpec
from blockdev.raw_aio import AioType, CompletionCB, RawAIOCB
from qiothread.clock import VirtualClock
from tests.blockdev.conftest import make_context

TICK = 100_000          # 100 µs: the grain of every drawn time
BLOCK = 4096
T0 = 1_000_000_000


class FifoEngine:
    """Serves requests in arrival order, ``service_ns`` each, in parallel.

    Arrivals are in non-decreasing time and the service time is fixed,
    so completions keep arrival order.
    """

    def __init__(self, ctx: Any, clock: VirtualClock,
                 service_ns: int) -> None:
        self.ctx, self.clock, self.service_ns = ctx, clock, service_ns
        self.arrivals: list[int] = []

    def __call__(self, req: RawAIOCB, cb: CompletionCB) -> None:
        self.arrivals.append(req.offset // BLOCK)
        t = self.ctx.timer_new_ns(lambda: cb(0))
        t.mod_ns(self.clock.now_ns() + self.service_ns)


ticks = st.integers(min_value=0, max_value=40).map(lambda n: n * TICK)

specs = st.builds(
    FaultSpec,
    latency_ns=ticks,
    stalls=st.lists(
        st.tuples(st.integers(0, 80), st.integers(1, 40)).map(
            lambda w: (w[0] * TICK, (w[0] + w[1]) * TICK)),
        max_size=3).map(tuple),
    eio_ranges=st.lists(
        st.tuples(st.integers(0, 63), st.integers(1, 8)).map(
            lambda r: (r[0] * BLOCK, (r[0] + r[1]) * BLOCK)),
        max_size=2).map(tuple),
    eio_fraction=st.sampled_from([0.0, 0.0, 0.3]),
    # Costs of 1 ms .. 100 µs per request, or 100/200 µs per 4 KiB.
    iops=st.sampled_from([0, 0, 1000, 5000, 10000]),
    bps=st.sampled_from([0, 0, BLOCK * 10000, BLOCK * 5000]),
    seed=st.integers(0, 3),
)

# (gap before submission in ticks, first block, blocks, op)
requests = st.lists(
    st.tuples(st.integers(0, 8), st.integers(0, 63), st.integers(1, 4),
              st.sampled_from([AioType.READ, AioType.WRITE,
                               AioType.FLUSH])),
    min_size=1, max_size=25)


def _run(spec: FaultSpec, reqs: list[tuple[int, int, int, AioType]],
         service_ticks: int, grain_ticks: int = 1
         ) -> tuple[dict[int, tuple[int, int]], list[int], list[int],
                    FaultInjector]:
    clock = VirtualClock(T0)
    ctx = make_context(clock=clock)
    try:
        engine = FifoEngine(ctx, clock, service_ticks * TICK)
        inj = FaultInjector(spec, engine)
        inj.attach(ctx)
        done: dict[int, tuple[int, int]] = {}
        order: list[int] = []
        submit_at: list[int] = []

        def completion(i: int) -> Callable[[int], None]:
            def cb(ret: int) -> None:
                assert i not in done, f"request {i} completed twice"
                done[i] = (clock.now_ns(), ret)
                order.append(i)
            return cb

        t = T0
        for i, (gap, block, nblocks, op) in enumerate(reqs):
            t += gap * TICK
            _advance(ctx, clock, t, grain_ticks)
            submit_at.append(clock.now_ns())
            # The block index doubles as the request's identity downstream.
            inj.submit(RawAIOCB(op, -1, block * BLOCK, nblocks * BLOCK),
                       completion(i))
        for _ in range(100_000):
            if len(done) == len(reqs):
                break
            deadline = ctx._timers.deadline_ns()
            ctx.aio_poll(False)
            if deadline > 0:
                clock.set(_on_grain(clock.now_ns() + deadline,
                                    grain_ticks))
        inj.detach()
        return done, order, submit_at, inj
    finally:
        ctx.close()


def _on_grain(t: int, grain_ticks: int) -> int:
    """The first time at or after ``t`` that the loop looks."""
    grain = grain_ticks * TICK
    return T0 + -(-(t - T0) // grain) * grain


def _advance(ctx: Any, clock: VirtualClock, to_ns: int,
             grain_ticks: int) -> None:
    """Run every timer due up to ``to_ns``, each at the first time the
    loop looks after it is due."""
    while True:
        for _ in range(3):
            ctx.aio_poll(False)
        deadline = ctx._timers.deadline_ns()
        if deadline < 0:
            break
        at = _on_grain(clock.now_ns() + deadline, grain_ticks)
        if at > to_ns:
            break
        clock.set(at)
    clock.set(to_ns)
    for _ in range(3):
        ctx.aio_poll(False)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, reqs=requests, service_ticks=st.integers(1, 10),
       grain_ticks=st.sampled_from([1, 1, 3, 10]))
# The review's case: with a loop that looks every 1 ms, completions due
# before the stall were let out at 2 ms, inside it (see
# test_regression_late_timer_never_releases_inside_a_stall).
@example(spec=FaultSpec(latency_ns=100_000, stalls=((1_200_000, 2_100_000),),
                        iops=1000),
         reqs=[(0, 0, 1, AioType.READ)] * 3, service_ticks=1,
         grain_ticks=10)
def test_faults_never_lose_or_reorder_other_requests(
        spec: FaultSpec, reqs: list[tuple[int, int, int, AioType]],
        service_ticks: int, grain_ticks: int) -> None:
    # Unique blocks, so the engine's log names each request.
    reqs = [(g, i, n, op) for i, (g, _, n, op) in enumerate(reqs)]
    done, order, submit_at, inj = _run(spec, reqs, service_ticks,
                                       grain_ticks)

    assert sorted(done) == list(range(len(reqs))), "a request was lost"

    def overlaps(i: int) -> bool:
        _, block, n, op = reqs[i]
        lo, hi = block * BLOCK, (block + n) * BLOCK
        return op != AioType.FLUSH and any(
            lo < b and a < hi for a, b in spec.eio_ranges)

    failed = {i for i, (_, ret) in done.items() if ret == -errno.EIO}
    assert all(ret in (0, -errno.EIO) for _, ret in done.values())
    assert {i for i in done if overlaps(i)} <= failed
    if spec.eio_fraction == 0.0:
        assert failed == {i for i in done if overlaps(i)}
    assert inj.injected_eio == len(failed)

    survivors = [i for i in range(len(reqs)) if i not in failed]
    engine_saw = [b for b in _arrivals(inj)]
    assert engine_saw == survivors, "engine saw requests out of order"
    assert [i for i in order if i not in failed] == survivors, \
        "completions reordered"

    for i, (when, _) in done.items():
        assert when >= submit_at[i] + spec.latency_ns
        for lo, hi in spec.stalls:
            assert not inj.t0 + lo <= when < inj.t0 + hi, (
                f"request {i} completed at {when - inj.t0} inside "
                f"stall [{lo}, {hi})")


def _arrivals(inj: FaultInjector) -> list[int]:
    engine = inj.downstream
    assert isinstance(engine, FifoEngine)
    return engine.arrivals
