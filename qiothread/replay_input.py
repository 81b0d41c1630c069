"""Inputs of ``qiothread replay``: traces and iologs as timed events.

A replay needs, for each moment something became ready in an iothread,
the time and the *source* (which handler would have fired).  Two kinds
of recording provide that:

QEMU "log" backend traces (reference §18.1), and qiothread's own, which
are written in the same format.  A line is ``TID@SEC.USEC:NAME ARGS``
(7.2 ... 10.0 with ``-msg timestamp=on``) or ``ISO-8601Z NAME ARGS``
(10.1+).  The time resolution is therefore 1 µs: events closer than
that land on the same instant.  The events read, and the argument that
names the source:

======================================  ============  ==========
event                                   source kind   keyed by
======================================  ============  ==========
``virtqueue_pop``                       queue         ``vq``
``virtio_queue_notify``                 queue         ``vq``
``thread_pool_complete``                completion    ``pool``
``luring_process_completion``           completion    ``LuringState``
``virtio_blk_rw_complete``              completion    ``vdev``
======================================  ============  ==========

``virtio_blk_rw_complete`` is used only when the trace has no engine
completion event (Linux AIO has no trace events in QEMU, §18); a pop
marks the latest time the queue was ready (the device saw it then).
Every other line is skipped; a line without a timestamp is an error,
since a replay without times means nothing.

fio iologs (v2/v3, via :mod:`qiothread.fio.iolog`) give the requests but
not their service.  A model supplies it: each I/O is issued at the
earliest of its log time (v3; v2 waits accumulate) once one of
``iodepth`` slots is free, the queue fires then, the backend completes
it after a service time drawn from ``const:T``, ``exp:MEAN`` or
``uniform:LO:HI`` (seeded), and the slot is free again ``think`` later
(the guest's reaction).  Timing is fixed by the model, not by the
replayed policy.
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import math
import random
import re
from collections.abc import Callable, Iterable

from qiothread.fio.iolog import IoLog

__all__ = [
    "SOURCE_EVENTS",
    "EventSeq",
    "ReplayInputError",
    "events_from_iolog",
    "events_from_trace",
    "parse_duration_ns",
    "parse_service",
]

#: event name -> (source kind, argument naming the source).
SOURCE_EVENTS: dict[str, tuple[str, str]] = {
    "virtqueue_pop": ("queue", "vq"),
    "virtio_queue_notify": ("queue", "vq"),
    "thread_pool_complete": ("completion", "pool"),
    "luring_process_completion": ("completion", "LuringState"),
    "virtio_blk_rw_complete": ("completion", "vdev"),
}
_FALLBACK_ONLY = frozenset({"virtio_blk_rw_complete"})

_TID_TS = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+)(?: (.*))?$")
_ISO_TS = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?)Z (\w+)(?: (.*))?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s)?\s*$")
_UNIT_NS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 1_000_000,
            "s": 1_000_000_000, None: 1}


class ReplayInputError(ValueError):
    """A recording that cannot be replayed (message names the place)."""


@dataclasses.dataclass
class EventSeq:
    """Times (ns, non-decreasing) at which sources became ready."""

    times: list[int]
    #: Index into ``source_names`` for each time.
    sources: list[int]
    source_names: list[str]
    description: str = ""

    @property
    def span_ns(self) -> int:
        return self.times[-1] - self.times[0] if self.times else 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, str]],
                   description: str = "") -> EventSeq:
        """From (time, source name) pairs, in any order."""
        names: dict[str, int] = {}
        tagged = []
        for t, name in pairs:
            tagged.append((t, names.setdefault(name, len(names))))
        tagged.sort()
        out = cls([], [], list(names), description)
        for t, s in tagged:
            # The same source ready twice at one instant is one event.
            if out.times and out.times[-1] == t and out.sources[-1] == s:
                continue
            out.times.append(t)
            out.sources.append(s)
        return out


def parse_duration_ns(text: str) -> int:
    """``3us``, ``1.5ms``, ``200`` (ns) -> ns.

    :raises ReplayInputError: not a duration.
    """
    m = _DURATION.match(text)
    if m is None:
        raise ReplayInputError(
            f"invalid duration '{text}' (e.g. 200ns, 3us, 1.5ms, 1s)")
    return round(float(m.group(1)) * _UNIT_NS[m.group(2)])


def parse_service(text: str) -> Callable[[random.Random], int]:
    """A service-time model: ``const:T``, ``exp:MEAN``, ``uniform:LO:HI``.

    A bare duration means ``const``.  The result draws one time in ns.

    :raises ReplayInputError: unknown model or bad durations.
    """
    kind, _, rest = text.partition(":")
    if not rest:
        kind, rest = "const", text
    parts = rest.split(":")
    try:
        if kind == "const" and len(parts) == 1:
            t = parse_duration_ns(parts[0])
            return lambda rng: t
        if kind == "exp" and len(parts) == 1:
            mean = parse_duration_ns(parts[0])
            return lambda rng: round(-mean * math.log(1.0 - rng.random()))
        if kind == "uniform" and len(parts) == 2:
            lo, hi = (parse_duration_ns(p) for p in parts)
            if hi < lo:
                raise ReplayInputError(
                    f"invalid service model '{text}': HI < LO")
            return lambda rng: lo + round(rng.random() * (hi - lo))
    except ReplayInputError as e:
        raise ReplayInputError(f"invalid service model '{text}': {e}") \
            from None
    raise ReplayInputError(
        f"invalid service model '{text}' (const:T, exp:MEAN, "
        "uniform:LO:HI)")


def _iso_ns(stamp: str) -> int:
    base, _, frac = stamp.partition(".")
    dt = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.UTC)
    return int(dt.timestamp()) * 1_000_000_000 + int(
        (frac + "000000000")[:9])


def _arg(args: str, key: str) -> str | None:
    words = args.split()
    for i in range(0, len(words) - 1):
        if words[i] == key:
            return words[i + 1]
    return None


def events_from_trace(lines: Iterable[str], tid: int | None = None,
                      source: str = "trace") -> EventSeq:
    """Timed source events from a QEMU/qiothread log-backend trace.

    :raises ReplayInputError: a line without a timestamp, or no event
        the replay can use.
    """
    primary: list[tuple[int, str]] = []
    fallback: list[tuple[int, str]] = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        m = _TID_TS.match(line)
        if m is not None:
            if tid is not None and int(m.group(1)) != tid:
                continue
            t = (int(m.group(2)) * 1_000_000 + int(m.group(3))) * 1000
            name, args = m.group(4), m.group(5) or ""
        else:
            mi = _ISO_TS.match(line)
            if mi is None:
                raise ReplayInputError(
                    f"{source}:{n}: no timestamp (record the trace with "
                    f"-msg timestamp=on): {line[:60]!r}")
            t = _iso_ns(mi.group(1))
            name, args = mi.group(2), mi.group(3) or ""
        spec = SOURCE_EVENTS.get(name)
        if spec is None:
            continue
        kind, key = spec
        value = _arg(args, key)
        if value is None:
            raise ReplayInputError(
                f"{source}:{n}: {name} without its '{key}' argument")
        pair = (t, f"{kind} {key} {value}")
        (fallback if name in _FALLBACK_ONLY else primary).append(pair)
    has_completion = any(name.startswith("completion")
                         for _, name in primary)
    pairs = primary if has_completion else primary + fallback
    if not pairs:
        raise ReplayInputError(
            f"{source}: no replayable events (need some of: "
            f"{', '.join(sorted(SOURCE_EVENTS))})")
    return EventSeq.from_pairs(pairs, description=source)


def events_from_iolog(log: IoLog, *, iodepth: int,
                      service: Callable[[random.Random], int],
                      think_ns: int, seed: int = 1,
                      source: str = "iolog") -> EventSeq:
    """Queue and completion events of ``log`` under the service model."""
    if iodepth < 1:
        raise ReplayInputError("iodepth must be at least 1")
    if not log.ios:
        raise ReplayInputError(f"{source}: the iolog has no I/O")
    rng = random.Random(seed)
    free = [0] * iodepth            # when each slot can issue again
    pairs: list[tuple[int, str]] = []
    for io in log.ios:
        slot_free = heapq.heappop(free)
        issue = max(io.t_ns, slot_free)
        done = issue + service(rng)
        pairs.append((issue, "queue"))
        pairs.append((done, "completion"))
        heapq.heappush(free, done + think_ns)
    return EventSeq.from_pairs(
        pairs, description=f"{source} (iolog v{log.version}, "
        f"iodepth {iodepth})")
