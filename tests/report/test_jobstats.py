"""Per-job figures from a job run in virtual time: fio's runtime rules,
IOPS and bandwidth arithmetic, group reporting."""

from __future__ import annotations

from qiothread.clock import VirtualClock
from qiothread.fio.options import JobOptions, parse_fio_args
from qiothread.fio.workload import run_job
from qiothread.report.fio_json import build_fio_json
from qiothread.report.model import JobResult, RunReport
from qiothread.report.summary import render_summary
from tests.fio.driver_double import DriverDouble

MiB = 1 << 20
MS = 1_000_000


def run(*args: str, service_ns: int = MS) -> JobResult:
    j = JobOptions().with_options(parse_fio_args(args))
    clock = VirtualClock(10**12)
    drv = DriverDouble(clock, MiB, service_ns=service_ns)
    return run_job(drv, j, clock, disk_size=MiB)


def test_verify_phase_time_goes_to_reads() -> None:
    res = run("--rw=randwrite", "--size=64k", "--verify=md5")
    doc = build_fio_json(RunReport(jobs=[res]))["jobs"][0]
    assert doc["write"]["runtime"] == 16
    assert doc["read"]["runtime"] == 16
    assert doc["job_runtime"] == 32
    assert doc["write"]["iops"] == 1000.0
    assert doc["write"]["bw_bytes"] == 4096 * 1000
    assert doc["write"]["bw"] == 4000


def test_iops_bw_and_windows() -> None:
    res = run("--rw=read", "--size=1m", "--bs=4k", service_ns=4 * MS)
    doc = build_fio_json(RunReport(jobs=[res]))["jobs"][0]["read"]
    # 256 I/Os, one every 4 ms: 1024 ms, two full 500 ms windows:
    # completions at 4 .. 496 ms (124) and 500 .. 996 ms (125).
    assert doc["runtime"] == 1024
    assert doc["total_ios"] == 256
    assert doc["iops"] == 250.0
    assert (doc["iops_samples"], doc["iops_min"], doc["iops_max"]) == (
        2, 248, 250)
    assert (doc["bw_samples"], doc["bw_min"], doc["bw_max"]) == (
        2, 992, 1000)
    assert doc["iops_mean"] == 249.0
    # mean window bandwidth 996 KiB/s of the 1000 KiB/s aggregate
    assert doc["bw_agg"] == 99.6


def test_group_reporting_sums_jobs() -> None:
    a = run("--name=g", "--rw=read", "--size=64k", "--group_reporting")
    b = run("--name=g", "--rw=read", "--size=32k", "--group_reporting")
    doc = build_fio_json(RunReport(jobs=[a, b]))
    assert len(doc["jobs"]) == 1
    assert doc["jobs"][0]["read"]["total_ios"] == 24
    assert doc["jobs"][0]["read"]["runtime"] == 16
    text = render_summary(RunReport(jobs=[a, b]))
    assert "g: (groupid=0, jobs=2): err= 0" in text
    # 24 I/Os of 4 KiB over the longest runtime, 16 ms.
    assert "  read: IOPS=1500, BW=6000KiB/s (6144kB/s)(96.0KiB/16msec)" \
        in text
    assert "   READ: bw=6000KiB/s (6144kB/s), 6000KiB/s-6000KiB/s " \
        "(6144kB/s-6144kB/s), io=96.0KiB (98.3kB), run=16-16msec" in text


def test_separate_jobs_share_the_group_aggregate() -> None:
    a = run("--name=a", "--rw=read", "--size=64k")
    b = run("--name=b", "--rw=read", "--size=32k")
    doc = build_fio_json(RunReport(jobs=[a, b]))
    assert [j["jobname"] for j in doc["jobs"]] == ["a", "b"]
    text = render_summary(RunReport(jobs=[a, b]))
    # group: 96 KiB over the longest run (16 ms); jobs at 4000 KB/s
    assert "run=8-16msec" in text


def test_verify_failure_reported_like_fio() -> None:
    j = JobOptions().with_options(parse_fio_args(
        ["--name=v", "--rw=write", "--size=16k", "--verify=crc32c"]))
    clock = VirtualClock(10**12)
    drv = DriverDouble(clock, MiB)
    drv.on_write = lambda off, data: (off, bytes(len(data))
                                      if off == 8192 else data)
    res = run_job(drv, j, clock, disk_size=MiB)
    text = render_summary(RunReport(jobs=[res]))
    lines = text.splitlines()
    assert lines[0] == ("verify: block at offset 8192: bad header magic "
                        "0x00000000")
    assert lines[1].startswith(
        "v: (groupid=0, jobs=1): err=84 (Invalid or incomplete multibyte "
        "or wide character): pid=0: ")
    assert "     verify    : checked=4, mismatches=1" in lines
    doc = build_fio_json(RunReport(jobs=[res]))
    assert doc["jobs"][0]["error"] == 84
    assert doc["qiothread"]["jobs"][0]["verify"] == {"checked": 4,
                                                      "mismatches": 1}
