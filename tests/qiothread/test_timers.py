"""Timers on the context clock (reference §4.1, §4.9)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qiothread.aio import AioContext
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier

from .aio_helpers import ScriptedMonitor, scripted

VCtx = tuple[AioContext, ScriptedMonitor]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vctx(fdmon: str, vclock: VirtualClock) -> Iterator[VCtx]:
    ctx = AioContext(fdmon=fdmon, clock=vclock)
    mon = scripted(ctx, vclock)
    e = EventNotifier()
    ctx.set_event_notifier(e, e.test_and_clear)
    ctx.aio_poll(False)
    yield ctx, mon
    ctx.close()
    e.close()


def test_deadline_is_the_wait_timeout(
        vctx: VCtx, vclock: VirtualClock) -> None:
    ctx, mon = vctx
    fired: list[int] = []
    t = ctx.timer_new_ns(lambda: fired.append(vclock.now_ns()))
    start = vclock.now_ns()
    t.mod_ns(start + 250_000)
    ctx.aio_poll(False)                 # accept the timer's notify
    mon.waits.clear()
    mon.default_ns = 10**12
    assert ctx.aio_poll(True) is True
    assert mon.waits == [(250_000, 250_000)]
    assert fired == [start + 250_000]
    assert not t.pending()


def test_expired_timers_run_in_expiry_order_after_handlers(
        vctx: VCtx, vclock: VirtualClock) -> None:
    ctx, _ = vctx
    order: list[str] = []
    now = vclock.now_ns()
    for name, at in (("c", 30), ("a", 10), ("b", 20), ("b2", 20)):
        ctx.timer_new_ns(lambda n=name: order.append(n)).mod_ns(now + at)
    ctx.bh_new(lambda: order.append("bh")).schedule()
    vclock.advance(25)
    assert ctx.aio_poll(False)
    assert order == ["bh", "a", "b", "b2"]
    vclock.advance(5)
    ctx.aio_poll(False)
    assert order[-1] == "c"


def test_arming_earlier_notifies_later_does_not(
        vctx: VCtx, vclock: VirtualClock) -> None:
    ctx, _ = vctx
    t1 = ctx.timer_new_ns(lambda: None)
    t2 = ctx.timer_new_ns(lambda: None)
    t1.mod_ns(vclock.now_ns() + 1000)
    assert ctx.notified
    ctx.aio_poll(False)
    assert not ctx.notified
    t2.mod_ns(vclock.now_ns() + 5000)   # not the earliest: no notify
    assert not ctx.notified
    t2.mod_ns(vclock.now_ns() + 10)     # now it is
    assert ctx.notified


def test_timer_may_rearm_itself(vctx: VCtx, vclock: VirtualClock) -> None:
    ctx, _ = vctx
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(vclock.now_ns())
        if len(ticks) < 3:
            t.mod_ns(vclock.now_ns() + 100)

    t = ctx.timer_new_ns(tick)
    t.mod_ns(vclock.now_ns() + 100)
    for _ in range(3):
        vclock.advance(100)
        ctx.aio_poll(False)
    assert len(ticks) == 3 and ticks[2] - ticks[0] == 200


def test_del_disarms(vctx: VCtx, vclock: VirtualClock) -> None:
    ctx, _ = vctx
    ran: list[int] = []
    t = ctx.timer_new_ns(lambda: ran.append(1))
    t.mod_ns(vclock.now_ns() + 10)
    t.del_()
    t.del_()
    vclock.advance(100)
    assert ctx.aio_poll(False) is False
    assert ran == [] and ctx._timers.deadline_ns() == -1


def test_real_clock_timer_wakes_blocking_poll(ctx: AioContext) -> None:
    fired: list[int] = []
    t = ctx.timer_new_ns(lambda: fired.append(ctx.clock.now_ns()))
    start = ctx.clock.now_ns()
    t.mod_ns(start + 2_000_000)
    while not fired:
        ctx.aio_poll(True)
    # ppoll's ns timeout: never early.
    assert fired[0] >= start + 2_000_000
