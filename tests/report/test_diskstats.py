"""fio's disk_util from /sys/block: real O_DIRECT writes are counted."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from qiothread.report.diskstats import (
    DiskStat,
    block_device_name,
    disk_util,
    read_diskstat,
)


def test_disk_util_arithmetic() -> None:
    a = DiskStat("vda", 10, 1, 100, 20, 2, 200, 1000, 5000)
    b = DiskStat("vda", 15, 1, 130, 28, 5, 260, 1250, 5600)
    u = disk_util(a, b, elapsed_ms=500)
    assert (u.name, u.read_ios, u.write_ios, u.read_merges,
            u.write_merges, u.read_ticks, u.write_ticks, u.in_queue) == (
        "vda", 5, 8, 0, 3, 30, 60, 600)
    assert u.util == 50.0
    assert disk_util(a, b, 0).util == 0.0


def test_real_writes_are_counted() -> None:
    path = Path("/var/tmp") / f"qiothread-diskstats-{os.getpid()}.dat"
    try:
        path.write_bytes(b"\0" * (1 << 20))
        name = block_device_name(path)
        if name is None:
            pytest.skip("/var/tmp is not on a block device")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            pytest.skip("O_DIRECT refused on /var/tmp")
        buf = mmap.mmap(-1, 4096)
        buf.write(b"q" * 4096)
        before = read_diskstat(name)
        try:
            for i in range(16):
                os.pwrite(fd, buf, i * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()
        after = read_diskstat(name)
        u = disk_util(before, after, elapsed_ms=1000)
        # 16 direct writes reach the disk, merged or not.
        assert u.write_ios + u.write_merges >= 16
    finally:
        path.unlink(missing_ok=True)


def test_block_device_itself() -> None:
    for dev in ("/dev/loop0", "/dev/vda", "/dev/sda"):
        if os.path.exists(dev):
            assert block_device_name(dev) == os.path.basename(dev)
            break
    else:
        pytest.skip("no known block device node")


def test_no_block_device_for_tmpfs() -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    p = Path("/dev/shm") / f"qiothread-ds-{os.getpid()}"
    p.write_bytes(b"x")
    try:
        assert block_device_name(p) is None
    finally:
        p.unlink()
