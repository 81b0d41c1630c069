"""What a run measured, as plain data the reports are made from.

The guest fills :class:`IoRecords` (one row per I/O) and a
:class:`JobResult` per job; the main process fills the qiothread
section -- :class:`IOThreadStats` per iothread, :class:`QueueStats` per
virtqueue, :class:`StageLatency` per request stage -- and gathers it
all in a :class:`RunReport`.  The report modules
(:mod:`~qiothread.report.fio_json`, :mod:`~qiothread.report.summary`,
:mod:`~qiothread.report.latlog`) only read these.

Times are ``CLOCK_MONOTONIC`` nanoseconds, comparable across processes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from qiothread.fio.options import JobOptions

__all__ = [
    "CpuUsage",
    "DiskUtil",
    "IOThreadStats",
    "IoRecorder",
    "IoRecords",
    "IoStatus",
    "JobResult",
    "QiothreadSection",
    "QueueStats",
    "RunReport",
    "StageLatency",
]


class IoStatus(enum.IntEnum):
    """The virtio-blk status byte the guest saw for an I/O."""

    OK = 0  #: ``VIRTIO_BLK_S_OK``
    IOERR = 1  #: ``VIRTIO_BLK_S_IOERR``
    UNSUPP = 2  #: ``VIRTIO_BLK_S_UNSUPP``


_FIELDS: tuple[tuple[str, type[np.generic]], ...] = (
    ("ddir", np.uint8),
    ("offset", np.uint64),
    ("length", np.uint32),
    ("t_start", np.int64),
    ("t_submit", np.int64),
    ("t_complete", np.int64),
    ("status", np.uint8),
    ("depth", np.uint16),
    ("t_pickup", np.int64),
    ("t_done", np.int64),
)


@dataclasses.dataclass(frozen=True)
class IoRecords:
    """Per-I/O columns, all the same length, in completion order.

    ``t_start`` is when the job decided to issue the I/O (fio's
    ``start_time``), ``t_submit`` when the driver made it visible to the
    device (fio's ``issue_time``), ``t_complete`` when the guest saw it
    complete.  So slat = submit - start, clat = complete - submit and
    lat = complete - start, as fio defines them.  ``depth`` is the
    number in flight just after this one was submitted.  ``t_pickup``
    and ``t_done`` are the device's stamps (docs/interfaces.md, "Request
    stage timestamps"): when it popped the request and when the backend
    completed it; 0 when the queue has no stamp table.
    """

    ddir: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint32]
    t_start: npt.NDArray[np.int64]
    t_submit: npt.NDArray[np.int64]
    t_complete: npt.NDArray[np.int64]
    status: npt.NDArray[np.uint8]
    depth: npt.NDArray[np.uint16]
    t_pickup: npt.NDArray[np.int64]
    t_done: npt.NDArray[np.int64]

    @classmethod
    def empty(cls) -> IoRecords:
        """No I/O at all."""
        return cls(**{n: np.zeros(0, dtype=t) for n, t in _FIELDS})

    @classmethod
    def concat(cls, parts: Sequence[IoRecords]) -> IoRecords:
        """Rows of several jobs together (fio's ``group_reporting``)."""
        if not parts:
            return cls.empty()
        return cls(**{n: np.concatenate([getattr(p, n) for p in parts])
                      for n, _ in _FIELDS})

    def __len__(self) -> int:
        return int(self.ddir.size)

    def select(self, mask: npt.NDArray[np.bool_]) -> IoRecords:
        """The rows where ``mask`` is true."""
        return IoRecords(**{n: getattr(self, n)[mask] for n, _ in _FIELDS})

    @property
    def slat(self) -> npt.NDArray[np.int64]:
        """Submission latency, ns."""
        return self.t_submit - self.t_start

    @property
    def clat(self) -> npt.NDArray[np.int64]:
        """Completion latency, ns."""
        return self.t_complete - self.t_submit

    @property
    def lat(self) -> npt.NDArray[np.int64]:
        """Total latency, ns."""
        return self.t_complete - self.t_start

    def stages(self) -> dict[str, npt.NDArray[np.int64]]:
        """Per-request stage times (ns) of the rows the device stamped:
        ``submit_to_pickup``, ``pickup_to_done``, ``done_to_guest``."""
        sel = (self.t_pickup > 0) & (self.t_done > 0)
        pick, done = self.t_pickup[sel], self.t_done[sel]
        return {"submit_to_pickup": pick - self.t_submit[sel],
                "pickup_to_done": done - pick,
                "done_to_guest": self.t_complete[sel] - done}


class IoRecorder:
    """Collects rows cheaply: a Python list of tuples, folded into numpy
    chunks every ``chunk`` rows so that memory stays at the arrays'
    size (one owner, no locking)."""

    def __init__(self, chunk: int = 4096) -> None:
        self._chunk = chunk
        self._rows: list[tuple[int, ...]] = []
        self._parts: list[npt.NDArray[np.int64]] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n + len(self._rows)

    def append(self, ddir: int, offset: int, length: int, t_start: int,
               t_submit: int, t_complete: int, status: int,
               depth: int, t_pickup: int = 0, t_done: int = 0) -> None:
        """Record one completed I/O (columns in ``_FIELDS`` order)."""
        rows = self._rows
        rows.append((ddir, offset, length, t_start, t_submit, t_complete,
                     status, min(depth, 0xFFFF), t_pickup, t_done))
        if len(rows) >= self._chunk:
            self._fold()

    def _fold(self) -> None:
        if self._rows:
            self._parts.append(np.array(self._rows, dtype=np.int64))
            self._n += len(self._rows)
            self._rows = []

    def freeze(self) -> IoRecords:
        """The rows so far, as an immutable :class:`IoRecords`."""
        self._fold()
        table = np.concatenate(self._parts) if self._parts else \
            np.zeros((0, len(_FIELDS)), dtype=np.int64)
        return IoRecords(**{name: table[:, i].astype(dtype)
                            for i, (name, dtype) in enumerate(_FIELDS)})


@dataclasses.dataclass(frozen=True)
class CpuUsage:
    """CPU a process or thread used over a run (fio's ``cpu`` line)."""

    user_s: float = 0.0
    system_s: float = 0.0
    ctx: int = 0  #: voluntary + involuntary context switches
    majf: int = 0  #: major page faults
    minf: int = 0  #: minor page faults


@dataclasses.dataclass(frozen=True)
class JobResult:
    """One guest job's measurements."""

    options: JobOptions
    records: IoRecords  #: every I/O, ramp included
    start_ns: int  #: when the job started issuing
    end_ns: int  #: when its last I/O completed or it was stopped
    verify_checked: int = 0  #: blocks whose contents were checked
    verify_mismatches: int = 0  #: blocks that did not match
    #: The first few mismatches, described (offset and what differed).
    verify_errors: tuple[str, ...] = ()
    #: Completions per reap call that returned any.
    reap_batches: npt.NDArray[np.int64] = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.int64))
    cpu: CpuUsage | None = None
    pid: int = 0
    error: int = 0  #: errno of the first failed I/O, 0 if none
    stopped_early: bool = False  #: Ctrl-C or a stop request
    #: When the read-back of written blocks began (fio's verify phase),
    #: 0 if there was none.
    verify_start_ns: int = 0

    @property
    def ramp_end_ns(self) -> int:
        """Where measurement starts (fio resets its stats here)."""
        return self.start_ns + self.options.ramp_time_ns

    @property
    def runtime_ns(self) -> int:
        """The measured span: from the end of the ramp to the end."""
        return max(0, self.end_ns - self.ramp_end_ns)

    @property
    def main_runtime_ns(self) -> int:
        """The measured span of the workload itself, without the
        verify phase."""
        end = self.verify_start_ns or self.end_ns
        return max(0, end - self.ramp_end_ns)

    @property
    def verify_runtime_ns(self) -> int:
        """How long the verify phase took (0 without one)."""
        if not self.verify_start_ns:
            return 0
        return max(0, self.end_ns - max(self.verify_start_ns,
                                        self.ramp_end_ns))

    def measured(self) -> IoRecords:
        """The I/Os that count: completed after the ramp."""
        if self.options.ramp_time_ns == 0:
            return self.records
        return self.records.select(
            self.records.t_complete >= self.ramp_end_ns)


@dataclasses.dataclass(frozen=True)
class DiskUtil:
    """fio's ``disk_util`` entry for one block device."""

    name: str
    read_ios: int = 0
    write_ios: int = 0
    read_merges: int = 0
    write_merges: int = 0
    read_ticks: int = 0
    write_ticks: int = 0
    in_queue: int = 0
    util: float = 0.0


@dataclasses.dataclass
class IOThreadStats:
    """What one iothread's polling did over the run."""

    id: str
    thread_id: int = 0
    poll_max_ns: int = 0
    poll_grow: int = 0
    poll_shrink: int = 0
    #: Time-weighted distribution of ``poll_ns``: value -> ns spent
    #: with ``ctx->poll_ns`` at that value.
    poll_ns_time: dict[int, int] = dataclasses.field(default_factory=dict)
    grow_count: int = 0  #: ``poll_grow`` events
    shrink_count: int = 0  #: ``poll_shrink`` events
    poll_progress: int = 0  #: polling rounds that found work
    poll_timeout: int = 0  #: polling rounds that ran out of time
    blocking_waits: int = 0  #: fd monitor waits with a timeout != 0
    polling_ns: int = 0  #: time spent busy-polling
    blocked_ns: int = 0  #: time spent blocked in the fd monitor
    cpu: CpuUsage | None = None

    @property
    def mean_poll_ns(self) -> float:
        """The time-weighted mean of ``poll_ns``."""
        total = sum(self.poll_ns_time.values())
        if total == 0:
            return 0.0
        return sum(v * t for v, t in self.poll_ns_time.items()) / total


@dataclasses.dataclass
class QueueStats:
    """Notification counters of one virtqueue."""

    device: str
    queue: int
    iothread: str = ""
    requests: int = 0
    kicks_sent: int = 0  #: guest -> device notifications sent
    kicks_suppressed: int = 0  #: avoided because the device polled
    interrupts_sent: int = 0  #: device -> guest notifications sent
    interrupts_suppressed: int = 0  #: avoided (EVENT_IDX, batching)
    merges: int = 0  #: requests merged by virtio-blk


@dataclasses.dataclass(frozen=True)
class StageLatency:
    """Per-request time spent in one stage of the data path (ns).

    The stages qiothread names, in order: ``submit->pickup`` (guest
    made it available until the device popped it), ``pickup->backend``
    (device popped it until the backend completed it), and
    ``backend->guest`` (backend completion until the guest saw it).
    """

    name: str
    samples_ns: npt.NDArray[np.int64]


@dataclasses.dataclass
class QiothreadSection:
    """The emulator's own results, beside fio's."""

    iothreads: list[IOThreadStats] = dataclasses.field(default_factory=list)
    queues: list[QueueStats] = dataclasses.field(default_factory=list)
    stages: list[StageLatency] = dataclasses.field(default_factory=list)
    #: Host facts (see :mod:`qiothread.report.host`), as a plain dict.
    host: dict[str, object] = dataclasses.field(default_factory=dict)
    #: The QEMU behaviour emulated, e.g. ``"7.2"``.
    qemu_policy: str = "7.2"


@dataclasses.dataclass
class RunReport:
    """Everything one ``qiothread run`` reports."""

    jobs: list[JobResult]
    #: ``[global]`` / command-line options as written.
    global_options: tuple[tuple[str, str], ...] = ()
    qiothread: QiothreadSection | None = None
    disk_util: list[DiskUtil] = dataclasses.field(default_factory=list)
    #: Wall-clock time of the end of the run (seconds since the epoch).
    timestamp_s: float = 0.0
