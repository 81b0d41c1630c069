"""Deferred calls: QEMU 8.2's ``defer_call`` (``util/defer-call.c``).

QEMU 8.1 turned ``blk_io_plug``/``blk_io_unplug`` into a per-thread
mechanism, and 8.2 renamed it ``defer_call_begin()`` /
``defer_call_end()`` / ``defer_call(fn, opaque)`` (reference §20).  The
contract this module reproduces:

- A *section* is opened by :func:`defer_call_begin` and closed by
  :func:`defer_call_end`.  Sections nest; the state is per thread, so
  two threads never see each other's sections or calls.
- :func:`defer_call` outside any section runs the function at once.
- Inside a section it queues the function; the queue runs, in the order
  of first deferral, when the *outermost* section ends.
- Deferring a call that is already queued does nothing: duplicates are
  collapsed.  QEMU compares the ``(fn, opaque)`` pair; here the
  callable stands for both, so a bound method collapses with another
  bound method of the same function on the same object (``==``), and
  two different lambdas never do.

Why it matters for polling: in 8.2 ``virtio_notify_irqfd`` defers its
eventfd write, and Linux AIO, io_uring and thread-pool completion
processing each run inside a section, so one guest-notifier write covers
every request completed in that batch.  7.2 reached the same batching
with a virtio-blk BH, which costs one more loop iteration with a zero
timeout (and, in 7.2, a poll-mode end) per batch.

A call that runs when the section ends may itself call
:func:`defer_call`: the queue being run is already detached, so the new
call runs at once, as it would outside a section.  If a deferred call
raises, the calls after it still run and the first exception propagates
from :func:`defer_call_end` (QEMU's callbacks cannot fail; ours must not
leave the thread's queue half run).

Thread safety: every function acts on the calling thread's state only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType

from qiothread.errors import InternalError

__all__ = [
    "defer_call",
    "defer_call_begin",
    "defer_call_end",
    "defer_call_nesting",
    "deferred_calls",
]


class _ThreadState(threading.local):
    """One thread's open sections and queued calls."""

    def __init__(self) -> None:
        self.nesting = 0
        #: Queued calls in first-deferral order (dict: O(1) dedup).
        self.calls: dict[Callable[[], None], None] = {}


_state = _ThreadState()


def defer_call_begin() -> None:
    """Open a section (they nest).  Calling thread only."""
    _state.nesting += 1


def defer_call_end() -> None:
    """Close a section; the outermost one runs the queued calls.

    :raises InternalError: no section is open.
    """
    st = _state
    if st.nesting <= 0:
        raise InternalError("defer_call_end() without defer_call_begin()")
    st.nesting -= 1
    if st.nesting:
        return
    calls, st.calls = st.calls, {}
    first_error: BaseException | None = None
    for fn in calls:
        try:
            fn()
        except BaseException as exc:  # run the rest, re-raise the first
            if first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error


def defer_call(fn: Callable[[], None]) -> None:
    """Run ``fn`` at the end of the outermost section, or now if none.

    A call equal to one already queued is dropped.
    """
    st = _state
    if st.nesting == 0:
        fn()
    else:
        st.calls.setdefault(fn, None)


def defer_call_nesting() -> int:
    """How many sections the calling thread has open."""
    return _state.nesting


class _Section(AbstractContextManager[None]):
    """The context manager :func:`deferred_calls` returns.  Stateless
    (the state is the thread's), so one instance serves every thread:
    it opens a section per request batch, and a generator-based context
    manager costs a few microseconds each time."""

    __slots__ = ()

    def __enter__(self) -> None:
        defer_call_begin()

    def __exit__(self, et: type[BaseException] | None,
                 ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        defer_call_end()


_SECTION = _Section()


def deferred_calls() -> AbstractContextManager[None]:
    """``with deferred_calls():`` a begin/end pair around a block.

    The section is closed (and its calls run) even if the block raises.
    """
    return _SECTION
