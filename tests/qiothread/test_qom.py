"""The small QOM: object creation order, messages and qom-* shapes.

The generic behaviour is tested on a small object type of the test's
own (no process behind it); the IOThread's own properties are tested in
test_iothread_props.py.
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from qiothread.errors import ConfigError, QMPCommandError
from qiothread.keyval import parse_option
from qiothread.qom import Int64Property, ObjectRoot, UserCreatable


class Pair(UserCreatable):
    """An object whose two properties must keep ``lo <= hi``."""

    TYPE = "pair"
    PROPERTIES = (Int64Property("lo", 0), Int64Property("hi", 8))
    QOM_LIST_ORDER: ClassVar[tuple[str, ...]] = ("hi", "lo")

    def __init__(self, object_id: str) -> None:
        super().__init__(object_id)
        self.updates: list[str] = []
        self.finalized = False

    def property_updated(self, name: str) -> None:
        self.updates.append(name)
        if self.completed:
            self._check()

    def complete(self) -> None:
        self._check()
        super().complete()

    def _check(self) -> None:
        if self.get("lo") > self.get("hi"):
            raise ConfigError("bad lo/hi values")

    def finalize(self) -> None:
        self.finalized = True


@pytest.fixture
def root() -> ObjectRoot:
    return ObjectRoot({"pair": Pair})


def add(root: ObjectRoot, text: str) -> UserCreatable:
    return root.object_add(parse_option(text, "qom-type"))


def test_create_with_defaults_and_values(root: ObjectRoot) -> None:
    p = add(root, "pair,id=p0,hi=0x10")
    assert isinstance(p, Pair)
    assert (p.get("lo"), p.get("hi")) == (0, 16)
    assert p.completed
    assert root.objects == {"p0": p}


@pytest.mark.parametrize(("text", "message"), [
    ("pair", "Parameter 'id' is missing"),
    ("id=x", "Parameter 'qom-type' is missing"),
    ("nosuch,id=x", "Parameter 'qom-type' does not accept value 'nosuch'"),
    ("pair,id=x,lo=abc", "Parameter 'lo' expects integer"),
    ("pair,id=x,foo=1", "Parameter 'foo' is unexpected"),
    ("pair,id=x,lo=-1", "lo value must be in range [0, 9223372036854775807]"),
    ("pair,id=1x", "Parameter 'id' expects an identifier"),
    ("pair,id=x,lo=9", "bad lo/hi values"),
    ('{"qom-type": "pair", "id": "x", "lo": "1"}',
     "Invalid parameter type for 'lo', expected: integer"),
    ('{"qom-type": "pair", "id": 5}',
     "Invalid parameter type for 'id', expected: string"),
])
def test_creation_errors(root: ObjectRoot, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        add(root, text)
    assert str(e.value) == message
    assert root.objects == {}


def test_types_are_checked_before_unexpected_keys_and_ranges(
        root: ObjectRoot) -> None:
    # The QAPI visit (types, then unknown keys) precedes every setter.
    with pytest.raises(ConfigError) as e:
        add(root, "pair,id=x,foo=1,lo=-1,hi=zz")
    assert str(e.value) == "Parameter 'hi' expects integer"
    with pytest.raises(ConfigError) as e:
        add(root, "pair,id=x,foo=1,lo=-1")
    assert str(e.value) == "Parameter 'foo' is unexpected"


def test_duplicate_id(root: ObjectRoot) -> None:
    add(root, "pair,id=p0")
    with pytest.raises(ConfigError) as e:
        add(root, "pair,id=p0")
    assert str(e.value) == ("attempt to add duplicate property 'p0' to "
                            "object (type 'container')")


def test_help_texts(root: ObjectRoot) -> None:
    assert root.help_text(parse_option("help", "qom-type")) == (
        "List of user creatable objects:\n  pair\n")
    assert root.help_text(parse_option("nosuch,help", "qom-type")) == (
        "List of user creatable objects:\n  pair\n")
    assert root.help_text(parse_option("pair,help", "qom-type")) == (
        "pair options:\n  hi=<int>\n  lo=<int>\n")


def test_qom_list_get_set_shapes(root: ObjectRoot) -> None:
    add(root, "pair,id=p0")
    assert root.qom_list("/objects/p0") == [
        {"name": "type", "type": "string"},
        {"name": "hi", "type": "int"},
        {"name": "lo", "type": "int"},
    ]
    assert root.qom_list("/objects") == [
        {"name": "type", "type": "string"},
        {"name": "p0", "type": "child<pair>"},
    ]
    assert root.qom_get("/objects/p0", "type") == "pair"
    root.qom_set("/objects/p0", "hi", 100)
    assert root.qom_get("/objects/p0", "hi") == 100
    assert root.qom_get("p0", "hi") == 100  # partial path


def test_qom_set_rejected_value_stays_stored(root: ObjectRoot) -> None:
    p = add(root, "pair,id=p0")
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/p0", "lo", 100)
    assert str(e.value) == "bad lo/hi values"
    assert root.qom_get("/objects/p0", "lo") == 100
    # A range error, by contrast, stores nothing.
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/p0", "lo", -3)
    assert str(e.value) == \
        "lo value must be in range [0, 9223372036854775807]"
    assert p.get("lo") == 100


@pytest.mark.parametrize(("value", "message"), [
    ("12", "Invalid parameter type for 'lo', expected: integer"),
    (1.0, "Invalid parameter type for 'lo', expected: integer"),
    (True, "Invalid parameter type for 'lo', expected: integer"),
    (2**63, "Invalid parameter type for 'lo', expected: integer"),
])
def test_qom_set_json_types(root: ObjectRoot, value: object,
                            message: str) -> None:
    add(root, "pair,id=p0")
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/p0", "lo", value)
    assert str(e.value) == message


def test_qom_errors(root: ObjectRoot) -> None:
    add(root, "pair,id=p0")
    with pytest.raises(QMPCommandError) as q:
        root.qom_get("/objects/nosuch", "lo")
    assert str(q.value) == "Device '/objects/nosuch' not found"
    assert q.value.error_class == "DeviceNotFound"
    with pytest.raises(QMPCommandError) as q:
        root.qom_list("/machine/foo")
    assert q.value.error_class == "DeviceNotFound"
    with pytest.raises(ConfigError) as e:
        root.qom_get("/objects/p0", "foo")
    assert str(e.value) == "Property 'pair.foo' not found"
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/p0", "type", "x")
    assert str(e.value) == \
        "Insufficient permission to perform this operation"


def test_object_add_qmp_and_del(root: ObjectRoot) -> None:
    p = root.object_add_qmp("pair", "p1", {"hi": 3})
    assert isinstance(p, Pair)
    assert p.get("hi") == 3
    with pytest.raises(ConfigError) as e:
        root.object_add_qmp("pair", "p2", {"hi": "3"})
    assert str(e.value) == \
        "Invalid parameter type for 'hi', expected: integer"
    root.object_del("p1")
    assert p.finalized
    with pytest.raises(QMPCommandError) as q:
        root.object_del("p1")
    assert str(q.value) == "object 'p1' not found"


def test_close_finalizes_newest_first(root: ObjectRoot) -> None:
    order: list[str] = []
    a, b = add(root, "pair,id=a"), add(root, "pair,id=b")
    for obj in (a, b):
        obj.finalize = (lambda o=obj: order.append(o.id))  # type: ignore
    root.close()
    assert order == ["b", "a"]
    assert root.objects == {}


def test_failed_completion_finalizes_the_object() -> None:
    made: list[Pair] = []

    class Recorded(Pair):
        @classmethod
        def new(cls, object_id: str, root: ObjectRoot) -> UserCreatable:
            obj = cls(object_id)
            made.append(obj)
            return obj

    root = ObjectRoot({"pair": Recorded})
    with pytest.raises(ConfigError):
        add(root, "pair,id=x,lo=9")
    assert [o.finalized for o in made] == [True]
    assert root.objects == {}
