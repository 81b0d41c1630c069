"""The polling policies in virtual time, on a real AioContext.

Each version's test reproduces the situation that motivated its change
(reference §20, §24; published-results B3, B5) and checks the effect
with exact counts.  The world (tests/policies/vworld.py) scripts only
the guest, the backend and the passing of time; the loop, its BHs,
eventfds, ppoll and the policies are the real ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest

from qiothread.aio import AioContext
from qiothread.defer_call import defer_call, deferred_calls
from qiothread.event_notifier import EventNotifier
from qiothread.policies import (
    POLICY_NAMES,
    GuestNotify,
    Policy80,
    Policy82,
    Policy100,
    PolicyWeighted,
    guest_notify_mode,
    make_policy_from_props,
)
from qiothread.policy import Policy72, PollModeEnd, make_policy, policy_names

from .vworld import (
    ModelCompletions,
    ModelQueue,
    World,
    run_until,
    world_ctx,
)

# ----------------------------------------------------------------------
# Registry and properties


def test_every_version_name_makes_its_policy() -> None:
    classes = {"7.2": Policy72, "8.0": Policy80, "8.2": Policy82,
               "10.0": Policy100, "weighted": PolicyWeighted}
    for name in POLICY_NAMES:
        p = make_policy(name)
        assert type(p) is classes[name]
        assert p.name == name
    assert set(POLICY_NAMES) <= set(policy_names())


def test_what_each_version_changes() -> None:
    assert Policy72.poll_mode_end is PollModeEnd.IN_TRY_POLL_MODE
    for cls in (Policy80, Policy82, Policy100, PolicyWeighted):
        assert cls.poll_mode_end is PollModeEnd.BEFORE_WAIT
    assert not Policy80.per_handler and not Policy82.per_handler
    assert Policy100.per_handler and PolicyWeighted.per_handler
    assert guest_notify_mode(make_policy("7.2")) is GuestNotify.BH
    assert guest_notify_mode(make_policy("8.0")) is GuestNotify.BH
    assert guest_notify_mode(make_policy("8.2")) is GuestNotify.DEFER_CALL


def test_poll_weight_zero_means_three() -> None:
    p = make_policy_from_props("weighted")
    assert isinstance(p, PolicyWeighted)
    assert (p.weight, p.shift) == (0, 3)
    p = make_policy_from_props("weighted", 1)
    assert isinstance(p, PolicyWeighted)
    assert (p.weight, p.shift) == (1, 1)


def test_bad_policy_properties_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown polling policy '9\.9'"):
        make_policy_from_props("9.9")
    with pytest.raises(ValueError, match=r"poll-weight must be in \[0, 62"):
        make_policy_from_props("weighted", -1)
    with pytest.raises(ValueError, match="poll-weight must be in"):
        make_policy_from_props("weighted", 63)
    with pytest.raises(ValueError, match="poll-weight must be in"):
        make_policy_from_props("10.0", 99)
    # Accepted, and without effect, by the policies that have no weight.
    assert type(make_policy_from_props("10.0", 2)) is Policy100


# ----------------------------------------------------------------------
# 8.0: poll mode ends only before a wait (B3)


def _bh_heavy(policy: str) -> tuple[int, int, int]:
    """Thread-pool completions every 10 µs, guest requests every 2 µs.

    Per completion the pool's completion BH runs the request's callback
    (1 µs) and reschedules itself, as ``thread_pool_completion_bh``
    does; the callback schedules virtio-blk 7.2's notification BH,
    which writes the guest notifier (1.5 µs) in the next iteration.
    That iteration has a zero timeout.  7.2 ends poll mode in it, so
    the virtqueue's notifications are on while the BH runs and the
    guest kicks; 8.0 keeps poll mode on.

    Returns (guest kicks, guest interrupts, poll-mode ends).
    """
    world = World(poll_cost_ns=100)
    ctx = world_ctx(world, policy)
    vq = ModelQueue(world, ctx, lambda: None, cost_ns=300)
    ends = 0
    inner_end = vq._poll_end

    def counting_end() -> None:
        nonlocal ends
        ends += 1
        inner_end()

    ctx.set_event_notifier_poll(vq.host_notifier, vq._poll_begin,
                                counting_end)
    done = 0
    irqs = 0

    def notify_bh() -> None:
        nonlocal irqs
        world.advance(1500)
        irqs += 1

    nbh = ctx.bh_new(notify_bh, "virtio-blk-notify")

    def completion_bh() -> None:
        nonlocal done
        while done:
            done -= 1
            cbh.schedule()
            world.advance(1000)
            nbh.schedule()

    cbh = ctx.bh_new(completion_bh, "thread-pool-completion")

    def worker_done() -> None:
        nonlocal done
        done += 1
        cbh.schedule()              # from a worker: aio_notify

    t0 = world.now
    for k in range(1, 201):
        world.at(t0 + 10_000 * k + 500, worker_done)
    for k in range(1, 1000):
        world.at(t0 + 2_000 * k, vq.guest_submit)
    run_until(ctx, world, t0 + 2_000_000)
    assert vq.popped == 999
    vq.close()
    ctx.close()
    return vq.kicks, irqs, ends


def test_late_poll_end_cuts_guest_kicks_under_bh_load() -> None:
    kicks72, irqs72, ends72 = _bh_heavy("7.2")
    kicks80, irqs80, ends80 = _bh_heavy("8.0")
    # The same 199 completions interrupt the guest under both.
    assert irqs72 == irqs80 == 199
    # 8.0: one kick, for the first request, before the queue's handler
    # had fired and joined the poll set; poll mode never ends after
    # that, because the loop never has to block.
    assert (kicks80, ends80) == (1, 0)
    # 7.2: poll mode ends in every zero-timeout iteration that follows
    # a completion, and the 1.5 µs notify BH of each one overlaps one
    # guest request (2 µs apart): a kick per completion.
    assert kicks72 == 1 + irqs72 == 200
    assert ends72 >= irqs72


# ----------------------------------------------------------------------
# 8.2: guest notifications deferred and batched


class _Guest:
    """The guest side of the guest notifier (the irqfd)."""

    def __init__(self) -> None:
        self.irqfd = EventNotifier()
        self.writes = 0

    def notify_irqfd(self) -> None:
        """``virtio_notify_irqfd``: one eventfd write."""
        self.writes += 1
        self.irqfd.set()


def _batched_completions(policy: str) -> tuple[int, int]:
    """Four thread-pool completions at once, every 40 µs, EVENT_IDX on.

    7.2 - 8.1 with EVENT_IDX have no notification BH: each completed
    request notifies the guest (the guest asks for every interrupt
    here).  8.2 defers the irqfd write and runs the pool's completion
    processing inside a defer section, so one write covers the batch.

    Returns (irqfd writes, requests completed).
    """
    world = World(poll_cost_ns=100)
    ctx = world_ctx(world, policy)
    guest = _Guest()
    mode = guest_notify_mode(ctx.policy)
    done = 0
    completed = 0

    def complete_request() -> None:
        nonlocal completed
        completed += 1
        world.advance(500)
        if mode is GuestNotify.DEFER_CALL:
            defer_call(guest.notify_irqfd)
        else:
            guest.notify_irqfd()

    def completion_bh() -> None:
        nonlocal done
        while done:
            done -= 1
            cbh.schedule()
            complete_request()

    def completion_bh_82() -> None:
        with deferred_calls():
            completion_bh()

    cbh = ctx.bh_new(completion_bh_82 if mode is GuestNotify.DEFER_CALL
                     else completion_bh)

    def batch_done() -> None:
        nonlocal done
        done += 4
        cbh.schedule()

    t0 = world.now
    for k in range(1, 51):
        world.at(t0 + 40_000 * k, batch_done)
    run_until(ctx, world, t0 + 2_100_000)
    guest.irqfd.close()
    ctx.close()
    return guest.writes, completed


def test_deferred_guest_notifications_batch_per_completion_run() -> None:
    assert _batched_completions("7.2") == (200, 200)
    assert _batched_completions("8.0") == (200, 200)
    assert _batched_completions("8.2") == (50, 200)


# ----------------------------------------------------------------------
# 10.0: per-handler polling time


def _slow_backend_qd1(policy: str) -> tuple[ModelQueue, ModelCompletions,
                                             AioContext]:
    """QD1: backend latency 200 µs, the guest resubmits 3 µs later."""
    world = World(poll_cost_ns=100)
    ctx = world_ctx(world, policy)
    backend: ModelCompletions | None = None

    def submit() -> None:
        assert backend is not None
        backend.submit()

    vq = ModelQueue(world, ctx, submit, cost_ns=500)
    backend = ModelCompletions(
        world, ctx, lambda: world.after(3000, vq.guest_submit),
        latency_ns=200_000)
    t0 = world.now
    world.at(t0 + 1000, vq.guest_submit)
    run_until(ctx, world, t0 + 20_000_000)
    return vq, backend, ctx


@pytest.fixture
def closing() -> Iterator[list[object]]:
    things: list[object] = []
    yield things
    for t in things:
        t.close()  # type: ignore[attr-defined]


def test_per_handler_polling_keeps_the_virtqueue_polled(
        closing: list[object]) -> None:
    vq72, be72, ctx72 = _slow_backend_qd1("7.2")
    vq10, be10, ctx10 = _slow_backend_qd1("10.0")
    closing += [vq72, be72, ctx72, vq10, be10, ctx10]
    assert be72.completed == be10.completed == 99
    # 7.2: each 200 µs wait shrinks the one budget to 0 just before the
    # guest's next request, which therefore always arrives by a kick.
    assert (vq72.polled, vq72.by_fd, vq72.kicks) == (0, 99, 99)
    # 10.0: the queue keeps its own 4 µs budget; only the first request
    # (before the queue joined the poll set) was kicked.
    assert (vq10.polled, vq10.by_fd, vq10.kicks) == (98, 1, 1)
    # The backend's own budget stays 0: no polling is wasted on it
    # beyond the queue's 4 µs, and it is always found by its eventfd.
    assert ctx10.policy.handler_poll_ns(ctx10) == {  # type: ignore
        vq10.host_notifier.fileno(): 4000,
        be10.notifier.fileno(): 0}
    assert (be72.polled, be10.polled) == (0, 0)


def _step(ctx: AioContext) -> None:
    ctx.aio_poll(True)
    flush = getattr(ctx.policy, "flush", None)
    if flush is not None:
        flush(ctx)


class _Scripted:
    """Two handlers whose events come at scripted gaps.

    ``gaps`` is a list of (handler index, ns after the previous event
    was dispatched); handlers cost nothing to run, a poll pass over both
    costs 2 x 100 ns.
    """

    def __init__(self, policy: str,
                 gaps: list[tuple[int, int]], *,
                 shrink: int = 0, handlers: int = 2) -> None:
        self.world = World(poll_cost_ns=100)
        self.ctx = world_ctx(self.world, policy, shrink=shrink)
        self.gaps = list(gaps)
        self.fired: list[int] = []
        self.h = [ModelCompletions(self.world, self.ctx,
                                   self._make_next(i), 0, cost_ns=0)
                  for i in range(handlers)]
        self._schedule_next()
        # Consume the notify of set_poll_params: an iteration with a
        # zero timeout and block_ns 0 (no change under any policy).
        self.ctx.aio_poll(False)

    def _make_next(self, i: int):  # type: ignore[no-untyped-def]
        def on_complete() -> None:
            self.fired.append(i)
            self._schedule_next()
        return on_complete

    def _schedule_next(self) -> None:
        if self.gaps:
            i, gap = self.gaps.pop(0)
            self.world.after(gap, self.h[i]._complete)

    def step(self) -> tuple[int, ...]:
        """One iteration; (ctx budget, each handler's poll_ns)."""
        _step(self.ctx)
        return (self.ctx.poll_ns, *(h.node_poll_ns() for h in self.h))

    def close(self) -> None:
        for h in self.h:
            h.close()
        self.ctx.close()


def test_policy100_adapts_only_the_handler_that_fired() -> None:
    # Handler 0 fires 3 µs apart, handler 1 after long waits.
    s = _Scripted("10.0", [(0, 3000), (1, 100_000), (0, 3000),
                           (1, 50_000), (0, 5000)])
    try:
        trajectory = [s.step() for _ in range(5)]
    finally:
        s.close()
    assert s.fired == [0, 1, 0, 1, 0]
    # (budget = the largest, handler 0, handler 1); with poll-shrink=0 a
    # long block sends only the handler that fired to 0 (0 -> 0 here).
    assert trajectory == [
        (4000, 4000, 0),       # 3 µs block: 0 -> 4000
        (4000, 4000, 0),       # 100 µs > max: handler 1 shrinks 0 -> 0
        (4000, 4000, 0),       # found by polling at 3 µs: sweet spot
        (4000, 4000, 0),       # handler 1 again; handler 0 untouched
        (8000, 8000, 0),       # 5 µs > 4 µs budget: handler 0 grows
    ]


def test_policy72_on_the_same_script_shares_one_budget() -> None:
    s = _Scripted("7.2", [(0, 3000), (1, 100_000), (0, 3000),
                          (1, 50_000), (0, 5000)])
    try:
        budgets = [s.step()[0] for _ in range(5)]
    finally:
        s.close()
    # The long waits for handler 1 reset the one budget each time.
    assert budgets == [4000, 0, 4000, 0, 4000]


def test_policy100_budget_drops_when_the_largest_handler_goes() -> None:
    s = _Scripted("10.0", [(0, 3000), (0, 5000), (1, 3000)])
    try:
        assert [s.step() for _ in range(3)] == [
            (4000, 4000, 0), (8000, 8000, 0), (8000, 8000, 4000)]
        # Deleting handler 0 (8000) leaves handler 1's 4000 in force.
        s.ctx.set_event_notifier(s.h[0].notifier, None)
        assert s.ctx.policy.poll_budget(s.ctx) == 4000
        assert s.ctx.poll_ns == 4000
        # set_poll_params resets every handler.
        s.ctx.set_poll_params(32768, 0, 0)
        assert (s.ctx.poll_ns, s.h[1].node_poll_ns()) == (0, 0)
    finally:
        s.close()


# ----------------------------------------------------------------------
# weighted (§24)


def test_weighted_exact_trajectory_one_handler() -> None:
    """Hand-computed with w = 3, max 32768, grow 2, shrink 2 (module
    text of PolicyWeighted): est' = est - est>>3 + block>>3."""
    gaps = [2000, 3000, 50_000, 1000, 40_000, 200_000, 500]
    s = _Scripted("weighted", [(0, g) for g in gaps], handlers=1)
    try:
        got = [s.step() for _ in gaps]
        counters = s.ctx.policy.counters(s.ctx)  # type: ignore
    finally:
        s.close()
    assert got == [
        (2000, 2000),      # first event: est = block; 0 -> jump to 2000
        (4000, 2125),      # 2000-250+375; 2125 <= 2*2000: doubles
        (8110, 8110),      # 2125-265+6250 > 2*4000: jumps to 8110
        (8110, 7222),      # polled at 1 µs: 8110-1013+125; 7222 >= 4055
        (16220, 11320),    # 7222-902+5000 > 8110: doubles
        (8110, 0),         # 11320-1415+25000 >= max: reset; halves
        (4055, 500),       # polled: est 0 -> 500 < 8110//2: halves
    ]
    assert counters == {"event_updates": 7, "event_resets": 1,
                        "idle_resets": 0}


def test_weighted_idle_handler_accumulates_and_resets() -> None:
    # Handler 0 fires once; handler 1 then fires while 0 stays idle.
    s = _Scripted("weighted", [(0, 5000), (1, 10_000), (1, 20_000),
                               (1, 1000)])
    try:
        got = [s.step() for _ in range(4)]
        counters = s.ctx.policy.counters(s.ctx)  # type: ignore
    finally:
        s.close()
    assert got == [
        (5000, 5000, 0),
        (10000, 15000, 10000),    # idle 0: 5000 + 10000
        (20000, 0, 11250),        # idle 0: 35000 >= max -> 0
        # handler 1 is first in the poll list (it joined last): found
        # at the sixth pass, 1200 ns: 11250 - 1406 + 150 = 9994, and
        # 9994 < 20000 // 2: halves.
        (10000, 0, 9994),
    ]
    assert counters == {"event_updates": 4, "event_resets": 0,
                        "idle_resets": 1}


def _weighted_qd1(weight: int) -> tuple[float, float]:
    """QD1 random reads, exponential service time of mean 40 µs.

    Returns (time-weighted mean poll_ns, share of per-handler updates
    that were reset to 0 at poll-max-ns).
    """
    world = World(poll_cost_ns=100)
    ctx = world_ctx(world, "weighted")
    policy = ctx.policy
    assert isinstance(policy, PolicyWeighted)
    policy.set_weight(weight)
    ctx.set_poll_params(32768, 0, 0)
    rng = random.Random(7)
    backend: ModelCompletions | None = None

    def submit() -> None:
        assert backend is not None
        service = int(-40_000 * math.log(1.0 - rng.random()))
        world.after(service, backend._complete)

    vq = ModelQueue(world, ctx, submit, cost_ns=500)
    backend = ModelCompletions(
        world, ctx, lambda: world.after(3000, vq.guest_submit), 0)
    t0 = world.now
    world.at(t0 + 1000, vq.guest_submit)
    run_until(ctx, world, t0 + 30_000_000)
    policy.flush(ctx)
    mean = ctx.stats.snapshot(world.now)["poll_ns_mean"]
    c = policy.counters(ctx)
    vq.close()
    backend.close()
    ctx.close()
    return mean, c["event_resets"] / c["event_updates"]


def test_weight_raises_mean_poll_ns_and_lowers_the_reset_rate() -> None:
    results = [_weighted_qd1(w) for w in (1, 2, 3, 4)]
    means = [m for m, _ in results]
    resets = [r for _, r in results]
    # B5's direction: a heavier weight holds the budget up and resets
    # less often.
    assert means == sorted(means) and len(set(means)) == 4
    assert resets == sorted(resets, reverse=True)
    assert len(set(resets)) == 4
    assert means[-1] > 1.3 * means[0]
