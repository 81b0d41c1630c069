"""QEMU's QemuOpts option syntax and the typed reads QEMU makes of it.

``-device``, ``-drive``, ``-trace``, ``-msg``, ``-chardev`` and ``-mon``
are QemuOpts options in QEMU 7.2 (``util/qemu-option.c``), a syntax
close to but not the same as the keyval syntax of ``-object`` and
``-blockdev`` (:mod:`qiothread.keyval`):

- items are ``key=value`` separated by commas; ``,,`` in a value is a
  comma; the first item may omit its key when the option has an
  implied one (``-device virtio-blk-pci,...`` is ``driver=...``);
- a bare ``key`` means ``key=on`` and ``nokey`` means ``key=off`` (the
  short form QEMU deprecated but still takes);
- keys are flat (``cache.direct`` is one key), a repeated key keeps its
  last value, and options with a description reject unknown keys with
  ``Invalid parameter 'k'``;
- ``id`` must be an identifier (a letter, then letters, digits, ``-``,
  ``.``, ``_``) and unique within its option group.

Values stay strings; the device's property setters convert them the way
QEMU's keyval input visitor does (``qemu_strtou64`` with base prefixes
for integers, ``on/yes/true/y`` for booleans) and fail with QEMU's
words, which :func:`parse_bool` and :func:`parse_uint` reproduce for
both the command-line and the JSON form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

from qiothread.errors import ConfigError
from qiothread.keyval import qemu_strtou64

__all__ = [
    "QEMU_OPTIONS",
    "OptionError",
    "id_wellformed",
    "parse_bool",
    "parse_str",
    "parse_uint",
    "qemu_opts_parse",
    "split_argv",
]

#: QEMU options ``qiothread run`` understands, and whether each takes
#: an argument.  Both ``-name`` and ``--name`` spellings are accepted,
#: as QEMU accepts them.
QEMU_OPTIONS: dict[str, bool] = {
    "object": True,
    "blockdev": True,
    "drive": True,
    "device": True,
    "trace": True,
    "msg": True,
    "D": True,
    "qmp": True,
    "qmp-pretty": True,
    "chardev": True,
    "mon": True,
}


class OptionError(ConfigError):
    """A bad QEMU option, worded as QEMU words it.

    ``str()`` gives ``-option ARG: message``, what QEMU prints after its
    program name; :attr:`message` is QEMU's message alone (what tests
    compare), :attr:`option` and :attr:`arg` locate it.
    """

    def __init__(self, option: str, arg: str | None, message: str):
        self.option = option
        self.arg = arg
        self.message = message
        where = f"-{option}" if arg is None else f"-{option} {arg}"
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------------
# The argument vector


def split_argv(argv: Sequence[str]) -> tuple[list[tuple[str, str]],
                                              list[str]]:
    """Separate QEMU options from everything else (fio options, files).

    Returns ``([(name, arg), ...], rest)`` keeping the order of each.
    A QEMU option is ``-name ARG`` or ``--name ARG`` with ``name`` in
    :data:`QEMU_OPTIONS`; fio's ``--name=value`` never collides because
    fio has no option of those names.

    :raises OptionError: a QEMU option without its argument
        (QEMU: ``requires an argument``).
    """
    qemu: list[tuple[str, str]] = []
    rest: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        word = argv[i]
        name = word[2:] if word.startswith("--") else word[1:]
        if word.startswith("-") and name in QEMU_OPTIONS:
            if i + 1 >= len(argv):
                raise OptionError(name, None, "requires an argument")
            qemu.append((name, argv[i + 1]))
            next(it)
        else:
            rest.append(word)
    return qemu, rest


# ---------------------------------------------------------------------
# QemuOpts syntax

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def id_wellformed(s: str) -> bool:
    """QEMU's ``id_wellformed``: a letter, then letters, digits, -._"""
    return _ID_RE.match(s) is not None


def _opt_value(s: str, pos: int) -> tuple[str, int]:
    """Read a value up to an unescaped comma (``,,`` is a comma)."""
    out: list[str] = []
    while pos < len(s):
        if s[pos] == ",":
            if s.startswith(",,", pos):
                out.append(",")
                pos += 2
                continue
            break
        out.append(s[pos])
        pos += 1
    return "".join(out), pos


def _opt_pairs(arg: str, implied: str | None
               ) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(key, value, had_equals)`` as QemuOpts reads ``arg``."""
    pos, first = 0, True
    while pos < len(arg):
        eq, comma = arg.find("=", pos), arg.find(",", pos)
        if eq >= 0 and (comma < 0 or eq < comma):
            key = arg[pos:eq]
            value, pos = _opt_value(arg, eq + 1)
            yield key, value, True
        elif first and implied is not None:
            value, pos = _opt_value(arg, pos)
            yield implied, value, True
        else:
            end = len(arg) if comma < 0 else comma
            yield arg[pos:end], "", False
            pos = end
        first = False
        pos += 1  # the comma


def qemu_opts_parse(option: str, arg: str, implied: str | None = None,
                    allowed: Sequence[str] | None = None,
                    warn: Callable[[str], None] | None = None
                    ) -> dict[str, str]:
    """Parse one QemuOpts argument into ``{key: value}`` (strings).

    A bare ``key`` is ``key=on`` and ``nokey`` is ``key=off`` (QEMU's
    deprecated short form).  A repeated key keeps the last value, as
    ``qemu_opt_get`` sees it.  ``allowed`` is the option group's
    description; ``None`` accepts any key (``-device``, ``-drive``,
    whose keys are checked later as properties).  ``warn`` gets QEMU
    7.2's deprecation warning for each short-form boolean.

    :raises OptionError: an unknown key (``Invalid parameter 'k'``) or a
        malformed ``id``.
    """
    out: dict[str, str] = {}
    for key, value, had_eq in _opt_pairs(arg, implied):
        if not had_eq:
            prefix = ""
            if key.startswith("no") and key[2:] and (
                    allowed is None or key[2:] in allowed):
                key, value, prefix = key[2:], "off", "no"
            else:
                value = "on"
            if warn is not None and key != "help":
                warn(f"warning: short-form boolean option "
                     f"'{prefix}{key}' deprecated\n"
                     f"Please use {key}={value} instead")
        if allowed is not None and key != "id" and key not in allowed:
            raise OptionError(option, arg, f"Invalid parameter '{key}'")
        out[key] = value
    ident = out.get("id")
    if ident is not None and not id_wellformed(ident):
        raise OptionError(option, arg,
                          "Parameter 'id' expects an identifier")
    return out


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(name: str, value: object, from_json: bool = False) -> bool:
    """A boolean as QEMU's visitors read it (keyval or JSON).

    :raises ConfigError: QEMU's message for the failing form.
    """
    if from_json:
        if not isinstance(value, bool):
            raise ConfigError(
                f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if isinstance(value, bool):
        return value
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_uint(name: str, value: object, bits: int,
               from_json: bool = False) -> int:
    """An unsigned property (``uint16`` and the like), as QEMU reads it.

    From the command line the text goes through ``qemu_strtou64``
    (``0x`` hex, leading-0 octal, ``-1`` wraps); from JSON a number is
    taken as it is (negative numbers wrap, as QEMU accepts them for
    backward compatibility).  Then the width is checked.

    :raises ConfigError: ``Parameter 'x' expects integer`` (text),
        ``... expects uint64`` (JSON non-number), ``... expects
        uint16_t`` (out of range).
    """
    n: int | None
    if from_json:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Parameter '{name}' expects uint64")
        n = value % (1 << 64)
    else:
        n = qemu_strtou64(str(value))
        if n is None:
            raise ConfigError(f"Parameter '{name}' expects integer")
    if n >= 1 << bits:
        raise ConfigError(f"Parameter '{name}' expects uint{bits}_t")
    return n


def parse_str(name: str, value: object, from_json: bool = False) -> str:
    """A string property; JSON must give a JSON string."""
    if from_json and not isinstance(value, str):
        raise ConfigError(
            f"Invalid parameter type for '{name}', expected: string")
    return str(value)
