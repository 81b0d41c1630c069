"""``-object iothread,poll-policy=...,poll-weight=...`` and QMP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qiothread.errors import ConfigError
from qiothread.iothread import IOThread
from qiothread.keyval import parse_option
from qiothread.policies import Policy100, PolicyWeighted
from qiothread.process import Supervisor
from qiothread.qom import ObjectRoot
from tests.qiothread.iothread_helpers import add, iothread_root, wait_until


@pytest.fixture
def root() -> Iterator[ObjectRoot]:
    with Supervisor() as sup, iothread_root(sup) as r:
        yield r


def test_policy_and_weight_on_the_command_line(root: ObjectRoot) -> None:
    io = add(root, "iothread,id=io0,poll-policy=weighted,poll-weight=2")
    assert io.ctx is not None
    policy = io.ctx.policy
    assert isinstance(policy, PolicyWeighted) and policy.shift == 2
    assert root.qom_get("/objects/io0", "poll-policy") == "weighted"
    assert root.qom_get("/objects/io0", "poll-weight") == 2
    io1 = add(root, "iothread,id=io1,poll-policy=10.0")
    assert io1.ctx is not None and isinstance(io1.ctx.policy, Policy100)
    io2 = add(root, "iothread,id=io2")
    assert io2.ctx is not None and io2.ctx.policy.name == "7.2"
    assert root.qom_get("/objects/io2", "poll-policy") == "7.2"


def test_qemu_72s_help_and_qom_list_are_unchanged(
        root: ObjectRoot) -> None:
    text = root.help_text(parse_option("iothread,help", "qom-type"))
    assert "poll-weight" not in text and "poll-policy" not in text
    add(root, "iothread,id=io0")
    names = [p["name"] for p in root.qom_list("/objects/io0")]
    assert "poll-weight" not in names and "poll-policy" not in names


@pytest.mark.parametrize(("text", "message"), [
    ("iothread,id=io0,poll-policy=9.0",
     "Parameter 'poll-policy' does not accept value '9.0'"),
    ("iothread,id=io0,poll-weight=63",
     "poll-weight value must be in range [0, 62]"),
    ("iothread,id=io0,poll-weight=-1",
     "poll-weight value must be in range [0, 9223372036854775807]"),
])
def test_bad_values_are_refused(root: ObjectRoot, text: str,
                                message: str) -> None:
    with pytest.raises(ConfigError) as e:
        add(root, text)
    assert str(e.value) == message
    assert root.objects == {}


def test_qmp_object_add_and_qom_set(root: ObjectRoot) -> None:
    io = root.object_add_qmp("iothread", "io0",
                             {"poll-policy": "weighted", "poll-weight": 1})
    assert isinstance(io, IOThread) and io.ctx is not None
    # poll-weight is live: the loop applies it with the other poll
    # parameters (and reports what it runs with).
    root.qom_set("/objects/io0", "poll-weight", 4)
    wait_until(lambda: io.loop_state()["applied_seq"]
               == io.loop_state()["seq"])
    assert io.loop_state()["poll_weight"] == 4
    # The policy is chosen once, when the context is built.
    with pytest.raises(ConfigError, match="only be set when the iothread"):
        root.qom_set("/objects/io0", "poll-policy", "8.0")
    assert root.qom_get("/objects/io0", "poll-policy") == "weighted"
    with pytest.raises(ConfigError,
                       match="Invalid parameter type for 'poll-policy'"):
        root.object_add_qmp("iothread", "io1", {"poll-policy": 10})


def test_a_run_uses_and_reports_the_policy(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "qiothread.cli", "run", "--runtime=300ms",
         "-object", "iothread,id=io0,poll-policy=weighted,poll-weight=2",
         "--output-format=json", f"--output={out}"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True,
        text=True, timeout=180, check=False)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["qiothread"]["qemu_policy"] == "weighted"
    assert doc["jobs"][0]["read"]["total_ios"] > 0
