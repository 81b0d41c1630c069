"""The per-request fast paths give exactly what the slow paths gave.

``LinuxAioState._prep`` packs each iocb with ``struct`` instead of
libaio's ``io_prep_preadv``/``io_prep_pwritev`` + ``io_set_eventfd``
helpers, and ``AioType.op`` answers from a cache instead of flag
arithmetic.  These tests hold both to the library's own answers.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from blockdev.linux_aio import LaioCB, LinuxAioState
from blockdev.raw_aio import AioType, RawAIOCB, buffer_address
from tests.blockdev.conftest import aligned_buffer

libaio = pytest.importorskip("libaio.libaio")


@pytest.fixture
def laio(ctx: Any) -> Iterator[LinuxAioState]:
    s = LinuxAioState(ctx)
    yield s
    s.close()


def _reference_iocb(kind: AioType, fd: int, iov: list[memoryview],
                    offset: int, key: int, efd: int
                    ) -> tuple[bytes, bytes]:
    """libaio's own iocb and iovec array for the same request."""
    vec = (libaio.iovec * len(iov))()
    for i, v in enumerate(iov):
        vec[i].iov_base = buffer_address(v)
        vec[i].iov_len = len(v)
    iocb = libaio.iocb()
    prep = (libaio.io_prep_preadv if kind == AioType.READ
            else libaio.io_prep_pwritev)
    prep(iocb, fd, vec, len(iov), offset)
    libaio.io_set_eventfd(iocb, efd)
    iocb.data = key
    return bytes(iocb), bytes(vec)


@pytest.mark.parametrize("kind", [AioType.READ, AioType.WRITE])
@pytest.mark.parametrize("nseg", [1, 3])
def test_packed_iocb_equals_libaio_prep(laio: LinuxAioState,
                                        kind: AioType, nseg: int) -> None:
    mem = aligned_buffer(4096 * 4)
    iov = [mem[4096 * i:4096 * i + 512 * (i + 1)] for i in range(nseg)]
    offset = 3 * 4096
    req = RawAIOCB(kind, 7, offset, sum(map(len, iov)), iov)
    laiocb = LaioCB(req, lambda ret: None, 12345)
    laio._prep(laiocb)
    want_iocb, want_vec = _reference_iocb(kind, 7, iov, offset, 12345,
                                          laio.e.fileno())
    size = ctypes.sizeof(libaio.iocb)
    got = bytes(laiocb.iocb)  # type: ignore[call-overload]
    vec_addr = int.from_bytes(got[24:32], "little")
    # The iovec array lives right after the iocb, in the same buffer.
    assert vec_addr == laiocb.iocb_ptr + size
    assert got[size:] == want_vec
    # Equal but for aio_buf, which points at each one's own array.
    assert got[:24] + got[32:size] == want_iocb[:24] + want_iocb[32:]
    assert laiocb.keep == iov
    laiocb.keep.clear()
    for v in iov:
        v.release()


def _op_by_flags(t: AioType) -> AioType:
    if t & AioType.WRITE_ZEROES:
        return AioType.WRITE_ZEROES
    return t & 0x00FF


def test_op_cache_equals_flag_rule() -> None:
    ops = [AioType.READ, AioType.WRITE, AioType.IOCTL, AioType.FLUSH,
           AioType.DISCARD, AioType.WRITE_ZEROES]
    flags = [AioType.MISALIGNED, AioType.BLKDEV, AioType.MAY_UNMAP]
    for op in ops:
        for n in range(len(flags) + 1):
            for extra in itertools.combinations(flags, n):
                t = op
                for f in extra:
                    t |= f
                # Twice: the first fills the cache, the second reads it.
                assert t.op == _op_by_flags(t)
                assert t.op == _op_by_flags(t)
                assert type(t.op) is AioType
