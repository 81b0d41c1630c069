"""The per-AioContext thread pool (QEMU's util/thread-pool.c)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev import thread_pool
from blockdev.thread_pool import (
    ThreadPool,
    ThreadPoolState,
    aio_get_thread_pool,
    aio_put_thread_pool,
    set_thread_pool_params,
)
from qiothread import trace
from tests.blockdev.conftest import Waiter, make_context, run_until


@pytest.fixture
def pool(ctx: Any) -> Iterator[ThreadPool]:
    p = ThreadPool(ctx)
    yield p
    p.close()


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "worker"]


def test_results_reach_callbacks_in_the_home_thread(
        pool: ThreadPool, ctx: Any) -> None:
    home = threading.get_ident()
    w = Waiter()
    seen: list[int] = []

    def cb(i: int) -> Any:
        inner = w.cb(i)

        def done(ret: int) -> None:
            seen.append(threading.get_ident())
            inner(ret)
        return done

    for i in range(20):
        pool.submit(lambda i=i: -i, cb(i))
    run_until(ctx, w.done(20))
    assert w.results == {i: -i for i in range(20)}
    assert set(seen) == {home}
    assert pool.head == []


def test_workers_are_named_and_capped(ctx: Any) -> None:
    pool = ThreadPool(ctx, min_threads=0, max_threads=3)
    try:
        gate = threading.Event()
        running = threading.Semaphore(0)

        def job() -> int:
            running.release()
            gate.wait(60)
            return 0

        w = Waiter()
        for i in range(6):
            pool.submit(job, w.cb(i))
        for _ in range(3):
            # Spawning goes through a BH in the pool's context.
            deadline = time.monotonic() + 30
            while not running.acquire(timeout=0.01):
                ctx.aio_poll(False)
                assert time.monotonic() < deadline
        assert pool.cur_threads == 3
        assert len(_workers()) >= 3
        assert not running.acquire(timeout=0.2)   # the 4th waits
        gate.set()
        run_until(ctx, w.done(6))
        assert pool.cur_threads == 3
    finally:
        pool.close()


def test_idle_workers_leave_down_to_min(ctx: Any) -> None:
    pool = ThreadPool(ctx, min_threads=1, max_threads=4,
                      idle_timeout_s=0.2)
    try:
        gate = threading.Barrier(4)
        w = Waiter()
        for i in range(4):
            pool.submit(lambda: gate.wait(60) * 0, w.cb(i))
        run_until(ctx, w.done(4))
        assert pool.cur_threads == 4
        deadline = time.monotonic() + 30
        while pool.cur_threads > 1:
            assert time.monotonic() < deadline, pool.cur_threads
            time.sleep(0.05)
        time.sleep(0.5)
        assert pool.cur_threads == 1     # min_threads stay
    finally:
        pool.close()


def test_only_queued_requests_cancel(pool: ThreadPool, ctx: Any) -> None:
    pool.update_params(0, 1)
    gate = threading.Event()
    started = threading.Event()

    def blocker() -> int:
        started.set()
        gate.wait(60)
        return 7

    w = Waiter()
    active = pool.submit(blocker, w.cb("active"))
    queued = pool.submit(lambda: 1, w.cb("queued"))
    deadline = time.monotonic() + 30
    while not started.is_set():
        ctx.aio_poll(False)
        assert time.monotonic() < deadline
    assert active.state is ThreadPoolState.ACTIVE
    assert queued.state is ThreadPoolState.QUEUED
    assert not pool.cancel(active)
    assert pool.cancel(queued)
    gate.set()
    run_until(ctx, w.done(2))
    assert w.results == {"active": 7, "queued": -errno.ECANCELED}


def test_trace_events(pool: ThreadPool, ctx: Any, tmp_path: Path) -> None:
    out = tmp_path / "t.log"
    old = trace.sink_fileno()
    trace.configure(["thread_pool_*"], file=str(out))
    try:
        w = Waiter()
        pool.submit(lambda: 5, w.cb(0))
        run_until(ctx, w.done(1))
    finally:
        trace.disable_all()
        trace.flush_to(old)
    lines = out.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["thread_pool_submit",
                                              "thread_pool_complete"]
    assert lines[1].endswith(" ret 5")


def test_params_per_context_and_refcount() -> None:
    ctx = make_context()
    try:
        set_thread_pool_params(ctx, 2, 5)
        p1 = aio_get_thread_pool(ctx)
        p2 = aio_get_thread_pool(ctx)
        assert p1 is p2
        assert (p1.min_threads, p1.max_threads) == (2, 5)
        deadline = time.monotonic() + 30
        while p1.cur_threads - p1.new_threads < 2:   # min spawned
            ctx.aio_poll(False)
            assert time.monotonic() < deadline
        set_thread_pool_params(ctx, 0, 1)
        assert p1.max_threads == 1
        aio_put_thread_pool(ctx)
        assert thread_pool._pools.peek(ctx) is p1
        aio_put_thread_pool(ctx)
        assert thread_pool._pools.peek(ctx) is None
        assert p1.cur_threads == 0
    finally:
        ctx.close()


def test_regression_close_with_unstarted_workers_is_prompt(
        ctx: Any) -> None:
    """close() waited 30 s for workers counted but never started."""
    pool = ThreadPool(ctx, min_threads=4)
    # No aio_poll ran, so the spawning BH never ran: 4 counted, 0 alive.
    assert pool.cur_threads == 4 and pool.new_threads == 4
    t = time.monotonic()
    pool.close(timeout_s=30)
    assert pool.cur_threads == 0
    assert time.monotonic() - t < 10


def test_polling_finds_pool_completions(ctx: Any) -> None:
    # With polling on, the pool's io_poll yields the GIL while work is
    # outstanding and reports finished work as progress.
    ctx.set_poll_params(10_000_000, 0, 0)
    pool = ThreadPool(ctx)
    try:
        w = Waiter()
        for i in range(50):
            # Work that takes a while: with an instant function the
            # worker can finish before the loop gets to poll (its BH is
            # then pending and 7.2 does not poll), which once left this
            # test with no polling at all in a full-suite run.
            pool.submit(lambda: time.sleep(0.001) or 0, w.cb(i))
            run_until(ctx, w.done(i + 1))
        assert pool._last_io_poll_ns > 0, "io_poll never ran"
    finally:
        pool.close()


def test_regression_elements_without_callback_do_not_hide_others(
        ctx: Any) -> None:
    """Removing a callback-less element mid-scan skipped the next one."""
    pool = ThreadPool(ctx, min_threads=2)
    try:
        deadline = time.monotonic() + 30
        while pool.idle_threads < 2:        # both workers up and idle
            ctx.aio_poll(False)
            assert time.monotonic() < deadline
        w = Waiter()
        # head is newest first: the callback-less one is scanned first.
        pool.submit(lambda: 0, w.cb("second"))
        first = pool.submit(lambda: 0, None)
        # Wait for both without running the loop (so no BH runs yet).
        while not all(e.state is ThreadPoolState.DONE for e in pool.head):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert pool.head[0] is first
        # One run of the completion BH must call back the second one.
        pool._completion_bh()
        assert w.results == {"second": 0} and pool.head == []
    finally:
        pool.close()


def _wait_for(ctx: Any, pred: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not pred():
        ctx.aio_poll(False)
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_min_max_changes_at_run_time(ctx: Any) -> None:
    """thread_pool_update_params: a lower max makes surplus idle workers
    leave at once (not after the idle timeout), busy ones after their
    request; a higher min spawns at once; and a queued request waits
    for the one worker that max allows."""
    before = len(_workers())
    pool = ThreadPool(ctx, min_threads=4, max_threads=8,
                      idle_timeout_s=3600)
    try:
        _wait_for(ctx, lambda: pool.idle_threads == 4, "4 idle workers")
        gate = threading.Event()
        started = threading.Semaphore(0)

        def job() -> int:
            started.release()
            gate.wait(60)
            return 5

        w = Waiter()
        pool.submit(job, w.cb("busy"))
        assert started.acquire(timeout=30)
        pool.update_params(0, 1)
        # Three idle ones leave; the busy one stays until it is done.
        _wait_for(ctx, lambda: pool.cur_threads == 1, "shrink to 1")
        _wait_for(ctx, lambda: len(_workers()) == before + 1,
                  "threads gone")
        pool.submit(lambda: 6, w.cb("queued"))
        time.sleep(0.2)
        ctx.aio_poll(False)
        assert "queued" not in w.results
        gate.set()
        run_until(ctx, w.done(2))
        assert w.results == {"busy": 5, "queued": 6}
        assert pool.cur_threads == 1
        pool.update_params(3, 8)
        _wait_for(ctx, lambda: pool.idle_threads == 3, "grow to 3")
        assert len(_workers()) == before + 3
    finally:
        pool.close()


def test_regression_done_elements_complete_newest_first(ctx: Any) -> None:
    """Elements done by the time the completion BH runs were called
    back oldest first; QEMU's BH walks ``pool->head``, a QLIST it
    inserts at the front, so the newest submission completes first."""
    pool = ThreadPool(ctx, min_threads=3)
    try:
        _wait_for(ctx, lambda: pool.idle_threads == 3, "3 idle workers")
        w = Waiter()
        elems = [pool.submit(lambda i=i: i, w.cb(i)) for i in range(3)]
        deadline = time.monotonic() + 30
        # All done before any BH runs: no aio_poll meanwhile.
        while not all(e.state is ThreadPoolState.DONE for e in elems):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        run_until(ctx, w.done(3))
        assert w.order == [2, 1, 0]
        assert w.results == {0: 0, 1: 1, 2: 2}
    finally:
        pool.close()
