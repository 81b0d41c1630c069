"""MemoryBackend: a pure in-memory BlockDriverState for virtio tests.

It has the node interface of docs/interfaces.md and no I/O of its own:
data moves between guest buffers and an anonymous mapping when a
request is *submitted*, and its completion callback runs later, from a
bottom half of the attached AioContext, as a real engine's completion
would (never inside the submitting call: QEMU's block layer never
completes an AIO request synchronously, and the virtio-blk drain loop
relies on that).  Completions run in submission order.

A discard zeroes the range, as a hole punched in a raw file reads back
as zeroes.  Errors can be injected per operation kind; an injected
error leaves the data untouched and completes with ``-errno``.
"""

from __future__ import annotations

import collections
import errno
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from qiothread.defer_call import deferred_calls
from qiothread.errors import InternalError

__all__ = ["MemoryBackend"]


class _BH(Protocol):
    def schedule(self) -> None: ...
    def delete(self) -> None: ...


class _Context(Protocol):
    def bh_new(self, cb: Callable[[], None], name: str = "") -> _BH: ...


@dataclass
class _Fault:
    op: str | None
    err: int
    remaining: int


class MemoryBackend:
    """An in-memory block node of ``length`` bytes.

    Home thread only (the attached context's), like every node.
    """

    #: Operation names, as counted in :attr:`ops` and used by faults.
    OPS = ("read", "write", "flush", "discard", "write_zeroes")

    def __init__(self, length: int, *, node_name: str = "mem0",
                 logical_block_size: int = 512,
                 request_alignment: int = 1, read_only: bool = False,
                 max_transfer: int = 0, record: bool = False) -> None:
        if length <= 0 or length % 512:
            raise ValueError(
                f"length {length} is not a positive multiple of 512")
        if logical_block_size not in (512, 4096):
            raise ValueError(
                f"logical block size {logical_block_size} is not 512 "
                "or 4096")
        self.node_name = node_name
        self.length = length
        self.logical_block_size = logical_block_size
        self.request_alignment = request_alignment
        self.read_only = read_only
        #: Largest request in bytes (0: no limit), ``bl.max_transfer``.
        self.max_transfer = max_transfer
        #: Not a file engine; there is nothing to fall back from.
        self.aio = "memory"
        #: Requests submitted, by operation.
        self.ops: dict[str, int] = dict.fromkeys(self.OPS, 0)
        #: With ``record``: (op, offset, nbytes, number of iovecs).
        self.log: list[tuple[str, int, int, int]] = []
        self._record = record
        self._data = mmap.mmap(-1, length)
        self._pending: collections.deque[
            tuple[Callable[[int], None], int]] = collections.deque()
        self._bh: _BH | None = None
        self._faults: list[_Fault] = []
        self._plug_depth = 0

    # -- AioContext ------------------------------------------------------

    def attach_aio_context(self, ctx: _Context) -> None:
        """Complete requests through a BH of ``ctx`` from now on."""
        if self._bh is not None:
            self.detach_aio_context()
        self._bh = ctx.bh_new(self._complete_bh, "memory-backend")
        if self._pending:
            self._bh.schedule()

    def detach_aio_context(self) -> None:
        """Stop using the context (no request may be in flight).

        :raises InternalError: with requests in flight (QEMU drains
            before it moves a node).
        """
        if self._pending:
            raise InternalError(
                f"{self.node_name}: detached with {len(self._pending)} "
                "requests in flight")
        if self._bh is not None:
            self._bh.delete()
            self._bh = None

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return len(self._pending)

    def _complete_bh(self) -> None:
        # Take what is queued now; completions that submit more are
        # served by the next run of the BH.
        batch = self._pending
        self._pending = collections.deque()
        # One defer section per batch, as the real engines (8.2).
        with deferred_calls():
            for cb, ret in batch:
                cb(ret)

    def _queue(self, op: str, offset: int, nbytes: int, niov: int,
               cb: Callable[[int], None], ret: int) -> None:
        if self._bh is None:
            raise InternalError(
                f"{self.node_name}: request before attach_aio_context")
        self.ops[op] += 1
        if self._record:
            self.log.append((op, offset, nbytes, niov))
        self._pending.append((cb, ret))
        self._bh.schedule()

    # -- faults ----------------------------------------------------------

    def inject_error(self, op: str | None, err: int = errno.EIO,
                     count: int = 1) -> None:
        """Fail the next ``count`` requests of ``op`` (None: any) with
        ``-err``."""
        if op is not None and op not in self.OPS:
            raise ValueError(f"unknown operation {op!r}")
        self._faults.append(_Fault(op, err, count))

    def _fault(self, op: str) -> int:
        for f in self._faults:
            if f.op in (None, op) and f.remaining > 0:
                f.remaining -= 1
                if not f.remaining:
                    self._faults.remove(f)
                return -f.err
        return 0

    def _check(self, op: str, offset: int, nbytes: int) -> int:
        err = self._fault(op)
        if err:
            return err
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            return -errno.EIO
        if self.read_only and op != "read" and op != "flush":
            return -errno.EPERM
        return 0

    # -- the data path ---------------------------------------------------

    def preadv(self, offset: int, iov: list[memoryview],
               cb: Callable[[int], None]) -> None:
        """Read into ``iov`` from ``offset``; ``cb(0)`` later."""
        nbytes = sum(len(v) for v in iov)
        ret = self._check("read", offset, nbytes)
        if not ret:
            pos = offset
            for v in iov:
                v[:] = self._data[pos:pos + len(v)]
                pos += len(v)
        self._queue("read", offset, nbytes, len(iov), cb, ret)

    def pwritev(self, offset: int, iov: list[memoryview],
                cb: Callable[[int], None]) -> None:
        """Write ``iov`` at ``offset``; ``cb(0)`` later."""
        nbytes = sum(len(v) for v in iov)
        ret = self._check("write", offset, nbytes)
        if not ret:
            pos = offset
            for v in iov:
                self._data[pos:pos + len(v)] = v
                pos += len(v)
        self._queue("write", offset, nbytes, len(iov), cb, ret)

    def flush(self, cb: Callable[[int], None]) -> None:
        """Nothing to make durable; ``cb(0)`` later."""
        self._queue("flush", 0, 0, 0, cb, self._check("flush", 0, 0))

    def pdiscard(self, offset: int, nbytes: int,
                 cb: Callable[[int], None]) -> None:
        """Discard (reads back as zeroes); ``cb(0)`` later."""
        ret = self._check("discard", offset, nbytes)
        if not ret:
            self._data[offset:offset + nbytes] = bytes(nbytes)
        self._queue("discard", offset, nbytes, 0, cb, ret)

    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: Callable[[int], None]) -> None:
        """Zero a range; ``cb(0)`` later."""
        ret = self._check("write_zeroes", offset, nbytes)
        if not ret:
            self._data[offset:offset + nbytes] = bytes(nbytes)
        self._queue("write_zeroes", offset, nbytes, 0, cb, ret)

    def io_plug(self) -> None:
        """Nothing is batched in memory; plugs only nest."""
        self._plug_depth += 1

    def io_unplug(self) -> None:
        if self._plug_depth <= 0:
            raise InternalError(f"{self.node_name}: unbalanced io_unplug")
        self._plug_depth -= 1

    # -- test helpers ----------------------------------------------------

    def read_data(self, offset: int, nbytes: int) -> bytes:
        """The node's contents (no request, no callback)."""
        return bytes(self._data[offset:offset + nbytes])

    def write_data(self, offset: int, data: bytes) -> None:
        """Set the node's contents directly (test set-up)."""
        self._data[offset:offset + len(data)] = data

    def close(self) -> None:
        """Drop the contents.  Idempotent."""
        if self._bh is not None:
            self._bh.delete()
            self._bh = None
        self._pending.clear()
        if not self._data.closed:
            self._data.close()
