"""blockdev: raw files and block devices as QEMU's file-posix serves them.

Engines (thread pool, Linux AIO, io_uring) are per AioContext and expose
a pollable completion source; loop devices, test images and fault
injection live here too.
"""
