"""Bottom halves (reference §4.1, §4.8; invariant (e))."""

from __future__ import annotations

import threading

import pytest

from qiothread.aio import AioContext
from qiothread.bh import IDLE_BH_TIMEOUT_NS, BHFlags
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier

from .aio_helpers import scripted

pytestmark = pytest.mark.timeout(60)


def test_flags_have_qemus_values() -> None:
    assert [int(f) for f in BHFlags] == [1, 2, 4, 8, 16]
    assert [f.name for f in BHFlags] == [
        "PENDING", "SCHEDULED", "DELETED", "ONESHOT", "IDLE"]


def test_lifo_within_a_slice(ctx: AioContext) -> None:
    order: list[str] = []
    bhs = [ctx.bh_new(lambda n=n: order.append(n), n) for n in "abc"]
    for bh in bhs:
        bh.schedule()
    assert ctx.aio_poll(False) is True
    assert order == ["c", "b", "a"]


def test_double_schedule_runs_once(ctx: AioContext) -> None:
    n = [0]
    bh = ctx.bh_new(lambda: n.__setitem__(0, n[0] + 1))
    bh.schedule()
    bh.schedule()
    ctx.aio_poll(False)
    ctx.aio_poll(False)
    assert n == [1]


def test_e_bh_scheduled_during_dispatch_runs_next_iteration(
        ctx: AioContext) -> None:
    """Invariant (e): a BH scheduled while BHs run waits a round."""
    order: list[str] = []
    second = ctx.bh_new(lambda: order.append("second"))

    def first_cb() -> None:
        order.append("first")
        second.schedule()

    ctx.bh_new(first_cb).schedule()
    assert ctx.aio_poll(False)
    assert order == ["first"]
    assert ctx.aio_poll(False)
    assert order == ["first", "second"]


def test_e_bhs_run_before_fd_handlers(ctx: AioContext) -> None:
    """Invariant (e): in one aio_poll, BHs first, then handlers."""
    e = EventNotifier()
    order: list[str] = []
    try:
        # No io_poll: need_wait is true, so the fd monitor is asked even
        # though the pending BH makes the timeout 0.
        ctx.set_event_notifier(
            e, lambda: (order.append("fd"), e.test_and_clear()))
        ctx.aio_poll(False)
        e.set()
        ctx.bh_new(lambda: order.append("bh")).schedule()
        assert ctx.aio_poll(True) is True
        assert order == ["bh", "fd"]
    finally:
        ctx.set_event_notifier(e, None)
        e.close()


def test_e_idle_bh_caps_timeout_and_is_not_progress(fdmon: str) -> None:
    """Invariant (e): an idle BH caps the wait at 10 ms; not progress."""
    clock = VirtualClock(0)
    ctx = AioContext(fdmon=fdmon, clock=clock)
    mon = scripted(ctx, clock)
    e = EventNotifier()
    try:
        ctx.set_event_notifier(e, e.test_and_clear)   # forces the wait
        ctx.aio_poll(False)
        ran: list[int] = []
        ctx.bh_new(lambda: ran.append(1)).schedule_idle()
        assert ctx._compute_timeout() == IDLE_BH_TIMEOUT_NS
        # The schedule notified; with that accepted (as after a wait that
        # did not reach the BHs), the idle BH alone bounds the sleep.
        ctx.notify_accept()
        mon.waits.clear()
        mon.default_ns = 10**12                      # "sleep forever"
        assert ctx.aio_poll(True) is False
        assert ran == [1]
        assert mon.waits == [(IDLE_BH_TIMEOUT_NS, IDLE_BH_TIMEOUT_NS)]
        assert ctx._compute_timeout() == -1
    finally:
        ctx.close()
        e.close()


def test_normal_bh_makes_timeout_zero(ctx: AioContext) -> None:
    idle = ctx.bh_new(lambda: None)
    idle.schedule_idle()
    idle.schedule()     # flags are OR-ed in: it stays idle, as in QEMU
    assert ctx._compute_timeout() == IDLE_BH_TIMEOUT_NS
    ctx.bh_new(lambda: None).schedule()
    assert ctx._compute_timeout() == 0


def test_cancel_and_delete(ctx: AioContext) -> None:
    ran: list[str] = []
    a = ctx.bh_new(lambda: ran.append("a"))
    b = ctx.bh_new(lambda: ran.append("b"))
    a.schedule()
    a.cancel()
    assert ctx._compute_timeout() != 0
    b.schedule()
    b.delete()
    assert ctx.aio_poll(False) is False
    assert ran == []
    a.schedule()                    # a cancelled BH can run again
    assert ctx.aio_poll(False) is True
    assert ran == ["a"]


def test_oneshot_runs_once(ctx: AioContext) -> None:
    ran: list[int] = []
    ctx.bh_schedule_oneshot(lambda: ran.append(1))
    ctx.aio_poll(False)
    ctx.aio_poll(False)
    assert ran == [1]
    assert not ctx._bhs.bh_list and not ctx._bhs.slices


def test_nested_bh_poll_drains_the_parent_slice(ctx: AioContext) -> None:
    order: list[str] = []

    def nester() -> None:
        order.append("nester")
        ctx.aio_poll(False)             # nested: runs "a" from our slice

    a = ctx.bh_new(lambda: order.append("a"))
    n = ctx.bh_new(nester)
    a.schedule()
    n.schedule()                        # LIFO: nester runs first
    ctx.aio_poll(False)
    assert order == ["nester", "a"]


def test_schedule_from_another_thread_wakes_blocked_poll(
        ctx: AioContext) -> None:
    ran = threading.Event()
    bh = ctx.bh_new(ran.set)
    ctx.aio_poll(False)
    t = threading.Timer(0.05, bh.schedule)
    t.start()
    deadline = 0
    while not ran.is_set():
        ctx.aio_poll(True)
        deadline += 1
        assert deadline < 100
    t.join()
