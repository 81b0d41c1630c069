"""Test images: raw files prefilled with a verifiable pattern, never sparse.

A read test on a sparse file measures nothing: the filesystem serves a
hole from memory without touching the disk.  So every image here is
written in full, and its content can be checked afterwards.

The pattern: each 512-byte sector is 64 little-endian u64 words; word
``k`` of the sector at byte offset ``off`` is::

    (off + 8 * k) ^ key,   key = (seed * 0x9E3779B97F4A7C15 mod 2**64)
                                  | 2**63

so every 8 bytes of the image name their own offset, under a seed.  The
key's top bit is always set, so no word of an image (below 2**63 bytes)
is zero, whatever the seed: zeroes from a hole or a zero-filled buffer
never pass for the pattern, not even in the first word of seed 0.  A
read that returns the wrong sector, a stale buffer, zeroes from a hole
or a torn write shows up as a mismatch at a known offset, and
:func:`check_pattern` reports the first one.  numpy makes generation and
checking run at memory speed (GiB/s), so images of a few GiB are cheap.

The same functions verify buffers in memory (:func:`pattern_bytes`,
:func:`first_mismatch`), which is how the I/O tests check data read
through each engine.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "SECTOR",
    "ImageInfo",
    "check_pattern",
    "create_pattern_image",
    "filesystem_type",
    "first_mismatch",
    "pattern_bytes",
    "real_disk_dir",
]

SECTOR = 512
_GOLDEN = 0x9E3779B97F4A7C15
_CHUNK = 8 << 20


def _key(seed: int) -> np.uint64:
    return np.uint64((seed * _GOLDEN) & 0xFFFFFFFFFFFFFFFF | 1 << 63)


def _words(offset: int, nbytes: int, seed: int) -> npt.NDArray[np.uint64]:
    if offset % 8 or nbytes % 8:
        raise ValueError("pattern ranges are 8-byte aligned")
    offs = np.arange(offset, offset + nbytes, 8, dtype=np.uint64)
    return offs ^ _key(seed)


def pattern_bytes(offset: int, nbytes: int, seed: int = 0) -> bytes:
    """The pattern's bytes for ``[offset, offset + nbytes)``."""
    return _words(offset, nbytes, seed).astype("<u8").tobytes()


def first_mismatch(data: bytes | bytearray | memoryview, offset: int,
                   seed: int = 0) -> int | None:
    """The image offset of the first 8 bytes that break the pattern.

    ``offset`` is a multiple of 8; a tail shorter than 8 bytes (a file
    cut at an odd size) is compared with the start of its word.
    """
    whole = len(data) - len(data) % 8
    got = np.frombuffer(data, dtype="<u8", count=whole // 8)
    bad = np.flatnonzero(got != _words(offset, whole, seed))
    if bad.size:
        return offset + int(bad[0]) * 8
    if whole < len(data):
        want = pattern_bytes(offset + whole, 8, seed)
        if bytes(data[whole:]) != want[:len(data) - whole]:
            return offset + whole
    return None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What :func:`create_pattern_image` made."""

    path: Path
    size: int
    seed: int
    #: Bytes the filesystem allocated (``st_blocks * 512``): == size
    #: when not sparse.
    allocated: int


def create_pattern_image(path: str | os.PathLike[str], size: int,
                         seed: int = 0) -> ImageInfo:
    """Write a raw image of ``size`` bytes filled with the pattern.

    Written in full and fsync'ed (never sparse) into a temporary file
    that is then renamed over ``path``, so nobody sees a half-written
    image and a failure leaves no file behind; ``size`` must be a
    multiple of 512.  An existing file is replaced.
    """
    if size <= 0 or size % SECTOR:
        raise ValueError(f"image size {size} is not a multiple of 512")
    p = Path(path)
    # Unique per writer: two runs creating the same cached image at
    # once must not write into, or rename away, each other's file.
    tmp = p.with_name(f".{p.name}.{os.getpid()}."
                      f"{secrets.token_hex(4)}.partial")
    _remove_orphans(p)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            pos = 0
            while pos < size:
                n = min(_CHUNK, size - pos)
                os.pwrite(fd, pattern_bytes(pos, n, seed), pos)
                pos += n
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        # A full disk, a file-size limit or Ctrl-C: leave nothing behind.
        tmp.unlink(missing_ok=True)
        raise
    st = os.stat(p)
    return ImageInfo(p, size, seed, st.st_blocks * 512)


def _remove_orphans(p: Path) -> None:
    """Remove temp files of writers that died (``kill -9``) on ``p``."""
    for tmp in p.parent.glob(f".{p.name}.*.partial"):
        pid = tmp.name[len(p.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass            # alive, somebody else's


def check_pattern(path: str | os.PathLike[str], seed: int = 0,
                  offset: int = 0, length: int | None = None) -> int | None:
    """Check an image (or a range of it); the first bad offset or None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if length is None else offset + length
        pos = offset
        while pos < end:
            n = min(_CHUNK, end - pos)
            data = os.pread(fd, n, pos)
            if len(data) != n:
                return pos + len(data)
            bad = first_mismatch(data, pos, seed)
            if bad is not None:
                return bad
            pos += n
    finally:
        os.close(fd)
    return None


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The filesystem type holding ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            mnt = pre.split()[4].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) \
                    and len(mnt) >= len(best):
                best, fstype = mnt, post.split()[0]
    return fstype


#: Filesystems where O_DIRECT is refused or meaningless for tests.
_NOT_A_DISK = {"tmpfs", "ramfs", "overlay", "proc", "sysfs", "devtmpfs"}


def real_disk_dir(*candidates: str | os.PathLike[str]) -> Path:
    """The first existing directory that lives on a real disk.

    Refuses tmpfs and friends (O_DIRECT fails there, and a "disk" test
    on memory proves nothing).  Raises FileNotFoundError if none fits.
    """
    for c in candidates:
        p = Path(c)
        if p.is_dir() and filesystem_type(p) not in _NOT_A_DISK:
            return p
    raise FileNotFoundError(
        "no directory on a real disk among "
        + ", ".join(str(c) for c in candidates))


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from blockdev.faults import parse_size
    ap = argparse.ArgumentParser(
        prog="python -m blockdev.images",
        description="Create or check a pattern-filled raw image.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="write an image (never sparse)")
    c.add_argument("path")
    c.add_argument("size", help="bytes, or with k/M/G suffix")
    c.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("check", help="verify the pattern")
    k.add_argument("path")
    k.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "create":
        info = create_pattern_image(args.path, parse_size(args.size),
                                    args.seed)
        print(f"{info.path}: {info.size} bytes, seed {info.seed}, "
              f"{info.allocated} bytes allocated")
        return 0
    bad = check_pattern(args.path, args.seed)
    if bad is None:
        print(f"{args.path}: pattern ok (seed {args.seed})")
        return 0
    print(f"{args.path}: pattern broken at offset {bad} "
          f"(sector {bad // SECTOR})")
    return 1


if __name__ == "__main__":
    raise SystemExit(_main())
