"""fio option parsing: fio's names, units and error wording."""

from __future__ import annotations

import pytest

from qiothread.fio.options import (
    DEFAULT_PERCENTILES,
    Ddir,
    FioOptionError,
    JobOptions,
    ReadWrite,
    SizeSpec,
    VerifyKind,
    parse_fio_args,
    parse_size,
    parse_time_ns,
)


def job(*args: str) -> JobOptions:
    return JobOptions().with_options(parse_fio_args(args))


def test_defaults_are_fios() -> None:
    j = JobOptions()
    assert j.rw is ReadWrite.READ
    assert j.bs == (4096, 4096, 4096)
    assert j.iodepth == 1 and j.numjobs == 1
    assert j.percentile_list == DEFAULT_PERCENTILES
    assert j.percentile_precision == 2
    assert j.ioengine == "psync"


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("4k", 4096), ("4K", 4096), ("4kb", 4096),
    ("1m", 1 << 20), ("2g", 2 << 30), ("1t", 1 << 40),
    # fio's documented inversion with kb_base=1024: "kib" is 1000.
    ("4kib", 4000), ("1mib", 1_000_000), ("0x1000", 4096),
])
def test_size_suffixes_base2(text: str, value: int) -> None:
    assert parse_size("bs", text) == SizeSpec(value=value)


def test_size_percent() -> None:
    spec = parse_size("size", "25%", allow_percent=True)
    assert spec == SizeSpec(percent=25.0)
    assert spec.resolve(1 << 30) == 1 << 28


@pytest.mark.parametrize(("text", "msg"), [
    ("4q", "fio: failed parsing bs=4q: unknown size suffix 'q'"),
    ("abc", "fio: failed parsing bs=abc: not a size"),
    ("", "fio: failed parsing bs=: not a size"),
    ("50%", "fio: failed parsing bs=50%: a percentage is not allowed"),
])
def test_bad_sizes_refused(text: str, msg: str) -> None:
    with pytest.raises(FioOptionError) as ei:
        parse_size("bs", text)
    assert str(ei.value).startswith(msg)


def test_size_percent_range() -> None:
    with pytest.raises(FioOptionError, match=r"percentage must be in"):
        parse_size("size", "150%", allow_percent=True)


@pytest.mark.parametrize(("text", "unit", "ns"), [
    ("10", 10**9, 10 * 10**9), ("500ms", 10**9, 500 * 10**6),
    ("2m", 10**9, 120 * 10**9), ("1h", 10**9, 3600 * 10**9),
    ("100", 1000, 100_000), ("3s", 1000, 3 * 10**9),
    ("250us", 10**9, 250_000),
])
def test_times(text: str, unit: int, ns: int) -> None:
    assert parse_time_ns("runtime", text, unit) == ns


@pytest.mark.parametrize("text", ["abc", "10x", "-1", "1.5s"])
def test_bad_times_refused(text: str) -> None:
    with pytest.raises(FioOptionError,
                       match=r"^fio: failed parsing runtime="):
        parse_time_ns("runtime", text, 10**9)


def test_full_cli_job() -> None:
    j = job("--name=q", "--readwrite=randrw", "--bs=8k", "--iodepth=32",
            "--numjobs=2", "--runtime=1m", "--time_based", "--size=50%",
            "--offset=1m", "--rate_iops=1000", "--thinktime=50",
            "--ramp_time=2", "--verify=crc32c", "--rwmixread=70",
            "--percentile_list=50:99:99.999", "--direct=1",
            "--ioengine=libaio", "--filename=/dev/vda")
    assert j.name == "q" and j.rw is ReadWrite.RANDRW
    assert j.bs == (8192, 8192, 8192)
    assert (j.iodepth, j.numjobs) == (32, 2)
    assert j.runtime_ns == 60 * 10**9 and j.time_based
    assert j.size == SizeSpec(percent=50.0)
    assert j.offset == SizeSpec(value=1 << 20)
    assert j.rate_iops == (1000, 1000, 1000)
    assert j.thinktime_ns == 50_000
    assert j.ramp_time_ns == 2 * 10**9
    assert j.verify is VerifyKind.CRC32C and j.rwmixread == 70
    assert j.percentile_list == (50.0, 99.0, 99.999)
    assert j.percentile_precision == 3
    assert j.direct and j.ioengine == "libaio"
    assert j.filename == "/dev/vda"
    # "job options" keeps the user's text, in order; bare flags are
    # left out as fio 3.33 does.
    assert dict(j.given)["runtime"] == "1m"
    assert "time_based" not in dict(j.given)
    assert [k for k, _ in j.given][:3] == ["name", "rw", "bs"]


def test_per_direction_values() -> None:
    j = job("--bs=64k,4k", "--rate_iops=,500")
    assert j.bs == (65536, 4096, 4096)
    assert j.block_size(Ddir.READ) == 65536
    assert j.rate_iops == (0, 500, 500)


def test_rwmixwrite_sets_read_share() -> None:
    assert job("--rwmixwrite=30").rwmixread == 70


def test_percentiles_sorted_like_fio() -> None:
    j = job("--percentile_list=99.9:50:1")
    assert j.percentile_list == (1.0, 50.0, 99.9)
    assert j.percentile_precision == 1


@pytest.mark.parametrize(("args", "msg"), [
    (["--rw=foo"], "fio: failed parsing rw=foo"),
    (["--iodepth=0"], "iodepth: min value out of range: 0 (1 min)"),
    (["--rwmixread=101"], "rwmixread: max value out of range: 101 "
                          "(100 max)"),
    (["--numjobs=x"], "fio: failed parsing numjobs=x: not an integer"),
    (["--verify=sha3"], "fio: failed parsing verify=sha3"),
    (["--percentile_list=50:101"],
     "value out of range: 101.000000 (range max: 100.000000)"),
    (["--percentile_list=50:x"], "not a floating point value: x"),
    (["--percentile_list=" + ":".join(["50"] * 21)],
     "the list exceeding max length 20"),
    (["--bs=1000"], "job: bs=1000 is not a multiple of the 512-byte"),
    (["--size=0"], "fio: failed parsing size=0: size must be greater"),
    (["--rw=randread:8"], "fio: failed parsing rw=randread:8"),
    (["--bogus=1"], "fio: unrecognized option '--bogus=1'"),
    (["rw=read"], "fio: unrecognized option 'rw=read'"),
    (["--rw"], "Option rw requires an argument"),
    (["--direct=2"], "direct: max value out of range: 2 (1 max)"),
])
def test_bad_input_refused_with_fio_wording(args: list[str],
                                            msg: str) -> None:
    with pytest.raises(FioOptionError) as ei:
        job(*args)
    assert str(ei.value).startswith(msg)


def test_bad_rw_lists_valid_values() -> None:
    with pytest.raises(FioOptionError) as ei:
        job("--rw=foo")
    assert "randrw     Random read and write mix" in str(ei.value)


def test_verify_pattern_implies_pattern() -> None:
    j = job("--verify_pattern=0xdeadbeef")
    assert j.verify is VerifyKind.PATTERN
    assert j.verify_pattern == bytes.fromhex("deadbeef")
    with pytest.raises(FioOptionError, match="even number of hex"):
        job("--verify_pattern=0xabc")


def test_verify_refused_for_trim() -> None:
    with pytest.raises(FioOptionError, match="verify makes no sense"):
        job("--rw=trim", "--verify=md5")


def test_numjobs_clones_get_distinct_seeds() -> None:
    clones = job("--numjobs=3", "--randseed=10").expand_numjobs()
    assert [c.randseed for c in clones] == [10, 11, 12]
    assert all(c.numjobs == 1 for c in clones)


def test_misspelt_option_gets_fios_hint() -> None:
    with pytest.raises(FioOptionError) as ei:
        job("--iodepht=4")
    assert str(ei.value) == ("fio: unrecognized option '--iodepht=4'\n"
                             "Did you mean iodepth?")
    with pytest.raises(FioOptionError) as ei:
        JobOptions().with_options([("rwmixred", "30")])
    assert str(ei.value) == "Bad option <rwmixred=30>\nDid you mean " \
        "rwmixread?"
