"""Guest memory (memfd) and the in-memory block node."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from blockdev.memory import MemoryBackend
from qiothread.aio import AioContext
from qiothread.errors import ConfigError, InternalError
from virtio.memory import FIRST_ADDR, GuestMemory


def test_alloc_is_aligned_and_never_overlaps() -> None:
    with GuestMemory.create(1 << 20) as mem:
        a = mem.alloc(10)
        b = mem.alloc(4096, 4096)
        c = mem.alloc(1, 2)
        assert a >= FIRST_ADDR and a % 16 == 0
        assert b % 4096 == 0 and b >= a + 10
        assert c >= b + 4096
        with pytest.raises(ValueError):
            mem.alloc(8, 3)


def test_exhaustion_is_a_clear_error() -> None:
    with GuestMemory.create(64 << 10) as mem, pytest.raises(
            ConfigError, match="guest memory exhausted"):
        mem.alloc(1 << 20)


def test_too_small_and_out_of_range() -> None:
    with pytest.raises(ConfigError, match="too small"):
        GuestMemory.create(100)
    with GuestMemory.create(1 << 16) as mem:
        with pytest.raises(ValueError, match="outside guest memory"):
            mem.view(mem.size - 2, 4)
        assert not mem.contains(mem.size, 1)
        assert mem.contains(mem.size - 1, 1)


def test_a_forked_child_shares_memory_and_the_allocator() -> None:
    with GuestMemory.create(1 << 20) as mem:
        before = mem.alloc(16)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                addr = mem.alloc(16)
                mem.write(addr, b"from the child!!")
                mem.u64[before >> 3] = addr
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        addr = int(mem.u64[before >> 3])
        assert addr > before
        assert mem.read(addr, 16) == b"from the child!!"
        assert mem.alloc(16) > addr        # the child's bump is ours too


def test_an_exec_child_attaches_by_fd() -> None:
    with GuestMemory.create(1 << 20) as mem:
        addr = mem.alloc(8)
        code = textwrap.dedent(f"""
            from virtio.memory import GuestMemory
            m = GuestMemory.attach({mem.fd}, {mem.size})
            m.write({addr}, b"attached")
            m.close()
        """)
        subprocess.run([sys.executable, "-c", code], check=True,
                       pass_fds=[mem.fd], cwd=os.getcwd(), timeout=60)
        assert mem.read(addr, 8) == b"attached"


def test_regression_attach_refusal_keeps_the_callers_fd() -> None:
    # attach() used to close the fd it refused, under its owner's feet.
    fd = os.memfd_create("not-guest-ram")
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(ConfigError, match="not qiothread guest memory"):
            GuestMemory.attach(fd, 1 << 16)
        assert os.fstat(fd).st_size == 1 << 16
    finally:
        os.close(fd)


def test_close_is_idempotent_even_with_views_alive() -> None:
    mem = GuestMemory.create(1 << 16)
    v = mem.view(FIRST_ADDR, 4)
    mem.close()
    mem.close()
    assert mem.fd == -1
    del v


# -- MemoryBackend ----------------------------------------------------------


def drain(ctx: AioContext) -> None:
    while ctx.aio_poll(False):
        pass


def test_backend_completes_later_in_order_through_a_bh() -> None:
    ctx = AioContext()
    bs = MemoryBackend(1 << 16, record=True)
    try:
        bs.attach_aio_context(ctx)
        done: list[tuple[str, int]] = []
        buf = bytearray(b"abcd" * 128)
        bs.pwritev(512, [memoryview(buf)], lambda r: done.append(("w", r)))
        out = bytearray(512)
        bs.preadv(512, [memoryview(out)], lambda r: done.append(("r", r)))
        bs.flush(lambda r: done.append(("f", r)))
        assert done == [] and bs.in_flight == 3     # never synchronous
        drain(ctx)
        assert done == [("w", 0), ("r", 0), ("f", 0)]
        assert out == buf
        bs.pdiscard(512, 512, lambda r: None)
        bs.pwrite_zeroes(0, 512, True, lambda r: None)
        drain(ctx)
        assert bs.read_data(0, 1024) == bytes(1024)
        assert bs.ops == {"read": 1, "write": 1, "flush": 1, "discard": 1,
                          "write_zeroes": 1}
    finally:
        bs.close()
        ctx.close()


def test_backend_errors() -> None:
    ctx = AioContext()
    bs = MemoryBackend(1 << 16, read_only=True)
    try:
        bs.attach_aio_context(ctx)
        rets: list[int] = []
        buf = memoryview(bytearray(512))
        bs.pwritev(0, [buf], rets.append)
        bs.preadv(1 << 16, [buf], rets.append)      # past the end
        bs.inject_error("read", errno.ENOSPC, count=1)
        bs.preadv(0, [buf], rets.append)
        bs.preadv(0, [buf], rets.append)
        drain(ctx)
        assert rets == [-errno.EPERM, -errno.EIO, -errno.ENOSPC, 0]
        with pytest.raises(ValueError, match="unknown operation"):
            bs.inject_error("trim")
    finally:
        bs.close()
        ctx.close()


def test_backend_misuse_is_refused() -> None:
    bs = MemoryBackend(4096)
    try:
        with pytest.raises(InternalError, match="before attach"):
            bs.flush(lambda r: None)
        with pytest.raises(InternalError, match="unbalanced"):
            bs.io_unplug()
        ctx = AioContext()
        try:
            bs.attach_aio_context(ctx)
            bs.flush(lambda r: None)
            with pytest.raises(InternalError, match="in flight"):
                bs.detach_aio_context()
            drain(ctx)
            bs.detach_aio_context()
        finally:
            ctx.close()
        with pytest.raises(ValueError):
            MemoryBackend(1000)
    finally:
        bs.close()
