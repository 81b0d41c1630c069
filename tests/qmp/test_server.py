"""The server at the byte level: bad input is answered as QEMU answers,
and a bad client disturbs nobody else."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qiothread.errors import ConfigError
from qiothread.qmp.backend import MonitorEvent
from qiothread.qmp.server import QMPServer
from tests.qmp.model import ModelBackend
from tests.qmp.rawclient import RawClient, error


def sock(server: QMPServer) -> str:
    return str(server.path)


def test_socket_mode_is_0600(server: QMPServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_socket_is_0600_whatever_the_umask(backend: ModelBackend,
                                           tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with QMPServer(backend, tmp_path / "open.sock") as srv:
            assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    finally:
        os.umask(old)
    assert not (tmp_path / "open.sock").exists()


def test_stale_socket_replaced_other_file_refused(backend: ModelBackend,
                                                  tmp_path: Path) -> None:
    import socket
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with QMPServer(backend, stale) as srv, RawClient(sock(srv)) as c:
        c.negotiate()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="Address already in use"):
        QMPServer(backend, regular).start()
    assert regular.read_text() == "keep me"


def test_greeting_and_negotiation(server: QMPServer) -> None:
    with RawClient(sock(server)) as c:
        g = c.recv()
        assert g["QMP"]["version"]["qemu"] == {
            "major": 7, "minor": 2, "micro": 0}
        assert g["QMP"]["capabilities"] == []
        assert c.cmd("query-status") == error(
            "Expecting capabilities negotiation with 'qmp_capabilities'",
            "CommandNotFound")
        assert c.cmd("no-such-command") == error(
            "Expecting capabilities negotiation with 'qmp_capabilities'",
            "CommandNotFound")
        assert c.cmd("qmp_capabilities", id="n1") == {
            "return": {}, "id": "n1"}
        assert c.cmd("qmp_capabilities") == error(
            "Capabilities negotiation is already complete, command "
            "ignored", "CommandNotFound")
        assert c.cmd("query-status") == {"return": {
            "running": True, "singlestep": False, "status": "running"}}


def test_oob_is_not_offered(server: QMPServer) -> None:
    with RawClient(sock(server)) as c:
        c.recv()
        assert c.cmd("qmp_capabilities", {"enable": ["oob"]}) == error(
            "Capability oob not available")
        assert c.cmd("qmp_capabilities", {"enable": [1]}) == error(
            "Invalid parameter type for 'enable[0]', expected: string")
        assert c.cmd("qmp_capabilities", {"enable": "oob"}) == error(
            "Invalid parameter type for 'enable', expected: array")
        assert c.cmd("qmp_capabilities") == {"return": {}}
        c.send({"exec-oob": "query-status"})
        assert c.recv() == error(
            "QMP input member 'exec-oob' is unexpected")


@pytest.mark.parametrize(("request_", "reply"), [
    ({"execute": "foo"},
     error("The command foo has not been found", "CommandNotFound")),
    ({"execute": "foo", "id": {"x": [1]}},
     error("The command foo has not been found", "CommandNotFound",
           id={"x": [1]})),
    ({"execute": 42}, error("QMP input member 'execute' must be a string")),
    ({"arguments": {}}, error("QMP input lacks member 'execute'")),
    ({"execute": "quit", "arguments": []},
     error("QMP input member 'arguments' must be an object")),
    ({"execute": "quit", "bogus": 1},
     error("QMP input member 'bogus' is unexpected")),
    ({"execute": "qom-list"}, error("Parameter 'path' is missing")),
    ({"execute": "qom-list", "arguments": {"path": 1}},
     error("Invalid parameter type for 'path', expected: string")),
    ({"execute": "qom-list", "arguments": {"path": "/", "foo": 1}},
     error("Parameter 'foo' is unexpected")),
    ({"execute": "query-status", "arguments": {"foo": 1}},
     error("Parameter 'foo' is unexpected")),
    ({"execute": "qom-list", "arguments": {"path": "/objects/nope"}},
     error("Device '/objects/nope' not found", "DeviceNotFound")),
    ({"execute": "qom-get",
      "arguments": {"path": "/machine", "property": "type"}},
     error("Device '/machine' not found", "DeviceNotFound")),
    ({"execute": "qom-get",
      "arguments": {"path": "/objects/io0", "property": "poll-min-ns"}},
     error("Property 'iothread.poll-min-ns' not found")),
    ({"execute": "qom-set", "arguments": {"path": "/objects/io0",
                                          "property": "poll-max-ns"}},
     error("Parameter 'value' is missing")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "poll-max-ns", "value": "1"}},
     error("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "poll-max-ns", "value": 1.5}},
     error("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "poll-max-ns", "value": True}},
     error("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "poll-max-ns",
        "value": 1 << 63}},
     error("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "poll-max-ns", "value": -1}},
     error("poll-max-ns value must be in range [0, 9223372036854775807]")),
    ({"execute": "qom-set", "arguments": {
        "path": "/objects/io0", "property": "type", "value": "x"}},
     error("Insufficient permission to perform this operation")),
    ({"execute": "object-add", "arguments": {"id": "io9"}},
     error("Parameter 'qom-type' is missing")),
    ({"execute": "object-add", "arguments": {"qom-type": "memory-backend",
                                             "id": "m"}},
     error("Parameter 'qom-type' does not accept value "
           "'memory-backend'")),
    ({"execute": "object-add", "arguments": {"qom-type": "iothread"}},
     error("Parameter 'id' is missing")),
    ({"execute": "object-add", "arguments": {
        "qom-type": "iothread", "id": "io9", "poll-max-ns": "big"}},
     error("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ({"execute": "object-add", "arguments": {
        "qom-type": "iothread", "id": "io9", "poll-grow": -2}},
     error("poll-grow value must be in range [0, 9223372036854775807]")),
    ({"execute": "object-add", "arguments": {
        "qom-type": "iothread", "id": "io9", "foo": 1}},
     error("Parameter 'foo' is unexpected")),
    ({"execute": "object-add", "arguments": {
        "qom-type": "iothread", "id": "io0"}},
     error("attempt to add duplicate property 'io0' to object "
           "(type 'container')")),
    ({"execute": "object-del", "arguments": {"id": "io7"}},
     error("object 'io7' not found")),
    ({"execute": "x-query-poll-stats", "arguments": {"iothread": "io7"}},
     error("IOThread 'io7' not found", "DeviceNotFound")),
])
def test_bad_requests(server: QMPServer, backend: ModelBackend,
                      request_: dict[str, Any],
                      reply: dict[str, Any]) -> None:
    with RawClient(sock(server)) as c:
        c.negotiate()
        c.send(request_)
        assert c.recv() == reply
        # Still served, and nothing changed.
        assert c.cmd("query-iothreads")["return"][0]["poll-max-ns"] \
            == 32768
    assert set(backend.root.objects) == {"io0", "io1"}


def test_rejected_thread_pool_value_stays_stored(server: QMPServer) -> None:
    # Reference §8.1: QEMU keeps the value it refused.
    with RawClient(sock(server)) as c:
        c.negotiate()
        args = {"path": "/objects/io0", "property": "thread-pool-min",
                "value": 100}
        assert c.cmd("qom-set", args) == error(
            "bad thread-pool-min/thread-pool-max values")
        assert c.cmd("qom-get", {"path": "/objects/io0",
                                 "property": "thread-pool-min"}) == {
            "return": 100}


@pytest.mark.parametrize(("data", "desc"), [
    (b'{"execute": }\n', "JSON parse error, expecting value"),
    (b'{"execute": "quit",}\n', "JSON parse error, expecting value"),
    (b'{execute: 1}\n', "JSON parse error, invalid keyword 'execute'"),
    (b"\xff\xfe\n", "JSON parse error, stray '\ufffd'"),
    (b'{"execute": "\xc3\x28"}\n',
     "JSON parse error, invalid UTF-8 sequence in string"),
    (b"[1, 2]\n", "QMP input must be a JSON object"),
    (b'"hello"\n', "QMP input must be a JSON object"),
])
def test_malformed_input_answered_and_connection_kept(
        server: QMPServer, data: bytes, desc: str) -> None:
    with RawClient(sock(server)) as c:
        c.negotiate()
        c.send(data)
        first = c.recv()
        assert first == error(desc)
        assert "id" not in first
        # Any follow-on errors of the same line, then normal service.
        c.send(b'\n{"execute": "query-version", "id": 5}\n')
        while (rsp := c.recv()).get("id") != 5:
            assert "error" in rsp
        assert rsp["return"]["qemu"]["major"] == 7


def test_binary_garbage_does_not_disturb_others(server: QMPServer) -> None:
    with RawClient(sock(server)) as good, RawClient(sock(server)) as bad:
        good.negotiate()
        bad.recv()
        bad.send(bytes(range(256)) * 64 + b"\n")
        assert good.cmd("query-status")["return"]["status"] == "running"
        # The garbage was answered with errors, never with a crash.
        assert "error" in bad.recv()
        bad.send(b'{"execute": "qmp_capabilities"}\n')
        while "return" not in (rsp := bad.recv()):
            assert "error" in rsp


def test_huge_line_drops_only_that_client(server: QMPServer) -> None:
    with RawClient(sock(server)) as good, RawClient(sock(server)) as bad:
        good.negotiate()
        bad.negotiate()
        payload = b'{"execute": "' + b"a" * (2 << 20) + b'"}\n'
        try:
            bad.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass     # the server may hang up before we finish writing
        try:
            assert bad.recv() == error("JSON token size limit exceeded")
            assert bad.at_eof()
        except (EOFError, ConnectionResetError):
            pass
        assert good.cmd("query-status")["return"]["status"] == "running"
    with RawClient(sock(server)) as again:
        again.negotiate()


class SlowBackend(ModelBackend):
    """The model, with qom-set held until the test lets it go."""

    def __init__(self, image: str) -> None:
        super().__init__(image)
        self.entered = threading.Event()
        self.release = threading.Event()

    def qom_set(self, object_id: str, name: str, value: Any) -> None:
        self.entered.set()
        assert self.release.wait(60)
        super().qom_set(object_id, name, value)


def test_disconnect_mid_command(image: str, tmp_path: Path) -> None:
    backend = SlowBackend(image)
    with QMPServer(backend, tmp_path / "s.sock") as srv:
        other = RawClient(str(srv.path))
        other.negotiate()
        with RawClient(str(srv.path)) as c:
            c.negotiate()
            c.send({"execute": "qom-set", "arguments": {
                "path": "/objects/io0", "property": "poll-max-ns",
                "value": 0}})
            assert backend.entered.wait(30)
        # Gone while the command runs; the command still completes.
        backend.release.set()
        # The other client is still served (after the held command).
        assert other.cmd("qom-get", {"path": "io0",
                                     "property": "poll-max-ns"}) == {
            "return": 0}
        other.close()
        with RawClient(str(srv.path)) as c:
            c.negotiate()
    backend.close()


def test_events_reach_negotiated_clients_only(server: QMPServer,
                                              backend: ModelBackend) -> None:
    with RawClient(sock(server)) as neg, RawClient(sock(server)) as raw:
        neg.negotiate()
        raw.recv()
        before = time.time()
        backend.emit(MonitorEvent.device_broken(
            "", "/machine/peripheral/vblk0/virtio-backend", 0,
            "Desc next is 3"))
        ev = neg.recv()
        assert ev["event"] == "X_QIOTHREAD_DEVICE_BROKEN"
        assert ev["data"]["reason"] == "Desc next is 3"
        stamp = ev["timestamp"]["seconds"] + \
            ev["timestamp"]["microseconds"] / 1e6
        assert before - 1 <= stamp <= time.time() + 1
        # The un-negotiated client got nothing; its next line is the
        # answer to its own command.
        assert raw.cmd("qmp_capabilities") == {"return": {}}


def test_quit_then_close_delivers_shutdown(backend: ModelBackend,
                                           tmp_path: Path) -> None:
    srv = QMPServer(backend, tmp_path / "q.sock")
    srv.start()
    with RawClient(str(srv.path)) as c:
        c.negotiate()
        assert c.cmd("quit") == {"return": {}}
        assert backend.quit_requested.is_set()
        srv.close()
        while True:
            try:
                c.events.append(c.recv())
            except EOFError:
                break
        assert [(e["event"], e["data"]) for e in c.events] == [
            ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    assert not srv.path.exists()
    srv.close()                     # twice is harmless


def test_many_clients_at_once(server: QMPServer) -> None:
    clients = [RawClient(sock(server)) for _ in range(8)]
    try:
        for c in clients:
            c.negotiate()
        for i, c in enumerate(clients):
            c.send({"execute": "query-iothreads", "id": i})
        for i, c in enumerate(clients):
            rsp = c.recv()
            assert rsp["id"] == i
            assert [t["id"] for t in rsp["return"]] == ["io0", "io1"]
    finally:
        for c in clients:
            c.close()


def test_pretty_output(backend: ModelBackend, tmp_path: Path) -> None:
    import json
    import socket as socket_
    with QMPServer(backend, tmp_path / "p.sock", pretty=True) as srv:
        s = socket_.socket(socket_.AF_UNIX)
        s.settimeout(30)
        s.connect(str(srv.path))
        s.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
        buf = b""
        decoder = json.JSONDecoder()
        msgs: list[Any] = []
        while len(msgs) < 2:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
            text = buf.decode().lstrip()
            while text:
                try:
                    obj, end = decoder.raw_decode(text)
                except ValueError:
                    break
                msgs.append(obj)
                text = text[end:].lstrip()
            buf = text.encode()
        s.close()
    assert "QMP" in msgs[0]
    assert msgs[1] == {"return": {}, "id": 1}


def test_client_that_stops_reading_is_dropped(server: QMPServer,
                                              backend: ModelBackend) -> None:
    # 8 MiB of events, in batches the reading client keeps up with: more
    # than the kernel buffers plus MAX_OUTPUT_BUFFER for the client that
    # never reads, which is cut off; the reading client gets them all.
    n, batch, blob = 8192, 256, "x" * 1024
    with RawClient(sock(server)) as good, RawClient(sock(server)) as deaf:
        good.negotiate()
        deaf.negotiate()
        for start in range(0, n, batch):
            for i in range(start, start + batch):
                backend.emit(MonitorEvent("X_TEST", {"i": i, "blob": blob}))
            for i in range(start, start + batch):
                assert good.recv()["data"]["i"] == i
        assert good.cmd("query-status")["return"]["status"] == "running"
        got = 0
        try:
            while True:
                deaf.recv()
                got += 1
        except (EOFError, ConnectionResetError):
            pass
        assert got < n


def test_regression_path_appears_only_once_listening(
        backend: ModelBackend, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in the live test under load: a client that waited for the
    # file connected between bind() and listen() and was refused.  The
    # path must not exist until the socket listens with mode 0600.
    path = tmp_path / "r.sock"
    seen_at_chmod: list[bool] = []
    real_chmod = os.chmod

    def chmod(p: Any, mode: int, **kw: Any) -> None:
        seen_at_chmod.append(path.exists())
        real_chmod(p, mode, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    with QMPServer(backend, path) as srv:
        assert seen_at_chmod == [False]
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
        with RawClient(str(srv.path)) as c:
            c.negotiate()
    # No temporary name left behind either.
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]
