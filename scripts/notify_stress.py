#!/usr/bin/env python3
"""The lost-wake-up stress of aio_notify, at any length.

    .venv/bin/python scripts/notify_stress.py [--rounds N] [--fdmon M]
        [--processes P] [--threads T] [--no-barrier] [--repeat K]

Each round one notifier (a forked process or a thread of the poller's
process) calls ``aio_notify`` at a random moment against a blocking
``aio_poll``; a watchdog reports any wait past the deadline as a lost
wake-up.  See tests/qiothread/notify_stress.py for the design.
``--no-barrier`` runs notifiers whose aio_notify lacks the full barrier
between the store of ``notified`` and the load of ``notify_me``.
Exit status 1 if any wake-up was lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.qiothread.notify_stress import run_stress


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1_000_000)
    ap.add_argument("--fdmon", choices=["poll", "epoll", "both"],
                    default="both")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=5.0,
                    help="seconds a wait may last (default 5)")
    ap.add_argument("--no-barrier", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    mons = ["poll", "epoll"] if args.fdmon == "both" else [args.fdmon]
    lost = 0
    for i in range(args.repeat):
        for mon in mons:
            r = run_stress(mon, rounds=args.rounds,
                           processes=args.processes, threads=args.threads,
                           deadline_s=args.deadline,
                           barrier=not args.no_barrier,
                           seed=args.seed + i)
            lost += len(r.lost)
            print(f"{mon:5s} rounds {r.rounds} in {r.seconds:.1f} s "
                  f"({r.us_per_round:.1f} us/round), blocking waits "
                  f"{r.blocking_waits}, lost {len(r.lost)} {r.lost[:5]}, "
                  f"notifier errors {r.notifier_errors}", flush=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
