"""fio's ``disk_util``: what the host block device saw during a run.

fio reads ``/sys/block/<dev>/stat`` before and after a job and reports
the differences.  The file's fields (Documentation/block/stat.rst):

====  ===============  ==========================================
 1    read I/Os        requests completed
 2    read merges      requests merged into queued ones
 3    read sectors     512-byte units
 4    read ticks       ms spent by reads (summed over requests)
 5-8  the same for writes
 9    in_flight        requests in flight now (not a counter)
 10   io_ticks         ms the device had I/O in flight
 11   time_in_queue    ms, weighted by requests in flight
====  ===============  ==========================================

``util`` is ``io_ticks`` over the elapsed time, in percent.  The device
of a regular file is the disk holding its file system: ``st_dev`` names
a partition or a whole disk through ``/sys/dev/block/MAJ:MIN``; for a
partition fio reports the disk it is on.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from qiothread.report.model import DiskUtil

__all__ = ["DiskStat", "block_device_name", "disk_util", "read_diskstat"]


@dataclasses.dataclass(frozen=True)
class DiskStat:
    """The counters of ``/sys/block/<name>/stat`` at one moment."""

    name: str
    read_ios: int
    read_merges: int
    read_ticks: int
    write_ios: int
    write_merges: int
    write_ticks: int
    io_ticks: int
    time_in_queue: int


def read_diskstat(name: str, sys_block: Path = Path("/sys/block")
                  ) -> DiskStat:
    """Read the counters of block device ``name`` (``vda``, ``loop0``).

    :raises FileNotFoundError: no such device.
    """
    fields = [int(x) for x in (sys_block / name / "stat").read_text()
              .split()]
    return DiskStat(name=name, read_ios=fields[0], read_merges=fields[1],
                    read_ticks=fields[3], write_ios=fields[4],
                    write_merges=fields[5], write_ticks=fields[7],
                    io_ticks=fields[9], time_in_queue=fields[10])


def block_device_name(path: str | os.PathLike[str],
                      sys_dev: Path = Path("/sys/dev/block")
                      ) -> str | None:
    """The whole-disk name under /sys/block for ``path``: the device
    itself for a block device, the disk of its file system for a file.
    None when the file system has no block device (tmpfs, overlay)."""
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    link = sys_dev / f"{os.major(dev)}:{os.minor(dev)}"
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError:
        return None
    # A partition's directory holds a "partition" file and sits inside
    # its disk's directory.
    if (target / "partition").exists():
        target = target.parent
    return target.name


def disk_util(before: DiskStat, after: DiskStat,
              elapsed_ms: int) -> DiskUtil:
    """fio's ``disk_util`` entry from two snapshots ``elapsed_ms``
    apart."""
    io_ticks = after.io_ticks - before.io_ticks
    util = min(100.0, io_ticks * 100.0 / elapsed_ms) if elapsed_ms else 0.0
    return DiskUtil(
        name=after.name,
        read_ios=after.read_ios - before.read_ios,
        write_ios=after.write_ios - before.write_ios,
        read_merges=after.read_merges - before.read_merges,
        write_merges=after.write_merges - before.write_merges,
        read_ticks=after.read_ticks - before.read_ticks,
        write_ticks=after.write_ticks - before.write_ticks,
        in_queue=after.time_in_queue - before.time_in_queue,
        util=util)
