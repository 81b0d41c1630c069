"""QMP against a real ``qiothread run``: live tuning, stats, quit.

The run is the real command (``python -m qiothread.cli run``) with an
iothread that starts with polling off, a guest doing 4k random reads at
queue depth 1, a QMP socket and the polling trace.  The test turns
polling on with ``qom-set poll-max-ns 65536`` and checks, from the
trace and from ``x-query-poll-stats``, that polling begins then and not
before; then it stops the run with ``quit``, and the run still writes
its fio JSON result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 120.0


async def call(qmp: QMPClient, name: str,
               args: dict[str, object] | None = None) -> Any:
    """``qmp.execute``, typed loosely: QMP results are JSON."""
    return await qmp.execute(name, args)


def cmd(mon: QEMUMonitorProtocol, name: str, **args: object) -> Any:
    """``mon.cmd``, typed loosely."""
    return mon.cmd(name, **args)
_TRACE = re.compile(
    r"^(\d+)@(\d+)\.(\d{6}):run_poll_handlers_begin ctx (\S+) "
    r"max_ns (\d+) timeout (-?\d+)$")


def _wall(sec: str, usec: str) -> float:
    return int(sec) + int(usec) / 1e6


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        # Written, not sparse: reads must reach the file system.
        chunk = os.urandom(1 << 20)
        for _ in range(32):
            f.write(chunk)
    return path


def _start_run(tmp_path: Path, image: Path,
               monitor: list[str] | None = None,
               runtime: int = 60) -> subprocess.Popen[str]:
    sock = tmp_path / "qmp.sock"
    if monitor is None:
        monitor = ["-qmp", f"unix:{sock},server=on,wait=off"]
    cmd = [
        sys.executable, "-m", "qiothread.cli", "run",
        "-object", "iothread,id=io0,poll-max-ns=0",
        "-blockdev", f"driver=file,node-name=f0,filename={image},"
                     "aio=threads,cache.direct=off",
        "-blockdev", "driver=raw,node-name=disk0,file=f0",
        "-device", "virtio-blk-pci,drive=disk0,iothread=io0",
        *monitor,
        "-trace", f"enable=run_poll_handlers_begin,file={tmp_path}/trace",
        "-msg", "timestamp=on",
        "--name=live", "--rw=randread", "--bs=4k", "--iodepth=1",
        "--time_based", f"--runtime={runtime}",
        "--output-format=json", f"--output={tmp_path}/result.json",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])


async def _connect(sock: Path, proc: subprocess.Popen[str]) -> QMPClient:
    deadline = time.monotonic() + TIMEOUT
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run exited: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("no QMP socket")
        await asyncio.sleep(0.05)
    qmp = QMPClient("live")
    await qmp.connect(str(sock))
    return qmp


async def _stats(qmp: QMPClient) -> dict[str, Any]:
    out = await call(qmp, "x-query-poll-stats", {"iothread": "io0"})
    assert isinstance(out, list)
    return dict(out[0])


async def _wait_io(qmp: QMPClient, ops: int) -> dict[str, Any]:
    """Block stats once the guest has completed ``ops`` more reads."""
    start = None
    for _ in range(int(TIMEOUT / 0.05)):
        stats = (await call(qmp, "query-blockstats"))[0]["stats"]
        if start is None:
            start = stats["rd_operations"]
        if stats["rd_operations"] >= start + ops:
            return dict(stats)
        await asyncio.sleep(0.05)
    raise AssertionError("the guest made no progress")


def test_live_tuning_poll_max_ns(tmp_path: Path, image: Path) -> None:
    proc = _start_run(tmp_path, image)
    sock = tmp_path / "qmp.sock"
    try:
        asyncio.run(asyncio.wait_for(
            _session(sock, proc, tmp_path), TIMEOUT))
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["jobs"][0]["read"]["total_ios"] > 0
    assert not sock.exists()


async def _session(sock: Path, proc: subprocess.Popen[str],
                   tmp_path: Path) -> None:
    qmp = await _connect(sock, proc)
    events: list[dict[str, Any]] = []
    with qmp.listener() as listener:
        # Polling off: I/O flows, no polling round ever ran.
        await _wait_io(qmp, 200)
        before = await _stats(qmp)
        assert before["poll-max-ns"] == 0
        assert before["poll-rounds"] == 0
        threads = await call(qmp, "query-iothreads")
        assert threads[0]["poll-max-ns"] == 0
        assert (await call(qmp, "query-status"))["status"] == "running"
        block = (await call(qmp, "query-block"))[0]
        assert block["io-status"] == "ok"
        assert block["inserted"]["image"]["virtual-size"] == 32 << 20

        t_wall = time.time()
        t_mono = time.monotonic_ns()
        await call(qmp, "qom-set", {
            "path": "/objects/io0", "property": "poll-max-ns",
            "value": 65536})
        t_done = time.monotonic_ns()
        await _wait_io(qmp, 200)
        after = await _stats(qmp)

        assert after["poll-max-ns"] == 65536
        assert not after["params-pending"]
        assert after["params-applied-ns"] >= t_mono
        assert after["params-applied-ns"] <= time.monotonic_ns()
        assert after["poll-rounds"] > 0
        assert after["poll-disable-cnt"] == 0
        assert after["iterations"] > before["iterations"]
        assert (await call(qmp, "qom-get", {
            "path": "/objects/io0", "property": "poll-max-ns"})) == 65536

        # The trace: no polling round before the qom-set, rounds after.
        lines = (tmp_path / "trace").read_text().splitlines()
        begins = [m for m in map(_TRACE.match, lines) if m]
        assert begins, "no run_poll_handlers_begin after the qom-set"
        first = _wall(begins[0].group(2), begins[0].group(3))
        assert first >= t_wall - 0.001
        assert all(int(m.group(5)) <= 65536 for m in begins)
        # It began when the loop applied the change: not before, and
        # within the next requests (generous bound: 2 shared CPUs).
        offset = time.time() - time.monotonic_ns() / 1e9
        applied_wall = after["params-applied-ns"] / 1e9 + offset
        assert first >= applied_wall - 0.002
        assert first - applied_wall < 5.0
        assert t_done >= t_mono

        # Iothreads come and go while the run goes on; the one serving
        # the device cannot be deleted, and bad values change nothing.
        await call(qmp, "object-add", {"qom-type": "iothread",
                                         "id": "io1", "poll-grow": 4})
        threads = await call(qmp, "query-iothreads")
        io1 = next(t for t in threads if t["id"] == "io1")
        assert io1["thread-id"] > 0 and io1["poll-grow"] == 4
        await call(qmp, "object-del", {"id": "io1"})
        with pytest.raises(ExecuteError) as info:
            await call(qmp, "object-del", {"id": "io0"})
        assert info.value.error.error.desc == (
            "object 'io0' is in use, can not be deleted")
        with pytest.raises(ExecuteError) as info:
            await call(qmp, "qom-set", {
                "path": "/objects/io0", "property": "poll-max-ns",
                "value": -1})
        assert info.value.error.error.desc == (
            "poll-max-ns value must be in range [0, 9223372036854775807]")
        assert (await _stats(qmp))["poll-max-ns"] == 65536

        await call(qmp, "quit")
        ev = await listener.get()
        events.append(dict(ev))
    # The run closes the socket once it has stopped, as QEMU does when
    # it exits after quit: the library may then report that EOF.
    with contextlib.suppress(EOFError):
        await qmp.disconnect()
    assert events[0]["event"] == "SHUTDOWN"
    assert events[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_chardev_monitor_and_legacy_client(tmp_path: Path,
                                           image: Path) -> None:
    """``-chardev socket`` + ``-mon mode=control``, driven by the
    synchronous client as iotests and avocado drive QEMU."""
    sock = tmp_path / "mon.sock"
    proc = _start_run(tmp_path, image, [
        "-chardev", f"socket,id=mon0,path={sock},server=on,wait=off",
        "-mon", "chardev=mon0,mode=control"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        mon = QEMUMonitorProtocol(str(sock))
        try:
            mon.connect(negotiate=True)
            mon.settimeout(TIMEOUT)
            # "prelaunch" while the guests start, then "running".
            status = cmd(mon, "query-status")["status"]
            while status == "prelaunch" and time.monotonic() < deadline:
                time.sleep(0.02)
                status = cmd(mon, "query-status")["status"]
            assert status == "running"
            cmd(mon, "qom-set", path="io0", property="poll-max-ns",
                    value=32768)
            assert cmd(mon, "qom-get", path="io0",
                           property="poll-max-ns") == 32768
            assert cmd(mon, "quit") == {}
            ev = mon.pull_event(wait=TIMEOUT)
            assert ev is not None and ev["event"] == "SHUTDOWN"
        finally:
            # After quit the run closes the socket, as QEMU does when it
            # exits; the library then reports EOF on close, and QEMU's
            # own test harness (qemu.machine) ignores it after a quit.
            with contextlib.suppress(EOFError):
                mon.close()
            mon._aloop.close()        # the shim never closes its loop
            asyncio.set_event_loop(None)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "result.json").read_text())["jobs"]


def test_shutdown_event_when_the_job_ends(tmp_path: Path,
                                          image: Path) -> None:
    """A job that runs out is QEMU's guest powering off: SHUTDOWN with
    ``guest`` true, then the socket closes and the result is written.
    ``wait=on`` holds the run until the client is there, as in QEMU, so
    the one-second job cannot end before the test listens."""
    sock = tmp_path / "qmp.sock"
    proc = _start_run(tmp_path, image, runtime=1, monitor=[
        "-qmp", f"unix:{sock},server=on,wait=on"])

    async def wait_shutdown() -> dict[str, Any]:
        qmp = await _connect(tmp_path / "qmp.sock", proc)
        with qmp.listener("SHUTDOWN") as listener:
            ev = dict(await listener.get())
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
        return ev

    try:
        ev = asyncio.run(asyncio.wait_for(wait_shutdown(), TIMEOUT))
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert proc.returncode == 0, err
    assert f"waiting for a QMP client on {sock}" in err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["jobs"][0]["read"]["total_ios"] > 0
