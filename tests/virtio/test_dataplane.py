"""The dataplane wiring (reference §14, §15.6) on a real AioContext."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qiothread.dataplane import VirtIOBlockDataPlane
from tests.virtio.harness import Disk, make_disk
from virtio.blk_defs import VirtioBlkType as T
from virtio.guest import Completion
from virtio.ring import VirtioFeature, feature_bit
from virtio.virtqueue import VirtQueue

EVENT_IDX = feature_bit(VirtioFeature.RING_EVENT_IDX)


@pytest.fixture
def disk() -> Iterator[Disk]:
    d = make_disk(num_queues=2)
    yield d
    d.close()


def reap(d: Disk, n: int, q: int = 0) -> list[Completion]:
    got: list[Completion] = []

    def enough() -> bool:
        got.extend(d.guests[q].reap())
        return len(got) >= n

    d.run(enough, blocking=True)
    return got


def test_start_registers_pollable_handlers_and_kicks_every_queue(
        disk: Disk) -> None:
    b = disk.mem.alloc(512)
    # Requests published before dataplane exists; no kick reaches it.
    for q in range(2):
        disk.guests[q].submit(T.IN, 0, [(b, 512)], kick=False)
    dp = VirtIOBlockDataPlane(disk.dev, disk.ctx)
    dp.start()
    for setup in disk.queues:
        node = disk.ctx.fd_handlers[setup.host_notifier.fileno()]
        assert node.io_poll is not None
        assert node.io_poll_begin is not None
        assert node.io_poll_end is not None
    # Every handler polls: the device does not disable polling.
    assert disk.ctx.poll_disable_cnt == 0
    assert len(reap(disk, 1, 0)) == 1 and len(reap(disk, 1, 1)) == 1
    assert [disk.dev.stats[q].kicks for q in range(2)] == [1, 1]
    dp.close()


def notification(vq: VirtQueue) -> bool:
    return vq.notification


def test_poll_begin_and_end_toggle_guest_kicks() -> None:
    d = make_disk(features_off=EVENT_IDX)     # visible as used.flags
    try:
        dp = VirtIOBlockDataPlane(d.dev, d.ctx)
        dp.start()
        vq = d.dev.vqs[0]
        node = d.ctx.fd_handlers[d.queues[0].host_notifier.fileno()]
        assert node.io_poll_begin is not None
        assert node.io_poll_end is not None
        node.io_poll_begin()
        assert notification(vq) is False
        assert d.mem.u16[vq.used >> 1] == 1      # VRING_USED_F_NO_NOTIFY
        b = d.mem.alloc(512)
        d.guests[0].submit(T.IN, 0, [(b, 512)])
        assert d.guests[0].vring.kicks_suppressed == 1
        assert node.io_poll is not None and node.io_poll()
        node.io_poll_end()
        assert notification(vq) is True
        assert d.mem.u16[vq.used >> 1] == 0
        dp.close()
    finally:
        d.close()


def test_stop_consumes_a_pending_kick_and_unregisters(disk: Disk) -> None:
    dp = VirtIOBlockDataPlane(disk.dev, disk.ctx)
    dp.start()
    disk.settle()
    b = disk.mem.alloc(512)
    disk.guests[0].submit(T.IN, 0, [(b, 512)])    # kicks
    dp.stop()
    fd = disk.queues[0].host_notifier.fileno()
    assert fd not in disk.ctx.fd_handlers
    assert disk.dev.vqs[0].inuse == 1             # popped by stop's read
    assert not disk.queues[0].host_notifier.test_and_clear()
    assert len(reap(disk, 1)) == 1
    dp.close()


def test_batched_notifications_go_through_the_dataplane_bh() -> None:
    d = make_disk(features_off=EVENT_IDX)
    try:
        dp = VirtIOBlockDataPlane(d.dev, d.ctx)
        dp.start()
        assert d.dev.batch_notifications
        b = d.mem.alloc(512)
        g = d.guests[0]
        for _ in range(5):
            g.submit(T.IN, 0, [(b, 512)], kick=False)
        g.kick()
        reap(d, 5)
        d.settle()
        st = d.dev.queue_stats(0)
        assert st["interrupts"] == 1
        assert d.queues[0].guest_notifier.test_and_clear()
        dp.close()
    finally:
        d.close()
