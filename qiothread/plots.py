"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

Two figures per sweep, each against the *x parameter* -- the first
swept parameter other than ``poll-policy``, or ``poll-policy`` itself
when it is the only one:

- ``latency.png``: completion latency p50, p99 and p99.9 (three panels,
  log scale when the values span more than a decade);
- ``cpu.png``: iothread CPU and IOPS (two panels).

Every other combination of swept values (the policy first) is one line,
so a sweep over ``poll-policy`` and ``poll-max-ns`` draws one line per
policy.  Error bars are one standard deviation over the rounds.  A
numeric x parameter is spaced by value; anything else by position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

__all__ = ["plot_sweep", "x_parameter"]


def x_parameter(names: Sequence[str]) -> str:
    """The parameter on the x axis (module text)."""
    for n in names:
        if n != "poll-policy":
            return n
    return names[0]


def _numeric(values: Sequence[str]) -> bool:
    try:
        for v in values:
            float(v)
    except ValueError:
        return False
    return True


def _series(summary: Sequence[dict[str, Any]], names: Sequence[str],
            x: str) -> dict[str, list[dict[str, Any]]]:
    others = sorted((n for n in names if n != x),
                    key=lambda n: n != "poll-policy")
    out: dict[str, list[dict[str, Any]]] = {}
    for row in summary:
        label = ", ".join(f"{n}={row['params'][n]}" for n in others)
        out.setdefault(label or "all", []).append(row)
    return out


def _panel(ax: Any, series: dict[str, list[dict[str, Any]]], x: str,
           key: str, title: str, unit: str) -> None:
    xs_all = [r["params"][x] for rows in series.values() for r in rows]
    numeric = _numeric(xs_all)
    order = sorted(set(xs_all), key=float) if numeric else list(
        dict.fromkeys(xs_all))
    lo, hi = math.inf, 0.0
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: order.index(r["params"][x]))
        xs = [float(r["params"][x]) if numeric else
              order.index(r["params"][x]) for r in rows]
        ys = [r[key] for r in rows]
        es = [r[key + "_std"] for r in rows]
        ok = [i for i, y in enumerate(ys) if y == y]
        if not ok:
            continue
        # Categories (policies) are not a scale: points, no lines.
        ax.errorbar([xs[i] for i in ok], [ys[i] for i in ok],
                    yerr=[es[i] for i in ok], marker="o", capsize=3,
                    linestyle="-" if numeric else "none", label=label)
        lo = min(lo, *(ys[i] for i in ok))
        hi = max(hi, *(ys[i] for i in ok))
    if not numeric:
        ax.set_xticks(range(len(order)), order)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{title} ({unit})" if unit else title)
    ax.grid(True, alpha=0.3)


def plot_sweep(summary: Sequence[dict[str, Any]], names: Sequence[str],
               out_dir: Path) -> list[Path]:
    """Write latency.png and cpu.png into ``out_dir``; their paths."""
    x = x_parameter(names)
    series = _series(summary, names, x)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, (
            ("lat_p50_us", "p50"), ("lat_p99_us", "p99"),
            ("lat_p999_us", "p99.9")), strict=True):
        _panel(ax, series, x, key, f"clat {title}", "µs")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"completion latency vs {x}")
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    _panel(axes[0], series, x, "iothread_cpu_pct", "iothread CPU", "%")
    _panel(axes[1], series, x, "iops", "IOPS", "")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"CPU and throughput vs {x}")
    fig.tight_layout()
    path = out_dir / "cpu.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
