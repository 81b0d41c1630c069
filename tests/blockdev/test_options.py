"""-blockdev options for file/host_device/raw, with QEMU's messages."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from blockdev import host
from blockdev.images import create_pattern_image
from blockdev.options import (
    CacheMode,
    RawFormatNode,
    open_blockdev,
    parse_aio,
    parse_cache_mode,
)
from qiothread import trace
from qiothread.errors import BlockError, ConfigError
from tests.blockdev.conftest import Waiter, aligned_buffer, run_until


@pytest.fixture
def image(workdir: Path) -> Path:
    return create_pattern_image(workdir / "o.img", 1 << 20).path


@pytest.mark.parametrize(("mode", "row"), [
    ("writeback", (False, True, False)),
    ("none", (True, True, False)),
    ("off", (True, True, False)),
    ("writethrough", (False, False, False)),
    ("directsync", (True, False, False)),
    ("unsafe", (False, True, True)),
])
def test_cache_mode_table(mode: str, row: tuple[bool, bool, bool]) -> None:
    assert parse_cache_mode(mode) == CacheMode(*row)


def test_cache_mode_invalid() -> None:
    with pytest.raises(ConfigError, match=r"^invalid cache option$"):
        parse_cache_mode("fast")


def test_aio_values() -> None:
    assert [parse_aio(v) for v in ("threads", "native", "io_uring")] == [
        "threads", "native", "io_uring"]
    with pytest.raises(ConfigError) as exc:
        parse_aio("bogus")
    assert str(exc.value) == "Parameter 'aio' does not accept value 'bogus'"


@pytest.mark.parametrize(("opts", "msg"), [
    ({"aio": "native"}, "aio=native was specified, but it requires "
     "cache.direct=on, which was not specified."),
    ({"aio": "native", "cache.direct": "off"}, "aio=native was specified, "
     "but it requires cache.direct=on, which was not specified."),
    ({"aio": "bogus"}, "Parameter 'aio' does not accept value 'bogus'"),
    ({"cache.direct": "maybe"}, "Parameter 'cache.direct' expects 'on' or "
     "'off'"),
    ({"aio-max-batch": "-1"}, "Parameter 'aio-max-batch' expects a "
     "non-negative integer"),
    ({"aio-max-batch": "x"}, "Parameter 'aio-max-batch' expects integer"),
    ({"colour": "red"}, "Parameter 'colour' is unexpected"),
    ({"discard": "always"}, "Parameter 'discard' does not accept value "
     "'always'"),
])
def test_file_option_errors(image: Path, opts: dict[str, Any],
                            msg: str) -> None:
    with pytest.raises(ConfigError) as exc:
        open_blockdev({"driver": "file", "filename": str(image), **opts})
    assert str(exc.value) == msg


def test_driver_and_filename_errors(image: Path, workdir: Path) -> None:
    cases = [
        ({}, "Parameter 'driver' is missing"),
        ({"driver": "qcow9"}, "Parameter 'driver' does not accept value "
         "'qcow9'"),
        ({"driver": "file"}, "Parameter 'filename' is missing"),
        ({"driver": "host_device", "filename": str(image)},
         f"'host_device' driver requires '{image}' to be either a "
         "character or block device"),
        ({"driver": "raw", "file": "nosuch"},
         "Cannot find device='' nor node-name='nosuch'"),
    ]
    for opts, msg in cases:
        with pytest.raises(ConfigError) as exc:
            open_blockdev(opts)
        assert str(exc.value) == msg
    missing = workdir / "missing.img"
    with pytest.raises(BlockError) as exc2:
        open_blockdev({"driver": "file", "filename": str(missing)})
    assert str(exc2.value) == (f"Could not open '{missing}': No such file "
                               "or directory")


def test_file_driver_refuses_a_block_device() -> None:
    dev = "/dev/loop-control" if os.path.exists("/dev/loop-control") \
        else "/dev/null"
    with pytest.raises(ConfigError) as exc:
        open_blockdev({"driver": "file", "filename": dev})
    assert str(exc.value) == (f"'file' driver requires '{dev}' to be a "
                              "regular file")


def test_defaults_and_node_fields(image: Path) -> None:
    node = open_blockdev({"driver": "file", "filename": str(image),
                          "node-name": "disk0"})
    try:
        assert node.node_name == "disk0"
        assert node.aio == "threads" and not node.read_only
        assert node.length == 1 << 20 and node.logical_block_size == 512
        assert node.request_alignment == 1      # buffered: no alignment
    finally:
        node.close()


def test_statx_dioalign_gives_the_file_alignment(image: Path) -> None:
    node = open_blockdev({"driver": "file", "filename": str(image),
                          "cache.direct": "on"})
    try:
        fd = os.open(image, os.O_RDONLY)
        try:
            dio = host.dio_alignment(fd)
        finally:
            os.close(fd)
        if dio is None:
            assert node.alignment_source == "probe"
        else:
            assert node.alignment_source == "statx"
            assert (node.request_alignment, node.mem_alignment) == dio
        assert node.request_alignment in (512, 1024, 2048, 4096)
    finally:
        node.close()


def test_raw_on_a_named_file_node(image: Path, ctx: Any) -> None:
    f = open_blockdev({"driver": "file", "filename": str(image),
                       "node-name": "f0", "cache.direct": "on",
                       "aio": "io_uring"})
    raw = open_blockdev({"driver": "raw", "node-name": "disk0",
                         "file": "f0", "read-only": "on"}, {"f0": f})
    assert isinstance(raw, RawFormatNode)
    assert (raw.length, raw.aio, raw.read_only) == (1 << 20, "io_uring",
                                                    True)
    raw.attach_aio_context(ctx)
    try:
        w = Waiter()
        view = aligned_buffer(4096)
        raw.preadv(0, [view], w.cb("r"))
        raw.pwritev(0, [view], w.cb("w"))
        run_until(ctx, w.done(2))
        assert w.results == {"r": 0, "w": -errno.EPERM}
    finally:
        raw.close()
        f.close()


def test_raw_with_nested_file_options(image: Path, ctx: Any) -> None:
    raw = open_blockdev({"driver": "raw", "node-name": "d",
                         "file": {"driver": "file", "filename": str(image),
                                  "aio": "native",
                                  "cache": {"direct": True}}})
    try:
        assert raw.aio == "native" and raw.request_alignment >= 512
        raw.attach_aio_context(ctx)
        w = Waiter()
        raw.flush(w.cb(0))
        run_until(ctx, w.done(1))
        assert w.results == {0: 0}
    finally:
        raw.close()


@pytest.mark.parametrize(("opts", "types"), [
    # write cache off (cache=writethrough): every write is followed by a
    # flush before it completes; the explicit flush is one more.
    ({"write-cache": "off"}, [2, 8, 8]),
    # cache.no-flush=on (cache=unsafe): flushes do nothing at all.
    ({"cache.no-flush": "on"}, [2]),
    ({}, [2, 8]),
])
def test_flush_modes(image: Path, ctx: Any, monkeypatch: pytest.MonkeyPatch,
                     opts: dict[str, str], types: list[int]) -> None:
    from blockdev import file_posix
    seen: list[int] = []
    real = file_posix.handle_aiocb

    def spy(req: Any) -> int:     # what the pool's workers run
        seen.append(int(req.type))
        return real(req)

    monkeypatch.setattr(file_posix, "handle_aiocb", spy)
    node = open_blockdev({"driver": "file", "filename": str(image),
                          **opts})
    node.attach_aio_context(ctx)
    try:
        w = Waiter()
        node.pwritev(0, [aligned_buffer(4096)], w.cb("w"))
        run_until(ctx, w.done(1))
        node.flush(w.cb("f"))
        run_until(ctx, w.done(2))
        assert w.results == {"f": 0, "w": 0}
    finally:
        node.close()
    assert seen == types


def test_regression_no_file_paio_submit_trace_on_linux(
        image: Path, ctx: Any, tmp_path: Path) -> None:
    """Pool submissions emitted file_paio_submit, which QEMU 7.2 emits
    only in file-win32.c; on Linux a pool request shows as
    thread_pool_submit alone."""
    out = tmp_path / "t.log"
    old = trace.sink_fileno()
    node = open_blockdev({"driver": "file", "filename": str(image)})
    node.attach_aio_context(ctx)
    trace.configure(["file_paio_submit", "thread_pool_submit"],
                    file=str(out))
    try:
        w = Waiter()
        node.pwritev(0, [aligned_buffer(4096)], w.cb("w"))
        node.pwrite_zeroes(8192, 4096, False, w.cb("z"))
        run_until(ctx, w.done(2))
    finally:
        trace.disable_all()
        trace.flush_to(old)
        node.close()
    names = [ln.split()[0] for ln in out.read_text().splitlines()]
    assert names == ["thread_pool_submit", "thread_pool_submit"]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_regression_odirect_refused_gives_qemus_message() -> None:
    """A filesystem without O_DIRECT said "Invalid argument".

    QEMU's qemu_open retries without O_DIRECT to tell this case apart.
    procfs refuses O_DIRECT at open (as tmpfs did before Linux 6.6) and
    its files are regular files, so it stands in for such a filesystem.
    """
    path = "/proc/self/status"
    with pytest.raises(OSError) as refused:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    assert refused.value.errno == errno.EINVAL
    before = _open_fds()
    with pytest.raises(BlockError) as exc:
        open_blockdev({"driver": "file", "filename": path,
                       "read-only": "on", "cache.direct": "on"})
    assert str(exc.value) == (f"Could not open '{path}': filesystem does "
                              "not support O_DIRECT")
    assert _open_fds() <= before


def test_regression_open_error_comes_before_the_aio_native_rule(
        workdir: Path, image: Path) -> None:
    """aio=native without cache.direct was refused before the open.

    raw_open_common opens first, then checks aio=native, then the file
    type: a missing file is reported as missing, and a directory opened
    read-only meets the aio=native rule before the regular-file rule.
    """
    missing = workdir / "missing.img"
    with pytest.raises(BlockError) as exc:
        open_blockdev({"driver": "file", "filename": str(missing),
                       "aio": "native"})
    assert str(exc.value) == (f"Could not open '{missing}': No such file "
                              "or directory")
    before = _open_fds()
    with pytest.raises(ConfigError) as exc2:
        open_blockdev({"driver": "file", "filename": str(workdir),
                       "aio": "native", "read-only": "on"})
    assert str(exc2.value) == ("aio=native was specified, but it requires "
                               "cache.direct=on, which was not specified.")
    with pytest.raises(ConfigError) as exc3:
        open_blockdev({"driver": "file", "filename": str(image),
                       "aio": "native"})
    assert str(exc3.value) == str(exc2.value)
    assert _open_fds() <= before


@pytest.mark.parametrize(("key", "value"), [
    ("locking", "bogus"), ("detect-zeroes", "always")])
def test_regression_enum_options_are_checked(image: Path, key: str,
                                             value: str) -> None:
    """locking= and detect-zeroes= took any value without a word."""
    with pytest.raises(ConfigError) as exc:
        open_blockdev({"driver": "file", "filename": str(image),
                       key: value})
    assert str(exc.value) == (f"Parameter '{key}' does not accept value "
                              f"'{value}'")
    for ok in ("off", "on"):
        open_blockdev({"driver": "file", "filename": str(image),
                       key: ok}).close()


def test_regression_probe_that_takes_one_byte_means_max_alignment(
        ) -> None:
    """The probe started at 512, so tmpfs (which takes any O_DIRECT
    read since Linux 6.6 and reports no STATX_DIOALIGN) got 512; QEMU
    7.2's raw_probe_alignment tries 1 byte first and, when that works,
    falls back to the safe 4096."""
    path = f"/dev/shm/qiothread-probe-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(bytes(8192))
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            pytest.skip("this tmpfs refuses O_DIRECT")
        try:
            buf = aligned_buffer(4096)
            if host.dio_alignment(fd) is not None:
                pytest.skip("this tmpfs reports STATX_DIOALIGN")
            assert os.preadv(fd, [buf[:1]], 0) == 1
            assert host.probe_dio_alignment(fd) == 4096
        finally:
            os.close(fd)
        node = open_blockdev({"driver": "file", "filename": path,
                              "cache.direct": "on"})
        try:
            assert node.alignment_source == "probe"
            assert (node.request_alignment, node.mem_alignment) == \
                (4096, 4096)
        finally:
            node.close()
    finally:
        os.unlink(path)
