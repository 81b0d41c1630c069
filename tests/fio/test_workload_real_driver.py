"""run_job through the real guest driver: real guest memory (memfd),
a real split ring, real eventfds and the real virtio-blk device with
the in-memory backend, its AioContext turned by a second thread (the
iothread's role)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from qiothread.clock import MonotonicClock
from qiothread.fio.options import JobOptions, parse_fio_args
from qiothread.fio.workload import run_job
from qiothread.report.fio_json import build_fio_json
from qiothread.report.model import RunReport
from tests.virtio.harness import Disk, make_disk
from virtio.blk import VirtIOBlock
from virtio.blk_defs import VirtIOBlkConf
from virtio.guest import GuestBlkDriver

DISK = 1 << 20


class Iothread:
    """Turns ``disk.ctx`` in a thread until stopped."""

    def __init__(self, disk: Disk, dev: VirtIOBlock) -> None:
        self.ctx = disk.ctx
        self._stop = False
        q = disk.queues[0]
        self.ctx.set_event_notifier(
            q.host_notifier, lambda: dev.host_notifier_read(0),
            lambda: dev.host_notifier_poll(0),
            lambda: dev.host_notifier_poll_ready(0))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.ctx.aio_poll(True)

    def stop(self) -> None:
        self._stop = True
        self.ctx.notify()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture
def guest() -> Iterator[GuestBlkDriver]:
    d = make_disk(size=DISK, queue_size=64, guest=False)
    q = d.queues[0]
    q.stamp_table = d.mem.alloc(16 * q.layout.num, 8)
    dev = VirtIOBlock(d.bs, VirtIOBlkConf(num_queues=1, queue_size=64),
                      [q], mem=d.mem)
    drv = GuestBlkDriver(d.mem, q.layout, dev.guest_features,
                         q.host_notifier, q.guest_notifier,
                         stamp_table=q.stamp_table)
    io = Iothread(d, dev)
    try:
        yield drv
    finally:
        io.stop()
        d.ctx.set_event_notifier(q.host_notifier, None)
        drv.close()
        d.close()


def job(*args: str) -> JobOptions:
    return JobOptions().with_options(parse_fio_args(args))


def test_write_verify_through_the_real_driver(
        guest: GuestBlkDriver) -> None:
    j = job("--name=real", "--rw=randwrite", "--bs=4k", "--size=256k",
            "--iodepth=8", "--verify=crc32c")
    res = run_job(guest, j, MonotonicClock(), disk_size=DISK)
    assert res.error == 0
    assert (res.verify_checked, res.verify_mismatches) == (64, 0)
    r = res.records
    assert len(r) == 128
    assert (r.status == 0).all()
    assert sorted(r.offset[r.ddir == 1].tolist()) == \
        [k * 4096 for k in range(64)]
    assert max(r.depth.tolist()) <= 8
    # Every stage was stamped by the device and is in order.
    assert (r.t_submit <= r.t_pickup).all()
    assert (r.t_pickup <= r.t_done).all()
    assert (r.t_done <= r.t_complete).all()
    doc = build_fio_json(RunReport(jobs=[res]))
    assert doc["jobs"][0]["write"]["total_ios"] == 64
    assert doc["jobs"][0]["read"]["total_ios"] == 64
    assert doc["qiothread"]["jobs"][0]["stages"]["pickup_to_done"][
        "N"] == 128


def test_mixed_replay_of_trim_and_flush(guest: GuestBlkDriver) -> None:
    from qiothread.fio.iolog import parse_iolog
    log = parse_iolog("fio version 2 iolog\n/d add\n/d open\n"
                      "/d write 0 8192\n/d trim 0 4096\n/d sync 0 0\n"
                      "/d read 0 8192\n")
    res = run_job(guest, job("--iodepth=1"), MonotonicClock(),
                  disk_size=DISK, iolog=log)
    assert res.records.ddir.tolist() == [1, 2, 3, 0]
    assert (res.records.status == 0).all()
