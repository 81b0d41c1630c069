"""A guest process: one fio job on one virtqueue (one vCPU).

The VMM forks the guest after its driver, rings and eventfds exist
(:mod:`qiothread.machine`), so the guest only runs:

1. say it is ready (the VMM waits until every guest and iothread is);
2. wait until the VMM releases all guests together: the *go* eventfd
   becomes readable (it is polled, never read, so that one write wakes
   every guest);
3. run the job (:func:`qiothread.fio.workload.run_job`) through its
   :class:`~virtio.guest.GuestBlkDriver`, stopping early when the VMM
   asks (the shared ``stop`` word: Ctrl-C or QMP ``quit``);
4. hand the result back: a pickle in the run's private directory, the
   CPU the guest used attached (fio's ``usr_cpu``/``sys_cpu``).

While it runs, the driver's counters (completions, kicks sent and
suppressed, interrupts) are published in guest memory at most every
:data:`PUBLISH_INTERVAL_NS`, so that the VMM's progress line and QMP
read them live, and once more at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import resource
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from qiothread.clock import MonotonicClock
from qiothread.fio.iolog import IoLog, load_iolog
from qiothread.fio.options import JobOptions
from qiothread.fio.values import FioOptionError
from qiothread.fio.workload import ReplayGenerator, job_region, run_job
from qiothread.process import ReadyChannel
from qiothread.report.model import CpuUsage
from virtio.guest import Completion, GuestBlkDriver
from virtio.memory import GuestMemory

__all__ = ["PUBLISH_INTERVAL_NS", "GuestSpec", "check_job", "guest_main"]

#: How often a running guest publishes its driver's counters.
PUBLISH_INTERVAL_NS = 50_000_000


@dataclasses.dataclass
class GuestSpec:
    """Everything one guest process needs, made by the VMM."""

    job: JobOptions
    driver: GuestBlkDriver
    mem: GuestMemory
    #: The disk's size in bytes, as the guest reads it from the config.
    capacity: int
    block_size: int
    result_path: str
    go_fd: int
    stop_requested: Callable[[], bool]


class _PublishingDriver:
    """The guest driver, publishing its counters as it reaps.

    ``run_job`` sees the driver API unchanged (``mem``, ``in_flight``,
    ``can_submit``, ``submit``, ``reap``).
    """

    def __init__(self, driver: GuestBlkDriver) -> None:
        self._d = driver
        self.mem = driver.mem
        self._next = 0

    @property
    def in_flight(self) -> int:
        return self._d.in_flight

    def can_submit(self, nbuffers: int = 1) -> bool:
        return self._d.can_submit(nbuffers)

    def submit(self, kind: int, offset: int,
               buffers: list[tuple[int, int]] | None = None, *,
               nbytes: int = 0, flags: int = 0, kick: bool = True) -> int:
        return self._d.submit(kind, offset, buffers, nbytes=nbytes,
                              flags=flags, kick=kick)

    def reap(self, block: bool = False) -> Sequence[Completion]:
        out = self._d.reap(block)
        now = time.monotonic_ns()
        if now >= self._next:
            self._d.publish_stats()
            self._next = now + PUBLISH_INTERVAL_NS
        return out

    def publish(self) -> None:
        self._d.publish_stats()


def check_job(job: JobOptions, capacity: int) -> IoLog | None:
    """What the guest will check before its first I/O, done early.

    The VMM calls this for every job once the disks are open, before
    any child exists, so that a job that does not fit its disk, or an
    iolog that cannot be read, fails the run with fio's words instead
    of a guest's traceback.  Returns the parsed iolog, if any.

    :raises FioOptionError: the disk is empty, the job's region does
        not fit it, or the iolog is unreadable, malformed or too long.
    """
    if capacity == 0:
        raise FioOptionError(
            f"{job.name}: the disk is empty (0 bytes); is the block "
            "device attached?")
    if not job.read_iolog:
        job_region(job, capacity)
        return None
    try:
        iolog = load_iolog(job.read_iolog,
                           redirect=job.replay_redirect is not None)
    except UnicodeDecodeError:
        raise FioOptionError(f"fio: '{job.read_iolog}' is not an iolog "
                             "(not text)") from None
    ReplayGenerator(iolog, capacity)
    return iolog


def _wait_go(fd: int) -> None:
    if fd < 0:
        return
    p = select.poll()
    p.register(fd, select.POLLIN)
    while not p.poll(1000):
        pass


def guest_main(spec: GuestSpec, channel: ReadyChannel) -> None:
    """The guest process (module text).  Runs in the child only."""
    iolog = check_job(spec.job, spec.capacity)
    driver = _PublishingDriver(spec.driver)
    channel.ready(pid=os.getpid())
    # What exists now lives as long as the job: keep it out of the
    # collector's full passes (several ms each, in the middle of I/O).
    gc.freeze()
    _wait_go(spec.go_fd)
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        result = run_job(driver, spec.job, MonotonicClock(),
                         disk_size=spec.capacity, iolog=iolog,
                         stop=spec.stop_requested, pid=os.getpid())
    finally:
        driver.publish()
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = dataclasses.replace(result, cpu=_cpu(before, after))
    tmp = spec.result_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, spec.result_path)


def _cpu(before: Any, after: Any) -> CpuUsage:
    return CpuUsage(
        user_s=after.ru_utime - before.ru_utime,
        system_s=after.ru_stime - before.ru_stime,
        ctx=(after.ru_nvcsw - before.ru_nvcsw)
        + (after.ru_nivcsw - before.ru_nivcsw),
        majf=after.ru_majflt - before.ru_majflt,
        minf=after.ru_minflt - before.ru_minflt)
