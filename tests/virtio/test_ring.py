"""Split-ring arithmetic: offsets, layout checks and vring_need_event."""

from __future__ import annotations

import pytest

from qiothread.errors import ConfigError
from virtio.ring import (
    VringLayout,
    avail_event_offset,
    avail_ring_offset,
    feature_bit,
    has_feature,
    used_event_offset,
    used_ring_offset,
    vring_need_event,
)


def test_layout_offsets_per_spec() -> None:
    # virtio 1.x §2.7: avail = flags, idx, ring[N], used_event;
    # used = flags, idx, ring[N] of 8 bytes, avail_event.
    assert avail_ring_offset(0) == 4
    assert avail_ring_offset(255) == 514
    assert used_event_offset(256) == 516
    assert used_ring_offset(3) == 28
    assert avail_event_offset(256) == 2052
    assert VringLayout.sizes(256) == (4096, 518, 2054)


@pytest.mark.parametrize("num", [0, 3, 2048, 1000, -4])
def test_bad_queue_sizes_are_refused(num: int) -> None:
    with pytest.raises(ConfigError, match="power of 2"):
        VringLayout.check_num(num)


@pytest.mark.parametrize("num", [1, 2, 256, 1024])
def test_good_queue_sizes(num: int) -> None:
    VringLayout.check_num(num)


def test_layout_must_fit_and_align() -> None:
    VringLayout(8, 4096, 8192, 8448).check_within(16384)
    with pytest.raises(ConfigError, match="outside guest memory"):
        VringLayout(8, 4096, 8192, 16380).check_within(16384)
    with pytest.raises(ConfigError, match="not 16-byte aligned"):
        VringLayout(8, 4100, 8192, 8448).check_within(16384)
    with pytest.raises(ConfigError, match="not 4-byte aligned"):
        VringLayout(8, 4096, 8192, 8450).check_within(16384)


# (event, new, old, expected): the event fires iff event is in [old, new)
# modulo 2**16.  Each case is worked out by hand below.
NEED_EVENT_CASES = [
    # Plain window [5, 8): 5, 6, 7 fire; 4 and 8 do not.
    (5, 8, 5, True),
    (7, 8, 5, True),
    (8, 8, 5, False),
    (4, 8, 5, False),
    # Nothing moved: never.
    (5, 5, 5, False),
    # The window [65534, 2) wraps: 65534, 65535, 0, 1 fire.
    (65534, 2, 65534, True),
    (65535, 2, 65534, True),
    (0, 2, 65534, True),
    (1, 2, 65534, True),
    (2, 2, 65534, False),
    (65533, 2, 65534, False),
    # One step over the wrap: [65535, 0) is just 65535.
    (65535, 0, 65535, True),
    (0, 0, 65535, False),
    # used_event = last seen index, device moved one past it.
    (100, 101, 100, True),
    # Guest asked for an event far ahead (it is behind by 2**15).
    (40000, 10, 5, False),
    # A full-size window of 65535 entries covers every event but new.
    (3, 2, 3, True),
    (2, 2, 3, False),
]


@pytest.mark.parametrize(("event", "new", "old", "expected"),
                         NEED_EVENT_CASES)
def test_vring_need_event_hand_computed(event: int, new: int, old: int,
                                        expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_vring_need_event_matches_window_definition() -> None:
    # Exhaustive near the wrap: event in [old, new) modulo 2**16.
    for old in range(65530, 65536):
        for step in range(0, 9):
            new = (old + step) & 0xFFFF
            window = {(old + k) & 0xFFFF for k in range(step)}
            for event in range(65526, 65536 + 10):
                event &= 0xFFFF
                assert vring_need_event(event, new, old) is (
                    event in window), (event, new, old)


def test_feature_bits() -> None:
    assert feature_bit(29) == 0x2000_0000
    assert has_feature(1 << 32 | 1 << 29, 32)
    assert not has_feature(1 << 29, 28)
