"""The device's QEMU trace events: names, argument text, and that every
call site passes the arguments its format wants (a mismatch only shows
when the event is enabled)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from qiothread import trace
from qiothread.dataplane import VirtIOBlockDataPlane
from tests.virtio.harness import make_disk
from virtio.blk_defs import VirtioBlkType as T
from virtio.guest import Completion


@pytest.fixture
def trace_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "trace.log"
    old = trace.sink_fileno()
    trace.configure(["virtio*", "virtqueue*"], file=str(path))
    yield path
    trace.disable_all()
    fd = trace.sink_fileno()
    trace.flush_to(old)
    os.close(fd)


def test_device_trace_lines(trace_file: Path) -> None:
    d = make_disk(queue_size=128, record=True)
    try:
        g = d.guests[0]
        b = d.mem.alloc(8 * 4096, 4096)
        for i in (0, 1, 2, 3, 5, 6, 7, 8):        # a gap at block 4
            g.submit(T.OUT, i * 4096, [(b, 4096)], kick=False)
        g.submit(T.GET_ID, 0, [(b, 20)], kick=False)
        g.submit(T.IN, 1 << 30, [(b, 512)], kick=False)   # IOERR
        g.kick()
        d.dev.host_notifier_read(0)
        got: list[Completion] = []

        def ten() -> bool:
            got.extend(g.reap())
            return len(got) == 10

        d.run(ten)
        dp = VirtIOBlockDataPlane(d.dev, d.ctx)
        dp.start()
        dp.close()
    finally:
        d.close()
    text = trace_file.read_text()
    ptr = r"0x[0-9a-f]+"
    expect = [
        rf"^virtio_queue_notify vdev {ptr} n 0 vq {ptr}$",
        rf"^virtqueue_pop vq {ptr} elem {ptr} in_num 1 out_num 2$",
        rf"^virtio_blk_handle_write vdev {ptr} req {ptr} sector 8 "
        r"nsectors 8$",
        rf"^virtio_blk_handle_read vdev {ptr} req {ptr} sector 2097152 "
        r"nsectors 1$",
        rf"^virtio_blk_submit_multireq vdev {ptr} mrb {ptr} start 0 "
        r"num_reqs 4 offset 0 size 16384 is_write 1$",
        rf"^virtio_blk_submit_multireq vdev {ptr} mrb {ptr} start 4 "
        r"num_reqs 4 offset 20480 size 16384 is_write 1$",
        rf"^virtio_blk_rw_complete vdev {ptr} req {ptr} ret 0$",
        rf"^virtio_blk_req_complete vdev {ptr} req {ptr} status 1$",
        rf"^virtio_blk_req_complete vdev {ptr} req {ptr} status 0$",
        rf"^virtqueue_fill vq {ptr} elem {ptr} len 1 idx 0$",
        rf"^virtqueue_flush vq {ptr} count 1$",
        rf"^virtio_notify vdev {ptr} vq {ptr}$",
        rf"^virtio_blk_data_plane_start dataplane {ptr}$",
        rf"^virtio_blk_data_plane_stop dataplane {ptr}$",
    ]
    for pattern in expect:
        assert re.search(pattern, text, re.M), pattern
