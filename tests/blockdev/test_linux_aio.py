"""aio=native internals: batching, error rules, syscall-free polling."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import select
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev import linux_aio
from blockdev.images import create_pattern_image, first_mismatch
from blockdev.linux_aio import (
    DEFAULT_MAX_BATCH,
    MAX_EVENTS,
    LinuxAioState,
    laio_max_batch,
)
from blockdev.raw_aio import AioType, RawAIOCB
from tests.blockdev.conftest import REPO, Waiter, aligned_buffer, run_until


@pytest.mark.parametrize(("ctx_b", "dev_b", "in_flight", "want"), [
    (0, 0, 0, DEFAULT_MAX_BATCH),       # nobody says: 32
    (0, 8, 0, 8),                       # the device lowers it
    (0, 100, 0, DEFAULT_MAX_BATCH),     # ... but cannot raise it
    (64, 0, 0, 64),                     # the iothread raises it
    (64, 16, 0, 16),                    # the smaller non-zero wins
    (16, 64, 0, 16),
    (0, 0, 1000, 24),                   # 1024 - in_flight caps it
    (0, 0, MAX_EVENTS, DEFAULT_MAX_BATCH),  # 0 is "no limit" (min_nonzero)
    (2000, 0, 1, 1023),
])
def test_max_batch_rule(ctx_b: int, dev_b: int, in_flight: int,
                        want: int) -> None:
    assert laio_max_batch(ctx_b, dev_b, in_flight) == want


@pytest.fixture
def image(workdir: Path) -> Iterator[tuple[Path, int]]:
    path = create_pattern_image(workdir / "n.img", 1 << 20, seed=3).path
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    yield path, fd
    os.close(fd)


@pytest.fixture
def laio(ctx: Any) -> Iterator[LinuxAioState]:
    s = LinuxAioState(ctx)
    yield s
    s.close()


def _read(fd: int, off: int, view: memoryview) -> RawAIOCB:
    return RawAIOCB(AioType.READ, fd, off, len(view), [view], 512)


def test_poll_reads_the_ring_without_a_syscall(
        image: tuple[Path, int], laio: LinuxAioState, ctx: Any) -> None:
    _, fd = image
    view = aligned_buffer(4096)
    w = Waiter()
    assert not laio._poll_cb()
    # A request can finish before io_submit returns (then it is reaped
    # at once); try until one is still in flight afterwards.
    for attempt in range(100):
        # An earlier attempt reaped inside io_submit may have left the
        # eventfd set: clear it, or select below returns before the
        # kernel has published this request's event.
        laio.e.test_and_clear()
        laio.submit(_read(fd, 8192, view), w.cb(attempt), 0)
        if laio.in_flight:
            break
        run_until(ctx, w.done(attempt + 1))
    else:
        pytest.skip("every read completed inside io_submit")
    w.results.clear()
    # Sleep on the eventfd without reading it, as ppoll would.
    ready, _, _ = select.select([laio.e.fileno()], [], [], 30)
    assert ready, "no completion within 30 s"
    # The kernel published the event in the shared ring: io_poll sees
    # it by reading memory, and nothing has consumed it yet.
    assert laio._poll_cb()
    assert (laio.ring.tail - laio.ring.head) % laio.ring.nr == 1
    assert w.results == {}
    laio._poll_ready()
    assert w.results == {attempt: 0}
    assert laio.ring.head == laio.ring.tail
    assert not laio._poll_cb()
    assert first_mismatch(view, 8192, seed=3) is None


def test_error_fails_only_the_head_request(
        image: tuple[Path, int], laio: LinuxAioState, ctx: Any) -> None:
    _, fd = image
    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)               # a descriptor number that is now invalid
    views = [aligned_buffer(4096) for _ in range(3)]
    w = Waiter()
    laio.io_plug()
    laio.submit(_read(bad, 0, views[0]), w.cb("bad-head"), 0)
    laio.submit(_read(fd, 4096, views[1]), w.cb("a"), 0)
    laio.submit(_read(fd, 8192, views[2]), w.cb("b"), 0)
    laio.io_unplug(0)
    run_until(ctx, w.done(3))
    assert w.results == {"bad-head": -errno.EBADF, "a": 0, "b": 0}
    assert first_mismatch(views[1], 4096, seed=3) is None


def test_error_in_the_middle_blocks_then_fails_alone(
        image: tuple[Path, int], laio: LinuxAioState, ctx: Any) -> None:
    _, fd = image
    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)
    views = [aligned_buffer(4096) for _ in range(3)]
    w = Waiter()
    laio.io_plug()
    laio.submit(_read(fd, 0, views[0]), w.cb("a"), 0)
    laio.submit(_read(bad, 0, views[1]), w.cb("bad"), 0)
    laio.submit(_read(fd, 8192, views[2]), w.cb("b"), 0)
    laio.io_unplug(0)
    # io_submit took only the first iocb: the rest wait, "blocked",
    # for the next completion, where the bad one is the head and fails.
    run_until(ctx, w.done(3))
    assert w.results == {"a": 0, "bad": -errno.EBADF, "b": 0}
    assert w.order.index("a") < w.order.index("bad")


def test_eagain_leaves_the_queue_blocked_until_a_completion(
        image: tuple[Path, int], laio: LinuxAioState, ctx: Any) -> None:
    _, fd = image
    # The kernel gives EAGAIN only when it runs out of requests, which
    # cannot be arranged on demand: fake it once at the syscall seam.
    real = laio.io_submit
    calls: list[int] = []

    def io_submit(n: int, array: object) -> int:
        calls.append(n)
        if len(calls) == 2:
            return -errno.EAGAIN
        return real(n, array)

    laio.io_submit = io_submit
    views = [aligned_buffer(4096) for _ in range(3)]
    w = Waiter()
    laio.submit(_read(fd, 0, views[0]), w.cb(0), 0)     # goes in
    laio.submit(_read(fd, 4096, views[1]), w.cb(1), 0)  # EAGAIN
    assert laio.blocked and laio.in_queue == 1
    laio.submit(_read(fd, 8192, views[2]), w.cb(2), 0)  # waits: blocked
    assert calls == [1, 1] and laio.in_queue == 2
    run_until(ctx, w.done(3))
    assert w.results == {0: 0, 1: 0, 2: 0}
    # The queue was released by the completion of request 0, in one go.
    assert calls[2] == 2 and not laio.blocked


def test_plugged_submission_batches(
        image: tuple[Path, int], laio: LinuxAioState, ctx: Any) -> None:
    _, fd = image
    calls: list[int] = []
    real = laio.io_submit

    def io_submit(n: int, array: object) -> int:
        calls.append(n)
        return real(n, array)

    laio.io_submit = io_submit
    ctx.set_aio_params(0)
    views = [aligned_buffer(4096) for _ in range(70)]
    w = Waiter()
    laio.io_plug()
    for i in range(70):
        laio.submit(_read(fd, i * 4096, views[i]), w.cb(i), 8)
    # With aio-max-batch=8 on the device, every 8th request flushes.
    assert calls[:8] == [8] * 8
    laio.io_unplug(8)
    run_until(ctx, w.done(70))
    assert sum(calls) == 70 and set(w.results.values()) == {0}


@pytest.mark.skipif(shutil.which("strace") is None, reason="no strace")
def test_no_io_getevents_syscalls_under_strace(image: tuple[Path, int],
                                              workdir: Path) -> None:
    path, _ = image
    script = textwrap.dedent(f"""
        from blockdev.options import open_blockdev
        from tests.blockdev.conftest import make_context, run_until
        import mmap
        ctx = make_context(poll_ns=50_000_000)
        node = open_blockdev({{"driver": "file", "filename": {str(path)!r},
                              "aio": "native", "cache.direct": "on"}})
        node.attach_aio_context(ctx)
        buf = memoryview(mmap.mmap(-1, 4096))
        done = []
        for i in range(200):
            node.preadv((i % 256) * 4096, [buf], done.append)
            run_until(ctx, lambda: len(done) == i + 1)
        assert set(done) == {{0}}
        print("polled", node._engine.polled_completions)
        node.close()
    """)
    out = subprocess.run(
        ["strace", "-f", "-qq", "-c", "-e",
         "trace=io_getevents,io_pgetevents,io_submit", "-o",
         str(workdir / "strace.txt"), sys.executable, "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    summary = (workdir / "strace.txt").read_text()
    counts = {line.split()[-1]: int(line.split()[3])
              for line in summary.splitlines()
              if line.strip() and line.split()[-1].startswith("io_")
              and line.split()[3].isdigit()}
    # 200 requests were submitted and completed; not one io_getevents.
    assert counts.get("io_submit", 0) >= 200
    assert "io_getevents" not in counts and "io_pgetevents" not in counts
    polled = int(out.stdout.split()[-1])
    assert polled > 0, "no completion was found by polling"


def test_libaio_missing_falls_back_to_threads(
        image: tuple[Path, int], ctx: Any,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from blockdev.options import open_blockdev
    path, _ = image
    # As on a host without libaio.so.1: the import found no library.
    monkeypatch.setattr(linux_aio, "_aio", None)
    monkeypatch.setattr(linux_aio, "_AIO_IMPORT_ERROR",
                        "libaio.so.1: cannot open shared object file")
    node = open_blockdev({"driver": "file", "filename": str(path),
                          "aio": "native", "cache.direct": "on"})
    try:
        node.attach_aio_context(ctx)
        assert node.aio == "threads"
        assert ("Unable to use native AIO, falling back to thread pool: "
                "failed to create linux AIO context: libaio.so.1"
                in caplog.text)
        view = aligned_buffer(4096)
        w = Waiter()
        node.preadv(0, [view], w.cb(0))
        run_until(ctx, w.done(1))
        assert w.results == {0: 0}
    finally:
        node.close()


def test_in_flight_cap_and_ring_wrap(image: tuple[Path, int],
                                     laio: LinuxAioState, ctx: Any) -> None:
    """3000 reads plugged: never more than 1024 in flight (the rest
    wait, queued, for completions), and the completion ring wraps (it
    has about 2 x 1024 slots) without losing or repeating an event."""
    _, fd = image
    n = 3000
    peak = 0
    real = laio.io_submit

    def io_submit(count: int, array: object) -> int:
        nonlocal peak
        peak = max(peak, laio.in_flight + count)
        return real(count, array)

    laio.io_submit = io_submit
    heads: list[int] = []
    real_peek = laio._advance_and_peek

    def advance_and_peek(consumed: int) -> int:
        got = real_peek(consumed)
        heads.append(laio.ring.head)
        return got

    laio._advance_and_peek = advance_and_peek  # type: ignore[method-assign]
    mem = mmap.mmap(-1, n * 4096)
    views = [memoryview(mem)[i * 4096:(i + 1) * 4096] for i in range(n)]
    w = Waiter()
    # An iothread batch above the cap: the batch is then 1024 -
    # in_flight, so the plugged queue goes in 1024 at a time.
    ctx.set_aio_params(4096)
    laio.io_plug()
    for i in range(n):
        laio.submit(_read(fd, (i % 256) * 4096, views[i]), w.cb(i), 0)
    laio.io_unplug(0)
    assert laio.in_flight <= MAX_EVENTS
    run_until(ctx, w.done(n))
    assert set(w.results.values()) == {0} and len(w.results) == n
    assert peak == MAX_EVENTS
    assert laio.ring.nr < n
    assert any(b < a for a, b in itertools.pairwise(heads)), \
        "ring never wrapped"
    for i in (0, 1023, 1024, 2047, 2048, n - 1):
        assert first_mismatch(views[i], (i % 256) * 4096, seed=3) is None
    for v in views:
        v.release()
    mem.close()
