"""The child-process supervisor, with real forks, pidfds and signals."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from qiothread.errors import ChildProcessError_
from qiothread.process import ChildState, ReadyChannel, Supervisor

# -- helpers shared with the iothread tests -------------------------------


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in ticks), None if gone.

    (pid, start time) names one process for good; a pid alone may be
    reused.  A zombie counts as present: it is a leftover too.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The comm field may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def assert_gone(procs: Iterable[tuple[int, int]]) -> None:
    """Every (pid, start time) has left /proc (reaped, not a zombie)."""
    left = [(pid, st) for pid, st in procs if proc_start_time(pid) == st]
    assert not left, f"processes left behind: {left}"


def children_of(pid: int) -> list[int]:
    """Live children of ``pid`` according to /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                out.append(int(entry))
    return out


# -- child targets ----------------------------------------------------------


def _sleeper(ch: ReadyChannel) -> None:
    links = []
    for f in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{f}"))
        except FileNotFoundError:  # listdir's own descriptor
            pass
    ch.ready(tid=threading.get_native_id(), fds=links)
    while True:
        time.sleep(1)


def _stubborn(ch: ReadyChannel) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ch.ready()
    while True:
        time.sleep(1)


def _fails_early(ch: ReadyChannel) -> None:
    raise RuntimeError("no backend file")


def _silent(ch: ReadyChannel) -> None:
    time.sleep(60)


def _returns(ch: ReadyChannel) -> None:
    ch.ready(answer=42)


def _fails_later(ch: ReadyChannel) -> None:
    ch.ready()
    time.sleep(0.05)
    raise ValueError("queue 0 broke")


# -- tests ----------------------------------------------------------------


def test_start_ready_info_comm_and_stop() -> None:
    with Supervisor() as sup:
        c = sup.start("guest 'g0'", _sleeper, comm="guest g0")
        assert c.state is ChildState.RUNNING
        assert c.info["tid"] == c.pid  # the child's main thread
        comm = Path(f"/proc/{c.pid}/comm").read_text().strip()
        assert comm == "guest g0"
        st = proc_start_time(c.pid)
        assert st is not None
        assert sup.stop(c) == -signal.SIGTERM
        assert c.returncode == -signal.SIGTERM
        assert not c.alive
    assert_gone([(c.pid, st)])


def test_long_comm_is_cut_at_15_bytes() -> None:
    with Supervisor() as sup:
        c = sup.start("x", _sleeper, comm="IO a-very-long-iothread-id")
        comm = Path(f"/proc/{c.pid}/comm").read_text().strip()
    assert comm == "IO a-very-long-"


def test_target_returning_exits_zero_without_running_parent_code() -> None:
    with Supervisor() as sup:
        c = sup.start("guest 'g1'", _returns, may_exit=True)
        assert c.info == {"answer": 42}
        # Had the child returned into this test, it would have run the
        # rest of pytest; instead it left with status 0.
        assert c._wait(30)
        assert c.returncode == 0
        sup.check()  # finishing is fine for a may_exit child


def test_unexpected_clean_exit_is_still_an_error() -> None:
    with Supervisor() as sup:
        c = sup.start("iothread 'io1'", _returns)
        assert sup.wait_for_death(30) is c
        c.state = ChildState.RUNNING  # as if check() saw it first
        with pytest.raises(ChildProcessError_) as e:
            sup.check()
    assert str(e.value) == f"iothread 'io1' (pid {c.pid}) exited with " \
        "status 0"


def test_death_before_ready_is_reported_with_last_words() -> None:
    with Supervisor() as sup, pytest.raises(ChildProcessError_) as e:
        sup.start("iothread 'io9'", _fails_early)
    msg = str(e.value)
    assert msg.startswith("iothread 'io9' (pid ")
    assert msg.endswith(") exited with status 1 before it was ready: "
                        "RuntimeError: no backend file")


def test_ready_timeout_kills_the_child() -> None:
    with Supervisor() as sup:
        with pytest.raises(ChildProcessError_) as e:
            sup.start("guest 'slow'", _silent, ready_timeout=0.5)
        assert "was not ready within 0.5 s" in str(e.value)
        c = sup.children[0]
        assert c.returncode == -signal.SIGKILL
        assert children_of(os.getpid()) == []


def test_kill_9_is_detected_and_named() -> None:
    with Supervisor() as sup:
        c = sup.start("iothread 'io0'", _sleeper)
        st = proc_start_time(c.pid)
        assert st is not None
        sup.check()
        os.kill(c.pid, signal.SIGKILL)
        assert sup.wait_for_death(30) is c
        assert str(c.error()) == (
            f"iothread 'io0' (pid {c.pid}) was killed by signal 9 "
            "(SIGKILL)")
        assert_gone([(c.pid, st)])


def test_check_raises_for_a_crash() -> None:
    with Supervisor() as sup:
        c = sup.start("guest 'g2'", _fails_later)
        deadline = time.monotonic() + 30
        while c.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ChildProcessError_) as e:
            sup.check()
    assert str(e.value) == (f"guest 'g2' (pid {c.pid}) exited with "
                            "status 1: ValueError: queue 0 broke")


def test_stop_escalates_to_sigkill_after_timeout() -> None:
    with Supervisor() as sup:
        c = sup.start("guest 'stubborn'", _stubborn)
        t0 = time.monotonic()
        assert sup.stop(c, timeout=0.3) == -signal.SIGKILL
        assert time.monotonic() - t0 >= 0.3


def test_custom_stop_request_is_used() -> None:
    requested = []

    def ask(child: object) -> None:
        requested.append(child)
        os.kill(c.pid, signal.SIGUSR1)

    with Supervisor() as sup:
        c = sup.start("guest 'g3'", _sleeper, stop_request=ask)
        assert sup.stop(c) == -signal.SIGUSR1
    assert requested == [c]


def test_children_do_not_inherit_sibling_fds() -> None:
    with Supervisor() as sup:
        a = sup.start("a", _sleeper)
        extra_r, extra_w = os.pipe()
        sup.parent_only_fd(extra_r)
        sup.callback(os.close, extra_r)
        sup.callback(os.close, extra_w)
        b = sup.start("b", _sleeper)

        def link(fd: int) -> str:
            return os.readlink(f"/proc/self/fd/{fd}")

        assert link(a.pidfd) == "anon_inode:[pidfd]"
        assert link(a.pidfd) not in b.info["fds"]
        assert link(a._pipe_r) not in b.info["fds"]
        # A pipe's two ends share one inode name: the declared read end
        # was closed, the undeclared write end inherited.
        assert b.info["fds"].count(link(extra_r)) == 1


def test_cleanups_run_after_children_stop_even_on_error() -> None:
    seen: list[object] = []
    with pytest.raises(KeyboardInterrupt), Supervisor() as sup:
        c = sup.start("guest 'g4'", _sleeper)
        sup.callback(lambda: seen.append(("first", c.returncode)))
        sup.callback(lambda: seen.append(("second", c.returncode)))
        raise KeyboardInterrupt
    # Newest first, and the child was already reaped.
    assert seen == [("second", -signal.SIGTERM),
                    ("first", -signal.SIGTERM)]


# The scripts stand for a program started from a terminal.  One started
# in the background by a shell without job control (CI, ``make test &``)
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
# handler: restore the terminal's default first.
SIGINT_AS_IN_A_TERMINAL = (
    "import signal; signal.signal(signal.SIGINT, "
    "signal.default_int_handler)\n")

_SCRIPT = SIGINT_AS_IN_A_TERMINAL + """
import os, signal, sys, time, threading
from qiothread.process import Supervisor

def sleeper(ch):
    ch.ready()
    while True:
        time.sleep(1)

def stat_start(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.rindex(")") + 2:].split()[19]

marker = sys.argv[1]
with Supervisor() as sup:
    sup.handle_signals()
    sup.callback(lambda: open(marker, "w").write("cleaned"))
    kids = [sup.start(f"guest 'g{i}'", sleeper) for i in range(3)]
    for k in kids:
        print(k.pid, stat_start(k.pid), flush=True)
    print("ready", flush=True)
    while True:
        sup.check()
        time.sleep(0.05)
"""


def _run_script(tmp_path: Path) -> tuple[subprocess.Popen[str], Path,
                                         list[tuple[int, int]]]:
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), str(marker)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    kids = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        pid, st = line.split()
        kids.append((int(pid), int(st)))
    assert len(kids) == 3, proc.stderr.read() if proc.stderr else ""
    return proc, marker, kids


def communicate_or_kill(proc: subprocess.Popen[str],
                        timeout: float = 60) -> tuple[str, str]:
    """``proc.communicate`` that leaves no process behind on timeout
    (a later test's check for stray children would fail too)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_kill_leaves_no_child_behind(
        tmp_path: Path, signo: int) -> None:
    proc, marker, kids = _run_script(tmp_path)
    proc.send_signal(signo)
    _, err = communicate_or_kill(proc)
    if signo == signal.SIGINT:
        assert "KeyboardInterrupt" in err
        # Python re-raises SIGINT on itself after unwinding.
        assert proc.returncode == -signal.SIGINT
    else:
        assert proc.returncode == 128 + signal.SIGTERM
    assert marker.read_text() == "cleaned"
    assert_gone(kids)


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    proc, marker, kids = _run_script(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert not marker.exists()  # no clean-up ran: it was SIGKILL
    # PR_SET_PDEATHSIG killed them; init reaps them, give it a moment.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(proc_start_time(p) != st or _is_zombie(p) for p, st in kids):
            break
        time.sleep(0.05)
    for pid, st in kids:
        assert proc_start_time(pid) != st or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _report_sigmask(ch: ReadyChannel) -> None:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    ch.ready(blocked=sorted(int(s) for s in blocked),
             sigint=str(signal.getsignal(signal.SIGINT)))


def test_child_starts_with_sigint_ignored_not_blocked() -> None:
    with Supervisor() as sup:
        c = sup.start("guest 'g5'", _report_sigmask, may_exit=True)
    assert int(signal.SIGINT) not in c.info["blocked"]
    assert c.info["sigint"] == str(signal.SIG_IGN)
    # And the parent's own mask is as it was.
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK,
                                                       set())


def test_child_started_from_a_short_lived_thread_outlives_it() -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits; a child
    asked for by another thread (QMP's worker) must not die with it."""
    with Supervisor() as sup:
        got: list[object] = []
        t = threading.Thread(
            target=lambda: got.append(sup.start("guest 'g6'", _sleeper)))
        t.start()
        t.join()
        child = got[0]
        assert not isinstance(child, BaseException)
        time.sleep(0.2)
        sup.check()                 # still running
        assert sup.children[0].alive


_GO = os.eventfd(0)     # blocking; inherited by the child below


def _ready_on_go_then_exit(ch: ReadyChannel) -> None:
    os.eventfd_read(_GO)
    ch.ready(done=1)


def test_regression_ready_line_of_a_child_that_exited_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A child may send its ready line and exit before the parent looks.

    Made deterministic: the parent's first read of the pipe really
    comes before the child's write (the child waits for a go the read
    gives), and then the child exits.  The parent finds it dead and
    must still read what it left in the pipe instead of reporting
    "exited with status 0 before it was ready".
    """
    from qiothread.process import Child

    real = Child._read_pipe
    calls = []

    def read_before_the_child_wrote(self: Child) -> list[dict[str, object]]:
        calls.append(1)
        if len(calls) == 1:
            got = real(self)        # nothing there: the child waits
            assert got == []
            os.eventfd_write(_GO, 1)
            select.select([self.pidfd], [], [], 60)  # it writes, exits
            return got
        return real(self)

    monkeypatch.setattr(Child, "_read_pipe", read_before_the_child_wrote)
    with Supervisor() as sup:
        c = sup.start("guest 'g7'", _ready_on_go_then_exit, may_exit=True)
        assert c.info == {"done": 1}
        assert c.state is ChildState.RUNNING
        sup.check()                 # status 0 and may_exit: fine
