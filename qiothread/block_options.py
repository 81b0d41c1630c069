"""``-blockdev`` and ``-drive``: block nodes, as QEMU reads them.

``-blockdev`` is QAPI's ``BlockdevOptions`` (keyval or JSON): the base
members every driver has (``node-name``, ``cache.direct``,
``cache.no-flush``, ``read-only``, ``discard``, ``detect-zeroes``), then
the driver's own (``filename``, ``aio``, ``aio-max-batch``, ``locking``
for ``file`` and ``host_device``; ``file`` for ``raw``, either a node
reference or a nested node).  Types, enum values, missing and unexpected
members fail with the QObject visitor's messages; file-posix's own
checks (``aio=native`` without ``cache.direct=on``, a file that does not
open) are the backend's, made when :mod:`qiothread.machine` opens the
node with ``blockdev.open_blockdev``.

``-drive`` (QemuOpts) is the legacy form.  QEMU turns it into a
BlockBackend named by ``id`` over a format node over a protocol node;
``cache=`` sets ``cache.direct``/``cache.no-flush`` and the write cache
(reference §12), explicit ``cache.*`` keys win, ``aio=`` is checked
here (``invalid aio option``), a missing ``format=`` probes raw with
QEMU's warning, and a ``file=`` that is a block device gets the
``host_device`` driver, as QEMU's probing picks it.

``if=virtio`` also creates the ``virtio-blk-pci`` device for the drive,
as QEMU does (without an iothread: it runs in the main loop's context);
every other interface needs a controller qiothread does not have.

Both take qiothread's fault injection for the file node, as
``faults.KEY=VALUE`` (``latency``, ``jitter``, ``stall``, ``eio``,
``eio-fraction``, ``iops``, ``bps``, ``seed``; ``blockdev.faults``).

``raw`` is a pass-through here (no ``offset``/``size``): a raw node is
recorded as the ``format_node`` of the protocol node it sits on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

from blockdev.options import parse_cache_mode
from qiothread.errors import ConfigError
from qiothread.keyval import InputVisitor
from qiothread.qemu_opts import parse_bool
from qiothread.vmconfig import BlockNodeConfig

__all__ = ["drive_node", "visit_blockdev"]


#: QEMU 7.2's ``BlockdevDriver`` values; only the first three run here.
_SUPPORTED_DRIVERS = ("file", "host_device", "raw")
_QEMU_DRIVERS = (
    *_SUPPORTED_DRIVERS, "blkdebug", "blklogwrites", "blkreplay",
    "blkverify", "bochs",
    "cloop", "compress", "copy-before-write", "copy-on-read", "dmg",
    "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "http",
    "https", "io_uring", "iscsi", "luks", "nbd", "nfs", "null-aio",
    "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate",
    "qcow", "qcow2", "qed", "quorum", "rbd", "replication", "ssh",
    "throttle", "vdi", "vhdx", "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk", "vpc",
    "vvfat")


def _enum(v: InputVisitor, prefix: str, name: str,
          values: Sequence[str], required: bool = False) -> str | None:
    value = v.type_str(name, required)
    if value is not None and value not in values:
        raise ConfigError(f"Parameter '{prefix}{name}' does not accept "
                          f"value '{value}'")
    return value


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def visit_blockdev(v: InputVisitor, prefix: str = "") -> dict[str, Any]:
    """QEMU's ``BlockdevOptions`` visit, flattened: ``{"cache.direct":
    True, ...}`` with typed values; a nested ``file`` stays a dict.

    :raises ConfigError: QEMU's messages for missing, unexpected or
        mistyped members and bad enum values.
    """
    out: dict[str, Any] = {}
    driver = _enum(v, prefix, "driver", _QEMU_DRIVERS, required=True)
    assert driver is not None
    out["driver"] = driver
    _put(out, "node-name", v.type_str("node-name"))
    _put(out, "discard", _enum(v, prefix, "discard", ("ignore", "unmap")))
    cache = v.start_struct("cache")
    if cache is not None:
        _put(out, "cache.direct", cache.type_bool("direct"))
        _put(out, "cache.no-flush", cache.type_bool("no-flush"))
        cache.check_struct()
    for name in ("read-only", "auto-read-only", "force-share"):
        _put(out, name, v.type_bool(name))
    _put(out, "detect-zeroes",
         _enum(v, prefix, "detect-zeroes", ("off", "on", "unmap")))
    if driver in ("file", "host_device"):
        _put(out, "filename", v.type_str("filename", required=True))
        _put(out, "aio", _enum(v, prefix, "aio",
                               ("threads", "native", "io_uring")))
        _put(out, "aio-max-batch", v.type_int64("aio-max-batch"))
        _put(out, "locking", _enum(v, prefix, "locking",
                                   ("off", "on", "auto")))
        _put(out, "drop-cache", v.type_bool("drop-cache"))
        _faults(v, prefix, out)
    elif driver == "raw":
        ref = v.data.get("file")
        if isinstance(ref, dict):
            sub = v.start_struct("file", required=True)
            assert sub is not None
            out["file"] = visit_blockdev(sub, f"{prefix}file.")
        else:
            out["file"] = v.type_str("file", required=True)
        for name in ("offset", "size"):
            if v.type_int64(name) is not None:
                raise ConfigError(
                    f"raw '{name}' is not supported by qiothread")
    else:
        raise ConfigError(f"block driver '{driver}' is not supported "
                          "by qiothread (file, host_device and raw are)")
    v.check_struct()
    return out


def _faults(v: InputVisitor, prefix: str, out: dict[str, Any]) -> None:
    """qiothread's fault injection (``faults.latency=200us``,
    ``faults.eio=OFFSET+LEN``, ...): passed as flat strings to the
    backend, which checks names and values (``blockdev.faults``)."""
    faults = v.data.get("faults")
    if faults is None:
        return
    v.skip("faults")
    if not isinstance(faults, dict):
        raise ConfigError(f"Invalid parameter type for '{prefix}faults', "
                          "expected: object")
    for key, value in faults.items():
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"Invalid parameter type for "
                              f"'{prefix}faults.{key}', expected: string")
        out[f"faults.{key}"] = str(value)


# ---------------------------------------------------------------------
# -drive (legacy): mapped onto the same nodes as QEMU maps it

_DRIVE_KEYS = ("if", "id", "file", "format", "cache", "aio", "readonly",
               "read-only", "cache.direct", "cache.no-flush",
               "node-name", "media", "discard", "detect-zeroes",
               "aio-max-batch", "locking")
_DRIVE_LEGACY = ("index", "bus", "unit", "snapshot", "werror", "rerror",
                 "copy-on-read", "throttling", "addr", "serial", "boot",
                 "bps", "iops")
_OTHER_FORMATS = ("qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc",
                  "luks", "parallels", "bochs", "cloop", "dmg")


def drive_node(opts: dict[str, str], index: int,
           warn: Callable[[str], None]) -> BlockNodeConfig:
    iface = opts.get("if", "ide")
    if iface not in ("none", "virtio"):
        raise ConfigError(
            f"-drive if={iface} is not supported by qiothread; use "
            "if=none with -device virtio-blk-pci,drive=ID (or if=virtio)")
    for key in opts:
        if key in _DRIVE_LEGACY or key.split(".")[0] in _DRIVE_LEGACY:
            raise ConfigError(
                f"-drive option '{key}' is not supported by qiothread")
        if key not in _DRIVE_KEYS and not key.startswith("faults."):
            raise ConfigError(f"Block format 'raw' does not support the "
                              f"option '{key}'")
    drive_id = opts.get("id", f"none{index}")
    fmt = opts.get("format")
    if fmt is not None and fmt != "raw":
        if fmt in _OTHER_FORMATS:
            raise ConfigError(f"format '{fmt}' is not supported by "
                              "qiothread (raw only)")
        raise ConfigError(f"'{fmt}' invalid format")
    direct = no_flush = writethrough = False
    if "cache" in opts:
        mode = parse_cache_mode(opts["cache"])
        direct, no_flush = mode.direct, mode.no_flush
        writethrough = not mode.writeback
    if "cache.direct" in opts:
        direct = parse_bool("cache.direct", opts["cache.direct"])
    if "cache.no-flush" in opts:
        no_flush = parse_bool("cache.no-flush", opts["cache.no-flush"])
    aio = opts.get("aio", "threads")
    if aio not in ("threads", "native", "io_uring"):
        raise ConfigError("invalid aio option")
    if opts.get("media", "disk") != "disk":
        raise ConfigError(f"'{opts['media']}' invalid media")
    ro_key = "read-only" if "read-only" in opts else "readonly"
    read_only = parse_bool(ro_key, opts.get(ro_key, "off"))
    filename = opts.get("file")
    options: dict[str, Any] = {
        "node-name": opts.get("node-name", drive_id),
        "aio": aio, "cache.direct": direct, "cache.no-flush": no_flush,
        "read-only": read_only}
    if filename:
        options["driver"] = ("host_device" if _is_block_device(filename)
                             else "file")
        options["filename"] = filename
        if fmt is None:
            warn(f"warning: Image format was not specified for "
                 f"'{filename}' and probing guessed raw.")
    for key in ("discard", "detect-zeroes", "locking"):
        _put(options, key, opts.get(key))
    options.update({k: v for k, v in opts.items()
                    if k.startswith("faults.")})
    if "aio-max-batch" in opts:
        options["aio-max-batch"] = opts["aio-max-batch"]
    return BlockNodeConfig(name=drive_id, options=options,
                           format_node=opts.get("node-name"),
                           drive_id=drive_id, writethrough=writethrough,
                           empty=not filename)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
