"""QMP wire format: QEMU's JSON streamer, its error texts, and messages.

The contract with clients (QEMU's docs/interop/qmp-spec, as QEMU 7.2
behaves):

- The server speaks first, with a greeting naming the version and the
  capabilities it offers.  Until the client runs ``qmp_capabilities``
  every other command fails with ``CommandNotFound``.
- Input is a stream of JSON texts, not of lines: QEMU's streamer counts
  braces and brackets and parses a value as soon as they balance, so
  ``{"execute":`` and ``"query-status"}`` may arrive in two reads or on
  two lines.  Output is one JSON object per line.
- Every input value gets at most one answer: ``{"return": ...}`` or
  ``{"error": {"class": ..., "desc": ...}}``, carrying the request's
  ``id`` when it had one (and it is a JSON object).  Input that cannot
  be parsed is answered without ``id``.
- After a lexical error QEMU skips input up to the next structural
  character (``{ [ ] }``), control character (such as a newline) or
  impossible UTF-8 byte (``0xFE``, ``0xFF``), so one bad line costs one
  error and the connection lives on.
- Strings may be single-quoted (a QEMU extension); strings must be
  valid UTF-8; bytes outside strings must be JSON.

QEMU limits one value to 64 MiB of tokens and 1024 levels of nesting.
qiothread keeps QEMU's messages but a smaller size limit (1 MiB by
default), and the server drops a client that exceeds it: no command of
this schema needs more, and a peer that sends that much is not a QMP
client.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import qiothread

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_SIZE",
    "ErrorClass",
    "JSONStreamer",
    "ParseError",
    "encode",
    "error_response",
    "event_message",
    "greeting",
    "success_response",
    "version_info",
]

#: QEMU's nesting limit (json-streamer.c); deeper input is an error.
MAX_NESTING = 1024
#: Our limit on the bytes of one pending value (QEMU's is 64 MiB).
MAX_TOKEN_SIZE = 1 << 20

#: The QEMU version qiothread reproduces, as ``query-version`` says.
QEMU_VERSION = (7, 2, 0)


class ErrorClass(enum.Enum):
    """QEMU's ``QapiErrorClass`` values."""

    #: Almost every error.
    GENERIC_ERROR = "GenericError"
    #: Unknown command, or any command before negotiation.
    COMMAND_NOT_FOUND = "CommandNotFound"
    #: A device or QOM path that does not exist.
    DEVICE_NOT_FOUND = "DeviceNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    KVM_MISSING_CAP = "KVMMissingCap"


@dataclass(frozen=True)
class ParseError:
    """A value the streamer could not parse; ``fatal`` drops the client."""

    desc: str
    fatal: bool = False


class _Tok(enum.Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    KEYWORD = "keyword"


_STRUCTURAL = {ord(c): _Tok(c) for c in "{}[]:,"}
_WHITESPACE = frozenset(b" \t\r\n")
#: Where error recovery stops skipping (QEMU's IN_RECOVERY exits).
_RESYNC = frozenset(b"{}[]") | frozenset(range(0x20)) - {ord("\t")} | {
    0xFE, 0xFF}
_ESCAPES = frozenset(b"\"'\\/bfnrtu")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NUMBER_BYTES = frozenset(b"0123456789+-.eE")


class _Lex(enum.Enum):
    START = enum.auto()
    STRING = enum.auto()
    ESCAPE = enum.auto()
    UNICODE = enum.auto()
    NUMBER = enum.auto()
    KEYWORD = enum.auto()
    RECOVERY = enum.auto()


_IN_STRING = (_Lex.STRING, _Lex.ESCAPE, _Lex.UNICODE)


class JSONStreamer:
    """Split a byte stream into JSON values the way QEMU's streamer does.

    ``feed(data)`` yields, in order, each complete value (any JSON
    type; the dispatcher rejects non-objects) or a ``ParseError``.
    One instance per connection; not thread-safe.
    """

    def __init__(self, max_size: int = MAX_TOKEN_SIZE) -> None:
        self._max_size = max_size
        self._state = _Lex.START
        self._tok = bytearray()        # the token being lexed
        self._quote = 0
        self._hex_left = 0
        self._tokens: list[tuple[_Tok, bytes]] = []
        self._size = 0                 # bytes of pending tokens
        self._braces = 0
        self._brackets = 0
        #: Set after a fatal error: the rest of the stream is ignored.
        self.dead = False

    def feed(self, data: bytes) -> Iterator[Any | ParseError]:
        """Lex ``data`` and yield every value or error it completes."""
        i = 0
        n = len(data)
        while i < n and not self.dead:
            out = self._step(data[i])
            if isinstance(out, _Relex):
                # The byte ended a number or keyword: lex it again.
                out = out.value
            else:
                i += 1
            if out is not _NOTHING:
                self.dead = isinstance(out, ParseError) and out.fatal
                yield out
            if (not self.dead and self._state in _IN_STRING
                    and self._size + len(self._tok) > self._max_size):
                # One string alone may not grow without bound either.
                self._reset(_Lex.RECOVERY)
                self.dead = True
                yield ParseError("JSON token size limit exceeded",
                                 fatal=True)

    # -- lexer -----------------------------------------------------------

    def _step(self, c: int) -> Any:
        """Lex one byte; return a result, ``_NOTHING`` or ``_Relex``."""
        state = self._state
        if state is _Lex.START:
            return self._start(c)
        if state is _Lex.STRING:
            if c == self._quote:
                self._tok.append(c)
                return self._token(_Tok.STRING)
            if c < 0x20 or c > 0xFD:
                return self._stray(c)
            if c == ord("\\"):
                self._state = _Lex.ESCAPE
            self._tok.append(c)
            return _NOTHING
        if state is _Lex.ESCAPE:
            if c not in _ESCAPES:
                return self._stray(c)
            self._tok.append(c)
            if c == ord("u"):
                self._state, self._hex_left = _Lex.UNICODE, 4
            else:
                self._state = _Lex.STRING
            return _NOTHING
        if state is _Lex.UNICODE:
            if c not in _HEX:
                return self._stray(c)
            self._tok.append(c)
            self._hex_left -= 1
            if not self._hex_left:
                self._state = _Lex.STRING
            return _NOTHING
        if state is _Lex.NUMBER:
            if c in _NUMBER_BYTES:
                self._tok.append(c)
                return _NOTHING
            return _Relex(self._end_number())
        if state is _Lex.KEYWORD:
            if ord("a") <= c <= ord("z"):
                self._tok.append(c)
                return _NOTHING
            return _Relex(self._token(_Tok.KEYWORD))
        # RECOVERY: skip to a point where a new value may start.
        if c in _RESYNC:
            self._state = _Lex.START
            return _Relex(_NOTHING)
        return _NOTHING

    def _start(self, c: int) -> Any:
        if c in _WHITESPACE:
            return _NOTHING
        tok = _STRUCTURAL.get(c)
        if tok is not None:
            self._tok.append(c)
            return self._token(tok)
        if c in (ord('"'), ord("'")):
            self._state, self._quote = _Lex.STRING, c
        elif c == ord("-") or ord("0") <= c <= ord("9"):
            self._state = _Lex.NUMBER
        elif ord("a") <= c <= ord("z"):
            self._state = _Lex.KEYWORD
        else:
            return self._stray(c)
        self._tok.append(c)
        return _NOTHING

    def _end_number(self) -> Any:
        text = self._tok.decode("ascii")
        if not _is_json_number(text):
            self._tok.clear()
            self._drop_pending()
            self._state = _Lex.RECOVERY
            return ParseError(f"JSON parse error, stray '{text}'")
        isint = text.lstrip("-").isdigit()
        return self._token(_Tok.INTEGER if isint else _Tok.FLOAT)

    def _stray(self, c: int) -> ParseError:
        """A lexical error: report the token so far, then resync.

        The offending byte is consumed with the error, as in QEMU, so a
        newline inside a string does not itself end recovery.
        """
        self._tok.append(c)
        text = bytes(self._tok).decode("utf-8", "replace")
        self._reset(_Lex.RECOVERY)
        return ParseError(f"JSON parse error, stray '{text}'")

    # -- streamer --------------------------------------------------------

    def _token(self, kind: _Tok) -> Any:
        text = bytes(self._tok)
        self._tok.clear()
        self._state = _Lex.START
        if kind is _Tok.LCURLY:
            self._braces += 1
        elif kind is _Tok.RCURLY:
            self._braces -= 1
        elif kind is _Tok.LSQUARE:
            self._brackets += 1
        elif kind is _Tok.RSQUARE:
            self._brackets -= 1
        if self._size + len(text) + 1 > self._max_size:
            self._drop_pending()
            self._state = _Lex.RECOVERY
            return ParseError("JSON token size limit exceeded", fatal=True)
        if self._braces + self._brackets > MAX_NESTING:
            self._drop_pending()
            return ParseError("JSON nesting depth limit exceeded")
        self._tokens.append((kind, text))
        self._size += len(text) + 1
        if ((self._braces > 0 or self._brackets > 0)
                and self._braces >= 0 and self._brackets >= 0):
            return _NOTHING
        tokens = self._tokens
        self._drop_pending()
        return _parse(tokens)

    def _drop_pending(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = self._brackets = 0

    def _reset(self, state: _Lex) -> None:
        self._tok.clear()
        self._drop_pending()
        self._state = state


class _Nothing:
    """Marker: the byte completed nothing."""


_NOTHING: Any = _Nothing()


class _Relex:
    """The byte ended a token (with ``value``) and must be lexed again."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _is_json_number(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return text[-1:].isdigit()


# -- parser ---------------------------------------------------------------

class _Fail(Exception):
    pass


def _parse(tokens: list[tuple[_Tok, bytes]]) -> Any:
    """Parse one value's tokens; errors use QEMU's texts, first wins."""
    parser = _Parser(tokens)
    try:
        return parser.value()
    except _Fail as e:
        return ParseError(f"JSON parse error, {e}")


class _Parser:
    def __init__(self, tokens: list[tuple[_Tok, bytes]]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _peek(self) -> tuple[_Tok, bytes]:
        if self._pos >= len(self._tokens):
            raise _Fail("premature EOI")
        return self._tokens[self._pos]

    def _pop(self) -> tuple[_Tok, bytes]:
        tok = self._peek()
        self._pos += 1
        return tok

    def value(self) -> Any:
        kind, text = self._peek()
        if kind is _Tok.LCURLY:
            return self._object()
        if kind is _Tok.LSQUARE:
            return self._array()
        if kind in (_Tok.STRING, _Tok.INTEGER, _Tok.FLOAT):
            self._pos += 1
            return _literal(kind, text)
        if kind is _Tok.KEYWORD:
            self._pos += 1
            words = {b"true": True, b"false": False, b"null": None}
            if text not in words:
                raise _Fail(f"invalid keyword '{text.decode()}'")
            return words[text]
        raise _Fail("expecting value")

    def _object(self) -> dict[str, Any]:
        self._pop()
        result: dict[str, Any] = {}
        if self._peek()[0] is _Tok.RCURLY:
            self._pop()
            return result
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise _Fail("key is not a string in object")
            if self._pop()[0] is not _Tok.COLON:
                raise _Fail("missing : in object pair")
            # The first error wins, as in QEMU: "expecting value" from
            # inside, not the outer "Missing value in dict".
            value = self.value()
            if key in result:
                raise _Fail("duplicate key")
            result[key] = value
            kind = self._pop()[0]
            if kind is _Tok.RCURLY:
                return result
            if kind is not _Tok.COMMA:
                raise _Fail("expected separator in dict")

    def _array(self) -> list[Any]:
        self._pop()
        result: list[Any] = []
        if self._peek()[0] is _Tok.RSQUARE:
            self._pop()
            return result
        while True:
            result.append(self.value())
            kind = self._pop()[0]
            if kind is _Tok.RSQUARE:
                return result
            if kind is not _Tok.COMMA:
                raise _Fail("expected separator in list")


def _literal(kind: _Tok, text: bytes) -> Any:
    if kind is _Tok.INTEGER:
        value = int(text)
        # QEMU keeps int64 and uint64 exact and turns the rest to double.
        if -(1 << 63) <= value < (1 << 64):
            return value
        return float(value)
    if kind is _Tok.FLOAT:
        return float(text)
    return _string(text)


def _string(text: bytes) -> str:
    body = text[1:-1]
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\\", i)
        if j < 0:
            j = n
        if j > i:
            try:
                out.append(body[i:j].decode("utf-8"))
            except UnicodeDecodeError:
                raise _Fail("invalid UTF-8 sequence in string") from None
        if j == n:
            break
        esc = body[j + 1]
        if esc == ord("u"):
            i = _unicode_escape(body, j, out)
            continue
        out.append({ord("b"): "\b", ord("f"): "\f", ord("n"): "\n",
                    ord("r"): "\r", ord("t"): "\t"}.get(esc, chr(esc)))
        i = j + 2
    return "".join(out)


def _unicode_escape(body: bytes, j: int, out: list[str]) -> int:
    cp = int(body[j + 2:j + 6], 16)
    end = j + 6
    if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
        trail = int(body[end + 2:end + 6], 16)
        if 0xDC00 <= trail <= 0xDFFF:
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF)
            end += 6
        else:
            cp = -1
    if (cp < 0 or 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF
            or (cp & 0xFFFE) == 0xFFFE):
        seq = body[j:end].decode("ascii")
        raise _Fail(f"{seq} is not a valid Unicode character")
    out.append(chr(cp))
    return end


# -- messages ---------------------------------------------------------------

def version_info() -> dict[str, Any]:
    """``query-version``'s answer, also the greeting's ``version``."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f" (qiothread {qiothread.__version__})"}


def greeting() -> dict[str, Any]:
    """The server's first message.  No ``oob``: commands run in band."""
    return {"QMP": {"version": version_info(), "capabilities": []}}


def success_response(ret: Any, req_id: Any = None,
                     has_id: bool = False) -> dict[str, Any]:
    """``{"return": ret}`` with the request's ``id`` echoed."""
    rsp: dict[str, Any] = {"return": ret}
    if has_id:
        rsp["id"] = req_id
    return rsp


def error_response(desc: str,
                   error_class: ErrorClass | str = ErrorClass.GENERIC_ERROR,
                   req_id: Any = None, has_id: bool = False
                   ) -> dict[str, Any]:
    """``{"error": {"class", "desc"}}`` with the request's ``id``."""
    cls = (error_class.value if isinstance(error_class, ErrorClass)
           else error_class)
    rsp: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        rsp["id"] = req_id
    return rsp


def event_message(name: str, data: Any = None,
                  timestamp_ns: int | None = None) -> dict[str, Any]:
    """An event with QEMU's wall-clock ``{"seconds", "microseconds"}``."""
    ns = time.time_ns() if timestamp_ns is None else timestamp_ns
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = {"seconds": ns // 1_000_000_000,
                        "microseconds": ns // 1000 % 1_000_000}
    return msg


def encode(msg: dict[str, Any], pretty: bool = False) -> bytes:
    """One message and a newline; non-ASCII escaped as QEMU escapes it.

    ``pretty`` is ``-qmp-pretty``: indented over several lines.
    """
    text = json.dumps(msg, ensure_ascii=True, indent=4 if pretty else None)
    return text.encode("ascii") + b"\n"
