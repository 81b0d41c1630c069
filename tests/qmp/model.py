"""An in-process QMPBackend over the real property model.

The iothreads are ``qiothread.qom`` objects under a real ``ObjectRoot``,
so every value check and message comes from the same code as
``-object iothread,...`` at start-up; nothing here answers with a canned
value.  There are no iothread processes: ``thread-id`` is -1 (QEMU's
value before the thread started) and the polling statistics are those
of a loop that never ran.  The drive is a real file whose size and name
come from the file system.  Tests of a live run use ``qiothread run``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from qiothread.errors import ConfigError
from qiothread.qmp.backend import (
    BlockDeviceInfo,
    BlockDeviceStats,
    EventListener,
    IOThreadInfo,
    MonitorEvent,
    PollStats,
    PropertyInfo,
    RunState,
    ShutdownCause,
)
from qiothread.qom import ObjectRoot, UserCreatable

try:
    from qiothread.iothread import IOThread as _IOThread
except ImportError:                      # pragma: no cover
    _IOThread = None


def iothread_class() -> type[UserCreatable]:
    """H2's IOThread when present, else the 7.2 property set on the
    project's UserCreatable base (same setters, same messages)."""
    if _IOThread is not None:
        return _IOThread
    from tests.qmp._iothread_props import IOThreadProps
    return IOThreadProps


class ModelBackend:
    """``QMPBackend`` over an ``ObjectRoot`` of iothread objects."""

    def __init__(self, image: str, iothreads: Sequence[str] = ("io0",)
                 ) -> None:
        self.root = ObjectRoot({"iothread": iothread_class()})
        for object_id in iothreads:
            self.root.object_add_qmp("iothread", object_id, {})
        self.image = image
        self.state = RunState.RUNNING
        self.quit_requested = threading.Event()
        self._listeners: list[EventListener] = []
        self._lock = threading.Lock()
        #: Calls made, in order (the worker thread appends).
        self.calls: list[str] = []

    # -- QMPBackend -----------------------------------------------------

    def query_status(self) -> RunState:
        return self.state

    def query_iothreads(self) -> list[IOThreadInfo]:
        self.calls.append("query_iothreads")
        return [IOThreadInfo(
            id=o.id, thread_id=-1, poll_max_ns=o.get("poll-max-ns"),
            poll_grow=o.get("poll-grow"), poll_shrink=o.get("poll-shrink"),
            aio_max_batch=o.get("aio-max-batch"))
            for o in self.root.objects.values()]

    def qom_list(self, object_id: str) -> list[PropertyInfo] | None:
        obj = self.root.objects.get(object_id)
        if obj is None:
            return None
        return [PropertyInfo(p["name"], p["type"],
                             writable=p["name"] != "type")
                for p in obj.qom_list()]

    def qom_get(self, object_id: str, name: str) -> Any:
        return self.root.objects[object_id].qom_get(name)

    def qom_set(self, object_id: str, name: str, value: Any) -> None:
        self.calls.append(f"qom_set {object_id} {name} {value}")
        self.root.objects[object_id].qom_set(name, value)

    def object_add(self, qom_type: str, object_id: str,
                   props: Mapping[str, Any]) -> None:
        self.root.object_add_qmp(qom_type, object_id, props)

    def object_del(self, object_id: str) -> None:
        self.root.object_del(object_id)

    def object_types(self) -> Sequence[str]:
        return sorted(self.root.types)

    def query_block(self) -> list[BlockDeviceInfo]:
        return [BlockDeviceInfo(
            device="", qdev="/machine/peripheral/vblk0/virtio-backend",
            node_name="disk0", filename=self.image,
            protocol_driver="file", read_only=False,
            virtual_size=os.stat(self.image).st_size, cache_direct=True,
            cache_no_flush=False, aio="threads",
            iothreads=tuple(self.root.objects))]

    def query_blockstats(self) -> list[BlockDeviceStats]:
        return [BlockDeviceStats(device=b.device, qdev=b.qdev,
                                 node_name=b.node_name)
                for b in self.query_block()]

    def query_poll_stats(self) -> list[PollStats]:
        # A loop that never ran: every counter 0, parameters as stored.
        return [PollStats(
            id=o.id, thread_id=-1, poll_max_ns=o.get("poll-max-ns"),
            poll_grow=o.get("poll-grow"), poll_shrink=o.get("poll-shrink"),
            params_pending=False, params_applied_ns=0, poll_disable_cnt=0,
            poll_ns=0, poll_ns_since=0, poll_ns_mean=0.0, iterations=0,
            poll_rounds=0, poll_passes=0, poll_progress=0, poll_notified=0,
            poll_timeouts=0, blocking_waits=0, nonblocking_waits=0,
            ns_polling=0, ns_blocked=0, grow=0, shrink=0)
            for o in self.root.objects.values()]

    def request_quit(self) -> None:
        self.quit_requested.set()
        self.state = RunState.SHUTDOWN
        self.emit(MonitorEvent.shutdown(ShutdownCause.HOST_QMP_QUIT))

    def add_event_listener(self, listener: EventListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # -- for tests ------------------------------------------------------

    def emit(self, event: MonitorEvent) -> None:
        """Deliver ``event`` as the run would (any thread)."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def close(self) -> None:
        self.root.close()


__all__ = ["ConfigError", "ModelBackend", "iothread_class"]
