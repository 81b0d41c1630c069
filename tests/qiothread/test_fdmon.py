"""The fd monitors: ppoll with ns timeouts, epoll, and the upgrade."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest

from qiothread.aio import AioContext, AioHandler
from qiothread.event_notifier import EventNotifier
from qiothread.fdmon_epoll import (
    EPOLL_ENABLE_THRESHOLD,
    EPOLL_MAX_EVENTS,
    EpollMonitor,
)
from qiothread.fdmon_poll import PollFd, PollMonitor, ppoll_ns

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def many() -> Iterator[list[EventNotifier]]:
    ns = [EventNotifier() for _ in range(200)]
    yield ns
    for n in ns:
        n.close()


def test_ppoll_ns_timeout_is_never_short() -> None:
    e = EventNotifier()
    fds = (PollFd * 1)()
    fds[0].fd, fds[0].events = e.fileno(), 1
    for ns in (1, 50_000, 300_000, 1_500_000):
        t = time.monotonic_ns()
        assert ppoll_ns(fds, 1, ns) == 0
        assert time.monotonic_ns() - t >= ns
    e.set()
    assert ppoll_ns(fds, 1, -1) == 1 and fds[0].revents == 1
    e.close()


def test_ppoll_eintr_is_nothing_ready_and_the_handler_runs() -> None:
    e = EventNotifier()
    fds = (PollFd * 1)()
    fds[0].fd, fds[0].events = e.fileno(), 1
    got: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda s, f: got.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert ppoll_ns(fds, 1, -1) == 0    # interrupted, not ready
        time.sleep(0)                        # let the handler run
        assert got == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        e.close()


def test_monitor_is_chosen_by_name() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="unknown fd monitor"):
        AioContext(fdmon="select")
    assert set(os.listdir("/proc/self/fd")) == before
    for name, cls in (("poll", PollMonitor), ("epoll", EpollMonitor)):
        ctx = AioContext(fdmon=name)
        assert type(ctx.fdmon) is cls and ctx.fdmon.name == name
        assert not ctx.fdmon.supports_polling
        ctx.close()


def test_wait_reports_each_ready_fd_once(ctx: AioContext,
                                         many: list[EventNotifier]) -> None:
    for e in many[:20]:
        ctx.set_event_notifier(e, e.test_and_clear)
    ctx.aio_poll(False)
    for e in many[:20:3]:
        e.set()
    ready: list[AioHandler] = []
    ctx.fdmon.wait(ready, 0)
    assert sorted(n.fd for n in ready) == sorted(
        e.fileno() for e in many[:20:3])
    assert all(n.revents & 1 for n in ready)
    for n in ready:
        n.ready_list = None


def test_positive_timeout_waits_that_long(ctx: AioContext) -> None:
    e = EventNotifier()
    ctx.set_event_notifier(e, e.test_and_clear)
    ctx.aio_poll(False)
    ready: list[AioHandler] = []
    t = time.monotonic_ns()
    # epoll: the epoll fd is ppoll'ed first with the ns timeout.
    assert ctx.fdmon.wait(ready, 2_000_000) == 0
    assert time.monotonic_ns() - t >= 2_000_000
    assert ready == []
    e.set()
    assert ctx.fdmon.wait(ready, 2_000_000) == 1
    ctx.set_event_notifier(e, None)
    e.close()


def test_epoll_takes_at_most_128_events_per_wait(
        many: list[EventNotifier]) -> None:
    ctx = AioContext(fdmon="epoll")
    try:
        for e in many:
            ctx.set_event_notifier(e, e.test_and_clear)
            e.set()
        ready: list[AioHandler] = []
        assert ctx.fdmon.wait(ready, -1) == EPOLL_MAX_EVENTS
        assert len(ready) == EPOLL_MAX_EVENTS
        for n in ready:
            n.ready_list = None
        # Level-triggered: the rest stays ready for the next wait.
        ready2: list[AioHandler] = []
        ctx.fdmon.wait(ready2, 0)
        assert len(ready2) == EPOLL_MAX_EVENTS
        for n in ready2:
            n.ready_list = None
    finally:
        ctx.close()


def test_epoll_update_add_modify_delete(
        many: list[EventNotifier]) -> None:
    ctx = AioContext(fdmon="epoll")
    try:
        e = many[0]
        ran: list[str] = []
        ctx.set_event_notifier(e, lambda: ran.append("a"))
        ctx.set_event_notifier(e, lambda: (ran.append("b"),
                                           e.test_and_clear()))
        ctx.aio_poll(False)
        e.set()
        ctx.aio_poll(True)
        assert ran == ["b"]
        ctx.set_event_notifier(e, None)
        e.set()
        ready: list[AioHandler] = []
        assert ctx.fdmon.wait(ready, 0) == 0
    finally:
        ctx.close()


def test_upgrade_to_epoll_at_64_fds(many: list[EventNotifier]) -> None:
    ctx = AioContext(fdmon="poll")
    try:
        # The ctx notifier is one fd: 62 more make 63.
        for e in many[:EPOLL_ENABLE_THRESHOLD - 2]:
            ctx.set_event_notifier(e, e.test_and_clear)
        assert len(ctx.fd_handlers) == EPOLL_ENABLE_THRESHOLD - 1
        ctx.aio_poll(False)
        ctx.aio_poll(False)
        assert isinstance(ctx.fdmon, PollMonitor)
        e64 = many[EPOLL_ENABLE_THRESHOLD]
        ctx.set_event_notifier(e64, e64.test_and_clear)
        ctx.aio_poll(False)
        assert isinstance(ctx.fdmon, EpollMonitor)
        # Registrations carried over: a ready fd is dispatched.
        many[5].set()
        ctx.aio_poll(True)
        assert not many[5].test_and_clear()
        # No downgrade when the count falls again.
        for e in many[:40]:
            ctx.set_event_notifier(e, None)
        ctx.aio_poll(False)
        assert isinstance(ctx.fdmon, EpollMonitor)
    finally:
        ctx.close()


def test_no_upgrade_when_disabled(many: list[EventNotifier]) -> None:
    ctx = AioContext(fdmon="poll", epoll_upgrade=False)
    try:
        for e in many[:100]:
            ctx.set_event_notifier(e, e.test_and_clear)
        ctx.aio_poll(False)
        many[99].set()
        ctx.aio_poll(True)
        assert not many[99].test_and_clear()
        assert isinstance(ctx.fdmon, PollMonitor)
    finally:
        ctx.close()


def test_epoll_ctl_failure_falls_back_to_poll() -> None:
    """A regular file cannot be watched by epoll (EPERM): QEMU's
    fdmon_epoll_disable goes back to poll for good."""
    ctx = AioContext(fdmon="epoll")
    with tempfile.TemporaryFile() as f:
        ran: list[int] = []
        try:
            ctx.set_fd_handler(f.fileno(), lambda: ran.append(1))
            assert isinstance(ctx.fdmon, PollMonitor)
            ctx.aio_poll(False)
            ctx.aio_poll(True)    # a regular file is always readable
            assert ran
            ctx.set_fd_handler(f.fileno(), None)
        finally:
            ctx.close()


def test_poll_array_grows_past_eight(many: list[EventNotifier]) -> None:
    ctx = AioContext(fdmon="poll")
    try:
        for e in many[:30]:
            ctx.set_event_notifier(e, e.test_and_clear)
        ctx.aio_poll(False)
        many[29].set()
        ctx.aio_poll(True)
        assert not many[29].test_and_clear()
        assert isinstance(ctx.fdmon, PollMonitor)
        assert len(ctx.fdmon._fds) == 32
    finally:
        ctx.close()


def test_fds_are_closed_by_close() -> None:
    before = set(os.listdir("/proc/self/fd"))
    ctx = AioContext(fdmon="epoll")
    ctx.close()
    assert set(os.listdir("/proc/self/fd")) == before
