"""CI budgets against fio's JSON (the real fio's, and hand-made)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qiothread.budget import (
    EXIT_BUDGET,
    BudgetError,
    check_budgets,
    evaluate,
    load_budget_file,
    parse_budget,
    split_expect_args,
)


def test_units_convert_to_the_metrics_own_unit() -> None:
    assert parse_budget("read.clat_ns.p99<500us").limit == 500_000
    assert parse_budget("read.clat_ns.p99 < 2ms").limit == 2_000_000
    assert parse_budget("read.clat_ns.max<=1s").limit == 1e9
    assert parse_budget("read.clat_ns.mean<750").limit == 750
    assert parse_budget("read.clat_ns.mean<750µs").limit == 750_000
    assert parse_budget("read.lat_us.mean<3ms").limit == 3000  # fio's us
    assert parse_budget("iops>5k").limit == 5000
    assert parse_budget("bw>=1.5M").limit == 1.5e6
    assert parse_budget("io_bytes>=4Ki").limit == 4096
    b = parse_budget("j1:write.iops!=0")
    assert (b.job, b.metric, b.op.value) == ("j1", "write.iops", "!=")


@pytest.mark.parametrize(("text", "message"), [
    ("iops>5us", "'us' is a time unit but iops is not a time"),
    ("iops>5parsecs", "unknown unit 'parsecs'"),
    ("iops=>5", "expected [JOB:]METRIC OP VALUE"),
    ("read..iops>5", "empty component"),
    ("<5", "expected [JOB:]METRIC OP VALUE"),
])
def test_bad_budgets_are_refused(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=f"invalid budget .*{message}"
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_budget(text)


def test_budget_file(tmp_path: Path) -> None:
    f = tmp_path / "budgets"
    f.write_text("# latency\nread.clat_ns.p99 < 500us  # tail\n\n"
                 "iops > 5k\n")
    assert [b.text for b in load_budget_file(f)] == [
        "read.clat_ns.p99 < 500us", "iops > 5k"]
    f.write_text("iops > 5k\nlatency small\n")
    with pytest.raises(BudgetError, match=r"budgets:2: invalid budget"):
        load_budget_file(f)
    with pytest.raises(BudgetError, match="cannot read budget file"):
        load_budget_file(tmp_path / "missing")


def test_split_expect_args(tmp_path: Path) -> None:
    f = tmp_path / "b"
    f.write_text("iops>1\n")
    budgets, rest = split_expect_args(
        ["--rw=randread", "--expect", "iops>5k", "--expect=read.iops>2",
         "--expect-file", str(f), "--bs=4k"])
    assert rest == ["--rw=randread", "--bs=4k"]
    assert [b.text for b in budgets] == ["iops>5k", "read.iops>2", "iops>1"]
    with pytest.raises(BudgetError, match="'--expect' requires"):
        split_expect_args(["--expect"])


def _job(name: str, iops: float, p99: int, mean: float) -> dict[str, Any]:
    def ddir(i: float, p: int, m: float) -> dict[str, Any]:
        return {"iops": i, "bw": int(i * 4), "io_bytes": int(i * 4096),
                "clat_ns": {"min": 1, "max": p * 2, "mean": m,
                            "percentile": {"50.000000": p // 2,
                                           "99.000000": p,
                                           "99.900000": p + 1}}}
    return {"jobname": name, "read": ddir(iops, p99, mean),
            "write": ddir(0.0, 0, 0.0), "trim": ddir(0.0, 0, 0.0)}


DOC = {"jobs": [_job("a", 3000.0, 400_000, 90_000.5),
                _job("b", 2500.0, 620_000, 110_000.0)],
       "qiothread": {"iothreads": [{"id": "io0", "poll_ns_mean": 3100.5}]}}


def test_a_budget_fails_when_it_should_and_names_job_and_value() -> None:
    results = evaluate(DOC, [parse_budget("read.clat_ns.p99<500us")])
    assert [(r.job, r.ok, r.value) for r in results] == [
        ("a", True, 400_000.0), ("b", False, 620_000.0)]
    assert results[1].message() == (
        "budget 'read.clat_ns.p99<500us' FAILED (job 'b'): "
        "measured 620us")
    lines: list[str] = []
    status = check_budgets(DOC, [parse_budget("read.clat_ns.p99<500us"),
                                 parse_budget("iops>5k")], lines.append)
    assert status == EXIT_BUDGET
    assert lines == [
        "qiothread: budget 'read.clat_ns.p99<500us' FAILED (job 'b'): "
        "measured 620us\n",
        "qiothread: 1 of 3 budget checks failed\n"]


def test_throughput_is_summed_over_jobs_and_directions() -> None:
    [r] = evaluate(DOC, [parse_budget("iops>5k")])
    assert (r.ok, r.value, r.job) == (True, 5500.0, None)
    [r] = evaluate(DOC, [parse_budget("read.iops>=5.5k")])
    assert (r.ok, r.value) == (True, 5500.0)
    [r] = evaluate(DOC, [parse_budget("b:iops>3k")])
    assert (r.ok, r.value, r.job) == (False, 2500.0, "b")
    assert r.message() == "budget 'b:iops>3k' FAILED (job 'b'): " \
        "measured 2.5k"


def test_what_cannot_be_evaluated_fails() -> None:
    results = evaluate(DOC, [parse_budget("read.clat_ns.p99.99<1ms"),
                             parse_budget("read.slat_ns.mean<1ms"),
                             parse_budget("zz:iops>1"),
                             parse_budget("qiothread.iothreads.3.x>1"),
                             parse_budget("qiothread.iothreads.0.id>1")])
    assert all(not r.ok for r in results)
    msgs = [r.error for r in results]
    assert msgs[0].startswith("percentile 99.99 is not in the result")
    assert msgs[1] == "no 'read.slat_ns' in the result"
    assert msgs[2] == "no such job (jobs: 'a', 'b')"
    assert msgs[3] == "no 'qiothread.iothreads.3' in the result"
    assert msgs[4] == "'qiothread.iothreads.0.id' is not a number"
    [ok] = evaluate(DOC, [parse_budget(
        "qiothread.iothreads.0.poll_ns_mean<4000")])
    assert ok.ok and ok.value == 3100.5
    assert check_budgets({"jobs": []}, [parse_budget("iops>1")],
                         lambda s: None) == EXIT_BUDGET


@pytest.fixture(scope="module")
def fio_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fio = shutil.which("fio")
    if fio is None:
        pytest.skip("fio is not installed")
    d = tmp_path_factory.mktemp("fio")
    out = subprocess.run(
        [fio, "--name=cj", f"--filename={d / 'f'}", "--size=4M",
         "--rw=randread", "--bs=4k", "--ioengine=psync",
         "--runtime=0.3", "--time_based", "--output-format=json"],
        check=True, capture_output=True, text=True, timeout=120)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_budgets_read_the_real_fio_json(fio_doc: dict[str, Any]) -> None:
    job = fio_doc["jobs"][0]
    p99 = job["read"]["clat_ns"]["percentile"]["99.000000"]
    iops = job["read"]["iops"]
    passing = [f"read.clat_ns.p99<={p99}", f"read.clat_ns.p99>={p99}ns",
               f"iops>={iops * 0.999}", "cj:read.clat_ns.p99.9>0",
               "read.clat_ns.max<1000s", "sys_cpu>=0"]
    failing = [f"read.clat_ns.p99<{p99}", f"iops>{iops * 1.001}",
               "write.iops>0", "read.clat_ns.p50<0ns"]
    assert all(r.ok for r in evaluate(
        fio_doc, [parse_budget(t) for t in passing]))
    res = evaluate(fio_doc, [parse_budget(t) for t in failing])
    assert [r.ok for r in res] == [False] * len(failing)
    assert res[0].message().startswith(
        f"budget 'read.clat_ns.p99<{p99}' FAILED: measured ")


ROOT = Path(__file__).resolve().parents[2]


def _qiothread(*args: str, timeout: float = 180
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qiothread.cli", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, check=False)


def test_run_with_budgets_exits_3_and_names_the_failure(
        tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = _qiothread("run", "--runtime=300ms", "--expect",
                   "read.clat_ns.p99<1ns", "--expect=iops>1",
                   "--output-format=json", f"--output={out}")
    assert p.returncode == EXIT_BUDGET, p.stderr
    assert "qiothread: budget 'read.clat_ns.p99<1ns' FAILED: measured " \
        in p.stderr
    assert "qiothread: 1 of 2 budget checks failed" in p.stderr
    # The run's own output is unchanged by the budgets.
    doc = json.loads(out.read_text())
    assert doc["jobs"][0]["read"]["iops"] > 1
    p = _qiothread("run", "--runtime=300ms", "--expect", "iops>1",
                   "--expect", "read.clat_ns.p99<60s")
    assert p.returncode == 0, p.stderr
    assert "qiothread: all 2 budgets hold" in p.stderr
    assert "read: IOPS=" in p.stdout            # fio's normal output


def test_a_bad_budget_stops_the_run_before_it_starts() -> None:
    p = _qiothread("run", "--expect", "iops>5us")
    assert p.returncode == 1
    assert p.stderr == ("qiothread: invalid budget 'iops>5us': 'us' is a "
                        "time unit but iops is not a time\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                    reason="needs root and losetup")
def test_ci_example_attaches_runs_and_detaches(tmp_path: Path) -> None:
    image = tmp_path / "ci.raw"
    budgets = tmp_path / "budgets"
    budgets.write_text("iops > 1   # passes\n"
                       "read.clat_ns.p50 < 1ns  # cannot pass\n")
    env = {**os.environ, "IMAGE": str(image), "SIZE": "16M",
           "RUNTIME": "500ms", "OUT": str(tmp_path / "ci.json"),
           "PYTHON": sys.executable}
    p = subprocess.run([str(ROOT / "scripts" / "ci-budget-example"),
                        str(budgets)], env=env, capture_output=True,
                       text=True, timeout=180, check=False)
    assert p.returncode == EXIT_BUDGET, p.stderr
    assert "budget 'read.clat_ns.p50 < 1ns' FAILED: measured" in p.stderr
    assert "attached" in p.stderr and "detached /dev/loop" in p.stderr
    assert json.loads((tmp_path / "ci.json").read_text())["jobs"]
    left = subprocess.run(["losetup", "-j", str(image)],
                          capture_output=True, text=True, check=True)
    assert left.stdout == ""
