#!/usr/bin/env python3
"""How long one userspace polling pass and one aio_poll iteration take.

A polling pass is one walk over the poll handlers inside
``run_poll_handlers`` plus the clock read and the loop test; that is
what bounds how fast the loop notices work in poll mode.  Run::

    .venv/bin/python scripts/bench_poll_round.py [--seconds S]

and it prints, for 1, 2, 4 and 8 pollable handlers (each ``io_poll`` a
bound method reading one word of a shared mapping, as virtio's ring
check does), the ns per pass, and the µs of a whole non-blocking
``aio_poll`` that finds nothing.
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier


class Ring:
    """io_poll of a ring in shared memory: one aligned load."""

    def __init__(self, buf: mmap.mmap, index: int) -> None:
        self._w = memoryview(buf).cast("I")
        self._i = index

    def io_poll(self) -> bool:
        return self._w[self._i] != 0

    def ready(self) -> None:
        self._w[self._i] = 0

    def close(self) -> None:
        self._w.release()


def bench(nhandlers: int, seconds: float) -> tuple[float, float]:
    ctx = AioContext()
    buf = mmap.mmap(-1, 4096)
    notifiers = [EventNotifier() for _ in range(nhandlers)]
    rings = [Ring(buf, i) for i in range(nhandlers)]
    try:
        for e, r in zip(notifiers, rings, strict=True):
            ctx.set_event_notifier(e, e.test_and_clear, r.io_poll, r.ready)
            e.set()
        ctx.aio_poll(False)
        ctx.aio_poll(True)              # all dispatched: all polled now
        assert len(ctx._poll_pairs) >= nhandlers
        budget = int(seconds * 1e9)
        ctx.set_poll_params(2 * budget, 0, 0)
        ctx.aio_poll(False)
        ctx.poll_ns = budget
        # One long polling round that finds nothing: the timer below
        # ends it (the deadline caps max_ns).
        t = ctx.timer_new_ns(lambda: None)
        t.mod_ns(ctx.clock.now_ns() + budget)
        ctx.notify_accept()
        s0 = ctx.stats.snapshot()
        ctx.aio_poll(True)
        s1 = ctx.stats.snapshot()
        passes = s1["poll_passes"] - s0["poll_passes"]
        ns_per_pass = (s1["ns_polling"] - s0["ns_polling"]) / passes
        # Whole iterations: non-blocking, nothing to do.
        n = 20000
        start = time.perf_counter_ns()
        for _ in range(n):
            ctx.aio_poll(False)
        us_per_iter = (time.perf_counter_ns() - start) / n / 1000
        return ns_per_pass, us_per_iter
    finally:
        ctx.close()
        for e in notifiers:
            e.close()
        for r in rings:
            r.close()
        buf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5,
                    help="length of the polling round (default 0.5)")
    args = ap.parse_args()
    print(f"{'handlers':>8} {'ns/pass':>9} {'us/aio_poll(False)':>19}")
    for n in (1, 2, 4, 8):
        ns, us = bench(n, args.seconds)
        print(f"{n:8d} {ns:9.0f} {us:19.2f}")


if __name__ == "__main__":
    main()
