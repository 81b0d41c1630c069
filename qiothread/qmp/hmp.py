"""HMP through QMP: the ``human-monitor-command`` subset users tune with.

QEMU users change iothread parameters with HMP as often as with QMP::

    (qemu) qom-set /objects/iothread1 poll-max-ns 100000
    (qemu) info iothreads

and reach HMP through QMP with ``human-monitor-command`` (libvirt's
``virsh qemu-monitor-command --hmp``, ``qmp-shell -H``).  This module
answers the commands of that habit with QEMU 7.2's output: text lines
ending in ``\\r\\n`` (QEMU's monitor adds the carriage return), errors
as a line ``Error: <message>`` inside a successful answer, an unknown
command as ``unknown command: 'foo'``.

Values typed on the HMP line are strings; an integer property parses
them as QEMU's string input visitor does (``qemu_strtoi64`` with base
0, so ``0x10000`` works) and otherwise says "Parameter 'poll-max-ns'
expects int64".  ``qom-set -j`` takes JSON instead.  Everything else
goes through the same QMP handlers and backend calls as QMP.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any

from qiothread.errors import ConfigError, QMPCommandError
from qiothread.keyval import qemu_strtoi64
from qiothread.qmp import protocol

__all__ = ["human_monitor_command"]

#: ``query`` is how HMP commands reach QMP: ``query(name, args)``
#: returns the command's result or raises its error.
Query = Callable[[str, dict[str, Any]], Any]

# name, parameters, help -- as ``help`` prints them.
_COMMANDS = (
    ("help|?", "[cmd]", "show the help"),
    ("info", "[subcommand]",
     "show various information about the system state"),
    ("qom-list", "path", "list QOM properties"),
    ("qom-get", "path property", "print QOM property"),
    ("qom-set", "[-j] path property value", "set QOM property.\n\t\t\t"
     "-j: the value is specified in json format."),
    ("quit|q", "", "quit the emulator"),
)
_INFO = (
    ("blockstats", "", "show block device statistics"),
    ("iothreads", "", "show iothreads"),
    ("status", "", "show the current VM status (running|paused)"),
    ("version", "", "show the version of QEMU"),
)


def human_monitor_command(query: Query, command_line: str) -> str:
    """Run one HMP command line; return its output (QMP's ``return``)."""
    out: list[str] = []
    try:
        words = shlex.split(command_line)
    except ValueError:
        words = command_line.split()
    if words:
        try:
            _run(query, words, out)
        except (QMPCommandError, ConfigError) as e:
            out.append(f"Error: {e}")
    if not out:
        return ""
    return "".join(line + "\r\n" for line in "\n".join(out).split("\n"))


def _run(query: Query, words: list[str], out: list[str]) -> None:
    name, args = words[0], words[1:]
    if name in ("help", "?"):
        _help(args, out)
    elif name == "info":
        _info(query, args, out)
    elif name == "qom-list":
        if not args:
            out.append("/")
            return
        for prop in query("qom-list", {"path": args[0]}):
            out.append(f"{prop['name']} ({prop['type']})")
    elif name == "qom-get":
        _need(args, 2)
        value = query("qom-get", {"path": args[0], "property": args[1]})
        out.append(json.dumps(value, indent=4))
    elif name == "qom-set":
        _qom_set(query, args)
    elif name in ("quit", "q"):
        query("quit", {})
    else:
        out.append(f"unknown command: '{name}'")


def _need(args: list[str], n: int) -> None:
    if len(args) < n:
        raise QMPCommandError("Parameter 'property' is missing"
                              if len(args) == 1 else
                              "Parameter 'path' is missing")


def _qom_set(query: Query, args: list[str]) -> None:
    as_json = bool(args) and args[0] == "-j"
    if as_json:
        args = args[1:]
    if len(args) < 3:
        raise QMPCommandError("Parameter 'value' is missing")
    path, prop, text = args[0], args[1], " ".join(args[2:])
    if as_json:
        try:
            value: Any = json.loads(text)
        except ValueError:
            raise QMPCommandError("JSON parse error, expecting value") \
                from None
        query("qom-set", {"path": path, "property": prop, "value": value})
        return
    # Without -j the property parses the string: integers as
    # qemu_strtoi64 does, strings as they are.
    props = {p["name"]: p["type"]
             for p in query("qom-list", {"path": path})}
    if props.get(prop) == "int":
        number = qemu_strtoi64(text)
        if number is None:
            raise QMPCommandError(f"Parameter '{prop}' expects int64")
        query("qom-set", {"path": path, "property": prop, "value": number})
    else:
        query("qom-set", {"path": path, "property": prop, "value": text})


def _help(args: list[str], out: list[str]) -> None:
    if args and args[0] == "info":
        out += [f"info {n} {p} -- {h}".replace("  ", " ")
                for n, p, h in _INFO]
        return
    for n, p, h in _COMMANDS:
        if not args or args[0] in n.split("|"):
            out.append(f"{n} {p} -- {h}")


def _info(query: Query, args: list[str], out: list[str]) -> None:
    if not args:
        _help(["info"], out)
        return
    sub = args[0]
    if sub == "iothreads":
        for t in query("query-iothreads", {}):
            out += [f"{t['id']}:", f"  thread_id={t['thread-id']}",
                    f"  poll-max-ns={t['poll-max-ns']}",
                    f"  poll-grow={t['poll-grow']}",
                    f"  poll-shrink={t['poll-shrink']}",
                    f"  aio-max-batch={t['aio-max-batch']}"]
    elif sub == "status":
        st = query("query-status", {})
        line = "VM status: " + ("running" if st["running"] else "paused")
        if not st["running"] and st["status"] != "paused":
            line += f" ({st['status']})"
        out.append(line)
    elif sub == "version":
        v = protocol.version_info()
        q = v["qemu"]
        out.append(f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}")
    elif sub == "blockstats":
        for b in query("query-blockstats", {}):
            s = b["stats"]
            fields = ("rd_bytes", "wr_bytes", "rd_operations",
                      "wr_operations", "flush_operations",
                      "wr_total_time_ns", "rd_total_time_ns",
                      "flush_total_time_ns", "rd_merged", "wr_merged",
                      "idle_time_ns")
            out.append(f"{b['device']}: " + " ".join(
                f"{f}={s.get(f, 0)}" for f in fields))
    else:
        out.append(f"unknown command: 'info {sub}'")
