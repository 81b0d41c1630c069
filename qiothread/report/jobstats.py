"""Per-job and per-group statistics, the way fio's ``thread_stat`` and
``group_run_stats`` hold them, computed once from the recorded I/Os.

The JSON and the human-readable report both read these, so the two can
never disagree.  fio's rules kept here:

- a direction's ``runtime`` is the job's measured runtime (ms, after
  the ramp, without the verify phase) if the job's pattern issues that
  direction, else 0; the verify phase adds its time to reads;
- ``bw_bytes = 1000 * io_bytes // runtime_ms``, ``bw = bw_bytes //
  1024`` and ``iops = 1000.0 * total_ios / runtime_ms``;
- with ``group_reporting`` the jobs of a group are summed into one
  entry named after the first job, with the longest runtime;
- a group's aggregate bandwidth is its bytes over its longest runtime,
  and ``bw_agg`` is a job's mean window bandwidth as a share of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from qiothread.fio.options import Ddir, JobOptions
from qiothread.report import stats
from qiothread.report.model import CpuUsage, IoRecords, IoStatus, JobResult

__all__ = [
    "DdirStats",
    "GroupStats",
    "JobStats",
    "group_stats",
    "job_stats",
    "report_units",
]

I64 = npt.NDArray[np.int64]
_RW = (Ddir.READ, Ddir.WRITE, Ddir.TRIM)
_EIO = 5


@dataclasses.dataclass(frozen=True)
class DdirStats:
    """One data direction of one job (fio's per-``ddir`` fields)."""

    io_bytes: int
    total_ios: int
    runtime_ms: int
    slat_ns: I64
    clat_ns: I64
    lat_ns: I64
    samples: stats.WindowSamples

    @property
    def bw_bytes(self) -> int:
        """Bytes per second, fio's integer arithmetic."""
        return 1000 * self.io_bytes // self.runtime_ms \
            if self.runtime_ms else 0

    @property
    def bw_kib(self) -> int:
        """KiB per second (fio's ``bw``)."""
        return self.bw_bytes // 1024

    @property
    def iops(self) -> float:
        """I/Os per second."""
        return 1000.0 * self.total_ios / self.runtime_ms \
            if self.runtime_ms else 0.0


@dataclasses.dataclass(frozen=True)
class JobStats:
    """One entry of fio's ``jobs`` array."""

    name: str
    groupid: int
    members: int  #: jobs summed into this entry
    options: JobOptions
    pid: int
    error: int
    runtime_ms: int  #: measured, after the ramp
    elapsed_s: int  #: from the job's start, ramp included
    ddirs: dict[Ddir, DdirStats]
    sync_lat_ns: I64
    cpu: CpuUsage
    depth_levels: list[float]
    submit_levels: list[float]
    complete_levels: list[float]
    lat_n: list[float]
    lat_u: list[float]
    lat_m: list[float]
    total_by_ddir: tuple[int, int, int]
    verify_checked: int
    verify_mismatches: int
    #: The first verify failures, described, as fio prints them.
    verify_errors: tuple[str, ...] = ()

    @property
    def usr_cpu(self) -> float:
        """User CPU as a percentage of the runtime (fio's ``usr_cpu``)."""
        return self.cpu.user_s * 1e5 / self.runtime_ms \
            if self.runtime_ms else 0.0

    @property
    def sys_cpu(self) -> float:
        """System CPU as a percentage of the runtime."""
        return self.cpu.system_s * 1e5 / self.runtime_ms \
            if self.runtime_ms else 0.0


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """fio's ``group_run_stats`` for one reporting group."""

    groupid: int
    io_bytes: tuple[int, int, int]
    min_run_ms: tuple[int, int, int]
    max_run_ms: tuple[int, int, int]
    min_bw: tuple[int, int, int]  #: bytes/s, slowest job
    max_bw: tuple[int, int, int]  #: bytes/s, fastest job

    def agg(self, ddir: Ddir) -> int:
        """The group's aggregate bandwidth in bytes/s."""
        run = self.max_run_ms[ddir]
        return 1000 * self.io_bytes[ddir] // run if run else 0


def _runtime_ms(ns: int, had_io: bool) -> int:
    ms = ns // 1_000_000
    # A real run that finished inside a millisecond would otherwise
    # report no bandwidth at all; fio's clock granularity hides this.
    return max(ms, 1) if had_io else ms


def job_stats(results: list[JobResult], groupid: int = 0) -> JobStats:
    """Statistics of one job, or of several summed (group_reporting).

    :param results: at least one job; the first names the entry.
    """
    first = results[0]
    recs = IoRecords.concat([r.measured() for r in results])
    runtime_ns = max(r.runtime_ns for r in results)
    start = min(r.ramp_end_ns for r in results)
    # fio's runtime per direction: the workload's span for the
    # directions the pattern issues, plus the verify phase for reads.
    span = {d: 0 for d in _RW}
    for r in results:
        for d in r.options.rw.directions:
            if d in span:
                span[d] = max(span[d], r.main_runtime_ns)
        if r.verify_runtime_ns:
            span[Ddir.READ] = max(span[Ddir.READ], r.main_runtime_ns
                                  if Ddir.READ in r.options.rw.directions
                                  else 0) + r.verify_runtime_ns
    ddirs: dict[Ddir, DdirStats] = {}
    for ddir in _RW:
        sel = recs.select(recs.ddir == ddir)
        length = sel.length.astype(np.int64)
        ddirs[ddir] = DdirStats(
            io_bytes=int(length.sum()),
            total_ios=len(sel),
            runtime_ms=_runtime_ms(span[ddir], len(sel) > 0)
            if span[ddir] else 0,
            slat_ns=sel.slat, clat_ns=sel.clat, lat_ns=sel.lat,
            samples=stats.window_samples(sel.t_complete, length, start,
                                         start + runtime_ns))
    rw = recs.select(recs.ddir <= Ddir.TRIM)
    sync = recs.select(recs.ddir == Ddir.SYNC)
    lat_n, lat_u, lat_m = stats.latency_buckets(rw.clat)
    batches = np.concatenate([r.reap_batches for r in results])
    failed = [r.error for r in results if r.error]
    if not failed and np.any(recs.status != IoStatus.OK):
        failed = [_EIO]
    cpu = CpuUsage(
        user_s=sum(r.cpu.user_s for r in results if r.cpu),
        system_s=sum(r.cpu.system_s for r in results if r.cpu),
        ctx=sum(r.cpu.ctx for r in results if r.cpu),
        majf=sum(r.cpu.majf for r in results if r.cpu),
        minf=sum(r.cpu.minf for r in results if r.cpu))
    elapsed_ns = max(r.end_ns - r.start_ns for r in results)
    return JobStats(
        name=first.options.name, groupid=groupid, members=len(results),
        options=first.options, pid=first.pid,
        error=failed[0] if failed else 0,
        runtime_ms=runtime_ns // 1_000_000,
        elapsed_s=-(-elapsed_ns // 1_000_000_000),
        ddirs=ddirs, sync_lat_ns=sync.clat, cpu=cpu,
        depth_levels=stats.depth_map(rw.depth),
        # The guest driver takes one request per submit call.
        submit_levels=stats.submit_map(np.ones(len(recs), np.int64)),
        complete_levels=stats.submit_map(batches),
        lat_n=lat_n, lat_u=lat_u, lat_m=lat_m,
        total_by_ddir=(ddirs[Ddir.READ].total_ios,
                       ddirs[Ddir.WRITE].total_ios,
                       ddirs[Ddir.TRIM].total_ios),
        verify_checked=sum(r.verify_checked for r in results),
        verify_mismatches=sum(r.verify_mismatches for r in results),
        verify_errors=tuple(e for r in results for e in r.verify_errors))


def report_units(results: list[JobResult]) -> list[list[JobResult]]:
    """The entries fio reports: each job alone, or one entry for all
    when any job asks for ``group_reporting`` (a single group here)."""
    if any(r.options.group_reporting for r in results):
        return [results] if results else []
    return [[r] for r in results]


def group_stats(jobs: list[JobStats], groupid: int = 0) -> GroupStats:
    """fio's ``group_run_stats`` over the reported entries."""
    io = [0, 0, 0]
    min_run = [0, 0, 0]
    max_run = [0, 0, 0]
    min_bw = [0, 0, 0]
    max_bw = [0, 0, 0]
    for ddir in _RW:
        runs = [j.ddirs[ddir].runtime_ms for j in jobs
                if j.ddirs[ddir].runtime_ms]
        bws = [j.ddirs[ddir].bw_bytes for j in jobs
               if j.ddirs[ddir].runtime_ms]
        io[ddir] = sum(j.ddirs[ddir].io_bytes for j in jobs)
        if runs:
            min_run[ddir], max_run[ddir] = min(runs), max(runs)
            min_bw[ddir], max_bw[ddir] = min(bws), max(bws)
    return GroupStats(groupid=groupid, io_bytes=(io[0], io[1], io[2]),
                      min_run_ms=(min_run[0], min_run[1], min_run[2]),
                      max_run_ms=(max_run[0], max_run[1], max_run[2]),
                      min_bw=(min_bw[0], min_bw[1], min_bw[2]),
                      max_bw=(max_bw[0], max_bw[1], max_bw[2]))
