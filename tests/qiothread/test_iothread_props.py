"""``-object iothread`` properties: QEMU 7.2's validation, word for word.

Failures at creation never start a process; successes do (a real
iothread process), and the live ``qom-set`` checks read what the loop
applied back from the shared parameter block.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qiothread.errors import ConfigError
from qiothread.iothread import IOThread
from qiothread.keyval import parse_option
from qiothread.process import Supervisor
from qiothread.qom import ObjectRoot
from tests.qiothread.iothread_helpers import add, iothread_root, wait_until

RANGE = "value must be in range [0, 9223372036854775807]"
PROPS = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch",
         "thread-pool-min", "thread-pool-max")


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    with Supervisor() as s:
        yield s


@pytest.fixture
def root(sup: Supervisor) -> Iterator[ObjectRoot]:
    with iothread_root(sup) as r:
        yield r


def applied(io: IOThread) -> dict[str, int]:
    """The loop's state once it has applied the latest parameters."""
    wait_until(lambda: io.loop_state()["applied_seq"]
               == io.loop_state()["seq"])
    return io.loop_state()


def creation_error(root: ObjectRoot, sup: Supervisor, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        add(root, text)
    assert root.objects == {}
    assert sup.children == []       # no process was started
    return str(e.value)


@pytest.mark.parametrize("prop", PROPS)
def test_negative_value_on_the_command_line(
        root: ObjectRoot, sup: Supervisor, prop: str) -> None:
    msg = creation_error(root, sup, f"iothread,id=io0,{prop}=-1")
    assert msg == f"{prop} {RANGE}"


@pytest.mark.parametrize("value", ["abc", "1.5", "", "0x", "1k",
                                   "9223372036854775808"])
def test_non_integer_on_the_command_line(
        root: ObjectRoot, sup: Supervisor, value: str) -> None:
    msg = creation_error(root, sup, f"iothread,id=io0,poll-max-ns={value}")
    assert msg == "Parameter 'poll-max-ns' expects integer"


def test_non_integer_in_json_and_over_qmp(
        root: ObjectRoot, sup: Supervisor) -> None:
    msg = creation_error(root, sup, '{"qom-type": "iothread", "id": "io0",'
                         ' "poll-max-ns": "100"}')
    assert msg == ("Invalid parameter type for 'poll-max-ns', "
                   "expected: integer")
    with pytest.raises(ConfigError) as e:
        root.object_add_qmp("iothread", "io0", {"poll-grow": 2.0})
    assert str(e.value) == ("Invalid parameter type for 'poll-grow', "
                            "expected: integer")


@pytest.mark.parametrize(("text", "message"), [
    ("iothread,id=io0,foo=1", "Parameter 'foo' is unexpected"),
    ("iothread,poll-max-ns=1", "Parameter 'id' is missing"),
    # (poll-weight and poll-policy are qiothread's own: accepted.)
    ("iothread,id=io0,poll-period=3", "Parameter 'poll-period' is unexpected"),
    ("iothread,id=9a", "Parameter 'id' expects an identifier"),
    # The type check of every member comes before unknown keys ...
    ("iothread,id=io0,foo=1,poll-grow=x",
     "Parameter 'poll-grow' expects integer"),
    # ... and unknown keys before any setter's range check.
    ("iothread,id=io0,foo=1,poll-grow=-1", "Parameter 'foo' is unexpected"),
])
def test_keys_and_id(root: ObjectRoot, sup: Supervisor, text: str,
                     message: str) -> None:
    assert creation_error(root, sup, text) == message


@pytest.mark.parametrize("pool", [
    "thread-pool-min=100",                       # min > default max 64
    "thread-pool-max=0",
    "thread-pool-min=10,thread-pool-max=5",
    "thread-pool-max=5,thread-pool-min=10",
    "thread-pool-max=2147483648",                # > INT_MAX
    "thread-pool-min=2147483648,thread-pool-max=2147483648",
])
def test_bad_thread_pool_bounds_at_creation(
        root: ObjectRoot, sup: Supervisor, pool: str) -> None:
    msg = creation_error(root, sup, f"iothread,id=io0,{pool}")
    assert msg == "bad thread-pool-min/thread-pool-max values"


def test_defaults_qom_list_and_query_shape(root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0")
    assert root.qom_list("/objects/io0") == [
        {"name": "type", "type": "string"},
        {"name": "thread-pool-min", "type": "int"},
        {"name": "aio-max-batch", "type": "int"},
        {"name": "thread-pool-max", "type": "int"},
        {"name": "poll-max-ns", "type": "int"},
        {"name": "poll-grow", "type": "int"},
        {"name": "poll-shrink", "type": "int"},
    ]
    assert {p: root.qom_get("/objects/io0", p) for p in PROPS} == {
        "poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0,
        "aio-max-batch": 0, "thread-pool-min": 0, "thread-pool-max": 64}
    assert io.info() == {"id": "io0", "thread-id": io.thread_id,
                         "poll-max-ns": 32768, "poll-grow": 0,
                         "poll-shrink": 0, "aio-max-batch": 0}
    state = applied(io)
    assert (state["poll_max_ns"], state["thread_pool_max"]) == (32768, 64)


def test_help_lists_the_six_properties(root: ObjectRoot) -> None:
    assert root.help_text(parse_option("iothread,help", "qom-type")) == (
        "iothread options:\n"
        "  aio-max-batch=<int>\n"
        "  poll-grow=<int>\n"
        "  poll-max-ns=<int>\n"
        "  poll-shrink=<int>\n"
        "  thread-pool-max=<int>\n"
        "  thread-pool-min=<int>\n")


def test_qom_set_range_and_type_errors_store_nothing(
        root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0,poll-grow=2")
    seq = io.loop_state()["seq"]
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/io0", "poll-grow", -4)
    assert str(e.value) == f"poll-grow {RANGE}"
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/io0", "poll-grow", "4")
    assert str(e.value) == ("Invalid parameter type for 'poll-grow', "
                            "expected: integer")
    assert root.qom_get("/objects/io0", "poll-grow") == 2
    assert io.loop_state()["seq"] == seq   # nothing was published


def test_regression_rejected_thread_pool_value_stays_stored(
        root: ObjectRoot) -> None:
    """QEMU 7.2 quirk (reference §8.1): the refused value is kept, the
    poll and batch parameters are still re-applied (poll_ns reset), the
    pool keeps its previous bounds."""
    io = add(root, "iothread,id=io0")
    before = applied(io)
    with pytest.raises(ConfigError) as e:
        root.qom_set("/objects/io0", "thread-pool-min", 100)
    assert str(e.value) == "bad thread-pool-min/thread-pool-max values"
    assert root.qom_get("/objects/io0", "thread-pool-min") == 100
    after = applied(io)
    assert after["applied_seq"] > before["applied_seq"]
    assert after["params_applied_ns"] > before["params_applied_ns"]
    assert (after["thread_pool_min"], after["thread_pool_max"]) == (0, 64)

    # Raising the max makes the stored pair valid: both take effect.
    root.qom_set("/objects/io0", "thread-pool-max", 200)
    now = applied(io)
    assert (now["thread_pool_min"], now["thread_pool_max"]) == (100, 200)


def test_qom_set_reaches_the_loop(root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0")
    root.qom_set("/objects/io0", "poll-grow", 4)
    root.qom_set("/objects/io0", "poll-shrink", 2)
    root.qom_set("/objects/io0", "aio-max-batch", 16)
    state = applied(io)
    assert (state["poll_grow"], state["poll_shrink"],
            state["aio_max_batch"]) == (4, 2, 16)
    assert io.info()["poll-grow"] == 4
