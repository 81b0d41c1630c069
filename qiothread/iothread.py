"""IOThread: ``-object iothread``, one AioContext in a process of its own.

QEMU's IOThread (``iothread.c``, ``event-loop-base.c``; reference §8)
is a QOM object that owns an AioContext and a host thread running
``while running: aio_poll(ctx, true)``.  Here the thread is a process
(DESIGN.md: the GIL would otherwise make every busy-polling iothread a
lock on all the others), forked by :class:`~qiothread.process.Supervisor`
with the comm name ``IO <id>`` that QEMU gives its thread.

What crosses the process boundary, and how:

- *The context itself* is built in the main process before the fork,
  as ``iothread_init`` does before it creates the thread: the parameters
  are applied to it, and the child inherits it whole, eventfd and all.
  The main process keeps only :meth:`AioContext.remote_handle`, the
  cross-process ``aio_notify``; it never runs the copy it holds.
- *Parameter changes* (``qom-set``) go through a small shared parameter
  block and ``aio_notify``, never through an fd handler: a handler
  without ``io_poll`` would raise ``poll_disable_cnt`` and turn polling
  off for the whole context (reference §2), changing what is measured.
  The main process writes the values under a sequence lock (the count
  is odd while it writes) and then notifies.  The loop looks at the
  count in :attr:`AioContext.after_wait`, right after the wait of every
  ``aio_poll`` and before the notify is accepted and ``poll_ns`` is
  adapted, copies the values and applies them with ``set_poll_params``
  (which resets ``poll_ns`` to 0) and ``set_aio_params``.  That is where
  QEMU's change lands too: its main thread resets ``ctx->poll_ns``
  itself before notifying, so the iteration the notify wakes adapts
  from 0 (``poll_shrink ... old 0 new 0`` after an idle block), and the
  notify of ``set_poll_params`` is accepted by that same iteration
  instead of making the next one non-blocking.  The Dekker pair of the
  notify (see :mod:`qiothread.notifier`) makes the wake-up impossible
  to lose: a count stored before ``notified`` is visible to the loop
  once it has seen ``notified``.
- *Stop* is QEMU's ``iothread_stop``: the request travels the same way
  (a stop word plus ``aio_notify``), and the loop answers it by
  scheduling a oneshot BH that clears ``running``; the next ``aio_poll``
  runs it and the loop ends, the process exits 0.  A child that does not
  stop within the timeout is killed.
- *Statistics* and the thread id: the context's
  :class:`~qiothread.stats.PollStats` live in the same shared mapping,
  so the main process reads them live; the thread id also comes back in
  the ready handshake (``query-iothreads``' ``thread-id``).

Shared parameter block (int64 words at offset 0 of the mapping)::

    0  magic           5  aio-max-batch      10  applied at, ns   (child)
    1  seq             6  thread-pool-min    11  thread id        (child)
    2  poll-max-ns     7  thread-pool-max    12  poll_disable_cnt (child)
    3  poll-grow       8  stop requested     13  fd handlers      (child)
    4  poll-shrink     9  applied seq (child)
    14..19  the values the loop runs with, in the order of words 2-7,
            read back from its context after applying (child)
    20  poll-weight (qiothread's weighted policy)   21  its mirror (child)

then the context's control block at byte 256 and its statistics at 512.
Words 0-8 are written by the main process only, 9-13 by the iothread
only; ``seq`` and ``stop`` go through :class:`~qiothread.barrier.
SharedU64` (each access a full barrier).
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from blockdev.thread_pool import set_thread_pool_params
from qiothread.aio import AioContext
from qiothread.barrier import SharedU64, close_mapping, full_barrier
from qiothread.errors import ConfigError, InternalError
from qiothread.notifier import CONTROL_BLOCK_SIZE, AioNotifier, ControlBlock
from qiothread.policies import (
    POLICY_NAMES,
    POLL_WEIGHT_MAX,
    PolicyWeighted,
    make_policy_from_props,
)
from qiothread.policy import PollPolicy
from qiothread.process import Child, ChildState, ReadyChannel, Supervisor
from qiothread.qom import Int64Property, ObjectRoot, StrProperty, UserCreatable
from qiothread.stats import STATS_SIZE, PollStats

__all__ = [
    "IOTHREAD_POLL_MAX_NS_DEFAULT",
    "STOP_TIMEOUT_S",
    "THREAD_POOL_MAX_DEFAULT",
    "EventLoopBase",
    "IOThread",
    "check_thread_pool_params",
]

log = logging.getLogger(__name__)

#: ``IOTHREAD_POLL_MAX_NS_DEFAULT`` on POSIX hosts.
IOTHREAD_POLL_MAX_NS_DEFAULT = 32768
#: ``THREAD_POOL_MAX_THREADS_DEFAULT``.
THREAD_POOL_MAX_DEFAULT = 64
_INT_MAX = (1 << 31) - 1

# Word indexes of the parameter block.
_MAGIC, _SEQ = 0, 1
_POLL_MAX_NS, _POLL_GROW, _POLL_SHRINK = 2, 3, 4
_AIO_MAX_BATCH, _POOL_MIN, _POOL_MAX = 5, 6, 7
_STOP = 8
_APPLIED_SEQ, _APPLIED_NS, _THREAD_ID = 9, 10, 11
_POLL_DISABLE_CNT, _NR_HANDLERS = 12, 13
_RUNNING_WITH = 14                          # 14..19 mirror words 2..7
_POLL_WEIGHT, _RUNNING_WEIGHT = 20, 21      # poll-weight, its mirror
_PARAM_WORDS = 32
_BLOCK_MAGIC = 0x4451485449514F49          # "IOQITHQD"
_CONTROL_OFFSET = 256
_STATS_OFFSET = 512
assert _PARAM_WORDS * 8 <= _CONTROL_OFFSET
assert _CONTROL_OFFSET + CONTROL_BLOCK_SIZE <= _STATS_OFFSET
_MAPPING_SIZE = -(-(_STATS_OFFSET + STATS_SIZE) // mmap.PAGESIZE) \
    * mmap.PAGESIZE

#: How long :meth:`IOThread.stop` waits before it kills the process.
STOP_TIMEOUT_S = 10.0


def check_thread_pool_params(pool_min: int, pool_max: int) -> None:
    """``aio_context_set_thread_pool_params``' rule.

    :raises ConfigError: ``bad thread-pool-min/thread-pool-max values``
        when min > max, max == 0, or either exceeds INT_MAX.
    """
    if (pool_min > pool_max or pool_max == 0 or pool_min > _INT_MAX
            or pool_max > _INT_MAX):
        raise ConfigError("bad thread-pool-min/thread-pool-max values")


class EventLoopBase(UserCreatable):
    """QEMU's ``EventLoopBase``: the properties every event loop has.

    Its setters store the value and then re-apply *all* parameters
    (:meth:`update_params`), so a change of ``aio-max-batch`` resets
    ``poll_ns`` too, and a bad thread-pool pair is refused after it was
    stored (reference §8.1).
    """

    BASE_PROPERTIES: ClassVar[tuple[Int64Property, ...]] = (
        Int64Property("aio-max-batch", 0),
        Int64Property("thread-pool-min", 0),
        Int64Property("thread-pool-max", THREAD_POOL_MAX_DEFAULT),
    )
    _BASE_NAMES: ClassVar[frozenset[str]] = frozenset(
        p.name for p in BASE_PROPERTIES)

    def property_updated(self, name: str) -> None:
        if name in self._BASE_NAMES:
            self.update_params()

    def update_params(self) -> None:
        """Hook: apply every parameter to the running loop, if any.

        :raises ConfigError: the thread-pool bounds are bad.
        """


class IOThread(EventLoopBase):
    """``-object iothread,id=ID,...``: a process running one AioContext.

    Main-process object; its methods are for the main process's thread
    that owns the run (or QMP's worker), one call at a time.  The
    ``_loop_*`` methods run in the iothread process only.
    """

    TYPE = "iothread"
    _POLL_PROPERTIES: ClassVar[tuple[Int64Property, ...]] = (
        Int64Property("poll-max-ns", IOTHREAD_POLL_MAX_NS_DEFAULT),
        Int64Property("poll-grow", 0),
        Int64Property("poll-shrink", 0),
        # qiothread extensions (issue 7; qiothread.policies): the
        # weighted proposal's weight and the QEMU version's policy.
        Int64Property("poll-weight", 0),
    )
    STR_PROPERTIES: ClassVar[tuple[StrProperty, ...]] = (
        StrProperty("poll-policy", "7.2", POLICY_NAMES),)
    HIDDEN: ClassVar[frozenset[str]] = frozenset(
        {"poll-weight", "poll-policy"})
    # QAPI visits the base (EventLoopBaseProperties) members first.
    PROPERTIES = EventLoopBase.BASE_PROPERTIES + _POLL_PROPERTIES
    QOM_LIST_ORDER = ("thread-pool-min", "aio-max-batch", "thread-pool-max",
                      "poll-max-ns", "poll-grow", "poll-shrink")

    def __init__(self, object_id: str, *,
                 supervisor: Supervisor | None = None,
                 fdmon: str = "poll", policy: str = "7.2",
                 start_on_complete: bool = True) -> None:
        super().__init__(object_id)
        self._strs["poll-policy"] = policy
        self._supervisor = supervisor
        self._own_supervisor = False
        self._fdmon = fdmon
        self._start_on_complete = start_on_complete
        self._setup: list[Callable[[AioContext], None]] = []
        self._lock = threading.Lock()
        #: The context (built in :meth:`start`; run by the child only).
        self.ctx: AioContext | None = None
        self._notifier: AioNotifier | None = None
        self._map: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._seq: SharedU64 | None = None
        self._stop_word: SharedU64 | None = None
        self._stats: PollStats | None = None
        self._control: ControlBlock | None = None
        #: The iothread process, once started.
        self.child: Child | None = None
        #: OS thread id of the loop; -1 until started (QEMU's default).
        self.thread_id = -1
        #: Devices whose queues this iothread serves; ``object-del`` is
        #: refused while there are any.
        self.users = 0
        # Iothread process only.
        self._running = False
        self._stop_scheduled = False
        self._applied_seq = 0
        #: (thread-pool-min, thread-pool-max) in force in the loop.
        self._pool = (0, THREAD_POOL_MAX_DEFAULT)

    @classmethod
    def new(cls, object_id: str, root: ObjectRoot) -> IOThread:
        return cls(object_id, supervisor=root.supervisor,
                   **root.type_options.get(cls.TYPE, {}))

    # -- properties -----------------------------------------------------

    def set(self, name: str, value: int) -> None:
        if name == "poll-weight" and value > POLL_WEIGHT_MAX:
            raise ConfigError(
                f"poll-weight value must be in range [0, {POLL_WEIGHT_MAX}]")
        super().set(name, value)

    def set_str(self, name: str, value: str) -> None:
        if name == "poll-policy" and self.ctx is not None:
            raise ConfigError(
                "qiothread: poll-policy can only be set when the iothread "
                "is created")
        super().set_str(name, value)

    def _make_policy(self) -> PollPolicy:
        """The policy of ``poll-policy`` with ``poll-weight``."""
        return make_policy_from_props(self.get_str("poll-policy"),
                                      self.get("poll-weight"))

    def property_updated(self, name: str) -> None:
        if name == "poll-policy":
            return                      # read when the context is built
        if name in self._BASE_NAMES:
            self.update_params()
        elif self.ctx is not None:
            # iothread_set_poll_param: only the poll parameters.
            self._publish(pool=False)

    def update_params(self) -> None:
        """``iothread_set_aio_context_params``: poll, batch, pool.

        Poll and batch parameters are applied even when the pool pair
        is then refused, whose previous values stay in force.
        """
        if self.ctx is None:
            return
        try:
            check_thread_pool_params(self.get("thread-pool-min"),
                                     self.get("thread-pool-max"))
        except ConfigError:
            self._publish(pool=False)
            raise
        self._publish(pool=True)

    def complete(self) -> None:
        """``iothread_init``: check the pool bounds, then start."""
        check_thread_pool_params(self.get("thread-pool-min"),
                                 self.get("thread-pool-max"))
        super().complete()
        if self._start_on_complete:
            self.start()

    def can_be_deleted(self) -> bool:
        return self.users == 0

    # -- life cycle (main process) ---------------------------------------

    def on_start(self, fn: Callable[[AioContext], None]) -> None:
        """Run ``fn(ctx)`` in the iothread process before its loop.

        For what must live in the iothread's context (a device's host
        notifiers, a backend's completion fd).  Only before start.
        """
        if self.child is not None:
            raise InternalError(f"iothread {self.id!r} already started")
        self._setup.append(fn)

    def start(self) -> None:
        """Build the context, fork the process, wait for its thread id.

        :raises ChildProcessError_: the process died or hung at start.
        """
        if self.child is not None:
            raise InternalError(f"iothread {self.id!r} already started")
        if self._supervisor is None:
            self._supervisor = Supervisor()
            self._own_supervisor = True
        self._map = mmap.mmap(-1, _MAPPING_SIZE, mmap.MAP_SHARED)
        words = memoryview(self._map)[:_PARAM_WORDS * 8].cast("q")
        self._words = words
        words[_MAGIC] = _BLOCK_MAGIC
        self._seq = SharedU64(self._map, _SEQ * 8)
        self._stop_word = SharedU64(self._map, _STOP * 8)
        self._stats = PollStats(self._map, _STATS_OFFSET)
        self._control = ControlBlock(self._map, _CONTROL_OFFSET)
        # No epoll upgrade: a 7.2 IOThread's context has no epoll fd
        # (io_uring took its place, then lost it to the GSource).
        self.ctx = AioContext(
            fdmon=self._fdmon, epoll_upgrade=False,
            policy=self._make_policy(), name=self.id,
            control_block=self._control, stats=self._stats)
        self._notifier = self.ctx.remote_handle()
        # The loop applies these before it starts, as iothread_init does
        # before it creates the thread.
        self._write_params(pool=True)
        sup = self._supervisor
        try:
            self.child = sup.start(
                f"iothread '{self.id}'", self._loop_main,
                comm=f"IO {self.id}", stop_request=self._request_stop)
        except BaseException:
            # Interrupted (Ctrl-C) after the fork: keep hold of our
            # child so that finalize stops it now, while the parameter
            # block its stop request goes through still exists.
            for c in sup.children:
                if (c._stop_request == self._request_stop
                        and c.returncode is None):
                    self.child = c
            raise
        self.thread_id = int(self.child.info["thread_id"])

    def _write_params(self, pool: bool) -> None:
        """Store the parameters under the sequence lock (main process)."""
        words, seq = self._words, self._seq
        assert words is not None and seq is not None
        with self._lock:
            seq.fetch_add(1)            # odd: a write is under way
            words[_POLL_MAX_NS] = self.get("poll-max-ns")
            words[_POLL_GROW] = self.get("poll-grow")
            words[_POLL_SHRINK] = self.get("poll-shrink")
            words[_AIO_MAX_BATCH] = self.get("aio-max-batch")
            words[_POLL_WEIGHT] = self.get("poll-weight")
            if pool:
                words[_POOL_MIN] = self.get("thread-pool-min")
                words[_POOL_MAX] = self.get("thread-pool-max")
            seq.fetch_add(1)            # even: consistent again

    def _publish(self, pool: bool) -> None:
        """New parameters for the running loop: store, then notify."""
        self._write_params(pool)
        assert self._notifier is not None
        self._notifier.notify()

    def _request_stop(self, child: Child) -> None:
        """``iothread_stop``'s request: the loop answers with a BH."""
        assert self._stop_word is not None and self._notifier is not None
        self._stop_word.store(1)
        self._notifier.notify()

    @property
    def alive(self) -> bool:
        """The process is running (False before start and after exit)."""
        return self.child is not None and self.child.alive

    def check(self) -> None:
        """:raises ChildProcessError_: the process died while it was
        meant to run (a crash, a kill -9)."""
        child = self.child
        if child is None or child.state is not ChildState.RUNNING:
            return
        if child.poll() is not None:
            raise child.error()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the loop (oneshot BH), reap the process.

        Returns the exit status (0 for a clean stop) or None if the
        iothread never started.
        """
        if self.child is None:
            return None
        assert self._supervisor is not None
        return self._supervisor.stop(self.child, timeout)

    def finalize(self) -> None:
        """Stop and release everything (``object-del``, end of run)."""
        try:
            was_ready = self.child is not None and bool(self.child.info)
            rc = self.stop()
            # (One interrupted before it was ready is killed: no news.)
            if rc not in (None, 0) and was_ready:
                # A crash was (or will be) reported by check(); this
                # only leaves a trace in the log of how it ended.
                assert self.child is not None
                log.warning("did not stop cleanly: %s", self.child.error())
        finally:
            self._release()

    def _release(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self._notifier = None
        self._seq = self._stop_word = None
        if self._control is not None:
            self._control.close()   # our mapping: releases views only
            self._control = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._map is not None:
            close_mapping(self._map)
            self._map = None
        if self._own_supervisor and self._supervisor is not None:
            self._supervisor.close()

    # -- what the main process reads --------------------------------------

    def poll_stats(self) -> dict[str, Any]:
        """The loop's polling statistics now (``PollStats.snapshot``)."""
        if self._stats is None:
            raise InternalError(f"iothread {self.id!r} is not running")
        return self._stats.snapshot(time.monotonic_ns())

    def loop_state(self) -> dict[str, int]:
        """What the loop last reported after applying parameters."""
        words = self._words
        if words is None:
            raise InternalError(f"iothread {self.id!r} is not running")
        return {
            "seq": words[_SEQ],
            "applied_seq": words[_APPLIED_SEQ],
            "params_applied_ns": words[_APPLIED_NS],
            "thread_id": words[_THREAD_ID],
            "poll_disable_cnt": words[_POLL_DISABLE_CNT],
            "fd_handlers": words[_NR_HANDLERS],
            "poll_max_ns": words[_RUNNING_WITH],
            "poll_grow": words[_RUNNING_WITH + 1],
            "poll_shrink": words[_RUNNING_WITH + 2],
            "aio_max_batch": words[_RUNNING_WITH + 3],
            "thread_pool_min": words[_RUNNING_WITH + 4],
            "thread_pool_max": words[_RUNNING_WITH + 5],
            "poll_weight": words[_RUNNING_WEIGHT],
        }

    def info(self) -> dict[str, Any]:
        """``query-iothreads``' entry for this iothread."""
        return {
            "id": self.id,
            "thread-id": self.thread_id,
            "poll-max-ns": self.get("poll-max-ns"),
            "poll-grow": self.get("poll-grow"),
            "poll-shrink": self.get("poll-shrink"),
            "aio-max-batch": self.get("aio-max-batch"),
        }

    # -- the iothread process ---------------------------------------------

    def _loop_main(self, channel: ReadyChannel) -> None:
        """``iothread_run``, in the iothread process."""
        ctx = self.ctx
        assert ctx is not None and self._words is not None
        for fn in self._setup:
            fn(ctx)
        # Changes made between the fork and now are picked up here.
        self._loop_apply_params(ctx)
        tid = threading.get_native_id()
        self._words[_THREAD_ID] = tid
        channel.ready(thread_id=tid)

        words = self._words

        def after_wait() -> None:
            if words[_SEQ] != self._applied_seq or (
                    words[_STOP] and not self._stop_scheduled):
                self._loop_apply_params(ctx)

        ctx.after_wait = after_wait
        # Everything made so far (modules, the context, the devices)
        # lives as long as the loop: out of the collector's sight, a
        # full collection scans only what requests allocate (it took
        # ~15 ms a time, every few thousand requests, at QD32).
        gc.freeze()
        self._running = True
        while self._running:
            ctx.aio_poll(True)

    def _loop_stop_bh(self) -> None:
        self._running = False

    def _loop_apply_params(self, ctx: AioContext) -> None:
        """Copy consistent parameters out of the block and apply them."""
        words, seq, stop = self._words, self._seq, self._stop_word
        assert words is not None and seq is not None and stop is not None
        if stop.load() and not self._stop_scheduled:
            # Once: the BH clears running; the loop ends after the
            # aio_poll that runs it.
            self._stop_scheduled = True
            ctx.bh_schedule_oneshot(self._loop_stop_bh, "iothread_stop")
        while True:
            before = seq.load()
            if before == self._applied_seq:
                return
            if before & 1:
                os.sched_yield()    # the main process is mid-write
                continue
            vals = [words[i] for i in range(_POLL_MAX_NS, _POOL_MAX + 1)]
            weight = words[_POLL_WEIGHT]
            full_barrier()          # the copies above before the re-check
            if seq.load() == before:
                break
        max_ns, grow, shrink, batch, pool_min, pool_max = vals
        if isinstance(ctx.policy, PolicyWeighted):
            ctx.policy.set_weight(weight)   # before the reset below
        ctx.set_poll_params(max_ns, grow, shrink)
        ctx.set_aio_params(batch)
        # QEMU re-applies the pool bounds with every parameter change
        # and refuses a bad pair there, keeping the pool as it was (the
        # refused value stays stored in the property: §8.1's quirk).
        try:
            check_thread_pool_params(pool_min, pool_max)
        except ConfigError:
            pass
        else:
            set_thread_pool_params(ctx, pool_min, pool_max)
            self._pool = (pool_min, pool_max)
        self._applied_seq = before
        running_with = (ctx.poll_max_ns, ctx.poll_grow, ctx.poll_shrink,
                        ctx.aio_max_batch, *self._pool)
        for i, v in enumerate(running_with):
            words[_RUNNING_WITH + i] = v
        words[_RUNNING_WEIGHT] = weight
        words[_APPLIED_NS] = time.monotonic_ns()
        words[_POLL_DISABLE_CNT] = ctx.poll_disable_cnt
        words[_NR_HANDLERS] = len(ctx.fd_handlers)
        words[_APPLIED_SEQ] = before
