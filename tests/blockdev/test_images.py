"""Pattern images: written in full, verifiable, and the checker bites."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdev import host
from blockdev.images import (
    SECTOR,
    check_pattern,
    create_pattern_image,
    filesystem_type,
    first_mismatch,
    pattern_bytes,
    real_disk_dir,
)
from tests.blockdev.conftest import REPO


def test_image_is_not_sparse_and_checks(workdir: Path) -> None:
    info = create_pattern_image(workdir / "a.img", 3 << 20, seed=9)
    assert info.size == os.path.getsize(info.path) == 3 << 20
    assert info.allocated >= info.size
    assert check_pattern(info.path, seed=9) is None


def test_every_word_names_its_offset_and_seed() -> None:
    data = pattern_bytes(4096, 1024, seed=1)
    assert first_mismatch(data, 4096, seed=1) is None
    assert first_mismatch(data, 4096 + SECTOR, seed=1) == 4096 + SECTOR
    assert first_mismatch(data, 4096, seed=2) == 4096
    # Two sectors never look alike, nor two seeds.
    assert data[:SECTOR] != data[SECTOR:]
    assert pattern_bytes(0, 64, 1) != pattern_bytes(0, 64, 2)


def test_checker_finds_a_torn_sector(workdir: Path) -> None:
    info = create_pattern_image(workdir / "b.img", 1 << 20, seed=3)
    with open(info.path, "r+b") as f:
        f.seek(777 * SECTOR + 40)
        f.write(b"\0" * 8)
    assert check_pattern(info.path, seed=3) == 777 * SECTOR + 40
    # A hole (a range that reads as zeroes) is caught too.
    os.truncate(info.path, 1 << 19)
    os.truncate(info.path, 1 << 20)
    assert check_pattern(info.path, seed=3) == 777 * SECTOR + 40
    assert check_pattern(info.path, seed=3, offset=778 * SECTOR) == 1 << 19


def test_size_must_be_sectors(workdir: Path) -> None:
    with pytest.raises(ValueError):
        create_pattern_image(workdir / "c.img", 1000)


def test_real_disk_dir_refuses_tmpfs(workdir: Path) -> None:
    assert filesystem_type("/proc") == "proc"
    if os.path.isdir("/dev/shm") and filesystem_type("/dev/shm") == "tmpfs":
        with pytest.raises(FileNotFoundError):
            real_disk_dir("/dev/shm")
    assert real_disk_dir("/dev/shm", workdir) == workdir


def test_command_line(workdir: Path) -> None:
    img = workdir / "cli.img"
    run = [sys.executable, "-m", "blockdev.images"]
    out = subprocess.run([*run, "create", str(img), "2M", "--seed", "4"],
                         cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "2097152 bytes, seed 4" in out
    ok = subprocess.run([*run, "check", str(img), "--seed", "4"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0
    bad = subprocess.run([*run, "check", str(img), "--seed", "5"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "broken at offset 0" in bad.stdout


def test_regression_failed_creation_leaves_no_temp_file(
        workdir: Path) -> None:
    """A write that failed midway left ``NAME.partial`` behind.

    A child process with a 1 MiB file-size limit (RLIMIT_FSIZE, SIGXFSZ
    ignored) makes the kernel refuse the writes with EFBIG, as a full
    disk would with ENOSPC.
    """
    target = workdir / "big.img"
    code = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from blockdev.images import create_pattern_image
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            create_pattern_image({str(target)!r}, 16 << 20)
        except OSError as exc:
            sys.exit(0 if exc.errno == errno.EFBIG else 3)
        sys.exit(4)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(workdir.iterdir()) == []


def test_regression_concurrent_creators_of_one_image(workdir: Path) -> None:
    """Two writers shared one temp name: one renamed it away under the
    other (FileNotFoundError), or published a file still being
    rewritten.  Both must succeed and leave one good image."""
    target = workdir / "shared.img"
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def create() -> None:
        start.wait(60)
        try:
            create_pattern_image(target, 24 << 20, seed=4)
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert check_pattern(target, seed=4) is None
    assert os.path.getsize(target) == 24 << 20
    assert [p.name for p in workdir.iterdir()] == ["shared.img"]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), where=st.integers(0, (64 << 10) - 1),
       bit=st.integers(0, 7))
def test_checker_catches_one_flipped_bit_anywhere(seed: int, where: int,
                                                  bit: int) -> None:
    data = bytearray(pattern_bytes(1 << 20, 64 << 10, seed))
    data[where] ^= 1 << bit
    assert first_mismatch(data, 1 << 20, seed) == (1 << 20) + where // 8 * 8


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), first=st.integers(0, 255),
       count=st.integers(1, 16))
def test_checker_catches_a_punched_hole(workdir: Path, seed: int,
                                        first: int, count: int) -> None:
    info = create_pattern_image(workdir / "h.img", 256 * 4096, seed)
    fd = os.open(info.path, os.O_RDWR)
    try:
        n = min(count, 256 - first) * 4096
        assert host.fallocate(
            fd, host.FallocFlags.PUNCH_HOLE | host.FallocFlags.KEEP_SIZE,
            first * 4096, n) == 0
        # A real hole: the filesystem reports it and serves zeroes.
        assert os.lseek(fd, first * 4096, os.SEEK_HOLE) == first * 4096
    finally:
        os.close(fd)
    assert check_pattern(info.path, seed) == first * 4096
    assert check_pattern(info.path, seed, offset=first * 4096 + n) is None


def test_regression_killed_creator_leaves_no_orphan(workdir: Path) -> None:
    """A creator killed with SIGKILL leaves its temp file; the next one
    to create that image removes it (its writer is dead)."""
    target = workdir / "k.img"
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from blockdev.images import create_pattern_image;"
         "import blockdev.images as m; m.os.fsync = "
         "lambda fd: time.sleep(600);"
         f"create_pattern_image({str(target)!r}, 1 << 20)"],
        cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(workdir.glob(".k.img.*.partial")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(60)
    assert len(list(workdir.glob(".k.img.*.partial"))) == 1
    create_pattern_image(target, 1 << 20)
    assert [p.name for p in workdir.iterdir()] == ["k.img"]


def test_regression_seed_0_has_no_zero_word() -> None:
    """With seed 0 the key was 0, so the word at offset 0 was zero: a
    buffer whose first 8 bytes were zeroed passed the check, and a hole
    at offset 0 was reported at offset 8."""
    data = bytearray(pattern_bytes(0, 4096, seed=0))
    assert first_mismatch(data, 0, seed=0) is None
    data[:8] = bytes(8)
    assert first_mismatch(data, 0, seed=0) == 0
    assert first_mismatch(bytes(4096), 0, seed=0) == 0
    words = np.frombuffer(pattern_bytes(0, 1 << 20, seed=0), dtype="<u8")
    assert int(np.count_nonzero(words == 0)) == 0


def test_regression_odd_sized_file_is_checked_not_crashed(
        workdir: Path) -> None:
    """A file cut at a size that is not a multiple of 8 made the checker
    raise ValueError (numpy) instead of checking the tail."""
    info = create_pattern_image(workdir / "odd.img", 4096, seed=2)
    os.truncate(info.path, 4093)
    assert check_pattern(info.path, seed=2) is None
    with open(info.path, "r+b") as f:
        f.seek(4091)
        f.write(b"\xff")
    assert check_pattern(info.path, seed=2) == 4088
