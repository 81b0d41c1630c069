"""Abuse of the AioContext: callbacks that change the context under it.

Handlers and BHs that delete or replace themselves or others while the
loop dispatches or polls, set_fd_handler from io_poll_begin, fds closed
while registered, notify storms and timers at extreme deadlines.  Each
case states what QEMU 7.2 does (reference §2, §4.2-§4.9, §7) and runs
on both fd monitors.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier

from .aio_helpers import kick_when_blocked, warm_notifier

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ns() -> Iterator[list[EventNotifier]]:
    notifiers = [EventNotifier() for _ in range(3)]
    yield notifiers
    for n in notifiers:
        n.close()


def settle(ctx: AioContext) -> None:
    """Accept the notifies of set-up; run what they made ready."""
    while ctx.aio_poll(False):
        pass


def polling_on(ctx: AioContext) -> None:
    """A budget far above any iteration, so that polling happens."""
    ctx.set_poll_params(10**12, 0, 0)
    ctx.poll_ns = 10**12


def test_read_handler_deletes_a_ready_sibling(
        ctx: AioContext, ns: list[EventNotifier]) -> None:
    """The sibling is on the ready list, deleted, and never called;
    poll_disable_cnt loses its +1; the node is freed by the walker."""
    a, b = ns[0], ns[1]
    ran: list[str] = []

    def read_a() -> None:
        a.test_and_clear()
        ran.append("a")
        ctx.set_event_notifier(b, None)

    def read_b() -> None:
        b.test_and_clear()
        ran.append("b")

    # b registered last: ppoll sees it first, so a is dispatched first.
    ctx.set_event_notifier(a, read_a)
    ctx.set_event_notifier(b, read_b)
    assert ctx.poll_disable_cnt == 2
    settle(ctx)
    node_b = ctx.fd_handlers[b.fileno()]
    if ctx.fdmon.name == "epoll":
        b.set()                 # epoll reports in readiness order
        a.set()
    else:
        a.set()
        b.set()
    ctx.aio_poll(True)
    assert ran == ["a"]
    assert ctx.poll_disable_cnt == 1
    assert node_b not in ctx.handlers
    assert b.fileno() not in ctx.fd_handlers


def test_read_handler_replaces_itself(
        ctx: AioContext, ns: list[EventNotifier]) -> None:
    """The new node does not run in the iteration that created it, has
    no poll hooks and is not in the poll set until it fires; the
    replacement with io_poll takes poll_disable_cnt back to 0."""
    a = ns[0]
    ran: list[str] = []

    def second() -> None:
        a.test_and_clear()
        ran.append("second")

    def first() -> None:
        ran.append("first")
        ctx.set_event_notifier(a, second, lambda: False, lambda: None)

    ctx.set_event_notifier(a, first)
    settle(ctx)
    a.set()
    ctx.aio_poll(True)
    assert ran == ["first"]
    assert ctx.poll_disable_cnt == 0
    node = ctx.fd_handlers[a.fileno()]
    assert not node.in_poll and node.io_poll_begin is None
    # The replacement's aio_notify makes the next iteration
    # non-blocking, and with every handler pollable it does not look at
    # the fds at all; the one after finds a still readable.
    assert ctx.aio_poll(True) is False
    assert ran == ["first"]
    ctx.aio_poll(True)
    assert ran == ["first", "second"]
    assert node.in_poll


def test_io_poll_begin_replaces_another_handler(
        ctx: AioContext, ns: list[EventNotifier]) -> None:
    """set_fd_handler from io_poll_begin: the old node is deferred (the
    walk holds it), its aio_notify ends polling without progress, and
    poll_set_started(false)'s final poll of the notifier then reports
    progress (reference §4.4, QEMU counts it)."""
    a, b = ns[0], ns[1]
    log: list[str] = []
    pending = [False]

    def begin_a() -> None:
        log.append("begin_a")
        ctx.set_event_notifier(b, lambda: log.append("b2"),
                               lambda: False, lambda: None)

    ctx.set_event_notifier(a, a.test_and_clear, lambda: pending[0],
                           lambda: log.append("ready_a"))
    ctx.set_event_notifier(b, lambda: log.append("b1"), lambda: False,
                           lambda: None)
    old_b = ctx.fd_handlers[b.fileno()]
    settle(ctx)
    a.set()
    while not ctx.fd_handlers[a.fileno()].in_poll:
        ctx.aio_poll(True)      # a fires once and joins the poll set
    warm_notifier(ctx)          # polling sees aio_notify from now on
    polling_on(ctx)
    ctx.set_event_notifier_poll(a, begin_a, lambda: log.append("end_a"))
    settle(ctx)
    log.clear()
    # Poll mode is entered (begin_a), which notifies; polling finds only
    # the notifier; poll mode ends (end_a) and its final poll hits the
    # notifier: progress, no wait.
    assert ctx.aio_poll(True) is True
    assert log == ["begin_a", "end_a"]
    assert old_b not in ctx.handlers            # freed at the end
    assert ctx.fd_handlers[b.fileno()] is not old_b
    assert ctx.poll_disable_cnt == 0


def test_io_poll_deletes_its_own_handler(
        ctx: AioContext, ns: list[EventNotifier]) -> None:
    """Deleted while polled: QEMU keeps polling the node until the walk
    ends, but a deleted node is never dispatched."""
    a = ns[0]
    log: list[str] = []
    armed = [False]

    def io_poll() -> bool:
        if armed[0]:
            armed[0] = False
            log.append("poll")
            ctx.set_event_notifier(a, None)
            return True
        return False

    ctx.set_event_notifier(a, a.test_and_clear, io_poll,
                           lambda: log.append("ready"))
    settle(ctx)
    a.set()
    while not ctx.fd_handlers[a.fileno()].in_poll:
        ctx.aio_poll(True)
    warm_notifier(ctx)
    polling_on(ctx)
    settle(ctx)
    node = ctx.fd_handlers[a.fileno()]
    armed[0] = True
    ctx.aio_poll(True)
    assert log == ["poll"]
    assert node not in ctx.handlers and a.fileno() not in ctx.fd_handlers
    assert ctx.poll_disable_cnt == 0


def test_bh_deletes_itself(ctx: AioContext) -> None:
    """qemu_bh_delete from its own callback: it ran once, it is queued
    once more (DELETED, with a notify) and freed without running."""
    runs: list[int] = []

    def cb() -> None:
        runs.append(1)
        bh.delete()
        bh.schedule()           # too late: DELETED wins

    bh = ctx.bh_new(cb)
    settle(ctx)
    bh.schedule()
    assert ctx.aio_poll(False) is True
    assert runs == [1]
    assert ctx.notified
    assert ctx._compute_timeout() == -1     # deleted: not a pending BH
    ctx.aio_poll(False)
    ctx.aio_poll(False)
    assert runs == [1]
    assert ctx._bhs.bh_list == [] and ctx._bhs.slices == []


def test_closed_fd_still_registered(ctx: AioContext) -> None:
    """A registered fd closed under the loop.  fdmon-poll: ppoll reports
    POLLNVAL, which matches no handler event, so nothing is called and
    every wait returns at once; a notify is still seen.  fdmon-epoll:
    the kernel drops the closed fd from the set, and deleting the
    handler then fails in epoll_ctl, which falls back to poll for good
    (fdmon_epoll_disable)."""
    r, w = os.pipe()
    called: list[str] = []
    ctx.set_fd_handler(r, lambda: called.append("read"))
    settle(ctx)
    os.close(r)
    os.close(w)
    if ctx.fdmon.name == "poll":
        t0 = time.monotonic()
        assert ctx.aio_poll(True) is False      # no wait: POLLNVAL
        assert time.monotonic() - t0 < 10
    t = kick_when_blocked(ctx) if ctx.fdmon.name == "epoll" else None
    ctx.aio_poll(True)
    if t is not None:
        t.join()
    assert called == []
    ctx.set_fd_handler(r, None)
    assert ctx.fdmon.name == "poll"
    assert ctx.poll_disable_cnt == 0
    settle(ctx)
    t = kick_when_blocked(ctx)
    ctx.aio_poll(True)          # blocks again, and wakes on notify
    t.join()


def test_notify_storm_is_one_wakeup(ctx: AioContext) -> None:
    """Thousands of aio_notify calls from threads while the loop sleeps
    wake it; the notifier's read drains the eventfd, so the next
    blocking aio_poll sleeps again until the next notify."""
    settle(ctx)
    go = threading.Event()

    def storm() -> None:
        go.wait()
        for _ in range(5000):
            ctx.notify()

    threads = [threading.Thread(target=storm) for _ in range(4)]
    for th in threads:
        th.start()
    k = threading.Thread(target=lambda: (
        _wait_blocked(ctx), go.set()))
    k.start()
    ctx.aio_poll(True)
    k.join()
    for th in threads:
        th.join()
    # Writes that landed while notify_me was still raised leave the
    # eventfd readable: each blocking aio_poll then returns at once
    # and its notifier read drains it.
    fd = ctx.notifier.fileno()
    for _ in range(3):
        if not select.select([fd], [], [], 0)[0]:
            break
        assert ctx.aio_poll(True) is False
    assert not select.select([fd], [], [], 0)[0]
    settle(ctx)
    assert not ctx.notified
    t = kick_when_blocked(ctx)
    ctx.aio_poll(True)
    t.join()


def _wait_blocked(ctx: AioContext) -> None:
    while ctx.notify_me == 0:
        time.sleep(0.0005)


@pytest.mark.parametrize("delta", [2**62, 10**18, -(2**62)])
def test_extreme_timer_deadlines(ctx: AioContext, delta: int) -> None:
    """A timer at an enormous deadline caps nothing (ppoll's seconds
    are clamped at INT32_MAX) and the loop still wakes on notify; one
    far in the past is due at once."""
    ran: list[int] = []
    t = ctx.timer_new_ns(lambda: ran.append(1))
    t.mod_ns(ctx.clock.now_ns() + delta)
    settle(ctx)
    if delta > 0:
        assert ran == []
        assert ctx._compute_timeout() > 10**17
        k = kick_when_blocked(ctx)
        ctx.aio_poll(True)
        k.join()
        assert ran == [] and t.pending()
        t.del_()
    else:
        assert ran == [1] and not t.pending()
