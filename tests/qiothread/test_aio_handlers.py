"""Handlers, dispatch order and the poll set (reference §2, §4.4, §4.6).

Every test runs on both fd monitors (the ``ctx`` fixture).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qiothread import trace
from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier

from .aio_helpers import captured_trace, trace_lines

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def notifiers() -> Iterator[list[EventNotifier]]:
    ns = [EventNotifier() for _ in range(4)]
    yield ns
    for n in ns:
        n.close()


def drain(ctx: AioContext) -> None:
    """Consume the context's pending notify and its eventfd."""
    while ctx.aio_poll(False):
        pass
    ctx.aio_poll(False)


def test_read_handler_dispatched(ctx: AioContext,
                                 notifiers: list[EventNotifier]) -> None:
    e = notifiers[0]
    got: list[str] = []
    ctx.set_event_notifier(e, lambda: got.append(str(e.test_and_clear())))
    drain(ctx)
    assert got == []
    e.set()
    assert ctx.aio_poll(True) is True
    assert got == ["True"]
    assert ctx.aio_poll(False) is False


def test_ready_fds_dispatch_oldest_registered_first(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    order: list[int] = []
    for i, e in enumerate(notifiers):
        ctx.set_event_notifier(
            e, lambda i=i, e=e: (order.append(i), e.test_and_clear()))
    drain(ctx)
    for e in reversed(notifiers):
        e.set()
    assert ctx.aio_poll(True)
    if ctx.fdmon.name == "poll":
        # ppoll scans newest first; the ready list is LIFO.
        assert order == [0, 1, 2, 3]
    else:
        assert sorted(order) == [0, 1, 2, 3]


def test_a_handler_without_io_poll_disables_polling(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """Invariant (a)."""
    polled: list[int] = []
    e0, e1 = notifiers[0], notifiers[1]
    ctx.set_event_notifier(e0, e0.test_and_clear,
                           lambda: polled.append(1) or False, lambda: None)
    ctx.set_poll_params(10_000_000, 0, 0)
    drain(ctx)
    ctx.poll_ns = 1_000_000     # budget already grown
    e0.set()
    ctx.aio_poll(True)          # first dispatch: joins the poll set
    assert ctx.fd_handlers[e0.fileno()].in_poll
    polled.clear()
    e0.set()
    ctx.aio_poll(True)
    assert polled, "with only pollable handlers the loop must poll"
    ctx.set_event_notifier(e1, e1.test_and_clear)    # no io_poll
    assert ctx.poll_disable_cnt == 1
    drain(ctx)
    polled.clear()
    ctx.poll_ns = 1_000_000
    e0.set()
    ctx.aio_poll(True)
    assert polled == []
    assert ctx.stats.snapshot()["poll_rounds"] >= 1
    rounds = ctx.stats.snapshot()["poll_rounds"]
    e0.set()
    ctx.aio_poll(True)
    assert ctx.stats.snapshot()["poll_rounds"] == rounds
    # Deleting it turns polling back on.
    ctx.set_event_notifier(e1, None)
    assert ctx.poll_disable_cnt == 0


def test_b_handler_polled_only_after_first_dispatch(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """Invariant (b)."""
    e = notifiers[0]
    polled: list[int] = []
    ctx.set_event_notifier(e, e.test_and_clear,
                           lambda: polled.append(1) or False, lambda: None)
    ctx.set_poll_params(10_000_000, 0, 0)
    drain(ctx)
    ctx.poll_ns = 1_000_000
    t = ctx.timer_new_ns(lambda: None)
    t.mod_ns(ctx.clock.now_ns() + 2_000_000)
    drain(ctx)
    ctx.poll_ns = 1_000_000
    ctx.aio_poll(True)      # polls the ctx notifier only
    assert polled == []
    e.set()
    ctx.aio_poll(True)      # dispatched by fd: joins the poll set
    assert polled == []
    ctx.poll_ns = 1_000_000
    e.set()
    ctx.aio_poll(True)
    assert polled


def test_h_replacing_a_handler_drops_poll_hooks_and_membership(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """Invariant (h)."""
    e = notifiers[0]
    calls: list[str] = []
    ctx.set_event_notifier(e, e.test_and_clear, lambda: False,
                           lambda: None)
    ctx.set_event_notifier_poll(e, lambda: calls.append("begin"),
                                lambda: calls.append("end"))
    drain(ctx)
    e.set()
    ctx.aio_poll(True)
    node = ctx.fd_handlers[e.fileno()]
    assert node.in_poll and node.io_poll_begin is not None
    ctx.set_event_notifier(e, e.test_and_clear, lambda: False,
                           lambda: None)
    new = ctx.fd_handlers[e.fileno()]
    assert new is not node
    assert not new.in_poll
    assert new.io_poll_begin is None and new.io_poll_end is None
    assert new.poll_idle_timeout == 0
    assert node.deleted and not node.in_poll   # freed: no walker
    # Poll mode entered now calls no hook of the old node.
    calls.clear()
    ctx.set_poll_params(10_000_000, 0, 0)
    ctx.poll_ns = 100_000
    drain(ctx)
    ctx.poll_ns = 100_000
    e.set()
    ctx.aio_poll(True)
    assert calls == []


def test_delete_during_walk_is_deferred(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    e0, e1 = notifiers[0], notifiers[1]
    ran: list[str] = []

    def read0() -> None:
        e0.test_and_clear()
        ran.append("0")
        ctx.set_event_notifier(e1, None)
        node1 = old1
        assert node1.deleted and node1 in ctx.handlers   # deferred

    ctx.set_event_notifier(e1, lambda: ran.append("1"))
    old1 = ctx.fd_handlers[e1.fileno()]
    ctx.set_event_notifier(e0, read0)
    drain(ctx)
    e0.set()
    e1.set()
    ctx.aio_poll(True)
    assert "1" not in ran or ran.index("1") < ran.index("0")
    assert old1 not in ctx.handlers       # freed by the last walker
    e1.test_and_clear()


def test_nested_aio_poll_frees_only_at_outermost(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    e0, e1, e2 = notifiers[0], notifiers[1], notifiers[2]
    seen: list[str] = []

    def inner_read() -> None:
        e1.test_and_clear()
        seen.append("inner")
        ctx.set_event_notifier(e2, None)     # deleted inside nested
        assert ctx.aio_poll(False) is not None
        seen.append("nested-done")
        assert old2 in ctx.handlers          # outer walker remains

    def outer_read() -> None:
        e0.test_and_clear()
        seen.append("outer")
        e1.set()
        while "inner" not in seen:
            ctx.aio_poll(True)               # nested aio_poll
        assert old2 in ctx.handlers

    ctx.set_event_notifier(e2, e2.test_and_clear)
    old2 = ctx.fd_handlers[e2.fileno()]
    ctx.set_event_notifier(e1, inner_read)
    ctx.set_event_notifier(e0, outer_read)
    drain(ctx)
    e0.set()
    ctx.aio_poll(True)
    assert seen[:3] == ["outer", "inner", "nested-done"]
    assert old2 not in ctx.handlers


def test_first_dispatch_traces_poll_add(
        ctx: AioContext, notifiers: list[EventNotifier],
        tmp_path: Path) -> None:
    """``poll_add ctx .. node .. fd N revents 0x1``, as QEMU logs the
    first dispatch of a pollable handler (reference §21.3); with
    ``-msg timestamp=on`` the line gets the ``tid@sec.usec:`` prefix."""
    e = notifiers[0]
    ctx.set_event_notifier(e, e.test_and_clear, lambda: False,
                           lambda: None)
    drain(ctx)
    with captured_trace(tmp_path / "t", "poll_add") as p:
        trace.configure(timestamps=True)
        try:
            e.set()
            ctx.aio_poll(True)
            e.set()
            ctx.aio_poll(True)      # already polled: no second line
        finally:
            trace.configure(timestamps=False)
    node = ctx.fd_handlers[e.fileno()]
    (line,) = trace_lines(p)
    m = re.fullmatch(r"(\d+)@(\d+)\.(\d{6}):(.*)", line)
    assert m is not None, line
    assert int(m.group(1)) == threading.get_native_id()
    assert abs(int(m.group(2)) - time.time()) < 3600
    assert m.group(4) == (f"poll_add ctx 0x{id(ctx):x} node "
                          f"0x{id(node):x} fd {e.fileno()} revents 0x1")


def test_handler_without_poll_ready_is_not_pollable(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """io_poll without io_poll_ready is dropped (§2 step 1)."""
    e = notifiers[0]
    ctx.set_event_notifier(e, e.test_and_clear, lambda: True, None)
    assert ctx.fd_handlers[e.fileno()].io_poll is None
    assert ctx.poll_disable_cnt == 1
    ctx.set_event_notifier(e, None)
    assert ctx.poll_disable_cnt == 0
    ctx.set_event_notifier(e, None)         # unknown fd: nothing
    assert ctx.poll_disable_cnt == 0


def test_regression_raising_callback_leaves_the_context_usable(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """A callback exception used to leave the walker count raised (so
    deleted handlers were never freed) and could leave notify_me set."""
    e0, e1 = notifiers[0], notifiers[1]

    def boom() -> None:
        e0.test_and_clear()
        ctx.set_event_notifier(e1, None)     # deferred: we are walking
        raise RuntimeError("callback failed")

    ctx.set_event_notifier(e1, e1.test_and_clear)
    old1 = ctx.fd_handlers[e1.fileno()]
    ctx.set_event_notifier(e0, boom)
    drain(ctx)
    e0.set()
    with pytest.raises(RuntimeError, match="callback failed"):
        ctx.aio_poll(True)
    assert ctx._walkers == 0
    assert ctx.notify_me == 0
    assert old1 in ctx.handlers              # still deferred ...
    ctx.set_event_notifier(e0, e0.test_and_clear)
    ctx.aio_poll(False)
    assert old1 not in ctx.handlers          # ... freed by the next walk


def test_nested_poll_takes_a_node_off_the_parents_ready_list(
        ctx: AioContext, notifiers: list[EventNotifier]) -> None:
    """§4.7: e0 and e1 are both ready; e0's handler runs a nested
    aio_poll, which finds e1 still readable and dispatches it; the
    parent must not dispatch e1 a second time."""
    e0, e1 = notifiers[0], notifiers[1]
    calls: list[str] = []

    def read0() -> None:
        e0.test_and_clear()
        calls.append("e0")
        node1 = ctx.fd_handlers[e1.fileno()]
        parent = node1.ready_list
        ctx.aio_poll(False)         # nested: need_wait, so it waits(0)
        calls.append("e0 done")
        if parent is not None:      # e1 was waiting on our list
            assert node1 not in parent

    def read1() -> None:
        calls.append("e1")
        e1.test_and_clear()

    ctx.set_event_notifier(e0, read0)       # no io_poll: need_wait
    ctx.set_event_notifier(e1, read1)
    drain(ctx)
    e0.set()
    e1.set()
    ctx.aio_poll(True)
    if ctx.fdmon.name == "poll":
        # ppoll reports both; dispatch is oldest-registered first: e0,
        # then e1 inside the nested call, off the parent's list.
        assert calls == ["e0", "e1", "e0 done"]
    else:
        assert calls.count("e1") == 1 and calls.count("e0") == 1
