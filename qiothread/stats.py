"""Polling statistics of one AioContext, readable live from elsewhere.

The loop counts what its polling did, so that a run can report it the
way people reason about ``poll-max-ns``: how long the budget sat at each
value, how often it grew and shrank, how many polling rounds found work
and how many ran out, how often the loop blocked, and how its time split
between polling and blocking.

The counters are signed 64-bit words of one buffer, written by the
context's home thread only.  By default the buffer is private; give the
context a slice of a shared mapping (a memfd every process maps) and the
main process reads the same words while the iothread runs.  An aligned
8-byte store is single-copy atomic on the CPUs we run on, so a reader
sees each counter whole; it may see one counter a step ahead of another,
which is harmless for statistics (no lock on the hot path).

Layout (``q`` words)::

    0        magic  0x5354415453414951 ("QIASTATS")
    1..      the counters named in FIELDS, in that order
    HIST..   64 buckets: ns spent with poll_ns in [2**(k-1), 2**k)
             (bucket 0: poll_ns == 0), i.e. poll_ns.bit_length() == k

The time-weighted distribution of ``poll_ns`` is accounted when the
value changes; :meth:`PollStats.snapshot` adds the still-open interval.
"""

from __future__ import annotations

import mmap
from typing import Any

__all__ = ["FIELDS", "HIST_BUCKETS", "STATS_SIZE", "PollStats"]

#: Counter names, in buffer order after the magic word.
FIELDS = (
    "iterations",          # aio_poll calls
    "poll_rounds",         # run_poll_handlers calls
    "poll_passes",         # passes over the poll handlers
    "poll_progress",       # rounds that found work
    "poll_notified",       # rounds ended by the ctx notifier alone
    "poll_timeouts",       # rounds that used up max_ns without a hit
    "blocking_waits",      # fd-monitor waits with a non-zero timeout
    "nonblocking_waits",   # fd-monitor waits with timeout 0
    "ns_polling",          # time inside run_poll_handlers
    "ns_blocked",          # time inside blocking fd-monitor waits
    "grow",                # poll_grow events
    "shrink",              # poll_shrink events
    "poll_ns",             # current value
    "poll_ns_since",       # clock ns when it took that value
    "poll_ns_time_sum",    # integral of poll_ns over time (ns * ns)
    "poll_ns_time_total",  # time covered by the integral
)
HIST_BUCKETS = 64
_HIST = 1 + len(FIELDS)
#: Bytes needed in a caller-supplied buffer.
STATS_SIZE = 8 * (_HIST + HIST_BUCKETS)
_MAGIC = 0x5354415453414951

# Word indexes for the hot path (plain ints: no enum lookups there).
ITERATIONS = 1
POLL_ROUNDS = 2
POLL_PASSES = 3
POLL_PROGRESS = 4
POLL_NOTIFIED = 5
POLL_TIMEOUTS = 6
BLOCKING_WAITS = 7
NONBLOCKING_WAITS = 8
NS_POLLING = 9
NS_BLOCKED = 10
GROW = 11
SHRINK = 12
POLL_NS = 13
POLL_NS_SINCE = 14
POLL_NS_TIME_SUM = 15
POLL_NS_TIME_TOTAL = 16
assert FIELDS[POLL_NS_TIME_TOTAL - 1] == "poll_ns_time_total"


class PollStats:
    """The counters of one context (home thread writes, anyone reads)."""

    __slots__ = ("_buf", "q")

    def __init__(self, buf: mmap.mmap | bytearray | None = None,
                 offset: int = 0, *, reset: bool = True) -> None:
        if buf is None:
            buf, offset = bytearray(STATS_SIZE), 0
        if offset % 8 or offset + STATS_SIZE > len(buf):
            raise ValueError(
                f"statistics need {STATS_SIZE} bytes at an 8-byte "
                f"aligned offset; got offset {offset} in {len(buf)}")
        self._buf = buf
        #: The words; index with the module constants.
        self.q = memoryview(buf)[offset:offset + STATS_SIZE].cast("q")
        if reset:
            for i in range(len(self.q)):
                self.q[i] = 0
            self.q[0] = _MAGIC
        elif self.q[0] != _MAGIC:
            raise ValueError("no poll statistics at this offset")

    @classmethod
    def attach(cls, buf: mmap.mmap | bytearray,
               offset: int = 0) -> PollStats:
        """A reader's view of statistics another process writes."""
        return cls(buf, offset, reset=False)

    def set_poll_ns(self, now_ns: int, new: int) -> None:
        """Account the time spent at the old value; switch to ``new``."""
        q = self.q
        old = q[POLL_NS]
        dt = now_ns - q[POLL_NS_SINCE]
        if dt > 0:
            q[_HIST + old.bit_length()] += dt
            q[POLL_NS_TIME_SUM] += old * dt
            q[POLL_NS_TIME_TOTAL] += dt
        q[POLL_NS_SINCE] = now_ns
        q[POLL_NS] = new

    def start(self, now_ns: int) -> None:
        """Begin the time accounting at ``now_ns`` (context creation)."""
        self.q[POLL_NS_SINCE] = now_ns

    def snapshot(self, now_ns: int | None = None) -> dict[str, Any]:
        """All counters as a dict, plus ``poll_ns_hist`` and the mean.

        With ``now_ns``, the interval since the last change of poll_ns
        is included in the distribution (without modifying the buffer).
        """
        q = self.q
        out: dict[str, Any] = {
            name: q[i + 1] for i, name in enumerate(FIELDS)}
        hist = {k: q[_HIST + k] for k in range(HIST_BUCKETS)
                if q[_HIST + k]}
        total, integral = out["poll_ns_time_total"], out["poll_ns_time_sum"]
        if now_ns is not None:
            dt = now_ns - out["poll_ns_since"]
            if dt > 0:
                k = out["poll_ns"].bit_length()
                hist[k] = hist.get(k, 0) + dt
                total += dt
                integral += out["poll_ns"] * dt
        #: bucket k -> ns spent with poll_ns.bit_length() == k
        out["poll_ns_hist"] = hist
        out["poll_ns_mean"] = integral / total if total else 0.0
        return out

    def close(self) -> None:
        self.q.release()
