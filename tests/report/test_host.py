"""Host facts: a scripted sysfs tree for exact parsing, and the real
/dev/cpu_dma_latency held by a child process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qiothread.report.host import (
    cpu_dma_latency_holders,
    describe_host,
    host_facts,
)


def fake_sys(root: Path) -> Path:
    cpu = root / "cpu"
    (cpu / "cpuidle").mkdir(parents=True)
    (cpu / "cpuidle" / "current_driver").write_text("intel_idle\n")
    (cpu / "cpuidle" / "current_governor_ro").write_text("menu\n")
    (cpu / "online").write_text("0-3\n")
    for i, (name, lat, off) in enumerate([("POLL", 0, 0), ("C1", 2, 0),
                                          ("C6", 133, 1)]):
        st = cpu / "cpu0" / "cpuidle" / f"state{i}"
        st.mkdir(parents=True)
        (st / "name").write_text(name + "\n")
        (st / "latency").write_text(f"{lat}\n")
        (st / "disable").write_text(f"{off}\n")
    return cpu


def test_parses_cpuidle_tree(tmp_path: Path) -> None:
    facts = host_facts(sys_cpu=fake_sys(tmp_path),
                       dma_dev=tmp_path / "absent",
                       haltpoll=tmp_path / "absent")
    assert facts["kernel"] == os.uname().release
    assert facts["cpus_online"] == "0-3"
    assert facts["cpuidle_driver"] == "intel_idle"
    assert facts["cpuidle_governor"] == "menu"
    assert facts["cpuidle_states"] == [
        {"name": "POLL", "latency_us": 0, "disabled": False},
        {"name": "C1", "latency_us": 2, "disabled": False},
        {"name": "C6", "latency_us": 133, "disabled": True}]
    assert facts["cpu_dma_latency_us"] is None
    assert facts["haltpoll"] is None
    line = describe_host(facts)
    assert "cpuidle intel_idle/menu [POLL(0us) C1(2us) C6(133us,off)]" \
        in line


def test_real_host_reads() -> None:
    facts = host_facts()
    assert facts["cpu_count"] == os.cpu_count()
    if Path("/sys/devices/system/cpu/cpuidle").exists():
        assert facts["cpuidle_governor"]


HOLD = """
import struct, sys
f = open("/dev/cpu_dma_latency", "wb", buffering=0)
f.write(struct.pack("=i", 77))
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not os.access("/dev/cpu_dma_latency", os.W_OK),
                    reason="needs root and /dev/cpu_dma_latency")
def test_cpu_dma_latency_holder_detected() -> None:
    with subprocess.Popen([sys.executable, "-c", HOLD],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline().strip() == "held"
            facts = host_facts()
            pids = [h["pid"] for h in facts["cpu_dma_latency_holders"]]
            assert proc.pid in pids
            # The limit is the minimum over holders: 77 µs or stricter.
            assert facts["cpu_dma_latency_us"] <= 77
            assert facts["cpu_dma_latency_limited"]
            assert f"[{proc.pid}]" in describe_host(facts)
        finally:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
    pids = [h["pid"] for h in cpu_dma_latency_holders()]
    assert proc.pid not in pids


def test_value_read_as_native_int(tmp_path: Path) -> None:
    dev = tmp_path / "dma"
    dev.write_bytes(struct.pack("=i", 2_000_000_000))
    facts = host_facts(sys_cpu=tmp_path / "none", dma_dev=dev,
                       haltpoll=tmp_path / "none")
    assert facts["cpu_dma_latency_us"] == 2_000_000_000
    assert not facts["cpu_dma_latency_limited"]


def test_wake_params_from_cmdline(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cmdline").write_text(
        "console=ttyS0 idle=poll intel_idle.max_cstate=1 quiet "
        "cpuidle_haltpoll.force=1 nohz_full=1 -- --idle=not-kernel\n")
    facts = host_facts(sys_cpu=tmp_path / "none", proc=proc,
                       dma_dev=tmp_path / "none",
                       haltpoll=tmp_path / "none")
    assert facts["kernel_wake_params"] == [
        "idle=poll", "intel_idle.max_cstate=1", "cpuidle_haltpoll.force=1",
        "nohz_full=1"]
    assert "cmdline idle=poll intel_idle.max_cstate=1" in \
        describe_host(facts)
