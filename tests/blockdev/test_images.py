"""Pattern images: written in full, verifiable, and the checker bites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
