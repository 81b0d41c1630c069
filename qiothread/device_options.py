"""``-device virtio-blk-pci``: properties and realize, as QEMU checks them.

QEMU creates a device in three steps, and so does this module:

1. find the device model from ``driver`` (``'x' is not a valid device
   model name``) and give it its ``id`` (an identifier, unique);
2. set each given property in turn: an unknown name is ``Property
   'virtio-blk-pci.x' not found``, a bad value fails with the message of
   the visitor that reads it (command-line text and JSON differ, see
   :mod:`qiothread.qemu_opts`), ``drive=`` must name a block node or
   drive nobody uses yet, ``iothread=`` an existing iothread;
3. realize: ``virtio_blk_device_realize`` of QEMU 7.2 (reference §15.1:
   drive set and not empty, ``num-queues`` > 0 once "auto" became the
   vCPU count, ``queue-size`` > 2, a power of two, at most 1024) and
   QEMU 9.0's queue-to-iothread mapping (reference §15.7: exclusive with
   ``iothread``, every iothread existing and named once, all entries
   with ``vqs`` or none, every queue assigned exactly once; without
   ``vqs`` queues go round-robin), and ``blkconf_blocksizes``: the
   device's ``logical_block_size`` and ``physical_block_size`` are 512
   unless set (QEMU probes the host only on a DASD), the logical one no
   larger.  A device with an iothread needs ``ioeventfd=on``, as in
   QEMU.

The result is a :class:`~qiothread.options.DeviceConfig` whose
``queue_iothreads`` says, for each queue, which iothread serves it:
the 7.2 ``iothread=`` form maps every queue to one iothread, the 9.0
form spreads them.  A device with neither runs in the main loop's
context, which in QEMU never busy-polls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qiothread.errors import ConfigError
from qiothread.keyval import ParsedOption
from qiothread.options import HelpRequested
from qiothread.qemu_opts import (
    id_wellformed,
    parse_bool,
    parse_str,
    parse_uint,
)
from qiothread.vmconfig import (
    VIRTIO_BLK_AUTO_NUM_QUEUES,
    VIRTIO_BLK_DEFAULT_QUEUE_SIZE,
    DeviceConfig,
    MachineConfig,
    VqMapping,
)
from virtio.blk_defs import VirtIOBlkConf, check_block_size

__all__ = ["DEVICE_MODELS", "create_device"]

#: The device models of this emulator (``virtio-blk`` is QEMU's alias).
DEVICE_MODELS = ("virtio-blk-pci", "virtio-blk")

#: The MSI-X table (2048 entries) less the config vector caps the
#: "auto" queue count on PCI (reference §15.1).

_ON_OFF_AUTO = ("on", "off", "auto")

#: Property -> (kind, default); the kinds are read by ``_set``.
_PROPERTIES: dict[str, tuple[str, Any]] = {
    "drive": ("drive", None),
    "iothread": ("link", None),
    "iothread-vq-mapping": ("vqmap", None),
    "num-queues": ("uint16", VIRTIO_BLK_AUTO_NUM_QUEUES),
    "queue-size": ("uint16", VIRTIO_BLK_DEFAULT_QUEUE_SIZE),
    "serial": ("str", ""),
    "request-merging": ("bool", True),
    "event_idx": ("bool", True),
    "indirect_desc": ("bool", True),
    "seg-max-adjust": ("bool", True),
    "discard": ("bool", True),
    "write-zeroes": ("bool", True),
    "config-wce": ("bool", True),
    # 0 is "unset": realize makes it 512 (QEMU probes only DASDs).
    "logical_block_size": ("blocksize", 0),
    "physical_block_size": ("blocksize", 0),
    "ioeventfd": ("bool", True),
    "share-rw": ("bool", False),
    "write-cache": ("onoffauto", "auto"),
    # PCI placement: accepted so that QEMU command lines paste
    # unchanged; there is no bus here to place the device on.
    "bus": ("str", None),
    "addr": ("str", None),
    "vectors": ("uint32", None),
}


#: Properties QEMU 7.2's virtio-blk-pci has (block, error, geometry,
#: virtio-blk, virtio-pci, virtio and PCI ones) that qiothread does not
#: model: refused as unsupported, not as unknown, since QEMU takes them.
_QEMU_ONLY_PROPERTIES = frozenset((
    "min_io_size", "opt_io_size", "discard_granularity", "account-invalid",
    "account-failed", "rerror", "werror", "cyls", "heads", "secs",
    "lcyls", "lheads", "lsecs", "scsi", "report-discard-granularity",
    "max-discard-sectors", "max-write-zeroes-sectors",
    "x-enable-wce-if-config-wce", "virtio-pci-bus-master-bug-migration",
    "migrate-extra", "modern-pio-notify", "x-disable-pcie",
    "page-per-vq", "x-ignore-backend-features", "ats", "aer",
    "disable-legacy", "disable-modern", "class", "notify_on_empty",
    "any_layout", "iommu_platform", "packed", "use-started",
    "use-disabled-flag", "x-disable-legacy-check", "romfile", "romsize",
    "rombar", "multifunction", "failover_pair_id", "acpi-index"))

#: How ``-device virtio-blk-pci,help`` names each property's type and
#: describes it, as QEMU 7.2's PropertyInfo does (bit properties say
#: "on/off", plain bools say nothing).
_HELP_TYPES: dict[str, tuple[str, str | None]] = {
    "drive": ("str", "Node name or ID of a block device to use as a "
                     "backend"),
    "iothread": ("link<iothread>", None),
    "iothread-vq-mapping": ("IOThreadVirtQueueMappingList", None),
    "serial": ("str", None),
    "request-merging": ("bool", "on/off"),
    "event_idx": ("bool", "on/off"),
    "indirect_desc": ("bool", "on/off"),
    "discard": ("bool", "on/off"),
    "write-zeroes": ("bool", "on/off"),
    "config-wce": ("bool", "on/off"),
    "logical_block_size": ("size", "A power of two between 512 B and "
                                   "2 MiB"),
    "physical_block_size": ("size", "A power of two between 512 B and "
                                    "2 MiB"),
    "ioeventfd": ("bool", "on/off"),
    "write-cache": ("OnOffAuto", "on/off/auto"),
    "addr": ("int32", "Slot and optional function number, example: "
                      "06.0 or 06"),
}
#: Defaults QEMU's help shows where the table above has none to show.
_HELP_DEFAULTS: dict[str, Any] = {"addr": -1, "vectors": 0xFFFFFFFF}


def _help_text() -> str:
    """``-device virtio-blk-pci,help`` laid out as QEMU 7.2's
    ``object_property_help``: sorted by name, ``name=<type>`` padded to
    24 columns, `` - `` and the description, the default in JSON."""
    lines = ["virtio-blk-pci options:"]
    for name in sorted(_PROPERTIES):
        if name == "bus":       # a -device option, not a property
            continue
        kind, default = _PROPERTIES[name]
        qtype, desc = _HELP_TYPES.get(name, (kind, None))
        if name == "serial":    # a NULL string: QEMU shows no default
            default = None
        default = _HELP_DEFAULTS.get(name, default)
        line = f"  {name}=<{qtype}>"
        if desc is not None or default is not None:
            line = line.ljust(24) + " - " + (desc or "")
        if default is not None:
            line += f" (default: {json.dumps(default)})"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _vq_mapping(name: str, value: Any, from_json: bool
                ) -> list[VqMapping]:
    """Visit ``IOThreadVirtQueueMappingList`` (JSON only, as in QEMU)."""
    if not from_json or not isinstance(value, list):
        raise ConfigError(
            f"Invalid parameter type for '{name}', expected: array")
    out: list[VqMapping] = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(
                f"Invalid parameter type for '{where}', expected: object")
        if "iothread" not in item:
            raise ConfigError(f"Parameter '{where}.iothread' is missing")
        iothread = parse_str(f"{where}.iothread", item["iothread"], True)
        vqs: tuple[int, ...] | None = None
        if "vqs" in item:
            raw = item["vqs"]
            if not isinstance(raw, list):
                raise ConfigError(f"Invalid parameter type for "
                                  f"'{where}.vqs', expected: array")
            vqs = tuple(parse_uint(f"{where}.vqs[{j}]", q, 16, True)
                        for j, q in enumerate(raw))
        for key in item:
            if key not in ("iothread", "vqs"):
                raise ConfigError(
                    f"Parameter '{where}.{key}' is unexpected")
        out.append(VqMapping(iothread, vqs))
    return out


class _Device:
    """A device between property setting and realize."""

    def __init__(self, ident: str, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.values = {k: d for k, (_, d) in _PROPERTIES.items()}
        self.ident = ident

    def set(self, model: str, name: str, value: Any,
            from_json: bool) -> None:
        """Set one property, as ``object_property_set`` would."""
        prop = _PROPERTIES.get(name)
        if prop is None and name in _QEMU_ONLY_PROPERTIES:
            raise ConfigError(f"property '{name}' of {model} is not "
                              "supported by qiothread")
        if prop is None:
            raise ConfigError(f"Property '{model}.{name}' not found")
        kind = prop[0]
        readers: dict[str, Callable[[], Any]] = {
            "str": lambda: parse_str(name, value, from_json),
            "bool": lambda: parse_bool(name, value, from_json),
            "uint16": lambda: parse_uint(name, value, 16, from_json),
            "uint32": lambda: parse_uint(name, value, 32, from_json),
            "onoffauto": lambda: self._on_off_auto(name, value,
                                                   from_json),
            "drive": lambda: self._drive(model, name, value, from_json),
            "link": lambda: self._iothread(name, value, from_json),
            "vqmap": lambda: _vq_mapping(name, value, from_json),
            "blocksize": lambda: self._blocksize(name, value, from_json),
        }
        self.values[name] = readers[kind]()

    def _blocksize(self, name: str, value: Any, from_json: bool) -> int:
        size = parse_uint(name, value, 32, from_json)
        # QEMU names the device by its id, "" for an anonymous one.
        check_block_size(name, size, "" if self.ident.startswith("/")
                         else self.ident)
        return size

    @staticmethod
    def _on_off_auto(name: str, value: Any, from_json: bool) -> str:
        text = parse_str(name, value, from_json)
        if text not in _ON_OFF_AUTO:
            raise ConfigError(
                f"Parameter '{name}' does not accept value '{text}'")
        return text

    def _drive(self, model: str, name: str, value: Any,
               from_json: bool) -> str:
        text = parse_str(name, value, from_json)
        node = self.cfg.node(text)
        if node is None:
            raise ConfigError(f"Property '{model}.{name}' can't find "
                              f"value '{text}'")
        if any(self.cfg.node(d.drive) is node for d in self.cfg.devices):
            raise ConfigError(
                f"Drive '{text}' is already in use by another device")
        return text

    def _iothread(self, name: str, value: Any, from_json: bool) -> str:
        text = parse_str(name, value, from_json)
        if self.cfg.iothread(text) is None:
            raise ConfigError(f"Device '{text}' not found")
        return text

    def realize(self, vcpus: int) -> DeviceConfig:
        """``virtio_blk_pci_realize`` then ``virtio_blk_device_realize``.

        :raises ConfigError: QEMU's realize messages (module text).
        """
        v = self.values
        drive: str | None = v["drive"]
        if drive is None:
            raise ConfigError("drive property not set")
        node = self.cfg.node(drive)
        if node is not None and node.empty:
            raise ConfigError("Device needs media, but drive is empty")
        # The rest of virtio_blk_device_realize, in QEMU's order, is the
        # device model's own.
        conf = VirtIOBlkConf(
            num_queues=v["num-queues"], queue_size=v["queue-size"],
            discard=v["discard"], write_zeroes=v["write-zeroes"],
            logical_block_size=v["logical_block_size"],
            physical_block_size=v["physical_block_size"])
        conf.realize(max(vcpus, 1))
        num_queues, size = conf.num_queues, conf.queue_size
        lbs, pbs = conf.logical_block_size, conf.physical_block_size
        return DeviceConfig(
            id=self.ident, drive=drive, num_queues=num_queues,
            queue_size=size,
            queue_iothreads=self._queue_iothreads(num_queues),
            serial=v["serial"], request_merging=v["request-merging"],
            event_idx=v["event_idx"], indirect_desc=v["indirect_desc"],
            seg_max_adjust=v["seg-max-adjust"], discard=v["discard"],
            write_zeroes=v["write-zeroes"], config_wce=v["config-wce"],
            write_cache=v["write-cache"], iothread=v["iothread"],
            iothread_vq_mapping=v["iothread-vq-mapping"],
            logical_block_size=lbs, physical_block_size=pbs)

    def _queue_iothreads(self, num_queues: int) -> list[str | None]:
        iothread: str | None = self.values["iothread"]
        mapping: list[VqMapping] | None = self.values["iothread-vq-mapping"]
        if iothread is not None and mapping is not None:
            raise ConfigError("iothread and iothread-vq-mapping properties "
                              "cannot be set at the same time")
        if (iothread is not None or mapping is not None) and \
                not self.values["ioeventfd"]:
            raise ConfigError("ioeventfd is required for iothread")
        if mapping is None:
            return [iothread] * num_queues
        return _apply_mapping(mapping, num_queues, self.cfg)


def _apply_mapping(mapping: list[VqMapping], num_queues: int,
                   cfg: MachineConfig) -> list[str | None]:
    """Validate and apply ``iothread-vq-mapping`` (reference §15.7)."""
    assigned: list[str | None] = [None] * num_queues
    seen: set[str] = set()
    for i, entry in enumerate(mapping):
        name = entry.iothread
        if cfg.iothread(name) is None:
            raise ConfigError(f'IOThread "{name}" object does not exist')
        if name in seen:
            raise ConfigError(f'duplicate IOThread name "{name}" in '
                              "iothread-vq-mapping")
        seen.add(name)
        if i and (entry.vqs is None) != (mapping[0].vqs is None):
            raise ConfigError("either all items in iothread-vq-mapping "
                              "must have vqs or none of them must have it")
        for vq in entry.vqs or ():
            if vq >= num_queues:
                raise ConfigError(
                    f'vq index {vq} for IOThread "{name}" must be less '
                    f"than num_queues {num_queues} in iothread-vq-mapping")
            if assigned[vq] is not None:
                raise ConfigError(f'cannot assign vq {vq} to IOThread '
                                  f'"{name}" because it is already '
                                  "assigned")
            assigned[vq] = name
    if mapping and mapping[0].vqs is not None:
        for q, owner in enumerate(assigned):
            if owner is None:
                raise ConfigError(f"missing vq {q} IOThread assignment in "
                                  "iothread-vq-mapping")
        return assigned
    # Round-robin: entry k serves queues k, k + K, k + 2K, ...
    return [mapping[q % len(mapping)].iothread for q in range(num_queues)]


def create_device(parsed: ParsedOption, cfg: MachineConfig,
                  vcpus: int) -> DeviceConfig:
    """Create one ``-device`` (module text); ``vcpus`` resolves "auto".

    :raises ConfigError: QEMU's message for the first problem.
    :raises HelpRequested: ``driver=help`` or ``,help``.
    """
    data = dict(parsed.data)
    from_json = not parsed.keyval
    driver = data.pop("driver", None)
    if not isinstance(driver, str):
        raise ConfigError("Parameter 'driver' is missing")
    if driver in ("help", "?"):
        raise HelpRequested("Storage devices:\nname \"virtio-blk-pci\", "
                            "bus PCI, alias \"virtio-blk\"\n")
    if driver not in DEVICE_MODELS:
        raise ConfigError(f"'{driver}' is not a valid device model name")
    if parsed.help or data.pop("help", None) is not None:
        raise HelpRequested(_help_text())
    ident = data.pop("id", None)
    if ident is not None:
        ident = parse_str("id", ident, from_json)
        if not id_wellformed(ident):
            raise ConfigError("Parameter 'id' expects an identifier")
        if any(d.id == ident for d in cfg.devices):
            raise ConfigError(f"Duplicate device ID '{ident}'")
    else:
        ident = f"/machine/peripheral-anon/device[{len(cfg.devices)}]"
    dev = _Device(ident, cfg)
    for name, value in data.items():
        dev.set("virtio-blk-pci", name, value, from_json)
    return dev.realize(vcpus)
