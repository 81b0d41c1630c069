"""QEMU 7.2's adaptive polling rule, in virtual time (reference §4.5).

The fd monitor is real (ppoll or epoll on real eventfds) but wrapped so
that each wait takes a scripted number of virtual nanoseconds; polling
passes cost virtual time inside the test handler's ``io_poll``.  So
``block_ns`` is known exactly and the ``poll_ns`` sequences are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qiothread.aio import AioContext
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier
from qiothread.policy import Policy72, PollModeEnd, make_policy

from .aio_helpers import (
    ScriptedMonitor,
    captured_trace,
    scripted,
    trace_lines,
)

pytestmark = pytest.mark.timeout(60)


class Rig:
    """A context in virtual time with one handler and a scripted wait."""

    def __init__(self, fdmon: str, pollable: bool) -> None:
        self.clock = VirtualClock(1_000_000_000)
        self.ctx = AioContext(fdmon=fdmon, clock=self.clock)
        self.mon: ScriptedMonitor = scripted(self.ctx, self.clock)
        self.e = EventNotifier()
        if pollable:
            self.ctx.set_event_notifier(self.e, self.e.test_and_clear,
                                        lambda: False, lambda: None)
        else:
            # A handler without io_poll: polling is off for the whole
            # context, but the rule still adapts poll_ns (ref. §21.4).
            self.ctx.set_event_notifier(self.e, self.e.test_and_clear)

    def params(self, max_ns: int = 32768, grow: int = 0,
               shrink: int = 0) -> None:
        self.ctx.set_poll_params(max_ns, grow, shrink)
        self.ctx.aio_poll(False)        # accept the notify; no change

    def blocks(self, *block_ns: int) -> list[int]:
        """Run one blocking iteration per value; poll_ns after each."""
        seq = []
        for b in block_ns:
            self.mon.script.append(b)
            self.ctx.aio_poll(True)
            seq.append(self.ctx.poll_ns)
        return seq

    def close(self) -> None:
        self.ctx.close()
        self.e.close()


@pytest.fixture
def rig(fdmon: str) -> Iterator[Rig]:
    r = Rig(fdmon, pollable=False)
    yield r
    r.close()


def test_default_short_blocks_grow_to_the_cap(rig: Rig) -> None:
    rig.params()
    assert rig.ctx.poll_ns == 0
    seq = rig.blocks(*[32500] * 6)
    assert [0, *seq] == [0, 4000, 8000, 16000, 32000, 32768, 32768]


def test_one_long_block_resets_to_zero(rig: Rig, tmp_path: Path) -> None:
    rig.params()
    rig.blocks(1000, 5000, 9000)
    assert rig.ctx.poll_ns == 16000
    with captured_trace(tmp_path / "t", "poll_*") as p:
        assert rig.blocks(40000) == [0]
        assert rig.blocks(40000) == [0]     # 0 -> 0 still traces
    lines = trace_lines(p)
    me = f"ctx 0x{id(rig.ctx):x}"
    assert lines == [f"poll_shrink {me} old 16000 new 0",
                     f"poll_shrink {me} old 0 new 0"]


def test_poll_shrink_2_halves(rig: Rig) -> None:
    rig.params(shrink=2)
    rig.blocks(*[32500] * 5)
    assert rig.ctx.poll_ns == 32768
    assert rig.blocks(*[10**6] * 4) == [16384, 8192, 4096, 2048]


def test_poll_grow_4(rig: Rig, tmp_path: Path) -> None:
    rig.params(grow=4)
    with captured_trace(tmp_path / "t", "poll_grow") as p:
        assert rig.blocks(*[32500] * 4) == [4000, 16000, 32768, 32768]
    me = f"ctx 0x{id(rig.ctx):x}"
    assert trace_lines(p) == [f"poll_grow {me} old 0 new 4000",
                              f"poll_grow {me} old 4000 new 16000",
                              f"poll_grow {me} old 16000 new 32768"]


def test_block_equal_to_max_changes_nothing(rig: Rig,
                                           tmp_path: Path) -> None:
    rig.params()
    rig.blocks(5000, 9000)
    assert rig.ctx.poll_ns == 8000
    with captured_trace(tmp_path / "t", "poll_*") as p:
        assert rig.blocks(32768, 32768) == [8000, 8000]
        assert rig.blocks(32769) == [0]
    assert len(trace_lines(p)) == 1


def test_sweet_spot_changes_nothing(rig: Rig) -> None:
    rig.params()
    rig.blocks(5000, 9000)
    assert rig.blocks(8000, 1, 0) == [8000, 8000, 8000]


def test_poll_max_ns_zero_disables_adaptation(rig: Rig) -> None:
    rig.params(max_ns=0)
    assert rig.blocks(1000, 10**9) == [0, 0]
    assert rig.ctx.stats.snapshot()["grow"] == 0


def test_g_set_poll_params_resets_and_notifies(rig: Rig,
                                               tmp_path: Path) -> None:
    """Invariant (g), first half: reset to 0 and aio_notify."""
    rig.params()
    rig.blocks(5000, 9000, 17000)
    assert rig.ctx.poll_ns == 16000
    assert not rig.ctx.notified
    rig.ctx.set_poll_params(32768, 0, 0)
    assert rig.ctx.poll_ns == 0
    assert rig.ctx.notified
    # ... and a long block right after traces the shrink 0 -> 0, as
    # seen on QEMU after a qom-set (reference §21.3).
    with captured_trace(tmp_path / "t", "poll_shrink") as p:
        rig.ctx.aio_poll(False)
        rig.blocks(10**9)
    assert trace_lines(p) == [f"poll_shrink ctx 0x{id(rig.ctx):x} "
                              "old 0 new 0"]


def test_set_poll_params_reaches_a_blocked_loop(fdmon: str) -> None:
    """The notify of set_poll_params writes the eventfd when needed."""
    ctx = AioContext(fdmon=fdmon)
    try:
        ctx.aio_poll(False)
        assert not ctx.notified
        ctx._notify_me.fetch_add(2)     # as a blocked aio_poll would
        ctx.set_poll_params(1000, 0, 0)
        ctx._notify_me.fetch_sub(2)
        assert ctx.notifier.test_and_clear()
    finally:
        ctx.close()


def test_polling_catches_the_event_and_stops_growing(
        fdmon: str, tmp_path: Path) -> None:
    """Polling on: events 32.5 µs into each iteration, passes of 500 ns.

    The budget grows while the event comes after it; once it covers the
    arrival, polling finds it (progress 1) and poll_ns stays.
    """
    r = Rig(fdmon, pollable=True)
    clock, ctx = r.clock, r.ctx
    arrival = 0

    def io_poll() -> bool:
        clock.advance(500)
        return clock.now_ns() >= arrival

    def wait_until_arrival(timeout: int) -> int:
        r.e.set()
        return max(0, arrival - clock.now_ns())

    ctx.set_event_notifier(r.e, r.e.test_and_clear, io_poll, lambda: None)
    r.mon.hook = wait_until_arrival
    r.params()
    seq = []
    with captured_trace(tmp_path / "t", "run_poll_handlers_end") as p:
        for _ in range(7):
            arrival = clock.now_ns() + 32500
            ctx.aio_poll(True)
            seq.append(ctx.poll_ns)
            r.e.test_and_clear()
    assert seq == [4000, 8000, 16000, 32000, 32768, 32768, 32768]
    lines = trace_lines(p)
    me = f"ctx 0x{id(ctx):x}"
    # Iterations with budgets 4000..32000 run out (progress 0, the
    # timeout stays infinite); the last two find the event.
    assert lines[-2:] == [f"run_poll_handlers_end {me} progress 1 "
                          "new timeout 0"] * 2
    assert f"run_poll_handlers_end {me} progress 0 new timeout -1" in lines
    r.close()


def test_policy_is_chosen_at_construction() -> None:
    p = make_policy()
    assert isinstance(p, Policy72)
    assert p.poll_mode_end is PollModeEnd.IN_TRY_POLL_MODE
    with pytest.raises(ValueError, match="unknown polling policy"):
        make_policy("6.0")
    ctx = AioContext(policy="7.2")
    try:
        assert ctx.policy.name == "7.2"
    finally:
        ctx.close()


class _LateEnd(Policy72):
    """A policy that ends poll mode only before the wait (8.0's place),
    built on the seam alone: no change to the loop."""

    name = "test-late-end"
    poll_mode_end = PollModeEnd.BEFORE_WAIT


@pytest.mark.parametrize("policy", [Policy72(), _LateEnd()],
                         ids=["7.2", "late-end"])
def test_where_poll_mode_ends_is_the_policys(fdmon: str,
                                             policy: Policy72) -> None:
    """Polling finds work (poll mode stays on), then a BH iteration
    (timeout 0, nothing polled), then an idle blocking one.  7.2 leaves
    poll mode in the BH iteration already; the late-end policy keeps it
    on and leaves it only right before the blocking wait."""
    clock = VirtualClock(0)
    ctx = AioContext(fdmon=fdmon, clock=clock, policy=policy)
    mon = scripted(ctx, clock)
    e = EventNotifier()
    log: list[str] = []
    work = [0]

    def io_poll() -> bool:
        clock.advance(1000)
        return work[0] > 0

    def io_poll_ready() -> None:
        work[0] -= 1
        log.append("work")

    def wait_hook(timeout: int) -> int:
        log.append(f"wait {timeout}")
        return 5000 if timeout else 0

    try:
        ctx.set_event_notifier(e, e.test_and_clear, io_poll, io_poll_ready)
        ctx.set_event_notifier_poll(e, lambda: log.append("begin"),
                                    lambda: log.append("end"))
        ctx.aio_poll(False)
        e.set()
        ctx.aio_poll(True)                  # joins the poll set
        ctx.set_poll_params(10**9, 0, 0)
        ctx.aio_poll(False)
        mon.hook = wait_hook
        log.clear()

        ctx.poll_ns = 4000
        work[0] = 1
        assert ctx.aio_poll(True)           # found by polling
        assert ctx.poll_started
        ctx.bh_new(lambda: log.append("bh")).schedule()
        ctx.notify_accept()
        assert ctx.aio_poll(True)           # the BH iteration
        bh_iteration_started = ctx.poll_started
        ctx.poll_ns = 4000
        ctx.aio_poll(True)                  # idle: polls, then blocks
        if isinstance(policy, _LateEnd):
            assert bh_iteration_started
            assert log == ["begin", "work", "bh", "end", "wait -1"]
        else:
            assert not bh_iteration_started
            assert log == ["begin", "work", "end", "bh",
                           "begin", "end", "wait -1"]
        assert not ctx.poll_started
    finally:
        ctx.close()
        e.close()
