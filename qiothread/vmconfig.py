"""The run's machine as its QEMU options describe it: plain data.

:mod:`qiothread.options` fills these from the command line (checked the
way QEMU checks it); :mod:`qiothread.machine` builds the processes,
memory and backends from them.  Nothing here opens or starts anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "VIRTIO_BLK_AUTO_NUM_QUEUES",
    "VIRTIO_BLK_DEFAULT_QUEUE_SIZE",
    "VIRTIO_QUEUE_MAX",
    "VIRTQUEUE_MAX_SIZE",
    "BlockNodeConfig",
    "DeviceConfig",
    "IOThreadConfig",
    "MachineConfig",
    "MonitorConfig",
    "TraceConfig",
    "VqMapping",
    "flatten",
]

#: ``VIRTQUEUE_MAX_SIZE`` and ``VIRTIO_QUEUE_MAX`` (reference §19).
VIRTQUEUE_MAX_SIZE = 1024
VIRTIO_QUEUE_MAX = 1024
#: ``num-queues`` default: "auto", resolved at realize (§15.1).
VIRTIO_BLK_AUTO_NUM_QUEUES = 0xFFFF
#: ``queue-size`` default for current machine types (§15.1).
VIRTIO_BLK_DEFAULT_QUEUE_SIZE = 256


@dataclass
class IOThreadConfig:
    """``-object iothread,...`` after QEMU's property checks."""

    id: str
    #: Every property of the object with its (checked) integer value;
    #: ``poll-max-ns`` etc., defaults filled in.
    props: dict[str, int]
    #: ``poll-policy`` (qiothread's; :mod:`qiothread.policies`).
    policy: str = "7.2"


@dataclass
class BlockNodeConfig:
    """A block node the run will open with ``blockdev.open_blockdev``.

    ``options`` is the flat QEMU dict of the *protocol* node (``driver``
    ``file`` or ``host_device``, ``filename``, ``aio``,
    ``cache.direct``, ``cache.no-flush``, ``read-only``, ...), with
    QEMU's names; a ``raw`` format node on top is recorded in
    ``format_node`` (raw is a pass-through here).
    """

    #: The name devices use: the ``-blockdev`` node-name of the top
    #: node, or the ``-drive`` id.
    name: str
    options: dict[str, Any]
    #: The node-name of the format node (``raw``), if one was given.
    format_node: str | None = None
    #: ``-drive`` id (the BlockBackend name), "" for ``-blockdev``.
    drive_id: str = ""
    #: ``-drive cache=writethrough|directsync``: the device sees a
    #: disabled write cache (QEMU's ``write-cache=off``).
    writethrough: bool = False
    #: A ``-drive`` without ``file=``: no medium.
    empty: bool = False
    #: The option that made the node, ``("blockdev", ARG)`` or
    #: ``("drive", ARG)``, to blame it for errors found when it opens.
    origin: tuple[str, str] = ("blockdev", "")


@dataclass(frozen=True)
class VqMapping:
    """One ``iothread-vq-mapping`` entry (QAPI IOThreadVirtQueueMapping)."""

    iothread: str
    vqs: tuple[int, ...] | None = None


@dataclass
class DeviceConfig:
    """``-device virtio-blk-pci,...`` after properties and realize."""

    id: str
    drive: str
    num_queues: int
    queue_size: int
    #: The iothread serving each queue, index = queue number (7.2's
    #: ``iothread=`` maps all queues to one; ``iothread-vq-mapping``
    #: spreads them).  ``None`` for a device without an iothread (it
    #: runs in the main loop's context, which never polls).
    queue_iothreads: list[str | None]
    serial: str = ""
    request_merging: bool = True
    event_idx: bool = True
    indirect_desc: bool = True
    seg_max_adjust: bool = True
    discard: bool = True
    write_zeroes: bool = True
    config_wce: bool = True
    #: QEMU's ``write-cache`` (on/off/auto; auto follows the drive).
    write_cache: str = "auto"
    #: ``iothread=`` as given (7.2 form), or None.
    iothread: str | None = None
    #: ``iothread-vq-mapping`` as given (9.0 form), or None.
    iothread_vq_mapping: list[VqMapping] | None = None
    #: The guest-visible block sizes (512 unless set), not the host's.
    logical_block_size: int = 512
    physical_block_size: int = 512


@dataclass
class TraceConfig:
    """``-trace`` / ``-D`` / ``-msg``: what to enable and where."""

    patterns: list[str] = field(default_factory=list)
    file: str | None = None
    timestamps: bool = False


@dataclass
class MonitorConfig:
    """A QMP monitor on a UNIX socket (``-qmp`` or ``-chardev``+``-mon``)."""

    path: str
    #: ``wait=on``: the run waits for the first client before starting.
    wait: bool = False
    pretty: bool = False
    #: The chardev id (``-chardev``) or "compat_monitorN" for ``-qmp``.
    chardev: str = ""


@dataclass
class MachineConfig:
    """Everything the QEMU options of a run say, checked and resolved."""

    iothreads: list[IOThreadConfig] = field(default_factory=list)
    nodes: list[BlockNodeConfig] = field(default_factory=list)
    devices: list[DeviceConfig] = field(default_factory=list)
    trace: TraceConfig = field(default_factory=TraceConfig)
    monitors: list[MonitorConfig] = field(default_factory=list)
    #: Warnings QEMU would print (``-drive`` without ``format=``, a
    #: trace event that does not exist), each after its option.
    warnings: list[str] = field(default_factory=list)

    def iothread(self, ident: str) -> IOThreadConfig | None:
        """The iothread called ``ident``, if any."""
        return next((t for t in self.iothreads if t.id == ident), None)

    def node(self, name: str) -> BlockNodeConfig | None:
        """The block node or drive a device may name with ``drive=``."""
        for n in self.nodes:
            if name in (n.name, n.drive_id, n.format_node):
                return n
        return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"cache": {"direct": True}}`` -> ``{"cache.direct": True}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
