"""``qiothread sweep`` / ``report``: grid, placement of parameters,
metrics, and a real small sweep whose table, CSV, JSON and PNGs are
checked."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from qiothread.sweep import (
    SweepError,
    SweepPoint,
    apply_params,
    grid,
    main,
    metrics_from_doc,
    parse_param,
    report_main,
    round_order,
    run_sweep,
)


def test_grid_and_alternating_order() -> None:
    pts = grid([parse_param("poll-policy=7.2,10.0"),
                parse_param("iodepth=1,4,16")])
    assert [p.key for p in pts[:4]] == [
        "poll-policy=7.2,iodepth=1", "poll-policy=7.2,iodepth=4",
        "poll-policy=7.2,iodepth=16", "poll-policy=10.0,iodepth=1"]
    assert len(pts) == 6
    assert round_order(3, 0) == [0, 1, 2]
    assert round_order(3, 1) == [2, 1, 0]
    assert round_order(3, 2) == [0, 1, 2]
    for bad in ("iodepth", "iodepth=", "=1,2", "iodepth=1,,2"):
        with pytest.raises(SweepError, match="expected NAME=V1,V2"):
            parse_param(bad)
    with pytest.raises(SweepError, match="given twice"):
        grid([("bs", ["4k"]), ("bs", ["8k"])])


def test_parameters_go_where_they_belong() -> None:
    pt = SweepPoint((("poll-max-ns", "0"), ("iodepth", "8"),
                     ("queue-size", "128"), ("aio", "io_uring")))
    base = ["-object", "iothread,id=io1,poll-max-ns=4000",
            "-blockdev", "driver=file,node-name=d,filename=/x,aio=native",
            "-device", "virtio-blk-pci,drive=d,iothread=io1",
            "--rw=randread", "--iodepth=1"]
    assert apply_params(base, pt) == [
        "-object", "iothread,id=io1,poll-max-ns=0",
        "-blockdev", "driver=file,node-name=d,filename=/x,aio=io_uring",
        "-device", "virtio-blk-pci,drive=d,iothread=io1,queue-size=128",
        "--rw=randread", "--iodepth=8"]
    # No iothread given: one is added; JSON options are edited as JSON.
    got = apply_params(
        ["-device", '{"driver": "virtio-blk-pci", "drive": "d"}'],
        SweepPoint((("poll-grow", "4"), ("num-queues", "2"))))
    assert got[:2] == ["-device", '{"driver": "virtio-blk-pci", '
                       '"drive": "d", "num-queues": 2}']
    assert got[2:] == ["-object", "iothread,id=iothread0,poll-grow=4"]
    with pytest.raises(SweepError, match="'queue-size' needs a -device"):
        apply_params([], SweepPoint((("queue-size", "64"),)))


def _doc() -> dict[str, Any]:
    def dd(ios: int, iops: float, p: int) -> dict[str, Any]:
        return {"total_ios": ios, "iops": iops,
                "clat_ns": {"percentile": {"50.000000": p,
                                           "99.000000": 2 * p,
                                           "99.900000": 3 * p}}}
    return {
        "jobs": [{"job_runtime": 2000, "read": dd(100, 50.0, 10_000),
                  "write": dd(300, 150.0, 20_000), "trim": dd(0, 0, 0)}],
        "qiothread": {
            "iothreads": [{"usr_s": 0.3, "sys_s": 0.1,
                           "poll_progress": 30, "poll_timeout": 10}],
            "queues": [{"requests": 400, "kicks_sent": 100,
                        "interrupts_sent": 380}]}}


def test_metrics_of_one_run() -> None:
    m = metrics_from_doc(_doc())
    # The write direction has the most I/O: its clat percentiles.
    assert (m["lat_p50_us"], m["lat_p99_us"], m["lat_p999_us"]) == (
        20.0, 40.0, 60.0)
    assert m["iops"] == 200.0
    assert m["iothread_cpu_pct"] == pytest.approx(20.0)   # 0.4 s / 2 s
    assert m["poll_hit_pct"] == 75.0
    assert (m["kicks_per_io"], m["irqs_per_io"]) == (0.25, 0.95)
    empty = metrics_from_doc({"jobs": []})
    assert math.isnan(empty["lat_p99_us"]) and empty["iops"] == 0.0


def test_a_failed_run_is_recorded_and_reported(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def runner(args: list[str], out: Path) -> int:
        calls.append(args)
        if "--iodepth=2" in args:
            return 1
        out.write_text(json.dumps(_doc()))
        return 0

    logs: list[str] = []
    state = run_sweep([("iodepth", ["1", "2"])], 2, tmp_path, [],
                      runner, logs.append)
    assert [c[-1] for c in calls] == ["--iodepth=1", "--iodepth=2",
                                      "--iodepth=2", "--iodepth=1"]
    assert [r["point"] for r in state["runs"]] == ["iodepth=1"] * 2
    assert len(state["failed"]) == 2
    assert "qiothread sweep: run failed (exit 1): iodepth=2\n" in logs


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    status = main(["--param", "poll-max-ns=0,32768", "--repeat", "2",
                   "--output-dir", str(out), "--run-timeout", "120",
                   "--runtime=300ms"])
    assert status == 0
    return out


def _table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()
            if line and not line.startswith("wrote ")]


def test_small_sweep_table_csv_json_and_png(
        small_sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = small_sweep
    state = json.loads((out / "sweep.json").read_text())
    assert [(r["point"], r["round"]) for r in state["runs"]] == [
        ("poll-max-ns=0", 0), ("poll-max-ns=32768", 0),
        ("poll-max-ns=32768", 1), ("poll-max-ns=0", 1)]
    summary = json.loads((out / "summary.json").read_text())
    pts = {p["point"]: p for p in summary["points"]}
    assert pts["poll-max-ns=0"]["rounds"] == 2
    # Real runs: no polling at poll-max-ns=0, some with the default.
    assert pts["poll-max-ns=0"]["poll_hit_pct"] == 0.0
    assert pts["poll-max-ns=32768"]["poll_hit_pct"] > 0.0
    for p in pts.values():
        assert p["iops"] > 0 and p["lat_p99_us"] >= p["lat_p50_us"] > 0
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[0].startswith("poll-max-ns,rounds,lat_p50_us,"
                             "lat_p50_us_std,")
    assert [c.split(",")[:2] for c in csv[1:]] == [["0", "2"],
                                                   ["32768", "2"]]
    for name in ("latency.png", "cpu.png"):
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
        # Not a blank canvas: lines and text were drawn.
        assert img[..., :3].min() < 0.5
    # report DIR rebuilds the same table from the saved JSON.
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows[0][:3] == ["poll-max-ns", "n", "p50"]
    assert [r[:2] for r in rows[1:]] == [["0", "2"], ["32768", "2"]]


def test_report_of_a_directory_without_a_sweep(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(tmp_path)]) == 1
    assert "not a sweep directory" in capsys.readouterr().err


def _procs_mentioning(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            pids.append(int(d.name))
    return pids


def test_regression_ctrl_c_stops_the_running_point(tmp_path: Path) -> None:
    """The run has a session of its own, so the terminal's Ctrl-C
    reaches only the sweep; it must stop the run's processes too."""
    out = tmp_path / "ctrlc-sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qiothread.cli", "sweep", "--param",
         "iodepth=1,2", "--output-dir", str(out), "--runtime=60s"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # Wait for the run of the first point and its iothread/guest.
        while len(_procs_mentioning(str(out))) < 3:
            assert time.monotonic() < deadline, "the run did not start"
            assert proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "qiothread sweep: interrupted" in err
    deadline = time.monotonic() + 20
    while _procs_mentioning(str(out)):
        assert time.monotonic() < deadline, "run processes left behind"
        time.sleep(0.05)
