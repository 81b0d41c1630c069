"""Regression tests from the review of issue 2 against the reference.

Each test names the divergence it caught (reference section in the
docstring) and fails on the code as it was before the fix.
"""

from __future__ import annotations

import mmap
import signal
import subprocess
import sys
import threading
import time

import pytest

from qiothread.aio import AioContext
from qiothread.aio_handler import soonest
from qiothread.clock import VirtualClock
from qiothread.errors import ConfigError
from qiothread.event_notifier import EventNotifier
from qiothread.iothread import IOThread
from qiothread.keyval import parse_option
from qiothread.policy import adapt_poll_ns
from qiothread.process import Child, Supervisor
from qiothread.qom import ObjectRoot


def test_regression_soonest_compares_unsigned() -> None:
    """§4.1: qemu_soonest_timeout compares as uint64, so every negative
    value is "later" than any non-negative one, and of two negatives
    the one nearer zero (-1) is the latest."""
    assert soonest(-1, 5) == 5
    assert soonest(5, -1) == 5
    assert soonest(-1, -1) == -1
    assert soonest(0, -1) == 0
    assert soonest(-2, -1) == -2
    assert soonest(-1, -2) == -2
    assert soonest(-3, 7) == 7
    assert soonest(3, 7) == 3


def test_regression_infinite_wait_ends_on_a_signal(fdmon: str) -> None:
    """§7.1/§7.2: a signal ends an infinite wait with EINTR on both
    monitors (ppoll and epoll_wait return -1), so aio_poll returns
    without progress and the Python handler runs.  The epoll monitor
    used Python's epoll.poll, which retries after EINTR and kept the
    loop blocked until the next event."""
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    ctx = AioContext(fdmon=fdmon)
    main = threading.get_ident()
    done = threading.Event()

    def signal_the_blocked_loop() -> None:
        while ctx.notify_me == 0:
            time.sleep(0.0005)
        # Again and again: one that lands just before the loop enters
        # the syscall interrupts nothing.
        t_end = time.monotonic() + 20
        while not done.wait(0.05) and time.monotonic() < t_end:
            signal.pthread_kill(main, signal.SIGUSR1)
        # The fallback wake-up, long after the signals, so that a loop
        # that ignored EINTR is told apart from one that returned.
        if not done.is_set():
            ctx.notify()

    try:
        ctx.aio_poll(False)             # accept the notify of set-up
        t = threading.Thread(target=signal_the_blocked_loop)
        t.start()
        try:
            t0 = time.monotonic()
            assert ctx.aio_poll(True) is False
            waited = time.monotonic() - t0
        finally:
            done.set()
            t.join()
        assert got and set(got) == {signal.SIGUSR1}
        assert waited < 20, f"aio_poll blocked {waited:.1f} s"
    finally:
        signal.signal(signal.SIGUSR1, old)
        ctx.close()


@pytest.mark.parametrize("text", [
    "iothread,id=io0,poll-max-ns.x=1",
    "iothread,id=io0,poll-max-ns.0=1",
])
def test_regression_scalar_given_as_object_on_command_line(
        text: str) -> None:
    """The keyval visitor (qobject_input_get_keyval) answers a nested
    object or list where it wants a scalar with "Parameters 'x.*' are
    unexpected", not with a JSON type error."""
    root = ObjectRoot({"iothread": IOThread})
    with pytest.raises(ConfigError) as e:
        root.object_add(parse_option(text, "qom-type"))
    assert str(e.value) == "Parameters 'poll-max-ns.*' are unexpected"
    assert root.objects == {}


def test_regression_bool_given_as_object_on_command_line() -> None:
    v = parse_option("x.y=on,z=off").visitor()
    assert v.type_bool("z") is False
    with pytest.raises(ConfigError) as e:
        v.type_bool("x")
    assert str(e.value) == "Parameters 'x.*' are unexpected"


def test_regression_ctrl_c_right_after_ready_stops_the_iothread(
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C during ``-object iothread`` start, in the instant after
    the ready handshake and before IOThread kept its Child: finalize
    must still stop that process politely, at once.  It used to be
    left to the supervisor, whose stop request then failed on the
    released parameter block and waited 10 s before SIGKILL."""
    real = Supervisor._wait_ready

    def ready_then_interrupted(self: Supervisor, child: Child,
                               timeout: float) -> None:
        real(self, child, timeout)
        raise KeyboardInterrupt

    with Supervisor() as sup:
        root = ObjectRoot({"iothread": IOThread}, sup)
        monkeypatch.setattr(Supervisor, "_wait_ready",
                            ready_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            root.object_add(parse_option("iothread,id=io0", "qom-type"))
        monkeypatch.undo()
        assert root.objects == {}
        [child] = sup.children
        # Stopped by its own oneshot BH, exit status 0, and reaped.
        assert child.returncode == 0
    assert not [r for r in caplog.records if r.levelname in
                ("WARNING", "ERROR")], caplog.text


def test_regression_iothread_context_never_upgrades_to_epoll() -> None:
    """§5, §7.4: a 7.2 IOThread's context has no epoll fd (io_uring
    took its place, then the GSource destroyed io_uring), so it stays
    on fdmon-poll however many fds it watches.  qiothread's IOThread
    built its context with the bare-context default and switched to
    epoll at 64 fds."""
    shared = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
    word = memoryview(shared).cast("q")
    kick = EventNotifier()
    many = [EventNotifier() for _ in range(70)]

    def setup(ctx: AioContext) -> None:
        for n in many:
            ctx.set_event_notifier(n, n.test_and_clear)

        def on_kick() -> None:
            kick.test_and_clear()
            word[0] = 2 if ctx.fdmon.name == "epoll" else 1

        ctx.set_event_notifier(kick, on_kick)

    try:
        with Supervisor() as sup:
            io = IOThread("io0", supervisor=sup, start_on_complete=False)
            io.on_start(setup)
            try:
                io.complete()
                io.start()
                kick.set()
                deadline = time.monotonic() + 30
                while word[0] == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                assert word[0] == 1, "the iothread switched to epoll"
            finally:
                io.finalize()
    finally:
        for n in [kick, *many]:
            n.close()
        word.release()
        shared.close()


def test_regression_timer_armed_in_the_past_goes_first() -> None:
    """§4.9 (timer_mod_ns): the place in the list is found with the
    deadline as given, and only the stored value is clamped at 0.  A
    timer armed at a negative time therefore goes before one already
    due at 0 and, as the new head, notifies the context."""
    clock = VirtualClock(0)
    ctx = AioContext(clock=clock)
    try:
        order: list[str] = []
        due = ctx.timer_new_ns(lambda: order.append("due at 0"))
        past = ctx.timer_new_ns(lambda: order.append("armed at -5"))
        due.mod_ns(0)
        ctx.notify_accept()
        past.mod_ns(-5)
        assert past.expire_time == 0
        assert ctx.notified                 # the head changed
        assert ctx.aio_poll(False) is True
        assert order == ["armed at -5", "due at 0"]
    finally:
        ctx.close()


_READ_AFTER_CLOSE = """
from qiothread.aio import AioContext
from qiothread.iothread import IOThread
from qiothread.process import Supervisor

def read(ctx):
    try:
        print(ctx.notify_me, flush=True)
    except ValueError as e:
        print("ValueError", flush=True)

ctx = AioContext()
read(ctx)
ctx.close()
read(ctx)
with Supervisor() as sup:
    io = IOThread("io0", supervisor=sup)
    io.complete()
    kept = io.ctx
    io.finalize()
    read(kept)
"""


def test_regression_closed_context_does_not_crash_the_process() -> None:
    """``notify_me`` is an atomic view of the control block's mapping.
    Closing a context (or finalizing an IOThread) unmapped it, so a
    thread that still read it (a kicker, a monitor) took the whole
    process down with SIGSEGV.  Now such a read is an exception."""
    r = subprocess.run([sys.executable, "-c", _READ_AFTER_CLOSE],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.split() == ["0", "ValueError", "ValueError"]


INT64_MAX = (1 << 63) - 1


def test_regression_poll_ns_arithmetic_wraps_as_int64() -> None:
    """§4.5: poll_ns is an int64 and QEMU is built with -fwrapv, so a
    grow step past 2**63 wraps (here to a negative budget) instead of
    being capped at poll-max-ns; the shrink then divides truncating
    toward zero.  A negative budget is the "soonest" only unsigned
    (§4.1), so the loop polls exactly one pass."""
    ctx = AioContext(clock=VirtualClock(0))
    try:
        ctx.set_poll_params(INT64_MAX, 2**53, 0)
        # 4000 * 2**53 = 1952 * 2**53 (mod 2**64), which is >= 2**63.
        assert adapt_poll_ns(ctx, 4000, 5000) == -96 * 2**53
        ctx.set_poll_params(10, 0, 3)
        assert adapt_poll_ns(ctx, -7, 11) == -2    # C: -7 / 3 == -2
        assert soonest(-1, -96 * 2**53) == -96 * 2**53
    finally:
        ctx.close()
