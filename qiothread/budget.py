"""CI budgets: ``--expect 'read.clat_ns.p99<500us'`` on a run's result.

A budget is one comparison of a number from the run's fio-style JSON
with a limit::

    [JOB:]METRIC OP VALUE[UNIT]

``OP`` is one of ``<  <=  >  >=  ==  !=``.  ``METRIC`` is a dotted path
into a job of fio's JSON (``read.iops``, ``write.clat_ns.mean``,
``read.lat_ns.max``, ``sys_cpu``), with a few shorthands:

- ``pN`` after a latency object picks fio's percentile ``N``:
  ``read.clat_ns.p99`` is ``read.clat_ns.percentile["99.000000"]``,
  ``p99.9`` is ``"99.900000"``.  The percentile must be one the run
  reported (fio's default list, or ``--percentile_list``);
- ``iops``, ``bw``, ``bw_bytes``, ``io_bytes``, ``io_kbytes``,
  ``total_ios``, ``short_ios`` and ``drop_ios`` without a direction are
  the sum of read, write and trim;
- a path that starts with ``qiothread.`` reads the run's own section
  (``qiothread.iothreads.0.poll_ns_mean``; list items by index).

Over several jobs: a budget with ``JOB:`` looks at that job only.
Without, the throughput counters above (and anything ending in one of
them, e.g. ``read.iops``) are summed over all jobs, as a CI gate on
"the disk" means; every other metric must hold for each job, and a
failure names the job.

``VALUE`` takes ``k``, ``M``, ``G`` (powers of 1000) or ``Ki``, ``Mi``,
``Gi`` (of 1024) and, for a time metric (a path through ``*_ns``,
``*_us`` or ``*_ms``, fio's units), a time unit ``ns``, ``us`` (or
``µs``), ``ms`` or ``s`` that is converted to the metric's own unit.
A time unit on a metric that is not a time is an error, and so is a
metric the result does not have: a budget that cannot be evaluated
fails, never passes silently.

A budget file holds one budget per line; ``#`` starts a comment, blank
lines are ignored.  ``qiothread run --expect-file FILE`` reads one.

A run whose budgets do not all hold exits with :data:`EXIT_BUDGET`
after its normal output, with one line per failed budget on stderr.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from qiothread.errors import ConfigError

__all__ = [
    "EXIT_BUDGET",
    "Budget",
    "BudgetError",
    "BudgetResult",
    "check_budgets",
    "evaluate",
    "load_budget_file",
    "parse_budget",
    "run_with_budgets",
    "split_expect_args",
]

#: Exit status of a run whose budgets failed (1 stays "the run failed").
EXIT_BUDGET = 3

_SUMMED = ("iops", "bw", "bw_bytes", "io_bytes", "io_kbytes", "total_ios",
           "short_ios", "drop_ios")
_DDIRS = ("read", "write", "trim")
_TIME_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000,
            "s": 1_000_000_000}
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "Ti": 1024 ** 4}
_RE = re.compile(
    r"^\s*(?:(?P<job>[^:<>=!\s]+):)?(?P<metric>[A-Za-z_][\w.]*)\s*"
    r"(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
    r"(?P<unit>[A-Za-zµ]*)\s*$")
_PCT = re.compile(r"^p(\d+(?:\.\d+)?)$")


class BudgetError(ConfigError):
    """A budget that cannot be parsed or evaluated."""


class Op(enum.Enum):
    """A budget's comparison."""

    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="

    @property
    def fn(self) -> Callable[[float, float], bool]:
        return _OPS[self]


_OPS: dict[Op, Callable[[float, float], bool]] = {
    Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt,
    Op.GE: operator.ge, Op.EQ: operator.eq, Op.NE: operator.ne}


def _split_metric(metric: str) -> list[str]:
    """Dotted components, keeping ``p99.9`` whole."""
    out: list[str] = []
    for part in metric.split("."):
        if out and part.isdigit() and re.fullmatch(r"p\d+", out[-1]):
            out[-1] += "." + part
        else:
            out.append(part)
    return out


def _time_unit_of(path: Sequence[str]) -> int | None:
    """ns per unit of a metric's value, if it is a time; else None."""
    for part in reversed(path):
        for suffix, ns in (("_ns", 1), ("_us", 1000), ("_ms", 1_000_000)):
            if part.endswith(suffix):
                return ns
    return None


@dataclasses.dataclass(frozen=True)
class Budget:
    """One parsed budget."""

    #: As written (trimmed), for messages.
    text: str
    job: str | None
    metric: str
    op: Op
    #: The limit, in the metric's own unit.
    limit: float
    #: The limit as written, e.g. ``500us``.
    limit_text: str

    @property
    def path(self) -> list[str]:
        return _split_metric(self.metric)

    def time_unit(self) -> int | None:
        return _time_unit_of(self.path)

    def holds(self, value: float) -> bool:
        return self.op.fn(value, self.limit)

    def render(self, value: float) -> str:
        """``value`` in the unit the limit was written in."""
        unit = self.time_unit()
        m = _RE.match(self.text)
        written = m.group("unit") if m else ""
        if unit is not None and written in _TIME_NS:
            return f"{_g(value * unit / _TIME_NS[written])}{written}"
        if written in _SCALE and written:
            return f"{_g(value / _SCALE[written])}{written}"
        return _g(value)


def _g(x: float) -> str:
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}" if abs(x) >= 1e4 else f"{x:.4g}".rstrip("0")


def parse_budget(text: str) -> Budget:
    """Parse ``[JOB:]METRIC OP VALUE[UNIT]``.

    :raises BudgetError: malformed, or a unit that does not fit.
    """
    m = _RE.match(text)
    if m is None:
        raise BudgetError(
            f"invalid budget '{text.strip()}': expected "
            "[JOB:]METRIC OP VALUE, OP one of < <= > >= == !=")
    metric, unit = m.group("metric"), m.group("unit")
    value = float(m.group("num"))
    path = _split_metric(metric)
    if "" in path:
        raise BudgetError(f"invalid budget '{text.strip()}': empty "
                          "component in the metric")
    time_unit = _time_unit_of(path)
    if unit in _TIME_NS:
        if time_unit is None:
            raise BudgetError(
                f"invalid budget '{text.strip()}': '{unit}' is a time "
                f"unit but {metric} is not a time")
        value = value * _TIME_NS[unit] / time_unit
    elif unit in _SCALE:
        value *= _SCALE[unit]
    else:
        raise BudgetError(
            f"invalid budget '{text.strip()}': unknown unit '{unit}' "
            "(ns, us, ms, s for times; k, M, G, Ki, Mi, Gi for counts)")
    num = m.group("num")
    return Budget(text=text.strip(), job=m.group("job"), metric=metric,
                  op=Op(m.group("op")), limit=value,
                  limit_text=f"{num}{unit}")


def load_budget_file(path: str | Path) -> list[Budget]:
    """The budgets of a file: one a line, ``#`` comments.

    :raises BudgetError: unreadable file, or a bad line (named).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BudgetError(
            f"cannot read budget file '{path}': {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(parse_budget(line))
        except BudgetError as e:
            raise BudgetError(f"{path}:{n}: {e}") from None
    return out


@dataclasses.dataclass
class BudgetResult:
    """The outcome of one budget (for one job, or summed)."""

    budget: Budget
    ok: bool
    #: The measured value, or None when it could not be found.
    value: float | None
    #: The job it was measured on; None when summed over jobs.
    job: str | None
    #: Why it could not be evaluated, if so.
    error: str = ""

    def message(self) -> str:
        b = self.budget
        where = f" (job '{self.job}')" if self.job is not None else ""
        if self.error:
            return f"budget '{b.text}' cannot be checked{where}: " \
                f"{self.error}"
        assert self.value is not None
        verdict = "holds" if self.ok else "FAILED"
        return (f"budget '{b.text}' {verdict}{where}: measured "
                f"{b.render(self.value)}")


def _lookup(obj: Any, path: Sequence[str]) -> float:
    """Follow ``path`` into ``obj`` with the pN shorthand; KeyError."""
    cur = obj
    for i, part in enumerate(path):
        pm = _PCT.match(part)
        if pm and isinstance(cur, dict) and "percentile" in cur:
            table = cur["percentile"]
            key = f"{float(pm.group(1)):f}"
            if key not in table:
                raise KeyError(
                    f"percentile {pm.group(1)} is not in the result "
                    f"(reported: {', '.join(sorted(table, key=float))})")
            cur = table[key]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() \
                and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(f"no '{'.'.join(path[:i + 1])}' in the result")
    if isinstance(cur, bool) or not isinstance(cur, int | float):
        raise KeyError(f"'{'.'.join(path)}' is not a number")
    return float(cur)


def _job_value(job: dict[str, Any], path: list[str]) -> float:
    if len(path) == 1 and path[0] in _SUMMED:
        return sum(_lookup(job, [d, path[0]]) for d in _DDIRS
                   if d in job)
    return _lookup(job, path)


def evaluate(doc: dict[str, Any],
             budgets: Iterable[Budget]) -> list[BudgetResult]:
    """Check ``budgets`` against a fio JSON document ``doc``."""
    jobs: list[dict[str, Any]] = list(doc.get("jobs") or [])
    out: list[BudgetResult] = []
    for b in budgets:
        path = b.path
        if path[0] == "qiothread":
            try:
                v = _lookup(doc, path)
                out.append(BudgetResult(b, b.holds(v), v, None))
            except KeyError as e:
                out.append(BudgetResult(b, False, None, None, e.args[0]))
            continue
        if b.job is not None:
            chosen = [j for j in jobs if j.get("jobname") == b.job]
            if not chosen:
                names = ", ".join(repr(j.get("jobname")) for j in jobs)
                out.append(BudgetResult(
                    b, False, None, b.job,
                    f"no such job (jobs: {names or 'none'})"))
                continue
        else:
            chosen = jobs
        if not chosen:
            out.append(BudgetResult(b, False, None, None,
                                    "the result has no jobs"))
            continue
        summed = path[-1] in _SUMMED and b.job is None
        try:
            values = [(str(j.get("jobname")), _job_value(j, path))
                      for j in chosen]
        except KeyError as e:
            out.append(BudgetResult(b, False, None, b.job, e.args[0]))
            continue
        if summed or b.job is not None:
            v = math.fsum(x for _, x in values)
            out.append(BudgetResult(b, b.holds(v), v, b.job))
            continue
        for name, v in values:
            out.append(BudgetResult(b, b.holds(v), v,
                                    name if len(values) > 1 else None))
    return out


def check_budgets(doc: dict[str, Any], budgets: Sequence[Budget],
                  write: Callable[[str], object]) -> int:
    """Evaluate, report each failure (and a summary) through ``write``.

    Returns 0 when every budget holds, :data:`EXIT_BUDGET` otherwise.
    """
    results = evaluate(doc, budgets)
    failed = [r for r in results if not r.ok]
    for r in failed:
        write(f"qiothread: {r.message()}\n")
    if failed:
        write(f"qiothread: {len(failed)} of {len(results)} budget "
              "checks failed\n")
        return EXIT_BUDGET
    return 0


def split_expect_args(args: Sequence[str]
                      ) -> tuple[list[Budget], list[str]]:
    """Take ``--expect`` / ``--expect-file`` out of a run's arguments.

    Both forms ``--expect=B`` and ``--expect B`` are accepted.  Returns
    (budgets, the other arguments in order).

    :raises BudgetError: a bad budget, or an option without a value.
    """
    budgets: list[Budget] = []
    rest: list[str] = []
    it = iter(args)
    for word in it:
        name, sep, value = word.partition("=")
        if name in ("--expect", "--expect-file"):
            if not sep:
                value = next(it, "")
            if not value:
                raise BudgetError(f"option '{name}' requires an argument")
            if name == "--expect":
                budgets.append(parse_budget(value))
            else:
                budgets.extend(load_budget_file(value))
        else:
            rest.append(word)
    return budgets, rest


def run_with_budgets(argv: Sequence[str]) -> int:
    """``qiothread run ... --expect B ...``: run, report, then check.

    The run's output is unchanged; the budgets are evaluated on its fio
    JSON.  Returns the run's status if it failed (budgets unchecked),
    else 0 or :data:`EXIT_BUDGET`.
    """
    import sys

    try:
        budgets, rest = split_expect_args(argv)
    except BudgetError as e:
        sys.stderr.write(f"qiothread: {e}\n")
        return 1
    from qiothread.run import main as run_main

    docs: list[dict[str, Any]] = []
    status = run_main(rest, on_json=docs.append)
    if status != 0 or not docs:
        sys.stderr.write("qiothread: budgets not checked: the run "
                         "failed\n")
        return status or 1
    status = check_budgets(docs[0], budgets, sys.stderr.write)
    if status == 0:
        sys.stderr.write(f"qiothread: all {len(budgets)} budgets hold\n")
    return status
