"""virtio: guest memory, the split virtqueue, virtio-blk and a guest driver.

Nothing here knows the event loop: the device answers "is the ring
non-empty", pops, pushes and decides whether to notify; ``qiothread``
wires it into AioContexts.
"""
