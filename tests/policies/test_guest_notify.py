"""8.2: guest notifications deferred and batched (the real device).

A guest that re-arms its interrupt (EVENT_IDX ``used_event``) after
every completion it sees wants one interrupt per request.  QEMU 7.2 -
8.1 then write the irqfd once per completed request; 8.2 decides per
request but defers the write to the end of the completion batch's
defer_call section, so one write covers the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from qiothread.dataplane import VirtIOBlockDataPlane
from qiothread.policy import make_policy
from tests.virtio.harness import Disk, make_disk
from virtio.blk_defs import VirtioBlkType as T


class _ReapingBackend:
    """The disk's backend, with the guest reaping (and re-arming its
    interrupt) right after each request's completion callback -- what
    a guest vCPU on another CPU does while the device completes more."""

    def __init__(self, disk: Disk) -> None:
        self.inner = disk.bs
        self.disk = disk
        self.reaped = 0

    def _wrap(self, cb: Callable[[int], None]) -> Callable[[int], None]:
        def done(ret: int) -> None:
            cb(ret)
            guest = self.disk.guests[0]
            self.reaped += len(guest.reap())
            assert guest.vring.enable_cb()      # wants the next one
        return done

    def preadv(self, offset: int, iov: Any, cb: Callable[[int], None],
               *args: Any, **kw: Any) -> None:
        self.inner.preadv(offset, iov, self._wrap(cb), *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _irqfd_writes(policy: str, n: int = 8) -> tuple[int, int, int]:
    disk = make_disk(queue_size=32)
    try:
        disk.ctx.policy = make_policy(policy)
        backend = _ReapingBackend(disk)
        disk.dev.bs = backend  # type: ignore[assignment]
        dp = VirtIOBlockDataPlane(disk.dev, disk.ctx)
        dp.start()
        guest = disk.guests[0]
        guest.vring.enable_cb()              # arm the first interrupt
        bufs = [disk.mem.alloc(512) for _ in range(n)]
        for i, b in enumerate(bufs):
            # 1 KiB apart: no two requests merge into one.
            guest.submit(T.IN, 1024 * i, [(b, 512)], kick=i == n - 1)
        disk.run(lambda: backend.reaped >= n, blocking=True)
        disk.settle()
        stats = disk.dev.stats[0]
        writes = stats.interrupts
        fd_writes = int(disk.queues[0].guest_notifier.test_and_clear())
        dp.close()
        return writes, stats.interrupts_suppressed, fd_writes
    finally:
        disk.close()


@pytest.mark.parametrize("policy", ["7.2", "8.0"])
def test_before_82_every_wanted_interrupt_is_a_write(policy: str) -> None:
    writes, suppressed, readable = _irqfd_writes(policy)
    assert (writes, suppressed, readable) == (8, 0, 1)


def test_82_writes_once_per_completion_batch() -> None:
    writes, suppressed, readable = _irqfd_writes("8.2")
    # Eight decisions to notify, one deferred write at the end of the
    # backend's completion batch.
    assert (writes, suppressed, readable) == (1, 0, 1)
