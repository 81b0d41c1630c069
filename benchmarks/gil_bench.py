"""Measure aio=threads under a polling iothread: the GIL hand-over problem.

Run: ``.venv/bin/python -m tests.blockdev.gil_bench [--seconds S]``

A real AioContext polls (QEMU's adaptive polling, ``poll-max-ns`` as
given) while a node with ``aio=threads,cache.direct=on`` serves 4 KiB
random reads from a prefilled image on disk at a fixed queue depth
(each completion submits the next request).  For each switch interval
it prints the completion latency (submit -> callback, median and p99),
how many completions polling found (the context notifier's io_poll saw
``notified`` inside the poll window) and how many times the loop had to
block in ppoll per request.  This is a measurement tool, not a test:
it asserts nothing and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from blockdev import thread_pool
from blockdev.images import create_pattern_image, real_disk_dir
from blockdev.options import open_blockdev
from qiothread.aio import AioContext
from qiothread.stats import (
    BLOCKING_WAITS,
    NS_POLLING,
    POLL_NOTIFIED,
    POLL_PROGRESS,
    POLL_ROUNDS,
)


def run(image: Path, qd: int, seconds: float, poll_max_ns: int,
        gil_yield: str, interval_s: float,
        direct: bool = True) -> dict[str, float]:
    sys.setswitchinterval(interval_s)
    thread_pool.gil_yield = thread_pool.GIL_YIELDS[gil_yield]
    ctx = AioContext(name="bench")
    ctx.set_poll_params(poll_max_ns, 0, 0)
    node = open_blockdev({"driver": "file", "filename": str(image),
                          "cache.direct": direct, "aio": "threads"})
    node.attach_aio_context(ctx)
    import mmap
    buf = memoryview(mmap.mmap(-1, qd * 4096))
    nblocks = node.length // 4096
    rng = random.Random(1)
    lat: list[int] = []
    state = {"stop": False, "inflight": 0}

    def submit(slot: int) -> None:
        t0 = time.monotonic_ns()
        state["inflight"] += 1

        def done(ret: int) -> None:
            assert ret == 0
            lat.append(time.monotonic_ns() - t0)
            state["inflight"] -= 1
            if not state["stop"]:
                submit(slot)
        node.preadv(rng.randrange(nblocks) * 4096,
                    [buf[slot * 4096:(slot + 1) * 4096]], done)

    for s in range(qd):
        submit(s)
    # Warm-up, then measure.
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        ctx.aio_poll(True)
    lat.clear()
    q = ctx.stats.q
    notified0 = q[POLL_NOTIFIED] + q[POLL_PROGRESS]
    waits0 = q[BLOCKING_WAITS]
    rounds0, polling0 = q[POLL_ROUNDS], q[NS_POLLING]
    t_start = time.monotonic()
    end = t_start + seconds
    while time.monotonic() < end:
        ctx.aio_poll(True)
    elapsed = time.monotonic() - t_start
    n = len(lat)
    polled = q[POLL_NOTIFIED] + q[POLL_PROGRESS] - notified0
    waits = q[BLOCKING_WAITS] - waits0
    rounds = q[POLL_ROUNDS] - rounds0
    polling_ns = q[NS_POLLING] - polling0
    state["stop"] = True
    while state["inflight"]:
        ctx.aio_poll(True)
    node.close()
    ctx.close()
    arr = np.array(lat) / 1000.0
    return {"iops": n / elapsed, "p50_us": float(np.percentile(arr, 50)),
            "p99_us": float(np.percentile(arr, 99)),
            "polled": polled / max(n, 1), "waits": waits / max(n, 1),
            "poll_us": polling_ns / max(rounds, 1) / 1000.0}


def micro(path: Path, n: int = 300) -> None:
    """A worker's pread seen by a spinning loop, with and without yield."""
    import ctypes
    import threading
    getpid = ctypes.CDLL(None).getpid
    fd = os.open(path, os.O_RDONLY)
    for name, spin in (("pure-Python spin", None),
                       ("spin + getpid() per pass", getpid)):
        flag = [0]
        go = threading.Event()
        lat: list[float] = []

        def worker(go: threading.Event = go,
                   flag: list[int] = flag) -> None:
            for _ in range(n):
                go.wait()
                go.clear()
                os.pread(fd, 4096, 0)
                flag[0] = time.perf_counter_ns()

        t = threading.Thread(target=worker)
        t.start()
        for _ in range(n):
            flag[0] = 0
            t0 = time.perf_counter_ns()
            go.set()
            while not flag[0]:
                if spin is not None:
                    spin()
            lat.append((flag[0] - t0) / 1000.0)
        t.join()
        arr = np.array(lat)
        print(f"{name:28} p50 {np.percentile(arr, 50):8.1f} us  "
              f"p99 {np.percentile(arr, 99):8.1f} us")
    os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--poll-max-ns", type=int, default=32768)
    ap.add_argument("--buffered", action="store_true",
                    help="page-cache reads (isolates the GIL from the "
                    "disk's latency)")
    ap.add_argument("--micro", action="store_true",
                    help="only the spin-versus-worker micro-benchmark")
    args = ap.parse_args()
    d = real_disk_dir("/var/tmp", Path(__file__).resolve().parents[2])
    image = d / f"gil-bench-{os.getpid()}.img"
    create_pattern_image(image, 4096 if args.micro else 256 << 20, seed=1)
    if args.micro:
        try:
            micro(image)
        finally:
            image.unlink()
        return
    default = sys.getswitchinterval()
    configs = [("no yield, 5 ms interval", "none", default),
               ("no yield, 50 us interval", "none", 50e-6),
               ("yield sched_yield", "sched_yield", default),
               ("yield getpid", "getpid", default),
               ("yield getpid, 50 us interval", "getpid", 50e-6)]
    try:
        mode = "buffered" if args.buffered else "O_DIRECT"
        print(f"poll-max-ns={args.poll_max_ns}, 4 KiB random reads, "
              f"aio=threads, {mode}")
        print(f"{'config':30} {'QD':>3} {'IOPS':>8} {'p50 us':>8} "
              f"{'p99 us':>8} {'polled':>7} {'waits/req':>9} "
              f"{'us/poll':>7}")
        for qd in (1, 32):
            for name, gil_yield, interval in configs:
                r = run(image, qd, args.seconds, args.poll_max_ns,
                        gil_yield, interval, not args.buffered)
                print(f"{name:30} {qd:3d} {r['iops']:8.0f} "
                      f"{r['p50_us']:8.1f} {r['p99_us']:8.1f} "
                      f"{r['polled']:7.0%} {r['waits']:9.2f} "
                      f"{r['poll_us']:7.1f}", flush=True)
    finally:
        sys.setswitchinterval(default)
        image.unlink()


if __name__ == "__main__":
    main()
