"""One engine per AioContext, as QEMU keeps them in the context.

QEMU creates a context's thread pool, Linux AIO state and io_uring
state lazily, the first time a node attached to that context needs one
(``aio_get_thread_pool``, ``aio_setup_linux_aio``,
``aio_setup_linux_io_uring``), and every node in the context shares it.
Here the engine lives in a registry keyed by the context and is closed
when the last node that uses it detaches.  Home thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerContext"]

C = TypeVar("C")
T = TypeVar("T")


class PerContext(Generic[C, T]):
    """The engines of one kind, at most one per context, counted by user.

    ``make(ctx)`` builds one on first use; ``close(engine)`` ends it when
    its last user puts it back.
    """

    def __init__(self, make: Callable[[C], T],
                 close: Callable[[T], None]) -> None:
        self._make = make
        self._close = close
        # id(ctx) -> [ctx, engine, users]; the context is kept so that
        # its id cannot be reused while the entry exists.
        self._entries: dict[int, tuple[C, T, int]] = {}

    def get(self, ctx: C) -> T:
        """The engine of ``ctx``, made now if it has none; one more user.

        :raises: whatever ``make`` raises; nothing is registered then.
        """
        ent = self._entries.get(id(ctx))
        if ent is None:
            engine = self._make(ctx)
            self._entries[id(ctx)] = (ctx, engine, 1)
            return engine
        self._entries[id(ctx)] = (ctx, ent[1], ent[2] + 1)
        return ent[1]

    def peek(self, ctx: C) -> T | None:
        """The engine of ``ctx`` if it has one; no user is counted."""
        ent = self._entries.get(id(ctx))
        return None if ent is None else ent[1]

    def put(self, ctx: C) -> None:
        """Drop one user of the engine of ``ctx``; the last one closes it."""
        ent = self._entries.get(id(ctx))
        if ent is None:
            return
        if ent[2] > 1:
            self._entries[id(ctx)] = (ctx, ent[1], ent[2] - 1)
            return
        del self._entries[id(ctx)]
        self._close(ent[1])
