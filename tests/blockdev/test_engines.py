"""Real O_DIRECT I/O on a file on disk through each aio engine."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from blockdev.images import (
    create_pattern_image,
    first_mismatch,
    pattern_bytes,
)
from blockdev.options import open_blockdev
from tests.blockdev.conftest import Waiter, aligned_buffer, run_until

ENGINES = ["threads", "native", "io_uring"]
MiB = 1 << 20


def _open(path: Path, aio: str, ctx: Any, **extra: Any) -> Any:
    opts = {"driver": "file", "filename": str(path), "aio": aio,
            "cache.direct": "on", "node-name": "n0", **extra}
    node = open_blockdev(opts)
    node.attach_aio_context(ctx)
    assert node.aio == aio, "the engine fell back to the thread pool"
    return node


@pytest.fixture
def image(workdir: Path) -> Path:
    return create_pattern_image(workdir / "disk.img", 4 * MiB, seed=7).path


@pytest.mark.parametrize("aio", ENGINES)
def test_read_pattern_back(image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx)
    try:
        assert node.direct and node.request_alignment in (512, 4096)
        view = aligned_buffer(64 * 4096)
        w = Waiter()
        # 64 reads of 4 KiB at scattered offsets, all in flight at once.
        offs = [(i * 37 % 1024) * 4096 for i in range(64)]
        for i, off in enumerate(offs):
            node.preadv(off, [view[i * 4096:(i + 1) * 4096]], w.cb(i))
        run_until(ctx, w.done(64))
        assert set(w.results.values()) == {0}
        for i, off in enumerate(offs):
            chunk = view[i * 4096:(i + 1) * 4096]
            assert first_mismatch(chunk, off, seed=7) is None
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_write_then_read_identical(image: Path, ctx: Any,
                                   aio: str) -> None:
    node = _open(image, aio, ctx)
    try:
        view = aligned_buffer(3 * 65536)
        data = pattern_bytes(0, 3 * 65536, seed=99)
        view[:] = data
        w = Waiter()
        # A vectored write of three segments, then read back.
        node.pwritev(MiB, [view[0:65536], view[65536:131072],
                           view[131072:]], w.cb("w"))
        run_until(ctx, w.done(1))
        assert w.results["w"] == 0
        view[:] = bytes(len(view))
        node.preadv(MiB, [view], w.cb("r"))
        run_until(ctx, w.done(2))
        assert w.results["r"] == 0
        assert bytes(view) == data
        node.flush(w.cb("f"))
        run_until(ctx, w.done(3))
        assert w.results["f"] == 0
    finally:
        node.close()
    # And the bytes really are in the file (not just in our buffers).
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(len(data)) == data


@pytest.mark.parametrize("aio", ENGINES)
def test_discard_and_write_zeroes(image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx, discard="unmap")
    try:
        blocks_before = os.stat(image).st_blocks
        w = Waiter()
        node.pdiscard(0, MiB, w.cb("discard"))
        node.pwrite_zeroes(2 * MiB, 65536, False, w.cb("zeroes"))
        node.pwrite_zeroes(3 * MiB, 65536, True, w.cb("unmap"))
        run_until(ctx, w.done(3))
        assert w.results == {"discard": 0, "zeroes": 0, "unmap": 0}
        # The punched hole released the blocks (ext4 supports it).
        assert os.stat(image).st_blocks <= blocks_before - MiB // 512
        view = aligned_buffer(MiB)
        for off, n in ((0, MiB), (2 * MiB, 65536), (3 * MiB, 65536)):
            node.preadv(off, [view[:n]], w.cb(("r", off)))
            run_until(ctx, w.done(len(w.results) + 1))
            assert w.results[("r", off)] == 0
            assert bytes(view[:n]) == bytes(n)
        # Around the zeroed ranges the pattern is intact.
        node.preadv(2 * MiB + 65536, [view[:4096]], w.cb("after"))
        run_until(ctx, w.done(len(w.results) + 1))
        assert first_mismatch(view[:4096], 2 * MiB + 65536, 7) is None
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_discard_ignore_is_a_successful_no_op(image: Path, ctx: Any,
                                              aio: str) -> None:
    # QEMU's default discard=ignore: DISCARD succeeds and does nothing,
    # and WRITE_ZEROES zeroes without deallocating.
    node = _open(image, aio, ctx)
    try:
        blocks = os.stat(image).st_blocks
        w = Waiter()
        node.pdiscard(0, MiB, w.cb("discard"))
        node.pwrite_zeroes(MiB, MiB, True, w.cb("zeroes"))
        run_until(ctx, w.done(2))
        assert w.results == {"discard": 0, "zeroes": 0}
        assert os.stat(image).st_blocks == blocks
        view = aligned_buffer(MiB)
        node.preadv(0, [view], w.cb("r0"))
        run_until(ctx, w.done(3))
        assert first_mismatch(view, 0, seed=7) is None
        node.preadv(MiB, [view], w.cb("r1"))
        run_until(ctx, w.done(4))
        assert bytes(view) == bytes(MiB)
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_short_read_is_zero_filled(image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx)
    try:
        # The file shrinks under the node: reads past the new end are
        # short, and QEMU's rule zero-fills them.
        os.truncate(image, 4 * MiB - 8192)
        view = aligned_buffer(16384)
        view[:] = b"\xff" * 16384
        w = Waiter()
        node.preadv(4 * MiB - 16384, [view], w.cb(0))
        run_until(ctx, w.done(1))
        assert w.results[0] == 0
        assert first_mismatch(view[:8192], 4 * MiB - 16384, 7) is None
        assert bytes(view[8192:]) == bytes(8192)
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_misaligned_requests_take_the_bounce_path(
        image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx)
    try:
        # Offset, length and buffer address all off the 512 grid.
        buf = bytearray(1000 + 3)
        view = memoryview(buf)[3:]
        w = Waiter()
        node.preadv(100, [view], w.cb("r"))
        run_until(ctx, w.done(1))
        assert w.results["r"] == 0
        assert bytes(view) == pattern_bytes(96, 1008, 7)[4:1004]
        new = bytes(range(256)) * 4
        view[:] = new[:1000]
        node.pwritev(5000, [view], w.cb("w"))
        run_until(ctx, w.done(2))
        assert w.results["w"] == 0
    finally:
        node.close()
    with open(image, "rb") as f:
        f.seek(4096)
        blk = f.read(8192)
    assert blk[904:1904] == new[:1000]
    # Read-modify-write left the neighbours alone.
    assert blk[:904] == pattern_bytes(4096, 904, 7)
    assert blk[1904:] == pattern_bytes(4096 + 1904, 8192 - 1904, 7)


@pytest.mark.parametrize("aio", ENGINES)
def test_out_of_range_and_read_only(image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx, **{"read-only": "on"})
    try:
        view = aligned_buffer(4096)
        w = Waiter()
        node.preadv(4 * MiB, [view], w.cb("past-end"))
        node.pwritev(0, [view], w.cb("write"))
        node.pdiscard(0, 4096, w.cb("discard"))
        run_until(ctx, w.done(3))
        assert w.results == {"past-end": -errno.EIO,
                             "write": -errno.EPERM,
                             "discard": -errno.EPERM}
    finally:
        node.close()


@pytest.mark.parametrize("aio", ENGINES)
def test_plugged_batch_completes(image: Path, ctx: Any, aio: str) -> None:
    node = _open(image, aio, ctx)
    try:
        view = aligned_buffer(200 * 4096)
        w = Waiter()
        node.io_plug()
        for i in range(200):
            node.preadv(i * 4096, [view[i * 4096:(i + 1) * 4096]], w.cb(i))
        node.io_unplug()
        run_until(ctx, w.done(200))
        assert set(w.results.values()) == {0}
        assert first_mismatch(view, 0, 7) is None
    finally:
        node.close()
