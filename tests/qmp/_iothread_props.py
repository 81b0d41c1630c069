"""The 7.2 iothread property set on the project's QOM base.

Used by the QMP tests only until ``qiothread.iothread`` exists; it adds
nothing of its own beyond the property list and the thread-pool rule of
reference §8.1.
"""

from __future__ import annotations

from qiothread.errors import ConfigError
from qiothread.qom import Int64Property, UserCreatable


class IOThreadProps(UserCreatable):
    TYPE = "iothread"
    PROPERTIES = (
        Int64Property("aio-max-batch", 0),
        Int64Property("thread-pool-min", 0),
        Int64Property("thread-pool-max", 64),
        Int64Property("poll-max-ns", 32768),
        Int64Property("poll-grow", 0),
        Int64Property("poll-shrink", 0),
    )
    QOM_LIST_ORDER = ("thread-pool-min", "aio-max-batch",
                      "thread-pool-max", "poll-max-ns", "poll-grow",
                      "poll-shrink")

    def property_updated(self, name: str) -> None:
        lo, hi = self.get("thread-pool-min"), self.get("thread-pool-max")
        if lo > hi or hi == 0 or max(lo, hi) > 2**31 - 1:
            raise ConfigError("bad thread-pool-min/thread-pool-max values")
