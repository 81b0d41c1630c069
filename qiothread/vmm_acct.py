"""Block accounting of a device's node, as QEMU's ``block_acct_*`` keeps it.

QEMU counts, per BlockBackend, the operations a device sent, their
bytes, the time from submission to completion, failures and the highest
offset written; ``query-blockstats`` reports them.  Here the device
model (``virtio.blk``) does not count them itself, so the run wraps the
node each iothread process hands to the device in an
:class:`AccountedNode` that does, into the VMM's shared words
(:mod:`qiothread.vmm_shared`, one slot per device and iothread, so that
each word has one writer).

One difference from QEMU: QEMU accounts each guest request and then
marks merged ones (``block_acct_merge``); here a merged run of requests
reaches the node as one operation and counts once (the device's own
``merges`` counter says how many were folded in).

Iothread process only; the data-path cost is two clock reads and a
closure per operation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from qiothread.vmm_shared import ACCT_FIELDS

__all__ = ["AccountedNode"]

_IX = {name: i for i, name in enumerate(ACCT_FIELDS)}


def _kind(name: str, has_bytes: bool = True) -> tuple[int, int, int, int]:
    """Word indexes of one kind: (operations, bytes or -1, total time,
    failed operations), looked up once, not per request."""
    return (_IX[f"{name}_operations"],
            _IX[f"{name}_bytes"] if has_bytes else -1,
            _IX[f"{name}_total_time_ns"],
            _IX[f"failed_{name}_operations"])


_RD, _WR, _UNMAP = _kind("rd"), _kind("wr"), _kind("unmap")
_FLUSH = _kind("flush", has_bytes=False)
_LAST = _IX["last_completion_ns"]
_HIGHEST = _IX["wr_highest_offset"]


class AccountedNode:
    """A node that counts what passes through it (module text).

    Everything but the five data-path calls is the wrapped node's.
    """

    def __init__(self, node: Any, words: memoryview) -> None:
        self._node = node
        self._w = words

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def _done(self, kind: tuple[int, int, int, int], nbytes: int,
              t0: int, cb: Callable[[int], None]) -> Callable[[int], None]:
        w = self._w
        ops, nbytes_ix, total, failed = kind

        def complete(ret: int) -> None:
            now = time.monotonic_ns()
            if ret < 0:
                w[failed] += 1
            else:
                w[ops] += 1
                if nbytes_ix >= 0:
                    w[nbytes_ix] += nbytes
            w[total] += now - t0
            w[_LAST] = now
            cb(ret)
        return complete

    def preadv(self, offset: int, iov: Sequence[memoryview],
               cb: Callable[[int], None]) -> None:
        n = sum(map(len, iov))
        self._node.preadv(offset, iov, self._done(
            _RD, n, time.monotonic_ns(), cb))

    def pwritev(self, offset: int, iov: Sequence[memoryview],
                cb: Callable[[int], None]) -> None:
        n = sum(map(len, iov))
        if offset + n > self._w[_HIGHEST]:
            self._w[_HIGHEST] = offset + n
        self._node.pwritev(offset, iov, self._done(
            _WR, n, time.monotonic_ns(), cb))

    def flush(self, cb: Callable[[int], None]) -> None:
        self._node.flush(self._done(_FLUSH, 0, time.monotonic_ns(), cb))

    def pdiscard(self, offset: int, nbytes: int,
                 cb: Callable[[int], None]) -> None:
        self._node.pdiscard(offset, nbytes, self._done(
            _UNMAP, nbytes, time.monotonic_ns(), cb))

    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: Callable[[int], None]) -> None:
        # QEMU accounts WRITE_ZEROES as a write.
        self._node.pwrite_zeroes(offset, nbytes, may_unmap, self._done(
            _WR, nbytes, time.monotonic_ns(), cb))
