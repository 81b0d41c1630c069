"""Our JSON and text against what the installed fio writes.

fio runs a small psync job on a file in /var/tmp with
``write_lat_log``; its per-I/O logs become our records, so both sides
describe the very same I/Os.  Then:

- our JSON has exactly fio's key sets and value types, everywhere
  (plus the top-level "qiothread" key);
- the numbers fio derives from those I/Os (counts, bytes, IOPS,
  min/max, percentiles by fio's histogram) are equal, means within
  float rounding;
- our text report reproduces fio's lines for the same numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qiothread.fio.jobfile import parse_jobfile
from qiothread.report.fio_json import build_fio_json, dumps_fio
from qiothread.report.model import DiskUtil, RunReport
from qiothread.report.summary import render_summary
from tests.report.fio_helpers import records_from_fio_logs, result_from_fio

FIO = shutil.which("fio")
pytestmark = pytest.mark.skipif(FIO is None, reason="fio not installed")

START_NS = 10**12


class FioRun:
    def __init__(self, text: str, doc: dict[str, Any], normal: str,
                 logdir: Path) -> None:
        self.jobfile_text = text
        self.doc = doc
        self.normal = normal
        self.logdir = logdir


@pytest.fixture(scope="module")
def fio_run(tmp_path_factory: pytest.TempPathFactory) -> FioRun:
    d = tmp_path_factory.mktemp("fio")
    data = Path("/var/tmp") / f"qiothread-fio-compat-{os.getpid()}.dat"
    text = (f"[global]\nioengine=psync\nsize=4m\nfilename={data}\n"
            f"bs=4k\n[probe]\nrw=randrw\nwrite_lat_log={d}/probe\n")
    (d / "job.fio").write_text(text)
    try:
        out = subprocess.run([str(FIO), "--output-format=normal,json+",
                              str(d / "job.fio")], cwd=d, check=True,
                             capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        data.unlink(missing_ok=True)
    start = out.index("\n{\n") + 1
    end = out.index("\n}\n", start) + 2
    doc = json.loads(out[start:end])
    normal = out[:start] + out[end:]
    return FioRun(text, doc, normal, d)


def our_report(run: FioRun) -> RunReport:
    jf = parse_jobfile(run.jobfile_text)
    fio_job = run.doc["jobs"][0]
    recs = records_from_fio_logs(run.logdir / "probe_clat.1.log",
                                 run.logdir / "probe_lat.1.log", START_NS)
    result = result_from_fio(jf.jobs[0], recs, START_NS,
                             fio_job["read"]["runtime"])
    disks = [DiskUtil(name=d["name"]) for d in run.doc["disk_util"]]
    return RunReport(jobs=[result], global_options=jf.global_options,
                     disk_util=disks, timestamp_s=1796317468.968)


def our_doc(run: FioRun, plus: bool = False) -> dict[str, Any]:
    """Our JSON as fio's readers see it: through the text."""
    doc: dict[str, Any] = json.loads(dumps_fio(build_fio_json(
        our_report(run), plus=plus)))
    return doc


def without_bins(value: Any) -> Any:
    """fio's json+ document as plain json (no ``bins``)."""
    if isinstance(value, dict):
        return {k: without_bins(v) for k, v in value.items()
                if k != "bins"}
    if isinstance(value, list):
        return [without_bins(v) for v in value]
    return value


def shape(value: Any, path: str = "") -> dict[str, type]:
    """Every key path with the JSON type of its value."""
    out: dict[str, type] = {path: type(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(shape(v, f"{path}/{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(shape(v, f"{path}[{i}]"))
    return out


@pytest.mark.parametrize("plus", [False, True], ids=["json", "json+"])
def test_json_keys_and_types_match_fio(fio_run: FioRun,
                                       plus: bool) -> None:
    ours = our_doc(fio_run, plus)
    fio_doc = fio_run.doc if plus else without_bins(fio_run.doc)
    assert set(ours) - set(fio_doc) == {"qiothread"}
    del ours["qiothread"]
    theirs, mine = shape(fio_doc), shape(ours)
    assert sorted(mine) == sorted(theirs)
    wrong = {p: (mine[p].__name__, t.__name__)
             for p, t in theirs.items() if mine[p] is not t}
    assert wrong == {}


def test_percentile_keys_formatted_as_fio(fio_run: FioRun) -> None:
    ours = build_fio_json(our_report(fio_run))
    keys = list(ours["jobs"][0]["read"]["clat_ns"]["percentile"])
    assert keys == list(fio_run.doc["jobs"][0]["read"]["clat_ns"]
                        ["percentile"])
    assert "99.000000" in keys and "99.990000" in keys


@pytest.mark.parametrize("ddir", ["read", "write"])
def test_numbers_match_fio(fio_run: FioRun, ddir: str) -> None:
    theirs = fio_run.doc["jobs"][0][ddir]
    ours = our_doc(fio_run)["jobs"][0][ddir]
    for key in ("io_bytes", "io_kbytes", "bw_bytes", "bw", "iops",
                "runtime", "total_ios"):
        assert ours[key] == theirs[key], key
    for lat in ("clat_ns", "lat_ns"):
        for key in ("min", "max", "N"):
            assert ours[lat][key] == theirs[lat][key], (lat, key)
        assert ours[lat]["mean"] == pytest.approx(theirs[lat]["mean"],
                                                  rel=1e-6, abs=1e-3)
        assert ours[lat]["stddev"] == pytest.approx(
            theirs[lat]["stddev"], rel=1e-6, abs=1e-3)
    assert ours["clat_ns"]["percentile"] == theirs["clat_ns"]["percentile"]
    plus = our_doc(fio_run, plus=True)["jobs"][0][ddir]
    assert plus["clat_ns"]["bins"] == theirs["clat_ns"]["bins"]


def test_distributions_match_fio(fio_run: FioRun) -> None:
    ours = our_doc(fio_run)["jobs"][0]
    theirs = fio_run.doc["jobs"][0]
    for key in ("latency_ns", "latency_us", "latency_ms",
                "iodepth_level", "iodepth_submit", "iodepth_complete"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


def _lines(text: str, pattern: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(pattern, ln)]


def test_text_report_matches_fio_lines(fio_run: FioRun) -> None:
    _assert_text_matches(render_summary(our_report(fio_run)),
                         fio_run.normal)


def test_regression_disk_util_counts_are_machine_wide(
        fio_run: FioRun) -> None:
    """fio's disk-util line counts every process's I/O on the device
    (it once showed ios=21372 against our 0/0); the text comparison must
    hold whatever else ran on the disk meanwhile."""
    if not _disk_lines(fio_run.normal):
        pytest.skip("fio printed no disk-util line for this filesystem")
    busy = re.sub(r"(?m)^(  \S+: ios=.*)$",
                  lambda m: re.sub(r"\d+", "21372", m.group(1)),
                  fio_run.normal)
    _assert_text_matches(render_summary(our_report(fio_run)), busy)


def _disk_lines(text: str) -> list[str]:
    """The disk-util lines, numbers blanked: names, fields, order and
    units remain (the counts are the whole machine's, not the job's)."""
    return [re.sub(r"\d+", "N", ln)
            for ln in _lines(text, r"  \S+: ios=")]


def _assert_text_matches(ours: str, theirs: str) -> None:
    for pattern in (r"  (read|write): IOPS=", r"    clat percentiles",
                    r"     \|", r"  lat \((nsec|usec|msec)\)",
                    r"  IO depths", r"     submit", r"     complete",
                    r"     issued rwts", r"     latency",
                    r"   (READ|WRITE): bw=", r"Run status group"):
        assert _lines(ours, pattern) == _lines(theirs, pattern), pattern
    assert _disk_lines(ours) == _disk_lines(theirs)
    # Latency lines: same unit, min and max; avg/stdev to the print
    # precision (fio keeps running sums, we sum exact integers).
    lat_re = (r"\s+(clat| lat) \((\w+)\): min=(\d+), max=(\d+), "
              r"avg=([\d.]+), stdev=([\d.]+)")
    a = re.findall(lat_re, ours)
    b = re.findall(lat_re, theirs)
    assert [x[:4] for x in a] == [x[:4] for x in b]
    for x, y in zip(a, b, strict=True):
        assert float(x[4]) == pytest.approx(float(y[4]), abs=0.011)
        assert float(x[5]) == pytest.approx(float(y[5]), abs=0.011)


def test_dumps_fio_layout() -> None:
    text = dumps_fio({"a": 1, "b": 0.5, "c": {"d": "x"}, "e": []})
    assert text == ('{\n  "a" : 1,\n  "b" : 0.500000,\n  "c" : {\n'
                    '    "d" : "x"\n  },\n  "e" : [\n  ]\n}\n')


def test_job_banner_matches_fio(fio_run: FioRun) -> None:
    from qiothread.report.summary import job_banner
    job = parse_jobfile(fio_run.jobfile_text).jobs[0]
    assert job_banner(job) == fio_run.normal.splitlines()[0]
