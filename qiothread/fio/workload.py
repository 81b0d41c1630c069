"""The I/O of one fio job, and the loop that drives it through a guest.

Generation follows fio's rules for the options it knows
(``io_u.c``, ``backend.c``):

- the job works inside ``[offset, offset + size)`` of the disk; a
  percentage offset is aligned up to the smallest block size, as fio's
  ``offset_align=0`` does; block offsets are ``offset + k * bs``;
- sequential patterns keep a cursor per direction (fio's
  ``last_pos[ddir]``) and wrap at the end of the region;
- random patterns visit every block once per pass in a random order
  (fio's random map), drawing a new order for each pass; the order
  comes from numpy's PCG64 seeded by ``randseed``, so a job is
  reproducible and ``numjobs`` clones differ.  Above 2**24 blocks the
  map would cost too much memory and offsets are drawn independently
  (fio's ``norandommap``);
- mixed patterns pick each I/O's direction at random, reads with
  probability ``rwmixread`` %, from a separate stream;
- without ``time_based`` a job stops after ``size`` bytes (one pass);
  ``runtime`` stops it earlier, counted from the job's start and
  including ``ramp_time``, which is run but not measured;
- ``rate_iops`` gives each direction a deadline for its k-th I/O,
  ``k / rate`` seconds after the start (fio's linear rate process);
- ``thinktime``: after every ``thinktime_blocks`` I/Os the job waits
  for what is in flight, then idles ``thinktime``.  A rate deadline
  also first waits for what is in flight, as fio quiesces before it
  sleeps;
- ``verify``: writes carry checkable contents
  (:mod:`qiothread.fio.verify`); reads of blocks are checked; a job
  that wrote reads every block it wrote back at the end and checks it
  (fio's ``do_verify``).  Those reads are counted as reads, as in fio.
  With verify on, a write waits for an earlier write of the same bytes
  (fio's ``serialize_overlap``), and a read that overlaps a write in
  flight is not checked: the device may order them either way.

:func:`run_job` keeps ``iodepth`` requests in flight through the guest
driver API (``virtio.guest.GuestBlkDriver``: ``submit`` returns a tag,
``reap`` returns completions stamped with CLOCK_MONOTONIC ns) and
records one row per I/O.  It takes its clock as a parameter, so tests
run it against a driver double in virtual time.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from qiothread.clock import Clock, VirtualClock
from qiothread.errors import InternalError
from qiothread.fio.iolog import IoLog, ReplayAction
from qiothread.fio.options import Ddir, FioOptionError, JobOptions
from qiothread.fio.verify import BlockVerifier
from qiothread.report.model import IoRecorder, IoStatus, JobResult
from virtio.blk_defs import VirtioBlkType

__all__ = ["CompletionLike", "GuestDriverLike", "IoGenerator",
           "PlannedIO", "ReplayGenerator", "job_region", "run_job"]

_SECTOR = 512
#: Above this many blocks a random map is not kept (fio's norandommap).
_RANDOM_MAP_MAX = 1 << 24
#: A stop request is seen within this while idling for rate/thinktime.
_STOP_SLICE_NS = 50_000_000
_OK = int(IoStatus.OK)
#: Random draws made at a time (the per-I/O path then only indexes).
_DRAW_BATCH = 4096
# The members as module constants: an enum attribute lookup costs a
# descriptor call, and these are read several times per I/O.
_READ, _WRITE, _TRIM, _SYNC = Ddir.READ, Ddir.WRITE, Ddir.TRIM, Ddir.SYNC
#: How a data direction travels on the virtio-blk wire (by ddir).
_KIND = (int(VirtioBlkType.IN), int(VirtioBlkType.OUT),
         int(VirtioBlkType.DISCARD), int(VirtioBlkType.FLUSH))


class PlannedIO(NamedTuple):
    """One I/O the job wants to issue."""

    ddir: Ddir
    offset: int  #: bytes
    length: int  #: bytes (0 for a flush)
    #: Not to be issued before this many ns after the job's start.
    not_before_ns: int = 0


def job_region(job: JobOptions, disk_size: int) -> tuple[int, int]:
    """``(offset, size)`` of the part of the disk the job works on.

    :raises FioOptionError: the region is empty, misaligned or beyond
        the disk.
    """
    min_bs = min(job.bs[d] for d in job.rw.directions)
    if job.offset.percent is not None:
        raw = job.offset.resolve(disk_size)
        offset = -(-raw // min_bs) * min_bs
    else:
        offset = job.offset.value
    if offset % _SECTOR:
        raise FioOptionError(f"{job.name}: offset={offset} is not a "
                             f"multiple of {_SECTOR} bytes")
    size = job.size.resolve(disk_size) if job.size is not None \
        else disk_size - offset
    if offset + size > disk_size:
        raise FioOptionError(
            f"{job.name}: offset {offset} + size {size} goes beyond the "
            f"disk ({disk_size} bytes)")
    if size < min_bs:
        raise FioOptionError(
            f"{job.name}: size {size} leaves no room for one block of "
            f"{min_bs} bytes")
    return offset, size


class IoGenerator:
    """The sequence of I/Os of one job (see the module notes).

    ``next()`` returns the next :class:`PlannedIO`, or None once a job
    without ``time_based`` has done ``size`` bytes.
    """

    def __init__(self, job: JobOptions, disk_size: int) -> None:
        self.job = job
        self.offset, self.size = job_region(job, disk_size)
        seeds = np.random.SeedSequence(job.randseed).spawn(2)
        self._off_rng = np.random.Generator(np.random.PCG64(seeds[0]))
        self._mix_rng = np.random.Generator(np.random.PCG64(seeds[1]))
        self._dirs = job.rw.directions
        self._random = job.rw.is_random
        self._cursor = [0, 0, 0]
        #: per block size: the current random order, consumed from the end
        self._maps: dict[int, list[int]] = {}
        self._mix: list[int] = []
        self._draws: dict[int, list[int]] = {}
        self._issued = [0, 0, 0]
        self._bytes = 0

    def _direction(self) -> Ddir:
        if len(self._dirs) == 1:
            return self._dirs[0]
        if not self._mix:
            self._mix = self._mix_rng.integers(
                0, 100, _DRAW_BATCH).tolist()[::-1]
        return _READ if self._mix.pop() < self.job.rwmixread else _WRITE

    def _random_block(self, bs: int) -> int:
        nblocks = self.size // bs
        if nblocks > _RANDOM_MAP_MAX:
            draws = self._draws.setdefault(bs, [])
            if not draws:
                draws += self._off_rng.integers(
                    0, nblocks, _DRAW_BATCH).tolist()[::-1]
            return draws.pop()
        order = self._maps.get(bs)
        if not order:
            # A new pass: every block once, in a new random order.
            order = self._off_rng.permutation(nblocks).tolist()[::-1]
            self._maps[bs] = order
        return order.pop()

    def _sequential_block(self, ddir: Ddir, bs: int) -> int:
        block = self._cursor[ddir] % (self.size // bs)
        self._cursor[ddir] = block + 1
        return block

    def next(self) -> PlannedIO | None:
        """The next I/O, or None when the job's bytes are done."""
        job = self.job
        if not job.time_based and self._bytes >= self.size:
            return None
        ddir = self._direction()
        bs = job.bs[ddir]
        block = self._random_block(bs) if self._random \
            else self._sequential_block(ddir, bs)
        rate = job.rate_iops[ddir]
        k = self._issued[ddir]
        self._issued[ddir] = k + 1
        self._bytes += bs
        return PlannedIO(ddir, self.offset + block * bs, bs,
                         k * 1_000_000_000 // rate if rate else 0)

    def __iter__(self) -> Iterator[PlannedIO]:
        while (io := self.next()) is not None:
            yield io


_REPLAY_DDIR = {
    ReplayAction.READ: Ddir.READ, ReplayAction.WRITE: Ddir.WRITE,
    ReplayAction.TRIM: Ddir.TRIM, ReplayAction.SYNC: Ddir.SYNC,
    ReplayAction.DATASYNC: Ddir.SYNC}


class ReplayGenerator:
    """The I/Os of an fio iolog, timed by the log."""

    def __init__(self, log: IoLog, disk_size: int) -> None:
        if log.max_end > disk_size:
            raise FioOptionError(
                f"iolog reaches byte {log.max_end}, beyond the disk "
                f"({disk_size} bytes)")
        self._ios = iter(log.ios)

    def next(self) -> PlannedIO | None:
        """The next I/O of the log, or None at its end."""
        io = next(self._ios, None)
        if io is None:
            return None
        return PlannedIO(_REPLAY_DDIR[io.action], io.offset, io.length,
                         io.t_ns)


class _MemoryLike(Protocol):
    # Any: an mmap for real guest memory, a bytearray in tests; both
    # are writable buffers (typing has no Buffer type before 3.12).
    @property
    def buf(self) -> Any: ...

    def alloc(self, length: int, align: int = 16) -> int: ...


class CompletionLike(Protocol):
    """What :func:`run_job` reads of a completion."""

    @property
    def tag(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def t_submit(self) -> int: ...
    @property
    def t_complete(self) -> int: ...


class GuestDriverLike(Protocol):
    """The part of ``virtio.guest.GuestBlkDriver`` a job uses."""

    @property
    def mem(self) -> _MemoryLike: ...

    @property
    def in_flight(self) -> int: ...

    def can_submit(self, nbuffers: int = 1) -> bool: ...

    def submit(self, kind: int, offset: int,
               buffers: list[tuple[int, int]] | None = None, *,
               nbytes: int = 0, flags: int = 0,
               kick: bool = True) -> int: ...

    def reap(self, block: bool = False) -> Sequence[CompletionLike]: ...


def _real_sleep_until(clock: Clock, deadline_ns: int) -> None:
    while (left := deadline_ns - clock.now_ns()) > 0:
        # Sleep most of the way, then let the loop re-check: a sleep
        # overshoots by the timer slack, which pacing must not add.
        time.sleep(max(left - 100_000, 0) / 1e9 if left > 200_000
                   else 0)


def _default_sleeper(clock: Clock) -> Callable[[int], None]:
    if isinstance(clock, VirtualClock):
        def virtual(deadline_ns: int) -> None:
            if deadline_ns > clock.now_ns():
                clock.set(deadline_ns)
        return virtual
    return lambda deadline_ns: _real_sleep_until(clock, deadline_ns)


@dataclasses.dataclass(slots=True)
class _InFlight:
    io: PlannedIO
    addr: int  # guest address of its buffer (0 for trim/flush)
    slot: int
    t_start: int
    depth: int
    verify: bool  # check the data when it completes


class _JobRun:
    """State of one :func:`run_job` call (one owner, one thread)."""

    def __init__(self, driver: GuestDriverLike, job: JobOptions,
                 clock: Clock, sleep_until: Callable[[int], None],
                 stop: Callable[[], bool]) -> None:
        self.driver = driver
        self.job = job
        self.clock = clock
        self.sleep_until = sleep_until
        self.stop = stop
        self.recorder = IoRecorder()
        self.verifier = BlockVerifier(job) if job.verify_enabled else None
        self.inflight: dict[int, _InFlight] = {}
        slot_size = max(max(job.bs), _SECTOR)
        self.slot_size = -(-slot_size // 4096) * 4096
        self.base = driver.mem.alloc(self.slot_size * job.iodepth, 4096)
        self.free_slots = list(range(job.iodepth))
        self.reap_batches: list[int] = []
        self.error = 0
        self.stopped = False

    # -- completion side ----------------------------------------------

    def _buf(self) -> memoryview:
        return memoryview(self.driver.mem.buf)

    def reap(self, block: bool) -> None:
        comps = self.driver.reap(block=block)
        if not comps:
            return
        self.reap_batches.append(len(comps))
        inflight = self.inflight
        append = self.recorder.append
        for c in comps:
            fl = inflight.pop(c.tag)
            self.free_slots.append(fl.slot)
            status = c.status
            if status != _OK:
                if not self.error:
                    self.error = errno.EIO
            elif fl.verify and self.verifier is not None:
                data = self._buf()[fl.addr:fl.addr + fl.io.length]
                self.verifier.check(fl.io.offset, data)
            io = fl.io
            append(io.ddir, io.offset, io.length, fl.t_start, c.t_submit,
                   c.t_complete, status, fl.depth,
                   getattr(c, "t_pickup", 0), getattr(c, "t_done", 0))

    def quiesce(self) -> None:
        """Wait for everything in flight (fio's ``io_u_quiesce``)."""
        while self.inflight:
            self.reap(block=True)

    # -- submission side ----------------------------------------------

    def _overlapping(self, io: PlannedIO) -> list[_InFlight]:
        end = io.offset + io.length
        return [fl for fl in self.inflight.values()
                if fl.io.offset < end and io.offset < fl.io.offset +
                fl.io.length and fl.io.ddir != _SYNC]

    def _write_overlaps_write(self, io: PlannedIO) -> bool:
        """With verify, two writes of the same bytes are never in flight
        together (fio's ``serialize_overlap``): the device may complete
        them in either order, and the check could not know which won."""
        if self.verifier is None or io.ddir not in (_WRITE, _TRIM):
            return False
        return any(fl.io.ddir in (_WRITE, _TRIM)
                   for fl in self._overlapping(io))

    def _verify_read(self, io: PlannedIO) -> bool:
        """Whether a read's data can be checked.  Not while a write or
        trim of the same bytes is in flight: the read may see either
        version, and the device may order them either way."""
        assert self.verifier is not None
        if not self.verifier.should_check(io.offset):
            return False
        return all(fl.io.ddir == _READ for fl in self._overlapping(io))

    def _prepare_write(self, io: PlannedIO, addr: int) -> None:
        assert self.verifier is not None
        # Reads in flight over these bytes may now see the old or the
        # new block: stop trusting them.
        for fl in self._overlapping(io):
            fl.verify = False
        if io.ddir == _WRITE:
            self._buf()[addr:addr + io.length] = \
                self.verifier.make_block(io.offset, io.length)
        else:
            self.verifier.forget(io.offset, io.length)

    def submit(self, io: PlannedIO) -> None:
        slot = self.free_slots.pop()
        addr = self.base + slot * self.slot_size
        verify = False
        ddir = io.ddir
        buffers = [(addr, io.length)] if ddir <= _WRITE else None
        if self.verifier is not None:
            if ddir in (_WRITE, _TRIM):
                self._prepare_write(io, addr)
            elif ddir == _READ:
                verify = self._verify_read(io)
        t_start = self.clock.now_ns()
        tag = self.driver.submit(_KIND[ddir], io.offset, buffers,
                                 nbytes=io.length if ddir == _TRIM else 0)
        self.inflight[tag] = _InFlight(io, addr, slot, t_start,
                                       len(self.inflight) + 1, verify)

    def pause_until(self, deadline_ns: int) -> None:
        """Idle until ``deadline_ns``, in slices short enough that a
        stop request is seen within 50 ms."""
        clock = self.clock
        while (now := clock.now_ns()) < deadline_ns:
            if self.stop():
                self.stopped = True
                return
            self.sleep_until(min(deadline_ns, now + _STOP_SLICE_NS))

    def drive(self, source: Callable[[], PlannedIO | None], start: int,
              end: int | None, paced: bool) -> None:
        """Issue everything ``source`` gives until it ends, ``end``
        passes or a stop is asked, keeping ``iodepth`` in flight."""
        job = self.job
        pending: PlannedIO | None = None
        since_think = 0
        exhausted = False
        while True:
            if self.stop():
                self.stopped = True
            done = (exhausted or self.stopped or self.error != 0 or
                    (end is not None and self.clock.now_ns() >= end))
            if done:
                self.quiesce()
                return
            if len(self.inflight) < job.iodepth and \
                    self.driver.can_submit(1):
                if pending is None:
                    pending = source()
                    if pending is None:
                        exhausted = True
                        continue
                due = start + pending.not_before_ns if paced else 0
                if due > self.clock.now_ns():
                    self.quiesce()
                    self.pause_until(due if end is None else min(due, end))
                    continue
                if self._write_overlaps_write(pending):
                    self.reap(block=True)
                    continue
                self.submit(pending)
                pending = None
                since_think += 1
                if job.thinktime_ns and since_think >= \
                        job.thinktime_blocks:
                    since_think = 0
                    self.quiesce()
                    self.pause_until(self.clock.now_ns() +
                                     job.thinktime_ns)
                continue
            if not self.inflight:
                raise InternalError(
                    "the virtqueue has no room for one request with "
                    "nothing in flight")
            self.reap(block=True)

    def verify_phase(self) -> None:
        """Read back every block this job wrote, checking each."""
        assert self.verifier is not None
        written = sorted(self.verifier.written.items())
        it = iter(written)

        def source() -> PlannedIO | None:
            item = next(it, None)
            if item is None:
                return None
            offset, (_, length) = item
            return PlannedIO(Ddir.READ, offset, length)
        self.drive(source, self.clock.now_ns(), None, paced=False)


def run_job(driver: GuestDriverLike, job: JobOptions, clock: Clock, *,
            disk_size: int, iolog: IoLog | None = None,
            stop: Callable[[], bool] | None = None,
            sleep_until: Callable[[int], None] | None = None,
            pid: int = 0) -> JobResult:
    """Run one job through ``driver`` and return what it measured.

    :param disk_size: the disk's size in bytes (for ``size``/``offset``
        percentages and range checks).
    :param iolog: replay this log instead of generating I/O.
    :param stop: polled between I/Os; True stops the job (Ctrl-C); what
        was measured is still returned, with ``stopped_early`` set.
    :param sleep_until: waits until a CLOCK_MONOTONIC deadline; by
        default advances a :class:`VirtualClock` or sleeps for real.
    :raises FioOptionError: the job does not fit the disk.
    """
    generator: IoGenerator | ReplayGenerator = (
        ReplayGenerator(iolog, disk_size) if iolog is not None
        else IoGenerator(job, disk_size))
    run = _JobRun(driver, job, clock,
                  sleep_until or _default_sleeper(clock),
                  stop or (lambda: False))
    start = clock.now_ns()
    end = start + job.ramp_time_ns + job.runtime_ns \
        if job.runtime_ns else None
    run.drive(generator.next, start, end, paced=True)
    # fio's do_verify: read back what was written, unless stopped.
    verify_start = 0
    if run.verifier is not None and job.do_verify and \
            run.verifier.written and not run.stopped and not run.error:
        verify_start = clock.now_ns()
        run.verify_phase()
    end_ns = clock.now_ns()
    v = run.verifier
    return JobResult(
        options=job, records=run.recorder.freeze(), start_ns=start,
        end_ns=end_ns,
        verify_checked=v.checked if v else 0,
        verify_mismatches=v.mismatches if v else 0,
        verify_errors=tuple(v.errors) if v else (),
        reap_batches=np.asarray(run.reap_batches, dtype=np.int64),
        # fio ends a job whose data failed verification with EILSEQ.
        pid=pid, error=run.error or (errno.EILSEQ if v and v.mismatches
                                     else 0),
        stopped_early=run.stopped,
        verify_start_ns=verify_start)
