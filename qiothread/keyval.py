"""QEMU's KEY=VALUE,... option syntax, as ``-object``, ``-blockdev`` and
``-device`` read it (``util/keyval.c`` and the QObject input visitors).

The contract users rely on, in our own words:

- An option string is a list of ``key=value`` items separated by commas.
  A comma inside a value is written twice (``file=a,,b`` is ``a,b``); a
  trailing comma is allowed.  A later item for the same key wins.
- A key is a path of fragments joined by dots.  ``cache.direct=on``
  makes a nested object ``{"cache": {"direct": "on"}}``; a fragment of
  decimal digits (never the first) makes the parent a list instead,
  whose indexes must have no gaps.  Each fragment is a QAPI name (a
  letter, then letters, digits, ``-`` and ``_``) of 1 to 127 characters.
- An option may have an *implied key*: ``-object iothread,id=io0`` means
  ``qom-type=iothread,id=io0``.  Only the first item can use it, and its
  value may not be empty nor hold ``,`` or ``=``.
- An item that is exactly ``help`` or ``?`` asks for help instead of
  being a key (``-object iothread,help``).
- Every value parsed this way is a string.  The reader that later wants
  an integer or a boolean converts it and, if it cannot, says
  ``Parameter 'x' expects integer``.  An option that starts with ``{`` is
  JSON instead, with typed values; there a wrong type reads ``Invalid
  parameter type for 'x', expected: integer``, the message QMP gives too.
  :class:`InputVisitor` knows both and picks the right message.

Error texts are QEMU's own.  One thing is ours: the order in which
unexpected keys are reported is the order they were written, where QEMU
follows its hash table.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from qiothread.errors import ConfigError

__all__ = [
    "InputVisitor",
    "ParsedOption",
    "keyval_parse",
    "parse_option",
    "qemu_strtoi64",
    "qemu_strtou64",
]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

# A key fragment, as parse_qapi_name() accepts a non-complete name: an
# optional downstream prefix "__RFQDN_", then a letter and then letters,
# digits, '-' and '_'.
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")
_MAX_FRAGMENT = 127
_HELP = ("help", "?")

# strtoll() with base 0: leading white space, a sign, then hexadecimal
# after 0x, octal after a leading 0, decimal otherwise; nothing after.
_STRTOLL = re.compile(
    r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")

# What keyval_parse returns: nested dicts and lists with string leaves.
KeyvalTree = dict[str, Any]


def qemu_strtoi64(text: str) -> int | None:
    """Parse ``text`` as QEMU's ``qemu_strtoi64(text, NULL, 0)`` does.

    Returns ``None`` where QEMU fails: trailing characters, no digits,
    or a value outside int64.
    """
    m = _STRTOLL.match(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if m.group(1) == "-":
        value = -value
    return value if INT64_MIN <= value <= INT64_MAX else None


#: C's isspace() in the "C" locale: what strtoull skips first.
_C_SPACE = " \t\n\v\f\r"


def qemu_strtou64(text: str) -> int | None:
    """``qemu_strtou64(text, NULL, 0, ...)``: None where QEMU fails.

    As ``strtoull`` with base 0: leading C whitespace, a sign, then
    ``0x`` hex, a leading ``0`` octal, or decimal; the whole string must
    be consumed; a minus sign negates modulo 2**64; out of range is an
    error (ERANGE).  Python's ``int(x, 0)`` differs on each of "010",
    "0o7", "1_0" and trailing blanks, hence this.
    """
    s = text.lstrip(_C_SPACE)
    neg = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if s[:2].lower() == "0x" and s[2:3] and s[2] in string.hexdigits:
        digits, base = s[2:], 16
    elif s[:1] == "0":
        digits, base = s, 8
    else:
        digits, base = s, 10
    allowed = string.hexdigits if base == 16 else string.digits[:base]
    if not digits or any(c not in allowed for c in digits):
        return None
    n = int(digits, base)
    if n > UINT64_MAX:
        return None
    return -n & UINT64_MAX if neg else n


def _put(cur: dict[str, Any], name: str, value: str | None,
         shown: str) -> dict[str, Any] | None:
    """Make ``cur[name]`` a dict (``value`` None) or the string ``value``.

    A clash between the two is QEMU's "used inconsistently" error,
    naming the key as far as ``shown``.
    """
    old = cur.get(name)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise ConfigError(f"Parameters '{shown}.*' used inconsistently")
        if isinstance(old, dict):
            return old
    if value is None:
        new: dict[str, Any] = {}
        cur[name] = new
        return new
    cur[name] = value
    return None


def _parse_key(key: str) -> list[str]:
    """Split ``key`` into fragments, checking each as QEMU does."""
    frags: list[str] = []
    pos = 0
    while True:
        m = (_INDEX.match(key, pos) if frags else None) \
            or _QAPI_NAME.match(key, pos)
        end = m.end() if m else pos
        if end == pos or (end < len(key) and key[end] != "."):
            raise ConfigError(f"Invalid parameter '{key}'")
        if end - pos > _MAX_FRAGMENT:
            whole = pos == 0 and end == len(key)
            raise ConfigError(
                f"Parameter{'' if whole else ' fragment'} "
                f"'{key[pos:end]}' is too long")
        frags.append(key[pos:end])
        if end == len(key):
            return frags
        pos = end + 1


def _parse_one(tree: KeyvalTree, params: str, pos: int,
               implied_key: str | None) -> tuple[int, bool]:
    """Parse the item at ``params[pos:]``; return (next pos, is help)."""
    stop = pos
    while stop < len(params) and params[stop] not in "=,":
        stop += 1
    first = params[pos:stop]
    at_eq = stop < len(params) and params[stop] == "="

    if first and not at_eq:
        if first in _HELP:
            return stop + 1 if stop < len(params) else stop, True
        if implied_key is not None:
            # The value of an implied key ends at the first ',' or '=';
            # it has no ',,' escape.
            _put(tree, implied_key, first, implied_key)
            return stop + 1 if stop < len(params) else stop, False

    frags = _parse_key(first)
    if not at_eq:
        raise ConfigError(f"Expected '=' after parameter '{first}'")

    cur = tree
    for i, frag in enumerate(frags[:-1]):
        shown = ".".join(frags[:i + 1])
        nxt = _put(cur, frag, None, shown)
        assert nxt is not None
        cur = nxt

    value: list[str] = []
    i = stop + 1
    while i < len(params):
        c = params[i]
        if c == ",":
            if i + 1 < len(params) and params[i + 1] == ",":
                value.append(",")
                i += 2
                continue
            i += 1
            break
        value.append(c)
        i += 1
    _put(cur, frags[-1], "".join(value), first)
    return i, False


def _listify(cur: dict[str, Any], path: str) -> dict[str, Any] | list[Any]:
    """Turn dicts whose keys are all indexes into lists, depth first."""
    has_index = has_member = False
    for k, v in list(cur.items()):
        if _INDEX.fullmatch(k):
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            cur[k] = _listify(v, f"{path}{k}.")
    if has_index and has_member:
        raise ConfigError(f"Parameters '{path}*' used inconsistently")
    if not has_index:
        return cur
    by_index = {int(k): v for k, v in cur.items()}
    for i in range(len(by_index)):
        if i not in by_index:
            raise ConfigError(f"Parameter '{path}{i}' missing")
    return [by_index[i] for i in range(len(by_index))]


def keyval_parse(params: str, implied_key: str | None = None, *,
                 help_allowed: bool = True) -> tuple[KeyvalTree, bool]:
    """Parse ``params`` in KEY=VALUE,... syntax.

    Returns the tree (string leaves, nested dicts and lists) and whether
    ``help`` or ``?`` was given.

    :raises ConfigError: with QEMU's message, for bad syntax, or for a
        help request where ``help_allowed`` is false.
    """
    tree: KeyvalTree = {}
    want_help = False
    pos = 0
    while pos < len(params):
        pos, is_help = _parse_one(tree, params, pos, implied_key)
        want_help = want_help or is_help
        implied_key = None
    if want_help and not help_allowed:
        raise ConfigError("Help is not available for this option")
    listed = _listify(tree, "")
    assert listed is tree
    return tree, want_help


def _json_constant(name: str) -> Any:
    raise ConfigError(f"JSON parse error, invalid keyword '{name}'")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise ConfigError(f"JSON parse error, duplicate key '{k}'")
        obj[k] = v
    return obj


@dataclass
class ParsedOption:
    """One option argument, parsed by :func:`parse_option`."""

    #: The parsed tree: strings only when ``keyval``, JSON values if not.
    data: dict[str, Any]
    #: True for KEY=VALUE syntax, False for the JSON form.
    keyval: bool
    #: ``help`` or ``?`` was given (KEY=VALUE syntax only).
    help: bool = False

    def visitor(self) -> InputVisitor:
        """A reader of ``data`` with the messages that fit its syntax."""
        return InputVisitor(self.data, keyval=self.keyval)


def parse_option(text: str, implied_key: str | None = None, *,
                 help_allowed: bool = True) -> ParsedOption:
    """Parse an option argument the way ``-object``/``-blockdev`` do.

    Text starting with ``{`` is a JSON object; anything else is
    KEY=VALUE syntax with ``implied_key``.

    :raises ConfigError: with QEMU's message where QEMU has one; JSON
        syntax errors carry Python's description after QEMU's
        ``JSON parse error,`` prefix.
    """
    if text.startswith("{"):
        try:
            data = json.loads(text, object_pairs_hook=_json_object,
                              parse_constant=_json_constant)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"JSON parse error, {exc.msg}") from None
        return ParsedOption(data, keyval=False)
    tree, want_help = keyval_parse(text, implied_key,
                                   help_allowed=help_allowed)
    return ParsedOption(tree, keyval=True, help=want_help)


class InputVisitor:
    """Typed reads from a parsed option, with QEMU's error messages.

    ``keyval`` selects the command-line visitor (strings converted on
    demand); otherwise values must already have the JSON type, as
    over QMP.  Each read marks the key as visited, and
    :meth:`check_struct` reports the first key nobody read.
    """

    def __init__(self, data: dict[str, Any], *, keyval: bool,
                 prefix: str = "") -> None:
        self.data = data
        self.keyval = keyval
        self._prefix = prefix
        self._visited: set[str] = set()

    def _full(self, name: str) -> str:
        return self._prefix + name

    def _type_error(self, name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"Invalid parameter type for '{self._full(name)}', "
            f"expected: {expected}")

    def _value_error(self, name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"Parameter '{self._full(name)}' expects {expected}")

    def _get(self, name: str, required: bool) -> Any:
        self._visited.add(name)
        if name not in self.data:
            if required:
                raise ConfigError(
                    f"Parameter '{self._full(name)}' is missing")
            return None
        return self.data[name]

    def _keyval_string(self, name: str, value: Any) -> str:
        """The string a keyval scalar read converts
        (``qobject_input_get_keyval``)."""
        if isinstance(value, dict | list):
            # "x.y=..." where a scalar "x" was wanted.
            raise ConfigError(
                f"Parameters '{self._full(name)}.*' are unexpected")
        if not isinstance(value, str):
            raise self._type_error(name, "string")
        return value

    def type_str(self, name: str, required: bool = False) -> str | None:
        """Read a string member."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._type_error(name, "string")
        return value

    def type_int64(self, name: str, required: bool = False) -> int | None:
        """Read an int64 member (base 0 on the command line, as QEMU)."""
        value = self._get(name, required)
        if value is None:
            return None
        if self.keyval:
            parsed = qemu_strtoi64(self._keyval_string(name, value))
            if parsed is None:
                raise self._value_error(name, "integer")
            return parsed
        if (isinstance(value, bool) or not isinstance(value, int)
                or not INT64_MIN <= value <= INT64_MAX):
            raise self._type_error(name, "integer")
        return value

    def type_bool(self, name: str, required: bool = False) -> bool | None:
        """Read a boolean (``on``/``yes``/``true``/``y`` and their
        opposites on the command line)."""
        value = self._get(name, required)
        if value is None:
            return None
        if self.keyval:
            text = self._keyval_string(name, value)
            if text in ("on", "yes", "true", "y"):
                return True
            if text in ("off", "no", "false", "n"):
                return False
            raise self._value_error(name, "'on' or 'off'")
        if not isinstance(value, bool):
            raise self._type_error(name, "boolean")
        return value

    def start_struct(self, name: str,
                     required: bool = False) -> InputVisitor | None:
        """A visitor for the nested object ``name`` (``cache.*``)."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._type_error(name, "object")
        return InputVisitor(value, keyval=self.keyval,
                            prefix=self._full(name) + ".")

    def skip(self, name: str) -> None:
        """Mark ``name`` as consumed without reading it."""
        self._visited.add(name)

    def check_struct(self) -> None:
        """:raises ConfigError: ``Parameter 'x' is unexpected`` for the
        first member that no read consumed."""
        for key in self.data:
            if key not in self._visited:
                raise ConfigError(
                    f"Parameter '{self._full(key)}' is unexpected")

    def __repr__(self) -> str:
        kind = "keyval" if self.keyval else "json"
        return f"InputVisitor({kind}, {sorted(self.data)!r})"
