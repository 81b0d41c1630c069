"""AioContext: QEMU 7.2's event loop with adaptive busy-polling.

``aio_poll`` follows ``util/aio-posix.c`` of QEMU 7.2 step by step
(reference §4), in this order:

1. become a walker of the handler list (deferred deletion, §4.7);
2. compute the timeout from BHs and timers (§4.1);
3. try poll mode: busy-poll the handlers' ``io_poll`` functions for up
   to the policy's budget, in user space, without a syscall (§4.2-4.4);
4. announce the coming sleep in ``notify_me`` and look at ``notified``
   (the Dekker pair of :mod:`qiothread.notifier`, §3);
5. wait in the fd monitor (ppoll or epoll) if there is anything to wait
   for; retract ``notify_me``; ``aio_notify_accept``;
6. adapt the polling budget to how long the iteration blocked (§4.5);
7. run BHs, then dispatch the ready handlers in QEMU's order (§4.6),
   then free handlers deleted meanwhile, then leave the walk;
8. run expired timers.

What differs between QEMU versions is not forked here but delegated to a
:class:`~qiothread.policy.PollPolicy` (7.2's by default).

Threads.  Everything runs in the context's home thread (the one calling
``aio_poll``) except :meth:`AioContext.notify`, ``QEMUBH.schedule*`` and
the :class:`~qiothread.notifier.AioNotifier` handle, which any thread of
any process may call.

The GIL.  While ``run_poll_handlers`` busy-polls it holds the GIL, as
any Python loop does; it releases it whenever it blocks in ppoll/epoll.
Other threads of the process (the aio=threads pool) get it when the
interpreter forces a hand-over, after ``sys.getswitchinterval()`` (5 ms)
of waiting, which is far outside any poll window.  Shortening the
interval looks like the fix and is not: measured with a polling
iothread on aio=threads (``benchmarks/gil_bench.py --buffered``), a
50 µs interval more than halved IOPS at QD1 and QD32, because every
waiting thread then forces hand-overs, the poller's own included.  The
thread pool solves it where it arises instead: while it has requests
outstanding it registers an ``io_poll`` that makes one GIL-releasing
foreign call per polling pass (see :mod:`blockdev.thread_pool`), and a
loop without a pool pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from qiothread import trace_events as te
from qiothread.aio_handler import (
    READ_EVENTS,
    WRITE_EVENTS,
    AioHandler,
    soonest,
)
from qiothread.aio_poll_mode import (
    POLL_IDLE_INTERVAL_NS,
    poll_set_started,
    run_poll_handlers,
)
from qiothread.barrier import full_barrier
from qiothread.bh import QEMUBH, BHList
from qiothread.clock import Clock, MonotonicClock
from qiothread.event_notifier import EventNotifier
from qiothread.fdmon import FdMonitor
from qiothread.fdmon_epoll import EPOLL_ENABLE_THRESHOLD, EpollMonitor
from qiothread.fdmon_poll import PollMonitor
from qiothread.notifier import (
    _I_NOTIFIED,
    _I_NOTIFY_ME,
    AioNotifier,
    ControlBlock,
)
from qiothread.policy import PollModeEnd, PollPolicy, make_policy
from qiothread.stats import (
    BLOCKING_WAITS,
    ITERATIONS,
    NONBLOCKING_WAITS,
    NS_BLOCKED,
    PollStats,
)
from qiothread.timers import QEMUTimer, TimerList

__all__ = [
    "POLL_IDLE_INTERVAL_NS",
    "AioContext",
    "AioHandler",
]

class AioContext:
    """QEMU's AioContext: fd handlers, BHs, timers and adaptive polling.

    ``fdmon`` picks the fd monitor ("poll" or "epoll"); ``epoll_upgrade``
    lets a poll context switch to epoll at 64 fds (QEMU does when its
    epoll fd exists, i.e. where io_uring setup failed; a 7.2 IOThread
    never does, see reference §7.4).  ``control_block`` places
    ``notify_me``/``notified`` in a caller's shared mapping (a fresh
    memfd otherwise); ``stats`` likewise for the statistics.
    """

    EPOLL_ENABLE_THRESHOLD = EPOLL_ENABLE_THRESHOLD

    def __init__(self, *, clock: Clock | None = None, fdmon: str = "poll",
                 epoll_upgrade: bool = True,
                 policy: PollPolicy | str | None = None,
                 control_block: ControlBlock | None = None,
                 stats: PollStats | None = None,
                 name: str = "") -> None:
        if fdmon not in ("poll", "epoll"):
            raise ValueError(f"unknown fd monitor {fdmon!r} "
                             "(expected 'poll' or 'epoll')")
        self.name = name
        #: The clock of polling, block_ns and timers (home thread).
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._now = self.clock.now_ns
        if policy is None:
            policy = "7.2"
        self.policy: PollPolicy = (
            make_policy(policy) if isinstance(policy, str) else policy)
        #: Polling statistics (home thread writes; anyone reads).
        self.stats = stats if stats is not None else PollStats()
        self.stats.start(self._now())
        self._stats_q = self.stats.q

        # Adaptive polling, §1.1 (home thread; set_poll_params).
        self.poll_ns = 0
        self.poll_max_ns = 0
        self.poll_grow = 0
        self.poll_shrink = 0
        #: 0 = the engine's default (Linux AIO: 32).
        self.aio_max_batch = 0
        #: True while io_poll_begin has been called (poll mode).
        self.poll_started = False
        #: Handlers without io_poll; > 0 disables polling (poll/epoll).
        self.poll_disable_cnt = 0
        #: Called in every aio_poll right after the wait, before the
        #: notify is accepted and poll_ns adapted (home thread).  An
        #: IOThread applies parameters changed by the main process here:
        #: in QEMU the main thread's aio_context_set_poll_params takes
        #: effect at once, so the iteration it wakes already adapts from
        #: the reset poll_ns, and its aio_notify is the one accepted.
        self.after_wait: Callable[[], None] | None = None

        # Handler lists, §1.1 (home thread).
        #: ``aio_handlers``, newest first, deleted-but-unfreed included.
        self.handlers: list[AioHandler] = []
        #: Live (non-deleted) node per fd.
        self.fd_handlers: dict[int, AioHandler] = {}
        #: Bumped on every change of the set (fd monitors regather).
        self.handlers_gen = 0
        self._deleted: list[AioHandler] = []
        #: ``poll_aio_handlers``, newest first.
        self._poll_nodes: list[AioHandler] = []
        # (io_poll, node) pairs of the poll list, for the hot loop.
        self._poll_pairs: tuple[tuple[Callable[[], bool], AioHandler],
                                ...] = ()
        # QEMU's list_lock count: aio_poll / poll_set_started walkers.
        self._walkers = 0

        # The wake-up pair and the context notifier, §3.
        self._block = (control_block if control_block is not None
                       else ControlBlock.create())
        self._own_block = control_block is None
        self._ctl = self._block.u32
        self._notify_me = self._block.notify_me
        self.notifier = EventNotifier()
        self._aio_notifier = AioNotifier(self.notifier, self._block)
        #: ``aio_notify``: any thread (bound straight to the handle).
        self.notify: Callable[[], None] = self._aio_notifier.notify

        self._bhs = BHList(self.notify)
        self._timers = TimerList(self._now, self.notify)

        self._epoll_upgrade = epoll_upgrade
        self.fdmon: FdMonitor = (
            PollMonitor(self) if fdmon == "poll" else EpollMonitor(self))

        ctl = self._ctl
        clear = self.notifier.test_and_clear

        def notifier_read() -> None:
            clear()

        def notifier_poll() -> bool:
            return ctl[_I_NOTIFIED] != 0

        def notifier_poll_ready() -> None:
            pass                # the wake-up itself was the point

        self.set_event_notifier(self.notifier, notifier_read,
                                notifier_poll, notifier_poll_ready)
        self.fd_handlers[self.notifier.fileno()].is_notifier = True

    # ------------------------------------------------------------------
    # Handlers (§2)

    def set_fd_handler(self, fd: int,
                       io_read: Callable[[], None] | None,
                       io_write: Callable[[], None] | None = None,
                       io_poll: Callable[[], bool] | None = None,
                       io_poll_ready: Callable[[], None] | None = None
                       ) -> None:
        """``aio_set_fd_handler``: add, replace, or (all None) delete.

        A replacement is a new node: it loses the old one's poll hooks,
        poll-set membership and idle timeout.  Home thread only.
        """
        if io_poll is not None and io_poll_ready is None:
            io_poll = None          # polling is useless without it
        old = self.fd_handlers.get(fd)
        new: AioHandler | None = None
        if io_read is None and io_write is None and io_poll is None:
            if old is None:
                return
            old.events = 0          # unregister from epoll
            if old.io_poll is None:
                self.poll_disable_cnt -= 1
            del self.fd_handlers[fd]
        else:
            new = AioHandler(fd, io_read, io_write, io_poll, io_poll_ready)
            if old is not None:
                new.revents = old.revents
                new.is_notifier = old.is_notifier
            self.handlers.insert(0, new)
            self.fd_handlers[fd] = new
            self.poll_disable_cnt += (io_poll is None) - (
                old is not None and old.io_poll is None)
        self.handlers_gen += 1
        self.fdmon.update(old, new)
        if old is not None:
            old.revents = 0
            old.poll_ready = False
            old.deleted = True
            if self._walkers:
                self._deleted.append(old)
            else:
                self._unlink(old)
                self._rebuild_poll_pairs()
        self.notify()

    def set_fd_poll(self, fd: int,
                    io_poll_begin: Callable[[], None] | None,
                    io_poll_end: Callable[[], None] | None) -> None:
        """``aio_set_fd_poll``: poll-mode hooks of the current node."""
        node = self.fd_handlers.get(fd)
        if node is not None:
            node.io_poll_begin = io_poll_begin
            node.io_poll_end = io_poll_end

    def set_event_notifier(self, n: EventNotifier,
                           io_read: Callable[[], None] | None,
                           io_poll: Callable[[], bool] | None = None,
                           io_poll_ready: Callable[[], None] | None = None
                           ) -> None:
        """``aio_set_event_notifier``: a read handler on an eventfd."""
        self.set_fd_handler(n.fileno(), io_read, None, io_poll,
                            io_poll_ready)

    def set_event_notifier_poll(self, n: EventNotifier,
                                begin: Callable[[], None] | None,
                                end: Callable[[], None] | None) -> None:
        """``aio_set_event_notifier_poll``."""
        self.set_fd_poll(n.fileno(), begin, end)

    def _unlink(self, node: AioHandler) -> None:
        self.handlers.remove(node)
        if node.in_poll:
            node.in_poll = False
            self._poll_nodes.remove(node)

    def _rebuild_poll_pairs(self) -> None:
        self._poll_pairs = tuple(
            (n.io_poll, n) for n in self._poll_nodes
            if n.io_poll is not None)

    def _free_deleted_handlers(self) -> None:
        """``aio_free_deleted_handlers``: only the last walker frees."""
        if not self._deleted or self._walkers != 1:
            return
        for node in self._deleted:
            self._unlink(node)
        self._deleted.clear()
        self.handlers_gen += 1
        self._rebuild_poll_pairs()

    def add_ready_handler(self, ready: list[AioHandler], node: AioHandler,
                          revents: int) -> None:
        """``aio_add_ready_handler``: push at the head of ``ready``.

        A node already on a ready list (a parent ``aio_poll``'s) is
        taken off it first.
        """
        old = node.ready_list
        if old is not None:
            old.remove(node)
        node.revents = revents
        ready.append(node)
        node.ready_list = ready

    # ------------------------------------------------------------------
    # The loop (§4)

    def aio_poll(self, blocking: bool) -> bool:
        """One iteration of the event loop; True if it made progress.

        Home thread only; may be nested (from a callback).
        """
        now = self._now
        q = self._stats_q
        q[ITERATIONS] += 1
        ready: list[AioHandler] = []
        self._walkers += 1
        # A callback that raises leaves through here: the walk, notify_me
        # and the ready list must be restored, or deleted handlers would
        # never be freed and every notify would write the eventfd.
        try:
            poll_max_ns = self.poll_max_ns
            start = now() if poll_max_ns else 0

            timeout = self._compute_timeout() if blocking else 0
            progress, timeout = self._try_poll_mode(ready, timeout)
            assert not (timeout and progress)

            fdmon = self.fdmon
            use_notify_me = timeout != 0
            if use_notify_me:
                # Pairs with the full barrier in aio_notify: this RMW is
                # a full barrier itself, so notified is read after
                # notify_me is visible.
                self._notify_me.fetch_add(2)
            try:
                if use_notify_me and self._ctl[_I_NOTIFIED]:
                    timeout = 0         # kicked already: do not sleep
                if timeout or fdmon.need_wait():
                    if self.policy.poll_mode_end is (
                            PollModeEnd.BEFORE_WAIT) and (
                            self.poll_set_started(ready, False)):
                        timeout = 0
                        progress = True
                    if timeout:
                        q[BLOCKING_WAITS] += 1
                        t = now()
                        fdmon.wait(ready, timeout)
                        q[NS_BLOCKED] += now() - t
                    else:
                        q[NONBLOCKING_WAITS] += 1
                        fdmon.wait(ready, 0)
            finally:
                if use_notify_me:
                    self._notify_me.fetch_sub(2)
            if self.after_wait is not None:
                self.after_wait()
            # aio_notify_accept: a notify from now on must be seen by the
            # next iteration; the barrier orders the clear before the
            # reads of BH flags and handler state below.
            self._ctl[_I_NOTIFIED] = 0
            full_barrier()

            # Read again, as QEMU does: a change made during the wait
            # counts from here (block_ns from 0 then, so a shrink).
            if self.poll_max_ns:
                t = now()
                block_ns = t - start
                self.policy.adjust(self, block_ns, t)
            else:
                block_ns = 0

            if self._bhs.poll():
                progress = True
            if ready and self._dispatch_ready_handlers(ready, block_ns):
                progress = True
            self._free_deleted_handlers()
        finally:
            self._walkers -= 1
            for node in ready:              # left by an exception
                node.ready_list = None
        if self._timers.timers and self._timers.run_timers():
            progress = True
        return progress

    def _compute_timeout(self) -> int:
        """``aio_compute_timeout``: ns, -1 infinite, 0 do not block."""
        t = self._bhs.compute_timeout()
        if t == 0:
            return 0
        deadline = self._timers.deadline_ns()
        if deadline == 0:
            return 0
        return soonest(t, deadline)

    def _try_poll_mode(self, ready: list[AioHandler],
                       timeout: int) -> tuple[bool, int]:
        """§4.2; returns (progress, new timeout)."""
        if not self._poll_pairs:
            return False, timeout
        max_ns = soonest(timeout, self.policy.poll_budget(self))
        if max_ns and not self.fdmon.need_wait():
            self.poll_set_started(ready, True)
            progress, timeout = self.run_poll_handlers(
                ready, max_ns, timeout)
            if progress:
                return True, timeout
        if self.policy.poll_mode_end is PollModeEnd.IN_TRY_POLL_MODE and (
                self.poll_set_started(ready, False)):
            return True, 0
        return False, timeout

    def run_poll_handlers(self, ready: list[AioHandler], max_ns: int,
                          timeout: int) -> tuple[bool, int]:
        """Busy-poll for up to ``max_ns`` (§4.3); (progress, timeout)."""
        return run_poll_handlers(self, ready, max_ns, timeout)

    def poll_set_started(self, ready: list[AioHandler],
                         started: bool) -> bool:
        """Enter or leave poll mode (§4.4); True if the final poll hit."""
        return poll_set_started(self, ready, started)

    def _dispatch_ready_handlers(self, ready: list[AioHandler],
                                 block_ns: int) -> bool:
        """Pop from the head until empty (§4.6)."""
        progress = False
        per_handler = self.policy.per_handler
        while ready:
            node = ready.pop()
            node.ready_list = None
            if self._dispatch_handler(node):
                progress = True
            if per_handler and node.in_poll:
                self.policy.handler_dispatched(self, node, block_ns,
                                               self._now())
        return progress

    def _dispatch_handler(self, node: AioHandler) -> bool:
        """``aio_dispatch_handler``: join the poll set, then run it."""
        revents = node.revents & node.events
        node.revents = 0
        poll_ready = node.poll_ready
        node.poll_ready = False

        if not node.deleted and not node.in_poll and (
                node.io_poll is not None):
            if te.poll_add.enabled:
                te.poll_add(self, node, node.fd, revents)
            if self.poll_started and node.io_poll_begin is not None:
                node.io_poll_begin()
            node.in_poll = True
            self._poll_nodes.insert(0, node)
            self._rebuild_poll_pairs()

        if (not node.deleted and poll_ready and revents == 0
                and node.io_poll_ready is not None):
            node.io_poll_ready()
            return not node.is_notifier

        progress = False
        if (not node.deleted and revents & READ_EVENTS
                and node.io_read is not None):
            node.io_read()
            progress = not node.is_notifier
        if (not node.deleted and revents & WRITE_EVENTS
                and node.io_write is not None):
            node.io_write()
            progress = True
        return progress

    # ------------------------------------------------------------------
    # fd monitor switching (§7.2)

    def try_upgrade_to_epoll(self, nfds: int) -> FdMonitor | None:
        """``fdmon_epoll_try_upgrade``: from poll at 64+ fds, once."""
        if not self._epoll_upgrade or nfds < EPOLL_ENABLE_THRESHOLD:
            return None
        self._epoll_upgrade = False     # no second attempt
        ep = EpollMonitor(self)
        try:
            ep.add_all([n for n in self.handlers
                        if not n.deleted and n.events])
        except OSError:
            ep.close()
            return None
        self.fdmon.close()
        self.fdmon = ep
        return ep

    def disable_epoll(self, ep: EpollMonitor) -> None:
        """``fdmon_epoll_disable``: back to poll for good."""
        if self.fdmon is ep:
            ep.close()
            self.fdmon = PollMonitor(self)
            self._epoll_upgrade = False

    # ------------------------------------------------------------------
    # Parameters, BHs, timers, wake-up

    def set_poll_params(self, max_ns: int, grow: int, shrink: int) -> None:
        """``aio_context_set_poll_params``: store, reset, notify."""
        self.poll_max_ns = max_ns
        self.poll_grow = grow
        self.poll_shrink = shrink
        self.policy.reset(self)
        self.notify()

    def set_aio_params(self, max_batch: int) -> None:
        """``aio_context_set_aio_params``."""
        self.aio_max_batch = max_batch
        self.notify()

    def bh_new(self, cb: Callable[[], None], name: str = "") -> QEMUBH:
        """``aio_bh_new``: a BH to schedule later (any thread may)."""
        return QEMUBH(self._bhs, cb, name)

    def bh_schedule_oneshot(self, cb: Callable[[], None],
                            name: str = "") -> None:
        """``aio_bh_schedule_oneshot``: run ``cb`` once.  Any thread."""
        self._bhs.schedule_oneshot(cb, name)

    def bh_poll(self) -> bool:
        """``aio_bh_poll`` (home thread)."""
        return self._bhs.poll()

    def timer_new_ns(self, cb: Callable[[], None]) -> QEMUTimer:
        """``aio_timer_new`` on the context clock, in ns."""
        return self._timers.new(cb)

    def notify_accept(self) -> None:
        """``aio_notify_accept``: forget a pending notify (home thread).

        ``aio_poll`` does this after every wait; the full barrier
        orders the clear before the caller's next reads of the state
        the notifier published.
        """
        self._ctl[_I_NOTIFIED] = 0
        full_barrier()

    def remote_handle(self) -> AioNotifier:
        """The ``aio_notify`` handle for other threads and processes."""
        return self._aio_notifier

    @property
    def notified(self) -> bool:
        return self._ctl[_I_NOTIFIED] != 0

    @property
    def notify_me(self) -> int:
        """Current ``notify_me`` (any thread; for observers).

        A plain aligned load through the control block's view: after
        :meth:`close` it raises ValueError, where the atomic view (a
        raw address into the unmapped block) would crash the process.
        """
        return int(self._ctl[_I_NOTIFY_ME])

    # Thread-safe name for the cross-thread entry point (STYLE §3.2).
    def notify_threadsafe(self) -> None:
        self.notify()

    def close(self) -> None:
        """Release the notifier, fd monitor and control block."""
        self.set_event_notifier(self.notifier, None)
        self.fdmon.close()
        self.notifier.close()
        del self._notify_me         # an atomic view pins the mapping
        if self._own_block:
            self._block.close()

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<AioContext {self.name or hex(id(self))} "
                f"fdmon={self.fdmon.name} policy={self.policy.name} "
                f"poll_ns={self.poll_ns}>")
