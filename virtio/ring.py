"""The virtio 1.x split ring: layout, flags, feature bits and index maths.

The contract both sides rely on (virtio 1.x §2.7, reference §13.1):

- A queue of size N (a power of two, 1 <= N <= 1024 in QEMU) is three
  areas of guest memory, all little-endian:

  * the *descriptor table*, N entries of 16 bytes:
    ``addr`` u64, ``len`` u32, ``flags`` u16, ``next`` u16;
  * the *avail ring* (driver writes, device reads):
    ``flags`` u16, ``idx`` u16, ``ring[N]`` u16, then ``used_event``
    u16 at offset 4 + 2N;
  * the *used ring* (device writes, driver reads):
    ``flags`` u16, ``idx`` u16, ``ring[N]`` of {``id`` u32, ``len``
    u32}, then ``avail_event`` u16 at offset 4 + 8N.

- ``avail.idx`` and ``used.idx`` are free-running 16-bit counters; the
  slot of entry k is ``k % N``.  Every comparison between two indices is
  therefore a 16-bit subtraction, never a ``<``.

- Publication order: the driver fills descriptors and the ring slot
  *before* it stores ``avail.idx``; the device reads ``avail.idx``
  *before* the slot it names.  Symmetrically the device stores the used
  element before ``used.idx``.  On x86-64 (TSO) stores are not
  reordered with stores nor loads with loads, so these two pairs need
  only a compiler barrier, and a Python statement boundary is one (each
  field access is an opaque C call).  :func:`read_barrier` and
  :func:`write_barrier` are therefore free on x86-64 and a real fence
  elsewhere.  A *store followed by a load of another field* (the
  notification Dekker pairs) needs a full barrier on every CPU:
  :func:`qiothread.barrier.full_barrier`.

- Notification suppression, without EVENT_IDX: the device sets
  ``VRING_USED_F_NO_NOTIFY`` in ``used.flags`` to ask for no kicks, the
  driver sets ``VRING_AVAIL_F_NO_INTERRUPT`` in ``avail.flags`` to ask
  for no interrupts.  With EVENT_IDX the flags are ignored and each side
  publishes the index at which it wants to hear from the other:
  ``avail_event`` ("kick me when avail.idx passes this") and
  ``used_event`` ("interrupt me when used.idx passes this"), decided by
  :func:`vring_need_event`.
"""

from __future__ import annotations

import enum
import platform
import struct
from dataclasses import dataclass
from typing import Final

from qiothread.barrier import full_barrier
from qiothread.errors import ConfigError

__all__ = [
    "VIRTQUEUE_MAX_SIZE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_SIZE",
    "VRING_USED_F_NO_NOTIFY",
    "VirtioFeature",
    "VringDescFlag",
    "VringLayout",
    "avail_event_offset",
    "avail_ring_offset",
    "feature_bit",
    "has_feature",
    "read_barrier",
    "used_event_offset",
    "used_ring_offset",
    "vring_need_event",
    "write_barrier",
]

#: ``VIRTQUEUE_MAX_SIZE``: the largest queue and the most iovecs a
#: single element may map (``hw/virtio/virtio.h``).
VIRTQUEUE_MAX_SIZE: Final = 1024

#: ``sizeof(VRingDesc)``: one descriptor table entry.
VRING_DESC_SIZE: Final = 16

#: In ``avail.flags``: the driver does not want interrupts (no EVENT_IDX).
VRING_AVAIL_F_NO_INTERRUPT: Final = 1

#: In ``used.flags``: the device does not want kicks (no EVENT_IDX).
VRING_USED_F_NO_NOTIFY: Final = 1

# Offsets inside the avail and used rings (both start with flags, idx).
VRING_AVAIL_FLAGS: Final = 0
VRING_AVAIL_IDX: Final = 2
VRING_USED_FLAGS: Final = 0
VRING_USED_IDX: Final = 2

#: One descriptor: addr u64, len u32, flags u16, next u16.
DESC: Final = struct.Struct("<QIHH")
#: One used element: id u32, len u32.
USED_ELEM: Final = struct.Struct("<II")
U16: Final = struct.Struct("<H")
U32: Final = struct.Struct("<I")
U64: Final = struct.Struct("<Q")


class VringDescFlag(enum.IntFlag):
    """``VRING_DESC_F_*``: the flags of a descriptor."""

    #: The chain continues at ``next``.
    NEXT = 1
    #: The buffer is device-writable (an "in" buffer).
    WRITE = 2
    #: The buffer is a table of descriptors (indirect descriptors).
    INDIRECT = 4


class VirtioFeature(enum.IntEnum):
    """Feature *bit numbers* common to all devices (reference §13.1)."""

    #: ``VIRTIO_F_NOTIFY_ON_EMPTY``: interrupt when the ring runs empty.
    NOTIFY_ON_EMPTY = 24
    #: ``VIRTIO_RING_F_INDIRECT_DESC``.
    RING_INDIRECT_DESC = 28
    #: ``VIRTIO_RING_F_EVENT_IDX``: used_event / avail_event.
    RING_EVENT_IDX = 29
    #: ``VIRTIO_F_VERSION_1``: a modern (non-legacy) device.
    VERSION_1 = 32
    #: ``VIRTIO_F_RING_PACKED``: not implemented here (split rings only).
    RING_PACKED = 34


def feature_bit(bit: int) -> int:
    """The mask of feature ``bit`` (``1 << bit``)."""
    return 1 << int(bit)


def has_feature(features: int, bit: int) -> bool:
    """Whether the feature mask ``features`` contains ``bit``."""
    return bool(features >> int(bit) & 1)


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Whether an index moving from ``old`` to ``new_idx`` passed the event.

    The three are 16-bit ring indices.  The event fires when
    ``event_idx`` lies in the half-open window ``[old, new_idx)``,
    computed in 16-bit arithmetic so that it holds across the 65535 -> 0
    wrap: ``(u16)(new - event - 1) < (u16)(new - old)``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def avail_ring_offset(i: int) -> int:
    """Offset of ``avail.ring[i]`` from the start of the avail ring."""
    return 4 + 2 * i


def used_event_offset(num: int) -> int:
    """Offset of ``used_event`` (after ``avail.ring[num]``)."""
    return 4 + 2 * num


def used_ring_offset(i: int) -> int:
    """Offset of ``used.ring[i]`` from the start of the used ring."""
    return 4 + 8 * i


def avail_event_offset(num: int) -> int:
    """Offset of ``avail_event`` (after ``used.ring[num]``)."""
    return 4 + 8 * num


if platform.machine() in ("x86_64", "AMD64", "i686", "i386"):
    def read_barrier() -> None:
        """smp_rmb: loads are not reordered with loads on x86 (TSO)."""

    def write_barrier() -> None:
        """smp_wmb: stores are not reordered with stores on x86 (TSO)."""
else:  # pragma: no cover - weakly ordered CPUs
    def read_barrier() -> None:
        """smp_rmb: a full fence, since loads may pass loads here."""
        full_barrier()

    def write_barrier() -> None:
        """smp_wmb: a full fence, since stores may pass stores here."""
        full_barrier()


@dataclass(frozen=True)
class VringLayout:
    """Where one split ring lives in guest memory (modern transport).

    Three separate guest-physical addresses, as a virtio-pci modern
    device is given them (``queue_desc``, ``queue_driver``,
    ``queue_device``), plus the queue size.
    """

    #: Queue size N.
    num: int
    #: Address of the descriptor table (16-byte aligned).
    desc: int
    #: Address of the avail ring (the "driver area", 2-byte aligned).
    avail: int
    #: Address of the used ring (the "device area", 4-byte aligned).
    used: int

    @staticmethod
    def check_num(num: int) -> None:
        """Refuse a queue size QEMU's ``virtio_queue_set_num`` refuses.

        :raises ConfigError: unless ``num`` is a power of two in
            1 ... ``VIRTQUEUE_MAX_SIZE``.
        """
        if num < 1 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise ConfigError(
                f"invalid virtqueue size {num}: must be a power of 2 "
                f"between 1 and {VIRTQUEUE_MAX_SIZE}"
            )

    @staticmethod
    def sizes(num: int) -> tuple[int, int, int]:
        """Bytes taken by the descriptor table, avail and used rings."""
        return (VRING_DESC_SIZE * num, 6 + 2 * num, 6 + 8 * num)

    def check_within(self, mem_size: int) -> None:
        """Refuse rings that do not lie inside ``mem_size`` bytes.

        :raises ConfigError: on a misaligned or out-of-range area.
        """
        self.check_num(self.num)
        dsz, asz, usz = self.sizes(self.num)
        for name, addr, size, align in (
            ("descriptor table", self.desc, dsz, 16),
            ("avail ring", self.avail, asz, 2),
            ("used ring", self.used, usz, 4),
        ):
            if addr % align:
                raise ConfigError(
                    f"virtqueue {name} at 0x{addr:x} is not "
                    f"{align}-byte aligned")
            if addr < 0 or addr + size > mem_size:
                raise ConfigError(
                    f"virtqueue {name} at 0x{addr:x} (+{size}) is outside "
                    f"guest memory of {mem_size} bytes")
