"""Figures of the QMP monitor (not a test; nothing here asserts speed).

::

    .venv/bin/python -m tests.qmp.measure

prints, on this machine:

1. command round trips through QMPClient against the in-process backend
   with real iothread processes (query-version, x-query-poll-stats);
2. for a real ``qiothread run`` (4k random reads, QD1, iothread started
   with ``poll-max-ns=0``): how long after a ``qom-set poll-max-ns
   65536`` is sent the reply arrives, the loop has applied it
   (``params-applied-ns``), and the first ``run_poll_handlers_begin``
   is traced.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from qiothread.qmp.server import QMPServer
from tests.qmp import test_live as live
from tests.qmp.model import ModelBackend

ROUNDS = 500
RUNS = 5


async def _round_trips(sock: str) -> None:
    qmp = QMPClient("measure")
    await qmp.connect(sock)
    for cmd in ("query-version", "x-query-poll-stats"):
        lat = []
        for _ in range(ROUNDS):
            t = time.perf_counter_ns()
            await qmp.execute(cmd)
            lat.append(time.perf_counter_ns() - t)
        lat.sort()
        print(f"{cmd:20s} median {lat[len(lat) // 2] / 1e3:7.0f} us"
              f"  p99 {lat[len(lat) * 99 // 100] / 1e3:7.0f} us")
    await qmp.disconnect()


def round_trips() -> None:
    d = Path(tempfile.mkdtemp())
    try:
        image = d / "img"
        image.write_bytes(b"\0" * 4096)
        backend = ModelBackend(str(image), ("io0",))
        try:
            with QMPServer(backend, d / "s.sock") as srv:
                asyncio.run(_round_trips(str(srv.path)))
        finally:
            backend.close()
    finally:
        shutil.rmtree(d)


async def _tune(tmp: Path, proc: subprocess.Popen[str]
                ) -> tuple[float, float, float]:
    qmp = await live._connect(tmp / "qmp.sock", proc)
    await live._wait_io(qmp, 200)
    t_wall, t_mono = time.time(), time.monotonic_ns()
    await qmp.execute("qom-set", {"path": "/objects/io0",
                                  "property": "poll-max-ns",
                                  "value": 65536})
    t_reply = time.monotonic_ns()
    await live._wait_io(qmp, 100)
    stats = await live._stats(qmp)
    m = next(filter(None, map(live._TRACE.match,
                              (tmp / "trace").read_text().splitlines())))
    first = live._wall(m.group(2), m.group(3))
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    return ((t_reply - t_mono) / 1e3,
            (stats["params-applied-ns"] - t_mono) / 1e3,
            (first - t_wall) * 1e6)


def live_tuning() -> None:
    rows = []
    for _ in range(RUNS):
        tmp = Path(tempfile.mkdtemp())
        try:
            image = tmp / "disk.img"
            image.write_bytes(b"\1" * (32 << 20))
            proc = live._start_run(tmp, image)
            try:
                rows.append(asyncio.run(_tune(tmp, proc)))
                proc.communicate(timeout=live.TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        finally:
            shutil.rmtree(tmp)
    for name, i in (("qom-set reply", 0), ("applied by the loop", 1),
                    ("first polling round", 2)):
        print(f"{name:20s} median {statistics.median(r[i] for r in rows):7.0f}"
              f" us after the qom-set was sent ({RUNS} runs)")


if __name__ == "__main__":
    round_trips()
    live_tuning()
