"""fio's workload language for the guest side of qiothread.

- :mod:`qiothread.fio.options`: fio's option names, value syntax and
  checks (:class:`JobOptions`);
- :mod:`qiothread.fio.jobfile`: fio INI job files;
- :mod:`qiothread.fio.iolog`: iolog v2/v3 replay files;
- :mod:`qiothread.fio.workload`: the I/O generator of one job and the
  loop that drives it through the guest driver.
"""

from qiothread.fio.iolog import IoLog, load_iolog, parse_iolog
from qiothread.fio.jobfile import JobFile, load_jobfile, parse_jobfile
from qiothread.fio.options import (
    Ddir,
    FioOptionError,
    JobOptions,
    ReadWrite,
    VerifyKind,
    parse_fio_args,
)

__all__ = [
    "Ddir",
    "FioOptionError",
    "IoLog",
    "JobFile",
    "JobOptions",
    "ReadWrite",
    "VerifyKind",
    "load_iolog",
    "load_jobfile",
    "parse_fio_args",
    "parse_iolog",
    "parse_jobfile",
]
