"""The JSON streamer and message shapes, against QEMU 7.2's texts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qiothread.qmp.protocol import (
    MAX_NESTING,
    JSONStreamer,
    ParseError,
    encode,
    error_response,
    event_message,
    greeting,
)


def feed(data: bytes, *, bytewise: bool = False,
         max_size: int = 1 << 20) -> list[Any]:
    s = JSONStreamer(max_size)
    if not bytewise:
        return list(s.feed(data))
    out: list[Any] = []
    for i in range(len(data)):
        out += s.feed(data[i:i + 1])
    return out


def err(desc: str) -> ParseError:
    return ParseError(f"JSON parse error, {desc}")


@pytest.mark.parametrize("bytewise", [False, True])
def test_values_split_anywhere(bytewise: bool) -> None:
    data = (b'{"execute": "qom-set", "arguments": {"path": "/objects/io0",'
            b'\n "property": "poll-max-ns", "value": 65536}, "id": [1,'
            b' 2.5, -3, true, false, null]}\n')
    assert feed(data, bytewise=bytewise) == [{
        "execute": "qom-set",
        "arguments": {"path": "/objects/io0", "property": "poll-max-ns",
                      "value": 65536},
        "id": [1, 2.5, -3, True, False, None]}]


def test_single_quoted_strings_and_escapes() -> None:
    assert feed(b"{'a': 'it\\'s \"x\"', \"b\": \"\\u00e9\\ud83d\\ude00\"}") \
        == [{"a": "it's \"x\"", "b": "\u00e9\U0001F600"}]


def test_integers_keep_64_bits_then_become_double() -> None:
    big = 1 << 64
    assert feed(b"[9223372036854775807, 18446744073709551615, %d]"
                % big) == [[(1 << 63) - 1, (1 << 64) - 1, float(big)]]


@pytest.mark.parametrize(("data", "desc"), [
    (b'{"execute": }', "expecting value"),
    (b'{"execute" "x"}', "missing : in object pair"),
    (b'{1: 2}', "key is not a string in object"),
    (b'{"a": 1 "b": 2}', "expected separator in dict"),
    (b'[1 2]', "expected separator in list"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": nul}', "invalid keyword 'nul'"),
    (b'}', "expecting value"),
    (b'{"a": "\\ud800"}', "\\ud800 is not a valid Unicode character"),
    (b'{"a": "\xc3\x28"}', "invalid UTF-8 sequence in string"),
])
def test_syntax_errors_have_qemus_text(data: bytes, desc: str) -> None:
    assert feed(data) == [err(desc)]


def test_stray_byte_then_recovery_at_next_brace() -> None:
    # 0xFF is impossible in UTF-8; QEMU reports it and resynchronises.
    assert feed(b'\xff{"execute": "x"}') == [
        err("stray '\ufffd'"), {"execute": "x"}]
    assert feed(b'@@ junk {"a": 1}') == [err("stray '@'"), {"a": 1}]


def test_newline_inside_string_costs_one_line() -> None:
    out = feed(b'{"a": "li\nne"}\n{"ok": 1}\n')
    assert out[0] == err("stray '\"li\n'")
    assert out[-1] == {"ok": 1}


def test_partial_value_waits_for_more_input() -> None:
    s = JSONStreamer()
    assert list(s.feed(b'{"execute":\n')) == []
    assert list(s.feed(b'"quit"}')) == [{"execute": "quit"}]


def test_size_limit_is_fatal() -> None:
    out = feed(b'{"a": "' + b"x" * 2000 + b'"}', max_size=1000)
    assert out == [ParseError("JSON token size limit exceeded",
                              fatal=True)]
    out = feed(b"[" + b"1," * 600, max_size=1000)
    assert out[-1].fatal


def test_nesting_limit() -> None:
    out = feed(b"[" * (MAX_NESTING + 1))
    assert out == [ParseError("JSON nesting depth limit exceeded")]


def test_message_shapes() -> None:
    g = greeting()["QMP"]
    assert g["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert g["version"]["package"].startswith(" (qiothread ")
    assert g["capabilities"] == []
    assert error_response("x", req_id=7, has_id=True) == {
        "error": {"class": "GenericError", "desc": "x"}, "id": 7}
    ev = event_message("SHUTDOWN", {"guest": False},
                       timestamp_ns=1_700_000_123_456_789_012)
    assert ev["timestamp"] == {"seconds": 1_700_000_123,
                               "microseconds": 456_789}
    assert encode({"a": "\u00e9"}) == b'{"a": "\\u00e9"}\n'


def test_regression_trailing_comma_reports_expecting_value() -> None:
    # QEMU keeps the first error: parse_value's "expecting value" for
    # the '}' where a key should be, not "key is not a string".
    assert feed(b'{"execute": "quit",}') == [err("expecting value")]


def test_regression_nothing_after_fatal_error() -> None:
    # The connection is dropped after a fatal error; the streamer must
    # not go on to report the rest of the oversized value.
    s = JSONStreamer(100)
    out = list(s.feed(b'{"a": "' + b"x" * 200 + b'"} {"b": 1}'))
    assert out == [ParseError("JSON token size limit exceeded",
                              fatal=True)]
    assert s.dead
    assert list(s.feed(b'{"c": 2}')) == []


# -- properties ---------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=5),
       st.lists(st.integers(min_value=1, max_value=64), max_size=10))
def test_any_json_object_parses_back_however_split(
        obj: dict[str, Any], cuts: list[int]) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode() + b"\n"
    s = JSONStreamer()
    out: list[Any] = []
    pos = 0
    for cut in cuts:
        out += s.feed(data[pos:pos + cut])
        pos += cut
    out += s.feed(data[pos:])
    assert out == [obj]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_never_raises_and_stream_recovers(junk: bytes) -> None:
    s = JSONStreamer(4096)
    for item in s.feed(junk):
        assert not isinstance(item, ParseError) or item.desc.startswith(
            ("JSON parse error, ", "JSON nesting", "JSON token"))
    if s.dead:
        return
    # A newline, a stray '}' closes anything left open; then a valid
    # command is understood again.
    out = list(s.feed(b"\n" + b"]}" * 1100 + b'\n{"execute": "x"}\n'))
    assert out[-1] == {"execute": "x"}
