"""Loop devices: attach with direct I/O, I/O through each engine, detach.

Needs root and loop support (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev import host
from blockdev import loop as loop_mod
from blockdev.images import check_pattern, create_pattern_image, first_mismatch
from blockdev.loop import LoopDevice, attach, loop_info
from blockdev.options import open_blockdev
from blockdev.raw_aio import AioType, RawAIOCB
from qiothread.errors import BlockError
from tests.blockdev.conftest import REPO, Waiter, aligned_buffer, run_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(
        "/dev/loop-control"), reason="needs root and loop devices"),
]

ENGINES = ["threads", "native", "io_uring"]
SIZE = 8 << 20


@pytest.fixture(params=[512, 4096], ids=["lbs512", "lbs4096"])
def loopdev(request: pytest.FixtureRequest, workdir: Path
            ) -> Iterator[LoopDevice]:
    img = create_pattern_image(workdir / "loop.img", SIZE, seed=5).path
    dev = attach(img, direct_io=True, block_size=request.param)
    try:
        yield dev
    finally:
        dev.close()
    assert "backing_file" not in loop_info(dev.path)


def _node(dev: LoopDevice, aio: str, ctx: Any) -> Any:
    node = open_blockdev({"driver": "host_device", "filename": dev.path,
                          "aio": aio, "cache.direct": "on",
                          "discard": "unmap"})
    node.attach_aio_context(ctx)
    assert node.aio == aio
    return node


def test_attach_reports_what_the_kernel_does(loopdev: LoopDevice) -> None:
    info = loop_info(loopdev.path)
    assert info["backing_file"] == loopdev.backing_file
    assert info["autoclear"] == "1"
    # ext4 on this disk honours O_DIRECT at both sizes: no fall-back.
    assert loopdev.direct_io and not loopdev.fell_back
    assert info["dio"] == "1"
    assert host.logical_block_size(loopdev.fd) == \
        loopdev.logical_block_size
    assert host.block_device_size(loopdev.fd) == SIZE
    assert "direct I/O" in loopdev.describe()


@pytest.mark.parametrize("aio", ENGINES)
def test_io_through_each_engine(loopdev: LoopDevice, ctx: Any,
                                aio: str) -> None:
    node = _node(loopdev, aio, ctx)
    lbs = loopdev.logical_block_size
    try:
        assert node.logical_block_size == lbs
        assert node.request_alignment == lbs
        assert node.alignment_source == "BLKSSZGET"
        view = aligned_buffer(65536)
        w = Waiter()
        node.preadv(SIZE - 65536, [view], w.cb("read"))
        run_until(ctx, w.done(1))
        assert w.results["read"] == 0
        assert first_mismatch(view, SIZE - 65536, seed=5) is None
        view[:] = b"\xa5" * 65536
        node.pwritev(65536, [view], w.cb("write"))
        node.flush(w.cb("flush"))
        node.pdiscard(SIZE // 2, 65536, w.cb("discard"))
        node.pwrite_zeroes(3 * 65536, 65536, False, w.cb("zeroes"))
        run_until(ctx, w.done(5))
        assert all(w.results[k] == 0
                   for k in ("write", "flush", "discard", "zeroes"))
        # BLKDISCARD on the loop device punched the backing file.  (Not
        # st_blocks: splitting an extent may allocate an index block.)
        bfd = os.open(loopdev.backing_file, os.O_RDONLY)
        try:
            assert os.lseek(bfd, SIZE // 2, os.SEEK_HOLE) == SIZE // 2
            assert os.lseek(bfd, SIZE // 2, os.SEEK_DATA) >= \
                SIZE // 2 + 65536
        finally:
            os.close(bfd)
        node.preadv(65536, [view], w.cb("back"))
        run_until(ctx, w.done(6))
        assert bytes(view) == b"\xa5" * 65536
        node.preadv(3 * 65536, [view], w.cb("zeroed"))
        run_until(ctx, w.done(7))
        assert bytes(view) == bytes(65536)
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_alignment_bounce_on_the_device(loopdev: LoopDevice, ctx: Any,
                                        aio: str) -> None:
    lbs = loopdev.logical_block_size
    # The kernel itself refuses a request that is 512- but not
    # lbs-aligned (so the bounce path below is really needed).
    if lbs == 4096:
        buf = aligned_buffer(4096)
        dfd = os.open(loopdev.path, os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as exc:
                os.preadv(dfd, [buf[:512]], 512)
            assert exc.value.errno == errno.EINVAL
        finally:
            os.close(dfd)
    node = _node(loopdev, aio, ctx)
    try:
        view = aligned_buffer(8192)[512:512 + 3 * 512]
        w = Waiter()
        node.preadv(512, [view], w.cb("r"))
        run_until(ctx, w.done(1))
        assert w.results["r"] == 0
        assert first_mismatch(view, 512, seed=5) is None
        view[:] = b"\x5a" * len(view)
        node.pwritev(1024, [view], w.cb("w"))
        run_until(ctx, w.done(2))
        assert w.results["w"] == 0
    finally:
        node.close()
    with open(loopdev.path, "rb") as f:
        data = f.read(8192)
    assert data[1024:1024 + 1536] == b"\x5a" * 1536
    assert first_mismatch(data[:1024], 0, seed=5) is None
    assert first_mismatch(data[2560:], 2560, seed=5) is None


@pytest.mark.parametrize("aio", ENGINES)
def test_short_write_at_device_end_is_enospc(loopdev: LoopDevice,
                                             ctx: Any, aio: str) -> None:
    # A write that runs past the end of a block device is cut short by
    # the kernel; QEMU's rule makes that ENOSPC.  Sent below the node's
    # range check, straight to the engine, since the node refuses it.
    node = _node(loopdev, aio, ctx)
    try:
        buf = aligned_buffer(8192)
        req = RawAIOCB(AioType.WRITE, node.fd, SIZE - 4096, 8192, [buf],
                       node.request_alignment)
        w = Waiter()
        node._engine_submit(req, w.cb("w"))
        run_until(ctx, w.done(1))
        assert w.results["w"] == -errno.ENOSPC
    finally:
        node.close()


def test_detached_on_exception(workdir: Path) -> None:
    img = create_pattern_image(workdir / "x.img", 1 << 20).path
    with pytest.raises(RuntimeError), attach(img) as dev:
        assert loop_info(dev.path)["backing_file"] == str(img)
        raise RuntimeError("boom")
    assert "backing_file" not in loop_info(dev.path)


def test_kill_9_leaves_no_device_behind(workdir: Path) -> None:
    img = create_pattern_image(workdir / "k.img", 1 << 20).path
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockdev.loop", "attach", str(img)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert proc.stdout is not None
        dev = proc.stdout.readline().strip()
        proc.stdout.close()
        assert dev.startswith("/dev/loop"), dev
        assert loop_info(dev)["backing_file"] == str(img)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # The kernel closed the dead process's descriptor; autoclear
        # detaches the device (asynchronously, so allow it a moment).
        deadline = time.monotonic() + 30
        while "backing_file" in loop_info(dev):
            assert time.monotonic() < deadline, f"{dev} left behind"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # Nothing anywhere still refers to our image.
    out = subprocess.run(["losetup", "-j", str(img)], capture_output=True,
                         text=True, check=True).stdout
    assert out == ""


def test_read_only_device_refuses_writes(workdir: Path, ctx: Any) -> None:
    img = create_pattern_image(workdir / "ro.img", 1 << 20).path
    with attach(img, read_only=True) as dev:
        node = open_blockdev({"driver": "host_device", "filename": dev.path,
                              "cache.direct": "on", "read-only": "on"})
        node.attach_aio_context(ctx)
        try:
            w = Waiter()
            node.pwritev(0, [memoryview(mmap.mmap(-1, 4096))], w.cb(0))
            run_until(ctx, w.done(1))
            assert w.results[0] == -errno.EPERM
        finally:
            node.close()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="no mkfs")
def test_fall_back_to_buffered_is_reported(workdir: Path) -> None:
    # A filesystem on a 4096-byte device needs 4096-aligned O_DIRECT, so
    # a 512-byte loop device on a file there cannot use direct I/O: the
    # kernel attaches it buffered and says so only in sysfs.
    outer_img = create_pattern_image(workdir / "fs.img", 64 << 20).path
    mnt = workdir / "mnt"
    mnt.mkdir()
    with attach(outer_img, block_size=4096) as outer:
        subprocess.run(["mkfs.ext4", "-q", "-F", outer.path], check=True,
                       capture_output=True)
        subprocess.run(["mount", outer.path, str(mnt)], check=True)
        try:
            inner_img = create_pattern_image(mnt / "inner.img",
                                             4 << 20).path
            with attach(inner_img, direct_io=True, block_size=512) as dev:
                assert loop_info(dev.path)["dio"] == "0"
                assert not dev.direct_io and dev.fell_back
                assert dev.describe().endswith(
                    "buffered I/O, logical block size 512 (direct I/O was "
                    "requested; the kernel fell back to buffered)")
            with attach(inner_img, direct_io=True, block_size=4096) as dev:
                assert dev.direct_io and not dev.fell_back
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            mnt.rmdir()


@pytest.mark.parametrize("aio", ENGINES)
def test_regression_concurrent_misaligned_writes_all_land(
        workdir: Path, ctx: Any, aio: str) -> None:
    """Read-modify-writes sharing a block raced and lost updates."""
    img = create_pattern_image(workdir / "rmw.img", 1 << 20).path
    with attach(img, block_size=4096) as dev:
        node = _node(dev, aio, ctx)
        try:
            w = Waiter()
            bufs = []
            # 32 writes of 100 bytes, 8 to each of four 4 KiB blocks,
            # all in flight at once: each is a read-modify-write.
            for i in range(32):
                buf = bytearray(bytes([i + 1]) * 100)
                bufs.append(buf)
                off = (i % 4) * 4096 + (i // 4) * 512
                node.pwritev(off, [memoryview(buf)], w.cb(i))
            run_until(ctx, w.done(32))
            assert set(w.results.values()) == {0}
        finally:
            node.close()
        with open(dev.path, "rb") as f:
            data = f.read(4 * 4096)
    for i in range(32):
        off = (i % 4) * 4096 + (i // 4) * 512
        assert data[off:off + 100] == bytes([i + 1]) * 100, i


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _bound_to(img: Path) -> str:
    return subprocess.run(["losetup", "-j", str(img)], capture_output=True,
                          text=True, check=True).stdout


def test_regression_failed_attach_leaks_nothing(workdir: Path) -> None:
    """A missing backing file leaked /dev/loop-control's descriptor and
    escaped as a bare FileNotFoundError."""
    before = _fds()
    missing = workdir / "missing.img"
    with pytest.raises(BlockError) as exc:
        attach(missing)
    assert str(exc.value) == (f"Could not open '{missing}': No such file "
                              "or directory")
    img = create_pattern_image(workdir / "bs.img", 1 << 20).path
    # A block size the kernel refuses: LOOP_CONFIGURE fails with EINVAL.
    with pytest.raises(BlockError) as exc2:
        attach(img, block_size=1000)
    assert "Invalid argument" in str(exc2.value)
    assert _fds() == before
    assert _bound_to(img) == ""


def test_regression_interrupt_after_configure_detaches(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between LOOP_CONFIGURE and the return kept the device
    attached (through a descriptor nobody held) until process exit."""
    img = create_pattern_image(workdir / "int.img", 1 << 20).path
    before = _fds()

    def interrupted(dev: str) -> dict[str, str]:
        # Configured by now: the kernel names our image.
        assert loop_info(dev)["backing_file"] == str(img)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "loop_info", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attach(img)
    assert _fds() == before
    deadline = time.monotonic() + 30
    while _bound_to(img):
        assert time.monotonic() < deadline, "device left behind"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_holder_leaves_no_device(workdir: Path,
                                               sig: int) -> None:
    img = create_pattern_image(workdir / "s.img", 1 << 20).path
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockdev.loop", "attach", str(img)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert proc.stdout is not None
        dev = proc.stdout.readline().strip()
        assert dev.startswith("/dev/loop"), dev
        assert loop_info(dev)["backing_file"] == str(img)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 30
    while _bound_to(img):
        assert time.monotonic() < deadline, "device left behind"
        time.sleep(0.05)


def test_sigterm_to_a_plain_python_holder_leaves_no_device(
        workdir: Path) -> None:
    """A program that attaches and is killed by SIGTERM's default
    action (no handler, no finally) still leaves nothing: autoclear."""
    img = create_pattern_image(workdir / "p.img", 1 << 20).path
    code = ("import sys, time; from blockdev.loop import attach;"
            f"d = attach({str(img)!r}); print(d.path, flush=True);"
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        dev = proc.stdout.readline().strip()
        assert loop_info(dev)["backing_file"] == str(img)
        proc.terminate()
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 30
    while _bound_to(img):
        assert time.monotonic() < deadline, "device left behind"
        time.sleep(0.05)


@pytest.mark.parametrize("aio", ENGINES)
def test_requests_at_the_device_end(loopdev: LoopDevice, ctx: Any,
                                    aio: str) -> None:
    """Sector-sized reads at and across the end of a 512 and a 4096
    device: inside it they succeed (bounced when shorter than a block),
    past it they fail with EIO, as blk_check_byte_request has it; a
    buffer misaligned in memory at an aligned offset is bounced too."""
    node = _node(loopdev, aio, ctx)
    try:
        cases = {"last": (SIZE - 512, 512), "last3": (SIZE - 1536, 1536),
                 "across": (SIZE - 512, 1024), "past": (SIZE, 512),
                 "odd": (4096 + 512, 2560), "negative": (-512, 512)}
        w = Waiter()
        bufs = {}
        for tag, (off, n) in cases.items():
            bufs[tag] = aligned_buffer(8192)[:n]
            node.preadv(off, [bufs[tag]], w.cb(tag))
        mem = aligned_buffer(8192)[8:8 + 4096]
        node.preadv(8192, [mem], w.cb("mem"))
        run_until(ctx, w.done(len(cases) + 1))
        assert w.results == {"last": 0, "last3": 0, "across": -errno.EIO,
                             "past": -errno.EIO, "odd": 0,
                             "negative": -errno.EIO, "mem": 0}
        for tag in ("last", "last3", "odd"):
            assert first_mismatch(bufs[tag], cases[tag][0], seed=5) is None
        assert first_mismatch(mem, 8192, seed=5) is None
    finally:
        node.close()


def test_regression_writable_node_on_a_read_only_device_is_refused(
        workdir: Path) -> None:
    """A read-only block device opens O_RDWR without complaint, so the
    node opened and every write then failed; QEMU's check_hdev_writable
    (BLKROGET) refuses the open: "The device is not writable"."""
    img = create_pattern_image(workdir / "rodev.img", 1 << 20).path
    before = _fds()
    with attach(img, read_only=True) as dev:
        for direct in ("off", "on"):
            with pytest.raises(BlockError) as exc:
                open_blockdev({"driver": "host_device",
                               "filename": dev.path,
                               "cache.direct": direct})
            assert str(exc.value) == ("The device is not writable: "
                                      "Permission denied")
        # Read-only nodes on it are fine.
        open_blockdev({"driver": "host_device", "filename": dev.path,
                       "read-only": "on"}).close()
    assert _fds() == before


def _types_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from blockdev import file_posix
    seen: list[int] = []
    real = file_posix.handle_aiocb

    def spy(req: RawAIOCB) -> int:
        seen.append(int(req.type))
        return real(req)

    monkeypatch.setattr(file_posix, "handle_aiocb", spy)
    return seen


@pytest.mark.parametrize("direct", ["on", "off"])
def test_regression_write_zeroes_on_a_device_as_qemu(
        workdir: Path, ctx: Any, monkeypatch: pytest.MonkeyPatch,
        direct: str) -> None:
    """WRITE_ZEROES on a block device, as file-posix does it:

    - with MAY_UNMAP the request type is WRITE_ZEROES|DISCARD|BLKDEV
      (0x2030; was 0x6020) and the device is first asked to deallocate
      (fallocate PUNCH_HOLE, which a loop device passes on as a hole in
      its backing file; BLKZEROOUT kept the range allocated);
    - without O_DIRECT BLKZEROOUT is not used at all (has_write_zeroes
      is false there: page cache), zeroes are written as data.
    """
    img = create_pattern_image(workdir / "wz.img", 1 << 20, seed=8).path
    zeroouts: list[tuple[int, int]] = []
    real_zeroout = host.blkzeroout

    def blkzeroout(fd: int, offset: int, length: int) -> int:
        zeroouts.append((offset, length))
        return real_zeroout(fd, offset, length)

    monkeypatch.setattr(host, "blkzeroout", blkzeroout)
    seen = _types_run(monkeypatch)
    with attach(img, block_size=4096) as dev:
        node = open_blockdev({"driver": "host_device", "filename": dev.path,
                              "cache.direct": direct, "discard": "unmap"})
        node.attach_aio_context(ctx)
        try:
            w = Waiter()
            node.pwrite_zeroes(65536, 65536, True, w.cb("unmap"))
            node.pwrite_zeroes(4 * 65536, 65536, False, w.cb("keep"))
            run_until(ctx, w.done(2))
            assert w.results == {"unmap": 0, "keep": 0}
            view = aligned_buffer(65536)
            for off in (65536, 4 * 65536):
                node.preadv(off, [view], w.cb(off))
                run_until(ctx, w.done(len(w.results) + 1))
                assert bytes(view) == bytes(65536)
            node.preadv(2 * 65536, [view], w.cb("kept"))
            run_until(ctx, w.done(len(w.results) + 1))
            assert first_mismatch(view, 2 * 65536, seed=8) is None
        finally:
            node.close()
    assert seen[:2] == [0x2030, 0x2020]
    # Only the non-unmapping request may use BLKZEROOUT, and only with
    # O_DIRECT.
    assert zeroouts == ([(4 * 65536, 65536)] if direct == "on" else [])
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.lseek(fd, 65536, os.SEEK_HOLE) == 65536
    finally:
        os.close(fd)


@pytest.mark.parametrize("aio", ENGINES)
def test_regression_write_zeroes_fall_back_writes_zeroes(
        workdir: Path, ctx: Any, aio: str) -> None:
    """The fall-back that writes zeroes as data always failed with EIO:
    closing its buffer while a view was still exported raised
    BufferError in the worker.  A WRITE_ZEROES that breaks the 4096
    alignment of the device takes it (BLKZEROOUT refuses it)."""
    img = create_pattern_image(workdir / "fb.img", 1 << 20, seed=9).path
    with attach(img, block_size=4096) as dev:
        node = _node(dev, aio, ctx)
        try:
            w = Waiter()
            node.pwrite_zeroes(4096 + 512, 1024, False, w.cb("z"))
            run_until(ctx, w.done(1))
            assert w.results == {"z": 0}
            view = aligned_buffer(8192)
            node.preadv(4096, [view], w.cb("r"))
            run_until(ctx, w.done(2))
            assert bytes(view[512:1536]) == bytes(1024)
            assert first_mismatch(view[:512], 4096, seed=9) is None
            assert first_mismatch(view[1536:], 4096 + 1536, seed=9) is None
        finally:
            node.close()


def test_regression_ci_script_takes_the_image_path_from_the_caller(
        workdir: Path) -> None:
    """images/ci-loop-image.sh changed to the repository before using a
    relative IMAGE, so the image landed in the repository."""
    script = REPO / "images" / "ci-loop-image.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen([str(script), "ci.img", "1M", "4096", "3"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        dev = proc.stdout.readline().strip()
        assert dev.startswith("/dev/loop"), proc.stderr.read()
        assert loop_info(dev)["backing_file"] == str(workdir / "ci.img")
        assert loop_info(dev)["logical_block_size"] == "4096"
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert not (REPO / "ci.img").exists()
    assert check_pattern(workdir / "ci.img", seed=3) is None
    deadline = time.monotonic() + 30
    while _bound_to(workdir / "ci.img"):
        assert time.monotonic() < deadline, "device left behind"
        time.sleep(0.05)


def test_regression_no_free_device_is_a_block_error(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOP_CTL_GET_FREE failing (all devices taken, max_loop reached)
    escaped as a bare OSError.  The kernel's answer is faked at the
    ioctl seam; everything else is real."""
    img = create_pattern_image(workdir / "nf.img", 1 << 20).path
    real = loop_mod.fcntl.ioctl

    def ioctl(fd: int, request: int, *args: Any) -> Any:
        if request == loop_mod.LOOP_CTL_GET_FREE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, request, *args)

    before = _fds()
    monkeypatch.setattr(loop_mod.fcntl, "ioctl", ioctl)
    with pytest.raises(BlockError) as exc:
        attach(img)
    assert str(exc.value) == ("Could not get a free loop device: No space "
                              "left on device")
    assert _fds() == before
