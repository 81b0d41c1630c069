"""The QEMU command line of a run: checked and resolved, as QEMU would.

``qiothread run`` takes the options QEMU users already type::

    -object iothread,id=io0,poll-max-ns=32768
    -blockdev driver=file,node-name=f0,filename=disk.img,aio=native,\\
        cache.direct=on
    -blockdev driver=raw,node-name=d0,file=f0
    -drive if=none,id=drive0,file=disk.img,format=raw,cache=none,aio=native
    -device virtio-blk-pci,drive=d0,iothread=io0,num-queues=2
    -device '{"driver":"virtio-blk-pci","drive":"d0",
              "iothread-vq-mapping":[{"iothread":"io0"}]}'
    -trace enable=poll_*,file=trace.log   -trace events=FILE   -D FILE
    -msg timestamp=on
    -qmp unix:/tmp/q.sock,server=on,wait=off
    -chardev socket,id=mon0,path=/tmp/q.sock,server=on,wait=off
    -mon chardev=mon0,mode=control

and fails the way QEMU fails: QEMU's message after the option that
caused it (``-device virtio-blk-pci,num-queues=0: num-queues property
must be larger than 0``).  The syntax layer is split by QEMU's two
syntaxes: keyval (``-object``, ``-blockdev``, and JSON for those and
``-device``) in :mod:`qiothread.keyval`, QemuOpts (the rest) in
:mod:`qiothread.qemu_opts`.  This module gives the parsed options their
meaning, in QEMU's order: every option is parsed as it comes (trace
patterns take effect then, as in QEMU), then chardevs and monitors,
iothreads, block nodes in command-line order, and devices in
command-line order, each device property by property and then
realized (:mod:`qiothread.device_options`).

Everything here is pure: nothing is opened or started, except that
``-trace events=FILE`` is read.  :mod:`qiothread.machine` builds the run
from the resulting :class:`MachineConfig`.

What is not modelled: machine types (no ``-M``), other devices and
object types, block drivers other than ``file``, ``host_device`` and
``raw`` (a pass-through here), ``-drive`` interfaces other than
``if=none``, and block-layer permissions beyond "one device per drive".
Where QEMU would accept something qiothread cannot do, the message says
so in qiothread's words instead of imitating a QEMU error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qiothread import trace
from qiothread import trace_events as _trace_events  # noqa: F401
from qiothread.block_options import drive_node, visit_blockdev
from qiothread.errors import ConfigError
from qiothread.keyval import ParsedOption, parse_option
from qiothread.qemu_opts import (
    OptionError,
    id_wellformed,
    parse_bool,
    qemu_opts_parse,
)
from qiothread.qom import ObjectRoot
from qiothread.vmconfig import (
    BlockNodeConfig,
    IOThreadConfig,
    MachineConfig,
    MonitorConfig,
    TraceConfig,
)

__all__ = [
    "HelpRequested",
    "OptionError",
    "build_machine_config",
]


class HelpRequested(Exception):
    """``help`` was asked for (``-object iothread,help``); print it."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text




# ---------------------------------------------------------------------
# -object

#: Object types QEMU has that qiothread does not model.
_OTHER_QOM_TYPES = ("main-loop", "memory-backend-ram",
                    "memory-backend-file", "memory-backend-memfd",
                    "throttle-group", "secret", "rng-random",
                    "tls-creds-x509", "authz-simple")


# ---------------------------------------------------------------------
# -trace, -msg, -D

def _trace(opts: dict[str, str], cfg: TraceConfig,
           warn: Callable[[str], None]) -> None:
    patterns: list[str] = []
    if "enable" in opts:
        patterns.append(opts["enable"])
    if "events" in opts:
        path = opts["events"]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ConfigError(f"could not open trace event file "
                              f"'{path}': {e.strerror}") from None
        patterns += [ln.strip() for ln in lines
                     if ln.strip() and not ln.lstrip().startswith("#")]
    names = [ev.name for ev in trace.all_events()]
    for pat in patterns:
        if pat in ("help", "?"):
            # QEMU's trace_enable_events: list every event and exit.
            raise HelpRequested("".join(f"{n}\n" for n in names))
        bare = pat.lstrip("-")
        if not any(c in bare for c in "*?[") and bare not in names:
            warn(f"warning: trace event '{bare}' does not exist")
        cfg.patterns.append(pat)
    if "file" in opts:
        cfg.file = opts["file"]


# ---------------------------------------------------------------------
# -qmp, -chardev, -mon

_CHARDEV_SOCKET_KEYS = ("backend", "id", "path", "server", "wait",
                        "abstract", "tight", "reconnect", "telnet",
                        "websocket", "nodelay", "host", "port", "to",
                        "ipv4", "ipv6", "logfile", "logappend", "mux",
                        "fd")


def _qmp(arg: str, index: int, pretty: bool,
         warn: Callable[[str], None]) -> MonitorConfig:
    backend, _, rest = arg.partition(",")
    if not backend.startswith("unix:"):
        raise ConfigError("qiothread supports only unix:PATH QMP "
                          "sockets")
    opts = qemu_opts_parse("qmp", rest, allowed=("server", "wait"),
                           warn=warn)
    return _socket_monitor(backend[5:], opts, pretty,
                           f"compat_monitor{index}")


def _socket_monitor(path: str, opts: Mapping[str, str], pretty: bool,
                    chardev: str) -> MonitorConfig:
    server = parse_bool("server", opts.get("server", "off"))
    if not server:
        raise ConfigError("QMP sockets must be server=on "
                          "(qiothread does not connect out)")
    wait = parse_bool("wait", opts.get("wait", "on"))
    return MonitorConfig(path=path, wait=wait, pretty=pretty,
                         chardev=chardev)


def _chardev(arg: str, warn: Callable[[str], None]
             ) -> tuple[str, dict[str, str]]:
    opts = qemu_opts_parse("chardev", arg, implied="backend",
                           allowed=_CHARDEV_SOCKET_KEYS, warn=warn)
    ident = opts.get("id")
    if not ident:
        raise ConfigError("chardev: no id specified")
    backend = opts.get("backend", "")
    if backend != "socket":
        raise ConfigError(f"chardev backend '{backend}' is not "
                          "supported by qiothread (socket is)")
    if "path" not in opts:
        if "host" not in opts:
            raise ConfigError("chardev: socket: no host given")
        raise ConfigError("qiothread supports only UNIX sockets "
                          "(path=)")
    return ident, opts


def _mon(opts: dict[str, str], chardevs: Mapping[str, dict[str, str]]
         ) -> MonitorConfig:
    chardev = opts.get("chardev")
    if chardev is None:
        raise ConfigError("Parameter 'chardev' is missing")
    mode = opts.get("mode", "readline")
    if mode not in ("readline", "control"):
        raise ConfigError(
            f"Parameter 'mode' does not accept value '{mode}'")
    if mode != "control":
        raise ConfigError("qiothread supports only QMP monitors "
                          "(mode=control)")
    pretty = parse_bool("pretty", opts.get("pretty", "off"))
    chr_opts = chardevs.get(chardev)
    if chr_opts is None:
        raise ConfigError(f'chardev "{chardev}" not found')
    return _socket_monitor(chr_opts["path"], chr_opts, pretty, chardev)


# ---------------------------------------------------------------------
# The whole command line


@dataclass
class _Pending:
    option: str
    arg: str
    parsed: Any


class _Builder:
    """Two passes over the options, in QEMU's order (module text)."""

    def __init__(self, vcpus: int) -> None:
        self.vcpus = vcpus
        self.cfg = MachineConfig()
        self.pending: dict[str, list[_Pending]] = {
            k: [] for k in ("object", "node", "device", "mon")}
        self.drive_ids: set[str] = set()
        self.device_ids: set[str] = set()
        self.chardevs: dict[str, dict[str, str]] = {}
        self._virtio_drives = 0
        self._where: tuple[str, str] | None = None
        from qiothread.iothread import IOThread

        self._dry_root = ObjectRoot({"iothread": IOThread}, type_options={
            "iothread": {"start_on_complete": False}})

    def warn(self, text: str) -> None:
        where = "" if self._where is None else \
            f"-{self._where[0]} {self._where[1]}: "
        self.cfg.warnings.append(where + text)

    @contextlib.contextmanager
    def at(self, option: str, arg: str) -> Iterator[None]:
        """Blame errors and warnings inside on ``-option arg``."""
        self._where = (option, arg)
        try:
            yield
        except OptionError:
            raise
        except ConfigError as e:
            raise OptionError(option, arg, str(e)) from None
        finally:
            self._where = None

    # pass 1: syntax, in command-line order
    def parse(self, option: str, arg: str) -> None:
        with self.at(option, arg):
            self._parse(option, arg)

    def _parse(self, option: str, arg: str) -> None:
        if option in ("object", "blockdev"):
            implied = "qom-type" if option == "object" else "driver"
            parsed: Any = parse_option(
                arg, implied, help_allowed=option == "object")
        elif option == "drive":
            parsed = qemu_opts_parse("drive", arg, warn=self.warn)
            self._unique_id(parsed, self.drive_ids, "drive")
            if parsed.get("if") == "virtio":
                # QEMU names it by interface and unit and adds the
                # device for it at once (before later -device options).
                parsed.setdefault("id", f"virtio{self._virtio_drives}")
                self._virtio_drives += 1
                self.pending["device"].append(_Pending(
                    option, arg, ParsedOption(
                        {"driver": "virtio-blk-pci",
                         "drive": parsed["id"]}, keyval=True)))
        elif option == "device":
            parsed = self._parse_device(arg)
        elif option == "chardev":
            ident, parsed = _chardev(arg, self.warn)
            if ident in self.chardevs:
                raise ConfigError(
                    f"Duplicate ID '{ident}' for chardev")
            self.chardevs[ident] = parsed
            return
        elif option == "mon":
            parsed = qemu_opts_parse(
                "mon", arg, allowed=("mode", "chardev", "pretty"),
                warn=self.warn)
        elif option in ("qmp", "qmp-pretty"):
            self.cfg.monitors.append(_qmp(
                arg, len(self.cfg.monitors),
                option == "qmp-pretty", self.warn))
            return
        elif option == "trace":
            _trace(qemu_opts_parse(
                "trace", arg, implied="enable",
                allowed=("enable", "events", "file"), warn=self.warn),
                self.cfg.trace, self.warn)
            return
        elif option == "msg":
            opts = qemu_opts_parse(
                "msg", arg, allowed=("timestamp", "guest-name"),
                warn=self.warn)
            if "timestamp" in opts:
                self.cfg.trace.timestamps = parse_bool(
                    "timestamp", opts["timestamp"])
            return
        elif option == "D":
            self.cfg.trace.file = arg
            return
        else:
            raise ConfigError(f"unknown option -{option}")
        group = "node" if option in ("blockdev", "drive") else option
        self.pending[group].append(_Pending(option, arg, parsed))

    def _parse_device(self, arg: str) -> ParsedOption:
        if arg.startswith("{"):
            return parse_option(arg)
        opts = qemu_opts_parse("device", arg, implied="driver",
                               warn=self.warn)
        self._unique_id(opts, self.device_ids, "device")
        return ParsedOption(dict(opts), keyval=True)

    @staticmethod
    def _unique_id(opts: Mapping[str, str], seen: set[str],
                   group: str) -> None:
        ident = opts.get("id")
        if ident is None:
            return
        if ident in seen:
            raise ConfigError(f"Duplicate ID '{ident}' for {group}")
        seen.add(ident)

    # pass 2: objects, block nodes, devices, monitors
    def create_objects(self) -> None:
        for p in self.pending["object"]:
            with self.at(p.option, p.arg):
                self._object(p.parsed)

    def _object(self, parsed: ParsedOption) -> None:
        """Create an iothread in a dry ``/objects`` (nothing starts):
        the property model of :mod:`qiothread.iothread` makes QEMU's
        checks, and the checked values become an IOThreadConfig."""
        qom_type = parsed.data.get("qom-type")
        if parsed.help:
            raise HelpRequested(self._dry_root.help_text(parsed))
        if qom_type in _OTHER_QOM_TYPES:
            raise ConfigError(f"object type '{qom_type}' is not "
                              "supported by qiothread (iothread is)")
        obj = self._dry_root.object_add(parsed)
        props = {p.name: obj.get(p.name) for p in obj.PROPERTIES}
        self.cfg.iothreads.append(IOThreadConfig(
            obj.id, props, obj.get_str("poll-policy")))

    def open_nodes(self) -> None:
        # -blockdev and -drive are created in one command-line order
        drives = 0
        for p in self.pending["node"]:
            before = len(self.cfg.nodes)
            with self.at(p.option, p.arg):
                if p.option == "blockdev":
                    self._blockdev(p.parsed)
                else:
                    self._add_node(drive_node(p.parsed, drives, self.warn))
                    drives += 1
            if len(self.cfg.nodes) > before:
                self.cfg.nodes[-1].origin = (p.option, p.arg)

    def _blockdev(self, parsed: ParsedOption) -> None:
        flat = visit_blockdev(parsed.visitor())
        name = flat.get("node-name")
        if name is None:
            raise ConfigError(
                "'node-name' must be specified for the root node")
        if flat["driver"] != "raw":
            self._add_node(BlockNodeConfig(name=name, options=flat))
            return
        ref = flat["file"]
        if isinstance(ref, str):
            node = self.cfg.node(ref)
            if node is None or node.drive_id:
                raise ConfigError(f"Cannot find device='{ref}' nor "
                                  f"node-name='{ref}'")
            if node.format_node is not None:
                raise ConfigError(
                    f"node '{ref}' is already the file of "
                    f"'{node.format_node}'")
            self._check_node_name(name)
            node.format_node = name
            return
        self._check_node_name(name)
        auto = f"#block{len(self.cfg.nodes):03d}"
        child = {**ref, "node-name": ref.get("node-name", auto)}
        if child["driver"] == "raw":
            raise ConfigError("raw over raw is not supported by qiothread")
        self._add_node(BlockNodeConfig(name=child["node-name"],
                                       options=child, format_node=name))

    def _check_node_name(self, name: str) -> None:
        if not id_wellformed(name):
            raise ConfigError(f"Invalid node-name: '{name}'")
        if any(name == n.drive_id for n in self.cfg.nodes):
            raise ConfigError(
                f"node-name={name} is conflicting with a device id")
        if self.cfg.node(name) is not None:
            raise ConfigError(
                f"Duplicate nodes with node-name='{name}'")

    def _add_node(self, node: BlockNodeConfig) -> None:
        if node.drive_id:
            if any(node.drive_id in (n.name, n.format_node)
                   for n in self.cfg.nodes):
                raise ConfigError(f"Device name '{node.drive_id}' "
                                  "conflicts with an existing node name")
        elif not node.name.startswith("#"):
            # "#blockNNN" names are made here for nested nodes, as
            # QEMU makes them; no user name can start with '#'.
            self._check_node_name(node.name)
        self.cfg.nodes.append(node)

    def create_devices(self) -> None:
        from qiothread.device_options import create_device

        for p in self.pending["device"]:
            with self.at(p.option, p.arg):
                self.cfg.devices.append(
                    create_device(p.parsed, self.cfg, self.vcpus))

    def create_monitors(self) -> None:
        for p in self.pending["mon"]:
            with self.at(p.option, p.arg):
                self.cfg.monitors.append(_mon(p.parsed, self.chardevs))


def build_machine_config(qemu_args: Sequence[tuple[str, str]],
                         vcpus: int = 1) -> MachineConfig:
    """Check and resolve QEMU options, as ``split_argv`` returns them.

    ``vcpus`` is the number of guest processes (fio jobs); it turns
    ``num-queues`` "auto" into a number, as ``-smp`` does in QEMU.

    :raises OptionError: the first bad option, with QEMU's message.
    :raises HelpRequested: an option asked for help.
    """
    b = _Builder(vcpus)
    for option, arg in qemu_args:
        b.parse(option, arg)
    b.create_monitors()
    b.create_objects()
    b.open_nodes()
    b.create_devices()
    return b.cfg
