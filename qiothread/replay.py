"""``qiothread replay``: a recorded event sequence through each policy.

What the replay answers: had this sequence of events reached an iothread
running policy P (with these ``poll-*`` values), what would its polling
budget have done, how often would polling have found the next event,
and how much CPU time would polling have cost?  It runs in virtual time
without any I/O, fast enough for 10^6 events in a few seconds per policy.

Inputs (:mod:`qiothread.replay_input`): a QEMU "log" backend trace with
``-msg timestamp=on`` (or qiothread's own trace, which has the same
format), or a fio iolog v2/v3 plus a service-time model.  Either becomes
an :class:`~qiothread.replay_input.EventSeq`: times at which a *source*
(a virtqueue, a completion source) became ready.

The engine.  This is a lean event-driven model of ``aio_poll``; it
calls the *same policy objects* the real AioContext uses
(:meth:`~qiothread.policy.PollPolicy.poll_budget`, ``adjust``,
``handler_dispatched``), on a small stand-in context that has the
fields those policies touch and real :class:`~qiothread.stats.PollStats`.
Driving the real AioContext instead (virtual clock plus a scripted fd
monitor) gives the same budgets -- a test checks that on a trace -- but
costs a ppoll syscall and a few hundred bytecodes per iteration; the
model does one iteration in about a microsecond of Python.  One
iteration of the model:

1. ``start`` is the current time.  The budget is the policy's
   ``poll_budget`` when some source has joined the poll set (a source
   joins when it is first dispatched, as in QEMU), else 0.
2. Polling, in passes that cost ``pass_ns`` per polled source: if an
   event of a polled source comes within the budget, it is found at
   the end of the pass in which it arrived.  Otherwise polling uses the
   budget (whole passes), makes the final pass of ``poll_set_started
   (false)`` -- which may still find an event -- and the loop blocks
   until the next event of any source (one that came while it polled
   is ready at once).  Time spent polling is the polling CPU; a round
   counts as a hit when polling or its final pass found the event.
3. ``block_ns`` = wake-up time - ``start``; the policy adapts
   (``adjust``), then every source with an event due by then is
   dispatched (joining the poll set; ``handler_dispatched`` for
   per-handler policies), each event costing ``dispatch_ns``.

What the model leaves out, on purpose: BHs, timers and the context
notifier (a trace rarely shows them), and any feedback of polling on
the event times: the events happen when the recording says, whatever
the policy.  Where poll mode ends (7.2 vs 8.0) and how guest
notifications are batched (8.2) change kicks and interrupts, not the
budget, so those policies replay identically to the one before them;
the real-loop tests in ``tests/policies`` show those effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from qiothread.policies import POLICY_NAMES, PolicyWeighted
from qiothread.policy import PollPolicy, make_policy
from qiothread.replay_input import (
    EventSeq,
    ReplayInputError,
    events_from_iolog,
    events_from_trace,
    parse_duration_ns,
    parse_service,
)
from qiothread.stats import GROW, SHRINK, PollStats

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = ["ReplayResult", "main", "replay"]


class _Clock:
    """The model's clock: a plain attribute (no lock: one thread)."""

    __slots__ = ("now",)

    def __init__(self, now: int) -> None:
        self.now = now

    def now_ns(self) -> int:
        return self.now


class _Node:
    """What policies read of an AioHandler, for one source."""

    __slots__ = ("deleted", "fd", "in_poll", "is_notifier", "name",
                 "poll_ns")

    def __init__(self, index: int, name: str) -> None:
        self.fd = index
        self.name = name
        self.poll_ns = 0
        self.in_poll = False
        self.deleted = False
        self.is_notifier = False


class _Ctx:
    """What policies read and write of an AioContext."""

    def __init__(self, clock: _Clock, max_ns: int, grow: int,
                 shrink: int) -> None:
        self.clock = clock
        self.name = "replay"
        self.poll_ns = 0
        self.poll_max_ns = max_ns
        self.poll_grow = grow
        self.poll_shrink = shrink
        self.stats = PollStats()
        self.stats.start(clock.now)


@dataclasses.dataclass
class ReplayResult:
    """What one policy did with one event sequence."""

    policy: str
    events: int
    iterations: int
    #: Iterations that polled (budget > 0), and those that found an
    #: event by polling.
    poll_rounds: int
    poll_hits: int
    #: ns spent polling (the CPU estimate), and the replayed span.
    polling_ns: int
    duration_ns: int
    grow: int
    shrink: int
    #: Time-weighted mean of the budget in force.
    poll_ns_mean: float
    #: (ns from the first event, budget) each time the budget changed.
    trajectory: list[tuple[int, int]]
    #: Each source's own poll_ns at the end (per-handler policies).
    handler_poll_ns: dict[str, int]
    #: Per-handler update/reset counts (weighted policy only).
    counters: dict[str, int]
    poll_max_ns: int = 0

    @property
    def near_max_share(self) -> float:
        """Share of the replayed time with the budget at 90% or more of
        ``poll-max-ns`` (the "time near max" of the weighted RFC)."""
        if not self.duration_ns or not self.poll_max_ns:
            return 0.0
        near = 0
        limit = 0.9 * self.poll_max_ns
        points = [*self.trajectory, (self.duration_ns, 0)]
        for (t, v), (t_next, _) in itertools.pairwise(points):
            if v >= limit:
                near += min(t_next, self.duration_ns) - t
        return near / self.duration_ns

    @property
    def hit_rate(self) -> float:
        return self.poll_hits / self.poll_rounds if self.poll_rounds \
            else 0.0

    @property
    def polling_share(self) -> float:
        """Polling CPU as a share of one CPU over the replayed span."""
        return self.polling_ns / self.duration_ns if self.duration_ns \
            else 0.0

    def to_json(self, with_trajectory: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hit_rate"] = self.hit_rate
        out["polling_share"] = self.polling_share
        out["near_max_share"] = self.near_max_share
        if not with_trajectory:
            del out["trajectory"]
        else:
            out["trajectory"] = [list(p) for p in self.trajectory]
        return out


def replay(seq: EventSeq, policy: PollPolicy | str = "7.2", *,
           poll_max_ns: int = 32768, poll_grow: int = 0,
           poll_shrink: int = 0, dispatch_ns: int = 0,
           pass_ns: int = 1) -> ReplayResult:
    """Run ``seq`` through ``policy`` (module text); a fresh result.

    :param dispatch_ns: virtual cost of dispatching one event.
    :param pass_ns: the cost of one ``io_poll`` call; a pass over the
        poll set costs that times the polled sources.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)
    if pass_ns < 1:
        raise ValueError("pass_ns must be at least 1")
    times, srcs = seq.times, seq.sources
    n = len(times)
    t0 = times[0] if n else 0
    clock = _Clock(t0)
    ctx = _Ctx(clock, poll_max_ns, poll_grow, poll_shrink)
    actx = cast("AioContext", ctx)
    policy.reset(actx)
    nodes = [_Node(i, name) for i, name in enumerate(seq.source_names)]
    polled = [False] * len(nodes)
    per_handler = policy.per_handler
    budget_of = policy.poll_budget
    adjust = policy.adjust
    dispatched = policy.handler_dispatched
    trajectory: list[tuple[int, int]] = [(0, 0)]
    last_budget = 0
    any_polled = False
    n_polled = 0
    iterations = rounds = hits = 0
    polling_ns = 0
    now = t0
    i = 0
    while i < n:
        iterations += 1
        start = now
        budget = budget_of(actx) if any_polled else 0
        if budget != last_budget:
            trajectory.append((start - t0, budget))
            last_budget = budget
        if budget > 0:
            # Passes over the n_polled handlers until the budget is
            # used, then (no hit) the final io_poll of poll_set_started
            # (false): one more pass, which can still find work.
            rounds += 1
            p = pass_ns * n_polled
            fin = start + (-(-budget // p) + 1) * p
            wake = -1
            k = i
            while k < n and times[k] <= fin:
                if polled[srcs[k]]:
                    d = times[k] - start
                    wake = start + max(1, -(-d // p)) * p
                    wake = min(wake, fin)
                    break
                k += 1
            if wake >= 0:
                hits += 1
            else:
                wake = max(fin, times[i])
            polling_ns += min(wake, fin) - start
        else:
            wake = max(start, times[i])
        block_ns = wake - start
        clock.now = wake
        if poll_max_ns:
            adjust(actx, block_ns, wake)
        # Dispatch every source with an event due by the wake-up.
        seen: list[int] = []
        while i < n and times[i] <= wake:
            s = srcs[i]
            if s not in seen:
                seen.append(s)
            i += 1
        now = wake
        for s in seen:
            now += dispatch_ns
            clock.now = now
            node = nodes[s]
            if not polled[s]:
                polled[s] = node.in_poll = True
                any_polled = True
                n_polled += 1
            if per_handler:
                dispatched(actx, cast("AioHandler", node), block_ns, now)
    if isinstance(policy, PolicyWeighted):
        policy.flush(actx)
        counters = policy.counters(actx)
    else:
        counters = {}
    if ctx.poll_ns != last_budget:
        trajectory.append((now - t0, ctx.poll_ns))
    snap = ctx.stats.snapshot(now)
    return ReplayResult(
        policy=policy.name, events=n, iterations=iterations,
        poll_rounds=rounds, poll_hits=hits, polling_ns=polling_ns,
        duration_ns=now - t0, grow=ctx.stats.q[GROW],
        shrink=ctx.stats.q[SHRINK], poll_ns_mean=snap["poll_ns_mean"],
        trajectory=trajectory,
        handler_poll_ns={nd.name: nd.poll_ns for nd in nodes}
        if per_handler else {},
        counters=counters, poll_max_ns=poll_max_ns)


# ----------------------------------------------------------------------
# Command line

USAGE = "qiothread replay FILE [options]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qiothread replay",
        description="Replay a QEMU/qiothread trace or a fio iolog through "
        "the polling policies in virtual time.")
    p.add_argument("file", help="trace (tid@sec.usec:event ...) or iolog")
    p.add_argument("--format", choices=("auto", "trace", "iolog"),
                   default="auto")
    p.add_argument("--policy", default=",".join(POLICY_NAMES),
                   help="comma-separated policies (default: all)")
    p.add_argument("--poll-max-ns", type=int, default=32768)
    p.add_argument("--poll-grow", type=int, default=0)
    p.add_argument("--poll-shrink", type=int, default=0)
    p.add_argument("--poll-weight", type=int, default=0)
    p.add_argument("--dispatch-cost", default="0ns",
                   help="virtual time per dispatched event (e.g. 1us)")
    p.add_argument("--pass-cost", default="1ns",
                   help="one pass over the poll handlers")
    p.add_argument("--tid", type=int, default=None,
                   help="trace: only this thread's lines")
    p.add_argument("--iodepth", type=int, default=1,
                   help="iolog: requests in flight")
    p.add_argument("--service", default="const:100us",
                   help="iolog: service time, const:T | exp:MEAN | "
                   "uniform:LO:HI")
    p.add_argument("--think", default="3us",
                   help="iolog: guest time from a completion to the "
                   "next request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE",
                   help="write the results (with trajectories) as JSON")
    p.add_argument("--trajectory-csv", metavar="FILE",
                   help="write t_ns,policy,poll_ns rows")
    return p


def _load(args: argparse.Namespace) -> EventSeq:
    fmt = args.format
    if fmt == "auto":
        with open(args.file, encoding="utf-8", errors="replace") as f:
            head = f.readline()
        fmt = "iolog" if head.startswith("fio version") else "trace"
    if fmt == "iolog":
        from qiothread.fio.iolog import load_iolog

        log = load_iolog(args.file, redirect=True)
        return events_from_iolog(
            log, iodepth=args.iodepth,
            service=parse_service(args.service),
            think_ns=parse_duration_ns(args.think), seed=args.seed)
    with open(args.file, encoding="utf-8", errors="replace") as f:
        return events_from_trace(f, tid=args.tid)


def format_table(results: Sequence[ReplayResult]) -> str:
    """One line per policy, aligned."""
    head = ("policy", "iters", "rounds", "hit%", "poll-cpu%",
            "mean-poll-ns", "near-max%", "grow", "shrink", "final")
    rows = [head]
    for r in results:
        final = r.trajectory[-1][1] if r.trajectory else 0
        rows.append((r.policy, str(r.iterations), str(r.poll_rounds),
                     f"{100 * r.hit_rate:.1f}",
                     f"{100 * r.polling_share:.2f}",
                     f"{r.poll_ns_mean:.0f}",
                     f"{100 * r.near_max_share:.1f}", str(r.grow),
                     str(r.shrink),
                     str(final)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "".join(
        "  ".join(cell.rjust(w) if c else cell.ljust(w)
                  for c, (cell, w) in enumerate(zip(row, widths,
                                                    strict=True)))
        .rstrip() + "\n" for row in rows)


def main(argv: Sequence[str]) -> int:
    """``qiothread replay``; returns the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        seq = _load(args)
        dispatch_ns = parse_duration_ns(args.dispatch_cost)
        pass_ns = parse_duration_ns(args.pass_cost)
        results = []
        for name in args.policy.split(","):
            policy = make_policy(name.strip())
            if isinstance(policy, PolicyWeighted):
                policy.set_weight(args.poll_weight)
            results.append(replay(
                seq, policy, poll_max_ns=args.poll_max_ns,
                poll_grow=args.poll_grow, poll_shrink=args.poll_shrink,
                dispatch_ns=dispatch_ns, pass_ns=max(1, pass_ns)))
    except (ReplayInputError, ValueError, OSError) as e:
        sys.stderr.write(f"qiothread replay: {e}\n")
        return 1
    sys.stdout.write(
        f"{seq.description}: {len(seq.times)} events from "
        f"{len(seq.source_names)} sources over "
        f"{seq.span_ns / 1e6:.3f} ms\n")
    sys.stdout.write(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"input": seq.description,
                       "sources": seq.source_names,
                       "results": [r.to_json() for r in results]}, f,
                      indent=1)
    if args.trajectory_csv:
        with open(args.trajectory_csv, "w", encoding="utf-8") as f:
            f.write("t_ns,policy,poll_ns\n")
            for r in results:
                for t, v in r.trajectory:
                    f.write(f"{t},{r.policy},{v}\n")
    return 0
