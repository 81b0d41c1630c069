"""A whole virtio-blk disk in one process, for tests.

Real guest memory (memfd), real eventfds, the real device, the real
guest driver and the in-memory backend completing through BHs of a real
AioContext.  :meth:`Disk.run` turns the loop until a condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockdev.memory import MemoryBackend
from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier
from virtio.blk import QueueSetup, VirtIOBlock
from virtio.blk_defs import VirtIOBlkConf
from virtio.driver import DRIVER_STATS_SIZE, VringDriver, alloc_vring
from virtio.guest import GuestBlkDriver, negotiate_features
from virtio.memory import GuestMemory


@dataclass
class Disk:
    mem: GuestMemory
    ctx: AioContext
    bs: MemoryBackend
    dev: VirtIOBlock
    queues: list[QueueSetup]
    guests: list[GuestBlkDriver] = field(default_factory=list)
    raw: dict[int, VringDriver] = field(default_factory=dict)

    def run(self, cond: Callable[[], bool], timeout_s: float = 20.0,
            blocking: bool = False) -> None:
        """aio_poll until ``cond()``; fail after ``timeout_s``.

        Non-blocking iterations run BHs and polled handlers only: a 7.2
        context with every handler pollable skips the fd wait when the
        timeout is 0.  ``blocking`` waits on the fds too, woken at least
        every 50 ms by a timer.
        """
        deadline = time.monotonic() + timeout_s
        ctx = self.ctx

        # Re-armed from its own callback only: arming notifies the
        # context, and a notified context skips one fd wait.
        def rearm() -> None:
            tick.mod_ns(ctx.clock.now_ns() + 50_000_000)

        tick = ctx.timer_new_ns(rearm)
        if blocking:
            rearm()
        try:
            while not cond():
                ctx.aio_poll(blocking)
                if time.monotonic() > deadline:
                    raise AssertionError("condition not reached")
        finally:
            tick.del_()

    def settle(self) -> None:
        """Run the loop until nothing is pending."""
        while self.ctx.aio_poll(False):
            pass

    def close(self) -> None:
        for g in self.guests:
            g.close()
        for q in self.queues:
            q.host_notifier.close()
            q.guest_notifier.close()
        self.bs.close()
        self.ctx.close()
        self.mem.close()


def make_disk(*, size: int = 1 << 20, queue_size: int = 16,
              num_queues: int = 1, mem_size: int = 4 << 20,
              features_off: int = 0, record: bool = False,
              guest: bool = True, use_indirect: bool = False,
              conf: VirtIOBlkConf | None = None,
              lbs: int = 512) -> Disk:
    """A disk of ``size`` bytes with ``num_queues`` queues.

    ``lbs`` is both the backend's block size and the device's
    ``logical_block_size`` (and ``physical_block_size``) property: a
    device takes only its own, as QEMU's does.
    """
    mem = GuestMemory.create(mem_size)
    ctx = AioContext()
    bs = MemoryBackend(size, record=record, logical_block_size=lbs)
    bs.attach_aio_context(ctx)
    if conf is None:
        conf = VirtIOBlkConf(num_queues=num_queues, queue_size=queue_size,
                             logical_block_size=lbs,
                             physical_block_size=lbs)
    queue_size = conf.queue_size
    num_queues = conf.num_queues
    queues = []
    for _ in range(num_queues):
        queues.append(QueueSetup(
            alloc_vring(mem, queue_size), EventNotifier(), EventNotifier(),
            mem.alloc(DRIVER_STATS_SIZE, 8)))
    dev = VirtIOBlock(bs, conf, queues, mem=mem)
    dev.set_features(negotiate_features(dev.host_features)
                     & ~features_off)
    disk = Disk(mem, ctx, bs, dev, queues)
    if guest:
        for q in queues:
            disk.guests.append(GuestBlkDriver(
                mem, q.layout, dev.guest_features, q.host_notifier,
                q.guest_notifier, use_indirect=use_indirect,
                stats_addr=q.driver_stats))
    return disk


def raw_driver(disk: Disk, index: int = 0) -> VringDriver:
    """The bare ring driver of queue ``index`` (for hand-made chains);
    one per queue, and not with a GuestBlkDriver on the same queue."""
    if index not in disk.raw:
        q = disk.queues[index]
        disk.raw[index] = VringDriver(disk.mem, q.layout,
                                      disk.dev.guest_features,
                                      q.host_notifier)
    return disk.raw[index]
