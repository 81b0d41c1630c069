"""fio's statistics reproduced with numpy: exact expected values."""

from __future__ import annotations

import numpy as np

from qiothread.report import stats
from qiothread.report.fio_json import percentile_key


def test_percentile_keys_are_c_percent_f() -> None:
    assert percentile_key(99.0) == "99.000000"
    assert percentile_key(99.99) == "99.990000"
    assert percentile_key(99.5) == "99.500000"
    assert percentile_key(1.0) == "1.000000"
    assert percentile_key(99.999) == "99.999000"


def test_histogram_exact_below_128() -> None:
    v = np.arange(128)
    assert np.array_equal(stats.plat_val_to_idx(v), v)
    assert np.array_equal(stats.plat_idx_to_val(v), v)


def test_histogram_buckets_and_midpoints() -> None:
    # 128..255 has 64 buckets of width 2: 128,129 -> idx 128, mid 129.
    assert stats.plat_val_to_idx([128, 129, 130, 255]).tolist() == [
        128, 128, 129, 191]
    assert stats.plat_idx_to_val([128, 129, 191]).tolist() == [129, 131,
                                                                255]
    # fio's own percentile value from a real run is a bucket midpoint:
    # 55552 = 2**15 + 44.5 * 512.
    idx = stats.plat_val_to_idx([55552, 55296, 55807])
    assert idx.tolist() == [idx[0]] * 3
    assert int(stats.plat_idx_to_val(idx[0])) == 55552


def test_fio_percentiles_small_values_exact() -> None:
    values = np.arange(1, 101)  # 1..100, all exact buckets
    got = stats.fio_percentiles(values, (1.0, 50.0, 99.0, 99.99))
    assert got == [1, 50, 99, 100]


def test_fio_percentiles_long_double_threshold() -> None:
    # 99.99 % of 10000 is 9999 in exact arithmetic; the threshold must
    # not round up past it (fio compares in long double).
    values = np.concatenate([np.full(9999, 10), [100]])
    assert stats.fio_percentiles(values, (99.99, 100.0)) == [10, 100]


def test_lat_stat_sample_stddev() -> None:
    st = stats.lat_stat([10, 20, 30, 40])
    assert (st.min, st.max, st.n) == (10, 40, 4)
    assert st.mean == 25.0
    assert st.stddev == np.sqrt(500.0 / 3.0)
    assert stats.lat_stat([]) == stats.LatStat()
    assert stats.lat_stat([7]).stddev == 0.0


def test_latency_buckets_in_fio_units() -> None:
    clat = [1, 3, 999, 1_500, 99_999, 250_000, 3_000_000, 2_500_000_000]
    n, u, m = stats.latency_buckets(clat)
    assert n == [12.5, 12.5, 0, 0, 0, 0, 0, 0, 0, 12.5]
    # 1.5 us -> "2"; 99.999 us -> "100"; 250 us -> "500"
    assert u == [12.5, 0, 0, 0, 0, 12.5, 0, 12.5, 0, 0]
    # 3 ms -> "4"; 2.5 s -> ">=2000"
    assert m == [0, 12.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12.5]


def test_small_shares_floor_like_fio() -> None:
    clat = [5] + [5000] * 20000
    n, _, _ = stats.latency_buckets(clat)
    assert n[2] == 0.01  # 0.005 % shows as 0.01 %


def test_depth_and_submit_maps() -> None:
    assert stats.depth_map([1, 1, 2, 3, 4, 8, 64]) == [
        2 / 7 * 100, 2 / 7 * 100, 1 / 7 * 100, 1 / 7 * 100, 0.0, 0.0,
        1 / 7 * 100]
    assert stats.submit_map([1, 4, 5, 70]) == [0.0, 50.0, 25.0, 0.0, 0.0,
                                               0.0, 25.0]


def test_window_samples_500ms() -> None:
    ms = 1_000_000
    # window 0: 3 I/Os of 4 KiB; window 1: none; window 2: 1 of 8 KiB;
    # an I/O after the last full window is left out.
    t = np.array([10, 20, 499, 1100, 1600]) * ms
    b = np.array([4096, 4096, 4096, 8192, 4096])
    s = stats.window_samples(t, b, 0, 1550 * ms)
    assert s.bw_kib.tolist() == [24, 16]
    assert s.iops.tolist() == [6, 2]


def test_regression_negative_duration_does_not_crash() -> None:
    # A stage computed from a missing stamp once reached the histogram
    # as a negative value and np.bincount raised; it now counts as 0.
    assert stats.fio_percentiles([-5, 10, 20], (50.0, 100.0)) == [10, 20]


def test_recorder_folds_chunks_in_order() -> None:
    from qiothread.report.model import IoRecorder
    rec = IoRecorder(chunk=3)
    for i in range(7):
        rec.append(i % 3, i * 512, 512, 10 * i, 10 * i + 1, 10 * i + 5,
                   0, i + 1, 0, 0)
    assert len(rec) == 7
    r = rec.freeze()
    assert r.offset.tolist() == [i * 512 for i in range(7)]
    assert r.clat.tolist() == [4] * 7 and r.slat.tolist() == [1] * 7
    assert r.ddir.dtype == np.uint8 and r.offset.dtype == np.uint64
    assert r.depth.tolist() == list(range(1, 8))
    assert len(IoRecorder().freeze()) == 0
