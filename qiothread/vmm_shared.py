"""What the VMM shares with its children besides guest memory.

One anonymous ``MAP_SHARED`` mapping, created by the main process before
any fork and inherited by every iothread and guest process, holds:

- the *run words*: ``stop`` (the VMM asks the guests to finish: Ctrl-C,
  QMP ``quit``), written by the main process only and read by guests
  between I/Os;
- per virtqueue, the device's counters (QEMU-side numbers: requests,
  merges, kicks seen, interrupts sent and suppressed), written by the
  iothread serving that queue, read live by the main process (QMP
  ``query-blockstats``) and at the end (the ``qiothread`` report);
- per device, a *broken* word and the first error message (QEMU's
  ``virtio_error`` text), written by the iothread that saw it.

Each counter is one aligned int64, written by exactly one process (the
queue's iothread): an aligned 8-byte store is single-copy atomic on the
CPUs we run on, so readers see each counter whole, without a lock on the
data path.  ``stop`` is a :class:`~qiothread.barrier.SharedU64` (a full
barrier on each access), so a guest that read it as 0 and then issued an
I/O is ordered with the VMM that stored 1 and then waits for the guest.
"""

from __future__ import annotations

import mmap
from dataclasses import fields
from typing import Any

from qiothread.barrier import SharedU64, close_mapping
from virtio.blk import VirtQueueStats

__all__ = ["ACCT_FIELDS", "ENGINES", "QUEUE_STAT_FIELDS", "SharedQueueStats",
           "VmmShared"]

#: The device's per-queue counters, in their dataclass order.
QUEUE_STAT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(VirtQueueStats))
#: Block accounting (QEMU's ``BlockDeviceStats`` names) of what one
#: iothread sent to a device's node; kept in the slot of the first queue
#: of that device the iothread serves (:mod:`qiothread.vmm_acct`).
ACCT_FIELDS: tuple[str, ...] = (
    "rd_bytes", "wr_bytes", "unmap_bytes",
    "rd_operations", "wr_operations", "flush_operations",
    "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns",
    "unmap_total_time_ns",
    "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations",
    "wr_highest_offset", "last_completion_ns",
    # The aio engine the node runs on in this iothread, after any
    # fallback: an index into ENGINES (0: not attached).
    "aio_engine")
#: Values of the ``aio_engine`` word.
ENGINES = ("", "threads", "native", "io_uring")
_QUEUE_WORDS = len(QUEUE_STAT_FIELDS) + len(ACCT_FIELDS)
_ACCT_BASE = len(QUEUE_STAT_FIELDS)
_RUN_WORDS = 8
_STOP = 0
_REASON_BYTES = 248
_DEVICE_BYTES = 8 + _REASON_BYTES


class SharedQueueStats(VirtQueueStats):
    """A :class:`VirtQueueStats` whose fields live in shared memory.

    The device increments its counters as attributes
    (``stats.kicks += 1``); here each attribute is a property over one
    int64 word, so the same code counts into the VMM's mapping.  The
    queue's iothread only writes; anyone reads.
    """

    def __init__(self, words: memoryview) -> None:
        object.__setattr__(self, "_w", words)


def _counter(index: int) -> property:
    def get(self: SharedQueueStats) -> int:
        return int(self._w[index])  # type: ignore[attr-defined]

    def put(self: SharedQueueStats, value: int) -> None:
        self._w[index] = value  # type: ignore[attr-defined]

    return property(get, put)


for _i, _name in enumerate(QUEUE_STAT_FIELDS):
    setattr(SharedQueueStats, _name, _counter(_i))


class VmmShared:
    """The mapping (module text) for ``nqueues`` queues, ``ndevices``
    devices.  Create in the main process before forking; close there at
    the end (children just exit)."""

    def __init__(self, nqueues: int, ndevices: int) -> None:
        size = 8 * (_RUN_WORDS + _QUEUE_WORDS * nqueues) + \
            _DEVICE_BYTES * ndevices
        size = -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, size, mmap.MAP_SHARED)
        self._mv = memoryview(self._map)
        self._words = self._mv[:8 * (_RUN_WORDS + _QUEUE_WORDS * nqueues)
                               ].cast("q")
        self._dev_base = 8 * (_RUN_WORDS + _QUEUE_WORDS * nqueues)
        self.nqueues = nqueues
        self.ndevices = ndevices
        self._stop = SharedU64(self._map, 8 * _STOP)
        #: Views handed out; released before the mapping closes.
        self._views: list[memoryview] = []

    # -- run words -----------------------------------------------------

    def request_stop(self) -> None:
        """Ask every guest to finish (any process; main in practice)."""
        self._stop.store(1)

    def stop_requested(self) -> bool:
        """Guests: should I stop issuing I/O?"""
        return self._stop.load() != 0

    # -- queues --------------------------------------------------------

    def queue_stats(self, qslot: int) -> SharedQueueStats:
        """The shared counters of global queue slot ``qslot``."""
        base = _RUN_WORDS + _QUEUE_WORDS * qslot
        view = self._words[base:base + _ACCT_BASE]
        self._views.append(view)
        return SharedQueueStats(view)

    def acct_words(self, qslot: int) -> memoryview:
        """The block-accounting words (:data:`ACCT_FIELDS` order) of
        queue slot ``qslot``; one writer process per slot."""
        base = _RUN_WORDS + _QUEUE_WORDS * qslot + _ACCT_BASE
        view = self._words[base:base + len(ACCT_FIELDS)]
        self._views.append(view)
        return view

    def read_acct(self, qslot: int) -> dict[str, int]:
        """A snapshot of queue slot ``qslot``'s accounting words."""
        base = _RUN_WORDS + _QUEUE_WORDS * qslot + _ACCT_BASE
        return {name: int(self._words[base + i])
                for i, name in enumerate(ACCT_FIELDS)}

    def read_queue(self, qslot: int) -> dict[str, int]:
        """A snapshot of queue slot ``qslot``'s counters."""
        base = _RUN_WORDS + _QUEUE_WORDS * qslot
        return {name: int(self._words[base + i])
                for i, name in enumerate(QUEUE_STAT_FIELDS)}

    # -- devices -------------------------------------------------------

    def mark_broken(self, dslot: int, reason: str) -> None:
        """Record the first ``virtio_error`` of device ``dslot``."""
        off = self._dev_base + _DEVICE_BYTES * dslot
        if self._mv[off]:
            return
        text = reason.encode(errors="replace")[:_REASON_BYTES]
        self._mv[off + 8:off + 8 + len(text)] = text
        self._mv[off] = 1

    def broken(self, dslot: int) -> str | None:
        """The error that broke device ``dslot``, or None."""
        off = self._dev_base + _DEVICE_BYTES * dslot
        if not self._mv[off]:
            return None
        raw = bytes(self._mv[off + 8:off + _DEVICE_BYTES])
        return raw.rstrip(b"\0").decode(errors="replace")

    def close(self) -> None:
        """Release the mapping (main process, after the children)."""
        for v in (*self._views, self._words, self._mv):
            v.release()
        close_mapping(self._map)

    def __enter__(self) -> VmmShared:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
