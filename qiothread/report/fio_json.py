"""fio 3.x JSON output (``--output-format=json``), plus a qiothread key.

The schema is fio 3.33's, key for key and type for type (``stat.c``:
``show_thread_status_json``, ``add_ddir_status_json``,
``add_ddir_lat_json``; ``json.c`` for the text): integers where fio
writes ``%lld``, floats where it writes ``%f``, percentile keys
formatted with ``%f``, a ``percentile`` object only when the
direction has samples, ``"job options"``/``"global options"`` only when
there are any.  Tools written against fio's output (fio-plot,
``fio_jsonplus_clat2csv``, users' ``jq`` one-liners) read ours
unchanged.  A test compares the key sets and types with what the
installed fio writes for the same kind of job.

The one addition is a top-level ``"qiothread"`` object with the
emulator's own results (iothreads, queues, stages, host facts); fio's
readers ignore unknown top-level keys.

``"fio version"`` names the schema reproduced (``fio-3.33``); the
producer is named inside ``"qiothread"``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

import qiothread
from qiothread.fio.options import Ddir
from qiothread.report import stats
from qiothread.report.jobstats import (
    DdirStats,
    GroupStats,
    JobStats,
    group_stats,
    job_stats,
    report_units,
)
from qiothread.report.model import (
    DiskUtil,
    IoRecords,
    JobResult,
    QiothreadSection,
    RunReport,
)

__all__ = ["FIO_SCHEMA_VERSION", "build_fio_json", "dumps_fio",
           "percentile_key", "qiothread_json"]

#: The fio release whose JSON schema is reproduced.
FIO_SCHEMA_VERSION = "fio-3.33"
_DDIR_NAMES = {Ddir.READ: "read", Ddir.WRITE: "write",
               Ddir.TRIM: "trim"}


def percentile_key(p: float) -> str:
    """fio's key for percentile ``p``: C's ``%f`` (``"99.990000"``)."""
    return f"{p:f}"


def _lat_json(values: npt.NDArray[np.int64], plist: tuple[float, ...],
              with_percentiles: bool, bins: bool = False) -> dict[str, Any]:
    st = stats.lat_stat(values)
    out: dict[str, Any] = {"min": st.min, "max": st.max,
                           "mean": st.mean, "stddev": st.stddev,
                           "N": st.n}
    if with_percentiles and st.n:
        vals = stats.fio_percentiles(values, plist)
        out["percentile"] = {percentile_key(p): v
                             for p, v in zip(plist, vals, strict=True)}
        if bins:
            # json+: fio's histogram, bucket value -> count.
            idx = stats.plat_val_to_idx(np.maximum(values, 0))
            used, counts = np.unique(idx, return_counts=True)
            out["bins"] = {str(int(v)): int(c) for v, c in zip(
                stats.plat_idx_to_val(used), counts, strict=True)}
    return out


def _sample_stats(samples: npt.NDArray[np.int64]
                  ) -> tuple[int, int, float, float]:
    st = stats.lat_stat(samples)
    return st.min, st.max, st.mean, st.stddev


def _ddir_json(d: DdirStats, plist: tuple[float, ...],
               group: GroupStats, ddir: Ddir,
               plus: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "io_bytes": d.io_bytes,
        "io_kbytes": d.io_bytes >> 10,
        "bw_bytes": d.bw_bytes,
        "bw": d.bw_kib,
        "iops": d.iops,
        "runtime": d.runtime_ms,
        "total_ios": d.total_ios,
        "short_ios": 0,
        "drop_ios": 0,
        # fio's defaults: percentiles for clat only.
        "slat_ns": _lat_json(d.slat_ns, plist, False),
        "clat_ns": _lat_json(d.clat_ns, plist, True, plus),
        "lat_ns": _lat_json(d.lat_ns, plist, False),
    }
    bw = d.samples.bw_kib
    if bw.size:
        bmin, bmax, bmean, bdev = _sample_stats(bw)
        agg = group.agg(ddir)
        # fio: the mean window bandwidth as a share of the group's
        # aggregate, capped at 100 %.
        p_of_agg = min(100.0, bmean * 100.0 / (agg / 1024.0)) \
            if agg > 1024 else 100.0
    else:
        bmin = bmax = 0
        bmean = bdev = p_of_agg = 0.0
    out.update({"bw_min": bmin, "bw_max": bmax, "bw_agg": p_of_agg,
                "bw_mean": bmean, "bw_dev": bdev,
                "bw_samples": int(bw.size)})
    imin, imax, imean, idev = _sample_stats(d.samples.iops)
    out.update({"iops_min": imin, "iops_max": imax, "iops_mean": imean,
                "iops_stddev": idev,
                "iops_samples": int(d.samples.iops.size)})
    return out


def _levels(names: list[str], values: list[float]) -> dict[str, float]:
    return dict(zip(names, values, strict=True))


_DEPTH_NAMES = ["1", "2", "4", "8", "16", "32", ">=64"]
_SUBMIT_NAMES = ["0", "4", "8", "16", "32", "64", ">=64"]


def _job_json(js: JobStats, group: GroupStats,
              plus: bool) -> dict[str, Any]:
    opts = js.options
    out: dict[str, Any] = {
        "jobname": js.name,
        "groupid": js.groupid,
        "error": js.error,
        "eta": 0,
        "elapsed": js.elapsed_s,
    }
    if opts.given:
        out["job options"] = dict(opts.given)
    plist = opts.percentile_list
    for ddir in (Ddir.READ, Ddir.WRITE, Ddir.TRIM):
        out[_DDIR_NAMES[ddir]] = _ddir_json(js.ddirs[ddir], plist, group,
                                            ddir, plus)
    out["sync"] = {"total_ios": int(js.sync_lat_ns.size),
                   "lat_ns": _lat_json(js.sync_lat_ns, plist, True,
                                       plus)}
    out.update({
        "job_runtime": js.runtime_ms,
        "usr_cpu": js.usr_cpu,
        "sys_cpu": js.sys_cpu,
        "ctx": js.cpu.ctx,
        "majf": js.cpu.majf,
        "minf": js.cpu.minf,
        "iodepth_level": _levels(_DEPTH_NAMES, js.depth_levels),
        "iodepth_submit": _levels(_SUBMIT_NAMES, js.submit_levels),
        "iodepth_complete": _levels(_SUBMIT_NAMES, js.complete_levels),
        "latency_ns": _levels(list(stats.LAT_NU_LABELS), js.lat_n),
        "latency_us": _levels(list(stats.LAT_NU_LABELS), js.lat_u),
        "latency_ms": _levels(list(stats.LAT_M_LABELS), js.lat_m),
        "latency_depth": opts.iodepth,
        "latency_target": 0,
        "latency_percentile": 100.0,
        "latency_window": 0,
    })
    return out


def _disk_json(d: DiskUtil) -> dict[str, Any]:
    return {"name": d.name, "read_ios": d.read_ios,
            "write_ios": d.write_ios, "read_merges": d.read_merges,
            "write_merges": d.write_merges, "read_ticks": d.read_ticks,
            "write_ticks": d.write_ticks, "in_queue": d.in_queue,
            "util": float(d.util)}


_STAGE_PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _stage_json(samples: npt.NDArray[np.int64]) -> dict[str, Any]:
    out = _lat_json(samples, _STAGE_PERCENTILES, True)
    out.setdefault("percentile", {})
    return out


def qiothread_json(section: QiothreadSection | None,
                   jobs: list[JobStats],
                   units: list[list[JobResult]]) -> dict[str, Any]:
    """The ``"qiothread"`` object: producer, per-job verify counts and
    request stages, and the emulator's per-iothread, per-queue and
    per-stage results."""
    job_out = []
    for js, unit in zip(jobs, units, strict=True):
        recs = IoRecords.concat([r.measured() for r in unit])
        job_out.append({
            "jobname": js.name,
            "verify": {"checked": js.verify_checked,
                       "mismatches": js.verify_mismatches},
            "stages": {name: _stage_json(v)
                       for name, v in recs.stages().items()},
        })
    out: dict[str, Any] = {
        "version": f"qiothread-{qiothread.__version__}",
        "qemu_policy": section.qemu_policy if section else "7.2",
        "jobs": job_out,
    }
    if section is None:
        return out
    iothreads = []
    for t in section.iothreads:
        total = sum(t.poll_ns_time.values())
        iothreads.append({
            "id": t.id, "thread-id": t.thread_id,
            "poll-max-ns": t.poll_max_ns, "poll-grow": t.poll_grow,
            "poll-shrink": t.poll_shrink,
            "poll_ns_time": [
                {"poll_ns": v, "time_ns": ns,
                 "fraction": ns / total if total else 0.0}
                for v, ns in sorted(t.poll_ns_time.items())],
            "poll_ns_mean": t.mean_poll_ns,
            "grow": t.grow_count, "shrink": t.shrink_count,
            "poll_progress": t.poll_progress,
            "poll_timeout": t.poll_timeout,
            "blocking_waits": t.blocking_waits,
            "polling_ns": t.polling_ns, "blocked_ns": t.blocked_ns,
            "usr_s": t.cpu.user_s if t.cpu else 0.0,
            "sys_s": t.cpu.system_s if t.cpu else 0.0,
        })
    out["iothreads"] = iothreads
    out["queues"] = [
        {"device": q.device, "queue": q.queue, "iothread": q.iothread,
         "requests": q.requests, "kicks_sent": q.kicks_sent,
         "kicks_suppressed": q.kicks_suppressed,
         "interrupts_sent": q.interrupts_sent,
         "interrupts_suppressed": q.interrupts_suppressed,
         "merges": q.merges} for q in section.queues]
    out["stages"] = {s.name: _stage_json(s.samples_ns)
                     for s in section.stages}
    out["host"] = dict(section.host)
    return out


def build_fio_json(report: RunReport, plus: bool = False
                   ) -> dict[str, Any]:
    """The whole JSON document for ``report``, as Python objects.

    :param plus: fio's ``json+``: latency histograms (``bins``) too.
    """
    ts = report.timestamp_s or time.time()
    units = report_units(report.jobs)
    jobs = [job_stats(u) for u in units]
    group = group_stats(jobs)
    doc: dict[str, Any] = {
        "fio version": FIO_SCHEMA_VERSION,
        "timestamp": int(ts),
        "timestamp_ms": int(ts * 1000),
        "time": time.ctime(ts),
    }
    if report.global_options:
        doc["global options"] = dict(report.global_options)
    doc["jobs"] = [_job_json(j, group, plus) for j in jobs]
    doc["disk_util"] = [_disk_json(d) for d in report.disk_util]
    doc["qiothread"] = qiothread_json(report.qiothread, jobs, units)
    return doc


def _emit(value: Any, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            out.append("{\n" + pad + "}")
            return
        out.append("{\n")
        items = list(value.items())
        for i, (k, v) in enumerate(items):
            out.append(f"{pad}  {json.dumps(str(k))} : ")
            _emit(v, indent + 1, out)
            out.append(",\n" if i < len(items) - 1 else "\n")
        out.append(pad + "}")
    elif isinstance(value, list):
        if not value:
            out.append("[\n" + pad + "]")
            return
        out.append("[\n")
        for i, v in enumerate(value):
            out.append(pad + "  ")
            _emit(v, indent + 1, out)
            out.append(",\n" if i < len(value) - 1 else "\n")
        out.append(pad + "]")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, (int, np.integer)):
        out.append(str(int(value)))
    elif isinstance(value, (float, np.floating)):
        f = float(value)
        # fio prints "%f"; JSON has no NaN or infinity.
        out.append(f"{f:f}" if math.isfinite(f) else "0.000000")
    elif value is None:
        out.append("null")
    else:
        out.append(json.dumps(str(value)))


def dumps_fio(doc: dict[str, Any]) -> str:
    """``doc`` as text the way fio's ``json.c`` lays it out: two-space
    indent, ``"key" : value``, floats as ``%f``."""
    out: list[str] = []
    _emit(doc, 0, out)
    return "".join(out) + "\n"
