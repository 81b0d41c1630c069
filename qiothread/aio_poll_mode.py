"""Poll mode: userspace busy-polling of an AioContext (ref. §4.3, §4.4).

``run_poll_handlers`` is the hot path of the whole project: while it
runs, the loop notices work by calling each poll handler's ``io_poll``
(a memory read, no syscall) over and over until one reports work, the
budget runs out, or the fd monitor says a syscall is needed.  It is
written for speed: the handlers come as a prebuilt tuple of
``(io_poll, node)`` pairs, everything used per pass is a local, and a
pass allocates nothing (``scripts/bench_poll_round.py`` measures it).

Poll mode itself (``poll_set_started``) brackets polling with the
handlers' ``io_poll_begin``/``io_poll_end`` hooks, which virtio uses to
turn guest kicks off while the loop polls.  Leaving it polls every
handler one last time, because work may have arrived just before the
hooks turned kicks back on (invariant (d)).

Handlers that polled empty for ``POLL_IDLE_INTERVAL_NS`` leave the poll
set, but only on fd monitors that support polling (QEMU: io_uring): on
poll and epoll the fd of a handler that is not polled would only be
watched through the syscall, which polling skips.

All of it runs in the context's home thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qiothread import trace_events as te
from qiothread.stats import (
    NS_POLLING,
    POLL_NOTIFIED,
    POLL_PASSES,
    POLL_PROGRESS,
    POLL_ROUNDS,
    POLL_TIMEOUTS,
)

if TYPE_CHECKING:
    from qiothread.aio import AioContext
    from qiothread.aio_handler import AioHandler

__all__ = [
    "POLL_IDLE_INTERVAL_NS",
    "add_poll_ready",
    "poll_set_started",
    "remove_idle_poll_handlers",
    "run_poll_handlers",
]

#: A poll handler that found nothing for this long leaves the poll set
#: (only on monitors that support polling).
POLL_IDLE_INTERVAL_NS = 7_000_000_000


def add_poll_ready(ready: list[AioHandler], node: AioHandler) -> None:
    """``aio_add_poll_ready_handler``: ``node`` was found by polling.

    Pushed at the head of ``ready`` (off any parent's list first), with
    ``poll_ready`` set and ``revents`` left alone.
    """
    old = node.ready_list
    if old is not None:
        old.remove(node)
    node.poll_ready = True
    ready.append(node)
    node.ready_list = ready


def run_poll_handlers(ctx: AioContext, ready: list[AioHandler],
                      max_ns: int, timeout: int) -> tuple[bool, int]:
    """Busy-poll for up to ``max_ns`` (§4.3); (progress, timeout).

    The hot path: locals only, no allocation per pass.
    """
    if te.run_poll_handlers_begin.enabled:
        te.run_poll_handlers_begin(ctx, max_ns, timeout)
    now = ctx._now
    need_wait = ctx.fdmon.need_wait
    pairs = ctx._poll_pairs
    add = add_poll_ready
    q = ctx._stats_q
    progress = False
    hit = False
    passes = 0
    t0 = now()
    idle_deadline = t0 + POLL_IDLE_INTERVAL_NS
    while True:
        passes += 1
        for io_poll, node in pairs:
            if io_poll():
                add(ready, node)
                node.poll_idle_timeout = idle_deadline
                hit = True
                if not node.is_notifier:
                    progress = True
        elapsed = now() - t0
        # A hit sets timeout to 0, and max_ns = soonest(timeout,
        # max_ns) to 0 with it: the loop ends at once.
        if hit or elapsed >= max_ns or need_wait():
            break
    if hit:
        timeout = 0
    q[POLL_ROUNDS] += 1
    q[POLL_PASSES] += passes
    q[NS_POLLING] += elapsed
    if progress:
        q[POLL_PROGRESS] += 1
    elif hit:
        q[POLL_NOTIFIED] += 1
    else:
        q[POLL_TIMEOUTS] += 1
    if ctx.fdmon.supports_polling and remove_idle_poll_handlers(
            ctx, ready, t0 + elapsed):
        timeout = 0
        progress = True
    if timeout != -1:
        timeout -= min(timeout, elapsed)  # same absolute deadline
    if te.run_poll_handlers_end.enabled:
        te.run_poll_handlers_end(ctx, progress, timeout)
    return progress, timeout

def poll_set_started(ctx: AioContext, ready: list[AioHandler],
                     started: bool) -> bool:
    """Enter or leave poll mode (§4.4); True if the final poll hit.

    Leaving calls io_poll_end and then io_poll once more on every
    poll handler, closing the race with work that arrived just
    before notifications were re-enabled.
    """
    if started == ctx.poll_started:
        return False
    ctx.poll_started = started
    ctx._walkers += 1
    progress = False
    try:
        for io_poll, node in ctx._poll_pairs:
            if node.deleted:
                continue
            if started:
                if node.io_poll_begin is not None:
                    node.io_poll_begin()
            else:
                if node.io_poll_end is not None:
                    node.io_poll_end()
                # The final poll: io_poll_end may have raced with an
                # event.  (QEMU counts a hit here as progress even for
                # the ctx notifier.)
                if io_poll():
                    add_poll_ready(ready, node)
                    progress = True
    finally:
        ctx._walkers -= 1
    return progress


def remove_idle_poll_handlers(ctx: AioContext,
                              ready: list[AioHandler], now: int) -> bool:
    """Drop poll handlers idle for 7 s (polling monitors only)."""
    progress = False
    changed = False
    for node in list(ctx._poll_nodes):
        if node.poll_idle_timeout == 0:
            node.poll_idle_timeout = now + POLL_IDLE_INTERVAL_NS
        elif now >= node.poll_idle_timeout:
            te.poll_remove(ctx, node, node.fd)
            node.poll_idle_timeout = 0
            node.in_poll = False
            ctx._poll_nodes.remove(node)
            changed = True
            if ctx.poll_started and node.io_poll_end is not None:
                node.io_poll_end()
                if node.io_poll is not None and node.io_poll():
                    add_poll_ready(ready, node)
                    progress = True
    if changed:
        ctx._rebuild_poll_pairs()
    return progress
