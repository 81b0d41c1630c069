"""``-blockdev`` options for file, host_device and raw, with QEMU's errors.

``open_blockdev`` takes the flat option dict a keyval parser produces
(``{"driver": "file", "filename": "disk.img", "cache.direct": "on"}``)
or its nested JSON form (``{"cache": {"direct": True}}``) and returns an
open node.  The rules are file-posix's (reference §12):

- ``aio`` is ``threads`` (default), ``native`` or ``io_uring``; any other
  value gives ``Parameter 'aio' does not accept value 'bogus'``.
- ``aio=native`` needs ``cache.direct=on``, else ``aio=native was
  specified, but it requires cache.direct=on, which was not
  specified.``
- ``aio-max-batch`` (default 0) can only lower the iothread's batch.
- ``driver=raw`` sits on a protocol node given as ``file=<node-name>``
  or as ``file.driver=...,file.filename=...``.

The ``-drive cache=`` table (``bdrv_parse_cache_mode``) is
:func:`parse_cache_mode`, for the ``-drive`` parser to call.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockdev.faults import FaultSpec
from blockdev.file_posix import FileOptions, FilePosixNode
from blockdev.raw_aio import AioContextLike, CompletionCB
from qiothread.errors import BlockError, ConfigError

__all__ = [
    "AIO_MODES",
    "BlockDriverState",
    "CacheMode",
    "RawFormatNode",
    "open_blockdev",
    "parse_aio",
    "parse_cache_mode",
]

#: ``BlockdevAioOptions``, in QEMU's order.
AIO_MODES = ("threads", "native", "io_uring")

_FILE_KEYS = {"driver", "node-name", "filename", "aio", "aio-max-batch",
              "cache.direct", "cache.no-flush", "read-only", "locking",
              "discard", "detect-zeroes", "auto-read-only", "write-cache",
              "drop-cache", "force-share"}
_RAW_KEYS = {"driver", "node-name", "file", "read-only", "cache.direct",
             "cache.no-flush", "discard", "detect-zeroes",
             "auto-read-only", "force-share"}
_node_ids = itertools.count()


class BlockDriverState(Protocol):
    """The node surface virtio-blk uses (docs/interfaces.md)."""

    node_name: str
    read_only: bool

    @property
    def length(self) -> int: ...
    @property
    def logical_block_size(self) -> int: ...
    @property
    def request_alignment(self) -> int: ...
    @property
    def aio(self) -> str: ...

    def attach_aio_context(self, ctx: AioContextLike) -> None: ...
    def detach_aio_context(self) -> None: ...
    def preadv(self, offset: int, iov: Sequence[memoryview],
               cb: CompletionCB) -> None: ...
    def pwritev(self, offset: int, iov: Sequence[memoryview],
                cb: CompletionCB) -> None: ...
    def flush(self, cb: CompletionCB) -> None: ...
    def pdiscard(self, offset: int, nbytes: int,
                 cb: CompletionCB) -> None: ...
    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: CompletionCB) -> None: ...
    def io_plug(self) -> None: ...
    def io_unplug(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CacheMode:
    """One row of the ``-drive cache=`` table."""

    #: cache.direct: O_DIRECT.
    direct: bool
    #: The guest sees a volatile write cache (else writes are flushed).
    writeback: bool
    #: cache.no-flush: FLUSH does nothing.
    no_flush: bool


_CACHE_MODES = {
    "writeback": CacheMode(direct=False, writeback=True, no_flush=False),
    "none": CacheMode(direct=True, writeback=True, no_flush=False),
    "off": CacheMode(direct=True, writeback=True, no_flush=False),
    "writethrough": CacheMode(direct=False, writeback=False,
                              no_flush=False),
    "directsync": CacheMode(direct=True, writeback=False, no_flush=False),
    "unsafe": CacheMode(direct=False, writeback=True, no_flush=True),
}


def parse_cache_mode(mode: str) -> CacheMode:
    """``bdrv_parse_cache_mode``: the ``-drive cache=`` value's meaning."""
    try:
        return _CACHE_MODES[mode]
    except KeyError:
        raise ConfigError("invalid cache option") from None


def parse_aio(value: object) -> str:
    """Check an ``aio`` value (``bdrv_parse_aio`` / the QAPI enum)."""
    if value not in AIO_MODES:
        raise ConfigError(
            f"Parameter 'aio' does not accept value '{value}'")
    return str(value)


def _flatten(opts: Mapping[str, object], prefix: str = ""
             ) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, val in opts.items():
        if isinstance(val, Mapping):
            flat.update(_flatten(val, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = val
    return flat


def _bool(opts: Mapping[str, object], key: str, default: bool) -> bool:
    val = opts.get(key, default)
    if isinstance(val, bool):
        return val
    if val in ("on", "true", "yes"):
        return True
    if val in ("off", "false", "no"):
        return False
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off'")


def _uint(opts: Mapping[str, object], key: str) -> int:
    val = opts.get(key, 0)
    try:
        n = int(str(val))
    except (TypeError, ValueError):
        raise ConfigError(f"Parameter '{key}' expects integer") from None
    if isinstance(val, bool) or n < 0:
        raise ConfigError(
            f"Parameter '{key}' expects a non-negative integer")
    return n


def _check_keys(opts: Mapping[str, object], allowed: set[str]) -> None:
    for key in opts:
        if key not in allowed and not key.startswith("faults."):
            raise ConfigError(f"Parameter '{key}' is unexpected")


#: ``discard``: the -blockdev enum plus -drive's on/off spellings.
_DISCARD = {"ignore": False, "off": False, "unmap": True, "on": True}


def _discard(opts: Mapping[str, object]) -> bool:
    val = opts.get("discard", "ignore")
    if val not in _DISCARD:
        raise ConfigError(
            f"Parameter 'discard' does not accept value '{val}'")
    return _DISCARD[str(val)]


def _enum(opts: Mapping[str, object], key: str,
          values: tuple[str, ...]) -> None:
    """A QAPI enum option: only its values (accepted, not acted on)."""
    val = opts.get(key)
    if val is not None and val not in values:
        raise ConfigError(
            f"Parameter '{key}' does not accept value '{val}'")


def _faults(opts: Mapping[str, object]) -> FaultSpec | None:
    sub = {k[len("faults."):]: str(v) for k, v in opts.items()
           if k.startswith("faults.")}
    return FaultSpec.from_options(sub) if sub else None


def _open_file(opts: Mapping[str, object]) -> FilePosixNode:
    driver = str(opts["driver"])
    _check_keys(opts, _FILE_KEYS)
    if "filename" not in opts:
        raise ConfigError("Parameter 'filename' is missing")
    aio = parse_aio(opts.get("aio", "threads"))
    direct = _bool(opts, "cache.direct", False)
    _enum(opts, "locking", ("off", "on", "auto"))
    _enum(opts, "detect-zeroes", ("off", "on", "unmap"))
    # aio=native without cache.direct is refused by FilePosixNode, after
    # the open, where QEMU's raw_open_common checks it.
    node_name = str(opts.get("node-name") or f"#block{next(_node_ids)}")
    return FilePosixNode(FileOptions(
        filename=str(opts["filename"]),
        node_name=node_name,
        driver=driver,
        aio=aio,
        direct=direct,
        no_flush=_bool(opts, "cache.no-flush", False),
        read_only=_bool(opts, "read-only", False),
        aio_max_batch=_uint(opts, "aio-max-batch"),
        write_cache=_bool(opts, "write-cache", True),
        discard_unmap=_discard(opts),
        faults=_faults(opts),
    ))


def open_blockdev(options: Mapping[str, object],
                  nodes: Mapping[str, BlockDriverState] | None = None
                  ) -> BlockDriverState:
    """Open a node from ``-blockdev`` options.

    ``nodes`` maps node names already open, for ``driver=raw,file=NAME``.

    :raises ConfigError: a bad option, with QEMU's message.
    :raises BlockError: the file cannot be opened.
    """
    opts = _flatten(options)
    driver = opts.get("driver")
    if driver is None:
        raise ConfigError("Parameter 'driver' is missing")
    if driver in ("file", "host_device"):
        return _open_file(opts)
    if driver != "raw":
        raise ConfigError(
            f"Parameter 'driver' does not accept value '{driver}'")
    child_opts = {k[5:]: v for k, v in opts.items()
                  if k.startswith("file.")}
    top = {k: v for k, v in opts.items() if not k.startswith("file.")}
    _check_keys(top, _RAW_KEYS)
    _enum(top, "detect-zeroes", ("off", "on", "unmap"))
    if child_opts:
        for key in ("read-only", "cache.direct", "cache.no-flush",
                    "discard"):
            if key in top:
                child_opts.setdefault(key, top[key])
        child = open_blockdev(child_opts, nodes)
        owns = True
    elif "file" in top:
        name = str(top["file"])
        child_node = (nodes or {}).get(name)
        if child_node is None:
            raise ConfigError(
                f"Cannot find device='' nor node-name='{name}'")
        child = child_node
        owns = False
    else:
        raise ConfigError("Parameter 'file' is missing")
    node_name = str(top.get("node-name") or f"#block{next(_node_ids)}")
    raw = RawFormatNode(node_name, child,
                        _bool(top, "read-only", child.read_only), owns)
    raw.discard_unmap = _discard(top)
    return raw


class RawFormatNode:
    """``driver=raw``: a pass-through format node over a protocol node.

    Owns its child only when it opened it from ``file.*`` options;
    closing the raw node then closes the child too.
    """

    def __init__(self, node_name: str, child: BlockDriverState,
                 read_only: bool, owns_child: bool = True) -> None:
        self.node_name = node_name
        self.file = child
        self.read_only = read_only or child.read_only
        self.owns_child = owns_child
        #: ``discard=unmap`` on this node (else DISCARD stops here).
        self.discard_unmap = False
        self.ctx: AioContextLike | None = None

    @property
    def length(self) -> int:
        return self.file.length

    @property
    def logical_block_size(self) -> int:
        return self.file.logical_block_size

    @property
    def request_alignment(self) -> int:
        return self.file.request_alignment

    @property
    def aio(self) -> str:
        return self.file.aio

    def attach_aio_context(self, ctx: AioContextLike) -> None:
        self.ctx = ctx
        self.file.attach_aio_context(ctx)

    def detach_aio_context(self) -> None:
        self.file.detach_aio_context()
        self.ctx = None

    def preadv(self, offset: int, iov: Sequence[memoryview],
               cb: CompletionCB) -> None:
        self.file.preadv(offset, iov, cb)

    def pwritev(self, offset: int, iov: Sequence[memoryview],
                cb: CompletionCB) -> None:
        if self.read_only and not self.file.read_only:
            # The child is writable, so it would not refuse: do it here.
            self._refuse(cb)
            return
        self.file.pwritev(offset, iov, cb)

    def _refuse(self, cb: CompletionCB) -> None:
        self._finish_soon(cb, -errno.EPERM)

    def _finish_soon(self, cb: CompletionCB, ret: int) -> None:
        if self.ctx is None:
            raise BlockError(
                f"node '{self.node_name}' has no AioContext attached")
        self.ctx.bh_schedule_oneshot(lambda: cb(ret))

    def flush(self, cb: CompletionCB) -> None:
        self.file.flush(cb)

    def pdiscard(self, offset: int, nbytes: int, cb: CompletionCB) -> None:
        if self.read_only and not self.file.read_only:
            self._refuse(cb)
            return
        if not self.discard_unmap:
            self._finish_soon(cb, 0)
            return
        self.file.pdiscard(offset, nbytes, cb)

    def pwrite_zeroes(self, offset: int, nbytes: int, may_unmap: bool,
                      cb: CompletionCB) -> None:
        if self.read_only and not self.file.read_only:
            self._refuse(cb)
            return
        self.file.pwrite_zeroes(offset, nbytes,
                                may_unmap and self.discard_unmap, cb)

    def io_plug(self) -> None:
        self.file.io_plug()

    def io_unplug(self) -> None:
        self.file.io_unplug()

    def close(self) -> None:
        if self.owns_child:
            self.file.close()
        else:
            self.file.detach_aio_context()
