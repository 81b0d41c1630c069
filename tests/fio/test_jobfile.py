"""fio INI job files."""

from __future__ import annotations

from pathlib import Path

import pytest

from qiothread.fio.jobfile import load_jobfile, parse_jobfile
from qiothread.fio.options import FioOptionError, ReadWrite

TEXT = """\
; a comment
[global]
ioengine=libaio   ; engine
direct=1
bs = 4k
time_based
runtime=${RT}

[reader]
rw=randread
iodepth=8

# second job overrides a global
[writer]
rw=write
bs=64k
verify=md5
"""


def test_globals_apply_and_jobs_override() -> None:
    jf = parse_jobfile(TEXT, env={"RT": "5"})
    assert jf.global_options == (("ioengine", "libaio"), ("direct", "1"),
                                 ("bs", "4k"), ("runtime", "5"))
    reader, writer = jf.jobs
    assert reader.name == "reader" and reader.rw is ReadWrite.RANDREAD
    assert reader.iodepth == 8 and reader.bs[0] == 4096
    assert reader.time_based and reader.runtime_ns == 5 * 10**9
    assert reader.direct and reader.ioengine == "libaio"
    assert writer.bs[1] == 65536
    # Each job's "job options" are its own section's lines only.
    assert reader.given == (("rw", "randread"), ("iodepth", "8"))
    assert writer.given == (("rw", "write"), ("bs", "64k"),
                            ("verify", "md5"))


def test_later_global_applies_to_later_jobs_only() -> None:
    jf = parse_jobfile("[a]\n[global]\niodepth=4\n[b]\n")
    assert [j.iodepth for j in jf.jobs] == [1, 4]


@pytest.mark.parametrize(("text", "msg"), [
    ("rw=read\n[a]\n", "<jobfile>:1: fio: option <rw=read> outside of"),
    ("[a]\nrw=sideways\n", "<jobfile>:2: job 'a': fio: failed parsing "
                           "rw=sideways"),
    ("[a]\nwhat ever\n", "<jobfile>:2: not an option line"),
    ("[a]\nbogus=1\n", "<jobfile>:2: job 'a': Bad option <bogus=1>"),
    ("[global]\niodepth=0\n[a]\n", "<jobfile>:2: iodepth: min value"),
    ("[global]\nbs=4k\n", "<jobfile>: no job sections found"),
    ("[]\n", "<jobfile>:1: empty section name"),
    ("[a]\ninclude other.fio\n", "<jobfile>:2: 'include' is not"),
    ("[a]\nsize=${NOPE}\n", "<jobfile>:2: environment variable NOPE"),
])
def test_bad_files_refused(text: str, msg: str) -> None:
    with pytest.raises(FioOptionError) as ei:
        parse_jobfile(text, env={})
    assert str(ei.value).startswith(msg)


def test_load_from_disk(tmp_path: Path) -> None:
    p = tmp_path / "j.fio"
    p.write_text("[only]\nrw=randwrite\n")
    assert load_jobfile(p).jobs[0].rw is ReadWrite.RANDWRITE
    with pytest.raises(FioOptionError, match="unable to open"):
        load_jobfile(tmp_path / "missing.fio")


def test_combination_errors_name_the_section() -> None:
    with pytest.raises(FioOptionError) as ei:
        parse_jobfile("[global]\nverify=md5\n\n[t]\nrw=trim\n", env={})
    assert str(ei.value) == ("<jobfile>:4: job 't': t: verify makes no "
                             "sense with rw=trim")
