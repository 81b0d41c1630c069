"""The catalogue of trace events, as QEMU's trace-events files are.

One place lists every event of the project with QEMU's name and argument
text (reference §18).  Modules import the event objects from here::

    from qiothread.trace_events import poll_grow
"""

from __future__ import annotations

from qiothread.trace import event

# util/trace-events: aio-posix.c, async.c, thread-pool.c
run_poll_handlers_begin = event(
    "run_poll_handlers_begin", "ctx %p max_ns %ld timeout %ld")
run_poll_handlers_end = event(
    "run_poll_handlers_end", "ctx %p progress %d new timeout %ld")
poll_shrink = event("poll_shrink", "ctx %p old %ld new %ld")
poll_grow = event("poll_grow", "ctx %p old %ld new %ld")
poll_add = event("poll_add", "ctx %p node %p fd %d revents 0x%x")
poll_remove = event("poll_remove", "ctx %p node %p fd %d")
aio_co_schedule = event("aio_co_schedule", "ctx %p co %p")
aio_co_schedule_bh_cb = event("aio_co_schedule_bh_cb", "ctx %p co %p")
thread_pool_submit = event(
    "thread_pool_submit", "pool %p req %p opaque %p")
thread_pool_complete = event(
    "thread_pool_complete", "pool %p req %p opaque %p ret %d")
thread_pool_cancel = event("thread_pool_cancel", "req %p opaque %p")

# hw/block/trace-events, hw/block/dataplane/trace-events
virtio_blk_req_complete = event(
    "virtio_blk_req_complete", "vdev %p req %p status %d")
virtio_blk_rw_complete = event(
    "virtio_blk_rw_complete", "vdev %p req %p ret %d")
virtio_blk_handle_write = event(
    "virtio_blk_handle_write", "vdev %p req %p sector %lu nsectors %zu")
virtio_blk_handle_read = event(
    "virtio_blk_handle_read", "vdev %p req %p sector %lu nsectors %zu")
virtio_blk_submit_multireq = event(
    "virtio_blk_submit_multireq",
    "vdev %p mrb %p start %d num_reqs %d offset %lu size %zu is_write %d")
virtio_blk_data_plane_start = event(
    "virtio_blk_data_plane_start", "dataplane %p")
virtio_blk_data_plane_stop = event(
    "virtio_blk_data_plane_stop", "dataplane %p")

# hw/virtio/trace-events
virtqueue_alloc_element = event(
    "virtqueue_alloc_element", "elem %p size %zd in_num %u out_num %u")
virtqueue_fill = event("virtqueue_fill", "vq %p elem %p len %u idx %u")
virtqueue_flush = event("virtqueue_flush", "vq %p count %u")
virtqueue_pop = event("virtqueue_pop", "vq %p elem %p in_num %u out_num %u")
virtio_queue_notify = event("virtio_queue_notify", "vdev %p n %d vq %p")
virtio_notify_irqfd = event("virtio_notify_irqfd", "vdev %p vq %p")
# QEMU 8.2+ (poll-policy=8.2): the deferred eventfd write.
virtio_notify_irqfd_deferred_fn = event(
    "virtio_notify_irqfd_deferred_fn", "vdev %p vq %p")
virtio_notify = event("virtio_notify", "vdev %p vq %p")
virtio_set_status = event("virtio_set_status", "vdev %p val %u")

# block/trace-events: io_uring.c, file-posix.c
luring_init_state = event("luring_init_state", "s %p size %zu")
luring_cleanup_state = event("luring_cleanup_state", "%p freed")
luring_io_plug = event("luring_io_plug", "LuringState %p plug")
luring_io_unplug = event(
    "luring_io_unplug",
    "LuringState %p blocked %d plugged %d queued %d inflight %d")
luring_do_submit = event(
    "luring_do_submit",
    "LuringState %p blocked %d plugged %d queued %d inflight %d")
luring_do_submit_done = event(
    "luring_do_submit_done", "LuringState %p submitted to kernel %d")
luring_co_submit = event(
    "luring_co_submit",
    "bs %p s %p luringcb %p fd %d offset %ld nbytes %zd type %d")
luring_process_completion = event(
    "luring_process_completion", "LuringState %p luringcb %p ret %d")
luring_io_uring_submit = event(
    "luring_io_uring_submit", "LuringState %p ret %d")
luring_resubmit_short_read = event(
    "luring_resubmit_short_read", "LuringState %p luringcb %p nread %d")
file_paio_submit = event(
    "file_paio_submit",
    "acb %p opaque %p offset %ld count %d type %d")
