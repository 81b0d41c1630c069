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
  in ``head``, newest submission first (``head`` is a QLIST that QEMU
  inserts at the front).  It reschedules itself before each callback so that a
  nested event loop inside the callback still sees later completions,
  and cancels that afterwards.
- Only a QUEUED element can be cancelled: it completes with -ECANCELED.

The interpreter lock (GIL), and what we do about it
---------------------------------------------------

A worker returning from ``preadv`` must take the GIL back before it can
mark its element DONE and schedule the BH.  A loop that spins in pure
Python never blocks, so it gives the GIL up only when a waiter has
waited a whole *switch interval* (5 ms by default) and raised the drop
request.  Measured here (``gil_bench.py --micro``): a worker's pread
seen by a pure-Python spin took 5.1 ms at the median; with one
GIL-releasing foreign call per spin it took 6 µs.  In an iothread that
means thread-pool completions land after the poll window, polling
stops paying off, and the loop blocks in ppoll for every request.

The mechanism: on its first request the pool registers its own poll
handler, on a private EventNotifier that is written only to (re)join
the poll set.  While the pool has requests outstanding and none has
finished, its
``io_poll`` makes one foreign call, ``getpid()``, through ctypes,
which releases the GIL for the length of the call, so a worker that
waits for the GIL takes it inside the poll window.  With nothing
outstanding it returns at once and costs nothing.  It also reports a
finished element as progress; the completion itself still goes through
QEMU's path (BH, ``aio_notify``), so the callback order is QEMU's.
This bends the "io_poll makes no syscall" rule on purpose, and only
for the thread pool: getpid is the cheapest syscall there is (it never
blocks or schedules) and nothing else releases the GIL that cheaply.

Figures (``python -m benchmarks.gil_bench --buffered``: a real
AioContext with poll-max-ns=32768, aio=threads, 4 KiB random reads
from the page cache so that the disk does not hide the effect, 2 busy
cores shared with other test suites, so read them as rough)::

    QD  mechanism                 IOPS  p50 us  p99 us  polled  waits/req
     1  none (5 ms interval)     14299    35.1   517.7     73%       0.24
     1  switch interval 50 us     7075    76.1  3310.9     45%       0.68
     1  io_poll sched_yield()    17143    31.0   434.2     94%       0.02
     1  io_poll getpid()         25020    31.9   152.0     90%       0.09
    32  none (5 ms interval)     43382   721.7  1255.8      -        0.00
    32  switch interval 50 us    18693  1427.6  7631.4      -        0.00
    32  io_poll getpid()         45238   660.1  1231.5      -        0.00

"polled" is the share of completions that polling found (so no ppoll
was needed); at QD32 the loop always has work and never polls or
blocks.  Lowering the switch interval, the obvious fix, halves the
throughput: every waiting thread then forces hand-overs, the iothread's
own included.  A second run under heavier load (load average 6) kept
the ranking at QD1: getpid 19653 IOPS, 84% polled; nothing 14923, 66%;
getpid with a 50 µs interval 7094 IOPS, 14% polled.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import errno
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from blockdev.per_context import PerContext
from blockdev.raw_aio import AioContextLike, BHLike, CompletionCB
from qiothread import trace_events as trace
from qiothread.defer_call import deferred_calls
from qiothread.event_notifier import EventNotifier

__all__ = [
    "DEFAULT_GIL_YIELD",
    "GIL_YIELDS",
    "IDLE_TIMEOUT_S",
    "THREAD_POOL_MAX_DEFAULT",
    "ThreadPool",
    "ThreadPoolElement",
    "ThreadPoolState",
    "aio_get_thread_pool",
    "aio_put_thread_pool",
    "set_thread_pool_params",
]

#: QEMU's default ``thread-pool-max`` (``THREAD_POOL_MAX_THREADS``).
THREAD_POOL_MAX_DEFAULT = 64
#: An idle worker leaves after this long without work (10 000 ms).
IDLE_TIMEOUT_S = 10.0
#: Which foreign call io_poll makes while requests are outstanding.
DEFAULT_GIL_YIELD = "getpid"
#: Re-announce the poll handler after this long without an io_poll.
_REJOIN_NS = 1_000_000_000


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


def _libc_fn(name: str) -> Callable[[], int]:
    f = ctypes.CDLL(None)[name]
    f.argtypes = []
    f.restype = ctypes.c_int
    return f


#: The foreign calls io_poll may make to let a worker take the GIL,
#: by name (gil_bench.py compares them).  ctypes releases the GIL
#: around every foreign call.
GIL_YIELDS: dict[str, Callable[[], object] | None] = {
    "none": None,
    "getpid": _libc_fn("getpid"),
    "sched_yield": os.sched_yield,
}
#: The one in use (see the module docstring for the figures).
gil_yield: Callable[[], object] | None = GIL_YIELDS[DEFAULT_GIL_YIELD]


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
        #: Home-thread list of every element not yet called back, newest
        #: first (QEMU inserts at the head of a QLIST), so the completion
        #: BH calls back the newest of the elements that are done first.
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
        #: Appended by workers as elements finish (deque appends are
        #: atomic); read and cleared by the home thread's io_poll.
        self.done_signal: collections.deque[ThreadPoolElement] = (
            collections.deque())
        self._last_io_poll_ns = 0
        #: Registered with the context on the first submit, so that a
        #: context whose nodes never use the pool carries no extra fd.
        self.poll_notifier: EventNotifier | None = None
        self.update_params(min_threads, max_threads)

    # -- home thread -------------------------------------------------

    def submit(self, func: Callable[[], int],
               cb: CompletionCB | None) -> ThreadPoolElement:
        """Run ``func`` on a worker; ``cb(ret)`` later in this context."""
        req = ThreadPoolElement(func, cb)
        self.head.insert(0, req)
        if trace.thread_pool_submit.enabled:
            trace.thread_pool_submit(self, req, cb)
        if (len(self.head) == 1
                and time.monotonic_ns() - self._last_io_poll_ns
                > _REJOIN_NS):
            # Polling has not looked at us lately: we are new, or were
            # dropped from the poll set as idle; a dispatch (re)adds us.
            if self.poll_notifier is None:
                self.poll_notifier = EventNotifier()
                self.ctx.set_event_notifier(
                    self.poll_notifier, self._poll_read, self._io_poll,
                    self._io_poll_ready)
            self.poll_notifier.set()
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
        self.done_signal.append(req)
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
            self.request_list.clear()
            self.request_cond.notify_all()
            self.worker_stopped.wait_for(
                lambda: self.cur_threads == 0, timeout_s)
        self.head.clear()
        self.done_signal.clear()
        if self.poll_notifier is not None:
            self.ctx.set_event_notifier(self.poll_notifier, None)
            self.poll_notifier.close()
            self.poll_notifier = None
        self.completion_bh.delete()
        self.new_thread_bh.delete()

    def _completion_bh(self) -> None:
        # QEMU 8.2+: one defer section per run of the BH, so deferred
        # guest notifications (poll-policy=8.2) cover the whole batch.
        with deferred_calls():
            self._complete_done()

    def _complete_done(self) -> None:
        restart = True
        while restart:
            restart = False
            for req in self.head:
                if req.state is not ThreadPoolState.DONE:
                    continue
                if trace.thread_pool_complete.enabled:
                    trace.thread_pool_complete(self, req, req.cb, req.ret)
                self.head.remove(req)
                self.done_signal.clear()
                if req.cb is not None:
                    # A nested aio_poll inside cb must still see the
                    # other completions: keep the BH armed meanwhile.
                    self.completion_bh.schedule()
                    req.cb(req.ret)
                    self.completion_bh.cancel()
                # head changed under the iteration (and cb may have
                # changed it more): scan again from the start.
                restart = True
                break

    # -- the GIL hand-over hook (see the module docstring) ------------

    def _poll_read(self) -> None:
        assert self.poll_notifier is not None
        self.poll_notifier.test_and_clear()

    def _io_poll(self) -> bool:
        if not self.head:
            return False
        self._last_io_poll_ns = time.monotonic_ns()
        if not self.done_signal:
            y = gil_yield
            if y is not None:
                y()
        return bool(self.done_signal)

    def _io_poll_ready(self) -> None:
        # The completion BH, scheduled by the worker, does the work.
        self.done_signal.clear()

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
        self.done_signal.append(req)
        self.completion_bh.schedule()


_params: weakref.WeakKeyDictionary[AioContextLike, tuple[int, int]] = (
    weakref.WeakKeyDictionary())


def _new_pool(ctx: AioContextLike) -> ThreadPool:
    lo, hi = _params.get(ctx, (0, THREAD_POOL_MAX_DEFAULT))
    return ThreadPool(ctx, lo, hi)


_pools: PerContext[AioContextLike, ThreadPool] = PerContext(
    _new_pool, ThreadPool.close)


def set_thread_pool_params(ctx: AioContextLike, min_threads: int,
                           max_threads: int) -> None:
    """``aio_context_set_thread_pool_params``: thread-pool-min/-max.

    Kept for the context's pool, created now or later; an existing pool
    is updated at once (``thread_pool_update_params``).  Home thread.
    """
    _params[ctx] = (min_threads, max_threads)
    pool = _pools.peek(ctx)
    if pool is not None:
        pool.update_params(min_threads, max_threads)


def aio_get_thread_pool(ctx: AioContextLike) -> ThreadPool:
    """The pool of ``ctx``, created on first use; counts a user."""
    return _pools.get(ctx)


def aio_put_thread_pool(ctx: AioContextLike) -> None:
    """Drop one user of the pool of ``ctx``; the last one frees it."""
    _pools.put(ctx)
