"""An in-process guest driver double that completes in virtual time.

It keeps the disk in a bytearray and moves data at submit time; each
request completes ``service_ns`` after the later of its submission and
the previous completion (a FIFO device).  ``reap(block=True)`` moves the
virtual clock to the next completion, so a whole job runs in virtual
time with exact, predictable timestamps.  Hooks let a test corrupt or
misdirect data to prove that verify notices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qiothread.clock import VirtualClock
from virtio.blk_defs import VirtioBlkType


class Memory:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self._next = 0

    def alloc(self, length: int, align: int = 16) -> int:
        addr = -(-self._next // align) * align
        if addr + length > len(self.buf):
            raise MemoryError("double guest memory exhausted")
        self._next = addr + length
        return addr


@dataclasses.dataclass
class DoneIO:
    tag: int
    status: int
    t_submit: int
    t_complete: int
    kind: int = 0
    offset: int = 0
    length: int = 0


class DriverDouble:
    def __init__(self, clock: VirtualClock, disk_size: int,
                 service_ns: int = 10_000, queue_size: int = 256,
                 mem_size: int = 4 << 20, defer_data: bool = False,
                 lifo: bool = False) -> None:
        self.clock = clock
        self.disk = bytearray(disk_size)
        self.mem = Memory(mem_size)
        self.service_ns = service_ns
        #: move data when a request completes instead of at submit
        self.defer_data = defer_data
        #: complete the newest pending request first (a device that
        #: reorders); each still takes ``service_ns``
        self.lifo = lifo
        self._deferred: dict[int, tuple[int, int, list[tuple[int, int]],
                                        int]] = {}
        self.queue_size = queue_size
        self.pending: list[DoneIO] = []
        self.log: list[DoneIO] = []  # every request, in submit order
        self._tag = 0
        self._last = 0
        #: (offset, length) -> status byte to answer instead of OK
        self.fail: dict[int, int] = {}
        #: called with (offset, data) for writes; returns (offset, data)
        self.on_write: Callable[[int, bytes], tuple[int, bytes]] | None = \
            None

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def can_submit(self, nbuffers: int = 1) -> bool:
        return len(self.pending) < self.queue_size

    def submit(self, kind: int, offset: int,
               buffers: list[tuple[int, int]] | None = None, *,
               nbytes: int = 0, flags: int = 0, kick: bool = True) -> int:
        assert offset % 512 == 0
        now = self.clock.now_ns()
        length = sum(n for _, n in buffers or []) or nbytes
        status = self.fail.get(offset, 0)
        if status == 0 and not self.defer_data:
            self._move(kind, offset, buffers or [], nbytes)
        elif status == 0:
            self._deferred[self._tag] = (kind, offset, list(buffers or []),
                                         nbytes)
        done = max(now, self._last) + self.service_ns
        self._last = done
        io = DoneIO(self._tag, status, now, done, kind, offset, length)
        self._tag += 1
        self.pending.append(io)
        self.log.append(io)
        return io.tag

    def _move(self, kind: int, offset: int,
              buffers: list[tuple[int, int]], nbytes: int) -> None:
        pos = offset
        for addr, n in buffers:
            if kind == VirtioBlkType.IN:
                self.mem.buf[addr:addr + n] = self.disk[pos:pos + n]
            elif kind == VirtioBlkType.OUT:
                data = bytes(self.mem.buf[addr:addr + n])
                where = pos
                if self.on_write is not None:
                    where, data = self.on_write(pos, data)
                self.disk[where:where + n] = data
            pos += n
        if kind == VirtioBlkType.DISCARD:
            self.disk[offset:offset + nbytes] = bytes(nbytes)

    def reap(self, block: bool = False) -> list[DoneIO]:
        now = self.clock.now_ns()
        if block and self.pending and \
                min(p.t_complete for p in self.pending) > now:
            now = min(p.t_complete for p in self.pending)
            self.clock.set(now)
        ready = [p for p in self.pending if p.t_complete <= now]
        self.pending = [p for p in self.pending if p.t_complete > now]
        if self.lifo and self.pending and ready:
            # Hand back the newest request's completion in place of the
            # oldest: same completion times, reversed request order.
            swap = self.pending.pop()
            oldest = ready.pop(0)
            swap.t_complete, oldest.t_complete = oldest.t_complete, \
                swap.t_complete
            self.pending.insert(0, oldest)
            ready.insert(0, swap)
        for p in ready:
            op = self._deferred.pop(p.tag, None)
            if op is not None:
                self._move(*op)
        return ready
