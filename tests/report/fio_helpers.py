"""Build our results from fio's own per-I/O logs, to compare with fio."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qiothread.fio.options import JobOptions
from qiothread.report.model import IoRecords, JobResult


def records_from_fio_logs(clat_log: Path, lat_log: Path,
                          start_ns: int) -> IoRecords:
    """fio 3.33 logs: ``time, value, ddir, bs, prio`` per I/O."""
    clat = np.loadtxt(clat_log, delimiter=",", dtype=np.int64, ndmin=2)
    lat = np.loadtxt(lat_log, delimiter=",", dtype=np.int64, ndmin=2)
    n = clat.shape[0]
    # fio logs the completion time in ms only; put the completion at
    # the middle of its millisecond.
    t_complete = start_ns + clat[:, 0] * 1_000_000 + 500_000
    t_submit = t_complete - clat[:, 1]
    t_start = t_complete - lat[:, 1]
    return IoRecords(
        ddir=clat[:, 2].astype(np.uint8),
        offset=np.zeros(n, np.uint64),
        length=clat[:, 3].astype(np.uint32),
        t_start=t_start, t_submit=t_submit, t_complete=t_complete,
        status=np.zeros(n, np.uint8), depth=np.ones(n, np.uint16),
        t_pickup=np.zeros(n, np.int64), t_done=np.zeros(n, np.int64))


def result_from_fio(job: JobOptions, recs: IoRecords, start_ns: int,
                    runtime_ms: int) -> JobResult:
    return JobResult(options=job, records=recs, start_ns=start_ns,
                     end_ns=start_ns + runtime_ms * 1_000_000 + 999_999,
                     reap_batches=np.ones(len(recs), np.int64), pid=1)
