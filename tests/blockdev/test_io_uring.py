"""aio=io_uring internals: the ring, short reads, traces, queue rules."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev.images import create_pattern_image, first_mismatch
from blockdev.io_uring import MAX_ENTRIES, LuringState
from blockdev.raw_aio import AioType, RawAIOCB
from qiothread import trace
from tests.blockdev.conftest import Waiter, aligned_buffer, run_until


@pytest.fixture
def image(workdir: Path) -> Iterator[tuple[Path, int]]:
    path = create_pattern_image(workdir / "u.img", 1 << 20, seed=4).path
    fd = os.open(path, os.O_RDWR)
    yield path, fd
    os.close(fd)


@pytest.fixture
def luring(ctx: Any) -> Iterator[LuringState]:
    s = LuringState(ctx)
    yield s
    s.close()


@pytest.fixture
def trace_file(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "trace.log"
    old = trace.sink_fileno()
    trace.configure(["luring_*"], file=str(out))
    yield out
    trace.disable_all()
    trace.flush_to(old)


def _names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


def test_cq_ring_is_the_poll_source(image: tuple[Path, int],
                                    luring: LuringState, ctx: Any) -> None:
    dfd = os.open(image[0], os.O_RDONLY | os.O_DIRECT)
    view = aligned_buffer(4096)
    w = Waiter()
    assert not luring._poll_cb()
    # A request can finish inside the submission call (then it is
    # reaped at once); try until one is still in flight afterwards.
    for attempt in range(100):
        luring.submit(RawAIOCB(AioType.READ, dfd, 4096, 4096, [view]),
                      w.cb(attempt), 0)
        if luring.in_flight:
            break
        run_until(ctx, w.done(attempt + 1))
    else:
        pytest.skip("every read completed inside io_uring_enter")
    os.close(dfd)
    w.results.clear()
    # The ring fd becomes readable when a CQE is posted ...
    ready, _, _ = select.select([luring.ring_fd], [], [], 30)
    assert ready, "no completion within 30 s"
    # ... and io_poll sees it in the shared CQ ring, unconsumed.
    assert luring._poll_cb() and w.results == {}
    luring._poll_ready()
    assert w.results == {attempt: 0} and not luring._poll_cb()
    assert first_mismatch(view, 4096, seed=4) is None


def test_regression_short_read_resubmitted_inline_completes(
        image: tuple[Path, int], luring: LuringState, ctx: Any,
        trace_file: Path) -> None:
    """A short read reaped inside ioq_submit is resubmitted, not lost.

    From the page cache the first CQE arrives inside io_uring_enter, so
    the resubmission is queued while ioq_submit is still running; it
    used to stay queued for ever (the test hung).
    """
    _, fd = image
    # 8 KiB from 4 KiB before the end of a file cut to 1 MiB - 4 KiB:
    # the kernel returns 4 KiB (> 0: resubmit the rest), then 0 (EOF:
    # zero-fill, success).
    os.truncate(image[0], (1 << 20) - 4096)
    view = aligned_buffer(8192)
    view[:] = b"\xee" * 8192
    w = Waiter()
    off = (1 << 20) - 8192
    luring.submit(RawAIOCB(AioType.READ, fd, off, 8192, [view]), w.cb(0),
                  0)
    run_until(ctx, w.done(1))
    assert w.results == {0: 0}
    assert luring.short_read_resubmits == 1
    assert first_mismatch(view[:4096], off, seed=4) is None
    assert bytes(view[4096:]) == bytes(4096)
    lines = trace_file.read_text().splitlines()
    short = [ln for ln in lines
             if ln.startswith("luring_resubmit_short_read ")]
    assert len(short) == 1 and short[0].endswith("nread 4096")
    done = [ln for ln in lines
            if ln.startswith("luring_process_completion ")]
    assert [ln.split()[-1] for ln in done] == ["4096", "0"]


def test_trace_events_of_one_request(image: tuple[Path, int],
                                     luring: LuringState, ctx: Any,
                                     trace_file: Path) -> None:
    _, fd = image
    view = aligned_buffer(4096)
    w = Waiter()
    luring.submit(RawAIOCB(AioType.READ, fd, 0, 4096, [view]), w.cb(0), 0)
    run_until(ctx, w.done(1))
    names = _names(trace_file)
    assert names[:3] == ["luring_co_submit", "luring_do_submit",
                         "luring_io_uring_submit"]
    # The completion may be reaped inside ioq_submit (before
    # do_submit_done) or later from the ring fd; both are QEMU's order.
    assert sorted(names[3:]) == ["luring_do_submit_done",
                                 "luring_process_completion"]
    first = trace_file.read_text().splitlines()[0]
    assert f"fd {fd} offset 0 nbytes 4096 type 1" in first


def test_flush_is_an_fdatasync_on_the_ring(image: tuple[Path, int],
                                           luring: LuringState,
                                           ctx: Any) -> None:
    _, fd = image
    w = Waiter()
    luring.submit(RawAIOCB(AioType.FLUSH, fd, 0, 0), w.cb("f"), 0)
    run_until(ctx, w.done(1))
    assert w.results == {"f": 0}


def test_plugged_queue_submits_at_max_entries(image: tuple[Path, int],
                                              luring: LuringState,
                                              ctx: Any,
                                              trace_file: Path) -> None:
    _, fd = image
    n = MAX_ENTRIES + 20
    views = [aligned_buffer(4096) for _ in range(n)]
    w = Waiter()
    luring.io_plug()
    for i in range(MAX_ENTRIES - 1):
        luring.submit(RawAIOCB(AioType.READ, fd, i * 4096, 4096,
                               [views[i]]), w.cb(i), 0)
    # Plugged and below 128: nothing went to the kernel yet.
    assert "luring_io_uring_submit" not in _names(trace_file)
    assert luring.in_queue == MAX_ENTRIES - 1
    for i in range(MAX_ENTRIES - 1, n):
        luring.submit(RawAIOCB(AioType.READ, fd, i * 4096, 4096,
                               [views[i]]), w.cb(i), 0)
    # The 128th request filled the ring's worth: submitted while plugged.
    assert "luring_io_uring_submit" in _names(trace_file)
    luring.io_unplug(0)
    run_until(ctx, w.done(n))
    assert set(w.results.values()) == {0}
    for i in (0, MAX_ENTRIES, n - 1):
        assert first_mismatch(views[i], i * 4096, seed=4) is None


def test_ring_refused_falls_back_to_threads(
        image: tuple[Path, int], ctx: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from blockdev import io_uring
    from blockdev.options import open_blockdev

    def refuse(entries: int, ring: object, *a: object) -> int:
        # As io_uring_setup does with kernel.io_uring_disabled=2 (a
        # system-wide switch other suites on this host depend on).
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io_uring._uring, "io_uring_queue_init", refuse)
    node = open_blockdev({"driver": "file", "filename": str(image[0]),
                          "aio": "io_uring"})
    try:
        node.attach_aio_context(ctx)
        assert node.aio == "threads" and node.aio_requested == "io_uring"
        assert ("Unable to use linux io_uring, falling back to thread "
                "pool: "
                "failed to init linux io_uring ring: Operation not "
                "permitted" in caplog.text)
        view = aligned_buffer(4096)
        w = Waiter()
        node.preadv(0, [view], w.cb(0))
        run_until(ctx, w.done(1))
        assert w.results == {0: 0}
        assert first_mismatch(view, 0, seed=4) is None
    finally:
        node.close()


def test_regression_completions_beyond_the_cq_are_not_stranded(
        luring: LuringState, ctx: Any) -> None:
    """More completions than CQ entries (2 x 128) hung the engine.

    The kernel parks the extra ones on its overflow list; only an
    io_uring_enter(GETEVENTS) - which QEMU's io_uring_peek_cqe makes -
    moves them into the CQ.  Reads of an empty pipe stay in flight, so
    400 of them are in flight at once (past the 128-entry SQ too), and
    one write completes them all together.
    """
    r, w = os.pipe()
    try:
        n = 400
        bufs = [memoryview(bytearray(1)) for _ in range(n)]
        waiter = Waiter()
        for i in range(n):
            luring.submit(RawAIOCB(AioType.READ, r, 0, 1, [bufs[i]]),
                          waiter.cb(i), 0)
        assert luring.in_flight == n and luring.in_queue == 0
        assert os.write(w, b"\x01" * n) == n
        run_until(ctx, waiter.done(n), timeout_s=60)
        assert set(waiter.results.values()) == {0}
        assert all(bytes(b) == b"\x01" for b in bufs)
        assert luring.in_flight == 0
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EINTR])
def test_eagain_and_eintr_completions_are_resubmitted(
        image: tuple[Path, int], luring: LuringState, ctx: Any,
        trace_file: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A CQE with -EAGAIN or -EINTR goes back on the queue, as QEMU's
    io_uring.c does, until the request completes.

    The kernel gives neither on demand for a file (on this kernel it
    waits even on an O_NONBLOCK pipe), so the first two CQEs of a real
    read are reported as that error at the CQE-decoding seam; each
    resubmission is a real read again.
    """
    from blockdev import io_uring
    real = io_uring._res
    faked: list[int] = []

    def res(cqe: object) -> int:
        got = real(cqe)
        if len(faked) < 2:
            faked.append(got)
            return -err
        return got

    monkeypatch.setattr(io_uring, "_res", res)
    _, fd = image
    view = aligned_buffer(4096)
    waiter = Waiter()
    luring.submit(RawAIOCB(AioType.READ, fd, 8192, 4096, [view]),
                  waiter.cb(0), 0)
    run_until(ctx, waiter.done(1))
    assert waiter.results == {0: 0}
    assert faked == [4096, 4096]
    assert first_mismatch(view, 8192, seed=4) is None
    done = [ln.split()[-1] for ln in trace_file.read_text().splitlines()
            if ln.startswith("luring_process_completion ")]
    assert done == [str(-err), str(-err), "4096"]
    assert luring.in_flight == 0 and luring.in_queue == 0


def test_regression_fallback_names_linux_io_uring_and_sticks(
        image: tuple[Path, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The warning said "Unable to use io_uring" (QEMU: "Unable to use
    linux io_uring, falling back to thread pool: "), and the next attach
    tried the ring again; QEMU clears use_linux_io_uring for good."""
    from blockdev import io_uring
    from blockdev.options import open_blockdev
    from tests.blockdev.conftest import make_context

    calls: list[int] = []

    def refuse(entries: int, ring: object, *a: object) -> int:
        calls.append(entries)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io_uring._uring, "io_uring_queue_init", refuse)
    node = open_blockdev({"driver": "file", "filename": str(image[0]),
                          "aio": "io_uring"})
    ctx1, ctx2 = make_context(), make_context()
    try:
        node.attach_aio_context(ctx1)
        assert caplog.text.count(
            "Unable to use linux io_uring, falling back to thread pool: "
            "failed to init linux io_uring ring: Operation not "
            "permitted") == 1
        node.attach_aio_context(ctx2)
        assert node.aio == "threads" and calls == [MAX_ENTRIES]
    finally:
        node.close()
        ctx1.close()
        ctx2.close()
