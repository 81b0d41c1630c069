"""What the VMM reads of its iothreads at the end of a run.

Two things need care:

- **CPU time.**  ``pidstat -t`` shows an IOThread as one thread; the
  thread-pool workers of ``aio=threads`` are threads of their own, in
  QEMU too.  So an iothread's CPU is its loop thread's: the process's
  main thread here (tid == pid), read through taskstats over netlink
  (pyroute2; microseconds) or, where netlink is refused, from the
  thread's ``/proc`` entry (clock ticks).
- **The poll_ns distribution.**  The context counts the time spent at
  each ``poll_ns`` in log2 buckets (``qiothread.stats``: bucket k holds
  values with ``bit_length() == k``).  QEMU's grow/shrink rule, however,
  only ever reaches a few values -- 0, 4000, then times ``poll-grow``
  up to ``poll-max-ns``, and divided by ``poll-shrink`` on the way down
  -- and with QEMU's defaults each lands in a bucket of its own (4000,
  8000, 16000, 32000, 32768).  :func:`poll_ns_values` lists the values
  the 7.2 rule can reach; a bucket that holds exactly one of them is
  reported under that exact value, any other under its lower bound.
  Policies with another rule (10.0's per-handler budgets, the weighted
  proposal) always get lower bounds.
"""

from __future__ import annotations

import logging
import os

from qiothread.iothread import IOThread
from qiothread.report.model import CpuUsage, IOThreadStats

__all__ = ["cpu_of_thread", "iothread_stats", "poll_ns_values"]

log = logging.getLogger(__name__)

#: QEMU's first grow step (reference §4.5, §19).
POLL_GROW_FIRST_NS = 4000
#: Policies that adapt ``poll_ns`` with 7.2's rule (reference §20).
_RULE_72 = ("7.2", "8.0", "8.2")
_MAX_VALUES = 4096


def poll_ns_values(max_ns: int, grow: int, shrink: int) -> set[int]:
    """Every ``poll_ns`` QEMU 7.2's adaptive rule can reach (§4.5)."""
    if max_ns <= 0:
        return {0}
    g = grow or 2
    seen, todo = {0}, [0]
    while todo and len(seen) < _MAX_VALUES:
        v = todo.pop()
        up = POLL_GROW_FIRST_NS if v == 0 else v * g
        down = 0 if shrink == 0 else v // shrink
        for n in (min(up, max_ns), down):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _label(hist: dict[int, int], values: set[int] | None
           ) -> dict[int, int]:
    by_bucket: dict[int, list[int]] = {}
    for v in values or ():
        by_bucket.setdefault(v.bit_length(), []).append(v)
    out: dict[int, int] = {}
    for k, ns in hist.items():
        only = by_bucket.get(k, [])
        key = only[0] if len(only) == 1 else (0 if k == 0 else 1 << (k - 1))
        out[key] = out.get(key, 0) + ns
    return out


def iothread_stats(ident: str, t: IOThread) -> IOThreadStats:
    """The report's view of iothread ``ident`` (module text)."""
    snap = t.poll_stats()
    policy = t.get_str("poll-policy")
    values = (poll_ns_values(t.get("poll-max-ns"), t.get("poll-grow"),
                             t.get("poll-shrink"))
              if policy in _RULE_72 else None)
    # The loop runs in the process's main thread: tid == pid.
    pid = t.child.pid if t.child is not None else 0
    return IOThreadStats(
        id=ident, thread_id=t.thread_id,
        poll_max_ns=t.get("poll-max-ns"),
        poll_grow=t.get("poll-grow"),
        poll_shrink=t.get("poll-shrink"),
        poll_ns_time=_label(snap["poll_ns_hist"], values),
        grow_count=snap["grow"], shrink_count=snap["shrink"],
        poll_progress=snap["poll_progress"],
        poll_timeout=snap["poll_timeouts"],
        blocking_waits=snap["blocking_waits"],
        polling_ns=snap["ns_polling"], blocked_ns=snap["ns_blocked"],
        cpu=cpu_of_thread(pid) if pid else None)


def cpu_of_thread(tid: int) -> CpuUsage | None:
    """CPU time of thread ``tid`` so far: the iothread's loop thread,
    as ``pidstat -t`` shows an IOThread (pool workers are threads of
    their own, in QEMU too).

    Taskstats over netlink (pyroute2) first, microseconds; the thread's
    ``/proc`` entry (clock ticks) where netlink is refused.
    """
    try:
        from pyroute2 import TaskStats

        ts = TaskStats()
        try:
            ts.bind()
            msg = ts.get_pid_stat(tid)[0]
        finally:
            ts.close()
        st = msg.get_attr("TASKSTATS_TYPE_AGGR_PID").get_attr(
            "TASKSTATS_TYPE_STATS")
        return CpuUsage(user_s=st["ac_utime"] / 1e6,
                        system_s=st["ac_stime"] / 1e6,
                        ctx=st["nvcsw"] + st["nivcsw"],
                        majf=st["ac_majflt"], minf=st["ac_minflt"])
    except Exception:
        log.debug("taskstats of %d failed; reading /proc", tid,
                  exc_info=True)
    try:
        base = f"/proc/{tid}/task/{tid}"
        with open(f"{base}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"{base}/status", encoding="ascii") as f:
            status = dict(line.split(":", 1) for line in f
                          if ":" in line)
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    ctx = sum(int(status.get(k, "0").strip() or 0) for k in
              ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
    return CpuUsage(user_s=int(fields[11]) / hz,
                    system_s=int(fields[12]) / hz, ctx=ctx,
                    majf=int(fields[9]), minf=int(fields[7]))
