"""Regressions found by using ``qiothread run`` as a QEMU and fio user
would: help, Ctrl-C at start, and mistakes that must end in one clear
line instead of a traceback (from the main process or a guest)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from qiothread.cli import USAGE
from qiothread.cli import main as cli_main


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small raw image written in full (no holes)."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xa5" * (4 << 20))
    return path


def machine_args(image: Path) -> list[str]:
    return ["-object", "iothread,id=io0",
            "-drive", f"if=none,id=d0,file={image},format=raw,aio=threads",
            "-device", "virtio-blk-pci,drive=d0,iothread=io0"]


def run_cli(args: list[str], capfd: pytest.CaptureFixture[str]
            ) -> tuple[int, str, str]:
    status = cli_main(["run", *args])
    out, err = capfd.readouterr()
    return status, out, err


def own_children() -> set[int]:
    """Live children of this process (a run must leave none)."""
    path = Path(f"/proc/{os.getpid()}/task")
    kids: set[int] = set()
    for task in path.iterdir():
        text = (task / "children").read_text().split()
        kids.update(int(p) for p in text)
    return kids


@pytest.mark.parametrize("word", ["--help", "-h", "-help"])
def test_regression_run_help_prints_usage(
        word: str, capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "qiothread: fio: unrecognized option '--help'", status 1.
    status, out, err = run_cli(["--rw=randread", word], capfd)
    assert status == 0
    assert out == USAGE
    assert err == ""


class _InterruptImport(importlib.abc.MetaPathFinder):
    """Raises KeyboardInterrupt when ``name`` is imported: Ctrl-C while
    the run's modules load."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_regression_ctrl_c_while_loading_exits_quietly(
        monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: a KeyboardInterrupt traceback from inside an import.
    monkeypatch.delitem(sys.modules, "qiothread.run", raising=False)
    monkeypatch.setattr(sys, "meta_path",
                        [_InterruptImport("qiothread.run"), *sys.meta_path])
    status, out, err = run_cli([], capfd)
    assert status == 130
    assert out == ""
    assert err == "qiothread: interrupted\n"


def test_regression_drive_without_device_is_one_line(
        image: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Was: a ConfigError traceback (the machine was made outside the
    # error handling).
    status, out, err = run_cli(
        ["-object", "iothread,id=io0",
         "-drive", f"if=none,id=d0,file={image},format=raw,aio=threads"],
        capfd)
    assert status == 1
    assert out == ""
    assert err == ("qiothread: no virtio-blk device to run the jobs on "
                   "(add -device virtio-blk-pci,drive=...)\n")


def test_regression_job_beyond_the_disk_fails_before_any_guest(
        image: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Was: the guest raised FioOptionError after the machine started:
    # a guest traceback, then an empty report.
    before = own_children()
    status, out, err = run_cli(
        [*machine_args(image), "--size=1M", "--offset=1G"], capfd)
    assert status == 1
    assert out == ""
    assert err == ("qiothread: job: offset 1073741824 + size 1048576 "
                   "goes beyond the disk (4194304 bytes)\n")
    assert own_children() <= before


def test_regression_missing_iolog_fails_before_any_guest(
        image: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.log"
    status, out, err = run_cli(
        [*machine_args(image), f"--read_iolog={missing}"], capfd)
    assert status == 1
    assert out == ""
    assert err == (f"qiothread: fio: open iolog '{missing}': No such "
                   "file or directory\n")
    assert "Traceback" not in err


def test_regression_iolog_beyond_the_disk_fails_before_any_guest(
        image: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "far.log"
    log.write_text("fio version 2 iolog\n/dev/x add\n/dev/x open\n"
                   f"/dev/x read {8 << 20} 4096\n/dev/x close\n")
    status, out, err = run_cli(
        [*machine_args(image), f"--read_iolog={log}"], capfd)
    assert status == 1
    assert out == ""
    assert err == ("qiothread: iolog reaches byte 8392704, beyond the "
                   "disk (4194304 bytes)\n")


def test_regression_empty_block_device_is_named(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # An unattached /dev/loopN opens with size 0; was a guest traceback
    # "size 0 leaves no room for one block".
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    status, out, err = run_cli(machine_args(empty), capfd)
    assert status == 1
    assert out == ""
    assert err == ("qiothread: job: the disk is empty (0 bytes); is the "
                   "block device attached?\n")


@pytest.mark.parametrize(("word", "message"), [
    ("-objekt", "-objekt: invalid option"),
    ("-smp", "-smp: not modelled by qiothread, which runs no VM: it "
             "takes -object iothread, -blockdev, -drive, -device "
             "virtio-blk-pci, -trace, -msg, -D, -qmp, -chardev and "
             "-mon"),
])
def test_regression_unknown_single_dash_option_is_qemus_error(
        word: str, message: str, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "fio: unrecognized option '-objekt'", and the option's
    # argument would have been read as a job file.
    status, out, err = run_cli([word, "iothread,id=io0",
                                *machine_args(image)], capfd)
    assert status == 1
    assert out == ""
    assert err == f"qiothread: {message}\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--output-format=jsn"],
     "fio: invalid output format jsn (normal, json and json+ are "
     "supported)"),
    (["--output"], "fio: option '--output' requires an argument"),
])
def test_regression_own_option_errors_in_fios_words(
        args: list[str], message: str, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli([*machine_args(image), *args], capfd)
    assert status == 1
    assert out == ""
    assert err == f"qiothread: {message}\n"


def test_regression_device_help_is_laid_out_as_qemus(
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "request-merging=<bool> (default: True)" (Python's repr),
    # "serial=<str> (default: )", unsorted, no descriptions.
    status, out, err = run_cli(["-device", "virtio-blk-pci,help"], capfd)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "virtio-blk-pci options:"
    props = [ln.split("=", 1)[0].strip() for ln in lines[1:]]
    assert props == sorted(props)
    for expected in (
            "  addr=<int32>           - Slot and optional function "
            "number, example: 06.0 or 06 (default: -1)",
            "  drive=<str>            - Node name or ID of a block device "
            "to use as a backend",
            "  iothread=<link<iothread>>",
            "  num-queues=<uint16>    -  (default: 65535)",
            "  queue-size=<uint16>    -  (default: 256)",
            "  request-merging=<bool> - on/off (default: true)",
            "  seg-max-adjust=<bool>  -  (default: true)",
            "  serial=<str>",
            "  share-rw=<bool>        -  (default: false)",
            "  write-cache=<OnOffAuto> - on/off/auto (default: \"auto\")"):
        assert expected in lines


@pytest.mark.parametrize("option", [
    ["-D", "{missing}"],
    ["-trace", "enable=poll_*,file={missing}"],
])
def test_regression_unwritable_log_file_is_qemus_error(
        option: list[str], image: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: a FileNotFoundError traceback from trace.configure.
    missing = tmp_path / "no-such-dir" / "trace.log"
    args = [a.format(missing=missing) for a in option]
    status, out, err = run_cli([*machine_args(image), *args], capfd)
    assert status == 1
    assert out == ""
    assert err == (f"qiothread: Error opening logfile {missing}: No such "
                   "file or directory\n")


def test_regression_query_block_names_qdev_and_format_as_qemu(
        image: Path) -> None:
    # Was: "qdev" the bare device id (QEMU gives the inner device's QOM
    # path, .../virtio-backend) and "drv": "file" for a -drive with
    # format=raw (QEMU's -drive always has the raw format node on top).
    from types import SimpleNamespace

    from qiothread.options import build_machine_config
    from qiothread.qemu_opts import split_argv
    from qiothread.vmm_qmp import MachineMonitor

    qemu, _ = split_argv([
        "-drive", f"if=none,id=d0,file={image},format=raw",
        "-device", "virtio-blk-pci,drive=d0",
        "-blockdev", f"driver=file,node-name=f1,filename={image}",
        "-device", "virtio-blk-pci,drive=f1,id=vd1",
        "-blockdev", f"driver=file,node-name=f2,filename={image}",
        "-blockdev", "driver=raw,node-name=r2,file=f2",
        "-device", "virtio-blk-pci,drive=r2,id=vd2"])
    cfg = build_machine_config(qemu, 3)
    machine = SimpleNamespace(config=cfg, shared=None, nodes={},
                              queues=[], engine_in_use=lambda name: "")
    monitor = MachineMonitor(machine)  # type: ignore[arg-type]
    got = [(b.device, b.qdev, b.node_name, b.driver)
           for b in monitor.query_block()]
    assert got == [
        ("d0", "/machine/peripheral-anon/device[0]/virtio-backend", "d0",
         "raw"),
        ("", "/machine/peripheral/vd1/virtio-backend", "f1", "file"),
        ("", "/machine/peripheral/vd2/virtio-backend", "r2", "raw")]
    assert [s.qdev for s in monitor.query_blockstats()] == \
        [q for _, q, _, _ in got]


def test_regression_binary_job_file_is_named(
        image: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Was: a UnicodeDecodeError traceback for "qiothread run disk.img"
    # (a disk image where a job file goes, as "qemu disk.img" takes it).
    image.write_bytes(b"\x80\xff" * 4096)
    status, out, err = run_cli([str(image)], capfd)
    assert status == 1
    assert out == ""
    assert err == (f"qiothread: fio: '{image}' is not a job file (not "
                   "text); give a disk image with --image=PATH or -drive "
                   "file=PATH,...\n")


def test_regression_binary_iolog_is_named(
        image: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "bin.log"
    log.write_bytes(b"\x80\xff" * 64)
    status, out, err = run_cli(
        [*machine_args(image), f"--read_iolog={log}"], capfd)
    assert status == 1
    assert out == ""
    assert err == f"qiothread: fio: '{log}' is not an iolog (not text)\n"


@pytest.mark.parametrize("blockdev", [
    '{{"driver":"raw","node-name":"r0","file":{{"driver":"file",'
    '"filename":"{image}","aio":"threads"}}}}',
    "driver=raw,node-name=r0,file.driver=file,file.filename={image},"
    "file.aio=threads",
])
def test_regression_nested_file_node_without_node_name(
        blockdev: str, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "Invalid node-name: '#block000'": the name made for the
    # nested node (as QEMU makes one) failed the user-name check.
    import json

    status, out, err = run_cli(
        ["-object", "iothread,id=io0",
         "-blockdev", blockdev.format(image=image),
         "-device", "virtio-blk-pci,drive=r0,iothread=io0",
         "--rw=read", "--size=64k", "--output-format=json"], capfd)
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["jobs"][0]["read"]["io_bytes"] == 64 << 10
    assert doc["qiothread"]["host"]["engines"] == {"#block000": "threads"}


@pytest.mark.parametrize(("prop", "message"), [
    ("min_io_size=4096", "property 'min_io_size' of "
     "virtio-blk-pci is not supported by qiothread"),
    ("scsi=off", "property 'scsi' of virtio-blk-pci is not supported by "
     "qiothread"),
    ("logical_blok_size=4096",
     "Property 'virtio-blk-pci.logical_blok_size' not found"),
])
def test_regression_qemu_device_property_not_modelled_is_named(
        prop: str, message: str, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "Property 'virtio-blk-pci.logical_block_size' not found" for
    # a property QEMU 7.2 has: it read as a typo.
    device = f"virtio-blk-pci,drive=d0,{prop}"
    status, out, err = run_cli(
        ["-drive", f"if=none,id=d0,file={image},format=raw",
         "-device", device], capfd)
    assert status == 1
    assert out == ""
    assert err == f"qiothread: -device {device}: {message}\n"


@pytest.mark.parametrize(("prop", "message"), [
    ("logical_block_size=4096",
     "logical_block_size > physical_block_size not supported"),
    ("logical_block_size=1000", "Property .logical_block_size doesn't "
     "take value '1000', it's not a power of 2"),
    ("id=v0,physical_block_size=256", "Property v0.physical_block_size "
     "doesn't take value 256 (minimum: 512, maximum: 2097152)"),
])
def test_regression_device_block_size_properties_checked_as_qemu(
        prop: str, message: str, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Was: refused as not supported; the device then took the host's
    # block size instead of its own (512 unless set).
    device = f"virtio-blk-pci,drive=d0,{prop}"
    status, out, err = run_cli(
        ["-drive", f"if=none,id=d0,file={image},format=raw",
         "-device", device], capfd)
    assert (status, out) == (1, "")
    assert err == f"qiothread: -device {device}: {message}\n"


@pytest.mark.parametrize(("bs", "errors"), [("4k", False), ("512", True)])
def test_regression_device_logical_block_size_reaches_the_device(
        bs: str, errors: bool, image: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # A 4096-byte device (on a 512-byte host) refuses 512-byte requests
    # in its range check, as QEMU's does: the property is the device's.
    import json

    status, out, err = run_cli(
        ["-object", "iothread,id=io0",
         "-drive", f"if=none,id=d0,file={image},format=raw,aio=threads",
         "-device", "virtio-blk-pci,drive=d0,iothread=io0,"
                    "logical_block_size=4096,physical_block_size=4096",
         "--rw=read", f"--bs={bs}", "--size=64k",
         "--output-format=json"], capfd)
    doc = json.loads(out)
    (job,) = doc["jobs"]
    if errors:
        # The first request fails with IOERR: fio's EIO, status 1.
        assert (status, job["error"]) == (1, 5)
        assert err == "qiothread: job 'job': I/O error: Input/output error\n"
    else:
        assert (status, err, job["error"]) == (0, "", 0)
        assert job["read"]["io_bytes"] == 64 << 10


@pytest.mark.parametrize("arg", ["help", "enable=help", "?"])
def test_regression_trace_help_lists_the_events(
        arg: str, capfd: pytest.CaptureFixture[str]) -> None:
    # Was: "warning: trace event 'help' does not exist", then a 5 s run.
    from qiothread import trace

    status, out, err = run_cli(["-trace", arg], capfd)
    assert (status, err) == (0, "")
    names = out.splitlines()
    assert names == [ev.name for ev in trace.all_events()]
    assert "poll_grow" in names and "virtqueue_pop" in names


def test_regression_short_form_booleans_warn_as_qemu(
        image: Path, tmp_path: Path) -> None:
    # Was: silently accepted; QEMU 7.2 warns for each one (old command
    # lines with "server,nowait" are everywhere).
    from qiothread.run import plan_run

    sock = tmp_path / "q.sock"
    qmp = f"unix:{sock},server,nowait"
    drive = f"if=none,id=d0,file={image},format=raw,readonly"
    plan = plan_run(["-drive", drive, "-device", "virtio-blk-pci,drive=d0",
                     "-qmp", qmp, "-msg", "timestamp"])
    assert plan.warnings == [
        f"-drive {drive}: warning: short-form boolean option 'readonly' "
        "deprecated\nPlease use readonly=on instead",
        f"-qmp {qmp}: warning: short-form boolean option 'server' "
        "deprecated\nPlease use server=on instead",
        f"-qmp {qmp}: warning: short-form boolean option 'nowait' "
        "deprecated\nPlease use wait=off instead",
        "-msg timestamp: warning: short-form boolean option 'timestamp' "
        "deprecated\nPlease use timestamp=on instead"]
    (monitor,) = plan.config.monitors
    assert (monitor.path, monitor.wait) == (str(sock), False)
    assert plan.config.trace.timestamps is True
