"""fio's value grammar: sizes, times, per-direction and float lists.

The rules of fio 3.33's ``parse.c``, with one deliberate difference:
fio ignores trailing garbage (``bs=4q`` is silently 4 bytes); here it
is an error, so that a mistyped unit cannot quietly turn a 4 KiB
workload into a 4-byte one.

- sizes take fio's suffixes with ``kb_base=1024``, fio's default:
  ``k``/``m``/``g``/``t``/``p`` (and ``kb``, ``mb`` ...) are powers of
  1024, the SI-looking ``kib``/``mib`` are powers of 1000 -- fio's
  documented inversion; ``size`` and ``offset`` also take a percentage;
- times are in a default unit unless suffixed (``ns``, ``us``, ``ms``,
  ``s``, ``m``, ``h``, ``d``);
- per-direction values take the comma form ``read,write,trim``;
- float lists are colon-separated, at most 20 values in (0, 100]; the
  precision is the most digits after a point.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from qiothread.errors import ConfigError

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_PERCENTILE_PRECISION",
    "FioOptionError",
    "SizeSpec",
    "check_range",
    "parse_bool",
    "parse_int",
    "parse_per_ddir",
    "parse_percentiles",
    "parse_size",
    "parse_time_ns",
    "value_error",
]


class FioOptionError(ConfigError):
    """A fio option with a bad name or value; the text is fio's."""


#: fio's default ``percentile_list``.
DEFAULT_PERCENTILES: tuple[float, ...] = (
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
    95.0, 99.0, 99.5, 99.9, 99.95, 99.99)
#: Digits after the point in fio's default list (from ``99.95``).
DEFAULT_PERCENTILE_PRECISION = 2
#: fio's ``FIO_IO_U_LIST_MAX_LEN``.
_PERCENTILE_MAX_LEN = 20


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """An absolute byte count or a percentage of the target's size."""

    value: int = 0  #: bytes, when ``percent`` is None
    percent: float | None = None  #: 0 < percent <= 100

    def resolve(self, target_size: int) -> int:
        """The byte count against a target of ``target_size`` bytes."""
        if self.percent is None:
            return self.value
        return int(target_size * self.percent / 100.0)


_NUM_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|[+-]?\d+)\s*([A-Za-z%]*)\s*$")

#: Size suffixes with ``kb_base=1024`` as (power, base).
_SIZE_SUFFIX = {"": (0, 1024)}
for _pow, _letter in enumerate("kmgtp", start=1):
    _SIZE_SUFFIX[_letter] = (_pow, 1024)
    _SIZE_SUFFIX[_letter + "b"] = (_pow, 1024)
    _SIZE_SUFFIX[_letter + "ib"] = (_pow, 1000)

#: Time suffixes in nanoseconds.
_TIME_SUFFIX = {
    "ns": 1, "nsec": 1,
    "us": 1_000, "usec": 1_000,
    "ms": 1_000_000, "msec": 1_000_000,
    "s": 1_000_000_000, "sec": 1_000_000_000,
    "m": 60_000_000_000, "min": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}


def value_error(name: str, value: str, why: str) -> FioOptionError:
    return FioOptionError(f"fio: failed parsing {name}={value}: {why}")


def parse_size(name: str, text: str,
               allow_percent: bool = False) -> SizeSpec:
    """Parse a fio size such as ``4k``, ``1g``, ``512``, ``50%``.

    :raises FioOptionError: not a number, an unknown suffix, a negative
        size or a percentage where none is allowed.
    """
    m = _NUM_RE.match(text)
    if not m:
        raise value_error(name, text, "not a size")
    digits, suffix = m.group(1), m.group(2).lower()
    number = int(digits, 0) if digits.lower().startswith("0x") \
        else int(digits)
    if suffix == "%":
        if not allow_percent:
            raise value_error(name, text, "a percentage is not allowed here")
        if not 0 < number <= 100:
            raise value_error(name, text, "percentage must be in (0, 100]")
        return SizeSpec(percent=float(number))
    if suffix not in _SIZE_SUFFIX:
        raise value_error(name, text, f"unknown size suffix '{m.group(2)}'")
    if number < 0:
        raise value_error(name, text, "size must not be negative")
    power, base = _SIZE_SUFFIX[suffix]
    return SizeSpec(value=number * base ** power)


def parse_time_ns(name: str, text: str, default_unit_ns: int) -> int:
    """Parse a fio time (``10``, ``500ms``, ``2m``) into nanoseconds.

    A bare number is in ``default_unit_ns`` (a second for ``runtime``
    and ``ramp_time``, a microsecond for ``thinktime``).

    :raises FioOptionError: not a number, unknown unit or negative.
    """
    m = _NUM_RE.match(text)
    if not m or m.group(1).lower().startswith("0x"):
        raise value_error(name, text, "not a time")
    number, suffix = int(m.group(1)), m.group(2).lower()
    if suffix and suffix not in _TIME_SUFFIX:
        raise value_error(name, text, f"unknown time unit '{m.group(2)}'")
    if number < 0:
        raise value_error(name, text, "time must not be negative")
    return number * (_TIME_SUFFIX[suffix] if suffix else default_unit_ns)


def parse_int(name: str, text: str, minval: int | None = None,
               maxval: int | None = None) -> int:
    try:
        number = int(text.strip(), 0)
    except ValueError:
        raise value_error(name, text, "not an integer") from None
    check_range(name, number, minval, maxval)
    return number


def check_range(name: str, number: int, minval: int | None,
                 maxval: int | None) -> None:
    # fio's own wording (parse.c) for both limits.
    if maxval is not None and number > maxval:
        raise FioOptionError(
            f"{name}: max value out of range: {number} ({maxval} max)")
    if minval is not None and number < minval:
        raise FioOptionError(
            f"{name}: min value out of range: {number} ({minval} min)")


def parse_bool(name: str, text: str | None) -> bool:
    if text is None or text.strip() == "":
        return True
    return bool(parse_int(name, text, 0, 1))


def parse_per_ddir(name: str, text: str, one: Callable[[str], int],
              default: tuple[int, int, int]) -> tuple[int, int, int]:
    """fio's ``read,write,trim`` form: empty fields keep the default;
    a single value applies to all three; with two values the trim one
    follows the write one."""
    fields = text.split(",")
    if len(fields) > 3:
        raise value_error(name, text, "at most three comma-separated values")
    out = list(default)
    last: int | None = None
    for i in range(3):
        if i < len(fields):
            if fields[i].strip():
                last = one(fields[i])
                out[i] = last
        elif last is not None:
            out[i] = last
    return out[0], out[1], out[2]


def parse_percentiles(name: str, text: str) -> tuple[tuple[float, ...],
                                                      int]:
    values: list[float] = []
    precision = 0
    for field in text.split(":"):
        if len(values) >= _PERCENTILE_MAX_LEN:
            raise FioOptionError(
                f"the list exceeding max length {_PERCENTILE_MAX_LEN}")
        try:
            value = float(field)
        except ValueError:
            raise FioOptionError(
                f"not a floating point value: {field}") from None
        if value > 100.0:
            raise FioOptionError(
                f"value out of range: {value:f} (range max: 100.000000)")
        if not value > 0.0:
            # fio stops its list at the first 0.0, so a 0 would silently
            # cut the list short; refuse it instead.
            raise FioOptionError(
                f"value out of range: {value:f} (range min: 0.000000)")
        values.append(value)
        if "." in field:
            decimals = field.split(".", 1)[1]
            precision = max(precision, len(decimals.rstrip()))
    # fio sorts the list before using it (stat.c).
    return tuple(sorted(values)), precision
