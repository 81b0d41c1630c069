"""fio latency logs (``write_lat_log``): one line per I/O.

fio's log format (HOWTO, "Log File Formats")::

    time (msec), value, data direction, block size (bytes),
    offset (bytes), command priority[, issue time (nsec)]

- *time* is milliseconds from the start of measurement (the end of
  ``ramp_time``), taken at completion;
- *value* is the latency in nanoseconds;
- *data direction* is 0 read, 1 write, 2 trim;
- *offset* is present when fio's ``log_offset`` is on, and *issue time*
  (ns from the same start) with ``log_issue_time``.  Both are written
  here by default, as the issue asks; pass ``log_offset=False,
  issue_time=False`` for fio 3.33's default five columns;
- *command priority* is 0: the guest does not set I/O priorities.

``write_lat_log=NAME`` makes three files per job: ``NAME_clat.N.log``,
``NAME_slat.N.log`` and ``NAME_lat.N.log``, where N counts jobs from 1
as fio does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from qiothread.report.model import JobResult

__all__ = ["write_lat_logs"]


def _write(path: Path, t_ms: npt.NDArray[np.int64],
           value: npt.NDArray[np.int64], ddir: npt.NDArray[np.int64],
           bs: npt.NDArray[np.int64], offset: npt.NDArray[np.int64],
           issue: npt.NDArray[np.int64], log_offset: bool,
           issue_time: bool) -> None:
    cols = [t_ms, value, ddir, bs]
    if log_offset:
        cols.append(offset)
    cols.append(np.zeros_like(t_ms))  # command priority
    if issue_time:
        cols.append(issue)
    table = np.column_stack(cols) if cols[0].size else \
        np.zeros((0, len(cols)), dtype=np.int64)
    with open(path, "w") as f:
        np.savetxt(f, table, fmt="%d", delimiter=", ")


def write_lat_logs(result: JobResult, name: str, index: int,
                   directory: str | os.PathLike[str] = ".",
                   log_offset: bool = True,
                   issue_time: bool = True) -> list[Path]:
    """Write the clat, slat and lat logs of one job.

    :param name: fio's ``write_lat_log`` value (the file prefix).
    :param index: the job's number, from 1.
    :returns: the three paths written.
    :raises OSError: the directory is not writable.
    """
    if index < 1:
        raise ValueError(f"job index {index} must start at 1")
    recs = result.measured()
    origin = result.ramp_end_ns
    t_ms = (recs.t_complete - origin) // 1_000_000
    ddir = recs.ddir.astype(np.int64)
    keep = ddir <= 2  # flushes are not in fio's latency logs
    bs = recs.length.astype(np.int64)
    offset = recs.offset.astype(np.int64)
    issue = recs.t_submit - origin
    paths = []
    for kind, value in (("clat", recs.clat), ("slat", recs.slat),
                        ("lat", recs.lat)):
        path = Path(directory) / f"{name}_{kind}.{index}.log"
        _write(path, t_ms[keep], value[keep], ddir[keep], bs[keep],
               offset[keep], issue[keep], log_offset, issue_time)
        paths.append(path)
    return paths
