"""``qiothread run``: one job, end to end, reported in fio's formats.

A run reads its command line in three vocabularies, kept apart by
:func:`qiothread.qemu_opts.split_argv`: QEMU's options for the machine
(:mod:`qiothread.options`), fio's for the workload
(:mod:`qiothread.fio`), and a few of its own (``--image``).  With no
arguments at all it still runs a real job, QEMU's and fio's defaults
made concrete:

- a raw image of :data:`DEFAULT_IMAGE_SIZE` bytes, prefilled with a
  verifiable pattern (never sparse: holes would be served without
  touching the disk), created once in ``$XDG_CACHE_HOME/qiothread`` (or
  ``~/.cache/qiothread``) and reused;
- one iothread with QEMU's defaults (``poll-max-ns=32768``);
- one virtio-blk device with one queue per job on that image,
  ``aio=native,cache.direct=on`` -- where the file system refuses
  O_DIRECT (tmpfs before Linux 6.6, some FUSE file systems),
  ``aio=threads,cache.direct=off`` with a warning,
  and where Linux AIO cannot start, the backend falls back to the
  thread pool as QEMU's file-posix does;
- 4k random reads at queue depth 1, time based, for 5 seconds.

fio options refine that default job (``--rw=randwrite`` keeps the rest;
saying how long or how much -- ``--runtime``, ``--time_based``,
``--size``, ``--read_iolog`` -- replaces the default duration); a job
file replaces it all.  As on fio's command line, options before the
first ``--name`` are global, and each ``--name`` starts a job; global
command-line options are applied after a job file's own.

Output: fio's normal text (default), ``json`` or ``json+``
(``--output-format``, comma-separated for several), to stdout or
``--output=FILE``.  Warnings and the progress line go to stderr; the
progress line only when stderr is a terminal and the job is planned for
more than :data:`PROGRESS_MIN_S` seconds, so that JSON on stdout is
never mixed with it.  Ctrl-C stops the guests, and the run still
reports what it measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from qiothread.errors import QiothreadError
from qiothread.fio.jobfile import load_jobfile
from qiothread.fio.options import (
    FioOptionError,
    JobOptions,
    parse_fio_args,
)
from qiothread.keyval import parse_option
from qiothread.machine import Machine, MachineOutcome
from qiothread.options import HelpRequested, build_machine_config
from qiothread.qemu_opts import OptionError, split_argv
from qiothread.report.model import RunReport
from qiothread.vmconfig import MachineConfig

__all__ = [
    "DEFAULT_DURATION",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_JOB",
    "Progress",
    "RunPlan",
    "build_report",
    "default_image_path",
    "ensure_default_image",
    "execute",
    "main",
    "plan_run",
    "write_outputs",
]

#: Size of the default image: large enough that 4k random reads miss
#: any device cache a loop or file system might add, small enough to
#: create in seconds.
DEFAULT_IMAGE_SIZE = 256 << 20
#: The default workload, as fio options (module text).
DEFAULT_JOB: tuple[tuple[str, str | None], ...] = (
    ("rw", "randread"), ("bs", "4k"), ("iodepth", "1"))
#: The default duration: dropped when the user says how long or how
#: much (any of :data:`_DURATION_OPTIONS`).
DEFAULT_DURATION: tuple[tuple[str, str | None], ...] = (
    ("runtime", "5"), ("time_based", None))
_DURATION_OPTIONS = ("runtime", "timeout", "time_based", "size",
                     "read_iolog")
#: The progress line appears only for jobs planned longer than this.
PROGRESS_MIN_S = 2.0
_OUTPUT_FORMATS = ("normal", "json", "json+")
_OWN_OPTIONS = ("image", "output", "output-format")
#: QEMU options of a pasted VM command line that have no meaning
#: without a VM; they are refused by name, not as typos.
_UNMODELLED_QEMU_OPTIONS = frozenset((
    "M", "machine", "m", "smp", "cpu", "enable-kvm", "accel", "bios",
    "nographic", "display", "vga", "serial", "monitor", "kernel",
    "initrd", "append", "netdev", "nic", "net", "cdrom", "hda", "boot",
    "name", "daemonize", "pidfile", "S", "no-reboot", "rtc", "global",
    "numa", "usb", "vnc", "spice", "L", "snapshot"))
_UNMODELLED = ("not modelled by qiothread, which runs no VM: it takes "
               "-object iothread, -blockdev, -drive, -device "
               "virtio-blk-pci, -trace, -msg, -D, -qmp, -chardev and "
               "-mon")


@dataclasses.dataclass
class RunPlan:
    """What a run will do, before anything is created."""

    config: MachineConfig
    jobs: list[JobOptions]
    global_options: tuple[tuple[str, str], ...]
    output_formats: tuple[str, ...] = ("normal",)
    output: str | None = None
    #: The default image in use (created if missing), or None.
    image: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


def default_image_path() -> Path:
    """``$XDG_CACHE_HOME/qiothread/default-256M.raw``."""
    base = os.environ.get("XDG_CACHE_HOME") or \
        str(Path.home() / ".cache")
    return Path(base) / "qiothread" / \
        f"default-{DEFAULT_IMAGE_SIZE >> 20}M.raw"


def _split_own(rest: Sequence[str]) -> tuple[dict[str, str], list[str],
                                              list[str]]:
    """Take qiothread's own options and job files out of ``rest``."""
    own: dict[str, str] = {}
    fio: list[str] = []
    files: list[str] = []
    for word in rest:
        name, sep, value = word[2:].partition("=")
        if word.startswith("--") and name in _OWN_OPTIONS:
            if not sep or not value:
                raise FioOptionError(
                    f"fio: option '--{name}' requires an argument")
            own[name] = value
        elif word.startswith("-") and not word.startswith("--") and \
                len(word) > 1 and "=" not in word:
            # fio's options are --name=value; a lone -word is a QEMU
            # option qiothread does not model, or not QEMU's at all.
            if word[1:] in _UNMODELLED_QEMU_OPTIONS:
                raise OptionError(word[1:], None, _UNMODELLED)
            raise OptionError(word[1:], None, "invalid option")
        elif word.startswith("-"):
            fio.append(word)
        else:
            files.append(word)
    return own, fio, files


def _jobs(fio_args: list[str], files: list[str]
          ) -> tuple[list[JobOptions], tuple[tuple[str, str], ...]]:
    pairs = parse_fio_args(fio_args)
    global_pairs: list[tuple[str, str | None]] = []
    per_job: list[list[tuple[str, str | None]]] = []
    for name, value in pairs:
        if name.lower() == "name":
            per_job.append([(name, value)])
        elif per_job:
            per_job[-1].append((name, value))
        else:
            global_pairs.append((name, value))
    given = tuple((k, v) for k, v in global_pairs if v is not None)
    jobs: list[JobOptions] = []
    if files:
        for path in files:
            try:
                jobfile = load_jobfile(path)
            except UnicodeDecodeError:
                # Most likely a disk image given as QEMU takes one
                # (``qemu disk.img``); here a bare word is a job file.
                raise FioOptionError(
                    f"fio: '{path}' is not a job file (not text); give "
                    "a disk image with --image=PATH or -drive "
                    "file=PATH,...") from None
            given = jobfile.global_options + given
            jobs += [j.with_options(global_pairs) for j in jobfile.jobs]
    if not per_job and not files:
        per_job.append([])
    base = JobOptions()
    if not files:
        given_names = {n.lower() for n, _ in pairs}
        defaults = DEFAULT_JOB
        if not given_names & set(_DURATION_OPTIONS):
            defaults += DEFAULT_DURATION
        base = base.with_options(defaults)
    for job_pairs in per_job:
        jobs.append(base.with_options([*global_pairs, *job_pairs]))
    expanded = [clone for j in jobs for clone in j.expand_numjobs()]
    return expanded, given


def _o_direct_works(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _default_machine(image: Path, iothread: str | None,
                     warnings: list[str]) -> list[tuple[str, str]]:
    """QEMU options of the default drive (module text), on the first
    user-given iothread or on a new one with QEMU's defaults."""
    direct = _o_direct_works(image)
    engine = "aio=native,cache.direct=on" if direct else \
        "aio=threads,cache.direct=off"
    if not direct:
        warnings.append(f"qiothread: warning: {image}: the file system "
                        "refuses O_DIRECT; using " + engine)
    args = [] if iothread else [("object", "iothread,id=iothread0")]
    return [*args,
        ("blockdev", f"driver=file,node-name=file0,filename={image},"
                     f"{engine}"),
        ("blockdev", "driver=raw,node-name=disk0,file=file0"),
        ("device", "virtio-blk-pci,id=virtio-disk0,drive=disk0,"
                   f"iothread={iothread or 'iothread0'}")]


def plan_run(argv: Sequence[str]) -> RunPlan:
    """Read a ``qiothread run`` command line (module text).

    Creates the default image when it is needed and missing; nothing
    else is created.

    :raises OptionError: a bad QEMU option (QEMU's message).
    :raises FioOptionError: a bad fio option or job file (fio's).
    :raises HelpRequested: an option asked for help.
    """
    qemu, rest = split_argv(argv)
    own, fio_args, files = _split_own(rest)
    jobs, given = _jobs(fio_args, files)
    formats = tuple(own.get("output-format", "normal").split(","))
    for fmt in formats:
        if fmt not in _OUTPUT_FORMATS:
            raise FioOptionError(
                f"fio: invalid output format {fmt} (normal, json and "
                "json+ are supported)")
    warnings: list[str] = []
    image: Path | None = None
    if not any(name in ("device", "drive", "blockdev")
               for name, _ in qemu):
        # The user's own options are checked (and asked help given)
        # before anything is created, as QEMU does.
        build_machine_config(qemu, len(jobs))
        image = Path(own["image"]) if "image" in own \
            else default_image_path()
        ensure_default_image(image)
        defaults = _default_machine(image, _first_iothread(qemu),
                                    warnings)
        qemu = [*qemu, *defaults]
    config = build_machine_config(qemu, len(jobs))
    return RunPlan(config=config, jobs=jobs, global_options=given,
                   output_formats=formats, output=own.get("output"),
                   image=image, warnings=warnings + config.warnings)


def _first_iothread(qemu: list[tuple[str, str]]) -> str | None:
    """The id of the first ``-object iothread``, if it reads as one (a
    bad option is reported later, in QEMU's order)."""
    for name, arg in qemu:
        if name != "object":
            continue
        try:
            data = parse_option(arg, "qom-type").data
        except QiothreadError:
            return None
        ident = data.get("id")
        if data.get("qom-type") == "iothread" and isinstance(ident, str):
            return ident
    return None


def ensure_default_image(path: Path) -> None:
    """Create the prefilled default image at ``path`` unless it exists.

    ``create_pattern_image`` writes a temporary file and renames it, so
    an interrupted creation never leaves a half-filled image to reuse.
    """
    if path.exists():
        return
    from blockdev.images import create_pattern_image

    path.parent.mkdir(parents=True, exist_ok=True)
    create_pattern_image(path, DEFAULT_IMAGE_SIZE)


class Progress:
    """fio's status line on stderr, refreshed about once a second::

        Jobs: 2 (f=2): [r(2)][40.0%][r=30.2MiB/s][r=7734 IOPS][eta 00m:03s]

    Only for a terminal (never mixed into output that is piped or
    parsed) and only for jobs planned longer than
    :data:`PROGRESS_MIN_S`.  Counts come from the guest drivers'
    published counters in guest memory, read without stopping anyone.
    """

    def __init__(self, plan: RunPlan, stream: TextIO) -> None:
        self.stream = stream
        self.planned_ns = max(j.ramp_time_ns + j.runtime_ns
                              for j in plan.jobs)
        self.bs = plan.jobs[0].bs[0] if plan.jobs else 4096
        self.kind = "".join(sorted({"r" if d == 0 else "w"
                                    for j in plan.jobs
                                    for d in j.rw.directions}))
        self.start = time.monotonic_ns()
        self.last = (self.start, 0)
        self.shown = False

    @classmethod
    def wanted(cls, plan: RunPlan, stream: TextIO) -> Progress | None:
        """A progress line for ``plan`` on ``stream``, if it should
        have one (module text)."""
        if not plan.jobs or not stream.isatty():
            return None
        longest = max(j.ramp_time_ns + j.runtime_ns for j in plan.jobs)
        if longest <= PROGRESS_MIN_S * 1e9:
            return None
        return cls(plan, stream)

    def __call__(self, machine: Machine) -> None:
        now = time.monotonic_ns()
        if now - self.last[0] < 900_000_000:
            return
        done = machine.completed_ios()
        dt = (now - self.last[0]) / 1e9
        iops = (done - self.last[1]) / dt if dt > 0 else 0.0
        self.last = (now, done)
        running = sum(1 for g in machine.guests if g.returncode is None)
        elapsed = now - self.start
        pct = min(100.0, 100.0 * elapsed / self.planned_ns)
        eta = max(0, (self.planned_ns - elapsed) // 1_000_000_000)
        bw = iops * self.bs / (1 << 20)
        k = self.kind or "r"
        self.stream.write(
            f"\rJobs: {running} (f={running}): [{k}({running})]"
            f"[{pct:.1f}%][{k}={bw:.1f}MiB/s][{k}={iops:.0f} IOPS]"
            f"[eta {eta // 60:02d}m:{eta % 60:02d}s]\x1b[K")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        """End the line so that later output starts on its own."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def build_report(plan: RunPlan, outcome: MachineOutcome) -> RunReport:
    """fio's report of the jobs plus qiothread's own section."""
    from qiothread.report.host import host_facts
    from qiothread.report.model import (
        IoRecords,
        QiothreadSection,
        StageLatency,
    )

    records = IoRecords.concat([r.measured() for r in outcome.results])
    stages = [StageLatency(name, samples)
              for name, samples in records.stages().items()]
    host = host_facts()
    host["engines"] = dict(outcome.engines)
    policies = sorted({t.policy for t in plan.config.iothreads}) or ["7.2"]
    section = QiothreadSection(iothreads=outcome.iothreads,
                               queues=outcome.queues, stages=stages,
                               host=host, qemu_policy=",".join(policies))
    return RunReport(jobs=outcome.results,
                     global_options=plan.global_options,
                     qiothread=section, timestamp_s=time.time())


def write_outputs(plan: RunPlan, report: RunReport, out: TextIO,
                  outcome: MachineOutcome | None = None) -> None:
    """The report in each requested format, then fio's latency logs.

    In JSON, each queue of the ``qiothread`` section also carries what
    the guest driver on it counted itself (``guest``), beside the
    device's numbers, so that the two sides can be checked against each
    other and against the jobs' ``total_ios``.
    """
    from qiothread.report.fio_json import build_fio_json, dumps_fio
    from qiothread.report.latlog import write_lat_logs
    from qiothread.report.summary import render_summary

    for fmt in plan.output_formats:
        if fmt == "normal":
            out.write(render_summary(report))
        else:
            doc = build_fio_json(report, plus=fmt == "json+")
            if outcome is not None:
                _add_guest_counters(doc, outcome)
            out.write(dumps_fio(doc))
    for i, result in enumerate(report.jobs):
        name = result.options.write_lat_log
        if name:
            write_lat_logs(result, name, i + 1)


def _add_guest_counters(doc: dict[str, Any], outcome: MachineOutcome
                        ) -> None:
    queues = doc.get("qiothread", {}).get("queues", [])
    by_key = {(q.device, q.queue): c for q, c in
              zip(outcome.queues, outcome.guest_counters, strict=False)}
    for entry in queues:
        counters = by_key.get((entry.get("device"), entry.get("queue")))
        if counters is not None:
            entry["guest"] = dict(counters)


def execute(plan: RunPlan,
            on_json: Callable[[dict[str, Any]], None] | None = None
            ) -> int:
    """Run ``plan`` and report it; returns the exit status.

    1 when a child failed, a device broke, or a job saw an I/O error or
    a verify mismatch (after reporting what was measured), 0 otherwise
    -- also after Ctrl-C, as fio exits.
    ``on_json`` gets the JSON document (as ``--output-format=json``
    writes it) after the outputs were written: CI budgets check it.
    """
    progress = Progress.wanted(plan, sys.stderr)
    try:
        # Jobs are placed on queues when the machine is made: a job
        # without a device, or more jobs than queues, fails here.
        machine = Machine(plan.config, plan.jobs)
        outcome = machine.run(progress)
    except QiothreadError as e:
        if progress is not None:
            progress.finish()
        sys.stderr.write(f"qiothread: {e}\n")
        return 1
    except KeyboardInterrupt:
        # Before the guests ran (or a second Ctrl-C): nothing measured;
        # everything was released on the way out.
        sys.stderr.write("qiothread: interrupted\n")
        return 130
    if progress is not None:
        progress.finish()
    report = build_report(plan, outcome)
    with contextlib.ExitStack() as stack:
        out: TextIO = sys.stdout
        if plan.output:
            out = stack.enter_context(
                open(plan.output, "w", encoding="utf-8"))
        try:
            write_outputs(plan, report, out, outcome)
            out.flush()
        except BrokenPipeError:
            # The reader went away (``| head``): what it read is what
            # it wanted.  Point stdout at /dev/null so that the
            # interpreter's final flush does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    if on_json is not None:
        from qiothread.report.fio_json import build_fio_json
        doc = build_fio_json(report)
        _add_guest_counters(doc, outcome)
        on_json(doc)
    status = 0
    for err in outcome.errors:
        sys.stderr.write(f"qiothread: {err}\n")
        status = 1
    for b in outcome.broken:
        sys.stderr.write(f"qiothread: virtio-blk {b}\n")
        status = 1
    # As fio: a job that saw an I/O error or a verify mismatch fails
    # the run (exit 1), after its report.
    for r in outcome.results:
        name = r.options.name
        if r.verify_mismatches:
            first = f" (first: {r.verify_errors[0]})" \
                if r.verify_errors else ""
            sys.stderr.write(f"qiothread: job '{name}': "
                             f"{r.verify_mismatches} verify mismatches"
                             f"{first}\n")
            status = 1
        if r.error:
            sys.stderr.write(f"qiothread: job '{name}': I/O error: "
                             f"{os.strerror(r.error)}\n")
            status = 1
    if outcome.interrupted:
        sys.stderr.write("qiothread: stopped early; the report covers "
                         "what was measured\n")
    return status


def main(argv: Sequence[str],
         on_json: Callable[[dict[str, Any]], None] | None = None) -> int:
    """``qiothread run``; returns the exit status."""
    try:
        plan = plan_run(argv)
    except HelpRequested as h:
        sys.stdout.write(h.text)
        return 0
    except QiothreadError as e:
        sys.stderr.write(f"qiothread: {e}\n")
        return 1
    for w in plan.warnings:
        sys.stderr.write(w if w.startswith("qiothread:") else
                         f"qiothread: {w}")
        sys.stderr.write("\n")
    return execute(plan, on_json)
