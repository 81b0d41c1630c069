#!/usr/bin/env python3
"""How long a worker thread waits for the GIL while the loop busy-polls.

The aio=threads pool runs in the iothread's process; while
``run_poll_handlers`` spins, a worker that returns from ``preadv`` needs
the GIL to complete its request.  CPython hands the GIL over after the
waiter has waited ``sys.getswitchinterval()``.  This measures, for the
default interval and for ``qiothread.aio.POLL_SWITCH_INTERVAL_S``, the
delay between a worker's wake-up from a 100 µs sleep and its next
Python statement, while the main thread polls one long round::

    .venv/bin/python scripts/bench_gil_polling.py
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qiothread.aio import POLL_SWITCH_INTERVAL_S, AioContext
from qiothread.event_notifier import EventNotifier


def measure(interval: float, steps: int = 300) -> list[float]:
    sys.setswitchinterval(interval)
    ctx = AioContext()
    e = EventNotifier()
    done = threading.Event()
    lat: list[float] = []

    def worker() -> None:
        for _ in range(steps):
            t = time.perf_counter()
            time.sleep(100e-6)          # the syscall, GIL released
            lat.append(time.perf_counter() - t - 100e-6)
        done.set()

    try:
        ctx.set_event_notifier(e, e.test_and_clear, done.is_set,
                               lambda: None)
        ctx.aio_poll(False)
        e.set()
        ctx.aio_poll(True)              # joins the poll set
        ctx.set_poll_params(120 * 10**9, 0, 0)
        ctx.aio_poll(False)
        ctx.poll_ns = 60 * 10**9
        t = threading.Thread(target=worker)
        t.start()
        ctx.aio_poll(True)              # spins until the worker is done
        t.join()
    finally:
        ctx.close()
        e.close()
    return lat


def main() -> None:
    old = sys.getswitchinterval()
    print(f"{'switch interval':>16} {'median us':>10} {'p99 us':>10} "
          f"{'max us':>10}")
    for iv in (old, POLL_SWITCH_INTERVAL_S):
        lat = sorted(x * 1e6 for x in measure(iv))
        p99 = lat[int(len(lat) * 0.99) - 1]
        print(f"{iv * 1e6:13.0f} us {statistics.median(lat):10.1f} "
              f"{p99:10.1f} {lat[-1]:10.1f}")
    sys.setswitchinterval(old)


if __name__ == "__main__":
    main()
