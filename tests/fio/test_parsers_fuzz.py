"""Any input to the fio parsers gives a result or a FioOptionError,
never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qiothread.fio.iolog import parse_iolog
from qiothread.fio.jobfile import parse_jobfile
from qiothread.fio.options import (
    FioOptionError,
    JobOptions,
    parse_size,
    parse_time_ns,
)

NAMES = st.sampled_from([
    "rw", "bs", "iodepth", "numjobs", "runtime", "time_based", "size",
    "offset", "rate_iops", "thinktime", "ramp_time", "verify",
    "verify_pattern", "rwmixread", "rwmixwrite", "percentile_list",
    "direct", "ioengine", "name", "bogus", "thinktime_blocks"])
VALUES = st.one_of(
    st.text(max_size=20),
    st.from_regex(r"-?[0-9]{1,12}[kKmMgGtTpP%a-z]{0,3}(,[0-9]*[km]?){0,3}",
                  fullmatch=True),
    st.from_regex(r"[0-9.]{1,8}(:[0-9.]{1,8}){0,25}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, st.one_of(st.none(), VALUES)),
                max_size=6))
def test_job_options_total(pairs: list[tuple[str, str | None]]) -> None:
    try:
        JobOptions().with_options(pairs)
    except FioOptionError as err:
        assert str(err)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_values_total(text: str) -> None:
    for parse in (lambda t: parse_size("size", t, allow_percent=True),
                  lambda t: parse_time_ns("runtime", t, 10**9)):
        try:
            parse(text)
        except FioOptionError as err:
            assert str(err).startswith("fio: failed parsing ")


LINES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["[global]", "[job]", "rw=randread", "bs=4k",
                     "iodepth=0", "time_based", "; c", "size=${X}"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(LINES, max_size=8))
def test_jobfile_total(lines: list[str]) -> None:
    try:
        parse_jobfile("\n".join(lines), env={"X": "1m"})
    except FioOptionError as err:
        assert str(err).startswith("<jobfile>")


ACTIONS = st.sampled_from(["add", "open", "close", "read", "write",
                           "trim", "sync", "datasync", "wait", "bad"])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["fio version 2 iolog", "fio version 3 iolog",
                        "nope"]),
       st.lists(st.tuples(st.integers(-5, 10**7), st.sampled_from(
           ["/a", "/b"]), ACTIONS, st.integers(-1, 1 << 20),
           st.integers(-1, 1 << 16), st.integers(2, 5)), max_size=8))
def test_iolog_total(header: str, rows: list[tuple[int, str, str, int,
                                                   int, int]]) -> None:
    v3 = header.startswith("fio version 3")
    lines = [header]
    for ts, f, act, off, n, nfields in rows:
        fields = [f, act, str(off), str(n)][:nfields if nfields != 3
                                            else 4]
        lines.append(" ".join(([str(ts)] if v3 else []) + fields))
    try:
        log = parse_iolog("\n".join(lines) + "\n")
    except FioOptionError as err:
        assert str(err).startswith("<iolog>")
    else:
        assert all(io.offset % 512 == 0 and io.length % 512 == 0
                   for io in log.ios)
