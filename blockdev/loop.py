"""Loop devices with direct I/O that cannot outlive their user.

The kernel contract this relies on (loop(4), drivers/block/loop.c):

- ``ioctl(/dev/loop-control, LOOP_CTL_GET_FREE)`` returns the number of
  a free device (creating one if needed).  Another process can take it
  before we configure it; ``LOOP_CONFIGURE`` then fails with EBUSY and
  we ask again.
- ``LOOP_CONFIGURE`` (Linux 5.8+) binds a backing file descriptor and
  sets the logical block size and flags in one step.  The kernel keeps
  its own reference to the backing file; ours can be closed at once.
- ``LO_FLAGS_DIRECT_IO`` asks the loop driver to read and write the
  backing file with O_DIRECT, so that the page cache is not used twice.
  The kernel silently falls back to buffered I/O when it cannot honour
  it (a backing filesystem without O_DIRECT, or a logical block size
  below the filesystem's direct-I/O alignment).  So we never trust the
  request: ``/sys/block/loopN/loop/dio`` says what the kernel really
  does, and :attr:`LoopDevice.direct_io` is read from there, and
  :attr:`LoopDevice.fell_back` says when it differs from the request.
- ``LO_FLAGS_AUTOCLEAR`` detaches the device when its last opener
  closes it.  We keep one descriptor of the device open for the life of
  the :class:`LoopDevice`; when the process exits for any reason,
  ``kill -9`` included, the kernel closes that descriptor and the device
  goes away.  Forked children that inherit the descriptor keep the
  device alive until they exit too, which is what a run wants.
- ``/sys/block/loopN/queue/logical_block_size`` is the block size the
  device reports (BLKSSZGET gives the same).

Command line, for CI recipes (images/README.md)::

    python -m blockdev.loop attach IMAGE [--block-size 4096] [--buffered]
    python -m blockdev.loop info /dev/loopN
"""

from __future__ import annotations

import argparse
import enum
import errno
import fcntl
import os
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from qiothread.errors import BlockError

__all__ = ["LoopDevice", "LoopFlags", "attach", "loop_info"]

LOOP_CONTROL = "/dev/loop-control"
# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
_LO_NAME_SIZE = 64
#: struct loop_info64: 5 u64, 4 u32, file name, crypt name, key, 2 u64.
_INFO64 = struct.Struct(f"=5Q4I{_LO_NAME_SIZE}s{_LO_NAME_SIZE}s32s2Q")
#: struct loop_config: fd, block_size, loop_info64, 8 reserved u64.
_CONFIG = struct.Struct(f"=II{_INFO64.size}s8Q")
_MAX_TRIES = 16


class LoopFlags(enum.IntFlag):
    """``LO_FLAGS_*`` of <linux/loop.h>."""

    READ_ONLY = 1
    AUTOCLEAR = 4
    PARTSCAN = 8
    DIRECT_IO = 16


def _sysfs(dev: str) -> Path:
    return Path("/sys/block") / Path(dev).name


def loop_info(dev: str) -> dict[str, str]:
    """What sysfs says about a loop device (empty if not attached)."""
    base = _sysfs(dev)
    out = {}
    for key, rel in (("backing_file", "loop/backing_file"),
                     ("dio", "loop/dio"), ("autoclear", "loop/autoclear"),
                     ("logical_block_size", "queue/logical_block_size"),
                     ("size_sectors", "size")):
        try:
            out[key] = (base / rel).read_text().strip()
        except OSError:
            pass
    return out


@dataclass(eq=False)
class LoopDevice:
    """An attached loop device, held open; close() detaches it.

    Created by :func:`attach`; usable as a context manager.  The
    attributes are what the kernel reports after attaching.
    """

    path: str
    backing_file: str
    #: Whether the kernel really does direct I/O on the backing file.
    direct_io: bool
    #: Direct I/O was asked for but the kernel did not enable it.
    fell_back: bool
    logical_block_size: int
    read_only: bool
    #: Our descriptor of the device; the last close detaches it.
    fd: int

    def close(self) -> None:
        """Detach (idempotent): clear it and close our descriptor."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            # Explicit, so that the device is gone on return even if a
            # forked child still holds it (autoclear then finishes it).
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EBUSY):
                raise
        finally:
            os.close(fd)

    def describe(self) -> str:
        """One line for run reports, plain about any fall-back."""
        dio = "direct I/O" if self.direct_io else "buffered I/O"
        note = (" (direct I/O was requested; the kernel fell back to "
                "buffered)" if self.fell_back else "")
        return (f"{self.path} on {self.backing_file}: {dio}, logical "
                f"block size {self.logical_block_size}{note}")

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _config(backing_fd: int, name: str, block_size: int,
            flags: LoopFlags) -> bytes:
    info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, int(flags),
                        os.fsencode(name)[:_LO_NAME_SIZE - 1], b"", b"",
                        0, 0)
    return _CONFIG.pack(backing_fd, block_size, info, *([0] * 8))


def attach(backing: str | os.PathLike[str], *, direct_io: bool = True,
           block_size: int = 512, read_only: bool = False) -> LoopDevice:
    """Attach ``backing`` to a free loop device, with autoclear.

    :raises BlockError: no loop support, no free device, or the kernel
        refused the configuration (e.g. a block size it does not take).
    """
    name = os.path.realpath(backing)
    flags = LoopFlags.AUTOCLEAR
    if direct_io:
        flags |= LoopFlags.DIRECT_IO
    if read_only:
        flags |= LoopFlags.READ_ONLY
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BlockError(f"Could not open '{LOOP_CONTROL}': "
                         f"{exc.strerror}") from exc
    try:
        bfd = os.open(name, mode | os.O_CLOEXEC)
    except OSError as exc:
        os.close(ctl)
        raise BlockError(f"Could not open '{name}': "
                         f"{exc.strerror}") from exc
    try:
        dev, dfd = _configure(ctl, bfd, name, block_size, flags, mode)
    finally:
        os.close(bfd)
        os.close(ctl)
    try:
        return _describe(dev, dfd, name, direct_io, block_size, read_only)
    except BaseException:
        # Configured but not handed over (Ctrl-C, a sysfs surprise):
        # detach now rather than when the process exits.
        LoopDevice(dev, name, False, False, block_size, read_only,
                   dfd).close()
        raise


def _configure(ctl: int, bfd: int, name: str, block_size: int,
               flags: LoopFlags, mode: int) -> tuple[str, int]:
    """Bind ``bfd`` to a free device; (its path, our descriptor)."""
    for _ in range(_MAX_TRIES):
        try:
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            # Not O_CLOEXEC: children we fork or exec may hold it too.
            dfd = os.open(dev, mode)
        except OSError as exc:
            raise BlockError(f"Could not get a free loop device: "
                             f"{exc.strerror}") from exc
        try:
            fcntl.ioctl(dfd, LOOP_CONFIGURE,
                        _config(bfd, name, block_size, flags))
        except BaseException as exc:
            os.close(dfd)
            if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
                continue        # somebody took it first
            if isinstance(exc, OSError):
                raise BlockError(
                    f"Could not attach '{name}' to {dev}: "
                    f"{exc.strerror}") from exc
            raise
        return dev, dfd
    raise BlockError(f"no free loop device after {_MAX_TRIES} tries")


def _describe(dev: str, dfd: int, name: str, direct_io: bool,
              block_size: int, read_only: bool) -> LoopDevice:
    info = loop_info(dev)
    dio = info.get("dio") == "1"
    return LoopDevice(
        path=dev, backing_file=name, direct_io=dio,
        fell_back=direct_io and not dio,
        logical_block_size=int(info.get("logical_block_size", block_size)),
        read_only=read_only, fd=dfd)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blockdev.loop")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attach", help="attach and hold until killed")
    a.add_argument("image")
    a.add_argument("--block-size", type=int, default=512)
    a.add_argument("--buffered", action="store_true")
    a.add_argument("--read-only", action="store_true")
    i = sub.add_parser("info", help="what sysfs says about a device")
    i.add_argument("device")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        for k, v in loop_info(args.device).items():
            print(f"{k}: {v}")
        return 0
    dev = attach(args.image, direct_io=not args.buffered,
                 block_size=args.block_size, read_only=args.read_only)
    print(dev.path, flush=True)
    print(dev.describe(), file=sys.stderr, flush=True)
    # Hold the device until a signal; autoclear removes it on any exit.
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    finally:
        dev.close()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK,
                           {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    sys.exit(_main())
