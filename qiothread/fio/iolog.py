"""fio iolog replay files, versions 2 and 3, as a timed list of I/Os.

The format (fio's HOWTO, "Trace file format"):

- the first line names the version: ``fio version 2 iolog`` or
  ``fio version 3 iolog``; version 1 has been unsupported since 2008;
- version 2 lines are ``filename action`` for file management (``add``,
  ``open``, ``close``) and ``filename action offset length`` for I/O
  (``read``, ``write``, ``trim``, ``sync``, ``datasync``) and for
  ``wait``, whose "offset" is a pause in microseconds relative to the
  previous wait (pauses below 100 µs are dropped, as fio does);
- version 3 lines carry a leading timestamp in microseconds from the
  start of the run, and ``wait`` is not allowed;
- a file must be added and opened before I/O names it.

A replay here drives one virtio-blk disk, so every I/O of the log must
name one file, unless ``redirect`` is set (fio's ``replay_redirect``),
which sends all of them to the disk.  Offsets and lengths must be whole
512-byte sectors, the unit of a virtio-blk request.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path

from qiothread.fio.options import FioOptionError

__all__ = ["IoLog", "ReplayAction", "ReplayIO", "load_iolog",
           "parse_iolog"]

_V2 = "fio version 2 iolog"
_V3 = "fio version 3 iolog"
#: fio drops ``wait`` entries shorter than this (µs).
_MIN_WAIT_US = 100
_SECTOR = 512


class ReplayAction(enum.Enum):
    """An I/O action of an iolog."""

    READ = "read"  #: read ``length`` bytes at ``offset``
    WRITE = "write"  #: write ``length`` bytes at ``offset``
    TRIM = "trim"  #: discard the range
    SYNC = "sync"  #: flush the disk (fsync)
    DATASYNC = "datasync"  #: flush the disk (fdatasync)


_FILE_ACTIONS = frozenset({"add", "open", "close"})


@dataclasses.dataclass(frozen=True)
class ReplayIO:
    """One I/O to replay, not to be issued before ``t_ns``."""

    t_ns: int  #: from the start of the replay
    action: ReplayAction
    offset: int  #: bytes
    length: int  #: bytes (0 for syncs)


@dataclasses.dataclass(frozen=True)
class IoLog:
    """A parsed iolog."""

    version: int  #: 2 or 3
    files: tuple[str, ...]  #: the files named, in order of ``add``
    ios: tuple[ReplayIO, ...]

    @property
    def max_end(self) -> int:
        """The highest byte offset any I/O reaches."""
        return max((io.offset + io.length for io in self.ios), default=0)


def _number(text: str, what: str, where: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise FioOptionError(f"{where}: bad {what} '{text}'") from None
    if value < 0:
        raise FioOptionError(f"{where}: negative {what} '{text}'")
    return value


def parse_iolog(text: str, source: str = "<iolog>",
                redirect: bool = False) -> IoLog:
    """Parse an iolog v2 or v3.

    :param redirect: send the I/O of every file to the one disk (fio's
        ``replay_redirect``); otherwise the log may name only one file.
    :raises FioOptionError: a bad header, an unknown action, a missing
        field, I/O on a file not added or not open, ``wait`` in
        version 3, misaligned I/O, or several files without redirect;
        the message starts with ``source:line:``.
    """
    lines = text.splitlines()
    if not lines:
        raise FioOptionError(f"{source}: empty iolog")
    header = lines[0].strip()
    if header == _V2:
        version = 2
    elif header == _V3:
        version = 3
    elif header.startswith("fio version ") and header.endswith(" iolog"):
        raise FioOptionError(
            f"{source}:1: fio: iolog version {header[12:-6]} is not "
            "supported (only 2 and 3)")
    else:
        raise FioOptionError(
            f"{source}:1: not an iolog: the first line must be "
            f"'{_V2}' or '{_V3}'")

    added: list[str] = []
    opened: set[str] = set()
    io_files: set[str] = set()
    ios: list[ReplayIO] = []
    clock_us = 0  # version 2: the sum of the waits so far

    for lineno, raw in enumerate(lines[1:], start=2):
        where = f"{source}:{lineno}"
        fields = raw.split()
        if not fields:
            continue
        if version == 3:
            if len(fields) < 3:
                raise FioOptionError(f"{where}: bad iolog3 line: {raw!r}")
            clock_us = _number(fields[0], "timestamp", where)
            fields = fields[1:]
        if len(fields) not in (2, 4):
            raise FioOptionError(
                f"{where}: bad iolog{version} line: {raw!r}")
        fname, act = fields[0], fields[1]
        if len(fields) == 2:
            if act not in _FILE_ACTIONS:
                raise FioOptionError(
                    f"{where}: fio: bad iolog file action: {act}")
            if act == "add":
                if fname not in added:
                    added.append(fname)
            elif fname not in added:
                raise FioOptionError(
                    f"{where}: file {fname} used before 'add'")
            elif act == "open":
                opened.add(fname)
            else:
                opened.discard(fname)
            continue
        offset = _number(fields[2], "offset", where)
        length = _number(fields[3], "length", where)
        if act == "wait":
            if version == 3:
                raise FioOptionError(
                    f"{where}: 'wait' is not allowed in iolog version 3 "
                    "(timestamps say when)")
            if offset >= _MIN_WAIT_US:
                clock_us += offset
            continue
        try:
            action = ReplayAction(act)
        except ValueError:
            raise FioOptionError(
                f"{where}: fio: bad iolog file action: {act}") from None
        if fname not in opened:
            raise FioOptionError(
                f"{where}: I/O on {fname}, which is not "
                f"{'open' if fname in added else 'added'}")
        if action in (ReplayAction.SYNC, ReplayAction.DATASYNC):
            offset = length = 0
        elif length == 0 or offset % _SECTOR or length % _SECTOR:
            raise FioOptionError(
                f"{where}: {act} at {offset} length {length} is not in "
                f"whole {_SECTOR}-byte sectors")
        io_files.add(fname)
        if len(io_files) > 1 and not redirect:
            raise FioOptionError(
                f"{where}: the log does I/O on several files "
                f"({', '.join(sorted(io_files))}); one disk replays "
                "one file unless replay_redirect is set")
        ios.append(ReplayIO(clock_us * 1000, action, offset, length))
    return IoLog(version=version, files=tuple(added), ios=tuple(ios))


def load_iolog(path: str | os.PathLike[str],
               redirect: bool = False) -> IoLog:
    """Read and parse the iolog at ``path`` (see :func:`parse_iolog`).

    :raises FioOptionError: the file cannot be read or is malformed.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise FioOptionError(
            f"fio: open iolog '{p}': {err.strerror}") from None
    return parse_iolog(text, source=str(p), redirect=redirect)
