"""The human-readable report, in fio's normal output style.

The text follows fio 3.33's ``show_thread_status_normal``,
``show_ddir_status``, ``show_clat_percentiles``, ``show_latencies`` and
``show_group_stats`` (``stat.c``), so that people who read fio output
every day read this without effort:

- numbers go through :func:`num2str`, fio's 4-significant-figure
  formatter (``32.0MiB/s``, ``33.6MB/s``, ``4096KiB``);
- a latency line switches from nsec to usec (or msec) only when min,
  max *and* stddev all clear fio's thresholds;
- the percentile block picks its unit from the smallest and largest
  percentile values, rounds up when scaling, and fits as many entries
  per line as fio does for the list's precision.

After fio's part comes qiothread's own: per iothread what polling did,
per queue the notification counters, per stage where latency went, and
the host facts that decide wake-up latency.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import numpy.typing as npt

from qiothread.fio.options import Ddir, JobOptions
from qiothread.report import stats
from qiothread.report.jobstats import (
    DdirStats,
    GroupStats,
    JobStats,
    group_stats,
    job_stats,
    report_units,
)
from qiothread.report.model import QiothreadSection, RunReport

__all__ = ["job_banner", "num2str", "render_qiothread", "render_summary"]

_SIG_FIGS = 4
_DDIR_NAMES = {Ddir.READ: "read", Ddir.WRITE: "write",
               Ddir.TRIM: "trim"}


def num2str(num: int, maxlen: int = _SIG_FIGS, pow2: bool = True,
            unit: str = "") -> str:
    """fio's ``num2str``: at most ``maxlen`` digits, a K/Ki-style
    prefix, one or more decimals when there is room, then ``unit``."""
    prefixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei") if pow2 else \
        ("", "k", "M", "G", "T", "P", "E")
    thousand = 1024 if pow2 else 1000
    post = 0
    modulo: int | None = None
    carry = False
    while post < len(prefixes):
        if len(str(num)) <= maxlen:
            break
        modulo = num % thousand
        num //= thousand
        carry = modulo >= thousand // 2
        post += 1
    if post >= len(prefixes):
        post = 0
    if modulo is None:
        return f"{num}{prefixes[post]}{unit}"
    room = maxlen - len(str(num))
    if room <= 1:
        return f"{num + int(carry)}{prefixes[post]}{unit}"
    frac = f"{modulo / thousand:.{room - 1}f}"
    if frac[0] == "1":
        num += 1
    return f"{num}.{frac[2:]}{prefixes[post]}{unit}"


def job_banner(opts: JobOptions, groupid: int = 0) -> str:
    """fio's one-line description printed before a job starts."""
    sizes = [num2str(b, unit="B") for b in opts.bs]
    bs = ", ".join(f"({d}) {b}-{b}" for d, b in zip("RWT", sizes,
                                                    strict=True))
    return (f"{opts.name}: (g={groupid}): rw={opts.rw.value}, bs={bs}, "
            f"ioengine={opts.ioengine}, iodepth={opts.iodepth}")


def _display_lat(name: str, values: npt.NDArray[np.int64]) -> str:
    st = stats.lat_stat(values)
    lo, hi, mean, dev = st.min, st.max, st.mean, st.stddev
    unit = "nsec"
    if lo > 2_000_000 and hi > 99_999_999 and dev > 1_000_000.0:
        lo, hi, mean, dev = (lo // 1_000_000, hi // 1_000_000,
                             mean / 1e6, dev / 1e6)
        unit = "msec"
    elif lo > 2000 and hi > 99_999 and dev > 1000.0:
        lo, hi, mean, dev = lo // 1000, hi // 1000, mean / 1e3, dev / 1e3
        unit = "usec"
    return (f"    {name} ({unit}): min={num2str(lo, 6, False)}, "
            f"max={num2str(hi, 6, False)}, avg={mean:5.02f}, "
            f"stdev={dev:5.02f}\n")


def _percentile_block(pre: str, values: npt.NDArray[np.int64],
                      plist: tuple[float, ...], precision: int) -> str:
    ovals = stats.fio_percentiles(values, plist)
    if not ovals:
        return ""
    minv, maxv = min(ovals), max(ovals)
    if minv > 2_000_000 and maxv > 99_999_999:
        scale, divisor, unit = 2, 1_000_000, "msec"
    elif minv > 2000 and maxv > 99_999:
        scale, divisor, unit = 1, 1000, "usec"
    else:
        scale, divisor, unit = 0, 1, "nsec"
    width = max(5, int(math.log10(maxv // divisor) + 1)
                if maxv // divisor > 0 else 5)
    per_line = (80 - 7) // (precision + 10 + width)
    out = [f"    {pre} percentiles ({unit}):\n     |"]
    for j, (p, v) in enumerate(zip(plist, ovals, strict=True)):
        if j and j % per_line == 0:
            out.append("     |")
        last = j == len(ovals) - 1
        for _ in range(scale):
            v = (v + 999) // 1000  # fio rounds up when scaling
        out.append(f" {p:{precision + 3}.{precision}f}th=[{v:{width}d}]"
                   f"{chr(10) if last else ','}")
        if not last and j % per_line == per_line - 1:
            out.append("\n")
    return "".join(out)


def _sample_line(d: DdirStats, group: GroupStats, ddir: Ddir) -> str:
    out = ""
    bw = d.samples.bw_kib
    if bw.size:
        st = stats.lat_stat(bw)
        lo, hi, mean, dev = float(st.min), float(st.max), st.mean, \
            st.stddev
        agg = group.agg(ddir)
        per = min(100.0, mean * 100.0 / (agg / 1024.0)) \
            if agg > 1024 else 100.0
        unit = "KiB"
        if mean > 1024.0 * 1024.0:
            lo, hi, mean, dev = lo / 1024, hi / 1024, mean / 1024, \
                dev / 1024
            unit = "MiB"
        out += (f"   bw ({unit:>5}/s): min={int(lo):5d}, "
                f"max={int(hi):5d}, per={per:3.2f}%, avg={mean:5.02f}, "
                f"stdev={dev:5.02f}, samples={st.n}\n")
    iops = d.samples.iops
    if iops.size:
        st = stats.lat_stat(iops)
        out += (f"   iops        : min={st.min:5d}, max={st.max:5d}, "
                f"avg={st.mean:5.02f}, stdev={st.stddev:5.02f}, "
                f"samples={st.n}\n")
    return out


def _ddir_block(js: JobStats, ddir: Ddir, group: GroupStats) -> str:
    d = js.ddirs[ddir]
    if not d.runtime_ms:
        return ""
    bw = 1000 * d.io_bytes // d.runtime_ms
    iops = 1000 * d.total_ios // d.runtime_ms
    out = (f"  {_DDIR_NAMES[ddir]}: IOPS={num2str(iops, pow2=False)}, "
           f"BW={num2str(bw, unit='B/s')} "
           f"({num2str(bw, pow2=False, unit='B/s')})"
           f"({num2str(d.io_bytes, unit='B')}/{d.runtime_ms}msec)"
           # fio 3.33 reports zoned-device resets after every write
           # line; a virtio-blk disk here is never zoned.
           f"{'; 0 zone resets' if ddir == Ddir.WRITE else ''}\n")
    for name, vals in (("slat", d.slat_ns), ("clat", d.clat_ns),
                       (" lat", d.lat_ns)):
        if vals.size:
            out += _display_lat(name, vals)
    opts = js.options
    out += _percentile_block("clat", d.clat_ns, opts.percentile_list,
                             opts.percentile_precision)
    return out + _sample_line(d, group, ddir)


def _lat_lines(unit: str, labels: tuple[str, ...],
               values: list[float]) -> str:
    out: list[str] = []
    line = 0
    new_line = True
    for label, v in zip(labels, values, strict=True):
        if v <= 0.0:
            continue
        if new_line:
            if line:
                out.append("\n")
            out.append(f"  lat ({unit})   : ")
            new_line = False
            line = 0
        if line:
            out.append(", ")
        out.append(f"{label}={v:3.2f}%")
        line += 1
        if line == 5:
            new_line = True
    if out:
        out.append("\n")
    return "".join(out)


def _dist(values: list[float], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={v:3.1f}%" for n, v in zip(names, values,
                                                      strict=True))


def _job_block(js: JobStats, group: GroupStats, now: float) -> str:
    err = f"err={js.error:2d}"
    if js.error:
        # fio names the error after the number: "err=84 (...)".
        err += f" ({os.strerror(js.error)})"
    out = "".join(f"{line}\n" for line in js.verify_errors)
    out += (f"{js.name}: (groupid={js.groupid}, jobs={js.members}): "
            f"{err}: pid={js.pid}: {time.ctime(now)}\n")
    for ddir in (Ddir.READ, Ddir.WRITE, Ddir.TRIM):
        if js.ddirs[ddir].io_bytes:
            out += _ddir_block(js, ddir, group)
    out += _lat_lines("nsec", stats.LAT_NU_LABELS, js.lat_n)
    out += _lat_lines("usec", stats.LAT_NU_LABELS, js.lat_u)
    out += _lat_lines("msec", stats.LAT_M_LABELS, js.lat_m)
    if js.sync_lat_ns.size:
        out += "  fsync/fdatasync/sync_file_range:\n"
        out += _display_lat("sync", js.sync_lat_ns)
    out += (f"  cpu          : usr={js.usr_cpu:3.2f}%, "
            f"sys={js.sys_cpu:3.2f}%, ctx={js.cpu.ctx}, "
            f"majf={js.cpu.majf}, minf={js.cpu.minf}\n")
    out += "  IO depths    : " + _dist(
        js.depth_levels, ("1", "2", "4", "8", "16", "32", ">=64")) + "\n"
    levels = ("0", "4", "8", "16", "32", "64", ">=64")
    out += "     submit    : " + _dist(js.submit_levels, levels) + "\n"
    out += "     complete  : " + _dist(js.complete_levels, levels) + "\n"
    r, w, t = js.total_by_ddir
    out += (f"     issued rwts: total={r},{w},{t},{js.sync_lat_ns.size} "
            "short=0,0,0,0 dropped=0,0,0,0\n")
    out += (f"     latency   : target=0, window=0, percentile=100.00%, "
            f"depth={js.options.iodepth}\n")
    if js.options.verify_enabled:
        out += (f"     verify    : checked={js.verify_checked}, "
                f"mismatches={js.verify_mismatches}\n")
    return out


def _group_block(g: GroupStats) -> str:
    out = f"\nRun status group {g.groupid} (all jobs):\n"
    names = {Ddir.READ: "   READ", Ddir.WRITE: "  WRITE",
             Ddir.TRIM: "   TRIM"}
    for ddir in (Ddir.READ, Ddir.WRITE, Ddir.TRIM):
        if not g.max_run_ms[ddir]:
            continue
        agg = g.agg(ddir)
        io = g.io_bytes[ddir]
        lo, hi = g.min_bw[ddir], g.max_bw[ddir]
        out += (f"{names[ddir]}: bw={num2str(agg, unit='B/s')} "
                f"({num2str(agg, pow2=False, unit='B/s')}), "
                f"{num2str(lo, unit='B/s')}-{num2str(hi, unit='B/s')} "
                f"({num2str(lo, pow2=False, unit='B/s')}-"
                f"{num2str(hi, pow2=False, unit='B/s')}), "
                f"io={num2str(io, unit='B')} "
                f"({num2str(io, pow2=False, unit='B')}), "
                f"run={g.min_run_ms[ddir]}-{g.max_run_ms[ddir]}msec\n")
    return out


def _us(ns: float) -> str:
    return f"{ns / 1000.0:.1f}"


def render_qiothread(section: QiothreadSection) -> str:
    """The qiothread part: iothreads, queues, stages and host facts."""
    out = [f"\nqiothread (QEMU {section.qemu_policy} behaviour):\n"]
    for t in section.iothreads:
        out.append(f"  {t.id}: thread_id={t.thread_id}, "
                   f"poll-max-ns={t.poll_max_ns}, "
                   f"poll-grow={t.poll_grow}, "
                   f"poll-shrink={t.poll_shrink}\n")
        total = sum(t.poll_ns_time.values())
        if total:
            top = sorted(t.poll_ns_time.items(), key=lambda kv: -kv[1])[:5]
            shares = ", ".join(f"{v}={ns * 100.0 / total:.1f}%"
                               for v, ns in top)
            out.append(f"    poll_ns      : mean={t.mean_poll_ns:.0f}, "
                       f"time at {shares}\n")
        rounds = t.poll_progress + t.poll_timeout
        found = t.poll_progress * 100.0 / rounds if rounds else 0.0
        out.append(f"    polling      : rounds={rounds}, "
                   f"found work={t.poll_progress} ({found:.1f}%), "
                   f"timed out={t.poll_timeout}, grow={t.grow_count}, "
                   f"shrink={t.shrink_count}\n")
        span = t.polling_ns + t.blocked_ns
        poll_pct = t.polling_ns * 100.0 / span if span else 0.0
        block_pct = t.blocked_ns * 100.0 / span if span else 0.0
        out.append(f"    waits        : blocking={t.blocking_waits}, "
                   f"polling={poll_pct:.1f}%, blocked={block_pct:.1f}% "
                   "of the loop's time\n")
        if t.cpu is not None:
            out.append(f"    cpu          : usr={t.cpu.user_s:.3f}s, "
                       f"sys={t.cpu.system_s:.3f}s, ctx={t.cpu.ctx}\n")
    if section.queues:
        out.append("  queues:\n")
        for q in section.queues:
            out.append(
                f"    {q.device}.vq{q.queue} ({q.iothread or '-'}): "
                f"requests={q.requests}, kicks={q.kicks_sent} sent/"
                f"{q.kicks_suppressed} suppressed, interrupts="
                f"{q.interrupts_sent} sent/{q.interrupts_suppressed} "
                f"suppressed, merges={q.merges}\n")
    if section.stages:
        out.append("  request stages (usec): "
                   "min / p50 / p99 / max, mean\n")
        for s in section.stages:
            st = stats.lat_stat(s.samples_ns)
            p50, p99 = stats.fio_percentiles(s.samples_ns, (50.0, 99.0)) \
                or (0, 0)
            out.append(f"    {s.name:<16}: {_us(st.min)} / {_us(p50)} / "
                       f"{_us(p99)} / {_us(st.max)}, {_us(st.mean)} "
                       f"(N={st.n})\n")
    if section.host:
        from qiothread.report.host import describe_host
        out.append("  host         : " + describe_host(section.host)
                   + "\n")
    return "".join(out)


def render_summary(report: RunReport) -> str:
    """fio's normal output for ``report``, then qiothread's section."""
    now = report.timestamp_s or time.time()
    units = report_units(report.jobs)
    jobs = [job_stats(u) for u in units]
    group = group_stats(jobs)
    out = "".join(_job_block(j, group, now) for j in jobs)
    out += _group_block(group)
    if report.disk_util:
        out += "\nDisk stats (read/write):\n"
        for d in report.disk_util:
            out += (f"  {d.name}: ios={d.read_ios}/{d.write_ios}, "
                    f"merge={d.read_merges}/{d.write_merges}, "
                    f"ticks={d.read_ticks}/{d.write_ticks}, "
                    f"in_queue={d.in_queue}, util={d.util:3.2f}%\n")
    if report.qiothread is not None:
        out += render_qiothread(report.qiothread)
    return out
