"""aio=threads: one worker pool per AioContext (QEMU's util/thread-pool.c).

The contract with the event loop (reference §9):

- ``submit`` runs in the context's home thread.  The element goes on a
  context-local list (``head``) in state QUEUED and on the shared FIFO
  (``request_list``) under the pool lock; a worker is spawned when none
  is idle and fewer than ``max_threads`` exist.  New workers are started
  from a BH in the pool's context (``new_thread_bh``), so they inherit
  the iothread's CPU affinity, and each new worker starts the next
  pending one.
- A worker pops the FIFO head (ACTIVE), runs the function without the
  lock, stores the result, then the state DONE, then schedules the
  completion BH.  Scheduling a BH from another thread is
  ``aio_notify``: it sets ``notified`` (which the context notifier's
  ``io_poll`` reads, so a polling loop sees the completion without a
  syscall) and writes the eventfd if the loop sleeps.
- A worker with nothing to do waits 10 s, then leaves if the pool has
  more than ``min_threads`` threads.  Workers are named ``worker``.
- The completion BH, in the home thread, calls back every DONE element
  in ``head``.  It reschedules itself before each callback so that a
  nested event loop inside the callback still sees later completions,
  and cancels that afterwards.
- Only a QUEUED element can be cancelled: it completes with -ECANCELED.

The interpreter lock (GIL), and what we do about it
---------------------------------------------------

A worker returning from ``preadv`` must take the GIL back before it can
mark its element DONE and schedule the BH.  An iothread in poll mode
never blocks: it runs Python bytecode without pause, so it gives the
GIL up only when a waiter has waited a whole *switch interval* and set
the drop request (5 ms by default).  A worker needs the GIL two or
three times on its way out (return from the syscall, the BH schedule,
the eventfd write), so one completion costs up to 10-15 ms, far past
any poll window (``poll-max-ns`` defaults to 32 µs); the polling loop
then never sees a thread-pool completion, shrinks its window and pays
the blocking path each time.

The mechanism chosen is :class:`GilHandover`: while any pool of the
process has work outstanding, the process's switch interval is lowered
(to :data:`BUSY_SWITCH_INTERVAL_S`), and the previous value comes back
as soon as the last request completes.  Only waiting threads trigger a
switch, so an idle pool costs nothing and a busy pool costs a few
forced hand-overs per request.  Alternatives measured and rejected:
yielding the GIL from ``io_poll`` (a ctypes no-op or ``sched_yield``)
does not force a hand-over, because the waiter has not yet raised its
drop request, and a syscall in ``io_poll`` breaks the polling contract;
a C helper that completes without the GIL would need a compiler at
install time.  The figures are in ``tests/blockdev/gil_bench.py`` and
in the docstring of :data:`BUSY_SWITCH_INTERVAL_S`.
"""

from __future__ import annotations

import collections
import enum
import errno
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from blockdev.raw_aio import AioContextLike, BHLike, CompletionCB
from qiothread import trace_events as trace

__all__ = [
    "BUSY_SWITCH_INTERVAL_S",
    "IDLE_TIMEOUT_S",
    "THREAD_POOL_MAX_DEFAULT",
    "GilHandover",
    "ThreadPool",
    "ThreadPoolElement",
    "ThreadPoolState",
    "aio_get_thread_pool",
    "aio_put_thread_pool",
]

#: QEMU's default ``thread-pool-max`` (``THREAD_POOL_MAX_THREADS``).
THREAD_POOL_MAX_DEFAULT = 64
#: An idle worker leaves after this long without work (10 000 ms).
IDLE_TIMEOUT_S = 10.0
#: The switch interval while a pool has work outstanding.  Measured on
#: this 2-core host with a busy-polling loop (``gil_bench.py``): the
#: median completion latency of a 4 KiB O_DIRECT read, QD1, went from
#: 10.1 ms at the default 5 ms to 0.12 ms at 50 µs; see the module
#: docstring for the table.
BUSY_SWITCH_INTERVAL_S = 50e-6


class ThreadPoolState(enum.Enum):
    """Where a pool element is (QEMU's ThreadPoolElementState)."""

    #: On ``request_list``, not yet taken by a worker; cancellable.
    QUEUED = 0
    #: A worker runs its function.
    ACTIVE = 1
    #: ``ret`` is valid; the completion BH will call back.
    DONE = 2


@dataclass(slots=True, eq=False)
class ThreadPoolElement:
    """One submitted function.

    ``state`` and ``ret`` are written by the worker (state last) and
    read by the home thread; everything else is home-thread only.
    """

    func: Callable[[], int]
    cb: CompletionCB | None
    state: ThreadPoolState = ThreadPoolState.QUEUED
    ret: int = 0
    #: Still counted by GilHandover (home thread only).
    counted: bool = True


class GilHandover:
    """Lower the switch interval while thread-pool work is outstanding.

    Process-wide (the interval is), counted across every pool of the
    process; any thread.
    """

    _lock = threading.Lock()
    _busy = 0
    _saved: float | None = None
    #: Set to False to measure the default behaviour (gil_bench.py).
    enabled = True

    @classmethod
    def begin(cls) -> None:
        with cls._lock:
            cls._busy += 1
            if cls._busy == 1 and cls.enabled:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(
                    min(cls._saved, BUSY_SWITCH_INTERVAL_S))

    @classmethod
    def end(cls) -> None:
        with cls._lock:
            cls._busy -= 1
            if cls._busy == 0 and cls._saved is not None:
                sys.setswitchinterval(cls._saved)
                cls._saved = None


class ThreadPool:
    """The worker pool of one AioContext.

    ``submit``, ``cancel``, ``update_params`` and ``close`` are home
    thread only; workers touch only the fields noted "under lock".
    """

    def __init__(self, ctx: AioContextLike, min_threads: int = 0,
                 max_threads: int = THREAD_POOL_MAX_DEFAULT,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.ctx = ctx
        self.idle_timeout_s = idle_timeout_s
        #: Home-thread list of every element not yet called back.
        self.head: list[ThreadPoolElement] = []
        self.completion_bh: BHLike = ctx.bh_new(
            self._completion_bh, "thread_pool_completion")
        self.new_thread_bh: BHLike = ctx.bh_new(
            self._spawn_thread_bh, "thread_pool_new_thread")
        self.lock = threading.Lock()
        self.request_cond = threading.Condition(self.lock)
        self.worker_stopped = threading.Condition(self.lock)
        # Under lock from here on.
        self.request_list: collections.deque[ThreadPoolElement] = (
            collections.deque())
        self.cur_threads = 0
        self.idle_threads = 0
        #: Threads counted in cur_threads but not yet started.
        self.new_threads = 0
        #: Threads being started right now (0 or 1).
        self.pending_threads = 0
        self.min_threads = min_threads
        self.max_threads = max_threads
        self.stopping = False
        self.update_params(min_threads, max_threads)

    # -- home thread -------------------------------------------------

    def submit(self, func: Callable[[], int],
               cb: CompletionCB | None) -> ThreadPoolElement:
        """Run ``func`` on a worker; ``cb(ret)`` later in this context."""
        req = ThreadPoolElement(func, cb)
        self.head.append(req)
        if trace.thread_pool_submit.enabled:
            trace.thread_pool_submit(self, req, cb)
        GilHandover.begin()
        with self.lock:
            if (self.idle_threads == 0
                    and self.cur_threads < self.max_threads):
                self._spawn_thread_locked()
            self.request_list.append(req)
            self.request_cond.notify()
        return req

    def cancel(self, req: ThreadPoolElement) -> bool:
        """Cancel a QUEUED element; it completes with -ECANCELED."""
        if trace.thread_pool_cancel.enabled:
            trace.thread_pool_cancel(req, req.cb)
        with self.lock:
            if req.state is not ThreadPoolState.QUEUED:
                return False
            self.request_list.remove(req)
            req.ret = -errno.ECANCELED
            req.state = ThreadPoolState.DONE
        self.completion_bh.schedule()
        return True

    def update_params(self, min_threads: int, max_threads: int) -> None:
        """Apply ``thread-pool-min``/``-max`` (QEMU's quirks kept).

        Spawns until ``min_threads`` exist and wakes surplus workers so
        that they notice ``cur_threads > max_threads`` and leave.
        """
        with self.lock:
            self.min_threads = min_threads
            self.max_threads = max(max_threads, 1)
            while self.cur_threads < self.min_threads:
                self._spawn_thread_locked()
            for _ in range(self.cur_threads - self.max_threads):
                self.request_cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every worker and wait for them (thread_pool_free).

        Queued work is dropped without callbacks, as when QEMU frees a
        context's pool; callers drain first.
        """
        with self.lock:
            self.stopping = True
            # Threads counted but never started will not start now.
            self.cur_threads -= self.new_threads
            self.new_threads = 0
            for req in self.request_list:
                self._release(req)
            self.request_list.clear()
            self.request_cond.notify_all()
            self.worker_stopped.wait_for(
                lambda: self.cur_threads == 0, timeout_s)
        for req in self.head:
            if req.state is ThreadPoolState.DONE:
                self._release(req)
        self.head.clear()
        self.completion_bh.delete()
        self.new_thread_bh.delete()

    def _completion_bh(self) -> None:
        restart = True
        while restart:
            restart = False
            for req in self.head:
                if req.state is not ThreadPoolState.DONE:
                    continue
                if trace.thread_pool_complete.enabled:
                    trace.thread_pool_complete(self, req, req.cb, req.ret)
                self.head.remove(req)
                self._release(req)
                if req.cb is not None:
                    # A nested aio_poll inside cb must still see the
                    # other completions: keep the BH armed meanwhile.
                    self.completion_bh.schedule()
                    req.cb(req.ret)
                    self.completion_bh.cancel()
                    restart = True
                    break

    @staticmethod
    def _release(req: ThreadPoolElement) -> None:
        if req.counted:
            req.counted = False
            GilHandover.end()

    def _spawn_thread_bh(self) -> None:
        with self.lock:
            self._do_spawn_thread_locked()

    # -- under lock --------------------------------------------------

    def _spawn_thread_locked(self) -> None:
        self.cur_threads += 1
        self.new_threads += 1
        # Start threads from the home thread (affinity), one at a time;
        # each new worker starts the next.
        if self.pending_threads == 0:
            self.new_thread_bh.schedule()

    def _do_spawn_thread_locked(self) -> None:
        if self.new_threads == 0 or self.stopping:
            return
        self.new_threads -= 1
        self.pending_threads += 1
        threading.Thread(target=self._worker, name="worker",
                         daemon=True).start()

    # -- worker threads ----------------------------------------------

    def _worker(self) -> None:
        with self.lock:
            self.pending_threads -= 1
            self._do_spawn_thread_locked()
            while (self.cur_threads <= self.max_threads
                   and not self.stopping):
                if not self.request_list:
                    self.idle_threads += 1
                    woken = self.request_cond.wait(self.idle_timeout_s)
                    self.idle_threads -= 1
                    if (not woken and not self.request_list
                            and self.cur_threads > self.min_threads):
                        break
                    continue
                req = self.request_list.popleft()
                req.state = ThreadPoolState.ACTIVE
                self.lock.release()
                try:
                    self._run(req)
                finally:
                    self.lock.acquire()
            self.cur_threads -= 1
            self.worker_stopped.notify_all()

    def _run(self, req: ThreadPoolElement) -> None:
        try:
            ret = req.func()
        except Exception:  # a bug in func: fail only this request
            ret = -errno.EIO
        req.ret = ret
        # ret before state: the home thread tests state, then reads ret.
        req.state = ThreadPoolState.DONE
        self.completion_bh.schedule()


_pools: dict[int, tuple[AioContextLike, ThreadPool, int]] = {}


def aio_get_thread_pool(ctx: AioContextLike) -> ThreadPool:
    """The pool of ``ctx``, created on first use; counts a user."""
    ent = _pools.get(id(ctx))
    if ent is None:
        pool = ThreadPool(ctx)
        _pools[id(ctx)] = (ctx, pool, 1)
        return pool
    _pools[id(ctx)] = (ent[0], ent[1], ent[2] + 1)
    return ent[1]


def aio_put_thread_pool(ctx: AioContextLike) -> None:
    """Drop one user of the pool of ``ctx``; the last one frees it."""
    ent = _pools.get(id(ctx))
    if ent is None:
        return
    if ent[2] > 1:
        _pools[id(ctx)] = (ent[0], ent[1], ent[2] - 1)
        return
    del _pools[id(ctx)]
    ent[1].close()
