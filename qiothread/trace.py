"""Trace events with QEMU's names and QEMU's "log" backend output.

Every event of this project that QEMU also has carries QEMU's name and
argument text (reference §18), so that the grep and awk habits of QEMU
users keep working::

    poll_grow ctx 0x7f3a2c0b1e50 old 4000 new 8000
    15083@1796314261.102406:poll_grow ctx 0x7f3a2c0b1e50 old 4000 new 8000

The second form is what ``-msg timestamp=on`` gives in QEMU 7.2 ...
10.0: the OS thread id, ``@``, gettimeofday seconds and microseconds.

A disabled event costs one attribute load and a branch at the call site::

    if trace.poll_grow.enabled:
        trace.poll_grow(ctx, old, new)

Calling a disabled event is also harmless (it returns at once), so cold
paths may skip the test.  ``%p`` renders an ``int`` as it is and any
other object by ``id()``, as ``0x...``, and ``None`` as ``(nil)``, as
glibc prints pointers.  Lines go to one file (stderr by default), each
written with a single ``write`` on an ``O_APPEND`` descriptor, so lines
from several processes sharing the file do not interleave.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

__all__ = [
    "TraceEvent",
    "all_events",
    "configure",
    "disable_all",
    "enable",
    "event",
]

_CONV = re.compile(r"%(?:l|ll|z|h)?([pdiuxs])|%%")


def _pointer(value: object) -> str:
    if value is None or value == 0:
        return "(nil)"
    if isinstance(value, int):
        return f"0x{value:x}"
    return f"0x{id(value):x}"


class TraceEvent:
    """One trace point: a QEMU name and its C-style argument format."""

    __slots__ = ("_convs", "_pyfmt", "enabled", "fmt", "name")

    def __init__(self, name: str, fmt: str) -> None:
        #: QEMU's event name, e.g. ``poll_grow``.
        self.name = name
        #: The argument text exactly as QEMU's trace-events file has it.
        self.fmt = fmt
        #: Tested at call sites to keep disabled events free.
        self.enabled = False
        self._convs: list[str] = []

        def conv(m: re.Match[str]) -> str:
            if m.group(0) == "%%":
                return "%%"
            self._convs.append(m.group(1))
            return "%s" if m.group(1) in "ps" else "%" + {
                "x": "x", "u": "d", "i": "d", "d": "d"}[m.group(1)]

        self._pyfmt = _CONV.sub(conv, fmt)

    def render(self, args: tuple[Any, ...]) -> str:
        """The text after the name, as QEMU's log backend prints it."""
        if len(args) != len(self._convs):
            raise TypeError(
                f"trace event {self.name} takes {len(self._convs)} "
                f"arguments, got {len(args)}"
            )
        vals = tuple(
            _pointer(a) if c == "p" else (str(a) if c == "s" else int(a))
            for c, a in zip(self._convs, args, strict=True)
        )
        return self._pyfmt % vals

    def __call__(self, *args: Any) -> None:
        if self.enabled:
            _sink.emit(self.name, self.render(args))


class _Sink:
    def __init__(self) -> None:
        self.fd = 2
        self.owned = False
        self.timestamps = False
        self.lock = threading.Lock()

    def emit(self, name: str, text: str) -> None:
        if self.timestamps:
            ns = time.time_ns()
            sec, usec = divmod(ns // 1000, 1_000_000)
            tid = threading.get_native_id()
            line = f"{tid}@{sec}.{usec:06d}:{name} {text}\n"
        else:
            line = f"{name} {text}\n"
        data = line.encode()
        with self.lock:
            os.write(self.fd, data)


_sink = _Sink()
_events: dict[str, TraceEvent] = {}


def event(name: str, fmt: str) -> TraceEvent:
    """Declare (or return the already declared) event ``name``."""
    ev = _events.get(name)
    if ev is None:
        ev = _events[name] = TraceEvent(name, fmt)
    elif ev.fmt != fmt:
        raise ValueError(f"trace event {name} declared twice differently")
    return ev


def all_events() -> list[TraceEvent]:
    return sorted(_events.values(), key=lambda e: e.name)


def enable(pattern: str, on: bool = True) -> int:
    """Enable the events matching a glob, as ``-trace enable=PATTERN``.

    A leading ``-`` disables instead, as QEMU's ``-trace -PATTERN``.
    Returns how many events matched.
    """
    if pattern.startswith("-"):
        pattern, on = pattern[1:], False
    n = 0
    for ev in _events.values():
        if fnmatch.fnmatchcase(ev.name, pattern):
            ev.enabled = on
            n += 1
    return n


def disable_all() -> None:
    for ev in _events.values():
        ev.enabled = False


def configure(
    patterns: Iterable[str] = (),
    file: str | None = None,
    timestamps: bool | None = None,
) -> None:
    """Set up tracing for this process (inherited by forked children).

    ``file`` is opened for appending; ``None`` keeps the current sink
    (stderr at start).
    """
    if file is not None:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if _sink.owned:
            os.close(_sink.fd)
        _sink.fd, _sink.owned = fd, True
    if timestamps is not None:
        _sink.timestamps = timestamps
    for p in patterns:
        enable(p)


def sink_fileno() -> int:
    """The descriptor trace lines go to (for children to inherit)."""
    return _sink.fd


def flush_to(fd: int) -> None:
    """Redirect this process's trace lines to ``fd`` (already open)."""
    _sink.fd, _sink.owned = fd, False


if __name__ == "__main__":  # pragma: no cover - manual listing
    for e in all_events():
        sys.stdout.write(f"{e.name}({e.fmt})\n")
