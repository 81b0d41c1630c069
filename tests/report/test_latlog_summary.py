"""Latency logs in fio's format and the text report's qiothread part,
from hand-made records with exact expected output."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qiothread.fio.options import JobOptions, parse_fio_args
from qiothread.report.fio_json import build_fio_json
from qiothread.report.latlog import write_lat_logs
from qiothread.report.model import (
    IoRecords,
    IOThreadStats,
    JobResult,
    QiothreadSection,
    QueueStats,
    RunReport,
)
from qiothread.report.summary import num2str, render_qiothread

T0 = 10**12
MS = 1_000_000


def make_result(*args: str) -> JobResult:
    job = JobOptions().with_options(parse_fio_args(args))
    n = 3
    t_start = T0 + np.array([0, 2 * MS, 2500 * 1000], dtype=np.int64)
    recs = IoRecords(
        ddir=np.array([0, 1, 0], np.uint8),
        offset=np.array([0, 4096, 8192], np.uint64),
        length=np.array([4096, 4096, 8192], np.uint32),
        t_start=t_start, t_submit=t_start + 500,
        t_complete=t_start + np.array([20_000, 30_000, 1_500_000]),
        status=np.zeros(n, np.uint8), depth=np.ones(n, np.uint16),
        # the second request came back without device stamps (0)
        t_pickup=np.where([True, False, True],
                          t_start + np.array([1500, 0, 2500]), 0),
        t_done=np.where([True, False, True],
                        t_start + np.array([15_000, 0, 1_400_000]), 0))
    return JobResult(options=job, records=recs, start_ns=T0,
                     end_ns=T0 + 5 * MS)


def test_lat_logs_fio_format(tmp_path: Path) -> None:
    res = make_result("--name=j")
    paths = write_lat_logs(res, "j", 1, tmp_path)
    assert [p.name for p in paths] == ["j_clat.1.log", "j_slat.1.log",
                                       "j_lat.1.log"]
    assert paths[0].read_text() == (
        "0, 19500, 0, 4096, 0, 0, 500\n"
        "2, 29500, 1, 4096, 4096, 0, 2000500\n"
        "4, 1499500, 0, 8192, 8192, 0, 2500500\n")
    assert paths[1].read_text().splitlines()[0] == \
        "0, 500, 0, 4096, 0, 0, 500"
    # fio 3.33's default: no offset, no issue time.
    short = write_lat_logs(res, "k", 2, tmp_path, log_offset=False,
                           issue_time=False)
    assert short[2].read_text().splitlines()[1] == "2, 30000, 1, 4096, 0"


def test_lat_log_starts_after_ramp(tmp_path: Path) -> None:
    res = make_result("--ramp_time=1ms")
    lines = write_lat_logs(res, "r", 1, tmp_path)[0].read_text()
    # The first I/O completed inside the ramp: not logged; times count
    # from the end of the ramp.
    assert lines.splitlines()[0].startswith("1, 29500, 1,")
    assert len(lines.splitlines()) == 2


def test_stage_latencies_in_json() -> None:
    doc = build_fio_json(RunReport(jobs=[make_result("--name=s")]))
    stages = doc["qiothread"]["jobs"][0]["stages"]
    # Only rows the device stamped (2 of 3) count.
    assert stages["submit_to_pickup"]["N"] == 2
    assert stages["submit_to_pickup"]["min"] == 1000
    assert stages["pickup_to_done"]["max"] == 1_397_500
    assert stages["done_to_guest"]["min"] == 5000
    assert list(stages["done_to_guest"]["percentile"]) == [
        "50.000000", "90.000000", "99.000000", "99.900000"]


def test_num2str_like_fio() -> None:
    assert num2str(33554432, unit="B/s") == "32.0MiB/s"
    assert num2str(33554432, pow2=False, unit="B/s") == "33.6MB/s"
    assert num2str(4194304, unit="B") == "4096KiB"
    assert num2str(4194304, pow2=False, unit="B") == "4194kB"
    assert num2str(8266, pow2=False) == "8266"
    assert num2str(82660, pow2=False) == "82.7k"
    assert num2str(531, 6, False) == "531"


def test_qiothread_section_text() -> None:
    t = IOThreadStats(id="iothread0", thread_id=4242, poll_max_ns=32768,
                      poll_ns_time={0: 1000, 4000: 3000},
                      grow_count=3, shrink_count=1, poll_progress=75,
                      poll_timeout=25, blocking_waits=40,
                      polling_ns=600, blocked_ns=400)
    q = QueueStats(device="disk0", queue=1, iothread="iothread0",
                   requests=100, kicks_sent=10, kicks_suppressed=90,
                   interrupts_sent=20, interrupts_suppressed=80,
                   merges=5)
    text = render_qiothread(QiothreadSection(iothreads=[t], queues=[q]))
    assert text.splitlines()[2:] == [
        "  iothread0: thread_id=4242, poll-max-ns=32768, poll-grow=0, "
        "poll-shrink=0",
        "    poll_ns      : mean=3000, time at 4000=75.0%, 0=25.0%",
        "    polling      : rounds=100, found work=75 (75.0%), "
        "timed out=25, grow=3, shrink=1",
        "    waits        : blocking=40, polling=60.0%, blocked=40.0% "
        "of the loop's time",
        "  queues:",
        "    disk0.vq1 (iothread0): requests=100, kicks=10 sent/90 "
        "suppressed, interrupts=20 sent/80 suppressed, merges=5",
    ]


def test_job_banner_sizes_like_fio() -> None:
    from qiothread.report.summary import job_banner
    job = JobOptions().with_options(parse_fio_args(
        ["--name=j", "--bs=4k,8k,16k"]))
    # fio 3.33: fio --name=j --bs=4k,8k,16k,32k
    assert job_banner(job) == (
        "j: (g=0): rw=read, bs=(R) 4096B-4096B, (W) 8192B-8192B, "
        "(T) 16.0KiB-16.0KiB, ioengine=psync, iodepth=1")
