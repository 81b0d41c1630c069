"""The QEMU command line of ``qiothread run``: meaning and QEMU's errors.

Each error case compares the exact message QEMU 7.2 (9.0 for
``iothread-vq-mapping``) prints after the option, so that a user who
pastes a QEMU command line gets the words they know.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qiothread.options import (
    HelpRequested,
    OptionError,
    build_machine_config,
)
from qiothread.qemu_opts import qemu_opts_parse, split_argv
from qiothread.vmconfig import MachineConfig

DRIVE = ["-drive", "if=none,id=d0,file=/tmp/none.img,format=raw"]
IO0 = ["-object", "iothread,id=io0"]
IO1 = ["-object", "iothread,id=io1"]


def build(argv: list[str], vcpus: int = 1) -> MachineConfig:
    qemu, rest = split_argv(argv)
    assert rest == []
    return build_machine_config(qemu, vcpus)


def error_of(argv: list[str], vcpus: int = 1) -> OptionError:
    with pytest.raises(OptionError) as info:
        build(argv, vcpus)
    return info.value


def test_split_argv_keeps_fio_options_and_job_files_apart() -> None:
    qemu, rest = split_argv(["--rw=randread", "-object", "iothread,id=a",
                             "--device", "virtio-blk-pci", "job.fio",
                             "--bs=4k"])
    assert qemu == [("object", "iothread,id=a"),
                    ("device", "virtio-blk-pci")]
    assert rest == ["--rw=randread", "job.fio", "--bs=4k"]


def test_split_argv_option_without_argument() -> None:
    with pytest.raises(OptionError) as info:
        split_argv(["-device"])
    assert str(info.value) == "-device: requires an argument"


def test_qemu_opts_syntax() -> None:
    opts = qemu_opts_parse("device", "virtio-blk-pci,serial=a,,b,"
                           "request-merging,noevent_idx,serial=c,,d",
                           implied="driver")
    assert opts == {"driver": "virtio-blk-pci", "serial": "c,d",
                    "request-merging": "on", "event_idx": "off"}


def test_full_command_line_resolves() -> None:
    cfg = build([
        *IO0, "-object", "iothread,id=io1,poll-max-ns=0,poll-grow=4",
        "-blockdev", "driver=file,node-name=f0,filename=/tmp/a.img,"
                     "aio=native,cache.direct=on",
        "-blockdev", "driver=raw,node-name=disk0,file=f0",
        "-device", "virtio-blk-pci,id=vblk0,drive=disk0,iothread=io0,"
                   "num-queues=2,queue-size=128,serial=abc,"
                   "request-merging=off,event_idx=off",
        "-drive", "if=none,id=drive1,file=/tmp/b.img,format=raw,"
                  "cache=none,aio=native",
        "-device", json.dumps({
            "driver": "virtio-blk-pci", "id": "vblk1", "drive": "drive1",
            "num-queues": 4, "iothread-vq-mapping": [
                {"iothread": "io0"}, {"iothread": "io1"}]}),
    ])
    assert [t.id for t in cfg.iothreads] == ["io0", "io1"]
    assert cfg.iothreads[0].props["poll-max-ns"] == 32768
    assert cfg.iothreads[1].props["poll-max-ns"] == 0
    assert cfg.iothreads[1].props["poll-grow"] == 4
    f0 = cfg.node("disk0")
    assert f0 is not None and f0.name == "f0"
    assert f0.options == {"driver": "file", "node-name": "f0",
                          "filename": "/tmp/a.img", "aio": "native",
                          "cache.direct": True}
    d0, d1 = cfg.devices
    assert (d0.id, d0.num_queues, d0.queue_size, d0.serial) == \
        ("vblk0", 2, 128, "abc")
    assert d0.queue_iothreads == ["io0", "io0"]
    assert not d0.request_merging and not d0.event_idx
    # 9.0 round-robin: entry k gets queues k, k + K, ...
    assert d1.queue_iothreads == ["io0", "io1", "io0", "io1"]
    drive1 = cfg.node("drive1")
    assert drive1 is not None
    assert drive1.options["cache.direct"] is True
    assert drive1.options["aio"] == "native"


@pytest.mark.parametrize(("mode", "direct", "no_flush", "wt"), [
    ("writeback", False, False, False),
    ("none", True, False, False),
    ("off", True, False, False),
    ("writethrough", False, False, True),
    ("directsync", True, False, True),
    ("unsafe", False, True, False),
])
def test_drive_cache_modes_map_as_qemu(mode: str, direct: bool,
                                       no_flush: bool, wt: bool) -> None:
    cfg = build(["-drive", f"if=none,id=d,file=/tmp/x,format=raw,"
                           f"cache={mode}"])
    node = cfg.nodes[0]
    assert node.options["cache.direct"] is direct
    assert node.options["cache.no-flush"] is no_flush
    assert node.writethrough is wt


def test_drive_explicit_cache_key_wins_over_mode() -> None:
    cfg = build(["-drive", "if=none,id=d,file=/tmp/x,format=raw,"
                           "cache=none,cache.direct=off"])
    assert cfg.nodes[0].options["cache.direct"] is False


def test_drive_on_block_device_is_host_device(tmp_path: Path) -> None:
    cfg = build(["-drive", "if=none,id=d,file=/dev/null,format=raw"])
    # /dev/null is a character device: still the file driver
    assert cfg.nodes[0].options["driver"] == "file"
    loops = sorted(Path("/dev").glob("loop[0-9]*"))
    if not loops:
        pytest.skip("no /dev/loopN on this machine")
    cfg = build(["-drive", f"if=none,id=d,file={loops[0]},format=raw"])
    assert cfg.nodes[0].options["driver"] == "host_device"


def test_drive_without_format_warns_as_qemu() -> None:
    cfg = build(["-drive", "if=none,id=d,file=/tmp/x"])
    assert cfg.warnings == [
        "-drive if=none,id=d,file=/tmp/x: warning: Image format was not "
        "specified for '/tmp/x' and probing guessed raw."]


def test_num_queues_auto_is_the_vcpu_count() -> None:
    cfg = build([*DRIVE, *IO0, "-device",
                 "virtio-blk-pci,drive=d0,iothread=io0"], vcpus=3)
    assert cfg.devices[0].num_queues == 3
    assert cfg.devices[0].queue_iothreads == ["io0"] * 3


def test_explicit_vq_mapping() -> None:
    cfg = build([*DRIVE, *IO0, *IO1, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "num-queues": 3,
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [2]},
                                {"iothread": "io1", "vqs": [0, 1]}]})])
    assert cfg.devices[0].queue_iothreads == ["io1", "io1", "io0"]


def test_device_without_iothread_runs_in_main_loop() -> None:
    cfg = build([*DRIVE, "-device", "virtio-blk-pci,drive=d0"])
    assert cfg.devices[0].queue_iothreads == [None]


def test_drive_if_virtio_creates_its_device() -> None:
    cfg = build(["-drive", "file=/tmp/x,format=raw,if=virtio",
                 "-drive", "file=/tmp/y,format=raw,if=virtio,id=second"],
                vcpus=2)
    assert [n.drive_id for n in cfg.nodes] == ["virtio0", "second"]
    assert [d.drive for d in cfg.devices] == ["virtio0", "second"]
    assert cfg.devices[0].queue_iothreads == [None, None]


def test_trace_msg_and_log_file(tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.write_text("# comment\npoll_grow\n\nrun_poll_handlers_*\n")
    cfg = build(["-trace", "enable=poll_shrink,file=/tmp/t.log",
                 "-trace", f"events={events}", "-trace", "nosuch_event",
                 "-msg", "timestamp=on"])
    assert cfg.trace.patterns == ["poll_shrink", "poll_grow",
                                  "run_poll_handlers_*", "nosuch_event"]
    assert cfg.trace.file == "/tmp/t.log"
    assert cfg.trace.timestamps
    assert cfg.warnings == [
        "-trace nosuch_event: warning: trace event 'nosuch_event' "
        "does not exist"]


def test_monitors_from_qmp_and_chardev_mon() -> None:
    cfg = build(["-qmp", "unix:/tmp/a.sock,server=on,wait=off",
                 "-chardev", "socket,id=c0,path=/tmp/b.sock,server=on,"
                             "wait=off",
                 "-mon", "chardev=c0,mode=control,pretty=on"])
    assert [(m.path, m.wait, m.pretty) for m in cfg.monitors] == [
        ("/tmp/a.sock", False, False), ("/tmp/b.sock", False, True)]
    cfg = build(["-qmp", "unix:/tmp/a.sock,server,nowait"])
    assert not cfg.monitors[0].wait


def test_help_requests() -> None:
    with pytest.raises(HelpRequested) as info:
        build(["-object", "iothread,help"])
    assert "poll-max-ns=<int>" in info.value.text
    with pytest.raises(HelpRequested) as info:
        build(["-device", "help"])
    assert "virtio-blk-pci" in info.value.text


# Every message below is QEMU's, after the option as QEMU prints it.
ERRORS: list[tuple[list[str], str]] = [
    # -object iothread (reference §8.1)
    (["-object", "iothread"], "Parameter 'id' is missing"),
    (["-object", "iothread,id=io0,poll-max-ns=-1"],
     "poll-max-ns value must be in range [0, 9223372036854775807]"),
    (["-object", "iothread,id=io0,poll-grow=x"],
     "Parameter 'poll-grow' expects integer"),
    (["-object", "iothread,id=io0,foo=1"], "Parameter 'foo' is unexpected"),
    (["-object", "iothread,id=io0,thread-pool-min=9,thread-pool-max=2"],
     "bad thread-pool-min/thread-pool-max values"),
    (["-object", "iothread,id=io0,thread-pool-max=0"],
     "bad thread-pool-min/thread-pool-max values"),
    (["-object", "iothread,id=0io"],
     "Parameter 'id' expects an identifier"),
    (["-object", "bogus,id=x"],
     "Parameter 'qom-type' does not accept value 'bogus'"),
    ([*IO0, *IO0], "attempt to add duplicate property 'io0' to object "
     "(type 'container')"),
    (["-object", '{"qom-type":"iothread","id":"io0","poll-max-ns":"1"}'],
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    # -blockdev
    (["-blockdev", "driver=file,filename=/x"],
     "'node-name' must be specified for the root node"),
    (["-blockdev", "driver=file,node-name=f0"],
     "Parameter 'filename' is missing"),
    (["-blockdev", "driver=file,node-name=f0,filename=/x,aio=bogus"],
     "Parameter 'aio' does not accept value 'bogus'"),
    (["-blockdev", "driver=bogus,node-name=f0"],
     "Parameter 'driver' does not accept value 'bogus'"),
    (["-blockdev", "driver=file,node-name=f0,filename=/x,cache.direct=2"],
     "Parameter 'cache.direct' expects 'on' or 'off'"),
    (["-blockdev", "driver=file,node-name=f0,filename=/x,bogus=1"],
     "Parameter 'bogus' is unexpected"),
    (["-blockdev", "driver=raw,node-name=d0,file=nosuch"],
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    (["-blockdev", "driver=file,node-name=f0,filename=/x",
      "-blockdev", "driver=file,node-name=f0,filename=/y"],
     "Duplicate nodes with node-name='f0'"),
    (["-blockdev", "driver=raw,node-name=d0,file.driver=file"],
     "Parameter 'file.filename' is missing"),
    # -drive
    (["-drive", "if=none,id=d,file=/x,cache=bogus"], "invalid cache option"),
    (["-drive", "if=ide,file=/x"], "-drive if=ide is not supported by "
     "qiothread; use if=none with -device virtio-blk-pci,drive=ID (or "
     "if=virtio)"),
    (["-drive", "if=none,id=d,file=/x,aio=bogus"], "invalid aio option"),
    (["-drive", "if=none,id=d,file=/x,format=bogus"],
     "'bogus' invalid format"),
    (["-drive", "if=none,id=d,file=/x,format=raw,frob=1"],
     "Block format 'raw' does not support the option 'frob'"),
    ([*DRIVE, *DRIVE], "Duplicate ID 'd0' for drive"),
    (["-drive", "if=none,id=0d,file=/x"],
     "Parameter 'id' expects an identifier"),
    # -device: lookup, properties (reference §15.1)
    (["-device", "e1000"], "'e1000' is not a valid device model name"),
    (["-device", "drive=d0"], "Parameter 'driver' is missing"),
    (["-device", "virtio-blk-pci,drive=nosuch"],
     "Property 'virtio-blk-pci.drive' can't find value 'nosuch'"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,frob=1"],
     "Property 'virtio-blk-pci.frob' not found"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,iothread=nosuch"],
     "Device 'nosuch' not found"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=x"],
     "Parameter 'num-queues' expects integer"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=70000"],
     "Parameter 'num-queues' expects uint16_t"),
    # Regression: the -device path parsed integers with its own copy of
    # qemu_strtou64, which took trailing blanks and non-ASCII digits.
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=2 "],
     "Parameter 'num-queues' expects integer"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=\u0663"],
     "Parameter 'num-queues' expects integer"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,request-merging=2"],
     "Parameter 'request-merging' expects 'on' or 'off'"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,write-cache=x"],
     "Parameter 'write-cache' does not accept value 'x'"),
    ([*DRIVE, "-device", '{"driver":"virtio-blk-pci","drive":"d0",'
                         '"num-queues":"2"}'],
     "Parameter 'num-queues' expects uint64"),
    ([*DRIVE, "-device", '{"driver":"virtio-blk-pci","drive":"d0",'
                         '"event_idx":"on"}'],
     "Invalid parameter type for 'event_idx', expected: boolean"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0",
      "-device", "virtio-blk-pci,drive=d0"],
     "Drive 'd0' is already in use by another device"),
    ([*DRIVE, "-device", "virtio-blk-pci,id=v,drive=d0",
      "-device", "virtio-blk-pci,id=v,drive=d0"],
     "Duplicate ID 'v' for device"),
    # -device: realize (reference §15.1, §15.6)
    (["-device", "virtio-blk-pci"], "drive property not set"),
    (["-drive", "if=none,id=e", "-device", "virtio-blk-pci,drive=e"],
     "Device needs media, but drive is empty"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=0"],
     "num-queues property must be larger than 0"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,queue-size=2"],
     "invalid queue-size property (2), must be > 2"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,queue-size=100"],
     "invalid queue-size property (100), must be a power of 2 (max 1024)"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,queue-size=2048"],
     "invalid queue-size property (2048), must be a power of 2 "
     "(max 1024)"),
    # Regression: QEMU checks the queue size, the block sizes and the
    # discard limits before a queue count over 1024 (which it has no
    # message for: virtio_add_queue aborts); the -device path used to
    # refuse the count first.
    ([*DRIVE, "-device",
      "virtio-blk-pci,drive=d0,num-queues=2000,queue-size=2"],
     "invalid queue-size property (2), must be > 2"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=2000,"
      "logical_block_size=4096"],
     "logical_block_size > physical_block_size not supported"),
    ([*DRIVE, "-device", "virtio-blk-pci,drive=d0,num-queues=2000"],
     "num-queues property must be at most 1024"),
    ([*DRIVE, *IO0, "-device",
      "virtio-blk-pci,drive=d0,iothread=io0,ioeventfd=off"],
     "ioeventfd is required for iothread"),
    # iothread-vq-mapping (reference §15.7)
    ([*DRIVE, *IO0, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "iothread": "io0",
        "iothread-vq-mapping": [{"iothread": "io0"}]})],
     "iothread and iothread-vq-mapping properties cannot be set at the "
     "same time"),
    ([*DRIVE, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0",
        "iothread-vq-mapping": [{"iothread": "nosuch"}]})],
     'IOThread "nosuch" object does not exist'),
    ([*DRIVE, *IO0, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0",
        "iothread-vq-mapping": [{"iothread": "io0"},
                                {"iothread": "io0"}]})],
     'duplicate IOThread name "io0" in iothread-vq-mapping'),
    ([*DRIVE, *IO0, *IO1, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "num-queues": 2,
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0]},
                                {"iothread": "io1"}]})],
     "either all items in iothread-vq-mapping must have vqs or none of "
     "them must have it"),
    ([*DRIVE, *IO0, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "num-queues": 2,
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0, 2]}]})],
     'vq index 2 for IOThread "io0" must be less than num_queues 2 in '
     "iothread-vq-mapping"),
    ([*DRIVE, *IO0, *IO1, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "num-queues": 2,
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0]},
                                {"iothread": "io1", "vqs": [0, 1]}]})],
     'cannot assign vq 0 to IOThread "io1" because it is already '
     "assigned"),
    ([*DRIVE, *IO0, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0", "num-queues": 2,
        "iothread-vq-mapping": [{"iothread": "io0", "vqs": [1]}]})],
     "missing vq 0 IOThread assignment in iothread-vq-mapping"),
    ([*DRIVE, *IO0, "-device", json.dumps({
        "driver": "virtio-blk-pci", "drive": "d0",
        "iothread-vq-mapping": [{"vqs": [0]}]})],
     "Parameter 'iothread-vq-mapping[0].iothread' is missing"),
    ([*DRIVE, "-device",
      "virtio-blk-pci,drive=d0,iothread-vq-mapping=io0"],
     "Invalid parameter type for 'iothread-vq-mapping', expected: array"),
    # -trace, -msg, -mon, -chardev
    (["-trace", "foo=bar"], "Invalid parameter 'foo'"),
    (["-trace", "events=/nonexistent/events"],
     "could not open trace event file '/nonexistent/events': "
     "No such file or directory"),
    (["-msg", "timestamp=maybe"],
     "Parameter 'timestamp' expects 'on' or 'off'"),
    (["-mon", "chardev=nosuch,mode=control"], 'chardev "nosuch" not found'),
    (["-mon", "mode=control"], "Parameter 'chardev' is missing"),
    (["-mon", "chardev=c,mode=bogus"],
     "Parameter 'mode' does not accept value 'bogus'"),
    (["-chardev", "socket,path=/tmp/s"], "chardev: no id specified"),
    (["-chardev", "socket,id=c"], "chardev: socket: no host given"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS,
                         ids=[m[:40] for _, m in ERRORS])
def test_errors_as_qemu_words_them(argv: list[str], message: str) -> None:
    err = error_of(argv)
    assert err.message == message
    # The whole line names the option that failed, as QEMU does.
    failing = [a for a in argv if not a.startswith("-")]
    assert str(err) == f"-{err.option} {err.arg}: {message}"
    assert err.arg in failing


def test_first_error_in_qemu_order_wins() -> None:
    # Syntax errors come first, in command-line order; then objects,
    # then block nodes, then devices.
    err = error_of(["-device", "virtio-blk-pci", "-object", "iothread"])
    assert err.option == "object"
    err = error_of(["-device", "virtio-blk-pci", "-trace", "x=1"])
    assert err.option == "trace"
