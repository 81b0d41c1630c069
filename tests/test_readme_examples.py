"""Every ``qiothread run`` example in README.md reads as a valid run.

The README's examples are what a new user types first; each must get
past the whole command line (QEMU options, fio options, job files) as
written.  The runs themselves are not started here (the end-to-end
tests cover running); ``$loop`` stands for the loop device the README
attaches, and the README's own ``printf`` makes its job file.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from qiothread.cli import main as cli_main
from qiothread.run import plan_run

README = Path(__file__).resolve().parent.parent / "README.md"


def sh_commands() -> list[str]:
    """The README's ``sh`` blocks, one command a line (continuations
    joined, comments dropped)."""
    text = README.read_text()
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        # A quoted JSON -device spans lines inside its quotes.
        joined = re.sub(r"(,)\n\s+(\")", r"\1\2", joined)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def run_examples() -> list[str]:
    return [c for c in sh_commands() if c.startswith("qiothread run")]


def test_readme_has_run_examples() -> None:
    assert len(run_examples()) >= 5


@pytest.mark.parametrize("command", run_examples())
def test_regression_readme_run_example_is_valid(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: examples naming /dev/loop0 and job.fio that the README never
    # made; now it makes both, and each example must plan as written.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "disk.img").write_bytes(b"\0" * (1 << 20))
    for line in sh_commands():
        if line.startswith("printf "):
            subprocess.run(line, shell=True, check=True, cwd=tmp_path)
    argv = shlex.split(command.replace("$loop", "/dev/loop0"))
    argv = [a for a in argv if a not in (">", "result.json")]
    assert argv[:2] == ["qiothread", "run"]
    if not any(a in ("-device", "-drive", "-blockdev") for a in argv):
        # The default drive, on a small image instead of the 256 MiB
        # one the first real run creates.
        argv.append("--image=disk.img")
    plan = plan_run(argv[2:])
    assert plan.jobs and plan.config.devices


def test_regression_readme_help_is_as_documented(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert "`qiothread run --help` lists the options." in \
        README.read_text().replace("\n", " ")
    assert cli_main(["run", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: qiothread run")
