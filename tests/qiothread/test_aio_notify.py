"""aio_notify, notify_me and the context notifier (reference §3).

Invariants (c) and (f), and the cross-process handle.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier
from qiothread.notifier import AioNotifier, ControlBlock

from .aio_helpers import captured_trace, trace_lines, warm_notifier

pytestmark = pytest.mark.timeout(120)


def eventfd_written(ctx: AioContext) -> bool:
    return ctx.notifier.test_and_clear()


def test_f_notify_writes_eventfd_only_when_notify_me(
        ctx: AioContext) -> None:
    """Invariant (f)."""
    ctx.aio_poll(False)
    eventfd_written(ctx)
    assert ctx.notify_me == 0
    ctx.notify()
    assert ctx.notified
    assert not eventfd_written(ctx)
    ctx._notify_me.fetch_add(2)         # an aio_poll about to block
    ctx.notify()
    assert eventfd_written(ctx)
    ctx._notify_me.fetch_sub(2)


def test_f_blocked_poll_is_woken_through_the_eventfd(
        ctx: AioContext) -> None:
    """A blocked aio_poll: notify_me is 2 while it waits."""
    ctx.aio_poll(False)
    seen: list[int] = []

    def kicker() -> None:
        while ctx.notify_me == 0:
            time.sleep(0.001)
        seen.append(ctx.notify_me)
        ctx.notify()

    t = threading.Thread(target=kicker)
    t.start()
    ctx.aio_poll(True)
    t.join()
    assert seen == [2]
    assert ctx.notify_me == 0
    assert not ctx.notified             # accepted
    assert ctx.stats.snapshot()["blocking_waits"] == 1


def test_c_notifier_is_not_progress(ctx: AioContext) -> None:
    """Invariant (c), fd path: reading the notifier is not progress."""
    ctx.aio_poll(False)
    ctx._notify_me.fetch_add(2)
    ctx.notify()                        # the eventfd is now readable
    ctx._notify_me.fetch_sub(2)
    ctx.notify_accept()
    assert ctx.aio_poll(True) is False  # woke, read it, no progress
    assert not eventfd_written(ctx)


def test_c_notifier_hit_ends_polling_without_progress(
        ctx: AioContext, tmp_path: Path) -> None:
    """Invariant (c), polling path: a notify ends a 60 s polling round.

    The round reports progress 0 (the hit was the ctx notifier) and a
    timeout of 0, and it returns long before its budget.
    """
    e = EventNotifier()
    try:
        ctx.set_event_notifier(e, e.test_and_clear, lambda: False,
                               lambda: None)
        ctx.aio_poll(False)
        e.set()
        ctx.aio_poll(True)              # e joins the poll set
        warm_notifier(ctx)
        ctx.set_poll_params(120 * 10**9, 0, 0)
        ctx.aio_poll(False)
        ctx.poll_ns = 60 * 10**9        # a budget no test would wait out
        t = threading.Timer(0.1, ctx.notify)
        before = ctx.stats.snapshot()
        with captured_trace(tmp_path / "t", "run_poll_handlers_*") as p:
            t.start()
            start = time.monotonic()
            ctx.aio_poll(True)
            took = time.monotonic() - start
        t.join()
        assert took < 50                # ended by the hit, not the budget
        me = f"ctx 0x{id(ctx):x}"
        lines = trace_lines(p)
        assert lines[0] == (f"run_poll_handlers_begin {me} "
                            f"max_ns {60 * 10**9} timeout -1")
        assert lines[1] == (f"run_poll_handlers_end {me} progress 0 "
                            "new timeout 0")
        after = ctx.stats.snapshot()
        assert after["poll_notified"] - before["poll_notified"] == 1
        assert after["blocking_waits"] == before["blocking_waits"]
    finally:
        ctx.set_event_notifier(e, None)
        e.close()


def _child_notify(handle: AioNotifier, delay: float) -> None:
    time.sleep(delay)
    handle.notify()


def test_notify_from_a_forked_process(ctx: AioContext) -> None:
    ctx.aio_poll(False)
    mp = multiprocessing.get_context("fork")
    p = mp.Process(target=_child_notify, args=(ctx.remote_handle(), 0.05))
    p.start()
    try:
        ctx.aio_poll(True)              # would block forever otherwise
    finally:
        p.join(30)
    assert p.exitcode == 0
    assert not ctx.notified


def test_handle_pickles_to_its_descriptors(ctx: AioContext) -> None:
    ctx.aio_poll(False)
    h = ctx.remote_handle()
    blob = pickle.dumps(h)
    code = (
        "import pickle, sys\n"
        "h = pickle.loads(sys.stdin.buffer.read())\n"
        "h.notify()\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    fds = (ctx.notifier.fileno(), ctx._block.fd)
    assert fds[1] is not None
    r = subprocess.run([sys.executable, "-c", code], input=blob,
                       pass_fds=fds, env=env, timeout=60,
                       capture_output=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert ctx.notified
    ctx.aio_poll(False)
    assert not ctx.notified


def test_control_block_in_a_callers_mapping(fdmon: str) -> None:
    import mmap
    buf = mmap.mmap(-1, 4096)
    block = ControlBlock(buf, 128)
    ctx = AioContext(fdmon=fdmon, control_block=block)
    try:
        ctx.aio_poll(False)
        ctx.notify()
        assert block.notified
        assert memoryview(buf)[256:260].cast("I")[0] == 1
        with pytest.raises(TypeError, match="fork"):
            pickle.dumps(ctx.remote_handle())
    finally:
        ctx.close()
    block.close()
    buf.close()         # nothing of ours pins the caller's mapping now


def test_control_block_offset_checked() -> None:
    import mmap
    buf = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError, match="aligned"):
        ControlBlock(buf, 4)
    with pytest.raises(ValueError, match="fit"):
        ControlBlock(buf, 4096 - 64)
    buf.close()
