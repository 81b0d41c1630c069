"""The QMP monitor: QEMU's machine protocol over a UNIX socket.

``QMPServer`` serves one socket for a run; the run plugs in through the
``QMPBackend`` protocol.  See docs/qmp.md for the commands and
docs/interfaces.md for the backend contract.
"""

from __future__ import annotations

from qiothread.qmp.backend import (
    BlockDeviceInfo,
    BlockDeviceStats,
    EventListener,
    IOThreadInfo,
    MonitorEvent,
    PollStats,
    PropertyInfo,
    QMPBackend,
    RunState,
    ShutdownCause,
    iothread_info_of,
    poll_stats_of,
)

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
