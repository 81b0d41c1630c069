"""The ``qiothread`` command.

::

    qiothread run [QEMU options] [fio options] [JOBFILE ...]

``run`` is the main job (:mod:`qiothread.run`).  Errors are printed as
QEMU prints them, ``qiothread: -device ...: message``, and exit with
status 1, as QEMU exits on a bad option; fio option errors keep fio's
words.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import qiothread

__all__ = ["main"]

USAGE = """\
usage: qiothread run [QEMU options] [fio options] [JOBFILE ...]

Runs QEMU 7.2's iothreads, virtio-blk dataplane and adaptive polling
against a real file or block device, with fio workloads in guest
processes, and reports in fio's formats.

QEMU options (as QEMU spells them):
  -object iothread,id=ID[,poll-max-ns=N][,poll-grow=N][,poll-shrink=N]
          [,aio-max-batch=N][,thread-pool-min=N][,thread-pool-max=N]
          [,poll-policy=7.2|8.0|8.2|10.0|weighted][,poll-weight=N]
  -blockdev driver=file|host_device,node-name=N,filename=F
          [,aio=threads|native|io_uring][,cache.direct=on|off]...
  -drive if=none,id=ID,file=F,format=raw[,cache=MODE][,aio=ENGINE]
  -device virtio-blk-pci,drive=ID[,iothread=ID][,num-queues=N]
          [,queue-size=N][,request-merging=on|off][,event_idx=on|off]
  -device '{"driver":"virtio-blk-pci","drive":"ID",
            "iothread-vq-mapping":[{"iothread":"ID"},...]}'
  -trace [enable=]PATTERN[,file=F] | -trace events=FILE   -D FILE
  -msg timestamp=on
  -qmp unix:PATH,server=on,wait=off
  -chardev socket,id=ID,path=PATH,server=on,wait=off
  -mon chardev=ID,mode=control
  Lists: -object help, -object iothread,help, -device help,
         -device virtio-blk-pci,help, -trace help

fio options (as fio spells them): --name=, --rw=, --bs=, --iodepth=,
  --numjobs=, --runtime=, --time_based, --size=, --offset=,
  --rate_iops=, --thinktime=, --ramp_time=, --verify=, --rwmixread=,
  --read_iolog=, --write_lat_log=, --percentile_list=, ...
  and job files (INI).  --output-format=normal|json|json+ and
  --output=FILE as in fio.

qiothread options:
  --image=PATH   the raw image of the default drive (default: one
                 created once in $XDG_CACHE_HOME/qiothread)

With no QEMU device options, the run uses one iothread with QEMU's
defaults and one virtio-blk device with one queue per job on the
default image (aio=native, cache.direct=on); with no fio options,
4k random reads at queue depth 1 for 5 seconds.

CI budgets (exit status 3 and a line per failed budget):
  --expect 'read.clat_ns.p99<500us'  --expect 'iops>5k'  --expect-file=F

Poll-tuning experiments:
  qiothread sweep --param NAME=V1,V2,... [--param ...] [--repeat N]
                  --output-dir DIR [run options]
  qiothread report DIR
  qiothread replay TRACE|IOLOG [--policy 7.2,8.0,...] [--help]
"""


#: Poll-tuning commands: name -> (module, entry point).
_EXPERIMENTS = {"sweep": ("qiothread.sweep", "main"),
                "report": ("qiothread.sweep", "report_main"),
                "replay": ("qiothread.replay", "main")}


#: What asks for the usage, anywhere on a ``run`` command line (QEMU's
#: ``-h``/``-help`` and fio's ``--help``).
_HELP = ("-h", "-help", "--help")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qiothread`` console script."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C before a run took charge of it (while the modules
        # load, say): nothing was created yet, so nothing to release.
        sys.stderr.write("qiothread: interrupted\n")
        return 130


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"qiothread {qiothread.__version__}\n")
        return 0
    command, rest = args[0], args[1:]
    if command == "run":
        if any(a in _HELP for a in rest):
            sys.stdout.write(USAGE)
            return 0
        if any(a.startswith("--expect") for a in rest):
            from qiothread.budget import run_with_budgets
            return run_with_budgets(rest)
        from qiothread.run import main as run_main
        return run_main(rest)
    if command in _EXPERIMENTS:             # issue 7: qiothread.sweep ...
        module, func = _EXPERIMENTS[command]
        return int(getattr(importlib.import_module(module), func)(rest))
    sys.stderr.write(f"qiothread: unknown command '{command}'\n"
                     "Try 'qiothread --help'.\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
