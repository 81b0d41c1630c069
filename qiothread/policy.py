"""Polling policies: the parts of adaptive polling that QEMU versions change.

The loop in :mod:`qiothread.aio` follows QEMU 7.2's ``aio_poll`` step by
step.  Two decisions inside it changed in later QEMU versions (reference
§20) and differ in proposals (§24); they are delegated to one
:class:`PollPolicy` object chosen when the context is built:

*Where poll mode ends* (:attr:`PollPolicy.poll_mode_end`)
    7.2 leaves poll mode (``poll_set_started(false)``: io_poll_end plus a
    final io_poll on every poll handler) inside ``try_poll_mode`` on
    every iteration whose polling made no progress, even a non-blocking
    one.  8.0 and later leave it only just before ``aio_poll`` really
    calls the fd monitor (timeout != 0 or need_wait).  The loop
    implements both places; the policy picks one.

*Whose ``poll_ns`` and how it adapts* (:meth:`poll_budget`,
:meth:`adjust`, :meth:`handler_dispatched`, :meth:`reset`)
    7.2 keeps one budget per context and adapts it once per iteration
    from ``block_ns``.  10.0 keeps one per handler (``AioHandler.poll_ns``
    exists for that), polls for the largest, and adapts only handlers
    that fired.  The weighted proposal of §24 smooths the per-handler
    value.

Contract for a new policy (e.g. ``Policy80``, ``Policy100``, a weighted
one), which must not need any change to ``aio.py``:

- Subclass :class:`PollPolicy`, set ``name`` and ``poll_mode_end``.
- ``poll_budget(ctx)`` returns the ns to poll before the timeout caps
  it; 0 means "do not poll this iteration".  Called once per aio_poll in
  the home thread, only when the poll list is non-empty.
- ``adjust(ctx, block_ns, now_ns)`` runs after the wait when
  ``ctx.poll_max_ns != 0``; block_ns runs from the start of aio_poll to
  after the wait.  Change ``ctx.poll_ns`` only through
  :func:`adapt_poll_ns` / :func:`set_ctx_poll_ns` so traces and
  statistics stay right.
- If ``per_handler`` is True, ``handler_dispatched(ctx, node, block_ns,
  now_ns)`` runs for each dispatched node that is in the poll list after
  its dispatch, with the same block_ns (10.0's rule); keep per-handler
  state in ``node.poll_ns``.
- ``reset(ctx)`` runs from ``set_poll_params`` (which then notifies);
  it must bring every budget back to 0.
- Policies hold no per-context state of their own beyond what they put
  in ``ctx``/nodes, so one instance may serve several contexts.
- Register it with :func:`register_policy` so ``make_policy(name)`` and
  the ``-object iothread`` plumbing can find it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from qiothread import trace_events as te
from qiothread.stats import GROW, SHRINK

if TYPE_CHECKING:
    from qiothread.aio import AioContext, AioHandler

__all__ = [
    "POLL_FIRST_STEP_NS",
    "Policy72",
    "PollModeEnd",
    "PollPolicy",
    "adapt_poll_ns",
    "make_policy",
    "policy_names",
    "register_policy",
    "set_ctx_poll_ns",
]

#: The first grow step from 0 (``aio-posix.c:aio_poll``).
POLL_FIRST_STEP_NS = 4000


class PollModeEnd(enum.Enum):
    """Where the loop calls ``poll_set_started(false)``."""

    #: 7.2: in try_poll_mode, whenever polling made no progress.
    IN_TRY_POLL_MODE = "try_poll_mode"
    #: 8.0+: in aio_poll, only right before the fd monitor waits.
    BEFORE_WAIT = "before_wait"


def set_ctx_poll_ns(ctx: AioContext, new: int, now_ns: int) -> None:
    """Store the context-wide budget and account it in the statistics."""
    if new != ctx.poll_ns:
        ctx.stats.set_poll_ns(now_ns, new)
    ctx.poll_ns = new


def _int64(v: int) -> int:
    """``v`` wrapped to int64, as QEMU's -fwrapv build computes it."""
    return ((v + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def _c_div(a: int, b: int) -> int:
    """C's int64 division (truncating toward zero); ``b`` > 0."""
    q = abs(a) // b
    return -q if a < 0 else q


def adapt_poll_ns(ctx: AioContext, poll_ns: int, block_ns: int) -> int:
    """QEMU's grow/shrink rule (reference §4.5); returns the new value.

    Emits ``poll_shrink`` (even 0 -> 0) and ``poll_grow`` with the
    context as QEMU does, and counts them.  Thresholds are the
    context's ``poll_max_ns``, ``poll_grow`` and ``poll_shrink``.
    int64 arithmetic as in QEMU: a grow step past 2**63 wraps.
    """
    if block_ns <= poll_ns:
        return poll_ns                        # the sweet spot
    max_ns = ctx.poll_max_ns
    if block_ns > max_ns:
        shrink = ctx.poll_shrink
        new = _c_div(poll_ns, shrink) if shrink else 0
        ctx.stats.q[SHRINK] += 1
        if te.poll_shrink.enabled:
            te.poll_shrink(ctx, poll_ns, new)
        return new
    if poll_ns < max_ns and block_ns < max_ns:
        grow = ctx.poll_grow or 2
        new = (POLL_FIRST_STEP_NS if poll_ns == 0
               else _int64(poll_ns * grow))
        new = min(new, max_ns)
        ctx.stats.q[GROW] += 1
        if te.poll_grow.enabled:
            te.poll_grow(ctx, poll_ns, new)
        return new
    return poll_ns                            # block_ns == max, or capped


class PollPolicy(ABC):
    """One QEMU version's answer to the two questions above."""

    #: Short name: "7.2", "8.0", "10.0", ...
    name: ClassVar[str]
    poll_mode_end: ClassVar[PollModeEnd]
    #: Call handler_dispatched for each dispatched poll-list node.
    per_handler: ClassVar[bool] = False

    @abstractmethod
    def poll_budget(self, ctx: AioContext) -> int:
        """ns to poll this iteration (before the timeout caps it)."""

    @abstractmethod
    def adjust(self, ctx: AioContext, block_ns: int, now_ns: int) -> None:
        """After the wait: adapt the budget(s) to ``block_ns``."""

    def handler_dispatched(  # noqa: B027 - optional for 7.2
            self, ctx: AioContext, node: AioHandler,
                           block_ns: int, now_ns: int) -> None:
        """Per-handler policies: ``node`` fired this iteration."""

    @abstractmethod
    def reset(self, ctx: AioContext) -> None:
        """``set_poll_params``: every budget back to 0."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Policy72(PollPolicy):
    """QEMU 7.2: one ``poll_ns`` per context; poll mode ends early."""

    name: ClassVar[str] = "7.2"
    poll_mode_end: ClassVar[PollModeEnd] = PollModeEnd.IN_TRY_POLL_MODE

    def poll_budget(self, ctx: AioContext) -> int:
        return ctx.poll_ns

    def adjust(self, ctx: AioContext, block_ns: int, now_ns: int) -> None:
        old = ctx.poll_ns
        new = adapt_poll_ns(ctx, old, block_ns)
        if new != old:
            set_ctx_poll_ns(ctx, new, now_ns)

    def reset(self, ctx: AioContext) -> None:
        set_ctx_poll_ns(ctx, 0, ctx.clock.now_ns())


_REGISTRY: dict[str, type[PollPolicy]] = {"7.2": Policy72}


def register_policy(cls: type[PollPolicy]) -> type[PollPolicy]:
    """Make ``cls`` selectable by its ``name`` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    import qiothread.policies  # noqa: F401  (registers the rest)
    return sorted(_REGISTRY)


def make_policy(name: str = "7.2") -> PollPolicy:
    """A policy by version name; ValueError lists the known ones."""
    if name not in _REGISTRY:
        # The later versions register themselves on import.
        import qiothread.policies  # noqa: F401
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(
            f"unknown polling policy {name!r}; known: "
            f"{', '.join(policy_names())}") from None
