"""Every error qiothread raises, in one tree.

::

    QiothreadError
    ├── ConfigError        a bad option or property; the message is
    │                      QEMU's own where QEMU has one
    ├── QMPCommandError    a QMP command refused (carries the QMP class)
    ├── VirtioError        the guest broke the virtio contract; the device
    │                      is marked broken (QEMU's virtio_error)
    ├── BlockError         a backend could not be opened or set up
    ├── ChildProcessError_ an iothread or guest process died
    └── InternalError      an invariant of ours is void: a bug

Data-path failures of the backend (EIO, ENOSPC) are not exceptions:
they travel as negative errno values to the request's completion and
reach the guest as a status byte, as in QEMU.
"""

from __future__ import annotations

__all__ = [
    "BlockError",
    "ChildProcessError_",
    "ConfigError",
    "InternalError",
    "QMPCommandError",
    "QiothreadError",
    "VirtioError",
]


class QiothreadError(Exception):
    """The root of every error this project raises on purpose."""


class ConfigError(QiothreadError):
    """A bad command-line option, property or QMP argument."""


class QMPCommandError(QiothreadError):
    """A QMP command failed; ``error_class`` is QEMU's class name."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        #: e.g. ``GenericError``, ``CommandNotFound``.
        self.error_class = error_class


class VirtioError(QiothreadError):
    """The guest broke the virtio contract (QEMU's ``virtio_error``)."""


class BlockError(QiothreadError):
    """A block backend could not be opened or configured."""


class ChildProcessError_(QiothreadError):
    """An iothread or guest process exited unexpectedly."""


class InternalError(QiothreadError):
    """An internal invariant does not hold: a bug in qiothread."""
