"""virtio-blk dataplane: a device's queues wired into an AioContext.

What QEMU 7.2's hw/block/dataplane/virtio-blk.c and
``virtio_queue_aio_attach_host_notifier`` do (reference §14, §15.6),
for one device whose queues all live in one iothread:

- *start*: decide ``batch_notifications`` (no EVENT_IDX negotiated)
  and give the device a BH for them; move the node to the context;
  write every host notifier once, so that requests already in the
  rings are seen; then register each host notifier with a read handler,
  an ``io_poll`` (ring non-empty, no syscall), an ``io_poll_ready``,
  and poll begin/end hooks that turn guest kicks off and on.  Every
  handler has ``io_poll``, so the device never disables polling for
  the context.
- *stop*: unregister the host notifiers and run the read handler once
  to consume a pending kick (7.2 behaviour); cancel the notify BH and
  call it once by hand, a last chance to interrupt the guest.

Runs in the iothread (the context's home thread), after the fork.
"""

from __future__ import annotations

from qiothread import trace_events as trace
from qiothread.aio import AioContext
from qiothread.bh import QEMUBH
from qiothread.policies import GuestNotify, guest_notify_mode
from virtio.blk import VirtIOBlock

__all__ = ["VirtIOBlockDataPlane"]


class VirtIOBlockDataPlane:
    """The dataplane of one virtio-blk device in one AioContext.

    Home thread of ``ctx`` only.
    """

    def __init__(self, vdev: VirtIOBlock, ctx: AioContext) -> None:
        self.vdev = vdev
        self.ctx = ctx
        #: ``s->bh``: runs ``notify_guest_bh`` (7.2 batching).
        self.bh: QEMUBH = ctx.bh_new(vdev.notify_guest_bh,
                                     "virtio-blk-notify")
        self.started = False

    def start(self) -> None:
        """``virtio_blk_data_plane_start``, steps 1 and 3-8."""
        if self.started:
            return
        vdev = self.vdev
        vdev.dataplane_start(
            self.bh.schedule,
            defer_notifications=guest_notify_mode(self.ctx.policy)
            is GuestNotify.DEFER_CALL)
        self.started = True
        if trace.virtio_blk_data_plane_start.enabled:
            trace.virtio_blk_data_plane_start(self)
        attach = getattr(vdev.bs, "attach_aio_context", None)
        if attach is not None:
            attach(self.ctx)
        # Kick every queue once: the guest may have published requests
        # before dataplane was ready to hear about them.
        for vq in vdev.vqs:
            if vq.host_notifier is not None:
                vq.host_notifier.set()
        for i, vq in enumerate(vdev.vqs):
            if vq.host_notifier is None:
                continue
            self._attach(i)

    def _attach(self, i: int) -> None:
        """``virtio_queue_aio_attach_host_notifier`` for queue ``i``."""
        vdev = self.vdev
        n = vdev.vqs[i].host_notifier
        assert n is not None

        def io_read() -> None:
            vdev.host_notifier_read(i)

        def io_poll() -> bool:
            return vdev.host_notifier_poll(i)

        def io_poll_ready() -> None:
            vdev.host_notifier_poll_ready(i)

        def poll_begin() -> None:
            vdev.host_notifier_poll_begin(i)

        def poll_end() -> None:
            vdev.host_notifier_poll_end(i)

        self.ctx.set_event_notifier(n, io_read, io_poll, io_poll_ready)
        self.ctx.set_event_notifier_poll(n, poll_begin, poll_end)

    def stop(self) -> None:
        """``virtio_blk_data_plane_stop`` (in the iothread)."""
        if not self.started:
            return
        vdev = self.vdev
        if trace.virtio_blk_data_plane_stop.enabled:
            trace.virtio_blk_data_plane_stop(self)
        for i, vq in enumerate(vdev.vqs):
            if vq.host_notifier is None:
                continue
            self.ctx.set_event_notifier(vq.host_notifier, None)
            # 7.2's detach consumes a kick that is still pending.
            vdev.host_notifier_read(i)
        self.bh.cancel()
        vdev.dataplane_stop()
        self.started = False

    def close(self) -> None:
        """Stop and free the BH."""
        self.stop()
        self.bh.delete()
