"""QEMU's KEY=VALUE,... syntax and the two input visitors' messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qiothread.errors import ConfigError
from qiothread.keyval import (
    InputVisitor,
    keyval_parse,
    parse_option,
    qemu_strtoi64,
)


def test_implied_key_and_plain_items() -> None:
    tree, want_help = keyval_parse(
        "iothread,id=io0,poll-max-ns=100", "qom-type")
    assert tree == {"qom-type": "iothread", "id": "io0",
                    "poll-max-ns": "100"}
    assert want_help is False


def test_double_comma_escapes_a_comma_and_trailing_comma_is_ok() -> None:
    tree, _ = keyval_parse("filename=a,,b,,,node-name=n,")
    assert tree == {"filename": "a,b,", "node-name": "n"}


def test_last_item_wins_and_empty_value_is_allowed() -> None:
    tree, _ = keyval_parse("a=1,b=,a=2")
    assert tree == {"a": "2", "b": ""}


def test_dotted_keys_nest_and_digits_make_lists() -> None:
    tree, _ = keyval_parse(
        "cache.direct=on,cache.no-flush=off,vqs.1=b,vqs.0=a")
    assert tree == {"cache": {"direct": "on", "no-flush": "off"},
                    "vqs": ["a", "b"]}


@pytest.mark.parametrize("text", ["help", "?", "iothread,help",
                                  "iothread,id=x,?"])
def test_help_is_recognised(text: str) -> None:
    _, want_help = keyval_parse(text, "qom-type")
    assert want_help is True


def test_help_only_when_exact() -> None:
    tree, want_help = keyval_parse("helpme,help=1", "qom-type")
    assert tree == {"qom-type": "helpme", "help": "1"}
    assert want_help is False


def test_help_refused_where_not_offered() -> None:
    with pytest.raises(ConfigError) as e:
        keyval_parse("a=1,help", help_allowed=False)
    assert str(e.value) == "Help is not available for this option"


@pytest.mark.parametrize(("text", "implied", "message"), [
    ("iothread", None, "Expected '=' after parameter 'iothread'"),
    ("iothread,id", "qom-type", "Expected '=' after parameter 'id'"),
    (",id=x", "qom-type", "Invalid parameter ''"),
    ("a b=1", None, "Invalid parameter 'a b'"),
    ("1a=1", None, "Invalid parameter '1a'"),
    ("a.0b=1", None, "Invalid parameter 'a.0b'"),
    ("a..b=1", None, "Invalid parameter 'a..b'"),
    ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
    ("a=2,a.b=1", None, "Parameters 'a.*' used inconsistently"),
    ("a.0=x,a.b=y", None, "Parameters 'a.*' used inconsistently"),
    ("a.1=x", None, "Parameter 'a.0' missing"),
    ("x" * 128 + "=1", None, f"Parameter '{'x' * 128}' is too long"),
    ("a." + "x" * 128 + "=1", None,
     f"Parameter fragment '{'x' * 128}' is too long"),
])
def test_syntax_errors_have_qemus_messages(
        text: str, implied: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        keyval_parse(text, implied)
    assert str(e.value) == message


def test_implied_value_stops_at_equals_sign_rule() -> None:
    # "a=b" at the front is a key, not an implied value.
    tree, _ = keyval_parse("id=x", "qom-type")
    assert tree == {"id": "x"}


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("100", 100), ("-5", -5), ("+7", 7), ("0x10", 16),
    ("0X1f", 31), ("010", 8), ("  12", 12), ("-0x8000000000000000", -2**63),
    ("9223372036854775807", 2**63 - 1),
])
def test_strtoi64_accepts_what_strtoll_base0_does(
        text: str, value: int) -> None:
    assert qemu_strtoi64(text) == value


@pytest.mark.parametrize("text", [
    "", "abc", "1.5", "12 ", "08", "0x", "1e3", "9223372036854775808",
    "--1", "- 1"])
def test_strtoi64_rejects(text: str) -> None:
    assert qemu_strtoi64(text) is None


@given(st.integers(-2**63, 2**63 - 1))
def test_strtoi64_round_trips_decimal_and_hex(n: int) -> None:
    assert qemu_strtoi64(str(n)) == n
    sign = "-" if n < 0 else ""
    assert qemu_strtoi64(f"{sign}0x{abs(n):x}") == n


@given(st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    max_size=5))
def test_escaping_round_trips(d: dict[str, str]) -> None:
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in d.items())
    tree, _ = keyval_parse(text)
    assert tree == d


def test_json_form() -> None:
    opt = parse_option('{"qom-type": "iothread", "id": "io0", '
                       '"poll-max-ns": 100}', "qom-type")
    assert opt.keyval is False
    assert opt.data == {"qom-type": "iothread", "id": "io0",
                        "poll-max-ns": 100}


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": 1, "a": 2}', "JSON parse error, duplicate key 'a'"),
    ('{"a": NaN}', "JSON parse error, invalid keyword 'NaN'"),
    ('{"a": }', "JSON parse error, Expecting value"),
])
def test_json_form_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_option(text)
    assert str(e.value) == message


def test_visitor_messages_differ_between_keyval_and_json() -> None:
    kv = InputVisitor({"poll-max-ns": "abc"}, keyval=True)
    with pytest.raises(ConfigError) as e:
        kv.type_int64("poll-max-ns")
    assert str(e.value) == "Parameter 'poll-max-ns' expects integer"

    js = InputVisitor({"poll-max-ns": "abc"}, keyval=False)
    with pytest.raises(ConfigError) as e:
        js.type_int64("poll-max-ns")
    assert str(e.value) == ("Invalid parameter type for 'poll-max-ns', "
                            "expected: integer")


@pytest.mark.parametrize("value", [True, 1.0, 2**63, "1"])
def test_json_int64_wants_a_json_integer_in_range(value: object) -> None:
    v = InputVisitor({"n": value}, keyval=False)
    with pytest.raises(ConfigError) as e:
        v.type_int64("n")
    assert str(e.value) == "Invalid parameter type for 'n', expected: integer"


def test_visitor_bool_nested_missing_and_unexpected() -> None:
    opt = parse_option("driver=file,cache.direct=on,cache.no-flush=n,x=1")
    v = opt.visitor()
    assert v.type_str("driver", required=True) == "file"
    cache = v.start_struct("cache")
    assert cache is not None
    assert cache.type_bool("direct") is True
    assert cache.type_bool("no-flush") is False
    cache.check_struct()
    assert v.type_str("node-name") is None
    with pytest.raises(ConfigError) as e:
        v.type_str("filename", required=True)
    assert str(e.value) == "Parameter 'filename' is missing"
    with pytest.raises(ConfigError) as e:
        v.check_struct()
    assert str(e.value) == "Parameter 'x' is unexpected"


def test_visitor_nested_names_in_messages() -> None:
    v = parse_option("cache.direct=maybe,cache.bogus=1").visitor()
    cache = v.start_struct("cache")
    assert cache is not None
    with pytest.raises(ConfigError) as e:
        cache.type_bool("direct")
    assert str(e.value) == "Parameter 'cache.direct' expects 'on' or 'off'"
    with pytest.raises(ConfigError) as e:
        cache.check_struct()
    assert str(e.value) == "Parameter 'cache.bogus' is unexpected"


def test_visitor_struct_where_scalar_expected() -> None:
    v = parse_option("cache.direct=on").visitor()
    with pytest.raises(ConfigError) as e:
        v.type_int64("cache")
    # qobject_input_get_keyval's message for an object or list.
    assert str(e.value) == "Parameters 'cache.*' are unexpected"
    w = parse_option("cache=on").visitor()
    with pytest.raises(ConfigError) as e:
        w.start_struct("cache")
    assert str(e.value) == "Invalid parameter type for 'cache', " \
        "expected: object"
