"""A virtual-time world around a real AioContext, for policy tests.

The context, its BHs, its handlers, its eventfds and its fd monitor are
the real ones.  Two things are scripted, at the boundary where time
passes outside the loop's own code:

- :class:`World` is a VirtualClock plus a queue of timed events (a guest
  publishing a request, a backend completing one, a worker thread
  finishing).  An event runs when virtual time reaches it and acts
  through the real objects: it writes a real eventfd, schedules a real
  BH (whose ``aio_notify`` writes the context's eventfd only when the
  loop announced a sleep), or changes shared state an ``io_poll`` reads.
- :class:`WorldMonitor` wraps the real ppoll monitor.  A wait does what
  the kernel would do with a timeout: time jumps to the next event, the
  event runs, and a real ``ppoll`` with timeout 0 tells whether an fd
  became readable; if none did, time jumps on, as a sleeping ppoll would
  go on sleeping, until the timeout.

Work costs time only where a test says so: every ``io_poll`` call costs
:attr:`World.poll_cost_ns` (a pass over the handlers is what moves the
clock during busy-polling), and handlers charge their own processing
with :meth:`World.advance`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import ClassVar

from qiothread.aio import AioContext, AioHandler
from qiothread.clock import VirtualClock
from qiothread.event_notifier import EventNotifier
from qiothread.fdmon import FdMonitor
from qiothread.fdmon_poll import PollMonitor

START_NS = 1_000_000_000


class WorldIdle(Exception):
    """The loop would sleep forever: no event is left."""


class World:
    """Virtual time and the events scheduled in it."""

    def __init__(self, poll_cost_ns: int = 100) -> None:
        self.clock = VirtualClock(START_NS)
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        #: Virtual ns one ``io_poll`` call costs.
        self.poll_cost_ns = poll_cost_ns

    @property
    def now(self) -> int:
        return self.clock.now_ns()

    def at(self, t: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the clock reaches ``t`` (not in the past)."""
        self._seq += 1
        heapq.heappush(self._events, (max(t, self.now), self._seq, fn))

    def after(self, dt: int, fn: Callable[[], None]) -> None:
        self.at(self.now + dt, fn)

    def next_time(self) -> int | None:
        return self._events[0][0] if self._events else None

    def advance_to(self, t: int) -> None:
        """Move to ``t``, running every event due on the way, in order."""
        ev = self._events
        while ev and ev[0][0] <= t:
            when, _, fn = heapq.heappop(ev)
            self.clock.set(when)
            fn()
        self.clock.set(max(t, self.now))

    def advance(self, dt: int) -> None:
        """``dt`` ns of work in the loop; events due meanwhile run."""
        self.advance_to(self.now + dt)


class WorldMonitor(FdMonitor):
    """The real ppoll monitor, sleeping in virtual time."""

    name: ClassVar[str] = "world"

    def __init__(self, ctx: AioContext, world: World) -> None:
        super().__init__(ctx)
        self.inner = PollMonitor(ctx)
        self.world = world
        #: Waits that really slept (timeout != 0), and their ns.
        self.sleeps = 0
        self.slept_ns = 0

    def update(self, old: AioHandler | None,
               new: AioHandler | None) -> None:
        self.inner.update(old, new)

    def need_wait(self) -> bool:
        return self.inner.need_wait()

    def wait(self, ready: list[AioHandler], timeout_ns: int) -> int:
        world = self.world
        n = self.inner.wait(ready, 0)
        if n or timeout_ns == 0:
            return n
        start = world.now
        deadline = start + timeout_ns if timeout_ns > 0 else None
        self.sleeps += 1
        try:
            while True:
                t = world.next_time()
                if t is None or (deadline is not None and t > deadline):
                    if deadline is None:
                        raise WorldIdle
                    world.advance_to(deadline)
                    return self.inner.wait(ready, 0)
                world.advance_to(t)
                n = self.inner.wait(ready, 0)
                if n:
                    return n
        finally:
            self.slept_ns += world.now - start

    def close(self) -> None:
        self.inner.close()


def world_ctx(world: World, policy: str, *, poll_max_ns: int = 32768,
              grow: int = 0, shrink: int = 0) -> AioContext:
    """A real AioContext on ``world``'s clock and monitor."""
    ctx = AioContext(clock=world.clock, fdmon="poll", policy=policy)
    ctx.fdmon.close()
    ctx.fdmon = WorldMonitor(ctx, world)
    ctx.set_poll_params(poll_max_ns, grow, shrink)
    return ctx


def run_until(ctx: AioContext, world: World, end_ns: int) -> int:
    """``aio_poll(ctx, true)`` until virtual time reaches ``end_ns``.

    Returns the number of iterations.
    """
    n = 0
    try:
        while world.now < end_ns:
            ctx.aio_poll(True)
            n += 1
    except WorldIdle:
        pass
    return n


class ModelQueue:
    """The device side of one virtqueue, as the loop sees it.

    ``avail`` counts requests the guest published and the device has
    not popped.  The host notifier is a real eventfd; ``io_poll`` reads
    ``avail`` (the ring peek); poll begin/end turn guest kicks off and
    on, as ``virtio_queue_set_notification`` does.  ``on_request`` is
    what the device does with each popped request.
    """

    def __init__(self, world: World, ctx: AioContext,
                 on_request: Callable[[], None],
                 cost_ns: int = 500) -> None:
        self.world = world
        self.host_notifier = EventNotifier()
        self.avail = 0
        self.notification = True
        self.on_request = on_request
        self.cost_ns = cost_ns
        #: Guest kicks (host-notifier writes).
        self.kicks = 0
        #: Dispatches found by polling / by the fd.
        self.polled = 0
        self.by_fd = 0
        #: Requests popped.
        self.popped = 0
        ctx.set_event_notifier(self.host_notifier, self._read,
                               self._poll, self._poll_ready)
        ctx.set_event_notifier_poll(self.host_notifier,
                                    self._poll_begin, self._poll_end)

    # guest side
    def guest_submit(self) -> None:
        """The guest publishes one request, kicking unless suppressed."""
        self.avail += 1
        if self.notification:
            self.kicks += 1
            self.host_notifier.set()

    # device side
    def _poll(self) -> bool:
        self.world.advance(self.world.poll_cost_ns)
        return self.avail > 0

    def _poll_begin(self) -> None:
        self.notification = False

    def _poll_end(self) -> None:
        self.notification = True

    def _read(self) -> None:
        self.host_notifier.test_and_clear()
        self.by_fd += 1
        self._handle()

    def _poll_ready(self) -> None:
        self.polled += 1
        self._handle()

    def _handle(self) -> None:
        while self.avail:
            self.avail -= 1
            self.popped += 1
            self.world.advance(self.cost_ns)
            self.on_request()

    def close(self) -> None:
        self.host_notifier.close()


class ModelCompletions:
    """A backend completion source: Linux AIO's eventfd and ring peek.

    :meth:`submit` completes a request ``latency_ns`` later: the
    completion lands in ``done`` (what ``io_poll`` peeks) and the
    eventfd is written, as the kernel does for an iocb with
    IOCB_FLAG_RESFD.
    """

    def __init__(self, world: World, ctx: AioContext,
                 on_complete: Callable[[], None],
                 latency_ns: int, cost_ns: int = 500) -> None:
        self.world = world
        self.ctx = ctx
        self.notifier = EventNotifier()
        self.done = 0
        self.latency_ns = latency_ns
        self.on_complete = on_complete
        self.cost_ns = cost_ns
        self.polled = 0
        self.by_fd = 0
        self.completed = 0
        ctx.set_event_notifier(self.notifier, self._read, self._poll,
                               self._poll_ready)

    def submit(self) -> None:
        self.world.after(self.latency_ns, self._complete)

    def node_poll_ns(self) -> int:
        """The per-handler ``poll_ns`` of this handler's node."""
        return self.ctx.fd_handlers[self.notifier.fileno()].poll_ns

    def _complete(self) -> None:
        self.done += 1
        self.notifier.set()

    def _poll(self) -> bool:
        self.world.advance(self.world.poll_cost_ns)
        return self.done > 0

    def _read(self) -> None:
        self.by_fd += 1
        self._handle()

    def _poll_ready(self) -> None:
        self.polled += 1
        self._handle()

    def _handle(self) -> None:
        self.notifier.test_and_clear()
        while self.done:
            self.done -= 1
            self.completed += 1
            self.world.advance(self.cost_ns)
            self.on_complete()

    def close(self) -> None:
        self.notifier.close()
