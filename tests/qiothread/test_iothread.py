"""IOThread processes: start, thread id, stop, crash, live parameters.

Every test runs real iothread processes (fork, eventfds, a shared
mapping) and checks /proc afterwards for anything left behind.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qiothread import trace
from qiothread.aio import AioContext
from qiothread.errors import ChildProcessError_, ConfigError, QMPCommandError
from qiothread.iothread import IOThread
from qiothread.process import ChildState, Supervisor
from qiothread.qom import ObjectRoot
from tests.qiothread.iothread_helpers import add, iothread_root, wait_until
from tests.qiothread.test_process import (
    SIGINT_AS_IN_A_TERMINAL,
    assert_gone,
    children_of,
    communicate_or_kill,
    proc_start_time,
)


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    with Supervisor() as s:
        yield s
    assert children_of(os.getpid()) == []


@pytest.fixture
def root(sup: Supervisor) -> Iterator[ObjectRoot]:
    with iothread_root(sup) as r:
        yield r


def test_start_thread_id_comm_and_clean_stop(root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0")
    assert io.child is not None
    pid = io.child.pid
    start = proc_start_time(pid)
    assert start is not None
    # The loop runs in the process's main thread: its TID is the pid.
    assert io.thread_id == pid
    assert io.loop_state()["thread_id"] == pid
    assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
    assert Path(f"/proc/{pid}/comm").read_text() == "IO io0\n"
    io.check()

    t0 = time.monotonic()
    assert io.stop() == 0                  # the loop ended: exit 0
    assert time.monotonic() - t0 < 10      # not the kill after timeout
    assert io.child.state is ChildState.EXITED
    assert_gone([(pid, start)])
    io.check()                             # a requested stop is fine


def test_crash_is_detected_and_reported(
        root: ObjectRoot, sup: Supervisor) -> None:
    io = add(root, "iothread,id=io0")
    other = add(root, "iothread,id=io1")
    assert io.child is not None and other.child is not None
    pid, start = io.child.pid, proc_start_time(io.child.pid)
    assert start is not None
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: not io.alive)       # the pidfd reports the exit
    with pytest.raises(ChildProcessError_) as e:
        io.check()
    assert str(e.value) == (f"iothread 'io0' (pid {pid}) was killed by "
                            "signal 9 (SIGKILL)")
    assert_gone([(pid, start)])
    # The survivor is untouched; removing the dead one does not hang.
    other.check()
    root.object_del("io0")
    assert other.alive


def test_supervisor_check_names_a_crashed_iothread(
        root: ObjectRoot, sup: Supervisor) -> None:
    io = add(root, "iothread,id=io7")
    assert io.child is not None
    io.child.send_signal(signal.SIGUSR2)
    wait_until(lambda: not io.alive)
    with pytest.raises(ChildProcessError_) as e:
        sup.check()
    assert str(e.value) == (f"iothread 'io7' (pid {io.child.pid}) was "
                            "killed by signal 12 (SIGUSR2)")


def test_failure_in_the_iothread_before_ready(root: ObjectRoot) -> None:
    io = IOThread("io3", start_on_complete=False)
    try:
        def broken(ctx: AioContext) -> None:
            raise OSError(9, "Bad file descriptor")

        io.on_start(broken)
        io.complete()
        with pytest.raises(ChildProcessError_) as e:
            io.start()
        assert io.child is None or not io.alive
        assert "iothread 'io3'" in str(e.value)
        assert str(e.value).endswith(
            "exited with status 1 before it was ready: "
            "OSError: [Errno 9] Bad file descriptor")
    finally:
        io.finalize()


def _trace_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("fdmon", ["poll", "epoll"])
def test_live_poll_max_ns_change_reaches_the_loop(
        root: ObjectRoot, tmp_path: Path, fdmon: str) -> None:
    """poll-max-ns 0 -> 65536 from the main process while the loop runs.

    The loop applies it (set_poll_params: poll_ns back to 0, then grown
    from 0), polling starts (poll rounds in the statistics and the
    run_poll_handlers trace), and no fd handler was added for it: the
    context still has only its own notifier and poll_disable_cnt 0.
    """
    log = tmp_path / "trace.log"
    io = IOThread("io0", supervisor=root.supervisor, fdmon=fdmon,
                  start_on_complete=False)
    io.set("poll-max-ns", 0)
    io.on_start(lambda ctx: trace.configure(
        ["poll_*", "run_poll_handlers_*"], file=str(log)))
    io.complete()
    io.start()
    root.objects["io0"] = io

    state = io.loop_state()
    assert (state["poll_max_ns"], state["poll_disable_cnt"],
            state["fd_handlers"]) == (0, 0, 1)
    # With polling off nothing polls and nothing adapts.
    time.sleep(0.05)
    stats = io.poll_stats()
    assert (stats["poll_rounds"], stats["grow"], stats["poll_ns"]) == \
        (0, 0, 0)
    assert _trace_lines(log) == []

    t_set = time.monotonic_ns()
    root.qom_set("/objects/io0", "poll-max-ns", 65536)
    wait_until(lambda: io.loop_state()["applied_seq"]
               == io.loop_state()["seq"])
    state = io.loop_state()
    assert state["poll_max_ns"] == 65536
    assert state["params_applied_ns"] > t_set
    # Not through an fd handler: polling is still possible.
    assert (state["poll_disable_cnt"], state["fd_handlers"]) == (0, 1)

    # The iteration the change wakes blocked long (a shrink, 0 -> 0).
    # A short one (poll_ns grows from 0) and then polling need activity
    # while the loop runs: a notify after its notify_accept.  A burst
    # may well end before a loaded machine even schedules the loop,
    # so keep notifying, without pause, until the loop has polled.
    notifier = _notifier(io)
    deadline = time.monotonic() + 30
    while io.poll_stats()["poll_rounds"] == 0:
        assert time.monotonic() < deadline, io.poll_stats()
        for _ in range(1000):
            notifier()
    stats = io.poll_stats()
    assert stats["grow"] >= 1
    # Where poll_ns has been since (time per bit length; 4000 has 12
    # bits, 65536 17).  Not its value now: an idle block after the
    # polling round may already have shrunk it back to 0.
    hist = stats["poll_ns_hist"]
    assert any(hist.get(k, 0) > 0 for k in range(12, 18)), stats
    assert all(k <= 17 for k in hist), stats

    lines = _trace_lines(log)
    adapt = [ln for ln in lines if ln.startswith(("poll_grow", "poll_shr"))]
    # The first adjustment after the change starts from a reset budget.
    assert " old 0 new " in adapt[0], lines
    grow = next(ln for ln in adapt if ln.startswith("poll_grow"))
    assert grow.endswith(" old 0 new 4000"), lines
    begins = [ln for ln in lines if ln.startswith("run_poll_handlers_b")]
    assert begins and " max_ns 4000 " in begins[0], lines
    # The round is counted just before its end line is written.
    wait_until(lambda: any(ln.startswith("run_poll_handlers_end")
                           for ln in _trace_lines(log)))
    assert io.stop() == 0


def _notifier(io: IOThread) -> Callable[[], None]:
    assert io._notifier is not None
    return io._notifier.notify


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])          # utime + stime


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


@pytest.mark.slow
def test_idle_iothread_with_polling_on_uses_under_1_percent(
        root: ObjectRoot) -> None:
    """Defaults (poll-max-ns 32768).  Some activity first, so that the
    context notifier is in the poll set and the loop has polled: polling
    is really on.  Then 5 s of idleness: the loop stays blocked in ppoll
    and costs nothing."""
    io = add(root, "iothread,id=io0")
    assert io.child is not None
    pid = io.child.pid
    notifier = _notifier(io)
    deadline = time.monotonic() + 60
    while io.poll_stats()["poll_rounds"] < 10:
        assert time.monotonic() < deadline, io.poll_stats()
        for _ in range(100):
            notifier()
        time.sleep(0.001)
    time.sleep(0.2)                            # let the last round end
    before = io.poll_stats()
    ticks0, ns0, t0 = _cpu_ticks(pid), _cpu_ns(pid), time.monotonic()
    time.sleep(5.0)
    ticks1, ns1, t1 = _cpu_ticks(pid), _cpu_ns(pid), time.monotonic()
    after = io.poll_stats()
    hz = os.sysconf("SC_CLK_TCK")
    wall = t1 - t0
    share_stat = (ticks1 - ticks0) / hz / wall
    share_sched = (ns1 - ns0) / 1e9 / wall
    print(f"idle iothread CPU over {wall:.2f} s: /proc/PID/stat "
          f"{100 * share_stat:.3f}%, schedstat {100 * share_sched:.4f}%")
    assert share_stat < 0.01
    assert share_sched < 0.01
    # Idle means idle: no iterations, no polling during the window.
    assert after["iterations"] == before["iterations"]
    assert after["poll_rounds"] == before["poll_rounds"]


_SCRIPT = SIGINT_AS_IN_A_TERMINAL + """
import sys, time
from qiothread.iothread import IOThread
from qiothread.keyval import parse_option
from qiothread.process import Supervisor
from qiothread.qom import ObjectRoot

def start_time(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.rindex(")") + 2:].split()[19]

with Supervisor() as sup:
    root = ObjectRoot({"iothread": IOThread}, sup)
    sup.callback(root.close)
    sup.callback(lambda: open(sys.argv[1], "w").write("cleaned"))
    for i in range(2):
        io = root.object_add(parse_option(f"iothread,id=io{i}", "qom-type"))
        print(io.child.pid, start_time(io.child.pid), flush=True)
    print("ready", flush=True)
    while True:
        sup.check()
        time.sleep(0.05)
"""


def test_ctrl_c_leaves_no_iothread_behind(tmp_path: Path) -> None:
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
    assert len(kids) == 2
    assert all(Path(f"/proc/{p}/comm").read_text().startswith("IO io")
               for p, _ in kids)
    proc.send_signal(signal.SIGINT)
    _, err = communicate_or_kill(proc)
    assert "KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT
    assert marker.read_text() == "cleaned"
    assert_gone(kids)


def test_params_are_copied_under_the_sequence_lock(
        root: ObjectRoot) -> None:
    """Every set of parameters the loop applies is one the main process
    published whole, never a mix of two."""
    seen = mmap.mmap(-1, 16, mmap.MAP_SHARED)     # [applies, mixed]
    counts = memoryview(seen).cast("q")

    def instrument(ctx: AioContext) -> None:
        apply = ctx.set_poll_params

        def checked(max_ns: int, grow: int, shrink: int) -> None:
            counts[0] += 1
            if not max_ns == grow == shrink:
                counts[1] += 1
            apply(max_ns, grow, shrink)

        ctx.set_poll_params = checked  # type: ignore[method-assign]

    io = IOThread("io0", supervisor=root.supervisor,
                  start_on_complete=False)
    io.set("poll-grow", 32768)
    io.set("poll-shrink", 32768)
    io.on_start(instrument)
    io.complete()
    io.start()
    root.objects["io0"] = io
    for k in range(1, 20001):
        # One publication that changes all three words at once.
        io._values.update({"poll-max-ns": k, "poll-grow": k,
                           "poll-shrink": k})
        io._publish(pool=False)
    wait_until(lambda: io.loop_state()["applied_seq"]
               == io.loop_state()["seq"])
    assert io.loop_state()["poll_max_ns"] == 20000
    applies, mixed = counts[0], counts[1]
    counts.release()
    seen.close()
    assert applies >= 2
    assert mixed == 0


def test_thread_id_is_minus_one_until_started(root: ObjectRoot) -> None:
    io = IOThread("io5", supervisor=root.supervisor,
                  start_on_complete=False)
    root.objects["io5"] = io
    io.complete()
    assert io.info()["thread-id"] == -1
    assert io.stop() is None
    io.start()
    assert io.info()["thread-id"] == io.thread_id > 0


def test_exception_in_the_loop_is_reported_with_its_text(
        root: ObjectRoot) -> None:
    io = IOThread("io0", supervisor=root.supervisor,
                  start_on_complete=False)
    root.objects["io0"] = io

    def bad_bh() -> None:
        raise ZeroDivisionError("division by zero")

    io.on_start(lambda ctx: ctx.bh_schedule_oneshot(bad_bh))
    io.complete()
    io.start()                      # ready first, then the BH runs
    assert io.child is not None
    wait_until(lambda: not io.alive)
    with pytest.raises(ChildProcessError_) as e:
        io.check()
    assert str(e.value) == (
        f"iothread 'io0' (pid {io.child.pid}) exited with status 1: "
        "ZeroDivisionError: division by zero")


def test_stop_kills_an_iothread_stuck_in_a_callback(
        root: ObjectRoot) -> None:
    io = IOThread("io0", supervisor=root.supervisor,
                  start_on_complete=False)
    root.objects["io0"] = io
    io.on_start(lambda ctx: ctx.bh_schedule_oneshot(
        lambda: time.sleep(3600)))
    io.complete()
    io.start()
    assert io.stop(timeout=0.3) == -signal.SIGKILL


def test_stop_ends_a_sigstopped_iothread(root: ObjectRoot) -> None:
    """A stopped process answers no stop request; SIGKILL still ends
    it (and it is reaped, not left as a zombie)."""
    io = add(root, "iothread,id=io0")
    assert io.child is not None
    pid, st = io.child.pid, proc_start_time(io.child.pid)
    assert st is not None
    io.child.send_signal(signal.SIGSTOP)
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text()
               .rsplit(")", 1)[1].split()[0] == "T")
    assert io.stop(timeout=0.3) == -signal.SIGKILL
    assert_gone([(pid, st)])


def test_object_del_refused_while_in_use(root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0")
    io.users += 1
    with pytest.raises(QMPCommandError) as e:
        root.object_del("io0")
    assert str(e.value) == "object 'io0' is in use, can not be deleted"
    assert io.alive
    io.users -= 1
    root.object_del("io0")
    # Stopped cleanly and reaped.
    assert io.child is not None and io.child.returncode == 0


def test_qom_set_resets_a_grown_poll_ns(root: ObjectRoot) -> None:
    """A qom-set lands as QEMU's does: the iteration its notify wakes
    adapts from the reset poll_ns (an idle block then shrinks 0 to 0),
    and that iteration accepts the notify, so the loop goes straight
    back to sleep: exactly one more iteration, poll_ns exactly 0.

    poll-max-ns is 1 ms so that Python's own iteration time (tens of
    microseconds) counts as a short block and the budget can grow;
    poll-shrink=2 means only the reset can bring it from >=128000 to 0.
    """
    io = add(root, "iothread,id=io0,poll-max-ns=1000000,poll-shrink=2")
    notifier = _notifier(io)
    deadline = time.monotonic() + 60
    while io.poll_stats()["poll_ns"] < 128000:
        assert time.monotonic() < deadline, io.poll_stats()
        for _ in range(200):
            notifier()              # activity: short iterations grow it
        time.sleep(0.001)
    # Idle: the loop blocks (a block over 1 ms halves poll_ns once at
    # most per iteration, and an idle loop makes one iteration).
    time.sleep(0.05)
    before = io.poll_stats()
    assert before["poll_ns"] >= 64000

    root.qom_set("/objects/io0", "poll-grow", 2)
    wait_until(lambda: io.loop_state()["applied_seq"]
               == io.loop_state()["seq"])
    time.sleep(0.1)                 # a second iteration would show now
    after = io.poll_stats()
    state = io.loop_state()
    assert (state["poll_grow"], state["poll_disable_cnt"]) == (2, 0)
    assert after["poll_ns"] == 0, before
    assert after["iterations"] == before["iterations"] + 1
    assert after["shrink"] == before["shrink"] + 1      # 0 -> 0


def _workers(pid: int) -> int:
    """Threads of the iothread process besides its loop thread."""
    return len(os.listdir(f"/proc/{pid}/task")) - 1


def test_regression_thread_pool_bounds_reach_the_pool(
        sup: Supervisor) -> None:
    """thread-pool-min/max used to be stored and shown but never handed
    to the context's pool, which ran with 0/64 whatever they said.

    QEMU spawns workers up to thread-pool-min as soon as the pool exists
    (thread_pool_update_params), so the pool made in the iothread shows
    exactly that many worker threads, and a qom-set of a larger min
    adds more in the running loop.
    """
    from blockdev.thread_pool import aio_get_thread_pool

    root = ObjectRoot({"iothread": IOThread}, sup,
                      type_options={"iothread": {
                          "start_on_complete": False}})
    try:
        io = add(root, "iothread,id=io0,thread-pool-min=3,"
                       "thread-pool-max=8")
        io.on_start(aio_get_thread_pool)
        io.start()
        assert io.child is not None
        pid = io.child.pid
        wait_until(lambda: _workers(pid) == 3)
        root.qom_set("/objects/io0", "thread-pool-min", 5)
        wait_until(lambda: _workers(pid) == 5)
        assert io.loop_state()["thread_pool_min"] == 5
        # A refused pair leaves the pool as it was (the §8.1 quirk keeps
        # only the property value).
        with pytest.raises(ConfigError):
            root.qom_set("/objects/io0", "thread-pool-min", 100)
        time.sleep(0.2)
        assert _workers(pid) == 5
        assert io.loop_state()["thread_pool_min"] == 5
    finally:
        root.close()
