"""Poll mode: catching work without a syscall (reference §4.2-4.4).

Invariant (d), idle removal after 7 s, a pollable source made ready by
another process, and the GIL while a poller spins.
"""

from __future__ import annotations

import mmap
import multiprocessing
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from qiothread.aio import POLL_IDLE_INTERVAL_NS, AioContext
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier

from .aio_helpers import (
    captured_trace,
    kick_when_blocked,
    scripted,
    trace_lines,
    warm_notifier,
)

pytestmark = pytest.mark.timeout(120)

BIG_NS = 60 * 10**9     # a polling budget no test waits out


def join_poll_set(ctx: AioContext, e: EventNotifier) -> None:
    """Dispatch ``e`` once through its fd so that it is polled."""
    ctx.aio_poll(False)
    e.set()
    while not ctx.fd_handlers[e.fileno()].in_poll:
        ctx.aio_poll(True)


def big_budget(ctx: AioContext) -> None:
    ctx.set_poll_params(2 * BIG_NS, 0, 0)
    ctx.aio_poll(False)
    ctx.poll_ns = BIG_NS


def _child_set_flag(buf: mmap.mmap, delay: float) -> None:
    time.sleep(delay)
    memoryview(buf).cast("I")[0] = 1      # a plain store, no syscall


def test_ready_from_another_process_is_caught_by_polling(
        ctx: AioContext, tmp_path: Path) -> None:
    shm = mmap.mmap(-1, 4096)             # MAP_SHARED, inherited
    flag = memoryview(shm).cast("I")
    e = EventNotifier()
    got: list[str] = []

    def io_poll() -> bool:
        return flag[0] != 0

    def io_poll_ready() -> None:
        flag[0] = 0
        got.append("poll_ready")

    try:
        ctx.set_event_notifier(e, lambda: (got.append("read"),
                                           e.test_and_clear()),
                               io_poll, io_poll_ready)
        join_poll_set(ctx, e)
        got.clear()
        big_budget(ctx)
        before = ctx.stats.snapshot()
        p = multiprocessing.get_context("fork").Process(
            target=_child_set_flag, args=(shm, 0.05))
        with captured_trace(tmp_path / "t", "run_poll_handlers_*",
                            "poll_*") as path:
            p.start()
            assert ctx.aio_poll(True) is True
        p.join(30)
        assert p.exitcode == 0
        me = f"ctx 0x{id(ctx):x}"
        lines = trace_lines(path)
        assert lines[0].startswith(f"run_poll_handlers_begin {me} max_ns "
                                   f"{BIG_NS} timeout -1")
        assert lines[1] == (f"run_poll_handlers_end {me} progress 1 "
                            "new timeout 0")
        assert got == ["poll_ready"]
        # No syscall wake-up: neither eventfd was written, and the loop
        # never entered a blocking wait.
        assert not e.test_and_clear()
        assert not ctx.notifier.test_and_clear()
        after = ctx.stats.snapshot()
        assert after["blocking_waits"] == before["blocking_waits"]
        assert after["poll_progress"] - before["poll_progress"] == 1
    finally:
        ctx.set_event_notifier(e, None)
        e.close()
        flag.release()
        shm.close()


def test_d_leaving_poll_mode_polls_once_more(ctx: AioContext) -> None:
    """Invariant (d): io_poll_end, then a final io_poll catches work.

    The work appears exactly when notifications are re-enabled; without
    the final poll the loop would block with it pending.
    """
    e = EventNotifier()
    state = {"ready": False, "polls_after_end": 0, "ended": False}
    got: list[str] = []

    def io_poll() -> bool:
        if state["ended"]:
            state["polls_after_end"] += 1
        return bool(state["ready"])

    def io_poll_end() -> None:
        state["ended"] = True
        state["ready"] = True             # raced with the re-enable

    def io_poll_ready() -> None:
        state["ready"] = False
        got.append("poll_ready")

    try:
        ctx.set_event_notifier(e, e.test_and_clear, io_poll, io_poll_ready)
        join_poll_set(ctx, e)
        ctx.set_event_notifier_poll(e, lambda: None, io_poll_end)
        ctx.set_poll_params(1_000_000, 0, 0)
        ctx.aio_poll(False)
        ctx.poll_ns = 20_000              # a short round that finds none
        guard = ctx.timer_new_ns(lambda: got.append("guard"))
        guard.mod_ns(ctx.clock.now_ns() + 30 * 10**9)
        ctx.aio_poll(False)               # accept the timer's notify
        before = ctx.stats.snapshot()["blocking_waits"]
        assert ctx.aio_poll(True) is True
        assert got == ["poll_ready"]
        assert state["polls_after_end"] == 1
        assert ctx.stats.snapshot()["blocking_waits"] == before
        assert not ctx.poll_started
        guard.del_()
    finally:
        ctx.set_event_notifier(e, None)
        e.close()


class PollingCapable:
    """Marks the scripted monitor as one that supports polling."""

    supports_polling: ClassVar[bool] = True


def test_idle_poll_handler_removed_after_7s_on_polling_monitor(
        fdmon: str, tmp_path: Path) -> None:
    clock = VirtualClock(10**9)
    ctx = AioContext(fdmon=fdmon, clock=clock)
    mon = scripted(ctx, clock)
    e = EventNotifier()
    ended: list[int] = []
    try:
        def io_poll() -> bool:
            clock.advance(1000)           # a pass costs 1 µs
            return False

        ctx.set_event_notifier(e, e.test_and_clear, io_poll, lambda: None)
        ctx.set_event_notifier_poll(e, None, lambda: ended.append(1))
        ctx.aio_poll(False)
        e.set()
        ctx.aio_poll(True)
        node = ctx.fd_handlers[e.fileno()]
        assert node.in_poll
        # io_uring-like: polling does not need the syscall.
        mon.supports_polling = True       # type: ignore[misc]
        ctx.set_poll_params(32768, 0, 0)
        ctx.aio_poll(False)
        mon.default_ns = 999_000_000      # each wait: ~1 s
        removed_at = None
        first_start = clock.now_ns()
        with captured_trace(tmp_path / "t", "poll_remove") as p:
            for i in range(12):
                ctx.poll_ns = 4000
                ctx.aio_poll(True)
                if not node.in_poll and removed_at is None:
                    removed_at = i
                    removed_now = clock.now_ns()
        lines = trace_lines(p)
        assert lines == [f"poll_remove ctx 0x{id(ctx):x} node "
                         f"0x{id(node):x} fd {e.fileno()}"]
        # Each iteration takes 4 passes of 1 µs, the final poll of 1 µs
        # and a 999 ms wait: 999.005 ms.  The idle timeout is set at the
        # end of the first round, t1, and the node goes at the first
        # round ending at or after t1 + 7 s: iteration 8.
        assert removed_at == 8
        t1 = first_start + 4000
        it = 999_005_000
        assert removed_now == first_start + 9 * it    # after iteration 8
        check_8 = first_start + 8 * it + 4000           # its idle check
        assert check_8 >= t1 + POLL_IDLE_INTERVAL_NS > check_8 - it
        assert node.poll_idle_timeout == 0
        # io_poll_end: once per iteration when 7.2 leaves poll mode
        # (iterations 0-7), once more at the removal; then never.
        assert ended == [1] * 9
    finally:
        ctx.close()
        e.close()


def test_no_idle_removal_on_poll_or_epoll(fdmon: str) -> None:
    clock = VirtualClock(10**9)
    ctx = AioContext(fdmon=fdmon, clock=clock)
    mon = scripted(ctx, clock)
    e = EventNotifier()
    try:
        def io_poll() -> bool:
            clock.advance(1000)
            return False

        ctx.set_event_notifier(e, e.test_and_clear, io_poll, lambda: None)
        join_poll_set(ctx, e)
        node = ctx.fd_handlers[e.fileno()]
        ctx.set_poll_params(32768, 0, 0)
        ctx.aio_poll(False)
        mon.default_ns = 10**9
        for _ in range(3 * POLL_IDLE_INTERVAL_NS // 10**9):
            ctx.poll_ns = 4000
            ctx.aio_poll(True)
        assert node.in_poll
        assert not mon.supports_polling
    finally:
        ctx.close()
        e.close()


def test_a_long_poller_does_not_starve_another_thread(
        ctx: AioContext) -> None:
    """The poller spins (never blocks) until a worker thread, which
    needs the GIL for its Python work, has finished that work."""
    e = EventNotifier()
    done = threading.Event()
    steps = [0]

    def worker() -> None:
        for _ in range(200):
            sum(range(2000))              # Python work: needs the GIL
            steps[0] += 1
            time.sleep(0.0002)            # releases it
        done.set()

    try:
        ctx.set_event_notifier(e, e.test_and_clear, done.is_set,
                               lambda: None)
        join_poll_set(ctx, e)
        big_budget(ctx)
        before = ctx.stats.snapshot()
        t = threading.Thread(target=worker)
        t.start()
        assert ctx.aio_poll(True) is True
        t.join()
        assert steps[0] == 200
        after = ctx.stats.snapshot()
        assert after["blocking_waits"] == before["blocking_waits"]
        assert after["poll_progress"] - before["poll_progress"] == 1
    finally:
        ctx.set_event_notifier(e, None)
        e.close()


def test_kick_helper_blocks_then_wakes(ctx: AioContext) -> None:
    warm_notifier(ctx)
    t = kick_when_blocked(ctx)
    ctx.aio_poll(True)
    t.join()
