"""Real memory barriers and atomics for fields shared between processes.

Python statements give no ordering guarantee of their own: a store into
an ``mmap`` followed by a load from another offset is, at the CPU level,
a plain ``memcpy`` store followed by a plain load, and even x86 (TSO)
lets the load pass the store.  The Dekker pairs of this project
(``notify_me`` against ``notified``; the guest's avail index against the
device's notification enable; the device's used index against
``used_event``) break on exactly that reordering: each side stores its
own flag and then reads the other's, both read stale values, and both
go to sleep.

The primitive is GCC's own atomic runtime, ``libatomic`` (Debian package
libatomic1), called through ``ctypes``: ``__atomic_fetch_add_N`` with
``__ATOMIC_SEQ_CST`` is a sequentially consistent read-modify-write, a
full fence on every architecture GCC supports (``lock xadd`` on x86).
A foreign call is opaque to the interpreter, so nothing moves around it
at the Python level either.  We measured 0.38 µs per call here, against
7 µs for the pure-Python ``atomics`` package, which matters on a polling
path that runs a million times a second.

Plain loads and stores of aligned 16- and 32-bit fields through
``struct`` on the mapping are single-copy atomic in practice (one aligned
``mov``); what they lack is ordering, which :func:`full_barrier` gives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from typing import Any

__all__ = [
    "SharedU32",
    "SharedU64",
    "close_mapping",
    "full_barrier",
]

#: C11 ``memory_order_seq_cst`` as GCC numbers it.
_ATOMIC_SEQ_CST = 5


def _load_libatomic() -> ctypes.CDLL:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        raise ImportError(
            "qiothread needs GCC's libatomic for its memory barriers; "
            "install the Debian package libatomic1 (scripts/setup.sh does)"
        ) from exc


_lib = _load_libatomic()


def _fn(name: str, argtypes: list[type], restype: type | None) -> Any:
    f = getattr(_lib, name)
    f.argtypes = argtypes
    f.restype = restype
    return f


_VP, _I = ctypes.c_void_p, ctypes.c_int
_add4 = _fn("__atomic_fetch_add_4", [_VP, ctypes.c_uint32, _I],
            ctypes.c_uint32)
_sub4 = _fn("__atomic_fetch_sub_4", [_VP, ctypes.c_uint32, _I],
            ctypes.c_uint32)
_or4 = _fn("__atomic_fetch_or_4", [_VP, ctypes.c_uint32, _I],
           ctypes.c_uint32)
_and4 = _fn("__atomic_fetch_and_4", [_VP, ctypes.c_uint32, _I],
            ctypes.c_uint32)
_xchg4 = _fn("__atomic_exchange_4", [_VP, ctypes.c_uint32, _I],
             ctypes.c_uint32)
_load4 = _fn("__atomic_load_4", [_VP, _I], ctypes.c_uint32)
_store4 = _fn("__atomic_store_4", [_VP, ctypes.c_uint32, _I], None)
_add8 = _fn("__atomic_fetch_add_8", [_VP, ctypes.c_uint64, _I],
            ctypes.c_uint64)
_load8 = _fn("__atomic_load_8", [_VP, _I], ctypes.c_uint64)
_store8 = _fn("__atomic_store_8", [_VP, ctypes.c_uint64, _I], None)
_xchg8 = _fn("__atomic_exchange_8", [_VP, ctypes.c_uint64, _I],
             ctypes.c_uint64)

# A private word to run the fencing read-modify-write on.
_fence_word = ctypes.c_uint32(0)
_fence_addr = ctypes.addressof(_fence_word)
# C11's atomic_thread_fence (libatomic 1.2+; x86-64: a locked OR on the
# stack).  A fresh function pointer without argtypes: ctypes then skips
# per-argument conversion, a third of the RMW call's cost, and this
# runs a few times per request on both sides of the ring.
_fence = (_lib["atomic_thread_fence"]
          if hasattr(_lib, "atomic_thread_fence") else None)
if _fence is not None:
    _fence.restype = None


def full_barrier() -> None:
    """Order every earlier load and store before every later one (smp_mb).

    Any thread, any process: it fences the calling CPU.
    """
    if _fence is not None:
        _fence(_ATOMIC_SEQ_CST)
    else:
        _add4(_fence_addr, 0, _ATOMIC_SEQ_CST)


def close_mapping(buf: mmap.mmap) -> None:
    """Unmap ``buf`` now, unless an atomic field still points into it.

    A :class:`SharedU32` / :class:`SharedU64` that somebody still holds
    (a notify handle in another thread, say) pins the mapping; it is
    then unmapped when its last user goes, so that no atomic ever
    touches unmapped memory.
    """
    try:
        buf.close()
    except BufferError:
        pass


class _SharedField:
    """What both widths share: a pinned, aligned place in the mapping."""

    __slots__ = ("_addr", "_keep")
    _width = 0

    def __init__(self, buf: mmap.mmap | bytearray, offset: int) -> None:
        w = self._width
        if offset % w:
            raise ValueError(f"offset {offset} is not {w}-byte aligned")
        if not 0 <= offset <= len(buf) - w:
            raise ValueError(f"offset {offset} is outside the buffer")
        # The ctypes view holds a buffer export on ``buf``: while this
        # object lives, ``mmap.close()`` raises BufferError instead of
        # unmapping memory an atomic below would then touch (a crash of
        # the whole process, not an exception).
        self._keep = (ctypes.c_char * w).from_buffer(buf, offset)
        self._addr = ctypes.addressof(self._keep)


class SharedU32(_SharedField):
    """An aligned unsigned 32-bit field of a shared mapping.

    Every operation is sequentially consistent, so each is also a full
    barrier.  Any thread, any process that maps the same memory.  The
    mapping cannot be closed while the field object exists.
    """

    __slots__ = ()
    _width = 4

    def load(self) -> int:
        return int(_load4(self._addr, _ATOMIC_SEQ_CST))

    def store(self, value: int) -> None:
        _store4(self._addr, value, _ATOMIC_SEQ_CST)

    def fetch_add(self, delta: int) -> int:
        """Add ``delta``; return the previous value."""
        return int(_add4(self._addr, delta, _ATOMIC_SEQ_CST))

    def fetch_sub(self, delta: int) -> int:
        """Subtract ``delta``; return the previous value."""
        return int(_sub4(self._addr, delta, _ATOMIC_SEQ_CST))

    def fetch_or(self, bits: int) -> int:
        return int(_or4(self._addr, bits, _ATOMIC_SEQ_CST))

    def fetch_and(self, bits: int) -> int:
        return int(_and4(self._addr, bits, _ATOMIC_SEQ_CST))

    def exchange(self, value: int) -> int:
        return int(_xchg4(self._addr, value, _ATOMIC_SEQ_CST))


class SharedU64(_SharedField):
    """An aligned unsigned 64-bit field of a shared mapping (see above)."""

    __slots__ = ()
    _width = 8

    def load(self) -> int:
        return int(_load8(self._addr, _ATOMIC_SEQ_CST))

    def store(self, value: int) -> None:
        _store8(self._addr, value, _ATOMIC_SEQ_CST)

    def fetch_add(self, delta: int) -> int:
        return int(_add8(self._addr, delta, _ATOMIC_SEQ_CST))

    def exchange(self, value: int) -> int:
        return int(_xchg8(self._addr, value, _ATOMIC_SEQ_CST))
