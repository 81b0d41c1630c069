"""CPU time of processes and threads over a run (``pidstat -t`` style).

Two sources, the same numbers:

- **taskstats** (genetlink family ``TASKSTATS``, through pyroute2): a
  ``TASKSTATS_CMD_GET`` with ``TASKSTATS_CMD_ATTR_PID`` answers for one
  task (a thread id) with ``ac_utime``/``ac_stime`` in microseconds,
  ``nvcsw``/``nivcsw`` context switches and ``ac_minflt``/``ac_majflt``.
  It needs ``CAP_NET_ADMIN`` (root here) and a kernel with
  ``CONFIG_TASKSTATS``;
- **/proc** as the fallback: ``/proc/<pid>/task/<tid>/stat`` fields 10,
  12, 14 and 15 (minflt, majflt, utime, stime; times in clock ticks,
  ``sysconf(SC_CLK_TCK)``, so 10 ms granularity at the usual 100 Hz)
  and ``voluntary_ctxt_switches``/``nonvoluntary_ctxt_switches`` from
  ``/proc/<pid>/task/<tid>/status``.

A process's figure is the sum over its threads alive at the moment of
the snapshot (both sources), so time of threads that exited between two
snapshots is not counted: take snapshots of a process while its threads
live, as iothreads' do for the whole run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol

from qiothread.report.model import CpuUsage

__all__ = ["CpuSampler", "ProcReader", "TaskCpu", "TaskstatsReader",
           "usage_between"]


@dataclasses.dataclass(frozen=True)
class TaskCpu:
    """Cumulative CPU counters of a task (or a sum of tasks)."""

    user_ns: int = 0
    system_ns: int = 0
    ctx: int = 0  #: voluntary + involuntary context switches
    minflt: int = 0
    majflt: int = 0

    def __add__(self, other: TaskCpu) -> TaskCpu:
        return TaskCpu(self.user_ns + other.user_ns,
                       self.system_ns + other.system_ns,
                       self.ctx + other.ctx, self.minflt + other.minflt,
                       self.majflt + other.majflt)


def usage_between(before: TaskCpu, after: TaskCpu) -> CpuUsage:
    """What was used between two snapshots, as the report's type."""
    return CpuUsage(user_s=(after.user_ns - before.user_ns) / 1e9,
                    system_s=(after.system_ns - before.system_ns) / 1e9,
                    ctx=after.ctx - before.ctx,
                    majf=after.majflt - before.majflt,
                    minf=after.minflt - before.minflt)


class Reader(Protocol):
    """A source of per-task counters."""

    name: str

    def task(self, pid: int, tid: int) -> TaskCpu: ...


class ProcReader:
    """Counters from ``/proc/<pid>/task/<tid>/{stat,status}``."""

    name = "proc"

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self._tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def task(self, pid: int, tid: int) -> TaskCpu:
        """:raises ProcessLookupError: the task is gone."""
        base = self.proc / str(pid) / "task" / str(tid)
        try:
            stat = (base / "stat").read_text()
            status = (base / "status").read_text()
        except FileNotFoundError:
            raise ProcessLookupError(f"no task {pid}/{tid}") from None
        # The command name may hold spaces and parentheses: split after
        # the last ')'.  Fields from there on start at field 3 (state).
        fields = stat.rsplit(")", 1)[1].split()
        minflt, majflt = int(fields[7]), int(fields[9])
        utime, stime = int(fields[11]), int(fields[12])
        ctx = 0
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches",
                       "nonvoluntary_ctxt_switches"):
                ctx += int(value)
        return TaskCpu(utime * self._tick_ns, stime * self._tick_ns, ctx,
                       minflt, majflt)


class TaskstatsReader:
    """Counters from the taskstats genetlink family (root only).

    :raises OSError: when the family cannot be bound (not root, or no
        ``CONFIG_TASKSTATS``); use :class:`ProcReader` then.
    """

    name = "taskstats"

    def __init__(self) -> None:
        from pyroute2 import TaskStats
        self._sock: Any = TaskStats()
        try:
            self._sock.bind()
        except Exception as err:
            self._sock.close()
            raise OSError(f"taskstats unavailable: {err}") from err

    def task(self, pid: int, tid: int) -> TaskCpu:
        """:raises ProcessLookupError: the task is gone."""
        try:
            msg = self._sock.get_pid_stat(tid)[0]
        except Exception as err:  # pyroute2 wraps ESRCH in its own type
            raise ProcessLookupError(f"no task {tid}: {err}") from err
        st = msg.get_attr("TASKSTATS_TYPE_AGGR_PID").get_attr(
            "TASKSTATS_TYPE_STATS")
        return TaskCpu(st["ac_utime"] * 1000, st["ac_stime"] * 1000,
                       st["nvcsw"] + st["nivcsw"], st["ac_minflt"],
                       st["ac_majflt"])

    def close(self) -> None:
        """Release the netlink socket."""
        self._sock.close()


class CpuSampler:
    """Snapshots of processes and threads, from the best source.

    ``prefer`` is ``"taskstats"``, ``"proc"`` or None (taskstats when it
    binds, else /proc).  Use as a context manager, or call ``close``.
    """

    def __init__(self, prefer: str | None = None,
                 proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self._taskstats: TaskstatsReader | None = None
        self.reader: Reader
        if prefer not in (None, "taskstats", "proc"):
            raise ValueError(f"unknown CPU statistics source {prefer!r}")
        if prefer != "proc":
            try:
                self._taskstats = TaskstatsReader()
            except OSError:
                if prefer == "taskstats":
                    raise
        self.reader = self._taskstats or ProcReader(proc)

    @property
    def source(self) -> str:
        """``"taskstats"`` or ``"proc"``."""
        return self.reader.name

    def thread(self, pid: int, tid: int) -> TaskCpu:
        """One thread's counters."""
        return self.reader.task(pid, tid)

    def process(self, pid: int) -> TaskCpu:
        """The sum over the process's live threads.

        :raises ProcessLookupError: the process is gone.
        """
        try:
            tids = [int(t.name) for t in
                    (self.proc / str(pid) / "task").iterdir()]
        except FileNotFoundError:
            raise ProcessLookupError(f"no process {pid}") from None
        total = TaskCpu()
        for tid in tids:
            try:
                total = total + self.reader.task(pid, tid)
            except ProcessLookupError:
                continue  # exited since the listing
        return total

    def close(self) -> None:
        """Release the netlink socket, if any."""
        if self._taskstats is not None:
            self._taskstats.close()
            self._taskstats = None

    def __enter__(self) -> CpuSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
