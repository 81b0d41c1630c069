"""Fault and latency injection for a backend node, on AioContext timers.

For reproductions ("the disk stalls for 800 ms every 5 s", "1% of reads
fail"), a node can be opened with a :class:`FaultSpec`.  The injector
sits between the node and its engine and keeps these promises:

- Nothing sleeps.  Delays are AioContext timers (``timer_new_ns``) read
  against the context's clock, so a test in virtual time sees exact
  release times and the iothread keeps polling meanwhile.
- Only the chosen requests fail, and they fail with -EIO, which
  virtio-blk reports to the guest as VIRTIO_BLK_S_IOERR.  An injected
  error replaces the I/O: the request never reaches the engine.
- Nothing is lost, and nothing is reordered that the fault does not
  reorder by its nature: a throttle releases requests in submission
  order; a fixed latency and a stall keep completion order; only a
  random latency lets a later completion overtake an earlier one.

Options, as dotted keys of the node (``-blockdev ...,faults.latency=
200us,faults.eio-fraction=0.01``) or :meth:`FaultSpec.parse` of
``"latency=200us;eio=0+4096"``:

==================  ==================================================
``latency``         fixed extra completion latency (``500ns``, ``2ms``)
``jitter``          plus a uniform random extra latency in [0, jitter]
``stall``           ``AT+LEN`` windows, ``:``-separated, from attach
                    time; completions inside a window are held to its
                    end (``stall=1s+200ms:5s+1s``)
``eio``             byte ranges ``START-END`` or ``START+LEN``,
                    ``:``-separated; overlapping requests fail
``eio-fraction``    this fraction of data requests fails (0..1)
``iops``/``bps``    a throttle: requests start no faster than this
``seed``            the random seed (default 0: runs repeat exactly)
==================  ==================================================
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from blockdev.raw_aio import (
    AioContextLike,
    AioType,
    CompletionCB,
    RawAIOCB,
    TimerLike,
)
from qiothread.errors import ConfigError

__all__ = ["FaultInjector", "FaultSpec", "parse_duration_ns", "parse_size"]

_UNITS_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration_ns(text: str) -> int:
    """``"200us"`` -> 200000; a bare number is nanoseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)?\s*", text)
    if m is None:
        raise ConfigError(f"invalid duration '{text}'")
    return round(float(m.group(1)) * _UNITS_NS[m.group(2) or "ns"])


def parse_size(text: str) -> int:
    """``"4k"`` -> 4096 (binary suffixes k, M, G, T; case-insensitive)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise ConfigError(f"invalid size '{text}'")
    return int(m.group(1)) * _SIZE[m.group(2)]


def _parse_ranges(text: str, size: bool) -> tuple[tuple[int, int], ...]:
    parse = parse_size if size else parse_duration_ns
    out = []
    for part in filter(None, text.split(":")):
        if "+" in part:
            a, n = part.split("+", 1)
            start = parse(a)
            out.append((start, start + parse(n)))
        elif "-" in part and size:
            a, b = part.split("-", 1)
            out.append((parse(a), parse(b)))
        else:
            raise ConfigError(f"invalid range '{part}'")
    return tuple(out)


def _parse_int(key: str, text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(
            f"Parameter 'faults.{key}' expects a non-negative integer")
    return n


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """What to inject (see the module docstring); all off by default."""

    latency_ns: int = 0
    jitter_ns: int = 0
    #: (start, end) ns after attach.
    stalls: tuple[tuple[int, int], ...] = ()
    #: (start, end) byte ranges.
    eio_ranges: tuple[tuple[int, int], ...] = ()
    eio_fraction: float = 0.0
    iops: int = 0
    bps: int = 0
    seed: int = 0

    @classmethod
    def from_options(cls, opts: Mapping[str, str]) -> FaultSpec:
        """Build from ``{"latency": "200us", ...}`` (keys as above)."""
        kw: dict[str, object] = {}
        for key, val in opts.items():
            if key == "latency":
                kw["latency_ns"] = parse_duration_ns(val)
            elif key == "jitter":
                kw["jitter_ns"] = parse_duration_ns(val)
            elif key == "stall":
                kw["stalls"] = _parse_ranges(val, size=False)
            elif key == "eio":
                kw["eio_ranges"] = _parse_ranges(val, size=True)
            elif key == "eio-fraction":
                try:
                    frac = float(val)
                except ValueError:
                    frac = -1.0
                if not 0.0 <= frac <= 1.0:
                    raise ConfigError(
                        "Parameter 'faults.eio-fraction' expects a "
                        "number between 0 and 1")
                kw["eio_fraction"] = frac
            elif key in ("iops", "bps", "seed"):
                kw[key] = (parse_size(val) if key == "bps"
                           else _parse_int(key, val))
            else:
                raise ConfigError(
                    f"Invalid parameter 'faults.{key}'")
        return cls(**kw)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Build from ``"latency=200us;eio=0+4096"``."""
        opts = {}
        for item in filter(None, text.split(";")):
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(f"invalid fault option '{item}'")
            opts[key.strip()] = val.strip()
        return cls.from_options(opts)


Submit = Callable[[RawAIOCB, CompletionCB], None]
_DATA_OPS = (AioType.READ, AioType.WRITE, AioType.DISCARD,
             AioType.WRITE_ZEROES)


class FaultInjector:
    """Applies a FaultSpec between a node and its engine.

    Iothread only (the attached context's thread).
    """

    def __init__(self, spec: FaultSpec, downstream: Submit) -> None:
        self.spec = spec
        self.downstream = downstream
        self.rng = random.Random(spec.seed)
        self.ctx: AioContextLike | None = None
        self.t0 = 0
        #: Requests waiting for the throttle, in submission order.
        self.throttled: deque[tuple[int, RawAIOCB, CompletionCB]] = deque()
        self.next_start_ns = 0
        #: Completions held back: (release_ns, seq, cb, ret).
        self.held: list[tuple[int, int, CompletionCB, int]] = []
        self.seq = itertools.count()
        self.throttle_timer: TimerLike | None = None
        self.release_timer: TimerLike | None = None
        #: Counters for reports and tests.
        self.injected_eio = 0
        self.delayed = 0

    def attach(self, ctx: AioContextLike) -> None:
        """Start in ``ctx``: its clock is the time base of the stalls."""
        self.ctx = ctx
        self.t0 = ctx.clock.now_ns()
        self.next_start_ns = self.t0
        self.throttle_timer = ctx.timer_new_ns(self._run_throttled)
        self.release_timer = ctx.timer_new_ns(self._release)
        # Work held over from a previous context resumes here.
        if self.throttled:
            self.throttle_timer.mod_ns(self.throttled[0][0])
        if self.held:
            self.release_timer.mod_ns(self.held[0][0])

    def detach(self) -> None:
        """Stop the timers; held and throttled requests wait for the
        next :meth:`attach`, which resumes them."""
        for t in (self.throttle_timer, self.release_timer):
            if t is not None:
                t.del_()
        self.throttle_timer = self.release_timer = None
        self.ctx = None

    def _now(self) -> int:
        assert self.ctx is not None
        return self.ctx.clock.now_ns()

    # -- submission: throttle, then EIO or the engine ------------------

    def submit(self, req: RawAIOCB, cb: CompletionCB) -> None:
        """Throttle, then fail or pass ``req`` on; delay its completion."""
        spec = self.spec
        if not (spec.iops or spec.bps):
            self._dispatch(req, cb)
            return
        now = self._now()
        start = max(now, self.next_start_ns)
        cost = 0.0
        if spec.iops:
            cost = max(cost, 1e9 / spec.iops)
        if spec.bps and req.nbytes:
            cost = max(cost, req.nbytes * 1e9 / spec.bps)
        self.next_start_ns = start + round(cost)
        if start <= now and not self.throttled:
            self._dispatch(req, cb)
            return
        self.throttled.append((start, req, cb))
        if len(self.throttled) == 1:
            assert self.throttle_timer is not None
            self.throttle_timer.mod_ns(start)

    def _run_throttled(self) -> None:
        now = self._now()
        while self.throttled and self.throttled[0][0] <= now:
            _, req, cb = self.throttled.popleft()
            self._dispatch(req, cb)
        if self.throttled:
            assert self.throttle_timer is not None
            self.throttle_timer.mod_ns(self.throttled[0][0])

    def _wants_eio(self, req: RawAIOCB) -> bool:
        spec = self.spec
        if req.type.op not in _DATA_OPS:
            return False
        end = req.offset + req.nbytes
        for lo, hi in spec.eio_ranges:
            if req.offset < hi and lo < end:
                return True
        return (spec.eio_fraction > 0.0
                and self.rng.random() < spec.eio_fraction)

    def _dispatch(self, req: RawAIOCB, cb: CompletionCB) -> None:
        def done(ret: int) -> None:
            self._complete(cb, ret)

        if self._wants_eio(req):
            self.injected_eio += 1
            assert self.ctx is not None
            self.ctx.bh_schedule_oneshot(lambda: done(-errno.EIO))
            return
        self.downstream(req, done)

    # -- completion: latency and stalls --------------------------------

    def _outside_stalls(self, t: int) -> int:
        """The first time at or after ``t`` that no stall window holds."""
        # Until no window holds t: the end of one window may fall inside
        # another one listed before it.
        moved = True
        while moved:
            moved = False
            for lo, hi in self.spec.stalls:
                if self.t0 + lo <= t < self.t0 + hi:
                    t = self.t0 + hi
                    moved = True
        return t

    def _release_time(self, now: int) -> int:
        spec = self.spec
        t = now + spec.latency_ns
        if spec.jitter_ns:
            t += self.rng.randint(0, spec.jitter_ns)
        return self._outside_stalls(t)

    def _complete(self, cb: CompletionCB, ret: int) -> None:
        now = self._now()
        t = self._release_time(now)
        if t <= now and not self.held:
            cb(ret)
            return
        self.delayed += 1
        heapq.heappush(self.held, (t, next(self.seq), cb, ret))
        assert self.release_timer is not None
        self.release_timer.mod_ns(self.held[0][0])

    def _release(self) -> None:
        now = self._now()
        # A timer fires late when the loop is busy (or a re-attach moved
        # t0): a completion due before a window must then still wait
        # for the window to end, not slip out in the middle of it.
        # Everything due waits together, so the heap order is kept.
        free = self._outside_stalls(now)
        if free > now:
            assert self.release_timer is not None
            self.release_timer.mod_ns(free)
            return
        while self.held and self.held[0][0] <= now:
            _, _, cb, ret = heapq.heappop(self.held)
            cb(ret)
        if self.held:
            assert self.release_timer is not None
            self.release_timer.mod_ns(self.held[0][0])
