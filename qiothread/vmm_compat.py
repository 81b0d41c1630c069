"""Single-store access to the 16-bit ring fields, until virtio has it.

``struct.Struct("<H").pack_into`` first zero-fills the two bytes and
then writes them one at a time, and ``unpack_from`` reads them one at a
time: another process that reads ``avail.idx`` (or ``used.idx``,
``used_event``, ``avail_event``, the flags) at that moment sees 0 or a
torn value.  The run hit it: the device failed with "Guest moved used
index from N to 0", the guest with "id 0 is not a head!", at a rate of
a few per hundred thousand requests (docs/interfaces.md, "Stores to
memory another process reads").

Until ``virtio.ring`` writes these fields with one store, the run
gives ``virtio.virtqueue`` and ``virtio.driver`` a drop-in for their
``U16`` that loads and stores through a memoryview cast to ``"H"``:
one aligned 2-byte access each, which x86-64 and arm64 perform
atomically.  :func:`install` is idempotent and is called by the machine
before it builds anything, so every process it forks inherits it.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["AtomicU16", "install"]


class AtomicU16:
    """``struct.Struct("<H")`` for the calls virtio makes, with single
    2-byte loads and stores (little-endian hosts only)."""

    format = "<H"
    size = 2

    @staticmethod
    def pack_into(buf: Any, offset: int, value: int) -> None:
        if offset & 1:
            struct.pack_into("<H", buf, offset, value)
            return
        with memoryview(buf) as mv, mv[offset:offset + 2] as two, \
                two.cast("H") as h:
            h[0] = value

    @staticmethod
    def unpack_from(buf: Any, offset: int = 0) -> tuple[int]:
        if offset & 1:
            return struct.unpack_from("<H", buf, offset)
        with memoryview(buf) as mv, mv[offset:offset + 2] as two, \
                two.cast("H") as h:
            return (int(h[0]),)

    @staticmethod
    def pack(value: int) -> bytes:
        return struct.pack("<H", value)

    @staticmethod
    def unpack(data: bytes) -> tuple[int]:
        return struct.unpack("<H", data)


def install() -> None:
    """Give virtio's ring code :class:`AtomicU16` (module text)."""
    import sys

    import virtio.driver
    import virtio.virtqueue

    if sys.byteorder != "little":  # pragma: no cover - not our hosts
        return
    for module in (virtio.virtqueue, virtio.driver):
        if isinstance(getattr(module, "U16", None), struct.Struct):
            module.U16 = AtomicU16  # type: ignore[attr-defined]
