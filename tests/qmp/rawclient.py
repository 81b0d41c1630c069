"""A byte-level QMP peer for tests that must send what no library sends."""

from __future__ import annotations

import json
import socket
from types import TracebackType
from typing import Any

TIMEOUT = 30.0      # generous: only a hang should ever reach it


class RawClient:
    """A blocking UNIX-socket peer that reads one JSON line at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self._buf = b""
        #: Events skipped by recv_reply, in arrival order.
        self.events: list[dict[str, Any]] = []

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        """The next message; raises EOFError when the server closed."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def recv_reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def cmd(self, name: str, args: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            req["arguments"] = args
        self.send(req)
        return self.recv_reply()

    def negotiate(self) -> dict[str, Any]:
        greeting = self.recv()
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return greeting

    def at_eof(self) -> bool:
        """True if the server has closed (after any buffered data)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def error(desc: str, cls: str = "GenericError",
          **extra: Any) -> dict[str, Any]:
    """The answer QEMU gives for an error."""
    return {"error": {"class": cls, "desc": desc}, **extra}
