"""fio iolog v2/v3 replay parsing."""

from __future__ import annotations

import pytest

from qiothread.fio.iolog import ReplayAction, ReplayIO, parse_iolog
from qiothread.fio.options import FioOptionError

V2 = """\
fio version 2 iolog
/dev/vda add
/dev/vda open
/dev/vda read 0 4096
/dev/vda wait 500 0
/dev/vda write 8192 512
/dev/vda wait 50 0
/dev/vda trim 4096 4096
/dev/vda wait 1000 0
/dev/vda sync 0 0
/dev/vda close
"""

V3 = """\
fio version 3 iolog
0 /dev/sdb add
0 /dev/sdb open
10 /dev/sdb read 0 4096
250 /dev/sdb write 4096 4096
1250 /dev/sdb datasync 0 0
1300 /dev/sdb close
"""


def test_v2_waits_accumulate_and_small_ones_drop() -> None:
    log = parse_iolog(V2)
    assert log.version == 2 and log.files == ("/dev/vda",)
    assert log.ios == (
        ReplayIO(0, ReplayAction.READ, 0, 4096),
        ReplayIO(500_000, ReplayAction.WRITE, 8192, 512),
        # the 50 µs wait is below fio's 100 µs floor: dropped
        ReplayIO(500_000, ReplayAction.TRIM, 4096, 4096),
        ReplayIO(1_500_000, ReplayAction.SYNC, 0, 0),
    )
    assert log.max_end == 8704


def test_v3_timestamps_are_microseconds() -> None:
    log = parse_iolog(V3)
    assert [(io.t_ns, io.action) for io in log.ios] == [
        (10_000, ReplayAction.READ), (250_000, ReplayAction.WRITE),
        (1_250_000, ReplayAction.DATASYNC)]


@pytest.mark.parametrize(("text", "msg"), [
    ("", "<iolog>: empty iolog"),
    ("hello\n", "<iolog>:1: not an iolog"),
    ("fio version 1 iolog\n", "<iolog>:1: fio: iolog version 1 is not"),
    ("fio version 2 iolog\nf add\nf open\nf munch 0 512\n",
     "<iolog>:4: fio: bad iolog file action: munch"),
    ("fio version 2 iolog\nf read 0 512\n", "<iolog>:2: I/O on f, which "
                                            "is not added"),
    ("fio version 2 iolog\nf add\nf read 0 512\n",
     "<iolog>:3: I/O on f, which is not open"),
    ("fio version 2 iolog\nf add\nf open\nf close\nf read 0 512\n",
     "<iolog>:5: I/O on f, which is not open"),
    ("fio version 2 iolog\nf open\n", "<iolog>:2: file f used before"),
    ("fio version 2 iolog\nf add\nf open\nf read x 512\n",
     "<iolog>:4: bad offset 'x'"),
    ("fio version 2 iolog\nf add\nf open\nf read 100 512\n",
     "<iolog>:4: read at 100 length 512 is not in whole 512-byte"),
    ("fio version 2 iolog\nf add\nf open\nf read 0\n",
     "<iolog>:4: bad iolog2 line"),
    ("fio version 3 iolog\n0 f add\n0 f open\n5 f wait 100 0\n",
     "<iolog>:4: 'wait' is not allowed in iolog version 3"),
    ("fio version 3 iolog\nx f add\n", "<iolog>:2: bad timestamp 'x'"),
    ("fio version 2 iolog\na add\nb add\na open\nb open\na read 0 512\n"
     "b read 0 512\n", "<iolog>:7: the log does I/O on several files"),
])
def test_bad_logs_refused(text: str, msg: str) -> None:
    with pytest.raises(FioOptionError) as ei:
        parse_iolog(text)
    assert str(ei.value).startswith(msg)


def test_redirect_merges_files() -> None:
    text = ("fio version 2 iolog\na add\nb add\na open\nb open\n"
            "a read 0 512\nb write 512 512\n")
    log = parse_iolog(text, redirect=True)
    assert [io.action for io in log.ios] == [ReplayAction.READ,
                                              ReplayAction.WRITE]
