"""Host facts that decide wake-up latency, read from /proc and /sys.

A thread that blocks in ``ppoll``/``epoll_wait`` and is woken by an
eventfd pays for the CPU's way back from idle, and that cost is often
larger than the I/O it waits for.  Busy-polling exists to avoid it, so
any comparison of poll settings depends on these facts:

- the kernel release and the number of online CPUs;
- the CPU model;
- the cpuidle driver and governor (``/sys/devices/system/cpu/cpuidle``:
  ``current_driver``, ``current_governor`` or, on kernels that do not
  allow changing it, ``current_governor_ro``) and each idle state of
  CPU 0 with its exit latency in µs and whether it is disabled
  (``cpu0/cpuidle/stateN/{name,latency,disable}``);
- the guest haltpoll parameters when that driver is loaded (a guest
  that polls before halting, as in a VM);
- ``/dev/cpu_dma_latency``: the PM QoS CPU latency limit.  A process
  holds a limit for as long as it keeps the device open, so the holders
  are the processes with an fd whose link reads
  ``/dev/cpu_dma_latency``; reading the device returns the current
  limit as a native 32-bit integer in µs (2000000000 means none).
  Opening it to read registers a request at the default value, which
  constrains nothing;
- the cpufreq governor, where cpufreq exists;
- the kernel command-line parameters that change idle and wake-up
  behaviour (``idle=``, ``*.max_cstate``, ``cpuidle.off``,
  ``cpuidle_haltpoll.*``, ``haltpoll.*``, ``nohz*``, ``isolcpus``,
  ``rcu_nocbs``, ``intel_pstate``), taken from ``/proc/cmdline``
  before its ``--`` (what follows is init's, not the kernel's).

Everything is best effort: a missing file leaves its fact out (None),
never fails the report.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

__all__ = ["cpu_dma_latency_holders", "describe_host", "host_facts"]

_CPU_DMA_LATENCY = "/dev/cpu_dma_latency"
#: ``PM_QOS_CPU_LATENCY_DEFAULT_VALUE``: no limit.
_NO_LIMIT_US = 2_000_000_000


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_model(proc: Path) -> str | None:
    text = _read(proc / "cpuinfo")
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Processor", "cpu model"):
            return value.strip()
    return None


def _idle_states(cpu0: Path) -> list[dict[str, Any]]:
    states = []
    base = cpu0 / "cpuidle"
    try:
        names = sorted((p for p in base.iterdir()
                        if p.name.startswith("state")),
                       key=lambda p: int(p.name[5:]))
    except (OSError, ValueError):
        return []
    for st in names:
        latency = _read(st / "latency")
        disabled = _read(st / "disable")
        states.append({
            "name": _read(st / "name"),
            "latency_us": int(latency) if latency is not None else None,
            "disabled": disabled == "1",
        })
    return states


def cpu_dma_latency_holders(proc: Path = Path("/proc")
                            ) -> list[dict[str, Any]]:
    """Processes holding ``/dev/cpu_dma_latency`` open (pid, comm)."""
    holders = []
    try:
        pids = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for pid_dir in pids:
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target == _CPU_DMA_LATENCY:
                holders.append({"pid": int(pid_dir.name),
                                "comm": _read(pid_dir / "comm")})
                break
    return sorted(holders, key=lambda h: int(h["pid"]))


def _cpu_dma_latency_value(dev: Path) -> int | None:
    try:
        with open(dev, "rb") as f:
            data = f.read(4)
    except OSError:
        return None
    if len(data) != 4:
        return None
    value: int = struct.unpack("=i", data)[0]
    return value


#: Kernel parameters (by prefix) that bear on idle and wake-up latency.
_WAKE_PARAMS = ("idle=", "intel_idle.", "processor.max_cstate",
                "cpuidle.", "cpuidle_haltpoll.", "haltpoll.", "nohz",
                "isolcpus", "rcu_nocbs", "intel_pstate", "amd_pstate")


def _wake_params(proc: Path) -> list[str]:
    text = _read(proc / "cmdline")
    if text is None:
        return []
    words = text.split()
    if "--" in words:
        words = words[:words.index("--")]
    return [w for w in words if w.startswith(_WAKE_PARAMS)]


def host_facts(sys_cpu: Path = Path("/sys/devices/system/cpu"),
               proc: Path = Path("/proc"),
               dma_dev: Path = Path(_CPU_DMA_LATENCY),
               haltpoll: Path = Path("/sys/module/haltpoll/parameters"),
               ) -> dict[str, Any]:
    """The facts above as a JSON-ready dict."""
    idle = sys_cpu / "cpuidle"
    governor = _read(idle / "current_governor") or \
        _read(idle / "current_governor_ro")
    limit = _cpu_dma_latency_value(dma_dev)
    halt: dict[str, str] = {}
    try:
        for p in sorted(haltpoll.iterdir()):
            value = _read(p)
            if value is not None:
                halt[p.name] = value
    except OSError:
        pass
    return {
        "kernel": os.uname().release,
        "cpus_online": _read(sys_cpu / "online"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(proc),
        "cpuidle_driver": _read(idle / "current_driver"),
        "cpuidle_governor": governor,
        "cpuidle_states": _idle_states(sys_cpu / "cpu0"),
        "haltpoll": halt or None,
        "cpufreq_governor": _read(
            sys_cpu / "cpu0" / "cpufreq" / "scaling_governor"),
        "cpu_dma_latency_us": limit,
        "cpu_dma_latency_limited": limit is not None and
        limit < _NO_LIMIT_US,
        "cpu_dma_latency_holders": cpu_dma_latency_holders(proc),
        "kernel_wake_params": _wake_params(proc),
    }


def describe_host(facts: dict[str, Any]) -> str:
    """One line for the summary."""
    parts = [f"kernel {facts.get('kernel')}",
             f"{facts.get('cpu_count')} CPUs"]
    if facts.get("cpu_model"):
        parts.append(str(facts["cpu_model"]))
    gov = facts.get("cpuidle_governor")
    if gov:
        states = facts.get("cpuidle_states") or []
        names = " ".join(
            f"{s['name']}({s['latency_us']}us"
            f"{',off' if s['disabled'] else ''})" for s in states)
        parts.append(f"cpuidle {facts.get('cpuidle_driver')}/{gov}"
                     + (f" [{names}]" if names else ""))
    halt = facts.get("haltpoll")
    if halt and "guest_halt_poll_ns" in halt:
        parts.append(f"guest_halt_poll_ns={halt['guest_halt_poll_ns']}")
    params = facts.get("kernel_wake_params") or []
    if params:
        parts.append("cmdline " + " ".join(params))
    holders = facts.get("cpu_dma_latency_holders") or []
    if holders:
        who = ",".join(f"{h['comm']}[{h['pid']}]" for h in holders)
        parts.append(f"cpu_dma_latency={facts.get('cpu_dma_latency_us')}"
                     f"us held by {who}")
    else:
        parts.append("cpu_dma_latency not held")
    return ", ".join(parts)
