"""Results of a run: fio's JSON and text, fio logs, and qiothread's own.

- :mod:`~qiothread.report.model`: the data a run fills in;
- :mod:`~qiothread.report.stats`: fio's statistics with numpy;
- :mod:`~qiothread.report.fio_json`: fio 3.x JSON plus a qiothread key;
- :mod:`~qiothread.report.summary`: fio's human-readable report;
- :mod:`~qiothread.report.latlog`: ``write_lat_log`` files;
- :mod:`~qiothread.report.host`: host facts behind wake-up latency;
- :mod:`~qiothread.report.cpu`: CPU time per process and thread;
- :mod:`~qiothread.report.diskstats`: fio's ``disk_util``.
"""

from qiothread.report.fio_json import build_fio_json, dumps_fio
from qiothread.report.model import (
    CpuUsage,
    DiskUtil,
    IoRecorder,
    IoRecords,
    IoStatus,
    IOThreadStats,
    JobResult,
    QiothreadSection,
    QueueStats,
    RunReport,
    StageLatency,
)
from qiothread.report.summary import render_summary

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
    "build_fio_json",
    "dumps_fio",
    "render_summary",
]
