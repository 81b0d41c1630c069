"""The lost-wake-up stress of ``aio_notify`` against a blocking aio_poll.

One round: the poller publishes the round number and hands a "go" to
one notifier (a process or a thread, round-robin), spins for a random
moment, then loops ``while posted < round + 1: aio_poll(True)``.  The
notifier, woken by its go, spins for another random moment, publishes
``posted = round + 1`` and calls ``aio_notify`` through the context's
:class:`~qiothread.notifier.AioNotifier` handle.  The two random spins
(0-30 µs each) land the notify anywhere in the poller's path: before
``notify_me`` is raised, between that and the ``notified`` check, or
during ppoll/epoll.

Only one notifier acts per round, so a lost wake-up cannot be rescued
by somebody else's notify: the poller would block for ever.  A watchdog
thread in the poller's process notices a wait longer than the deadline
with the round's notify already posted, records it, and rescues the
loop by writing the eventfd itself, so that the run completes and
reports how many wake-ups were lost.

With ``barrier=False`` the notifiers use a copy of ``aio_notify``
without the full barrier between storing ``notified`` and loading
``notify_me`` (for checking by hand that the test can catch that).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qiothread.aio import AioContext
from qiothread.barrier import SharedU64, close_mapping
from qiothread.notifier import _I_NOTIFIED, _I_NOTIFY_ME, AioNotifier

_ONE = (1).to_bytes(8, "little")


class UnfencedNotifier:
    """``aio_notify`` with the full barrier removed (for the hand check)."""

    def __init__(self, handle: AioNotifier) -> None:
        self._u32 = handle._u32
        self._set = handle._set

    def notify(self) -> None:
        u32 = self._u32
        u32[_I_NOTIFIED] = 1
        if u32[_I_NOTIFY_ME]:
            self._set()


@dataclass
class StressResult:
    rounds: int
    seconds: float
    lost: list[tuple[int, float]] = field(default_factory=list)
    blocking_waits: int = 0
    notifier_errors: int = 0

    @property
    def us_per_round(self) -> float:
        return self.seconds * 1e6 / max(1, self.rounds)


def _spin(n: int) -> None:
    for _ in range(n):
        pass


def _notifier_loop(go_fd: int, shm: mmap.mmap, handle: object,
                   seed: int, max_spin: int) -> None:
    posted = SharedU64(shm, 0)
    rnd = SharedU64(shm, 8)
    stop = SharedU64(shm, 16)
    notify = handle.notify                    # type: ignore[attr-defined]
    spins = random.Random(seed)
    while True:
        os.read(go_fd, 8)
        if stop.load():
            return
        r = rnd.load()
        _spin(spins.randrange(max_spin))
        posted.store(r + 1)
        notify()


def _process_main(go_fd: int, shm: mmap.mmap, handle: object, seed: int,
                  max_spin: int) -> None:
    try:
        _notifier_loop(go_fd, shm, handle, seed, max_spin)
    except BaseException:
        SharedU64(shm, 24).fetch_add(1)     # notifier errors
        raise


def run_stress(fdmon: str = "poll", rounds: int = 100_000,
               processes: int = 2, threads: int = 2,
               deadline_s: float = 10.0, barrier: bool = True,
               seed: int = 1, max_spin: int = 600,
               make_handle: Callable[[AioContext], object] | None = None,
               ) -> StressResult:
    """Run the stress; returns what happened (never hangs).

    ``make_handle`` replaces the notifiers' handle (tests of the
    harness itself).
    """
    ctx = AioContext(fdmon=fdmon)
    shm = mmap.mmap(-1, 4096)
    posted, rnd, stop = SharedU64(shm, 0), SharedU64(shm, 8), SharedU64(
        shm, 16)
    errors = SharedU64(shm, 24)
    handle: object = ctx.remote_handle()
    if not barrier:
        handle = UnfencedNotifier(ctx.remote_handle())
    if make_handle is not None:
        handle = make_handle(ctx)
    n = processes + threads
    gos = [os.eventfd(0) for _ in range(n)]   # blocking: notifiers sleep
    procs: list[multiprocessing.process.BaseProcess] = []
    ths: list[threading.Thread] = []
    result = StressResult(rounds=0, seconds=0.0)
    in_poll = [0.0]                           # monotonic start, 0 = no
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.05):
            since = in_poll[0]
            if since and time.monotonic() - since > deadline_s and (
                    posted.load() > rnd.load()):
                result.lost.append((rnd.load(), time.monotonic() - since))
                in_poll[0] = 0.0
                ctx.notifier.set()            # rescue the loop

    try:
        mp = multiprocessing.get_context("fork")
        for i in range(processes):
            p = mp.Process(target=_process_main,
                           args=(gos[i], shm, handle, seed * 1000 + i,
                                 max_spin), daemon=True)
            p.start()
            procs.append(p)
        for i in range(processes, n):
            t = threading.Thread(target=_notifier_loop,
                                 args=(gos[i], shm, handle,
                                       seed * 1000 + i, max_spin),
                                 daemon=True)
            t.start()
            ths.append(t)
        wd = threading.Thread(target=watchdog, daemon=True)
        wd.start()
        ctx.aio_poll(False)
        spins = random.Random(seed)
        waits0 = ctx.stats.snapshot()["blocking_waits"]
        start = time.monotonic()
        for r in range(rounds):
            rnd.store(r)
            os.write(gos[r % n], _ONE)
            _spin(spins.randrange(max_spin))
            target = r + 1
            while posted.load() < target:
                in_poll[0] = time.monotonic()
                ctx.aio_poll(True)
            in_poll[0] = 0.0
        result.seconds = time.monotonic() - start
        result.rounds = rounds
        result.blocking_waits = (ctx.stats.snapshot()["blocking_waits"]
                                 - waits0)
    finally:
        done.set()
        stop.store(1)
        for g in gos:
            os.write(g, _ONE)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for t in ths:
            t.join(10)
        result.notifier_errors = errors.load() + sum(
            1 for p in procs if p.exitcode not in (0, None))
        for g in gos:
            os.close(g)
        ctx.close()
        close_mapping(shm)
    return result
