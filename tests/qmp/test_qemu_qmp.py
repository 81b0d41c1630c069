"""QEMU's own client library drives the server: QMPClient (asyncio),
the legacy synchronous QEMUMonitorProtocol, and qmp-shell."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from qiothread.qmp.backend import MonitorEvent
from qiothread.qmp.server import QMPServer
from tests.qmp.model import ModelBackend

TIMEOUT = 60.0


async def call(qmp: QMPClient, name: str,
               args: dict[str, object] | None = None) -> Any:
    """``qmp.execute``, typed loosely: QMP results are JSON."""
    return await qmp.execute(name, args)


def cmd(mon: QEMUMonitorProtocol, name: str, **args: object) -> Any:
    """``mon.cmd``, typed loosely."""
    return mon.cmd(name, **args)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_qmpclient_session(server: QMPServer,
                           backend: ModelBackend) -> None:
    async def session() -> None:
        qmp = QMPClient("qiothread-test")
        await qmp.connect(str(server.path))
        try:
            assert qmp.greeting is not None
            ver = await call(qmp, "query-version")
            assert ver["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            threads = await call(qmp, "query-iothreads")
            assert [t["id"] for t in threads] == ["io0", "io1"]
            assert set(threads[0]) == {
                "id", "thread-id", "poll-max-ns", "poll-grow",
                "poll-shrink", "aio-max-batch"}

            props = await call(qmp, "qom-list",
                                      {"path": "/objects/io0"})
            assert [p["name"] for p in props] == [
                "type", "thread-pool-min", "aio-max-batch",
                "thread-pool-max", "poll-max-ns", "poll-grow",
                "poll-shrink"]
            await call(qmp, "qom-set", {
                "path": "/objects/io0", "property": "poll-max-ns",
                "value": 65536})
            assert await call(qmp, "qom-get", {
                "path": "/objects/io0", "property": "poll-max-ns"}) \
                == 65536
            assert backend.root.objects["io0"].get("poll-max-ns") == 65536

            await call(qmp, "object-add", {
                "qom-type": "iothread", "id": "io2", "poll-max-ns": 0})
            ids = [t["id"] for t in await call(qmp, "query-iothreads")]
            assert ids == ["io0", "io1", "io2"]
            assert {"name": "io2", "type": "child<iothread>"} in \
                await call(qmp, "qom-list", {"path": "/objects"})
            await call(qmp, "object-del", {"id": "io2"})
            assert "io2" not in backend.root.objects

            with pytest.raises(ExecuteError) as info:
                await call(qmp, "qom-set", {
                    "path": "/objects/io0", "property": "poll-grow",
                    "value": "x"})
            assert info.value.error_class == "GenericError"
            assert info.value.error.error.desc == (
                "Invalid parameter type for 'poll-grow', expected: "
                "integer")
            with pytest.raises(ExecuteError) as info:
                await call(qmp, "no-such-command")
            assert info.value.error_class == "CommandNotFound"
            assert info.value.error.error.desc == (
                "The command no-such-command has not been found")

            names = {c["name"] for c in
                     await call(qmp, "query-commands")}
            assert {"qom-set", "x-query-poll-stats", "quit"} <= names
        finally:
            await qmp.disconnect()

    run(session())


def test_qmpclient_events_and_quit(server: QMPServer,
                                   backend: ModelBackend) -> None:
    async def session() -> None:
        qmp = QMPClient("qiothread-test")
        await qmp.connect(str(server.path))
        with qmp.listener() as listener:
            backend.emit(MonitorEvent.device_broken(
                "", "/machine/peripheral/vblk0/virtio-backend", 0,
                "Desc index is 300 > queue size 256"))
            ev: dict[str, Any] = dict(await listener.get())
            assert ev["event"] == "X_QIOTHREAD_DEVICE_BROKEN"
            assert ev["data"]["queue"] == 0
            assert await call(qmp, "quit") == {}
            ev = dict(await listener.get())
            assert ev["event"] == "SHUTDOWN"
            assert ev["data"] == {"guest": False,
                                  "reason": "host-qmp-quit"}
        await qmp.disconnect()
        assert backend.quit_requested.is_set()

    run(session())


def test_several_qmpclients_at_once(server: QMPServer) -> None:
    async def one(i: int) -> list[str]:
        qmp = QMPClient(f"c{i}")
        await qmp.connect(str(server.path))
        try:
            got = []
            for _ in range(20):
                got += [t["id"] for t in
                        await call(qmp, "query-iothreads")]
            return got
        finally:
            await qmp.disconnect()

    async def many() -> None:
        results = await asyncio.gather(*(one(i) for i in range(6)))
        assert all(r == ["io0", "io1"] * 20 for r in results)

    run(many())


@pytest.fixture
def legacy_loop() -> Any:
    """QEMUMonitorProtocol makes the thread's event loop and never
    closes it; close it here so that nothing leaks into later tests."""
    yield
    loop = asyncio.get_event_loop_policy().get_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    asyncio.set_event_loop(None)


def test_legacy_sync_client(server: QMPServer, backend: ModelBackend,
                            legacy_loop: None) -> None:
    with QEMUMonitorProtocol(str(server.path)) as mon:
        greeting = mon.connect(negotiate=True)
        assert greeting is not None
        assert greeting["QMP"]["version"]["qemu"]["minor"] == 2
        assert cmd(mon, "query-status") == {
            "running": True, "singlestep": False, "status": "running"}
        rsp = mon.cmd_obj({"execute": "qom-set", "arguments": {
            "path": "/objects/io1", "property": "poll-shrink",
            "value": -5}})
        assert rsp == {"error": {
            "class": "GenericError",
            "desc": "poll-shrink value must be in range "
                    "[0, 9223372036854775807]"}}
        cmd(mon, "qom-set", path="io1", property="poll-shrink", value=2)
        assert cmd(mon, "qom-get", path="/objects/io1",
                       property="poll-shrink") == 2
        block = cmd(mon, "query-block")
        assert block[0]["inserted"]["image"]["virtual-size"] == 16 << 20
        stats = cmd(mon, "query-blockstats")
        assert stats[0]["stats"]["rd_operations"] == 0
        assert {"rd_merged", "wr_total_time_ns", "flush_operations"} \
            <= set(stats[0]["stats"])
        poll = cmd(mon, "x-query-poll-stats", iothread="io1")
        assert poll[0]["poll-shrink"] == 2
        backend.emit(MonitorEvent.device_broken("", "vblk0", 1, "bad"))
        ev = mon.pull_event(wait=TIMEOUT)
        assert ev is not None and ev["event"] == "X_QIOTHREAD_DEVICE_BROKEN"


def test_qmp_shell_scripted(server: QMPServer,
                            backend: ModelBackend, tmp_path: Path) -> None:
    shell = Path(sys.executable).parent / "qmp-shell"
    script = "\n".join([
        "query-iothreads",
        "qom-set path=/objects/io0 property=poll-max-ns value=65536",
        "qom-get path=/objects/io0 property=poll-max-ns",
        "qom-set path=/objects/io0 property=poll-max-ns value=-1",
        "object-add qom-type=iothread id=io5 poll-grow=4",
        "query-iothreads",
        "frobnicate",
        "quit",
    ]) + "\n"
    proc = subprocess.run(
        [str(shell), str(server.path)], input=script, text=True,
        capture_output=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Connected to QEMU 7.2.0" in proc.stdout
    replies = [json.loads(line.split("(QEMU) ")[-1])
               for line in proc.stdout.splitlines()
               if line.split("(QEMU) ")[-1].startswith("{")]
    assert [t["id"] for t in replies[0]["return"]] == ["io0", "io1"]
    assert replies[1] == {"return": {}}
    assert replies[2] == {"return": 65536}
    assert replies[3]["error"]["desc"] == (
        "poll-max-ns value must be in range [0, 9223372036854775807]")
    assert replies[4] == {"return": {}}
    io5 = [t for t in replies[5]["return"] if t["id"] == "io5"]
    assert io5[0]["poll-grow"] == 4
    assert replies[6] == {"error": {
        "class": "CommandNotFound",
        "desc": "The command frobnicate has not been found"}}
    assert replies[7] == {"return": {}}
    assert backend.quit_requested.is_set()


def test_qom_set_reaches_the_running_iothread(server: QMPServer) -> None:
    """The iothreads are real processes: a qom-set is applied by the
    loop itself (shared block + aio_notify), and query-iothreads names
    the thread that runs it."""
    async def session() -> None:
        qmp = QMPClient("live")
        await qmp.connect(str(server.path))
        try:
            io0 = (await call(qmp, "query-iothreads"))[0]
            tid = io0["thread-id"]
            assert tid > 0
            comm = Path(f"/proc/{tid}/comm").read_text().strip()
            assert comm == "IO io0"

            def stats() -> Any:
                return qmp.execute("x-query-poll-stats",
                                   {"iothread": "io0"})
            before = (await stats())[0]
            await call(qmp, "qom-set", {
                "path": "/objects/io0", "property": "poll-max-ns",
                "value": 0})
            await call(qmp, "qom-set", {
                "path": "/objects/io0", "property": "poll-max-ns",
                "value": 65536})
            for _ in range(600):
                after = (await stats())[0]
                if (not after["params-pending"]
                        and after["params-applied-ns"]
                        > before["params-applied-ns"]):
                    break
                await asyncio.sleep(0.05)
            assert after["poll-max-ns"] == 65536
            assert not after["params-pending"]
            assert after["params-applied-ns"] > before["params-applied-ns"]
            # Setting the parameters resets poll_ns (§4.5): any value it
            # has now was taken after the loop applied them.
            assert after["poll-ns-since"] >= after["params-applied-ns"] \
                or after["poll-ns"] == 0
            assert after["poll-disable-cnt"] == 0
        finally:
            await qmp.disconnect()

    run(session())
