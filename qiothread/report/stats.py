"""fio's statistics, computed with numpy over per-I/O arrays.

fio does not keep samples; it folds each latency into running moments
and a log-linear histogram (``stat.c``, ``io_u.c``), and its reports are
functions of those.  Users compare our numbers with fio's, so the same
functions are reproduced here over the recorded arrays:

- min, max, mean, and the *sample* standard deviation (n - 1), as fio's
  Welford accumulator gives;
- percentiles from fio's histogram, not from the sorted samples: a value
  falls in one of 1856 buckets (64 per power of two above 2^7 ns, exact
  below), and a percentile is the midpoint of the first bucket whose
  cumulative count reaches ``p / 100 * N``, the comparison done in
  ``long double`` as in fio.  So ``99.000000`` here and in fio mean the
  same thing, accurate to 1/128 of the value;
- the ``latency_ns``/``latency_us``/``latency_ms`` distribution of
  completion latencies in fio's buckets, as a percentage of all I/Os;
- the I/O depth maps, in fio's buckets and with its 0.1 % floor;
- bandwidth and IOPS samples over fio's default 500 ms window
  (``bw_avg_time``/``iops_avg_time``), one sample per full window that
  saw I/O, KiB/s and IOPS by fio's integer arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "FIO_IO_U_PLAT_NR",
    "LatStat",
    "WindowSamples",
    "depth_map",
    "fio_percentiles",
    "lat_stat",
    "latency_buckets",
    "plat_idx_to_val",
    "plat_val_to_idx",
    "submit_map",
    "window_samples",
]

I64 = npt.NDArray[np.int64]

#: fio's histogram: 2^6 buckets per group, 29 groups.
FIO_IO_U_PLAT_BITS = 6
FIO_IO_U_PLAT_VAL = 1 << FIO_IO_U_PLAT_BITS
FIO_IO_U_PLAT_GROUP_NR = 29
FIO_IO_U_PLAT_NR = FIO_IO_U_PLAT_GROUP_NR * FIO_IO_U_PLAT_VAL

#: fio's default sampling window for bw and iops logs/stats (ms).
DEFAULT_AVG_MSEC = 500


def plat_val_to_idx(values: npt.ArrayLike) -> I64:
    """fio's histogram bucket of each value (ns)."""
    v = np.asarray(values, dtype=np.int64)
    # frexp gives v = m * 2**e with 0.5 <= m < 1, so the most
    # significant bit is e - 1; exact for latencies below 2**53 ns.
    _, exp = np.frexp(v.astype(np.float64))
    msb = np.where(v > 0, exp.astype(np.int64) - 1, 0)
    error_bits = np.maximum(msb - FIO_IO_U_PLAT_BITS, 0)
    base = (error_bits + 1) << FIO_IO_U_PLAT_BITS
    offset = (FIO_IO_U_PLAT_VAL - 1) & (v >> error_bits)
    idx = np.minimum(base + offset, FIO_IO_U_PLAT_NR - 1)
    return np.where(msb <= FIO_IO_U_PLAT_BITS, v, idx).astype(np.int64)


def plat_idx_to_val(idx: npt.ArrayLike) -> I64:
    """The value fio reports for bucket ``idx``: its midpoint."""
    i = np.asarray(idx, dtype=np.int64)
    error_bits = np.maximum((i >> FIO_IO_U_PLAT_BITS) - 1, 0)
    base = np.left_shift(np.int64(1), error_bits + FIO_IO_U_PLAT_BITS)
    k = i % FIO_IO_U_PLAT_VAL
    # fio computes (k + 0.5) << error_bits in double and truncates;
    # error_bits >= 1 here, so the half is exact.
    mid = base + ((2 * k + 1) << error_bits) // 2
    return np.where(i < (FIO_IO_U_PLAT_VAL << 1), i, mid)


def fio_percentiles(values_ns: npt.ArrayLike,
                    plist: Sequence[float]) -> list[int]:
    """fio's percentiles of ``values_ns`` for the sorted list ``plist``.

    Returns one value per entry of ``plist`` (an empty list when there
    are no values).
    """
    # A negative duration can only come from a caller's bug, but it
    # must not crash a report: it counts in the lowest bucket.
    v = np.maximum(np.asarray(values_ns, dtype=np.int64), 0)
    if v.size == 0 or not plist:
        return []
    hist = np.bincount(plat_val_to_idx(v), minlength=FIO_IO_U_PLAT_NR)
    cum = np.cumsum(hist).astype(np.longdouble)
    thresholds = (np.asarray(plist, dtype=np.float64).astype(
        np.longdouble) / np.longdouble(100.0)) * np.longdouble(v.size)
    first = np.searchsorted(cum, thresholds, side="left")
    first = np.minimum(first, FIO_IO_U_PLAT_NR - 1)
    return [int(x) for x in plat_idx_to_val(first)]


@dataclasses.dataclass(frozen=True)
class LatStat:
    """fio's ``io_stat`` summary: ``min``/``max``/``mean``/``stddev``/``N``."""

    min: int = 0
    max: int = 0
    mean: float = 0.0
    stddev: float = 0.0
    n: int = 0


def lat_stat(values: npt.ArrayLike) -> LatStat:
    """Moments as fio's ``calc_lat`` reports them (zeros when empty)."""
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return LatStat()
    dev = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return LatStat(min=int(v.min()), max=int(v.max()),
                   mean=float(np.mean(v, dtype=np.float64)), stddev=dev,
                   n=int(v.size))


#: Upper bounds (exclusive) of fio's latency buckets within a unit.
_LAT_EDGES = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)
#: Labels of fio's ``latency_ns``/``latency_us`` and ``latency_ms``.
LAT_NU_LABELS = tuple(str(e) for e in _LAT_EDGES)
LAT_M_LABELS = (*LAT_NU_LABELS, "2000", ">=2000")


def _stat_calc_lat(counts: npt.NDArray[np.int64], total: int) -> list[float]:
    if total == 0:
        return [0.0] * len(counts)
    out = []
    for c in counts:
        pct = float(c) / float(total) * 100.0
        # fio shows any non-empty bucket as at least 0.01 %.
        out.append(0.01 if pct < 0.01 and c else pct)
    return out


def latency_buckets(clat_ns: npt.ArrayLike
                    ) -> tuple[list[float], list[float], list[float]]:
    """fio's nsec, usec and msec latency distributions (percent)."""
    v = np.asarray(clat_ns, dtype=np.int64)
    total = int(v.size)
    edges = np.asarray(_LAT_EDGES)
    ns = v[v < 1000]
    us = v[(v >= 1000) & (v < 1_000_000)] // 1000
    ms = v[v >= 1_000_000] // 1_000_000
    n_counts = np.bincount(np.searchsorted(edges, ns, side="right"),
                           minlength=10)[:10]
    u_counts = np.bincount(np.searchsorted(edges, us, side="right"),
                           minlength=10)[:10]
    m_edges = np.asarray((*_LAT_EDGES, 2000))
    m_counts = np.bincount(np.searchsorted(m_edges, ms, side="right"),
                           minlength=12)[:12]
    return (_stat_calc_lat(n_counts, total),
            _stat_calc_lat(u_counts, total),
            _stat_calc_lat(m_counts, total))


def _dist(counts: npt.NDArray[np.int64], total: int) -> list[float]:
    if total == 0:
        return [0.0] * len(counts)
    out = []
    for c in counts:
        pct = float(c) / float(total) * 100.0
        out.append(0.1 if pct < 0.1 and c else pct)
    return out


def depth_map(depths: npt.ArrayLike) -> list[float]:
    """fio's ``iodepth_level``: in-flight depth at each submit, in the
    buckets 1, 2, 4, 8, 16, 32, >=64 (percent of I/Os)."""
    d = np.asarray(depths, dtype=np.int64)
    idx = np.searchsorted(np.asarray([2, 4, 8, 16, 32, 64]), d,
                          side="right")
    return _dist(np.bincount(idx, minlength=7)[:7], int(d.size))


def submit_map(batches: npt.ArrayLike) -> list[float]:
    """fio's ``iodepth_submit``/``iodepth_complete``: I/Os per submit
    or reap call, in the buckets 0, 4, 8, 16, 32, 64, >=64."""
    b = np.asarray(batches, dtype=np.int64)
    idx = np.searchsorted(np.asarray([1, 5, 9, 17, 33, 65]), b,
                          side="right")
    return _dist(np.bincount(idx, minlength=7)[:7], int(b.size))


@dataclasses.dataclass(frozen=True)
class WindowSamples:
    """Per-window samples of one direction."""

    bw_kib: I64  #: KiB/s per window
    iops: I64  #: I/Os per second per window


def window_samples(t_complete: npt.ArrayLike, nbytes: npt.ArrayLike,
                   start_ns: int, end_ns: int,
                   avg_msec: int = DEFAULT_AVG_MSEC) -> WindowSamples:
    """fio's bw/iops samples: completions in each full ``avg_msec``
    window from ``start_ns``; windows without I/O give no sample."""
    t = np.asarray(t_complete, dtype=np.int64)
    b = np.asarray(nbytes, dtype=np.int64)
    window_ns = avg_msec * 1_000_000
    nwin = max(0, (end_ns - start_ns) // window_ns)
    if nwin == 0 or t.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return WindowSamples(empty, empty)
    idx = (t - start_ns) // window_ns
    keep = (idx >= 0) & (idx < nwin)
    ios = np.bincount(idx[keep], minlength=nwin)
    byt = np.bincount(idx[keep], weights=b[keep], minlength=nwin)
    has = ios > 0
    bw = (byt[has].astype(np.int64) * 1000 // avg_msec) // 1024
    iops = ios[has].astype(np.int64) * 1000 // avg_msec
    return WindowSamples(bw_kib=bw, iops=iops)
