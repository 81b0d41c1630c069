"""defer_call: QEMU 8.2's per-thread deferred calls."""

from __future__ import annotations

import threading
import time

import pytest

from qiothread.defer_call import (
    defer_call,
    defer_call_begin,
    defer_call_end,
    defer_call_nesting,
    deferred_calls,
)
from qiothread.errors import InternalError


def test_outside_a_section_runs_at_once() -> None:
    log: list[str] = []
    defer_call(lambda: log.append("now"))
    assert log == ["now"]


def test_runs_at_the_end_of_the_outermost_section_in_order() -> None:
    log: list[str] = []

    def a() -> None:
        log.append("a")

    def b() -> None:
        log.append("b")

    defer_call_begin()
    defer_call(b)
    defer_call_begin()
    defer_call(a)
    defer_call_end()
    assert log == []                    # the inner end runs nothing
    assert defer_call_nesting() == 1
    defer_call_end()
    assert log == ["b", "a"]            # first-deferral order
    assert defer_call_nesting() == 0


def test_duplicates_are_collapsed() -> None:
    class Dev:
        def __init__(self) -> None:
            self.writes = 0

        def notify_irqfd(self) -> None:
            self.writes += 1

    d1, d2 = Dev(), Dev()
    with deferred_calls():
        for _ in range(5):
            defer_call(d1.notify_irqfd)     # same (fn, opaque): once
        defer_call(d2.notify_irqfd)         # another opaque: its own
        with deferred_calls():
            defer_call(d1.notify_irqfd)     # nested: still the same
    assert (d1.writes, d2.writes) == (1, 1)


def test_a_call_deferred_while_the_queue_runs_runs_at_once() -> None:
    log: list[str] = []

    def second() -> None:
        log.append("second")

    def first() -> None:
        log.append("first")
        defer_call(second)
        log.append("after")

    with deferred_calls():
        defer_call(first)
    assert log == ["first", "second", "after"]


def test_the_state_is_per_thread() -> None:
    log: list[str] = []
    seen: list[int] = []

    def other() -> None:
        seen.append(defer_call_nesting())
        defer_call(lambda: log.append("other thread"))

    with deferred_calls():
        defer_call(lambda: log.append("main"))
        t = threading.Thread(target=other)
        t.start()
        t.join()
        # The other thread had no section open: its call ran at once.
        assert log == ["other thread"]
    assert seen == [0]
    assert log == ["other thread", "main"]


def test_end_without_begin_is_an_error() -> None:
    with pytest.raises(InternalError, match="without defer_call_begin"):
        defer_call_end()


def test_a_failing_call_does_not_stop_the_others() -> None:
    log: list[str] = []

    def bad() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), deferred_calls():
        defer_call(bad)
        defer_call(lambda: log.append("ran"))
    assert log == ["ran"]
    assert defer_call_nesting() == 0


@pytest.mark.parametrize("defer", [True, False])
def test_thread_pool_completions_run_in_one_defer_section(
        defer: bool) -> None:
    """8.2: the pool's completion BH is one section, so a notification
    deferred by each of 8 completed requests is written once."""
    from blockdev.thread_pool import ThreadPool, ThreadPoolState
    from qiothread.aio import AioContext
    from qiothread.event_notifier import EventNotifier

    ctx = AioContext()
    pool = ThreadPool(ctx)
    irqfd = EventNotifier()
    writes = 0

    def notify_irqfd() -> None:
        nonlocal writes
        writes += 1
        irqfd.set()

    done = 0

    def complete(ret: int) -> None:
        nonlocal done
        done += 1
        if defer:
            defer_call(notify_irqfd)
        else:
            notify_irqfd()

    gate = threading.Event()

    def work() -> int:
        gate.wait()
        return 0

    def wait_for(state: ThreadPoolState, loop: bool) -> None:
        deadline = time.monotonic() + 60
        while not all(r.state is state for r in pool.head):
            assert time.monotonic() < deadline
            if loop:
                ctx.aio_poll(False)     # the pool spawns workers by BH
            time.sleep(0.001)

    try:
        for _ in range(8):
            pool.submit(work, complete)
        # All 8 on workers, then all 8 finished, before the loop looks.
        wait_for(ThreadPoolState.ACTIVE, loop=True)
        gate.set()
        wait_for(ThreadPoolState.DONE, loop=False)
        while done < 8:
            ctx.aio_poll(True)
        assert writes == (1 if defer else 8)
        assert irqfd.test_and_clear()
    finally:
        pool.close()
        irqfd.close()
        ctx.close()
