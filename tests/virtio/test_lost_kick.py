"""The lost-kick race at queue depth 1, across two processes.

The window: the device re-enables guest kicks (``set_notification(1)``:
``avail_event = avail.idx`` or clearing ``VRING_USED_F_NO_NOTIFY``, then
a full barrier) and must then look at the ring once more; the guest
publishes ``avail.idx`` and then (full barrier) reads the suppression
state.  If either side skips its half, a request published inside the
window is seen by nobody: the guest saw "no kick wanted" and the device
saw an empty ring.  With polling on the window opens every time poll
mode ends (``io_poll_end``, then the final ``io_poll``); with polling
off it opens at the end of every drain.

The guest here spins on the used ring (a polled queue, so it reacts
within microseconds) and waits a random 0-60 µs before each next
request, so its publications land all over the device's
enable-and-recheck sequence.  Unlike test_two_process, the iothread has
**no periodic wake-up**: in poll mode a timer tick would run io_poll and
quietly rescue a lost kick.  Here a lost kick leaves the device asleep
for good; the guest notices (no completion within its deadline),
reports it, and wakes the iothread so that the test fails instead of
hanging.  A helper thread watches the guest's pidfd and kicks the
iothread if the guest dies some other way.

How sharp it is: with the final ``io_poll`` after ``io_poll_end``
removed from the event loop, 6000-request poll_on runs failed in 4 of 6
(a lost kick within a few thousand requests).  Being a race it cannot
fail every time; the deterministic tests at the end put the guest's
publication exactly inside the window instead.

Cost: 4 runs of 2000 requests, 0.4-1.5 s each on a 2-core machine.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time

import pytest

from blockdev.memory import MemoryBackend
from qiothread.aio import AioContext, AioHandler
from qiothread.dataplane import VirtIOBlockDataPlane
from qiothread.event_notifier import EventNotifier
from qiothread.process import ReadyChannel, Supervisor
from tests.virtio.harness import make_disk
from virtio.blk import QueueSetup, VirtIOBlock
from virtio.blk_defs import VirtIOBlkConf
from virtio.blk_defs import VirtioBlkStatus as S
from virtio.blk_defs import VirtioBlkType as T
from virtio.driver import DRIVER_STATS_SIZE, alloc_vring
from virtio.guest import GuestBlkDriver, negotiate_features
from virtio.memory import GuestMemory
from virtio.ring import VirtioFeature, feature_bit
from virtio.virtqueue import VirtQueue

REQUESTS = 2000
#: No completion for this long at depth 1 means a lost kick.  Generous
#: (a round trip is ~50 µs) so that a loaded CI machine does not trip
#: it; a lost kick never recovers, so the length does not hide one.
STALL_NS = 3_000_000_000
QUEUE_SIZE = 16
EVENT_IDX = feature_bit(VirtioFeature.RING_EVENT_IDX)
#: The guest waits up to this long between requests, so that its next
#: request lands anywhere in the device's polling window.
THINK_US = 60
#: Flags in guest memory: the guest is finished / failed.
_DONE, _FAILED = 1, 2


def _spin_us(us: float) -> None:
    end = time.monotonic_ns() + int(us * 1000)
    while time.monotonic_ns() < end:
        pass


def guest_main(mem: GuestMemory, q: QueueSetup, features: int,
               flag_addr: int, data_addr: int, seed: int,
               ch: ReadyChannel) -> None:
    g = GuestBlkDriver(mem, q.layout, features, q.host_notifier,
                       q.guest_notifier, poll_queue=True,
                       wait_deadline_ns=STALL_NS,
                       stats_addr=q.driver_stats)
    rng = random.Random(seed)
    ch.ready()
    try:
        for i in range(REQUESTS):
            kind = T.OUT if i % 2 else T.IN
            g.submit(kind, 512 * (i % 64), [(data_addr, 512)])
            done = g.reap(block=True)
            if g.counters["stalled_waits"]:
                raise AssertionError(
                    f"request {i}: no completion within "
                    f"{STALL_NS // 10**9} s at depth 1: a lost kick "
                    f"(avail.idx published, device asleep)")
            if len(done) != 1 or done[0].status != S.OK:
                raise AssertionError(f"request {i}: {done}")
            _spin_us(rng.uniform(0, THINK_US))
        g.publish_stats()
        mem.buf[flag_addr] = _DONE
    except BaseException:
        mem.buf[flag_addr] = _FAILED
        raise
    finally:
        # Wake the iothread whatever happened.
        q.host_notifier.set()
        g.close()


def _watch(pidfd: int, stop_r: int, wake: EventNotifier) -> None:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    p.register(stop_r, select.POLLIN)
    for fd, _ in p.poll():
        if fd == pidfd:
            wake.set()
            return
        return


def run(poll_max_ns: int, event_idx: bool) -> dict[str, int]:
    with Supervisor() as sup:
        mem = GuestMemory.create(4 << 20)
        sup.callback(mem.close)
        q = QueueSetup(alloc_vring(mem, QUEUE_SIZE), EventNotifier(),
                       EventNotifier(), mem.alloc(DRIVER_STATS_SIZE, 8))
        sup.callback(q.host_notifier.close)
        sup.callback(q.guest_notifier.close)
        flag = mem.alloc(8, 8)
        data = mem.alloc(512, 512)
        ctx = AioContext(name="iothread0")
        sup.callback(ctx.close)
        bs = MemoryBackend(64 * 512)
        sup.callback(bs.close)
        dev = VirtIOBlock(bs, VirtIOBlkConf(num_queues=1,
                                            queue_size=QUEUE_SIZE),
                          [q], mem=mem)
        features = negotiate_features(dev.host_features)
        if not event_idx:
            features &= ~feature_bit(VirtioFeature.RING_EVENT_IDX)
        dev.set_features(features)
        ctx.set_poll_params(poll_max_ns, 0, 0)
        child = sup.start(
            "guest0", lambda ch: guest_main(mem, q, features, flag, data,
                                            poll_max_ns + event_idx, ch),
            may_exit=True)
        stop_r, stop_w = os.pipe()
        sup.callback(os.close, stop_r)
        sup.callback(os.close, stop_w)
        watcher = threading.Thread(
            target=_watch, args=(child.fileno(), stop_r, q.host_notifier),
            daemon=True)
        watcher.start()
        dp = VirtIOBlockDataPlane(dev, ctx)
        sup.callback(dp.close)
        dp.start()
        try:
            # No timer: nothing but a kick (or polling) may wake us.
            while not mem.buf[flag] and child.alive:
                ctx.aio_poll(True)
        finally:
            os.write(stop_w, b"x")
            watcher.join()
        while child.alive and child.poll() is None:
            time.sleep(0.01)
        sup.check()
        assert mem.buf[flag] == _DONE
        # Device counters plus the guest's (guest_*).
        return dev.queue_stats(0)


@pytest.mark.slow
@pytest.mark.parametrize("event_idx", [True, False],
                         ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("poll_max_ns", [0, 32768],
                         ids=["poll_off", "poll_on"])
def test_lost_kick_race_qd1(poll_max_ns: int, event_idx: bool) -> None:
    s = run(poll_max_ns, event_idx)
    assert s["requests"] == s["guest_submitted"] == REQUESTS
    assert s["guest_completed"] == REQUESTS
    assert s["ioerr"] == s["unsupp"] == 0
    # Each drain at depth 1 finds one request; it was started by a
    # kick or by polling, nothing else.
    assert s["kicks"] + s["polled"] >= REQUESTS
    if not poll_max_ns:
        # Notifications are on whenever the device is idle: every
        # request is kicked and every kick is read.
        assert s["polled"] == 0
        assert s["guest_kicks"] == REQUESTS
        # ... plus dataplane start's kick and the guest's final wake-up.
        assert REQUESTS <= s["kicks"] <= REQUESTS + 2


# -- the same window, entered deterministically ---------------------------


def _publish_inside_enable(vq: VirtQueue, g: GuestBlkDriver,
                           buf: int) -> list[bool]:
    """Make the guest publish a request (and decide on its kick) at the
    worst moment: when the device re-enables kicks, just before its
    store.  Returns a list that records the guest's kick decision."""
    kicked: list[bool] = []
    real = vq.set_notification

    def set_notification(enable: bool) -> None:
        if enable and not kicked:
            g.submit(T.IN, 0, [(buf, 512)], kick=False)
            kicked.append(g.kick())
        real(enable)

    vq.set_notification = set_notification  # type: ignore[method-assign]
    return kicked


@pytest.mark.parametrize("event_idx", [True, False],
                         ids=["event_idx", "no_event_idx"])
def test_request_published_while_the_drain_reenables_is_not_lost(
        event_idx: bool) -> None:
    d = make_disk(features_off=0 if event_idx else EVENT_IDX)
    try:
        g, vq = d.guests[0], d.dev.vqs[0]
        buf = d.mem.alloc(512)
        g.submit(T.IN, 0, [(buf, 512)])
        kicked = _publish_inside_enable(vq, g, buf)
        d.dev.host_notifier_read(0)
        # The guest saw kicks suppressed (the drain had them off) ...
        assert kicked == [False]
        assert g.vring.kicks_suppressed == 1
        # ... and the drain's re-check after re-enabling took it.
        assert d.dev.stats[0].requests == 2 and vq.is_empty()
        d.settle()
        assert len(g.reap()) == 2
    finally:
        d.close()


@pytest.mark.parametrize("event_idx", [True, False],
                         ids=["event_idx", "no_event_idx"])
def test_request_published_while_poll_mode_ends_is_not_lost(
        event_idx: bool) -> None:
    d = make_disk(features_off=0 if event_idx else EVENT_IDX)
    dp = VirtIOBlockDataPlane(d.dev, d.ctx)
    try:
        g, vq = d.guests[0], d.dev.vqs[0]
        buf = d.mem.alloc(512)
        dp.start()
        # Dispatching the start kick puts the handler in the poll set.
        node = d.ctx.fd_handlers[d.queues[0].host_notifier.fileno()]
        d.run(lambda: node.in_poll, blocking=True)
        d.ctx.poll_set_started([], True)
        assert not vq.notification
        # One request found by polling: with EVENT_IDX the guest kicks
        # it (avail_event is where it was), and the device consumes it
        # with kicks off, so avail_event stays behind from now on.
        g.submit(T.IN, 0, [(buf, 512)])
        d.queues[0].host_notifier.test_and_clear()
        assert d.dev.host_notifier_poll(0)
        d.dev.host_notifier_poll_ready(0)
        # (Its completion waits in a BH: running the loop now would end
        # poll mode, which is the next step's business.)
        assert d.dev.stats[0].requests == 1
        suppressed = g.vring.kicks_suppressed
        kicked = _publish_inside_enable(vq, g, buf)
        ready: list[AioHandler] = []
        # io_poll_end re-enables, then the loop's final io_poll must
        # see the request the guest published without a kick.
        assert d.ctx.poll_set_started(ready, False)
        assert kicked == [False]
        assert g.vring.kicks_suppressed == suppressed + 1
        assert ready == [node]
        assert not d.queues[0].host_notifier.test_and_clear()
        d.dev.host_notifier_poll_ready(0)   # what dispatching ready does
        assert d.dev.stats[0].requests == 2
        d.settle()
        assert len(g.reap()) == 2
    finally:
        dp.close()
        d.close()
