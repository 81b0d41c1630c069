"""QMP commands: QEMU's dispatcher, argument checks and command set.

What a client observes, as QEMU 7.2 does it (qapi/qmp-dispatch.c,
monitor/qmp.c, the QObject input visitor):

- A request must be a JSON object whose members are ``execute`` (a
  string), ``arguments`` (an object) and ``id`` (anything, echoed in the
  answer); anything else is refused with the dispatcher's own message.
- Before ``qmp_capabilities`` only that command exists, and every other
  name is answered ``CommandNotFound`` "Expecting capabilities
  negotiation with 'qmp_capabilities'".
- Arguments are checked as QAPI's visitor walks the schema: declared
  members in order ("Parameter 'path' is missing", "Invalid parameter
  type for 'path', expected: string"), then whatever is left over
  ("Parameter 'foo' is unexpected").

QOM paths: ``/``, ``/objects`` and ``/objects/<id>`` exist, and so do
partial paths (``io0``, ``objects``) when they name exactly one object,
as in QEMU.  The run's iothreads are the only objects; everything else
answers ``DeviceNotFound`` "Device 'x' not found".

Commands run in the monitor's worker thread, one at a time, through the
backend (``qiothread.qmp.backend``); nothing here touches an iothread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qiothread.errors import ConfigError, QMPCommandError
from qiothread.qmp import hmp, protocol
from qiothread.qmp.backend import (
    BlockDeviceInfo,
    BlockDeviceStats,
    PollStats,
    PropertyInfo,
    QMPBackend,
    RunState,
)
from qiothread.qmp.protocol import ErrorClass

__all__ = ["COMMANDS", "Dispatcher", "Session"]

_log = logging.getLogger(__name__)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: QAPI type names as the input visitor's messages spell them.
_TYPE_WORDS = {str: "string", int: "integer", bool: "boolean",
               dict: "object", list: "array"}


class Session:
    """One client's monitor state (QEMU's ``MonitorQMP``)."""

    def __init__(self) -> None:
        #: True after ``qmp_capabilities`` succeeded.  Touched only by
        #: the worker thread while it runs this client's command, and
        #: read by the loop thread to decide who gets events (a plain
        #: bool store is atomic for that purpose).
        self.negotiated = False


class _Args:
    """The QObject input visitor over one command's ``arguments``."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self._args = dict(args)

    def get(self, name: str, kind: type | None,
            required: bool = True) -> Any:
        """Visit member ``name``: ``kind`` None accepts any JSON value."""
        if name not in self._args:
            if required:
                raise QMPCommandError(f"Parameter '{name}' is missing")
            return None
        value = self._args.pop(name)
        if kind is not None and not _is_type(value, kind):
            raise QMPCommandError(
                f"Invalid parameter type for '{name}', expected: "
                f"{_TYPE_WORDS[kind]}")
        return value

    def rest(self) -> dict[str, Any]:
        """Members not visited, for commands that pass them on."""
        rest, self._args = self._args, {}
        return rest

    def check(self) -> None:
        """QAPI's check_struct: any member left over is unexpected."""
        for name in self._args:
            raise QMPCommandError(f"Parameter '{name}' is unexpected")


def _is_type(value: Any, kind: type) -> bool:
    if kind is int:
        return (isinstance(value, int) and not isinstance(value, bool)
                and INT64_MIN <= value <= INT64_MAX)
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind)


# -- QOM paths --------------------------------------------------------------

@dataclass(frozen=True)
class _QOMNode:
    """A resolved QOM path: the root, ``/objects`` or an object."""

    kind: str                      # "root" | "objects" | "object"
    object_id: str = ""


def _resolve(backend: QMPBackend, path: str) -> _QOMNode | None:
    parts = [p for p in path.split("/") if p]
    if path.startswith("/"):
        if not parts:
            return _QOMNode("root")
        if parts[0] != "objects":
            return None
        if len(parts) == 1:
            return _QOMNode("objects")
        if len(parts) == 2 and backend.qom_list(parts[1]) is not None:
            return _QOMNode("object", parts[1])
        return None
    # A partial path names the one object whose path ends with it.
    if parts == ["objects"]:
        return _QOMNode("objects")
    if len(parts) == 2 and parts[0] == "objects":
        parts = parts[1:]
    if len(parts) == 1 and backend.qom_list(parts[0]) is not None:
        return _QOMNode("object", parts[0])
    return None


def _resolve_or_raise(backend: QMPBackend, path: str) -> _QOMNode:
    node = _resolve(backend, path)
    if node is None:
        raise QMPCommandError(f"Device '{path}' not found",
                              ErrorClass.DEVICE_NOT_FOUND.value)
    return node


def _properties(backend: QMPBackend, node: _QOMNode) -> list[PropertyInfo]:
    if node.kind == "root":
        return [PropertyInfo("type", "string", writable=False),
                PropertyInfo("objects", "child<container>", writable=False)]
    if node.kind == "objects":
        return [PropertyInfo("type", "string", writable=False)] + [
            PropertyInfo(t.id, "child<iothread>", writable=False)
            for t in backend.query_iothreads()]
    props = backend.qom_list(node.object_id)
    if props is None:                # deleted since it was resolved
        raise QMPCommandError(f"Device '{node.object_id}' not found",
                              ErrorClass.DEVICE_NOT_FOUND.value)
    return props


def _type_name(backend: QMPBackend, node: _QOMNode) -> str:
    if node.kind == "object":
        return str(backend.qom_get(node.object_id, "type"))
    return "container"


def _find_property(backend: QMPBackend, node: _QOMNode,
                   name: str) -> PropertyInfo:
    for prop in _properties(backend, node):
        if prop.name == name:
            return prop
    raise QMPCommandError(
        f"Property '{_type_name(backend, node)}.{name}' not found")


# -- the commands -------------------------------------------------------------

Handler = Callable[["Dispatcher", Session, _Args], Any]


def _qmp_capabilities(d: Dispatcher, s: Session, a: _Args) -> Any:
    enable = a.get("enable", list, required=False)
    a.check()
    if s.negotiated:
        raise QMPCommandError(
            "Capabilities negotiation is already complete, command "
            "ignored", ErrorClass.COMMAND_NOT_FOUND.value)
    for i, cap in enumerate(enable or ()):
        if not isinstance(cap, str):
            raise QMPCommandError(
                f"Invalid parameter type for 'enable[{i}]', expected: "
                "string")
        if cap != "oob":
            # QEMU's enum visitor names list elements 'null'.
            raise QMPCommandError(
                f"Parameter 'null' does not accept value '{cap}'")
    if enable:
        # We offer no capability (the greeting's list is empty).
        raise QMPCommandError("Capability oob not available")
    s.negotiated = True
    return {}


def _query_version(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    return protocol.version_info()


def _query_status(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    state = d.backend.query_status()
    return {"running": state is RunState.RUNNING, "singlestep": False,
            "status": state.value}


def _query_commands(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    return [{"name": name} for name in COMMANDS]


def _query_iothreads(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    return [{"id": t.id, "thread-id": t.thread_id,
             "poll-max-ns": t.poll_max_ns, "poll-grow": t.poll_grow,
             "poll-shrink": t.poll_shrink,
             "aio-max-batch": t.aio_max_batch}
            for t in d.backend.query_iothreads()]


def _qom_list(d: Dispatcher, s: Session, a: _Args) -> Any:
    path = a.get("path", str)
    a.check()
    node = _resolve_or_raise(d.backend, path)
    out = []
    for prop in _properties(d.backend, node):
        info: dict[str, Any] = {"name": prop.name, "type": prop.type}
        if prop.description is not None:
            info["description"] = prop.description
        out.append(info)
    return out


def _qom_get(d: Dispatcher, s: Session, a: _Args) -> Any:
    path = a.get("path", str)
    name = a.get("property", str)
    a.check()
    node = _resolve_or_raise(d.backend, path)
    prop = _find_property(d.backend, node, name)
    if node.kind != "object":
        if prop.type.startswith("child<"):
            # QEMU returns a child property's value as its path.
            prefix = "/objects/" if node.kind == "objects" else "/"
            return prefix + prop.name
        return "container"
    return d.backend.qom_get(node.object_id, name)


def _qom_set(d: Dispatcher, s: Session, a: _Args) -> Any:
    path = a.get("path", str)
    name = a.get("property", str)
    value = a.get("value", None)
    a.check()
    node = _resolve_or_raise(d.backend, path)
    prop = _find_property(d.backend, node, name)
    if not prop.writable or node.kind != "object":
        raise QMPCommandError(
            "Insufficient permission to perform this operation")
    # The property's setter visits the value under its own name.
    kind = {"int": int, "string": str, "bool": bool}.get(prop.type)
    if kind is not None and not _is_type(value, kind):
        raise QMPCommandError(
            f"Invalid parameter type for '{name}', expected: "
            f"{_TYPE_WORDS[kind]}")
    d.backend.qom_set(node.object_id, name, value)
    return {}


def _object_add(d: Dispatcher, s: Session, a: _Args) -> Any:
    qom_type = a.get("qom-type", str)
    if qom_type not in d.backend.object_types():
        raise QMPCommandError(
            f"Parameter 'qom-type' does not accept value '{qom_type}'")
    object_id = a.get("id", str)
    d.backend.object_add(qom_type, object_id, a.rest())
    return {}


def _object_del(d: Dispatcher, s: Session, a: _Args) -> Any:
    object_id = a.get("id", str)
    a.check()
    d.backend.object_del(object_id)
    return {}


def _query_block(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    return [_block_info(b) for b in d.backend.query_block()]


def _query_blockstats(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.get("query-nodes", bool, required=False)
    a.check()
    return [_block_stats(st) for st in d.backend.query_blockstats()]


def _quit(d: Dispatcher, s: Session, a: _Args) -> Any:
    a.check()
    d.backend.request_quit()
    return {}


def _x_query_poll_stats(d: Dispatcher, s: Session, a: _Args) -> Any:
    only = a.get("iothread", str, required=False)
    a.check()
    stats = d.backend.query_poll_stats()
    if only is not None:
        stats = [p for p in stats if p.id == only]
        if not stats:
            raise QMPCommandError(f"IOThread '{only}' not found",
                                  ErrorClass.DEVICE_NOT_FOUND.value)
    return [_poll_stats(p) for p in stats]


def _human_monitor_command(d: Dispatcher, s: Session, a: _Args) -> Any:
    line = a.get("command-line", str)
    a.get("cpu-index", int, required=False)
    a.check()

    def query(name: str, args: dict[str, Any]) -> Any:
        return COMMANDS[name](d, s, _Args(args))

    return hmp.human_monitor_command(query, line)


#: Every command, in the order ``query-commands`` lists them.
COMMANDS: dict[str, Handler] = {
    "qmp_capabilities": _qmp_capabilities,
    "query-version": _query_version,
    "query-status": _query_status,
    "query-commands": _query_commands,
    "query-iothreads": _query_iothreads,
    "qom-list": _qom_list,
    "qom-get": _qom_get,
    "qom-set": _qom_set,
    "object-add": _object_add,
    "object-del": _object_del,
    "query-block": _query_block,
    "query-blockstats": _query_blockstats,
    "quit": _quit,
    "x-query-poll-stats": _x_query_poll_stats,
    "human-monitor-command": _human_monitor_command,
}


# -- result shapes ------------------------------------------------------------

def _block_info(b: BlockDeviceInfo) -> dict[str, Any]:
    image = {"filename": b.filename, "format": b.driver,
             "virtual-size": b.virtual_size, "dirty-flag": False}
    inserted = {
        "file": b.filename, "node-name": b.node_name, "ro": b.read_only,
        "drv": b.driver, "backing_file_depth": 0, "encrypted": False,
        "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
        "image": image,
        "cache": {"writeback": True, "direct": b.cache_direct,
                  "no-flush": b.cache_no_flush},
    }
    return {"device": b.device, "qdev": b.qdev, "locked": False,
            "removable": False, "type": "unknown",
            "io-status": "failed" if b.broken else "ok",
            "inserted": inserted}


def _block_stats(st: BlockDeviceStats) -> dict[str, Any]:
    stats = dataclasses.asdict(st)
    for key in ("device", "qdev", "node_name"):
        del stats[key]
    if stats["idle_time_ns"] is None:
        del stats["idle_time_ns"]
    stats.update(account_invalid=True, account_failed=True,
                 timed_stats=[])
    return {"device": st.device, "node-name": st.node_name,
            "qdev": st.qdev, "stats": stats}


def _poll_stats(p: PollStats) -> dict[str, Any]:
    return {k.replace("_", "-"): v
            for k, v in dataclasses.asdict(p).items()}


# -- the dispatcher -----------------------------------------------------------

class Dispatcher:
    """Run one request against the backend (QEMU's ``qmp_dispatch``)."""

    def __init__(self, backend: QMPBackend) -> None:
        self.backend = backend

    def dispatch(self, session: Session, request: Any) -> dict[str, Any]:
        """The answer to ``request``, a parsed JSON value.

        Worker thread only.  Never raises for a client's mistake; a
        backend exception that is not a refusal is logged and answered
        as a ``GenericError``.
        """
        if not isinstance(request, dict):
            return protocol.error_response(
                "QMP input must be a JSON object")
        has_id = "id" in request
        req_id = request.get("id")
        try:
            ret = self._dispatch(session, request)
        except QMPCommandError as e:
            return protocol.error_response(str(e), e.error_class,
                                           req_id, has_id)
        except ConfigError as e:
            return protocol.error_response(str(e), req_id=req_id,
                                           has_id=has_id)
        except Exception as e:
            _log.error("QMP command %r failed: %s",
                       request.get("execute"), e)
            _log.debug("traceback", exc_info=True)
            return protocol.error_response(f"internal error: {e}",
                                           req_id=req_id, has_id=has_id)
        return protocol.success_response(ret, req_id, has_id)

    def _dispatch(self, session: Session, request: dict[str, Any]) -> Any:
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QMPCommandError(
                        "QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPCommandError(
                        "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPCommandError(
                    f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QMPCommandError("QMP input lacks member 'execute'")
        name = request["execute"]
        handler = COMMANDS.get(name)
        if not session.negotiated and name != "qmp_capabilities":
            # Only qmp_capabilities exists before negotiation; QEMU
            # replaces the "not found" text with a hint.
            raise QMPCommandError(
                "Expecting capabilities negotiation with "
                "'qmp_capabilities'", ErrorClass.COMMAND_NOT_FOUND.value)
        if handler is None:
            raise QMPCommandError(f"The command {name} has not been found",
                                  ErrorClass.COMMAND_NOT_FOUND.value)
        return handler(self, session, _Args(request.get("arguments", {})))
