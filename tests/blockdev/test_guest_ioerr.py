"""Injected EIO reaches the guest as VIRTIO_BLK_S_IOERR, and only there.

The whole path in one process: a guest driver on a real split ring in
guest memory, the virtio-blk device, and a file-posix node with an O_DIRECT
image on disk behind it, for each aio engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blockdev.images import create_pattern_image, first_mismatch
from blockdev.options import open_blockdev
from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier
from tests.blockdev.conftest import run_until
from virtio.blk import QueueSetup, VirtIOBlock
from virtio.blk_defs import VirtIOBlkConf
from virtio.blk_defs import VirtioBlkStatus as S
from virtio.blk_defs import VirtioBlkType as T
from virtio.driver import DRIVER_STATS_SIZE, alloc_vring
from virtio.guest import Completion, GuestBlkDriver, negotiate_features
from virtio.memory import GuestMemory


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
def test_guest_sees_ioerr_on_exactly_the_injected_requests(
        workdir: Path, aio: str) -> None:
    img = create_pattern_image(workdir / "g.img", 1 << 20, seed=6).path
    node = open_blockdev({
        "driver": "file", "filename": str(img), "aio": aio,
        "cache.direct": "on", "faults.eio": "64k+4k:128k+4k:256k+512"})
    mem = GuestMemory.create(4 << 20)
    ctx = AioContext()
    node.attach_aio_context(ctx)
    q = QueueSetup(alloc_vring(mem, 256), EventNotifier(), EventNotifier(),
                   mem.alloc(DRIVER_STATS_SIZE, 8))
    dev = VirtIOBlock(node, VirtIOBlkConf(num_queues=1, queue_size=256),
                      [q], mem=mem)
    dev.set_features(negotiate_features(dev.host_features))
    guest = GuestBlkDriver(mem, q.layout, dev.guest_features,
                           q.host_notifier, q.guest_notifier)
    try:
        bufs = [mem.alloc(4096, 4096) for _ in range(48)]
        tags = {}
        # Every other 4 KiB block: adjacent reads would be merged by
        # virtio-blk into one request, which fails or succeeds as one.
        for i in range(48):
            tags[guest.submit(T.IN, i * 8192, [(bufs[i], 4096)],
                              kick=False)] = i
        guest.kick()
        dev.host_notifier_read(0)
        done: list[Completion] = []

        def all_done() -> bool:
            done.extend(guest.reap())
            return len(done) == 48

        run_until(ctx, all_done)
        status = {tags[c.tag]: c.status for c in done}
        injected = {8, 16, 32}        # 64 KiB, 128 KiB, 256 KiB
        assert {i for i, s in status.items() if s != S.OK} == injected
        assert all(status[i] == S.IOERR for i in injected)
        for i in set(range(48)) - injected:
            data = mem.read(bufs[i], 4096)
            assert first_mismatch(data, i * 8192, seed=6) is None
        assert node.faults is not None
        assert node.faults.injected_eio == len(injected)
    finally:
        guest.close()
        q.host_notifier.close()
        q.guest_notifier.close()
        node.close()
        ctx.close()
        _close_memory(mem)


def _close_memory(mem: Any) -> None:
    # Views handed to the backend may still be referenced by finished
    # request records until the collector runs.
    import gc
    gc.collect()
    mem.close()
