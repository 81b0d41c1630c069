"""What the IOThread tests share: a /objects root, adding, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from qiothread.iothread import IOThread
from qiothread.keyval import parse_option
from qiothread.process import Supervisor
from qiothread.qom import ObjectRoot


@contextmanager
def iothread_root(sup: Supervisor) -> Iterator[ObjectRoot]:
    """An /objects root that creates iothreads under ``sup``."""
    r = ObjectRoot({"iothread": IOThread}, sup)
    try:
        yield r
    finally:
        r.close()


def add(root: ObjectRoot, text: str) -> IOThread:
    """``-object TEXT``, which must create an iothread."""
    obj = root.object_add(parse_option(text, "qom-type"))
    assert isinstance(obj, IOThread)
    return obj


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)
