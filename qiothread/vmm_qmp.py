"""The run as QMP sees it: :class:`~qiothread.qmp.backend.QMPBackend`
over a :class:`~qiothread.machine.Machine`.

The monitor (``qiothread.qmp.server``) calls in from its one worker
thread; the machine's own thread runs the wait loop meanwhile.  What is
shared between the two:

- the ``/objects`` root (:class:`~qiothread.qom.ObjectRoot`): QOM reads
  and writes go through the same IOThread property objects the run was
  built from, so ``qom-set`` takes QEMU's path to the running loop
  (shared parameter block plus ``aio_notify``; never an fd handler,
  which would turn polling off), and ``object-add`` starts a new
  iothread process from the worker thread (long-lived, as
  ``PR_SET_PDEATHSIG`` needs);
- counters in shared memory (device and driver counters per queue,
  polling statistics per iothread), read without stopping anyone;
- the run state, a plain attribute written by the machine's thread
  (a reference assignment, atomic under the GIL).

Events: ``SHUTDOWN`` when the run stops (reason ``host-qmp-quit`` after
``quit``, ``host-signal`` after Ctrl-C or SIGTERM, ``guest-shutdown``
when the jobs ended by themselves), and the broken-device event when an
iothread marks a device broken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from qiothread.errors import QMPCommandError
from qiothread.iothread import IOThread
from qiothread.machine import MAIN_LOOP, Machine
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
from qiothread.vmm_shared import ACCT_FIELDS

__all__ = ["MachineMonitor", "qdev_path"]

#: Accounting words that combine by maximum, not by sum.
_MAX_FIELDS = ("wr_highest_offset", "last_completion_ns", "aio_engine")


def qdev_path(device_id: str) -> str:
    """The ``qdev`` QEMU 7.2 reports for a virtio-blk-pci device: the
    BlockBackend is attached to the proxy's inner virtio-blk device,
    which has no id, so QEMU gives its canonical QOM path
    (``/machine/peripheral/ID/virtio-backend``, or under
    ``peripheral-anon`` for a device without ``id=``)."""
    base = device_id if device_id.startswith("/machine/") else \
        f"/machine/peripheral/{device_id}"
    return f"{base}/virtio-backend"


class MachineMonitor:
    """QMPBackend of one run (module text)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        #: Written by the machine's thread; read by the monitor's.
        self.state = RunState.PRELAUNCH
        self._listeners: list[EventListener] = []
        self._lock = threading.Lock()
        self._broken_seen: set[int] = set()

    # -- state and events (machine thread) ------------------------------

    def set_state(self, state: RunState) -> None:
        """The run moved to ``state``."""
        self.state = state

    def emit(self, event: MonitorEvent) -> None:
        """Hand ``event`` to every listener (any thread)."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def shutdown(self, cause: ShutdownCause) -> None:
        """The run stopped: SHUTDOWN, then the final state."""
        self.state = RunState.SHUTDOWN
        self.emit(MonitorEvent.shutdown(cause))

    def check_broken(self) -> None:
        """Emit the broken-device event once per device (machine
        thread, from its wait loop)."""
        shared = self.machine.shared
        if shared is None:
            return
        for i, dev in enumerate(self.machine.config.devices):
            if i in self._broken_seen:
                continue
            reason = shared.broken(i)
            if reason is None:
                continue
            self._broken_seen.add(i)
            queue = next((s.index for s in self.machine.queues
                          if s.dslot == i), 0)
            self.emit(MonitorEvent.device_broken(
                dev.drive, qdev_path(dev.id), queue, reason))

    # -- QMPBackend ------------------------------------------------------

    def query_status(self) -> RunState:
        return self.state

    def _iothreads(self) -> list[IOThread]:
        return [o for o in self.machine.root.objects.values()
                if isinstance(o, IOThread)]

    def query_iothreads(self) -> list[IOThreadInfo]:
        return [iothread_info_of(t) for t in self._iothreads()]

    def qom_list(self, object_id: str) -> list[PropertyInfo] | None:
        obj = self.machine.root.objects.get(object_id)
        if obj is None:
            return None
        return [PropertyInfo(p["name"], p["type"],
                             writable=p["name"] != "type")
                for p in obj.qom_list()]

    def qom_get(self, object_id: str, name: str) -> Any:
        return self.machine.root.qom_get(object_id, name)

    def qom_set(self, object_id: str, name: str, value: Any) -> None:
        self.machine.root.qom_set(object_id, name, value)

    def object_add(self, qom_type: str, object_id: str,
                   props: Mapping[str, Any]) -> None:
        if object_id in self.machine.root.objects or \
                object_id == MAIN_LOOP:
            raise QMPCommandError(
                f"attempt to add duplicate property '{object_id}' to "
                "object (type 'container')")
        obj = self.machine.root.object_add_qmp(qom_type, object_id, props)
        if isinstance(obj, IOThread) and obj.child is None:
            obj.start()

    def object_del(self, object_id: str) -> None:
        if any(s.iothread == object_id for s in self.machine.queues):
            raise QMPCommandError(
                f"object '{object_id}' is in use, can not be deleted")
        self.machine.root.object_del(object_id)

    def object_types(self) -> Sequence[str]:
        return tuple(self.machine.root.types)

    def query_block(self) -> list[BlockDeviceInfo]:
        m = self.machine
        out = []
        for i, dev in enumerate(m.config.devices):
            node = m.config.node(dev.drive)
            assert node is not None
            bs = m.nodes.get(node.name)
            proto = getattr(bs, "file", bs)
            opts = node.options
            out.append(BlockDeviceInfo(
                device=node.drive_id, qdev=qdev_path(dev.id),
                node_name=node.format_node or node.name,
                filename=str(opts.get("filename", "")),
                protocol_driver=str(opts.get("driver", "file")),
                read_only=bool(getattr(bs, "read_only", False)),
                virtual_size=int(getattr(bs, "length", 0)),
                cache_direct=bool(getattr(proto, "direct", False)),
                cache_no_flush=bool(getattr(proto, "no_flush", False)),
                aio=m.engine_in_use(node.name),
                iothreads=tuple(dict.fromkeys(
                    t for t in dev.queue_iothreads if t is not None)),
                broken=(m.shared is not None
                        and m.shared.broken(i) is not None),
                # -drive always puts a format node (raw) on top.
                driver="raw" if node.format_node or node.drive_id else
                str(opts.get("driver", "file"))))
        return out

    def query_blockstats(self) -> list[BlockDeviceStats]:
        """Per device, the sum of what each of its iothreads accounted
        (:mod:`qiothread.vmm_acct`).  The device counts merges without
        a direction; they are reported under the one direction the
        device saw, and under neither when it saw both."""
        m = self.machine
        out = []
        now = time.monotonic_ns()
        for dslot, dev in enumerate(m.config.devices):
            node = m.config.node(dev.drive)
            assert node is not None
            acct: dict[str, int] = dict.fromkeys(ACCT_FIELDS, 0)
            merges = 0
            for s in m.queues:
                if s.dslot != dslot or m.shared is None:
                    continue
                for k, v in m.shared.read_acct(s.qslot).items():
                    acct[k] = max(acct[k], v) if k in _MAX_FIELDS \
                        else acct[k] + v
                merges += m.shared.read_queue(s.qslot)["merges"]
            stats = BlockDeviceStats(
                device=node.drive_id, qdev=qdev_path(dev.id),
                node_name=node.format_node or node.name,
                **{k: v for k, v in acct.items()
                   if k in BlockDeviceStats.__dataclass_fields__})
            if stats.wr_operations == 0:
                stats.rd_merged = merges
            elif stats.rd_operations == 0:
                stats.wr_merged = merges
            last = acct["last_completion_ns"]
            stats.idle_time_ns = now - last if last else None
            out.append(stats)
        return out

    def query_poll_stats(self) -> list[PollStats]:
        return [poll_stats_of(t) for t in self._iothreads()
                if t.child is not None and t.alive]

    def request_quit(self) -> None:
        self.machine.request_quit()

    def add_event_listener(self, listener: EventListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
