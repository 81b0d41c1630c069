"""blockdev: raw files and block devices as QEMU's file-posix serves them.

Engines (thread pool, Linux AIO, io_uring) are per AioContext and expose
a pollable completion source; loop devices, test images and fault
injection live here too.
"""

from typing import Any

__all__ = ["open_blockdev"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing blockdev.memory (or images) does not pull
    # in the engines and their libraries.
    if name == "open_blockdev":
        from blockdev.options import open_blockdev
        return open_blockdev
    raise AttributeError(f"module 'blockdev' has no attribute {name!r}")
