"""The atomics of qiothread.barrier against the mappings they point into."""

from __future__ import annotations

import mmap

import pytest

from qiothread.barrier import SharedU32, SharedU64, close_mapping


@pytest.mark.parametrize("cls", [SharedU32, SharedU64])
def test_regression_an_atomic_field_pins_its_mapping(
        cls: type[SharedU32] | type[SharedU64]) -> None:
    """An atomic field used to keep only the mapping object, not a
    buffer export: ``mmap.close()`` then unmapped the memory under it,
    and the next atomic operation (a late notify from another thread)
    crashed the whole process.  Now the close is refused while the field
    lives, close_mapping leaves the unmapping to the last user, and the
    field keeps working until then."""
    m = mmap.mmap(-1, mmap.PAGESIZE)
    field = cls(m, 8)
    field.store(41)
    with pytest.raises(BufferError):
        m.close()
    close_mapping(m)
    assert not m.closed
    assert field.fetch_add(1) == 41
    assert field.load() == 42
    del field
    close_mapping(m)
    assert m.closed


def test_fields_are_atomic_views_of_the_same_bytes() -> None:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    a = SharedU32(m, 4)
    a.store(0xFFFFFFFF)
    assert a.fetch_add(1) == 0xFFFFFFFF          # wraps as uint32
    assert a.load() == 0
    assert m[4:8] == b"\0\0\0\0"
    b = SharedU64(m, 8)
    b.store(1 << 40)
    assert int.from_bytes(m[8:16], "little") == 1 << 40
    with pytest.raises(ValueError, match="aligned"):
        SharedU32(m, 2)
    with pytest.raises(ValueError, match="outside"):
        SharedU64(m, mmap.PAGESIZE)
    del a, b
    m.close()
