"""``qiothread sweep`` and ``qiothread report``: grids of runs, compared.

::

    qiothread sweep --param NAME=V1,V2,... [--param ...] [--repeat N]
                    --output-dir DIR [run options ...]
    qiothread report DIR

A sweep runs ``qiothread run`` once per point of the grid (the cartesian
product of the ``--param`` values) and round, each as its own process
with ``--output-format=json``, so that every run starts from a clean
slate (its own iothreads, guests, trace settings and signal handlers).
The order of the points is reversed every other round, so that a slow
drift of the machine (page cache, thermal state, other load) does not
always favour the points that run first.

A parameter name is placed where it belongs in the run's options:

- iothread properties (``poll-max-ns``, ``poll-grow``, ``poll-shrink``,
  ``poll-weight``, ``poll-policy``, ``aio-max-batch``,
  ``thread-pool-min``, ``thread-pool-max``) go into every
  ``-object iothread`` of the run options, or into a new
  ``-object iothread,id=iothread0`` when there is none (the run then
  puts its default disk on it);
- virtio-blk properties (``num-queues``, ``queue-size``,
  ``request-merging``, ``event_idx``, ...) go into every ``-device
  virtio-blk-*``, and block properties (``aio``, ``cache.direct``,
  ``cache.no-flush``) into every ``-blockdev``/``-drive``; the run
  options must then have one;
- anything else is a fio option, ``--NAME=V``, replacing one given.

Each run's JSON is kept in ``DIR/runs/``; ``DIR/sweep.json`` records the
grid and which file belongs to which point and round, and is rewritten
after every run, so an interrupted sweep can still be reported.  From
the JSON files come, per point, the mean and standard deviation over
the rounds of: completion latency p50/p99/p99.9 (fio's ``clat_ns`` of
the direction with the most I/O), IOPS, iothread CPU (user + system
time of the iothread processes over the job runtime), the polling hit
rate (polling rounds that found work), and guest kicks and interrupts
per request.  They are printed as a table and written to
``DIR/sweep.csv`` and ``DIR/summary.json``, and plotted by
:mod:`qiothread.plots`.  ``qiothread report DIR`` recomputes all of it
from the saved JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qiothread.keyval import parse_option

__all__ = [
    "METRICS",
    "SweepError",
    "SweepPoint",
    "apply_params",
    "grid",
    "main",
    "metrics_from_doc",
    "report_main",
    "round_order",
    "summarize",
]

IOTHREAD_PARAMS = frozenset({
    "poll-max-ns", "poll-grow", "poll-shrink", "poll-weight",
    "poll-policy", "aio-max-batch", "thread-pool-min", "thread-pool-max"})
DEVICE_PARAMS = frozenset({
    "num-queues", "queue-size", "request-merging", "event_idx",
    "seg-max-adjust", "config-wce", "discard", "write-zeroes",
    "indirect_desc", "ioeventfd", "iothread"})
BLOCK_PARAMS = frozenset({"aio", "cache.direct", "cache.no-flush",
                          "cache", "discard", "detect-zeroes"})

#: (key, column title, unit) of every reported metric, in table order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("lat_p50_us", "p50", "µs"),
    ("lat_p99_us", "p99", "µs"),
    ("lat_p999_us", "p99.9", "µs"),
    ("iops", "IOPS", ""),
    ("iothread_cpu_pct", "iothread CPU", "%"),
    ("poll_hit_pct", "poll hit", "%"),
    ("kicks_per_io", "kicks/IO", ""),
    ("irqs_per_io", "irqs/IO", ""),
)


class SweepError(ValueError):
    """A bad sweep request (message for the user)."""


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: (name, value) pairs in --param order."""

    params: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        """A file-name-safe id, e.g. ``poll-max-ns=0,iodepth=4``."""
        return ",".join(f"{n}={v}" for n, v in self.params).replace(
            "/", "_")

    def value(self, name: str) -> str:
        return dict(self.params)[name]


def parse_param(text: str) -> tuple[str, list[str]]:
    """``NAME=V1,V2,...`` -> (NAME, [V1, V2, ...])."""
    name, sep, values = text.partition("=")
    vals = [v.strip() for v in values.split(",")]
    if not sep or not name.strip() or not values or "" in vals:
        raise SweepError(
            f"invalid --param '{text}': expected NAME=V1,V2,...")
    return name.strip(), vals


def grid(params: Sequence[tuple[str, list[str]]]) -> list[SweepPoint]:
    """The cartesian product, first parameter varying slowest."""
    names = [n for n, _ in params]
    if len(set(names)) != len(names):
        raise SweepError("a parameter is given twice")
    return [SweepPoint(tuple(zip(names, combo, strict=True)))
            for combo in itertools.product(*(v for _, v in params))]


def round_order(n_points: int, rnd: int) -> list[int]:
    """Point indices for round ``rnd``: forward, backward, forward, ..."""
    order = list(range(n_points))
    return order if rnd % 2 == 0 else order[::-1]


def _set_in_option(arg: str, name: str, value: str, kind: str) -> str:
    """``arg`` (keyval or JSON) with ``name`` set to ``value``."""
    if arg.lstrip().startswith("{"):
        data = json.loads(arg)
        data[name] = int(value) if value.isdigit() else value
        return json.dumps(data)
    parsed = parse_option(arg, kind)
    del parsed  # only to validate the syntax; keep the user's spelling
    parts = [p for p in arg.split(",")
             if p.partition("=")[0] != name]
    return ",".join([*parts, f"{name}={value}"])


def _qom_type(arg: str, implied: str) -> str | None:
    if arg.lstrip().startswith("{"):
        v = json.loads(arg).get("qom-type" if implied == "qom-type"
                                 else "driver")
        return v if isinstance(v, str) else None
    data = parse_option(arg, implied).data
    v = data.get(implied)
    return v if isinstance(v, str) else None


def apply_params(run_args: Sequence[str],
                 point: SweepPoint) -> list[str]:
    """The run's arguments with the point's values put in place.

    :raises SweepError: a device or block parameter with no option to
        put it in.
    """
    args = list(run_args)
    for name, value in point.params:
        if name in IOTHREAD_PARAMS:
            hits = [i for i in range(len(args) - 1)
                    if args[i] == "-object"
                    and _qom_type(args[i + 1], "qom-type") == "iothread"]
            if not hits:
                args += ["-object", f"iothread,id=iothread0,{name}={value}"]
            for i in hits:
                args[i + 1] = _set_in_option(args[i + 1], name, value,
                                             "qom-type")
        elif name in DEVICE_PARAMS or name in BLOCK_PARAMS:
            flags = ("-device",) if name in DEVICE_PARAMS else (
                "-blockdev", "-drive")
            hits = [i for i in range(len(args) - 1) if args[i] in flags]
            if name in DEVICE_PARAMS:
                hits = [i for i in hits if (_qom_type(
                    args[i + 1], "driver") or "").startswith("virtio-blk")]
            if not hits:
                raise SweepError(
                    f"parameter '{name}' needs a {' or '.join(flags)} "
                    "option among the run options")
            for i in hits:
                implied = "driver" if args[i] != "-drive" else "file"
                args[i + 1] = _set_in_option(args[i + 1], name, value,
                                             implied)
        else:
            flag = f"--{name}"
            args = [a for a in args
                    if a != flag and not a.startswith(flag + "=")]
            args.append(f"{flag}={value}")
    return args


# ----------------------------------------------------------------------
# Metrics of one run


def _dominant(job: dict[str, Any]) -> dict[str, Any] | None:
    best = None
    for d in ("read", "write", "trim"):
        dd = job.get(d)
        if dd and dd.get("total_ios", 0) and (
                best is None or dd["total_ios"] > best["total_ios"]):
            best = dd
    return best


def metrics_from_doc(doc: dict[str, Any]) -> dict[str, float]:
    """The sweep metrics of one run's fio JSON (NaN where absent)."""
    nan = float("nan")
    out = {k: nan for k, _, _ in METRICS}
    jobs = doc.get("jobs") or []
    lat: dict[str, list[float]] = {"50": [], "99": [], "99.9": []}
    iops = 0.0
    runtime_ms = 0.0
    for job in jobs:
        for d in ("read", "write", "trim"):
            iops += float(job.get(d, {}).get("iops", 0.0))
        runtime_ms = max(runtime_ms, float(job.get("job_runtime", 0)))
        dd = _dominant(job)
        pct = (dd or {}).get("clat_ns", {}).get("percentile", {})
        for p in lat:
            v = pct.get(f"{float(p):f}")
            if v is not None:
                lat[p].append(float(v))
    out["iops"] = iops
    # Several jobs: the worst job's percentile (what a budget checks).
    for p, key in (("50", "lat_p50_us"), ("99", "lat_p99_us"),
                   ("99.9", "lat_p999_us")):
        if lat[p]:
            out[key] = max(lat[p]) / 1000.0
    q = doc.get("qiothread") or {}
    threads = q.get("iothreads") or []
    if threads and runtime_ms:
        cpu = sum(float(t.get("usr_s", 0)) + float(t.get("sys_s", 0))
                  for t in threads)
        out["iothread_cpu_pct"] = 100.0 * cpu / (runtime_ms / 1000.0)
    rounds = sum(int(t.get("poll_progress", 0)) +
                 int(t.get("poll_timeout", 0)) for t in threads)
    if rounds:
        out["poll_hit_pct"] = 100.0 * sum(
            int(t.get("poll_progress", 0)) for t in threads) / rounds
    elif threads:
        out["poll_hit_pct"] = 0.0
    queues = q.get("queues") or []
    reqs = sum(int(x.get("requests", 0)) for x in queues)
    if reqs:
        out["kicks_per_io"] = sum(
            int(x.get("kicks_sent", 0)) for x in queues) / reqs
        out["irqs_per_io"] = sum(
            int(x.get("interrupts_sent", 0)) for x in queues) / reqs
    return out


def summarize(runs: Sequence[dict[str, Any]],
              points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """Per point: params, rounds, and mean/std of every metric.

    ``runs`` are sweep.json run records with a ``metrics`` dict.
    """
    out = []
    for pt in points:
        mine = [r["metrics"] for r in runs if r["point"] == pt.key]
        row: dict[str, Any] = {"point": pt.key, "params": dict(pt.params),
                               "rounds": len(mine)}
        for k, _, _ in METRICS:
            vals = np.array([m[k] for m in mine], dtype=float)
            vals = vals[~np.isnan(vals)]
            row[k] = float(vals.mean()) if vals.size else float("nan")
            row[k + "_std"] = float(vals.std(ddof=1)) if vals.size > 1 \
                else 0.0
        out.append(row)
    return out


def format_table(summary: Sequence[dict[str, Any]],
                 names: Sequence[str]) -> str:
    """Aligned text: the parameters, then each metric (mean ± std)."""
    head = [*names, "n", *(f"{t}{f' {u}' if u else ''}"
                           for _, t, u in METRICS)]
    rows = [head]
    for row in summary:
        cells = [str(row["params"][n]) for n in names]
        cells.append(str(row["rounds"]))
        for k, _, _ in METRICS:
            m, s = row[k], row[k + "_std"]
            if m != m:                          # NaN
                cells.append("-")
            elif k.endswith("per_io"):
                cells.append(f"{m:.3f}±{s:.3f}")
            elif k == "iops":
                cells.append(f"{m:.0f}±{s:.0f}")
            else:
                cells.append(f"{m:.1f}±{s:.1f}")
        rows.append(cells)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "".join("  ".join(c.rjust(w) for c, w in zip(
        r, widths, strict=True)) + "\n" for r in rows)


def write_csv(path: Path, summary: Sequence[dict[str, Any]],
              names: Sequence[str]) -> None:
    cols = [*names, "rounds"] + [
        x for k, _, _ in METRICS for x in (k, k + "_std")]
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(cols) + "\n")
        for row in summary:
            vals = [str(row["params"][n]) for n in names]
            vals.append(str(row["rounds"]))
            vals += [repr(row[c]) if row[c] == row[c] else ""
                     for c in cols[len(names) + 1:]]
            f.write(",".join(vals) + "\n")


# ----------------------------------------------------------------------
# Running


Runner = Callable[[list[str], Path], int]

#: Default limit for one run, in seconds (``--run-timeout``).
RUN_TIMEOUT_S = 300.0
#: Exit status recorded for a run that had to be stopped.
TIMED_OUT = -1


def subprocess_runner(args: list[str], out: Path,
                      timeout_s: float = RUN_TIMEOUT_S) -> int:
    """``python -m qiothread.cli run ARGS`` writing JSON to ``out``.

    The run gets a session of its own; if it outlives ``timeout_s`` it
    is sent SIGINT (a run then stops its guests and reports), and its
    whole process group SIGKILL 10 s later.  Returns the exit status,
    or :data:`TIMED_OUT`.
    """
    cmd = [sys.executable, "-m", "qiothread.cli", "run", *args,
           "--output-format=json", f"--output={out}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        err = _stop_run(proc)
        sys.stderr.write(err or "")
        out.unlink(missing_ok=True)
        return TIMED_OUT
    except BaseException:
        # Ctrl-C reaches only us (the run has its own session): pass it
        # on, so that the run releases its processes, then go on out.
        _stop_run(proc)
        out.unlink(missing_ok=True)
        raise
    if proc.returncode and err:
        sys.stderr.write(err)
    return proc.returncode


def _stop_run(proc: subprocess.Popen[str]) -> str:
    """SIGINT the run's process group, SIGKILL it 10 s later."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    except ProcessLookupError:          # already gone
        _, err = proc.communicate()
    return err or ""


def _save(out_dir: Path, state: dict[str, Any]) -> None:
    tmp = out_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, out_dir / "sweep.json")


def run_sweep(params: Sequence[tuple[str, list[str]]], repeat: int,
              out_dir: Path, run_args: Sequence[str],
              runner: Runner = subprocess_runner,
              log: Callable[[str], object] | None = None
              ) -> dict[str, Any]:
    """Run the grid; returns (and saves) the sweep record.

    ``log`` gets the progress lines (default: stderr).
    """
    if log is None:
        log = sys.stderr.write
    if repeat < 1:
        raise SweepError("--repeat must be at least 1")
    points = grid(params)
    for pt in points:                       # refuse bad grids up front
        apply_params(run_args, pt)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "params": [[n, v] for n, v in params], "repeat": repeat,
        "run_args": list(run_args), "runs": []}
    total = len(points) * repeat
    done = 0
    for rnd in range(repeat):
        for idx in round_order(len(points), rnd):
            pt = points[idx]
            out = out_dir / "runs" / f"{pt.key}.r{rnd}.json"
            args = apply_params(run_args, pt)
            done += 1
            log(f"qiothread sweep: [{done}/{total}] round {rnd + 1}: "
                f"{pt.key}\n")
            status = runner(args, out)
            rec: dict[str, Any] = {
                "point": pt.key, "round": rnd, "file": str(
                    out.relative_to(out_dir)), "status": status,
                "args": args}
            if status == 0 and out.exists():
                state["runs"].append(rec)
            else:
                why = "timed out" if status == TIMED_OUT else \
                    f"exit {status}"
                log(f"qiothread sweep: run failed ({why}): {pt.key}\n")
                rec["failed"] = True
                state.setdefault("failed", []).append(rec)
            _save(out_dir, state)
    return state


def load_results(out_dir: Path) -> tuple[list[SweepPoint],
                                         list[str],
                                         list[dict[str, Any]]]:
    """Points, parameter names and run records (with metrics, read
    from each run's JSON) of a saved sweep.

    :raises SweepError: no sweep.json, or a run file is missing.
    """
    path = out_dir / "sweep.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{path}: no such file (not a sweep "
                         "directory)") from None
    params = [(n, list(v)) for n, v in state["params"]]
    runs = []
    for rec in state["runs"]:
        f = out_dir / rec["file"]
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SweepError(f"{f}: {e}") from None
        runs.append({**rec, "metrics": metrics_from_doc(doc)})
    return grid(params), [n for n, _ in params], runs


def write_report(out_dir: Path,
                 write: Callable[[str], object] | None = None
                 ) -> list[dict[str, Any]]:
    """Table on ``write`` (default: stdout); sweep.csv, summary.json
    and PNGs in DIR."""
    if write is None:
        write = sys.stdout.write
    from qiothread.plots import plot_sweep

    points, names, runs = load_results(out_dir)
    summary = summarize(runs, points)
    write(format_table(summary, names))
    write_csv(out_dir / "sweep.csv", summary, names)
    (out_dir / "summary.json").write_text(json.dumps(
        {"params": names, "points": summary,
         "runs": [{k: r[k] for k in ("point", "round", "file", "metrics")}
                  for r in runs]}, indent=1,
        default=lambda x: None), encoding="utf-8")
    for png in plot_sweep(summary, names, out_dir):
        write(f"wrote {png}\n")
    return summary


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qiothread sweep",
        usage="qiothread sweep --param NAME=V1,V2,... [--param ...] "
        "[--repeat N] --output-dir DIR [run options ...]",
        description="Run qiothread run over a grid of parameters.")
    p.add_argument("--param", action="append", required=True,
                   metavar="NAME=V1,V2,...")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S,
                   metavar="SECONDS", help="stop a run after this long")
    return p


def main(argv: Sequence[str]) -> int:
    """``qiothread sweep``; returns the exit status."""
    ns, run_args = _sweep_parser().parse_known_args(list(argv))
    try:
        params = [parse_param(t) for t in ns.param]
        runner = functools.partial(subprocess_runner,
                                   timeout_s=ns.run_timeout)
        try:
            state = run_sweep(params, ns.repeat, ns.output_dir, run_args,
                              runner)
        except KeyboardInterrupt:
            sys.stderr.write("qiothread sweep: interrupted; the runs "
                             "done so far are in "
                             f"{ns.output_dir / 'sweep.json'}\n")
            if (ns.output_dir / "sweep.json").exists():
                write_report(ns.output_dir)
            return 130
        if not state["runs"]:
            sys.stderr.write("qiothread sweep: every run failed\n")
            return 1
        write_report(ns.output_dir)
    except SweepError as e:
        sys.stderr.write(f"qiothread sweep: {e}\n")
        return 1
    return 1 if state.get("failed") else 0


def report_main(argv: Sequence[str]) -> int:
    """``qiothread report DIR``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="qiothread report",
        description="Table, CSV, JSON and plots of a saved sweep.")
    p.add_argument("dir", type=Path)
    ns = p.parse_args(list(argv))
    try:
        write_report(ns.dir)
    except SweepError as e:
        sys.stderr.write(f"qiothread report: {e}\n")
        return 1
    return 0
