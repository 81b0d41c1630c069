"""``qiothread run`` end to end: the real command, real files, real loop
devices, both engines, several iothreads, devices and queues.

Each run is short (1 s of I/O or a few MiB) so that the module stays
well under a minute; what is checked does not depend on speed:

- exit status, JSON that parses, one fio job per guest;
- ``total_ios`` equals what the guest drivers counted themselves and
  what the devices counted (three independent counters);
- the engine each node really used, and the queue -> iothread mapping;
- verify after writes finds no mismatch, on a file and a loop device;
- polling visibly works: a wide poll window shows
  ``run_poll_handlers_end ... progress 1`` in the trace (polling found
  the completion), ``poll-max-ns=0`` shows no ``run_poll_handlers`` at
  all;
- Ctrl-C still reports, and a crashed iothread stops the run with its
  name, leaving no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev.images import create_pattern_image

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
IMAGE_SIZE = 32 << 20


def run(args: list[str], *, timeout: float = TIMEOUT,
        env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``qiothread run ARGS`` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "qiothread.cli", "run", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env)


def run_json(args: list[str]) -> dict[str, Any]:
    proc = run([*args, "--output-format=json"])
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: no progress line.
    assert "Jobs:" not in proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two prefilled raw images on a real file system (O_DIRECT)."""
    d = tmp_path_factory.mktemp("images")
    out = []
    for name in ("a.raw", "b.raw"):
        create_pattern_image(d / name, IMAGE_SIZE)
        out.append(d / name)
    return out


@pytest.fixture(scope="module")
def loops(images: list[Path]) -> Iterator[list[str]]:
    """The two images as loop devices with direct I/O (root only)."""
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.skip("loop devices need root and /dev/loop-control")
    from blockdev.loop import attach

    devs = [attach(p, direct_io=True) for p in images]
    try:
        yield [d.path for d in devs]
    finally:
        for d in devs:
            d.close()


def two_by_two(targets: list[str], engine: str) -> list[str]:
    """2 iothreads, 2 devices with 2 queues each, spread over both
    iothreads by ``iothread-vq-mapping``; one node per target."""
    args = ["-object", "iothread,id=io0", "-object", "iothread,id=io1"]
    for i, target in enumerate(targets):
        driver = "host_device" if target.startswith("/dev/") else "file"
        args += [
            "-blockdev", f"driver={driver},node-name=f{i},"
                         f"filename={target},aio={engine},"
                         "cache.direct=on",
            "-blockdev", f"driver=raw,node-name=d{i},file=f{i}",
            "-device", json.dumps({
                "driver": "virtio-blk-pci", "id": f"vblk{i}",
                "drive": f"d{i}", "num-queues": 2,
                "iothread-vq-mapping": [{"iothread": "io0"},
                                        {"iothread": "io1"}]})]
    return args


def total_ios(doc: dict[str, Any]) -> int:
    return sum(j[d]["total_ios"] for j in doc["jobs"]
               for d in ("read", "write", "trim"))


def check_counts(doc: dict[str, Any]) -> None:
    """fio's totals, the guests' own counts and the devices' agree."""
    queues = doc["qiothread"]["queues"]
    guests = sum(q["guest"]["completed"] for q in queues)
    devices = sum(q["requests"] for q in queues)
    assert total_ios(doc) == guests == devices > 0


@pytest.mark.parametrize("engine", ["threads", "native"])
@pytest.mark.parametrize("kind", ["image", "loop"])
def test_two_iothreads_two_devices_two_queues(
        kind: str, engine: str, images: list[Path],
        request: pytest.FixtureRequest) -> None:
    targets = ([str(p) for p in images] if kind == "image"
               else request.getfixturevalue("loops"))
    doc = run_json([*two_by_two(targets, engine),
                    "--rw=randread", "--bs=4k", "--iodepth=4",
                    "--numjobs=4", "--time_based", "--runtime=1"])
    assert len(doc["jobs"]) == 4
    for job in doc["jobs"]:
        assert job["error"] == 0
        assert job["read"]["total_ios"] > 0
    check_counts(doc)
    q = doc["qiothread"]
    # Every queue served, by the iothread the mapping gave it.
    mapping = {(e["device"], e["queue"]): e["iothread"]
               for e in q["queues"]}
    assert mapping == {("vblk0", 0): "io0", ("vblk0", 1): "io1",
                       ("vblk1", 0): "io0", ("vblk1", 1): "io1"}
    assert all(e["requests"] > 0 for e in q["queues"])
    assert q["host"]["engines"] == {"f0": engine, "f1": engine}
    assert {t["id"] for t in q["iothreads"]} == {"io0", "io1"}
    for t in q["iothreads"]:
        assert t["usr_s"] + t["sys_s"] > 0    # the loop thread ran


@pytest.mark.parametrize("kind", ["image", "loop"])
def test_verify_after_writes_finds_no_mismatch(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest,
        images: list[Path]) -> None:
    if kind == "image":
        targets = []
        for name in ("w0.raw", "w1.raw"):
            create_pattern_image(tmp_path / name, 16 << 20)
            targets.append(str(tmp_path / name))
    else:
        targets = request.getfixturevalue("loops")
    jobs: list[str] = []
    for i, name in enumerate("abcd"):
        # Jobs a, c land on vblk0 and b, d on vblk1 (round-robin):
        # disjoint regions per device, as fio's verify needs.
        jobs += [f"--name={name}", f"--offset={4 * i}M"]
    doc = run_json([*two_by_two(targets, "native"), "--rw=randwrite",
                    "--bs=4k", "--iodepth=4", "--size=2M",
                    "--verify=crc32c", *jobs])
    check_counts(doc)
    for job in doc["qiothread"]["jobs"]:
        assert job["verify"]["checked"] == 512
        assert job["verify"]["mismatches"] == 0
    for job in doc["jobs"]:
        assert job["write"]["total_ios"] == 512
        assert job["read"]["total_ios"] == 512   # the verify pass


_POLL_END = re.compile(r"^run_poll_handlers_end ctx \S+ progress (\d) ")


def _poll_run(image: Path, tmp_path: Path, max_ns: int
              ) -> tuple[dict[str, Any], list[str]]:
    trace = tmp_path / f"trace-{max_ns}"
    doc = run_json([
        "-object", f"iothread,id=io0,poll-max-ns={max_ns}",
        "-blockdev", f"driver=file,node-name=f0,filename={image},"
                     "aio=native,cache.direct=on",
        "-blockdev", "driver=raw,node-name=d0,file=f0",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        "-trace", f"enable=run_poll_handlers_*,file={trace}",
        "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based",
        "--runtime=1"])
    return doc, trace.read_text().splitlines() if trace.exists() else []


def test_polling_finds_completions_with_a_wide_window(
        images: list[Path], tmp_path: Path) -> None:
    # 1 ms of polling covers the device time of a 4k read many times.
    doc, lines = _poll_run(images[0], tmp_path, 1_000_000)
    found = [ln for ln in lines if (m := _POLL_END.match(ln))
             and m.group(1) == "1"]
    ios = total_ios(doc)
    assert ios > 0
    # Polling ran and found work, over and over: a request and its
    # completion are each found this way when polling wins (about two
    # hits an I/O); preemption on a busy host loses some.
    assert len(found) * 2 >= ios, (len(found), ios)
    it = doc["qiothread"]["iothreads"][0]
    assert it["poll_progress"] >= len(found) > 0
    # In poll mode the device asks the guest not to kick: most kicks
    # were suppressed.
    (queue,) = doc["qiothread"]["queues"]
    assert queue["kicks_suppressed"] > queue["kicks_sent"]


def test_no_polling_without_a_window(images: list[Path],
                                     tmp_path: Path) -> None:
    doc, lines = _poll_run(images[0], tmp_path, 0)
    assert total_ios(doc) > 0
    assert not any(ln.startswith("run_poll_handlers") for ln in lines)
    assert doc["qiothread"]["iothreads"][0]["poll_progress"] == 0


def _children_of(pid: int) -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out[int(entry.name)] = comm
    return out


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qiothread.cli", "run", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)


def _wait_for_children(proc: subprocess.Popen[str], want: str,
                       deadline_s: float = 60) -> dict[int, str]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        kids = _children_of(proc.pid)
        if any(c == want for c in kids.values()):
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no child {want!r} appeared")


def test_ctrl_c_stops_cleanly_and_still_reports(images: list[Path],
                                               tmp_path: Path) -> None:
    sock = tmp_path / f"qmp-{uuid.uuid4().hex[:8]}.sock"
    proc = _start([
        "-drive", f"if=none,id=d0,file={images[0]},format=raw,"
                  "cache=none,aio=native",
        "-object", "iothread,id=io0",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        "-qmp", f"unix:{sock},server=on,wait=off",
        "--rw=randread", "--time_based", "--runtime=60",
        "--output-format=json"])
    try:
        kids = _wait_for_children(proc, "guest0")
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 0, err
    assert "stopped early" in err
    doc = json.loads(out)
    assert total_ios(doc) > 0
    check_counts(doc)
    # Nothing left behind: children, socket.
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or \
            "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not sock.exists()


def test_crashed_iothread_stops_the_run(images: list[Path],
                                        tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = _start([
        "-object", "iothread,id=victim",
        "-blockdev", f"driver=file,node-name=f0,filename={images[1]},"
                     "aio=threads,cache.direct=on",
        "-device", "virtio-blk-pci,drive=f0,iothread=victim",
        "-qmp", f"unix:{sock},server=on,wait=off",
        "--rw=randread", "--time_based", "--runtime=60"])
    try:
        kids = _wait_for_children(proc, "guest0")
        victim = next(p for p, c in kids.items() if c == "IO victim")
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "iothread 'victim'" in err and "SIGKILL" in err, err
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists()
    assert not sock.exists()


def test_progress_line_only_on_a_terminal(images: list[Path]) -> None:
    import pty

    master, slave = pty.openpty()
    args = ["-drive", f"if=none,id=d0,file={images[0]},format=raw,"
                      "cache=none,aio=native",
            "-object", "iothread,id=io0",
            "-device", "virtio-blk-pci,drive=d0,iothread=io0",
            "--time_based", "--runtime=3", "--output-format=json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qiothread.cli", "run", *args],
        stdout=subprocess.PIPE, stderr=slave, text=True, cwd=ROOT)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:         # EIO: the other side closed
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, seen
    assert re.search(rb"Jobs: 1 \(f=1\): \[r\(1\)\]\[\d+\.\d%\]", seen)
    assert b"IOPS]" in seen and b"[eta 00m:0" in seen
    # stdout is pure JSON: nothing of the progress line there.
    assert json.loads(out)["jobs"][0]["read"]["total_ios"] > 0


def test_default_run_prints_fio_summary(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = run(["--runtime=1"], env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^job: \(groupid=0, jobs=1\): err= 0: pid=\d+", out,
                     re.M)
    assert re.search(r"^  read: IOPS=\d", out, re.M)
    assert "clat percentiles (usec):" in out
    assert "qiothread (QEMU 7.2 behaviour):" in out
    assert "iothread0: thread_id=" in out
    assert (tmp_path / "cache" / "qiothread").is_dir()


def test_device_without_iothread_runs_in_the_main_loop(
        images: list[Path], tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    doc = run_json([
        "-drive", f"if=none,id=d0,file={images[0]},format=raw,"
                  "cache=none,aio=threads",
        "-device", "virtio-blk-pci,drive=d0",
        "-trace", f"enable=run_poll_handlers_*,file={trace}",
        "--time_based", "--runtime=1"])
    check_counts(doc)
    (q,) = doc["qiothread"]["queues"]
    assert q["iothread"] == "main-loop"
    # QEMU's main loop context never busy-polls.
    assert not trace.exists() or trace.read_text() == ""


def test_iolog_replay_and_latency_log(images: list[Path],
                                      tmp_path: Path) -> None:
    log = tmp_path / "replay.log"
    log.write_text("fio version 2 iolog\n/dev/vda add\n/dev/vda open\n"
                   "/dev/vda read 0 4096\n/dev/vda write 8192 4096\n"
                   "/dev/vda read 4096 4096\n/dev/vda close\n")
    image = tmp_path / "replay.raw"
    create_pattern_image(image, 1 << 20)
    doc = run_json([
        "-drive", f"if=none,id=d0,file={image},format=raw",
        "-object", "iothread,id=io0",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        f"--read_iolog={log}", f"--write_lat_log={tmp_path}/lat"])
    job = doc["jobs"][0]
    assert (job["read"]["total_ios"], job["write"]["total_ios"]) == (2, 1)
    rows = [[int(x) for x in line.split(", ")] for line in
            (tmp_path / "lat_clat.1.log").read_text().splitlines()]
    # fio's log columns: time ms, value ns, ddir, bs, offset, prio,
    # issue time; in completion order, which at QD1 is the log's order.
    assert [(r[2], r[3], r[4]) for r in rows] == [
        (0, 4096, 0), (1, 4096, 8192), (0, 4096, 4096)]
    assert all(r[1] > 0 for r in rows)
    assert (tmp_path / "lat_slat.1.log").exists()
    assert (tmp_path / "lat_lat.1.log").exists()


def test_qmp_wait_on_holds_the_guests_until_a_client_connects(
        images: list[Path], tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "wait.sock"
    proc = _start([
        "-drive", f"if=none,id=d0,file={images[0]},format=raw,"
                  "cache=none,aio=native",
        "-object", "iothread,id=io0",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        "-qmp", f"unix:{sock},server=on,wait=on",
        "--time_based", "--runtime=1", "--output-format=json"])
    try:
        end = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < end:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(1.0)
        # QEMU waits for the monitor before it creates the iothreads
        # and runs the machine: no child yet.
        assert _children_of(proc.pid) == {}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            greeting = json.loads(s.makefile().readline())
            assert "QMP" in greeting
            out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "waiting for a QMP client" in err
    assert total_ios(json.loads(out)) > 0


def test_crashed_guest_stops_the_run_and_the_rest_is_reported(
        images: list[Path]) -> None:
    proc = _start([
        "-object", "iothread,id=io0",
        "-drive", f"if=none,id=d0,file={images[1]},format=raw,"
                  "cache=none,aio=threads",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        "--numjobs=2", "--time_based", "--runtime=60",
        "--output-format=json"])
    try:
        kids = _wait_for_children(proc, "guest1")
        victim = next(p for p, c in kids.items() if c == "guest1")
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "job 1" in err and "SIGKILL" in err, err
    # The surviving guest was asked to stop and still reported.
    doc = json.loads(out)
    assert len(doc["jobs"]) == 1 and total_ios(doc) > 0
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists()


def test_injected_eio_fails_the_job_as_fio_does(tmp_path: Path) -> None:
    image = tmp_path / "eio.raw"
    create_pattern_image(image, 4 << 20)
    proc = run([
        "-blockdev", f"driver=file,node-name=f0,filename={image},"
                     "aio=threads,faults.eio=0+4M",
        "-object", "iothread,id=io0",
        "-device", "virtio-blk-pci,drive=f0,iothread=io0",
        "--rw=randread", "--size=1M", "--output-format=json"])
    assert proc.returncode == 1
    assert "job 'job': I/O error: Input/output error" in proc.stderr
    job = json.loads(proc.stdout)["jobs"][0]
    # fio stops a job at its first error (continue_on_error=none).
    assert job["error"] == 5


def test_regression_large_blocks_fit_in_guest_memory(
        images: list[Path]) -> None:
    """Guest memory is sized for each job's iodepth x bs buffers; the
    VMM once reserved a second, unused set and large blocks ran out."""
    doc = run_json([
        "-drive", f"if=none,id=d0,file={images[0]},format=raw,"
                  "cache=none,aio=native",
        "-object", "iothread,id=io0",
        "-device", "virtio-blk-pci,drive=d0,iothread=io0",
        "--rw=read", "--bs=1M", "--iodepth=16", "--size=32M"])
    assert doc["jobs"][0]["read"]["total_ios"] == 32


def test_regression_512_byte_io_on_a_4k_loop_device(tmp_path: Path) -> None:
    """--bs=512 on a 4096-byte logical-block loop device got EIO.

    The device advertised the host's 4096-byte blocks, so its range
    check refused every 512-byte request.  QEMU 7.2's virtio-blk has its
    own logical_block_size (512 unless set; the host is probed only on
    DASD), and the block layer serves misaligned requests to the
    O_DIRECT 4096 host through bounce buffers.
    """
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.skip("loop devices need root and /dev/loop-control")
    from blockdev.loop import attach

    image = tmp_path / "4k.raw"
    create_pattern_image(image, 8 << 20)
    dev = attach(image, direct_io=True, block_size=4096)
    try:
        assert dev.logical_block_size == 4096
        doc = run_json([
            "-object", "iothread,id=io0",
            "-blockdev", f"driver=host_device,node-name=f0,"
                         f"filename={dev.path},aio=native,"
                         "cache.direct=on",
            "-blockdev", "driver=raw,node-name=d0,file=f0",
            "-device", "virtio-blk-pci,id=vblk0,drive=d0,iothread=io0",
            "--rw=randrw", "--bs=512", "--iodepth=4", "--size=1M",
            "--verify=crc32c"])
    finally:
        dev.close()
    check_counts(doc)
    (job,) = doc["jobs"]
    assert job["error"] == 0
    assert job["write"]["total_ios"] > 0
    (ours,) = doc["qiothread"]["jobs"]
    assert ours["verify"]["checked"] == job["write"]["total_ios"]
    assert ours["verify"]["mismatches"] == 0
