"""fio's workload vocabulary: option names, value syntax and checks.

The guest side of qiothread speaks fio, so that a job that runs under
fio inside a VM can be pasted here unchanged.  This module knows the
subset of fio's options that describe a block workload, with fio's
names and aliases (fio 3.33, ``options.c``), the value grammar of
:mod:`qiothread.fio.values`, and fio's range checks:

- per-direction values (``bs``, ``rate_iops``) take fio's comma form
  ``read,write,trim``; an empty field keeps the default, and the last
  given value fills the missing ones as fio does;
- ``runtime`` and ``ramp_time`` are seconds unless suffixed,
  ``thinktime`` microseconds;
- ``percentile_list`` is sorted, as fio sorts it before use;
- unknown options are refused (fio: ``Bad option <x>`` in a job file,
  ``unrecognized option`` on the command line).

Messages keep fio's wording where fio has a message (``iodepth: min
value out of range: 0 (1 min)``, ``fio: failed parsing rw=foo``) and add
the reason after a colon.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qiothread.fio.values import (
    DEFAULT_PERCENTILE_PRECISION,
    DEFAULT_PERCENTILES,
    FioOptionError,
    SizeSpec,
    check_range,
    parse_bool,
    parse_int,
    parse_per_ddir,
    parse_percentiles,
    parse_size,
    parse_time_ns,
    value_error,
)

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_PERCENTILE_PRECISION",
    "Ddir",
    "FioOptionError",
    "JobOptions",
    "ReadWrite",
    "SizeSpec",
    "VerifyKind",
    "parse_fio_args",
    "parse_size",
    "parse_time_ns",
]


class Ddir(enum.IntEnum):
    """fio's data directions, numbered as in its logs and JSON."""

    READ = 0  #: ``DDIR_READ``
    WRITE = 1  #: ``DDIR_WRITE``
    TRIM = 2  #: ``DDIR_TRIM``
    SYNC = 3  #: ``DDIR_SYNC``: a flush (iolog ``sync``/``datasync``)


class ReadWrite(enum.Enum):
    """fio's ``rw=`` (alias ``readwrite=``) patterns."""

    READ = "read"  #: sequential reads
    WRITE = "write"  #: sequential writes
    TRIM = "trim"  #: sequential trims
    RANDREAD = "randread"  #: random reads
    RANDWRITE = "randwrite"  #: random writes
    RANDTRIM = "randtrim"  #: random trims
    RW = "rw"  #: sequential mix of reads and writes
    RANDRW = "randrw"  #: random mix of reads and writes

    @property
    def is_random(self) -> bool:
        """Whether offsets are drawn at random (fio's ``td_random``)."""
        return self.value.startswith("rand")

    @property
    def directions(self) -> tuple[Ddir, ...]:
        """The data directions this pattern issues."""
        if self in (ReadWrite.RW, ReadWrite.RANDRW):
            return (Ddir.READ, Ddir.WRITE)
        if self in (ReadWrite.WRITE, ReadWrite.RANDWRITE):
            return (Ddir.WRITE,)
        if self in (ReadWrite.TRIM, ReadWrite.RANDTRIM):
            return (Ddir.TRIM,)
        return (Ddir.READ,)


#: fio's help text for each ``rw`` value, shown when a value is refused.
_RW_HELP = {
    "read": "Sequential read",
    "write": "Sequential write",
    "trim": "Sequential trim",
    "randread": "Random read",
    "randwrite": "Random write",
    "randtrim": "Random trim",
    "rw": "Sequential read and write mix",
    "readwrite": "Sequential read and write mix",
    "randrw": "Random read and write mix",
}


class VerifyKind(enum.Enum):
    """The ``verify=`` methods qiothread implements."""

    NONE = "0"  #: no verification (fio's ``verify=0``/``null``)
    MD5 = "md5"  #: MD5 of the block body, kept in the header
    CRC32C = "crc32c"  #: CRC32C (Castagnoli) of the body
    CRC32 = "crc32"  #: CRC32 (zlib's polynomial) of the body
    PATTERN = "pattern"  #: the body must equal the expected pattern


_VERIFY_NAMES = {
    "0": VerifyKind.NONE,
    "null": VerifyKind.NONE,
    "md5": VerifyKind.MD5,
    "crc32c": VerifyKind.CRC32C,
    "crc32c-intel": VerifyKind.CRC32C,
    "crc32": VerifyKind.CRC32,
    "pattern": VerifyKind.PATTERN,
}


#: The default ``offset``: the start of the disk.
_ZERO = SizeSpec(value=0)


# -- the job ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """One fio job's workload, parsed.  Defaults are fio's.

    ``given`` keeps every option as the user wrote it, in order, for
    fio's ``"job options"`` JSON object.
    """

    name: str = "job"
    rw: ReadWrite = ReadWrite.READ
    #: block size per direction (read, write, trim), bytes
    bs: tuple[int, int, int] = (4096, 4096, 4096)
    iodepth: int = 1
    numjobs: int = 1
    runtime_ns: int = 0  #: 0 = no limit
    time_based: bool = False
    size: SizeSpec | None = None  #: None = the whole target
    offset: SizeSpec = _ZERO
    #: IOPS cap per direction, 0 = none
    rate_iops: tuple[int, int, int] = (0, 0, 0)
    thinktime_ns: int = 0
    thinktime_blocks: int = 1
    ramp_time_ns: int = 0
    verify: VerifyKind = VerifyKind.NONE
    verify_pattern: bytes | None = None
    do_verify: bool = True
    rwmixread: int = 50
    percentile_list: tuple[float, ...] = DEFAULT_PERCENTILES
    percentile_precision: int = DEFAULT_PERCENTILE_PRECISION
    direct: bool = False
    ioengine: str = "psync"
    filename: str | None = None  #: recorded; the guest's disk is used
    randseed: int = 0x89  #: qiothread's fixed default seed
    read_iolog: str | None = None
    replay_redirect: str | None = None
    write_lat_log: str | None = None
    group_reporting: bool = False
    given: tuple[tuple[str, str], ...] = ()

    def block_size(self, ddir: Ddir) -> int:
        """The block size for ``ddir``."""
        return self.bs[ddir]

    def with_options(self, pairs: Iterable[tuple[str, str | None]],
                     check: bool = True) -> JobOptions:
        """A copy with fio options ``(name, value)`` applied in order.

        ``value`` is None for a bare flag such as ``time_based``.  With
        ``check=False`` the cross-option checks (:meth:`check`) wait.

        :raises FioOptionError: an unknown option or a bad value.
        """
        changes: dict[str, Any] = {}
        given = list(self.given)
        for raw_name, value in pairs:
            name = raw_name.strip().lower()
            name = _ALIASES.get(name, name)
            handler = _HANDLERS.get(name)
            if handler is None:
                shown = raw_name if value is None else f"{raw_name}={value}"
                raise FioOptionError(f"Bad option <{shown}>"
                                     + _did_you_mean(name))
            if value is None and name not in _FLAGS:
                raise FioOptionError(
                    f"Option {name} requires an argument")
            handler(self._merged(changes), name, value, changes)
            # fio lists bare flags without a value in "job options"
            # only when they carry one (fio 3.33 leaves them out).
            if value is not None:
                given = [(k, v) for k, v in given if k != name]
                given.append((name, value))
        changes["given"] = tuple(given)
        job = dataclasses.replace(self, **changes)
        if check:
            job.check()
        return job

    def _merged(self, changes: Mapping[str, Any]) -> JobOptions:
        return dataclasses.replace(self, **changes) if changes else self

    def check(self) -> None:
        """Cross-option checks fio makes once a job is complete.

        :raises FioOptionError: the combination cannot run.
        """
        for ddir in self.rw.directions:
            if self.bs[ddir] % 512:
                raise FioOptionError(
                    f"{self.name}: bs={self.bs[ddir]} is not a multiple "
                    "of the 512-byte virtio-blk sector")
        if self.verify is not VerifyKind.NONE and \
                self.rw in (ReadWrite.TRIM, ReadWrite.RANDTRIM):
            raise FioOptionError(
                f"{self.name}: verify makes no sense with rw=trim")
        if self.verify is VerifyKind.PATTERN and \
                self.verify_pattern is not None and \
                self.verify_pattern == b"":
            raise FioOptionError("fio: empty verify_pattern")

    def expand_numjobs(self) -> list[JobOptions]:
        """fio's clones for ``numjobs``: same options, distinct seeds."""
        return [dataclasses.replace(self, numjobs=1,
                                    randseed=self.randseed + i)
                for i in range(self.numjobs)]

    @property
    def verify_enabled(self) -> bool:
        """Whether blocks carry and check verify data."""
        return self.verify is not VerifyKind.NONE


# -- per-option handlers ----------------------------------------------

_Changes = dict[str, Any]
_Handler = Callable[[JobOptions, str, str | None, _Changes], None]


def _h_name(job: JobOptions, name: str, v: str | None,
            c: _Changes) -> None:
    assert v is not None
    if not v.strip():
        raise value_error(name, v, "empty name")
    c["name"] = v.strip()


def _h_rw(job: JobOptions, name: str, v: str | None, c: _Changes) -> None:
    assert v is not None
    text = v.strip()
    if ":" in text:
        raise value_error("rw", v, "sequence modifiers (rw=...:N) are not "
                    "supported by qiothread")
    if text == "readwrite":
        text = "rw"
    if text not in _RW_HELP:
        values = "\n".join(f"    {k:<10} {h}" for k, h in _RW_HELP.items())
        raise FioOptionError(
            f"fio: failed parsing rw={v}\n  valid values:\n{values}")
    c["rw"] = ReadWrite(text)


def _h_bs(job: JobOptions, name: str, v: str | None, c: _Changes) -> None:
    assert v is not None

    def one(field: str) -> int:
        size = parse_size("bs", field).value
        check_range("bs", size, 1, None)
        return size
    c["bs"] = parse_per_ddir("bs", v, one, job.bs)


def _int_field(field: str, minval: int | None = None,
               maxval: int | None = None) -> _Handler:
    def handler(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
        assert v is not None
        c[field] = parse_int(name, v, minval, maxval)
    return handler


def _bool_field(field: str) -> _Handler:
    def handler(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
        c[field] = parse_bool(name, v)
    return handler


def _str_field(field: str) -> _Handler:
    def handler(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
        assert v is not None
        c[field] = v.strip()
    return handler


def _time_field(field: str, unit_ns: int) -> _Handler:
    def handler(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
        assert v is not None
        c[field] = parse_time_ns(name, v, unit_ns)
    return handler


def _h_size(job: JobOptions, name: str, v: str | None,
            c: _Changes) -> None:
    assert v is not None
    spec = parse_size(name, v, allow_percent=True)
    if spec.percent is None and spec.value == 0:
        raise value_error(name, v, "size must be greater than zero")
    c["size"] = spec


def _h_offset(job: JobOptions, name: str, v: str | None,
              c: _Changes) -> None:
    assert v is not None
    c["offset"] = parse_size(name, v, allow_percent=True)


def _h_rate_iops(job: JobOptions, name: str, v: str | None,
                 c: _Changes) -> None:
    assert v is not None
    c["rate_iops"] = parse_per_ddir(
        name, v, lambda f: parse_int(name, f, 0, None), job.rate_iops)


def _h_verify(job: JobOptions, name: str, v: str | None,
              c: _Changes) -> None:
    assert v is not None
    kind = _VERIFY_NAMES.get(v.strip().lower())
    if kind is None:
        values = ", ".join(sorted(_VERIFY_NAMES))
        raise FioOptionError(
            f"fio: failed parsing verify={v}: qiothread implements "
            f"{values}")
    c["verify"] = kind


def _h_verify_pattern(job: JobOptions, name: str, v: str | None,
                      c: _Changes) -> None:
    assert v is not None
    text = v.strip()
    if text.lower().startswith("0x"):
        digits = text[2:]
        if not digits or len(digits) % 2 or \
                not re.fullmatch(r"[0-9a-fA-F]+", digits):
            raise value_error(name, v, "hex pattern needs an even number of "
                        "hex digits")
        c["verify_pattern"] = bytes.fromhex(digits)
    elif len(text) >= 2 and text[0] == text[-1] == '"':
        c["verify_pattern"] = text[1:-1].encode()
    else:
        number = parse_int(name, text, 0, 0xFFFFFFFF)
        c["verify_pattern"] = number.to_bytes(4, "little")
    if not c["verify_pattern"]:
        raise FioOptionError("fio: empty verify_pattern")
    if job.verify is VerifyKind.NONE:
        # As in fio: a pattern without a verify method means
        # verify=pattern.
        c["verify"] = VerifyKind.PATTERN


def _h_rwmixread(job: JobOptions, name: str, v: str | None,
                 c: _Changes) -> None:
    assert v is not None
    c["rwmixread"] = parse_int(name, v, 0, 100)


def _h_rwmixwrite(job: JobOptions, name: str, v: str | None,
                  c: _Changes) -> None:
    assert v is not None
    c["rwmixread"] = 100 - parse_int(name, v, 0, 100)


def _h_percentiles(job: JobOptions, name: str, v: str | None,
                   c: _Changes) -> None:
    assert v is not None
    c["percentile_list"], c["percentile_precision"] = \
        parse_percentiles(name, v)


def _h_ioengine(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
    assert v is not None
    if not v.strip():
        raise value_error(name, v, "empty engine name")
    c["ioengine"] = v.strip()


def _h_ignored(job: JobOptions, name: str, v: str | None,
               c: _Changes) -> None:
    """Options fio jobs carry that mean nothing for a virtio-blk guest
    (the guest always uses its own disk and a process per job)."""


def _h_filename(job: JobOptions, name: str, v: str | None,
                c: _Changes) -> None:
    assert v is not None
    c["filename"] = v.strip()


_SECOND = 1_000_000_000
_USEC = 1_000

_HANDLERS: dict[str, _Handler] = {
    "name": _h_name,
    "rw": _h_rw,
    "bs": _h_bs,
    "iodepth": _int_field("iodepth", 1, 65535),
    "numjobs": _int_field("numjobs", 1, 4096),
    "runtime": _time_field("runtime_ns", _SECOND),
    "time_based": _bool_field("time_based"),
    "size": _h_size,
    "offset": _h_offset,
    "rate_iops": _h_rate_iops,
    "thinktime": _time_field("thinktime_ns", _USEC),
    "thinktime_blocks": _int_field("thinktime_blocks", 1, None),
    "ramp_time": _time_field("ramp_time_ns", _SECOND),
    "verify": _h_verify,
    "verify_pattern": _h_verify_pattern,
    "do_verify": _bool_field("do_verify"),
    "rwmixread": _h_rwmixread,
    "rwmixwrite": _h_rwmixwrite,
    "percentile_list": _h_percentiles,
    "direct": _bool_field("direct"),
    "ioengine": _h_ioengine,
    "filename": _h_filename,
    "randseed": _int_field("randseed", 0, None),
    "read_iolog": _str_field("read_iolog"),
    "replay_redirect": _str_field("replay_redirect"),
    "write_lat_log": _str_field("write_lat_log"),
    "group_reporting": _bool_field("group_reporting"),
    # Accepted so that everyday fio jobs paste unchanged; they change
    # nothing in a guest that owns its disk and runs one process a job.
    "thread": _h_ignored,
    "invalidate": _h_ignored,
    "randrepeat": _h_ignored,
    "norandommap": _h_ignored,
    "clocksource": _h_ignored,
    "log_avg_msec": _h_ignored,
    "stonewall": _h_ignored,
    "description": _h_ignored,
}

#: fio's alternative spellings.
_ALIASES = {
    "readwrite": "rw",
    "blocksize": "bs",
    "timeout": "runtime",
    "fileoffset": "offset",
}

#: Options that may be given without a value.
_FLAGS = frozenset({"time_based", "direct", "do_verify", "thread",
                    "norandommap", "group_reporting", "stonewall",
                    "randrepeat", "invalidate"})


def _did_you_mean(name: str) -> str:
    """fio's hint for a misspelt option."""
    close = difflib.get_close_matches(name, [*_HANDLERS, *_ALIASES], 1)
    return f"\nDid you mean {close[0]}?" if close else ""


def parse_fio_args(args: Iterable[str]) -> list[tuple[str, str | None]]:
    """Split fio-style ``--opt=value`` / ``--flag`` arguments.

    :raises FioOptionError: an argument that is not ``--something``, or
        an option fio does not know (fio's ``unrecognized option``).
    """
    pairs: list[tuple[str, str | None]] = []
    for arg in args:
        if not arg.startswith("--") or len(arg) == 2:
            raise FioOptionError(f"fio: unrecognized option '{arg}'")
        name, sep, value = arg[2:].partition("=")
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in _HANDLERS:
            raise FioOptionError(f"fio: unrecognized option '{arg}'"
                                 + _did_you_mean(key))
        pairs.append((name, value if sep else None))
    return pairs
