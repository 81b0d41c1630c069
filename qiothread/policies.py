"""The polling policies of QEMU 8.0, 8.2, 10.0 and the 2026 proposal.

:mod:`qiothread.policy` defines the seam and QEMU 7.2's policy; this
module adds the later versions (reference §20) and the weighted
proposal (§24), each registered under its version name so that
``make_policy("8.0")`` and ``-object iothread,poll-policy=8.0`` find
it.  Each class states what its QEMU version changed and nothing else:

``8.0`` (:class:`Policy80`)
    Commit 816a430c51: poll mode is ended only right before ``aio_poll``
    calls the fd monitor, not on every iteration whose polling made no
    progress.  Iterations with a zero timeout (a BH is pending) keep the
    guest's kicks suppressed.  Budget and rule are 7.2's.

``8.2`` (:class:`Policy82`)
    8.0, plus guest notifications deferred and batched with
    :mod:`qiothread.defer_call` (``virtio_notify_irqfd`` defers its
    eventfd write; completion processing runs inside a defer section)
    instead of 7.2's virtio-blk notification BH.  The loop is 8.0's;
    the difference is read by the device through
    :func:`guest_notify_mode`.

``10.0`` (:class:`Policy100`)
    Every poll handler keeps its own ``poll_ns``, adapted with §4.5's
    rule only in iterations in which that handler fired, with the
    iteration's ``block_ns``; the loop polls for the largest.  Poll
    mode ends late, as since 8.0.

``weighted`` (:class:`PolicyWeighted`)
    The IBM RFC of 2026-01-13 with the ``poll-weight`` parameter of its
    third patch (reference §24); see the class for what exactly runs.

Per-context bookkeeping.  The seam wants policies to serve several
contexts, keeping state in the context or its nodes.  ``AioHandler``
has one spare word for that (``poll_ns``); the set of nodes a
per-handler policy has seen and the weighted policy's pending iteration
need a little more, so they live in a :class:`weakref.WeakKeyDictionary`
keyed by the context: one policy instance still serves any number of
contexts, and a context that goes away takes its entry with it.

Threads: every method runs in the context's home thread.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qiothread import trace_events as te
from qiothread.policy import (
    Policy72,
    PollModeEnd,
    PollPolicy,
    adapt_poll_ns,
    register_policy,
    set_ctx_poll_ns,
)
from qiothread.stats import GROW, SHRINK

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = [
    "POLICY_NAMES",
    "POLL_WEIGHT_DEFAULT",
    "GuestNotify",
    "Policy80",
    "Policy82",
    "Policy100",
    "PolicyWeighted",
    "guest_notify_mode",
    "make_policy_from_props",
]

#: What ``poll-weight=0`` selects (the later form of the series, §24;
#: the RFC's own patch 3 used 2).
POLL_WEIGHT_DEFAULT = 3
#: The shrink divisor ``poll-shrink=0`` selects in the weighted form.
WEIGHTED_SHRINK_DEFAULT = 2
#: Largest accepted ``poll-weight``: a shift of 63 or more would be
#: undefined for QEMU's int64 and makes no sense as a weight.
POLL_WEIGHT_MAX = 62


class GuestNotify(enum.Enum):
    """How a device batches its guest notifications (irqfd writes)."""

    #: 7.2 - 8.1: virtio-blk's notification BH (``batch_notifications``
    #: without EVENT_IDX; otherwise one write per completion).
    BH = "bh"
    #: 8.2+: ``virtio_notify_irqfd`` defers the write with defer_call.
    DEFER_CALL = "defer_call"


def guest_notify_mode(policy: PollPolicy) -> GuestNotify:
    """The guest-notification batching that goes with ``policy``.

    Devices call this instead of testing version names, so a new
    policy only has to set a ``guest_notify`` class attribute.
    """
    mode = getattr(policy, "guest_notify", GuestNotify.BH)
    assert isinstance(mode, GuestNotify)
    return mode


@register_policy
class Policy80(Policy72):
    """QEMU 8.0: 7.2's budget and rule; poll mode ends just before a wait.

    Only the place of ``poll_set_started(false)`` differs, and the loop
    implements both places; the class just chooses.
    """

    name: ClassVar[str] = "8.0"
    poll_mode_end: ClassVar[PollModeEnd] = PollModeEnd.BEFORE_WAIT


@register_policy
class Policy82(Policy80):
    """QEMU 8.2: 8.0's loop; guest notifications go through defer_call."""

    name: ClassVar[str] = "8.2"
    guest_notify: ClassVar[GuestNotify] = GuestNotify.DEFER_CALL


@dataclass(eq=False)
class _CtxState:
    """What a per-handler policy remembers about one context.

    ``nodes`` maps every poll-list node the policy has seen dispatched
    to "it fired in the current iteration" (the RFC's ``has_event``;
    10.0 does not use the flag).  Home thread only.
    """

    nodes: dict[AioHandler, bool] = field(default_factory=dict)
    #: block_ns of the iteration whose adjustment is still to be done
    #: (weighted only), or None.
    pending_block_ns: int | None = None
    #: Clock of the last dispatch of that iteration (for statistics).
    pending_now: int = 0
    #: Weighted: per-node updates after an event, and how many of them
    #: reached poll-max-ns and were reset to 0.
    event_updates: int = 0
    event_resets: int = 0
    #: Weighted: idle nodes whose accumulated block time reached
    #: poll-max-ns and were reset to 0.
    idle_resets: int = 0

    def live_nodes(self) -> Iterable[AioHandler]:
        """Nodes still on the poll list; the others are forgotten.

        (A view of ``nodes``: callers may change values, not keys.)
        """
        nodes = self.nodes
        for n in nodes:
            if n.deleted or not n.in_poll:
                break
        else:
            return nodes.keys()         # the usual case: nothing left
        for n in [n for n in nodes if n.deleted or not n.in_poll]:
            del nodes[n]
        return nodes.keys()


class _PerHandlerPolicy(PollPolicy):
    """Shared bookkeeping of the per-handler policies."""

    per_handler: ClassVar[bool] = True
    poll_mode_end: ClassVar[PollModeEnd] = PollModeEnd.BEFORE_WAIT

    def __init__(self) -> None:
        self._states: weakref.WeakKeyDictionary[Any, _CtxState] = (
            weakref.WeakKeyDictionary())

    def state(self, ctx: AioContext) -> _CtxState:
        """This policy's bookkeeping for ``ctx`` (created on demand)."""
        st = self._states.get(ctx)
        if st is None:
            st = self._states[ctx] = _CtxState()
        return st

    def handler_poll_ns(self, ctx: AioContext) -> dict[int, int]:
        """fd -> ``poll_ns`` of every node on the poll list."""
        return {n.fd: n.poll_ns for n in self.state(ctx).live_nodes()}


@register_policy
class Policy100(_PerHandlerPolicy):
    """QEMU 10.0: one ``poll_ns`` per handler; poll for the largest.

    - ``poll_budget``: the largest ``poll_ns`` over the handlers on the
      poll list (the timeout still caps it, in the loop).
    - After a handler is dispatched and is on the poll list, §4.5's rule
      adapts *its* ``poll_ns`` with the iteration's ``block_ns`` and the
      context's thresholds; handlers that did not fire keep theirs.  As
      in QEMU, nothing adapts while ``poll-max-ns`` is 0.
    - ``ctx.poll_ns`` (gone in 10.0) is kept equal to the largest
      handler value, so statistics and QMP show the budget in force.
    - A new node starts at 0; ``set_poll_params`` resets all to 0.
    """

    name: ClassVar[str] = "10.0"

    def poll_budget(self, ctx: AioContext) -> int:
        budget = max((n.poll_ns for n in self.state(ctx).live_nodes()),
                     default=0)
        if budget != ctx.poll_ns:
            set_ctx_poll_ns(ctx, budget, ctx.clock.now_ns())
        return budget

    def adjust(self, ctx: AioContext, block_ns: int, now_ns: int) -> None:
        """Nothing context-wide: the handlers adapt when dispatched."""

    def handler_dispatched(self, ctx: AioContext, node: AioHandler,
                           block_ns: int, now_ns: int) -> None:
        if not ctx.poll_max_ns:
            return
        st = self.state(ctx)
        st.nodes[node] = True
        old = node.poll_ns
        new = adapt_poll_ns(ctx, old, block_ns)
        if new == old:
            return
        node.poll_ns = new
        budget = max((n.poll_ns for n in st.live_nodes()), default=0)
        if budget != ctx.poll_ns:
            set_ctx_poll_ns(ctx, budget, now_ns)

    def reset(self, ctx: AioContext) -> None:
        for node in self.state(ctx).nodes:
            node.poll_ns = 0
        set_ctx_poll_ns(ctx, 0, ctx.clock.now_ns())


@register_policy
class PolicyWeighted(_PerHandlerPolicy):
    """Weighted polling (2026 RFC, reference §24), as implemented here.

    Every poll handler keeps an estimate of its block time in
    ``node.poll_ns``; the context polls for ``ctx.poll_ns``, which
    follows the largest estimate of the handlers that just fired.  With
    ``w`` the weight (``poll-weight``, 0 selecting
    :data:`POLL_WEIGHT_DEFAULT` = 3), ``max`` = ``poll-max-ns``, after
    every iteration (only while ``max`` is not 0):

    1. For each handler on the poll list that fired in this iteration::

           est = block_ns                         if est == 0
           est = est - (est >> w) + (block_ns >> w)   otherwise
           if est >= max: est = 0                 (a "reset")

       and ``adj`` = the largest new estimate among them.
    2. Each handler that did not fire and whose estimate is not 0
       accumulates: ``est += block_ns``, reset to 0 once ``>= max``, so
       a handler that went quiet stops holding the budget up.
    3. If any handler fired: when ``adj > ctx.poll_ns`` grow, with
       ``g = poll-grow or 2``: ``ctx.poll_ns = adj`` if ``adj >
       ctx.poll_ns * g`` else ``ctx.poll_ns * g``, capped at ``max``
       (trace ``poll_grow``); otherwise shrink, with ``s = poll-shrink
       or 2``: ``ctx.poll_ns //= s`` only if ``adj < ctx.poll_ns // s``
       (trace ``poll_shrink``, emitted even when nothing changed).

    Sources and choices, where §24 is silent:

    - Steps 1-3, the integer shifts, the grow jump and the shrink
      condition are those of the RFC's patch 2 (read for facts; §24
      confirms the EWMA, the idle accumulation, the reset at
      ``poll-max-ns``, the jump and the shrink default of 2).
    - Weight 0 means 3 as the brief and §24's "later form" say (the
      RFC's patch 3 used 2); 1..62 are used as given.
    - Handlers that fired are those the loop dispatched while on the
      poll list, the same set 10.0 adapts.
    - The RFC adjusts after dispatch; the seam offers no hook there, so
      the adjustment of an iteration is carried out at the start of the
      next ``poll_budget`` (or ``adjust``), before anything reads the
      budget, with the clock of that iteration's last dispatch for the
      statistics.  The polling decisions are the RFC's; only the moment
      the traces are written differs (before the next iteration's
      polling instead of before its timers).  A nested ``aio_poll``
      inside a dispatch completes its parent's pending adjustment
      first.  :meth:`flush` completes it on demand (end of a replay).
    - ``poll_grow``/``poll_shrink`` statistics count the context-wide
      steps; the per-handler resets are counted in :meth:`counters`
      (the "reset rate" of the RFC's table is ``event_resets /
      event_updates`` there).
    """

    name: ClassVar[str] = "weighted"

    def __init__(self, weight: int = 0) -> None:
        super().__init__()
        self.weight = 0
        self.set_weight(weight)

    def set_weight(self, weight: int) -> None:
        """Store ``poll-weight`` (0 = default); ValueError if invalid.

        Call ``ctx.set_poll_params`` afterwards, as QEMU's setter does,
        to reset the budgets and wake the loop.
        """
        if not 0 <= weight <= POLL_WEIGHT_MAX:
            raise ValueError(
                f"poll-weight must be in [0, {POLL_WEIGHT_MAX}], "
                f"got {weight}")
        self.weight = weight

    @property
    def shift(self) -> int:
        """The weight in force (``poll-weight`` or its default)."""
        return self.weight or POLL_WEIGHT_DEFAULT

    def poll_budget(self, ctx: AioContext) -> int:
        st = self.state(ctx)
        if st.pending_block_ns is not None:
            self._finish_iteration(ctx, st)
        return ctx.poll_ns

    def adjust(self, ctx: AioContext, block_ns: int, now_ns: int) -> None:
        st = self.state(ctx)
        if st.pending_block_ns is not None:
            self._finish_iteration(ctx, st)
        st.pending_block_ns = block_ns
        st.pending_now = now_ns

    def handler_dispatched(self, ctx: AioContext, node: AioHandler,
                           block_ns: int, now_ns: int) -> None:
        if not ctx.poll_max_ns:
            return
        st = self.state(ctx)
        st.nodes[node] = True
        st.pending_now = now_ns

    def flush(self, ctx: AioContext) -> None:
        """Complete a pending adjustment now (end of a run or replay)."""
        st = self.state(ctx)
        if st.pending_block_ns is not None:
            self._finish_iteration(ctx, st)

    def reset(self, ctx: AioContext) -> None:
        st = self.state(ctx)
        st.pending_block_ns = None
        for node in st.nodes:
            st.nodes[node] = False
            node.poll_ns = 0
        set_ctx_poll_ns(ctx, 0, ctx.clock.now_ns())

    def counters(self, ctx: AioContext) -> dict[str, int]:
        """Per-handler update and reset counts for ``ctx``."""
        st = self.state(ctx)
        return {"event_updates": st.event_updates,
                "event_resets": st.event_resets,
                "idle_resets": st.idle_resets}

    def _finish_iteration(self, ctx: AioContext, st: _CtxState) -> None:
        """Steps 1-3 for the iteration recorded in ``st``."""
        block_ns = st.pending_block_ns
        assert block_ns is not None
        st.pending_block_ns = None
        max_ns = ctx.poll_max_ns
        if not max_ns:
            return
        w = self.shift
        adj = -1
        nodes = st.nodes
        for node in st.live_nodes():
            est = node.poll_ns
            if nodes[node]:
                nodes[node] = False
                est = est - (est >> w) + (block_ns >> w) if est \
                    else block_ns
                st.event_updates += 1
                if est >= max_ns:
                    est = 0
                    st.event_resets += 1
                node.poll_ns = est
                adj = max(adj, est)
            elif est:
                est += block_ns
                if est >= max_ns:
                    est = 0
                    st.idle_resets += 1
                node.poll_ns = est
        if adj < 0:
            return
        old = ctx.poll_ns
        if adj > old:
            grow = ctx.poll_grow or 2
            new = adj if adj > old * grow else old * grow
            new = min(new, max_ns)
            ctx.stats.q[GROW] += 1
            if te.poll_grow.enabled:
                te.poll_grow(ctx, old, new)
        else:
            shrink = ctx.poll_shrink or WEIGHTED_SHRINK_DEFAULT
            new = old // shrink if adj < old // shrink else old
            ctx.stats.q[SHRINK] += 1
            if te.poll_shrink.enabled:
                te.poll_shrink(ctx, old, new)
        if new != old:
            set_ctx_poll_ns(ctx, new, st.pending_now)


#: Every policy name, in the order QEMU released them.
POLICY_NAMES = ("7.2", "8.0", "8.2", "10.0", "weighted")


def make_policy_from_props(name: str, weight: int = 0) -> PollPolicy:
    """A policy for ``poll-policy=NAME`` and ``poll-weight=W``.

    ``poll-weight`` is checked for every policy but used only by the
    weighted one (the others have no weight, as QEMU releases have no
    such property), so that one sweep can cross weights with policies.

    :raises ValueError: unknown name, or a weight out of range.
    """
    from qiothread.policy import make_policy

    policy = make_policy(name)
    if isinstance(policy, PolicyWeighted):
        policy.set_weight(weight)
    elif not 0 <= weight <= POLL_WEIGHT_MAX:
        raise ValueError(
            f"poll-weight must be in [0, {POLL_WEIGHT_MAX}], "
            f"got {weight}")
    return policy
