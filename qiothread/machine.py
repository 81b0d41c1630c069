"""The VMM: builds the machine of a run, runs it, gathers what it measured.

What a QEMU process does between parsing its options and the guest's
first I/O is done here by the main process, in the same order, before
any child exists (DESIGN.md, "The data path"):

1. open every block node the devices use (``blockdev.open_blockdev``;
   file-posix's checks and messages, ``aio=native`` without
   ``cache.direct=on`` for one);
2. create guest memory (one memfd mapping) and, per virtqueue, its split
   ring, its two eventfds (host notifier = KVM's ioeventfd, guest
   notifier = the irqfd), a stage-stamp table and the guest driver's
   counter block (docs/interfaces.md);
3. realize each virtio-blk device over its node, negotiate features as
   Linux's virtio_blk would (everything offered but the legacy
   NOTIFY_ON_EMPTY), and point its per-queue counters at the shared
   block of :mod:`qiothread.vmm_shared`;
4. create the iothreads (:class:`~qiothread.iothread.IOThread`; devices
   without one get QEMU's main-loop context, which never busy-polls)
   and, in each iothread process before its loop starts, attach the
   queues it serves to its AioContext through
   :class:`~qiothread.dataplane.VirtIOBlockDataPlane` -- with QEMU 9.0's
   ``iothread-vq-mapping`` a device's queues are split over several
   iothreads, and each iothread process attaches only its own, the node
   attached to each context (an aio engine per iothread, as QEMU has
   one per AioContext);
5. start one guest process per fio job, on its own queue (a job is one
   vCPU; see :func:`assign_queues`), wait until every guest is ready,
   then release them together;
6. wait for the guests, watching every child: a child that dies stops
   the run with its last words; Ctrl-C (or QMP ``quit``) asks the
   guests to finish their in-flight I/O and still gathers everything;
7. read the counters (iothreads' polling statistics and CPU time,
   device and driver counters per queue), then stop and release it all.

Every resource is registered with the run's
:class:`~qiothread.process.Supervisor` as it is made, so that any exit
-- a bad option found late, a crashed child, Ctrl-C, SIGTERM -- stops
the children first and then frees memory, eventfds, nodes and files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

from blockdev.options import BlockDriverState, open_blockdev
from qiothread import trace
from qiothread.dataplane import VirtIOBlockDataPlane
from qiothread.errors import ChildProcessError_, ConfigError, QiothreadError
from qiothread.event_notifier import EventNotifier
from qiothread.fio.options import JobOptions
from qiothread.iothread import IOThread
from qiothread.machine_guest import GuestSpec, check_job, guest_main
from qiothread.process import Child, ReadyChannel, Supervisor
from qiothread.qemu_opts import OptionError
from qiothread.qom import ObjectRoot
from qiothread.report.model import (
    IOThreadStats,
    JobResult,
    QueueStats,
)
from qiothread.vmconfig import BlockNodeConfig, DeviceConfig, MachineConfig
from qiothread.vmm_acct import AccountedNode
from qiothread.vmm_shared import ACCT_FIELDS, ENGINES, VmmShared
from qiothread.vmm_stats import iothread_stats
from virtio.blk import BlockBackend, QueueSetup, VirtIOBlock
from virtio.blk_defs import VirtIOBlkConf
from virtio.driver import DRIVER_STATS_SIZE, alloc_vring, read_driver_stats
from virtio.guest import GuestBlkDriver
from virtio.memory import GuestMemory
from virtio.ring import VirtioFeature, VringLayout, feature_bit

__all__ = [
    "MAIN_LOOP",
    "Machine",
    "MachineOutcome",
    "QueueSlot",
    "assign_queues",
]

log = logging.getLogger(__name__)

#: The id of the context that serves devices without an iothread.
MAIN_LOOP = "main-loop"
#: Bytes reserved per queue for the guest driver's per-head scratch and
#: indirect tables (``virtio.guest``: 48 + 16 * (segments + 3) a head).
_GUEST_SCRATCH_PER_ENTRY = 48 + 16 * (32 + 3)
#: How often the wait loop wakes to watch children and show progress.
_TICK_S = 0.25
#: How long guests may take to finish their in-flight I/O once asked
#: to stop, before they are killed.
STOP_GRACE_S = 5.0


@dataclasses.dataclass
class QueueSlot:
    """One virtqueue of the machine (global numbering ``qslot``)."""

    qslot: int
    dslot: int
    device: DeviceConfig
    index: int
    iothread: str
    layout: VringLayout
    host: EventNotifier
    guest: EventNotifier
    stamps: int
    driver_stats: int


@dataclasses.dataclass
class MachineOutcome:
    """What :meth:`Machine.run` gathered."""

    results: list[JobResult]
    iothreads: list[IOThreadStats]
    queues: list[QueueStats]
    #: ``device: reason`` for each device marked broken.
    broken: list[str]
    #: Ctrl-C or ``quit`` stopped the guests before their end.
    interrupted: bool
    #: Children that failed (their last words), guests included.
    errors: list[str]
    #: node name -> the aio engine in use (after any fallback).
    engines: dict[str, str]
    #: Per queue (``queues`` order), the guest driver's own counters
    #: (``virtio.driver.DRIVER_STATS_FIELDS``): what the guests counted.
    guest_counters: list[dict[str, int]] = dataclasses.field(
        default_factory=list)


def assign_queues(config: MachineConfig, jobs: list[JobOptions]
                  ) -> list[tuple[int, int]]:
    """``(device index, queue index)`` for each job.

    A job is one vCPU with its own queue, as blk-mq gives each CPU one
    when there are as many queues as CPUs.  A job whose ``filename``
    names a device id (or its drive) goes to that device; the others go
    round-robin over the devices.  Within a device, jobs take queues
    0, 1, 2, ... in order.

    :raises ConfigError: no device, an unknown ``filename``, or more
        jobs on a device than it has queues.
    """
    if not config.devices:
        raise ConfigError(
            "no virtio-blk device to run the jobs on (add "
            "-device virtio-blk-pci,drive=...)")
    names = {}
    for i, d in enumerate(config.devices):
        names[d.id] = i
        names.setdefault(d.drive, i)
    used = [0] * len(config.devices)
    out: list[tuple[int, int]] = []
    rr = 0
    for job in jobs:
        if job.filename and job.filename in names:
            dev = names[job.filename]
        elif job.filename and len(config.devices) > 1:
            raise ConfigError(
                f"job '{job.name}': filename={job.filename} "
                "names no device (give a device id or drive)")
        else:
            dev = rr % len(config.devices)
            rr += 1
        q = used[dev]
        nq = config.devices[dev].num_queues
        if q >= nq:
            raise ConfigError(
                f"device '{config.devices[dev].id}' has {nq} "
                f"queue{'s' if nq > 1 else ''} but more jobs use it; "
                "each job needs its own queue (raise num-queues)")
        used[dev] += 1
        out.append((dev, q))
    return out


def _memory_size(config: MachineConfig, jobs: list[JobOptions]) -> int:
    total = 1 << 20
    for d in config.devices:
        n = d.queue_size
        ring = sum(VringLayout.sizes(n)) + 64
        total += d.num_queues * (ring + 16 * n + DRIVER_STATS_SIZE
                                 + _GUEST_SCRATCH_PER_ENTRY * n + 256)
    for j in jobs:
        # The job's data buffers (run_job allocates iodepth slots of the
        # largest block size, page-rounded) and the driver's scratch.
        total += j.iodepth * -(-max(max(j.bs), 512) // 4096) * 4096 + 8192
    return total


class Machine:
    """One run's machine (module text).  Main process, one thread."""

    def __init__(self, config: MachineConfig, jobs: list[JobOptions],
                 *, ready_timeout: float = 60.0) -> None:
        self.config = config
        self.jobs = jobs
        self.assignment = assign_queues(config, jobs)
        self.ready_timeout = ready_timeout
        self.sup = Supervisor()
        self.shared: VmmShared | None = None
        self.mem: GuestMemory | None = None
        self.nodes: dict[str, BlockDriverState] = {}
        self.vdevs: list[VirtIOBlock] = []
        self.queues: list[QueueSlot] = []
        self.root = ObjectRoot({"iothread": IOThread}, supervisor=self.sup,
                               type_options={"iothread": {
                                   "start_on_complete": False}})
        self.iothreads: dict[str, IOThread] = {}
        self.guests: list[Child] = []
        self._results_dir = ""
        self._go: EventNotifier | None = None
        #: Set by :meth:`request_quit` from any thread (QMP ``quit``).
        self._quit = False
        #: The QMP backend of this run (set by :meth:`run`).
        self.monitor: Any = None

    # -- building ------------------------------------------------------

    def build(self) -> None:
        """Steps 1-4 of the module text.  Call once, inside ``run``."""
        cfg = self.config
        try:
            trace.configure(cfg.trace.patterns, cfg.trace.file,
                            cfg.trace.timestamps)
        except OSError as e:
            # -D FILE and -trace file=FILE, in QEMU 7.2's words.
            raise ConfigError(f"Error opening logfile {cfg.trace.file}: "
                              f"{e.strerror}") from None
        self._results_dir = tempfile.mkdtemp(prefix="qiothread-run-")
        self.sup.callback(shutil.rmtree, self._results_dir, True)
        self._open_nodes()
        self._check_jobs()
        nqueues = sum(d.num_queues for d in cfg.devices)
        self.shared = VmmShared(nqueues, len(cfg.devices))
        self.sup.callback(self.shared.close)
        self.mem = GuestMemory.create(_memory_size(cfg, self.jobs))
        self.sup.callback(self.mem.close)
        for dslot, dev in enumerate(cfg.devices):
            self.vdevs.append(self._realize(dslot, dev))
        self._go = EventNotifier()
        self.sup.callback(self._go.close)
        self._create_iothreads()

    def _open_nodes(self) -> None:
        for node in self.config.nodes:
            users = [d for d in self.config.devices
                     if self.config.node(d.drive) is node]
            if not users:
                continue
            try:
                bs = open_blockdev(self._node_options(node, users[0]))
                self.sup.callback(bs.close)
                if node.format_node is not None:
                    raw = open_blockdev(
                        {"driver": "raw", "node-name": node.format_node,
                         "file": bs.node_name}, {bs.node_name: bs})
                    bs = raw
            except QiothreadError as e:
                option, arg = node.origin
                raise OptionError(option, arg, str(e)) from None
            self.nodes[node.name] = bs

    def _check_jobs(self) -> None:
        """Each job against the disk it will run on, before any child
        exists: a job that does not fit (or an unreadable iolog) fails
        here with fio's words, not in a guest with a traceback."""
        for job, (dslot, _) in zip(self.jobs, self.assignment,
                                   strict=True):
            node = self.config.node(self.config.devices[dslot].drive)
            assert node is not None
            check_job(job, self.nodes[node.name].length)

    @staticmethod
    def _node_options(node: BlockNodeConfig, dev: DeviceConfig
                      ) -> dict[str, Any]:
        """The node's options with the write cache the guest sees: the
        device's ``write-cache=on|off`` wins, ``auto`` follows the drive
        (``-drive cache=writethrough|directsync`` turn it off), as the
        BlockBackend's write cache does in QEMU."""
        opts = dict(node.options)
        if dev.write_cache != "auto":
            opts["write-cache"] = dev.write_cache == "on"
        elif node.writethrough:
            opts["write-cache"] = False
        return opts

    def _realize(self, dslot: int, dev: DeviceConfig) -> VirtIOBlock:
        assert self.mem is not None and self.shared is not None
        mem = self.mem
        node = self.config.node(dev.drive)
        assert node is not None
        bs = self.nodes[node.name]
        setups: list[QueueSetup] = []
        for q in range(dev.num_queues):
            layout = alloc_vring(mem, dev.queue_size)
            host, guest = EventNotifier(), EventNotifier()
            self.sup.callback(host.close)
            self.sup.callback(guest.close)
            stamps = mem.alloc(16 * dev.queue_size, 8)
            dstats = mem.alloc(DRIVER_STATS_SIZE, 8)
            slot = QueueSlot(len(self.queues), dslot, dev, q,
                             dev.queue_iothreads[q] or MAIN_LOOP, layout,
                             host, guest, stamps, dstats)
            self.queues.append(slot)
            setups.append(QueueSetup(layout, host, guest,
                                     driver_stats=dstats,
                                     stamp_table=stamps))
        conf = VirtIOBlkConf(
            num_queues=dev.num_queues, queue_size=dev.queue_size,
            serial=dev.serial, request_merging=dev.request_merging,
            event_idx=dev.event_idx, indirect_desc=dev.indirect_desc,
            discard=dev.discard, write_zeroes=dev.write_zeroes,
            seg_max_adjust=dev.seg_max_adjust, config_wce=dev.config_wce,
            logical_block_size=dev.logical_block_size,
            physical_block_size=dev.physical_block_size)
        # blockdev's node protocol declares its size attributes
        # read-only, virtio's settable: the same object satisfies both.
        vdev = VirtIOBlock(cast("BlockBackend", bs), conf, setups,
                           mem=mem, name=dev.id)
        # Linux's virtio_ring keeps every transport feature it knows but
        # the legacy NOTIFY_ON_EMPTY, and virtio_blk takes all the rest.
        vdev.set_features(vdev.host_features & ~feature_bit(
            VirtioFeature.NOTIFY_ON_EMPTY))
        first = self.queues[-dev.num_queues].qslot
        for q in range(dev.num_queues):
            vdev.stats[q] = self.shared.queue_stats(first + q)
        return vdev

    def _create_iothreads(self) -> None:
        for t in self.config.iothreads:
            obj = self.root.object_add_qmp(
                "iothread", t.id, {**t.props, "poll-policy": t.policy})
            assert isinstance(obj, IOThread)
            self.iothreads[t.id] = obj
        if any(s.iothread == MAIN_LOOP for s in self.queues):
            # QEMU's main-loop AioContext: poll parameters all 0.
            main = IOThread(MAIN_LOOP, supervisor=self.sup,
                            start_on_complete=False)
            main.set("poll-max-ns", 0)
            main.complete()
            self.iothreads[MAIN_LOOP] = main
            self.sup.callback(main.finalize)
        self.sup.callback(self.root.close)
        for ident, iothread in self.iothreads.items():
            iothread.on_start(self._dataplane_setup(ident))

    def _dataplane_setup(self, ident: str) -> Callable[[Any], None]:
        """What iothread ``ident`` runs in its process before its loop."""
        mine = [s for s in self.queues if s.iothread == ident]
        shared = self.shared
        assert shared is not None

        def setup(ctx: Any) -> None:
            for dslot in sorted({s.dslot for s in mine}):
                vdev = self.vdevs[dslot]
                owned = {s.index for s in mine if s.dslot == dslot}
                # Queues another iothread serves stay out of this
                # context: without a host notifier the dataplane leaves
                # them alone.
                for i, vq in enumerate(vdev.vqs):
                    if i not in owned:
                        vq.host_notifier = None

                self._report_broken(vdev, dslot, shared)
                slot = min(s.qslot for s in mine if s.dslot == dslot)
                words = shared.acct_words(slot)
                node = vdev.bs
                vdev.bs = cast("BlockBackend", AccountedNode(node, words))
                VirtIOBlockDataPlane(vdev, ctx).start()
                aio = str(getattr(node, "aio", ""))
                words[ACCT_FIELDS.index("aio_engine")] = \
                    ENGINES.index(aio) if aio in ENGINES else 0
        return setup

    @staticmethod
    def _report_broken(vdev: VirtIOBlock, dslot: int,
                       shared: VmmShared) -> None:
        """Have ``virtio_error`` also record the message where the VMM
        reads it (iothread process)."""
        original = vdev.virtio_error

        def virtio_error(msg: str) -> Any:
            err = original(msg)
            shared.mark_broken(dslot, msg)
            return err

        setattr(vdev, "virtio_error", virtio_error)  # noqa: B010

    def engine_in_use(self, node_name: str) -> str:
        """The aio engine of ``node_name`` after any fallback, as the
        iothreads attached it (``a/b`` when they differ)."""
        if self.shared is None:
            return ""
        found: list[str] = []
        for s in self.queues:
            node = self.config.node(s.device.drive)
            if node is None or node.name != node_name:
                continue
            code = self.shared.read_acct(s.qslot)["aio_engine"]
            if code and ENGINES[code] not in found:
                found.append(ENGINES[code])
        return "/".join(found)

    # -- running -------------------------------------------------------

    def run(self, progress: Callable[[Machine], None] | None = None
            ) -> MachineOutcome:
        """Build, run the guests to their end, gather, release."""
        from qiothread.qmp.backend import RunState, ShutdownCause
        from qiothread.vmm_qmp import MachineMonitor

        monitor = self.monitor = MachineMonitor(self)
        cause = ShutdownCause.GUEST_SHUTDOWN
        with self.sup:
            self.sup.handle_signals()
            self.build()
            self._start_monitors(monitor)
            for iothread in self.iothreads.values():
                iothread.start()
            self._start_guests()
            assert self._go is not None
            monitor.set_state(RunState.RUNNING)
            self._go.set()
            errors, interrupted = self._wait_guests(progress)
            if self._quit:
                cause = ShutdownCause.HOST_QMP_QUIT
            elif interrupted:
                cause = ShutdownCause.HOST_SIGNAL
            outcome = self._gather(errors, interrupted)
            monitor.shutdown(cause)
            return outcome

    def _start_monitors(self, monitor: Any) -> None:
        """``-qmp`` / ``-mon``: serve QMP before the machine starts, and
        with ``wait=on`` wait for the first client, as QEMU does."""
        if not self.config.monitors:
            return
        from qiothread.qmp.server import QMPServer

        for m in self.config.monitors:
            server = QMPServer(monitor, m.path, pretty=m.pretty)
            server.start()
            self.sup.callback(server.close)
            if m.wait:
                sys.stderr.write(f"qiothread: waiting for a QMP client "
                                 f"on {m.path}\n")
                while not server.client_connected.wait(_TICK_S):
                    pass

    def _start_guests(self) -> None:
        assert self.mem is not None and self.shared is not None
        for j, (job, (dslot, q)) in enumerate(
                zip(self.jobs, self.assignment, strict=True)):
            slot = next(s for s in self.queues
                        if s.dslot == dslot and s.index == q)
            vdev = self.vdevs[dslot]
            node = self.config.node(slot.device.drive)
            assert node is not None
            bs = self.nodes[node.name]
            driver = GuestBlkDriver(
                self.mem, slot.layout, vdev.guest_features, slot.host,
                slot.guest, use_indirect=slot.device.indirect_desc,
                stats_addr=slot.driver_stats, stamp_table=slot.stamps)
            spec = GuestSpec(
                job=job, driver=driver, mem=self.mem,
                capacity=bs.length, block_size=vdev.lbs,
                result_path=os.path.join(self._results_dir, f"job{j}.pkl"),
                go_fd=self._go.fileno() if self._go else -1,
                stop_requested=self.shared.stop_requested)

            def target(channel: ReadyChannel, spec: GuestSpec = spec
                       ) -> None:
                guest_main(spec, channel)

            self.guests.append(self.sup.start(
                f"guest '{job.name}' (job {j})", target,
                comm=f"guest{j}", may_exit=True,
                ready_timeout=self.ready_timeout,
                stop_request=lambda child: self.shared.request_stop()
                if self.shared else None))

    def completed_ios(self) -> int:
        """I/Os the guests have seen complete so far, from the counters
        their drivers publish in guest memory (any time, no syscall)."""
        if self.mem is None:
            return 0
        return sum(read_driver_stats(self.mem, s.driver_stats)["completed"]
                   for s in self.queues)

    def request_quit(self) -> None:
        """Stop the guests at their next I/O (any thread; QMP ``quit``)."""
        self._quit = True
        if self.shared is not None:
            self.shared.request_stop()

    def _wait_guests(self, progress: Callable[[Machine], None] | None
                     ) -> tuple[list[str], bool]:
        """Step 6 of the module text: (guest errors, interrupted).

        Once a stop is asked (Ctrl-C, SIGTERM, ``quit``, a failed
        child, a broken device), guests get :data:`STOP_GRACE_S` to
        finish their in-flight I/O and report; a guest still running
        then waits for a completion that will not come, and is killed.
        """
        errors: list[str] = []
        interrupted = False
        stop_at: float | None = None
        shared = self.shared
        assert shared is not None
        while any(g.returncode is None for g in self.guests):
            try:
                dead = self.sup.wait_for_death(_TICK_S)
                if dead is not None and dead in self.guests:
                    if dead.returncode != 0:
                        errors.append(str(dead.error()))
                        shared.request_stop()
                elif dead is not None:
                    # An iothread died: its queues will never complete
                    # again, so guests waiting on them cannot finish;
                    # stop them at once and report the iothread.
                    shared.request_stop()
                    for g in self.guests:
                        self.sup.stop(g, timeout=1.0)
                    raise dead.error()
                if self.monitor is not None:
                    self.monitor.check_broken()
                if any(shared.broken(i) is not None
                       for i in range(len(self.config.devices))):
                    shared.request_stop()
                if progress is not None:
                    progress(self)
            except (KeyboardInterrupt, SystemExit):
                if interrupted:
                    raise
                interrupted = True
                shared.request_stop()
            if self._quit:
                interrupted = True
            if shared.stop_requested():
                now = time.monotonic()
                stop_at = now if stop_at is None else stop_at
                if now - stop_at > STOP_GRACE_S:
                    errors += self._kill_stuck_guests()
        return errors, interrupted

    def _kill_stuck_guests(self) -> list[str]:
        errors = []
        for g in self.guests:
            if g.returncode is None:
                self.sup.stop(g, timeout=1.0)
                errors.append(
                    f"{g.name} did not finish its in-flight I/O within "
                    f"{STOP_GRACE_S:g} s of the stop; its results are "
                    "lost")
        return errors

    # -- gathering -----------------------------------------------------

    def _gather(self, errors: list[str], interrupted: bool
                ) -> MachineOutcome:
        assert self.shared is not None and self.mem is not None
        results: list[JobResult] = []
        for j in range(len(self.jobs)):
            path = os.path.join(self._results_dir, f"job{j}.pkl")
            with contextlib.suppress(FileNotFoundError), \
                    open(path, "rb") as f:
                results.append(pickle.load(f))
        threads = [iothread_stats(i, t) for i, t in self.iothreads.items()]
        queues = []
        guest_counters = []
        for s in self.queues:
            dev = self.shared.read_queue(s.qslot)
            drv = read_driver_stats(self.mem, s.driver_stats)
            guest_counters.append(drv)
            queues.append(QueueStats(
                device=s.device.id, queue=s.index, iothread=s.iothread,
                requests=dev["requests"], kicks_sent=drv["kicks"],
                kicks_suppressed=drv["kicks_suppressed"],
                interrupts_sent=dev["interrupts"],
                interrupts_suppressed=dev["interrupts_suppressed"],
                merges=dev["merges"]))
        broken = [f"{d.id}: {reason}"
                  for i, d in enumerate(self.config.devices)
                  if (reason := self.shared.broken(i)) is not None]
        for it in self.iothreads.values():
            with contextlib.suppress(ChildProcessError_):
                it.check()
        engines = {name: self.engine_in_use(name) for name in self.nodes}
        return MachineOutcome(results, threads, queues, broken,
                              interrupted, errors, engines, guest_counters)
