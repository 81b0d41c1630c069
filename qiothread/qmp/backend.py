"""What the QMP monitor needs from a run: the ``QMPBackend`` protocol.

The monitor (``qiothread.qmp.server``) speaks the wire protocol and
checks arguments the way QEMU's QAPI layer does; everything that touches
the run itself goes through one object that implements ``QMPBackend``.
The main process of ``qiothread run`` (the "VMM") implements it over its
machine; tests implement it over real IOThread property objects.

Calling contract, which every implementation may rely on:

- Calls come from **one monitor worker thread**, one call at a time
  (QEMU, too, dispatches in-band commands one after the other).  They
  never come from an iothread and never from the asyncio loop thread,
  so a call may block briefly (``object_add`` starts a process), but it
  delays every client's next reply while it does.
- Errors are raised, not returned: ``QMPCommandError(desc, class)`` for
  a refusal with a QMP class, ``ConfigError(desc)`` for a bad value
  (sent as ``GenericError`` with the message unchanged, so the
  property model's QEMU wording reaches the client as it is).  Any
  other exception is a bug; the client gets a ``GenericError`` and the
  monitor logs the traceback.
- Before the backend is called the monitor has already checked the
  QAPI shape: required arguments present, no unexpected ones, JSON
  types of its own arguments right, the object exists (from
  ``qom_list``), the property exists and is writable, and a ``qom_set``
  of an ``int`` property receives a Python ``int`` in int64 range, never
  a bool or float.  Range and semantic checks ("poll-max-ns value must
  be in range [0, 9223372036854775807]", "bad thread-pool-min/
  thread-pool-max values") are the backend's, made by the same property
  model as at start-up.
- A ``qom_set`` of a poll parameter must reach the iothread the way the
  design requires: shared state plus ``aio_notify``, never an extra fd
  handler in the iothread's AioContext.  It returns once the new value
  is stored (and visible to ``qom_get``), not when the loop applied it;
  ``PollStats.params_applied_ns`` tells when it did.
- Event listeners may be called from any thread; the monitor hands the
  event to its own loop at once and never calls back into the backend
  from the listener.

Only ``/objects/<id>`` objects of type ``iothread`` are exposed; the
rest of QEMU's QOM tree (``/machine``, devices) is not modelled.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "BlockDeviceInfo",
    "BlockDeviceStats",
    "EventListener",
    "IOThreadInfo",
    "MonitorEvent",
    "PollStats",
    "PropertyInfo",
    "QMPBackend",
    "RunState",
    "ShutdownCause",
    "iothread_info_of",
    "poll_stats_of",
]

#: A JSON object as the monitor sends it (``dict`` of JSON values).
JSONObject = dict[str, Any]


class RunState(enum.Enum):
    """QEMU's ``RunState`` names, as ``query-status`` reports them."""

    #: Set up, guests not started yet (QEMU before ``cont``).
    PRELAUNCH = "prelaunch"
    #: Iothreads and guests are running the job.
    RUNNING = "running"
    #: The run stopped (job done, ``quit``, signal); results are written.
    SHUTDOWN = "shutdown"
    #: A child process died or an invariant broke; the run is stopping.
    INTERNAL_ERROR = "internal-error"


class ShutdownCause(enum.Enum):
    """QEMU's ``ShutdownCause``; the ``reason`` of the SHUTDOWN event."""

    #: The ``quit`` command.
    HOST_QMP_QUIT = "host-qmp-quit"
    #: SIGINT, SIGTERM or SIGHUP to the main process.
    HOST_SIGNAL = "host-signal"
    #: A main-process error (QEMU's "host-error").
    HOST_ERROR = "host-error"
    #: The workload finished: the "guest" powered off by itself.
    GUEST_SHUTDOWN = "guest-shutdown"

    @property
    def guest(self) -> bool:
        """The event's ``guest`` member: did the guest cause it?"""
        return self is ShutdownCause.GUEST_SHUTDOWN


@dataclass(frozen=True)
class MonitorEvent:
    """One asynchronous event for every connected, negotiated client.

    ``timestamp_ns`` is CLOCK_REALTIME at the moment the backend saw
    the event (QEMU stamps events with the wall clock); the monitor
    splits it into ``seconds`` and ``microseconds``.
    """

    #: QEMU's event name, e.g. ``SHUTDOWN``.
    name: str
    #: The ``data`` member; omitted on the wire when ``None``.
    data: Mapping[str, Any] | None = None
    timestamp_ns: int = field(default_factory=time.time_ns)

    @classmethod
    def shutdown(cls, cause: ShutdownCause) -> MonitorEvent:
        """QEMU's ``SHUTDOWN`` event for ``cause``."""
        return cls("SHUTDOWN",
                   {"guest": cause.guest, "reason": cause.value})

    @classmethod
    def device_broken(cls, device: str, qdev: str, queue: int,
                      reason: str) -> MonitorEvent:
        """The device was marked broken (QEMU's ``virtio_error``).

        QEMU has no QMP event for this; the name carries the ``X_``
        prefix QEMU uses for experimental members.
        """
        return cls("X_QIOTHREAD_DEVICE_BROKEN",
                   {"device": device, "qdev": qdev, "queue": queue,
                    "reason": reason})


#: Called with each event, from any thread; must not block.
EventListener = Callable[[MonitorEvent], None]


@dataclass(frozen=True)
class IOThreadInfo:
    """One entry of ``query-iothreads`` (QEMU's ``IOThreadInfo``)."""

    id: str
    #: The OS thread id of the iothread's loop (the process's main
    #: thread in qiothread); -1 before it has started.
    thread_id: int
    poll_max_ns: int
    poll_grow: int
    poll_shrink: int
    aio_max_batch: int


@dataclass(frozen=True)
class PropertyInfo:
    """One entry of ``qom-list`` (QEMU's ``ObjectPropertyInfo``)."""

    name: str
    #: QOM type name: ``int``, ``string``, ``bool``, ``child<T>``.
    type: str
    #: False for read-only properties such as ``type``.
    writable: bool = True
    description: str | None = None


@dataclass(frozen=True)
class BlockDeviceInfo:
    """What ``query-block`` reports of one virtio-blk drive."""

    #: The legacy drive id (``-drive id=``), "" for ``-blockdev``.
    device: str
    #: The qdev path or id of the virtio-blk device.
    qdev: str
    #: The node the device is attached to (normally ``driver=raw``).
    node_name: str
    #: The protocol node's file name (image file or /dev/loopN).
    filename: str
    #: Protocol driver: ``file`` or ``host_device``.
    protocol_driver: str
    read_only: bool
    virtual_size: int
    cache_direct: bool
    cache_no_flush: bool
    #: ``threads``, ``native`` or ``io_uring`` after any fallback.
    aio: str
    #: The iothread id(s) serving the device's queues.
    iothreads: Sequence[str] = ()
    #: True once the device was marked broken.
    broken: bool = False
    #: The driver of ``node_name``: ``raw``, or the protocol driver
    #: when the device sits directly on a ``file`` node.
    driver: str = "raw"


@dataclass
class BlockDeviceStats:
    """QEMU's ``BlockDeviceStats`` for one device, since the run began.

    Counted by the device model the way ``block_acct_*`` counts in
    QEMU: one operation per request the guest sent (merged requests
    count once each and also in ``*_merged``), times from submission to
    completion in the iothread.
    """

    device: str
    qdev: str
    node_name: str
    rd_bytes: int = 0
    wr_bytes: int = 0
    unmap_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    unmap_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    unmap_total_time_ns: int = 0
    wr_highest_offset: int = 0
    rd_merged: int = 0
    wr_merged: int = 0
    unmap_merged: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    failed_unmap_operations: int = 0
    invalid_rd_operations: int = 0
    invalid_wr_operations: int = 0
    invalid_flush_operations: int = 0
    invalid_unmap_operations: int = 0
    #: ns since the last I/O completed; None before the first one.
    idle_time_ns: int | None = None


@dataclass(frozen=True)
class PollStats:
    """Live polling statistics of one iothread (``x-query-poll-stats``).

    The counters are those the AioContext keeps in shared memory
    (``qiothread.stats.FIELDS``), cumulative since the iothread started;
    clients take differences.  Times are CLOCK_MONOTONIC ns, comparable
    with the guests' per-request times.  Build one from a running
    ``qiothread.iothread.IOThread`` with :func:`poll_stats_of`.
    """

    id: str
    thread_id: int
    #: The poll parameters as stored (what ``qom-get`` shows).
    poll_max_ns: int
    poll_grow: int
    poll_shrink: int
    #: True while the loop has not yet applied the latest ``qom-set``.
    params_pending: bool
    #: When the loop last applied new parameters; 0 if never.
    params_applied_ns: int
    #: Handlers without ``io_poll`` registered: polling is off while
    #: this is not 0 (QEMU's ``poll_disable_cnt``).
    poll_disable_cnt: int
    #: The adaptive polling time now (QEMU's ``ctx->poll_ns``), since
    #: when it has had that value, and its time-weighted mean so far.
    poll_ns: int
    poll_ns_since: int
    poll_ns_mean: float
    #: ``aio_poll`` calls.
    iterations: int
    #: ``run_poll_handlers`` calls, passes over the handlers, rounds
    #: that found work, rounds ended by the notifier alone, rounds that
    #: used up the budget.
    poll_rounds: int
    poll_passes: int
    poll_progress: int
    poll_notified: int
    poll_timeouts: int
    #: fd-monitor waits with a timeout, and with timeout 0.
    blocking_waits: int
    nonblocking_waits: int
    #: ns inside ``run_poll_handlers`` and inside blocking waits.
    ns_polling: int
    ns_blocked: int
    #: ``poll_grow`` / ``poll_shrink`` adjustments made.
    grow: int
    shrink: int


class _IOThreadLike(Protocol):
    """What :func:`poll_stats_of` reads of ``qiothread.iothread.IOThread``.

    Spelled out here so that the monitor does not import the iothread
    machinery.
    """

    id: str
    thread_id: int

    def get(self, name: str) -> int: ...
    def poll_stats(self) -> dict[str, Any]: ...
    def loop_state(self) -> dict[str, int]: ...


def poll_stats_of(iothread: _IOThreadLike) -> PollStats:
    """The ``PollStats`` of a running IOThread, read live (any thread).

    :raises InternalError: the iothread is not running.
    """
    snap = iothread.poll_stats()
    loop = iothread.loop_state()
    return PollStats(
        id=iothread.id, thread_id=iothread.thread_id,
        poll_max_ns=iothread.get("poll-max-ns"),
        poll_grow=iothread.get("poll-grow"),
        poll_shrink=iothread.get("poll-shrink"),
        params_pending=loop["seq"] != loop["applied_seq"],
        params_applied_ns=loop["params_applied_ns"],
        poll_disable_cnt=loop["poll_disable_cnt"],
        poll_ns=snap["poll_ns"], poll_ns_since=snap["poll_ns_since"],
        poll_ns_mean=float(snap["poll_ns_mean"]),
        iterations=snap["iterations"], poll_rounds=snap["poll_rounds"],
        poll_passes=snap["poll_passes"],
        poll_progress=snap["poll_progress"],
        poll_notified=snap["poll_notified"],
        poll_timeouts=snap["poll_timeouts"],
        blocking_waits=snap["blocking_waits"],
        nonblocking_waits=snap["nonblocking_waits"],
        ns_polling=snap["ns_polling"], ns_blocked=snap["ns_blocked"],
        grow=snap["grow"], shrink=snap["shrink"])


def iothread_info_of(iothread: _IOThreadLike) -> IOThreadInfo:
    """``query-iothreads``' entry for an IOThread."""
    return IOThreadInfo(
        id=iothread.id, thread_id=iothread.thread_id,
        poll_max_ns=iothread.get("poll-max-ns"),
        poll_grow=iothread.get("poll-grow"),
        poll_shrink=iothread.get("poll-shrink"),
        aio_max_batch=iothread.get("aio-max-batch"))


@runtime_checkable
class QMPBackend(Protocol):
    """The run as the monitor sees it (see the module text)."""

    def query_status(self) -> RunState:
        """The run state now."""
        ...

    def query_iothreads(self) -> list[IOThreadInfo]:
        """Every user-created iothread, in the order of ``/objects``.

        QEMU walks the children of ``/objects``, which is not creation
        order (reference §8.3); implementations give their own stable
        order and need not sort.
        """
        ...

    def qom_list(self, object_id: str) -> list[PropertyInfo] | None:
        """The properties of ``/objects/<object_id>``, ``type`` first.

        Returns ``None`` when there is no such object.
        """
        ...

    def qom_get(self, object_id: str, name: str) -> Any:
        """The value of a property ``qom_list`` listed (JSON-able)."""
        ...

    def qom_set(self, object_id: str, name: str, value: Any) -> None:
        """Set a writable property to an already type-checked value.

        :raises ConfigError: the property model rejected the value
            (QEMU's message; QEMU keeps some rejected values stored,
            see reference §8.1, and so must the backend).
        """
        ...

    def object_add(self, qom_type: str, object_id: str,
                   props: Mapping[str, Any]) -> None:
        """Create ``/objects/<object_id>`` (only ``iothread`` for now).

        ``qom_type`` is one of ``object_types()`` and ``object_id`` a
        string; ``props`` are the remaining QMP arguments as the client
        sent them: the backend checks them in QAPI order with the same
        visitor as ``-object`` (``qiothread.qom.ObjectRoot``), giving
        "Invalid parameter type for 'poll-max-ns', expected: integer",
        "Parameter 'foo' is unexpected" and the like.

        :raises QMPCommandError: duplicate id and the like.
        :raises ConfigError: a property value was rejected.
        """
        ...

    def object_del(self, object_id: str) -> None:
        """Delete ``/objects/<object_id>``.

        :raises QMPCommandError: ``object 'x' not found``, or
            ``object 'x' is in use, can not be deleted`` while a
            device's queue is served by it.
        """
        ...

    def object_types(self) -> Sequence[str]:
        """The ``qom-type`` values ``object_add`` accepts."""
        ...

    def query_block(self) -> list[BlockDeviceInfo]:
        """Every virtio-blk drive of the run."""
        ...

    def query_blockstats(self) -> list[BlockDeviceStats]:
        """I/O statistics of every drive, in ``query_block`` order."""
        ...

    def query_poll_stats(self) -> list[PollStats]:
        """Live polling statistics of every iothread."""
        ...

    def request_quit(self) -> None:
        """Stop the run cleanly (QMP ``quit``); returns at once.

        The run then stops its guests and iothreads, writes its
        results, and emits ``SHUTDOWN`` with ``HOST_QMP_QUIT``.
        """
        ...

    def add_event_listener(self, listener: EventListener) -> None:
        """Call ``listener`` for every later event, from any thread."""
        ...

    def remove_event_listener(self, listener: EventListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        ...
