"""virtio-blk's wire format, feature bits, properties and set-up types.

The request format both sides rely on (virtio 1.x §5.2.6, reference
§15.2):

- a device-readable *out header* of 16 bytes: ``type`` u32, ``ioprio``
  u32, ``sector`` u64, the sector always in 512-byte units;
- then the data buffers (readable for OUT, writable for IN and GET_ID),
  or one 16-byte ``{sector u64, num_sectors u32, flags u32}`` segment
  for DISCARD and WRITE_ZEROES;
- and last a device-writable *status byte*: the last byte of the last
  writable buffer.  ``used.len`` is the total size of the writable
  buffers, status byte included, whatever was transferred.

The properties are QEMU 7.2's ``-device virtio-blk-pci`` ones with their
defaults and their error messages (reference §15.1).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from qiothread.errors import ConfigError
from qiothread.event_notifier import EventNotifier
from qiothread.keyval import qemu_strtou64
from virtio.ring import VIRTQUEUE_MAX_SIZE, VringLayout

__all__ = [
    "BDRV_REQUEST_MAX_SECTORS",
    "BDRV_SECTOR_SIZE",
    "DWZ_SEGMENT",
    "OUTHDR",
    "VIRTIO_BLK_AUTO_NUM_QUEUES",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_MAX_MERGE_REQS",
    "VIRTIO_QUEUE_MAX",
    "BlockBackend",
    "QueueSetup",
    "VirtIOBlkConf",
    "VirtQueueStats",
    "VirtioBlkFeature",
    "VirtioBlkStatus",
    "VirtioBlkType",
    "check_block_size",
]

BDRV_SECTOR_BITS: Final = 9
#: The unit of ``sector`` on the wire, whatever the logical block size.
BDRV_SECTOR_SIZE: Final = 512
#: ``BDRV_REQUEST_MAX_SECTORS`` = INT_MAX >> 9.
BDRV_REQUEST_MAX_SECTORS: Final = 0x7FFFFFFF >> BDRV_SECTOR_BITS
#: ``VIRTIO_BLK_MAX_MERGE_REQS``: requests one merge buffer holds.
VIRTIO_BLK_MAX_MERGE_REQS: Final = 32
#: ``VIRTIO_BLK_ID_BYTES``: the GET_ID buffer.
VIRTIO_BLK_ID_BYTES: Final = 20
#: ``num-queues`` default: "auto" (the vCPU count on virtio-blk-pci).
VIRTIO_BLK_AUTO_NUM_QUEUES: Final = 0xFFFF
#: ``VIRTIO_QUEUE_MAX``: queues per device.
VIRTIO_QUEUE_MAX: Final = 1024
#: ``IOV_MAX``: ``blk_get_max_iov`` on Linux.
IOV_MAX: Final = 1024
#: MSI-X table limit that caps "auto" num-queues (2048 - 1 config).
_PCI_MSIX_QUEUES_MAX: Final = 2047

#: The out header: type u32, ioprio u32, sector u64.
OUTHDR: Final = struct.Struct("<IIQ")
#: The DISCARD / WRITE_ZEROES segment: sector u64, num_sectors u32,
#: flags u32.
DWZ_SEGMENT: Final = struct.Struct("<QII")
#: ``VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP``.
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1


class VirtioBlkType(enum.IntEnum):
    """``VIRTIO_BLK_T_*``: request types."""

    IN = 0
    OUT = 1
    SCSI_CMD = 2
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13
    #: Accepted and ignored (legacy).
    BARRIER = 0x80000000


class VirtioBlkStatus(enum.IntEnum):
    """``VIRTIO_BLK_S_*``: the status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class VirtioBlkFeature(enum.IntEnum):
    """``VIRTIO_BLK_F_*`` feature bit numbers."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    SCSI = 7
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


def _parse_bool(name: str, value: str | int | bool) -> bool:
    if isinstance(value, bool):
        return value
    # qapi_bool_parse's spellings.
    if isinstance(value, int):
        raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")


_U64_MAX = (1 << 64) - 1


def _parse_uint(name: str, value: str | int, bits: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"Parameter '{name}' expects integer")
    if isinstance(value, int):
        n: int | None = value & _U64_MAX if value < 0 else value
    else:
        n = qemu_strtou64(value)
    if n is None or n > _U64_MAX:
        raise ConfigError(f"Parameter '{name}' expects integer")
    if n >= 1 << bits:
        raise ConfigError(f"Parameter '{name}' expects uint{bits}_t")
    return n


#: ``MIN_BLOCK_SIZE`` / ``MAX_BLOCK_SIZE`` of a block-size property.
_MIN_BLOCK_SIZE = 512
_MAX_BLOCK_SIZE = 2 * 1024 * 1024


def check_block_size(name: str, value: int, dev_id: str = "") -> None:
    """The block-size property setter's checks (0 means unset).

    ``dev_id`` is the device's ``id``; QEMU's ``dev->id ?: ""`` makes
    it the empty string for a device without one.  Size suffixes
    (``4k``) are not accepted.
    """
    if value and not _MIN_BLOCK_SIZE <= value <= _MAX_BLOCK_SIZE:
        raise ConfigError(
            f"Property {dev_id}.{name} doesn't take value {value} "
            f"(minimum: {_MIN_BLOCK_SIZE}, maximum: {_MAX_BLOCK_SIZE})")
    if value & (value - 1):
        raise ConfigError(
            f"Property {dev_id}.{name} doesn't take value '{value}', it's "
            "not a power of 2")


@dataclass
class VirtIOBlkConf:
    """The properties of ``-device virtio-blk-pci`` that matter here.

    Defaults are QEMU 7.2's.  Build from option strings with
    :meth:`from_props`; :meth:`realize` applies QEMU's checks.
    """

    #: 65535 means "auto" (:meth:`realize` resolves it).
    num_queues: int = VIRTIO_BLK_AUTO_NUM_QUEUES
    queue_size: int = 256
    serial: str = ""
    request_merging: bool = True
    #: Offer VIRTIO_RING_F_EVENT_IDX.
    event_idx: bool = True
    #: Offer VIRTIO_RING_F_INDIRECT_DESC.
    indirect_desc: bool = True
    discard: bool = True
    write_zeroes: bool = True
    max_discard_sectors: int = BDRV_REQUEST_MAX_SECTORS
    max_write_zeroes_sectors: int = BDRV_REQUEST_MAX_SECTORS
    seg_max_adjust: bool = True
    config_wce: bool = True
    #: The device's ``logical_block_size``; 0 (unset) becomes 512 in
    #: :meth:`realize`, as ``blkconf_blocksizes`` does for every host
    #: but a DASD: never the host's size, whose alignment is the block
    #: layer's to meet (bounce buffers), not the guest's.
    logical_block_size: int = 0
    #: ``physical_block_size``; 0 (unset) becomes 512 likewise.
    physical_block_size: int = 0

    _PROPS: ClassVar[dict[str, tuple[str, int]]] = {
        "num-queues": ("num_queues", 16),
        "queue-size": ("queue_size", 16),
        "serial": ("serial", 0),
        "request-merging": ("request_merging", -1),
        "event_idx": ("event_idx", -1),
        "indirect_desc": ("indirect_desc", -1),
        "discard": ("discard", -1),
        "write-zeroes": ("write_zeroes", -1),
        "max-discard-sectors": ("max_discard_sectors", 32),
        "max-write-zeroes-sectors": ("max_write_zeroes_sectors", 32),
        "seg-max-adjust": ("seg_max_adjust", -1),
        "config-wce": ("config_wce", -1),
        "logical_block_size": ("logical_block_size", 32),
        "physical_block_size": ("physical_block_size", 32),
    }

    @classmethod
    def from_props(cls, props: Mapping[str, str | int | bool],
                   driver: str = "virtio-blk-pci") -> VirtIOBlkConf:
        """Parse ``-device`` property values (strings, as typed).

        Keys this model does not know are refused with QEMU's message;
        keys that belong to the device but not to this class (``drive``,
        ``iothread``, ``id``...) are the caller's to remove first.

        :raises ConfigError: with QEMU's message for a bad value.
        """
        conf = cls()
        for key, value in props.items():
            spec = cls._PROPS.get(key)
            if spec is None:
                raise ConfigError(f"Property '{driver}.{key}' not found")
            attr, kind = spec
            parsed: object
            if kind == -1:
                parsed = _parse_bool(key, value)
            elif kind == 0:
                parsed = str(value)
            else:
                parsed = _parse_uint(key, value, kind)
                if key.endswith("_block_size"):
                    check_block_size(key, parsed)
            setattr(conf, attr, parsed)
        return conf

    def realize(self, vcpus: int = 1, transport: str = "pci") -> None:
        """``virtio_blk_device_realize``'s checks; resolves "auto".

        ``vcpus`` is the number of guest vCPUs (guest processes here):
        virtio-blk-pci turns auto num-queues into min(vCPUs, 2047,
        1024); other transports into 1.

        :raises ConfigError: with QEMU's messages.
        """
        if self.num_queues == VIRTIO_BLK_AUTO_NUM_QUEUES:
            self.num_queues = (
                min(vcpus, _PCI_MSIX_QUEUES_MAX, VIRTIO_QUEUE_MAX)
                if transport == "pci" else 1)
        if not self.num_queues:
            raise ConfigError("num-queues property must be larger than 0")
        if self.queue_size <= 2:
            raise ConfigError(
                f"invalid queue-size property ({self.queue_size}), "
                "must be > 2")
        if (self.queue_size & (self.queue_size - 1)
                or self.queue_size > VIRTQUEUE_MAX_SIZE):
            raise ConfigError(
                f"invalid queue-size property ({self.queue_size}), "
                f"must be a power of 2 (max {VIRTQUEUE_MAX_SIZE})")
        # blkconf_blocksizes, after the queue checks as in 7.2: the
        # backend is probed only on s390x DASDs, which we do not serve.
        self.logical_block_size = self.logical_block_size or (
            BDRV_SECTOR_SIZE)
        self.physical_block_size = self.physical_block_size or (
            BDRV_SECTOR_SIZE)
        if self.logical_block_size > self.physical_block_size:
            raise ConfigError(
                "logical_block_size > physical_block_size not supported")
        if self.discard and not (
                1 <= self.max_discard_sectors <= BDRV_REQUEST_MAX_SECTORS):
            raise ConfigError(
                "invalid max-discard-sectors property "
                f"({self.max_discard_sectors}), must be between 1 and "
                f"{BDRV_REQUEST_MAX_SECTORS}")
        if self.write_zeroes and not (
                1 <= self.max_write_zeroes_sectors
                <= BDRV_REQUEST_MAX_SECTORS):
            raise ConfigError(
                "invalid max-write-zeroes-sectors property "
                f"({self.max_write_zeroes_sectors}), must be between 1 "
                f"and {BDRV_REQUEST_MAX_SECTORS}")
        if self.num_queues > VIRTIO_QUEUE_MAX:
            # QEMU 7.2 has no message here: virtio_add_queue aborts,
            # after realize has checked everything else.
            raise ConfigError(
                f"num-queues property must be at most {VIRTIO_QUEUE_MAX}")

    @property
    def seg_max(self) -> int:
        """Config ``seg_max``: queue-size - 2, or 126 without adjust."""
        return self.queue_size - 2 if self.seg_max_adjust else 128 - 2


class BlockBackend(Protocol):
    """What the device needs of a ``BlockDriverState`` (interfaces.md)."""

    length: int
    logical_block_size: int
    request_alignment: int
    read_only: bool

    def preadv(self, offset: int, iov: list[memoryview],
               cb: Callable[[int], None]) -> None: ...
    def pwritev(self, offset: int, iov: list[memoryview],
                cb: Callable[[int], None]) -> None: ...
    def flush(self, cb: Callable[[int], None]) -> None: ...
    def pdiscard(self, offset: int, nbytes: int,
                 cb: Callable[[int], None]) -> None: ...
    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: Callable[[int], None]) -> None: ...
    def io_plug(self) -> None: ...
    def io_unplug(self) -> None: ...


@dataclass
class QueueSetup:
    """One queue as the VMM set it up: rings and both eventfds."""

    layout: VringLayout
    #: Guest -> device (the ioeventfd).
    host_notifier: EventNotifier
    #: Device -> guest (the irqfd).
    guest_notifier: EventNotifier
    #: Address of the guest driver's counter block, 0 for none.
    driver_stats: int = 0
    #: Address of the stage stamp table (``queue_size`` x 16 bytes:
    #: t_pickup, t_done as u64 per head), 0 for none.
    stamp_table: int = 0


@dataclass
class VirtQueueStats:
    """Per-queue counters of the device (iothread only)."""

    #: Requests popped (well-formed or not).
    requests: int = 0
    #: Requests folded into another (num_reqs - 1 per merged submit).
    merges: int = 0
    #: Backend requests issued for reads and writes.
    rw_submits: int = 0
    #: Host-notifier reads that found a kick.
    kicks: int = 0
    #: Guest-notifier writes.
    interrupts: int = 0
    #: Completions (or BH runs) where the guest asked for no interrupt.
    interrupts_suppressed: int = 0
    #: Requests completed with IOERR / UNSUPP.
    ioerr: int = 0
    unsupp: int = 0
    #: Drains started by polling (io_poll_ready), without a kick read.
    polled: int = 0
