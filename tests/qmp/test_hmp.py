"""HMP through ``human-monitor-command``, and ``qmp-shell -H``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qiothread.qmp.server import QMPServer
from tests.qmp.model import ModelBackend
from tests.qmp.rawclient import RawClient


def hmp(c: RawClient, line: str) -> str:
    rsp = c.cmd("human-monitor-command", {"command-line": line})
    ret = rsp["return"]
    assert isinstance(ret, str)
    return ret


@pytest.fixture
def client(server: QMPServer) -> RawClient:
    c = RawClient(str(server.path))
    c.negotiate()
    return c


def test_info_iothreads_as_qemu_prints_it(client: RawClient,
                                          backend: ModelBackend) -> None:
    out = hmp(client, "info iothreads")
    tid0 = backend.query_iothreads()[0].thread_id
    assert out.startswith(
        f"io0:\r\n  thread_id={tid0}\r\n  poll-max-ns=32768\r\n"
        "  poll-grow=0\r\n  poll-shrink=0\r\n  aio-max-batch=0\r\nio1:\r\n")
    client.close()


def test_qom_set_and_get(client: RawClient, backend: ModelBackend) -> None:
    assert hmp(client, "qom-set /objects/io0 poll-max-ns 100000") == ""
    assert hmp(client, "qom-get /objects/io0 poll-max-ns") == "100000\r\n"
    # Base 0, as qemu_strtoi64 parses: hexadecimal works.
    assert hmp(client, "qom-set io1 poll-grow 0x4") == ""
    assert backend.root.objects["io1"].get("poll-grow") == 4
    assert hmp(client, "qom-set -j io1 poll-shrink 2") == ""
    assert hmp(client, "qom-get io0 type") == '"iothread"\r\n'
    assert hmp(client, "qom-list /objects/io0").startswith(
        "type (string)\r\nthread-pool-min (int)\r\n")
    assert hmp(client, "qom-list") == "/\r\n"
    client.close()


@pytest.mark.parametrize(("line", "out"), [
    ("qom-set /objects/io0 poll-max-ns lots",
     "Error: Parameter 'poll-max-ns' expects int64\r\n"),
    ("qom-set /objects/io0 poll-max-ns -5",
     "Error: poll-max-ns value must be in range "
     "[0, 9223372036854775807]\r\n"),
    ("qom-set /objects/nope poll-max-ns 1",
     "Error: Device '/objects/nope' not found\r\n"),
    ("qom-get /objects/io0 nope",
     "Error: Property 'iothread.nope' not found\r\n"),
    ("frobnicate", "unknown command: 'frobnicate'\r\n"),
    ("", ""),
])
def test_errors_are_text(client: RawClient, line: str, out: str) -> None:
    assert hmp(client, line) == out
    assert hmp(client, "info status") == "VM status: running\r\n"
    client.close()


def test_info_version_and_help(client: RawClient) -> None:
    assert hmp(client, "info version").startswith("7.2.0 (qiothread ")
    text = hmp(client, "help")
    assert "qom-set [-j] path property value -- set QOM property." in text
    assert "info iothreads -- show iothreads\r\n" in hmp(client, "info")
    client.close()


def test_qmp_shell_hmp_mode(server: QMPServer,
                            backend: ModelBackend) -> None:
    shell = Path(sys.executable).parent / "qmp-shell"
    script = ("qom-set /objects/io1 poll-max-ns 65536\n"
              "info iothreads\n"
              "qom-set /objects/io1 poll-max-ns -1\n")
    proc = subprocess.run(
        [str(shell), "-H", str(server.path)], input=script, text=True,
        capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Welcome to the HMP shell!" in proc.stdout
    assert "io1:\n  thread_id=" in proc.stdout   # text mode: \r\n read as \n
    assert "  poll-max-ns=65536" in proc.stdout
    assert "Error: poll-max-ns value must be in range" in proc.stdout
    assert backend.root.objects["io1"].get("poll-max-ns") == 65536
