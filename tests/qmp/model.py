"""An in-process QMPBackend over real IOThread objects.

The iothreads are ``qiothread.iothread.IOThread`` objects under a real
``ObjectRoot``: every value check and message comes from the same code
as ``-object iothread,...`` at start-up, each iothread is a real process
running its AioContext, and ``qom-set`` reaches it the way it does in a
run (shared parameter block and ``aio_notify``).  Thread ids and polling
statistics are read live from those processes.  What is missing next to
``qiothread run`` is the devices and guests: the drive is a real file
(its name and size come from the file system) with no I/O on it, so its
statistics stay 0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from qiothread.iothread import IOThread
from qiothread.process import Supervisor
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
    iothread_info_of,
    poll_stats_of,
)
from qiothread.qom import ObjectRoot


class ModelBackend:
    """``QMPBackend`` over an ``ObjectRoot`` of iothread objects."""

    def __init__(self, image: str, iothreads: Sequence[str] = ("io0",)
                 ) -> None:
        self.supervisor = Supervisor()
        self.root = ObjectRoot({"iothread": IOThread}, self.supervisor)
        for object_id in iothreads:
            self.root.object_add_qmp("iothread", object_id, {})
        self.image = image
        self.state = RunState.RUNNING
        self.quit_requested = threading.Event()
        self._listeners: list[EventListener] = []
        self._lock = threading.Lock()

    # -- QMPBackend -----------------------------------------------------

    def query_status(self) -> RunState:
        return self.state

    def query_iothreads(self) -> list[IOThreadInfo]:
        return [iothread_info_of(self._iothread(o))
                for o in self.root.objects]

    def _iothread(self, object_id: str) -> IOThread:
        obj = self.root.objects[object_id]
        assert isinstance(obj, IOThread)
        return obj

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
        return [poll_stats_of(self._iothread(o)) for o in self.root.objects]

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
        try:
            self.root.close()
        finally:
            self.supervisor.close()


__all__ = ["ModelBackend"]
