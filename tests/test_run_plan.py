"""``qiothread run``'s command line: defaults, fio vocabulary, job
placement and errors -- everything decided before a process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from qiothread.cli import main as cli_main
from qiothread.errors import ConfigError
from qiothread.fio.options import FioOptionError, JobOptions, ReadWrite
from qiothread.machine import assign_queues
from qiothread.options import build_machine_config
from qiothread.qemu_opts import split_argv
from qiothread.run import DEFAULT_IMAGE_SIZE, default_image_path, plan_run


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the module: the default image is made once
    (256 MiB written in full takes seconds)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    return shared_cache


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return path


def drive(image: Path, extra: str = "") -> list[str]:
    return ["-drive", f"if=none,id=d0,file={image},format=raw{extra}"]


def test_no_arguments_is_the_documented_default(cache: Path) -> None:
    plan = plan_run([])
    (job,) = plan.jobs
    assert job.rw is ReadWrite.RANDREAD
    assert job.bs == (4096, 4096, 4096)
    assert job.iodepth == 1
    assert job.runtime_ns == 5_000_000_000 and job.time_based
    assert plan.image == default_image_path()
    assert plan.image.is_relative_to(cache / "qiothread")
    assert plan.image.stat().st_size == DEFAULT_IMAGE_SIZE
    # Prefilled, not sparse: every block is allocated.
    assert plan.image.stat().st_blocks * 512 >= DEFAULT_IMAGE_SIZE
    (io,) = plan.config.iothreads
    assert io.id == "iothread0" and io.props["poll-max-ns"] == 32768
    (dev,) = plan.config.devices
    assert dev.num_queues == 1 and dev.queue_iothreads == ["iothread0"]
    node = plan.config.node(dev.drive)
    assert node is not None
    assert node.options["aio"] == "native"
    assert node.options["cache.direct"] is True
    assert plan.output_formats == ("normal",)


def test_default_image_is_created_once(cache: Path) -> None:
    first = plan_run([]).image
    assert first is not None
    stamp = first.stat().st_mtime_ns
    again = plan_run(["--rw=randwrite"]).image
    assert again == first and again.stat().st_mtime_ns == stamp


def test_fio_options_refine_the_default_job(cache: Path) -> None:
    plan = plan_run(["--rw=randwrite", "--iodepth=8", "--numjobs=3"])
    assert len(plan.jobs) == 3
    assert {j.rw for j in plan.jobs} == {ReadWrite.RANDWRITE}
    assert {j.iodepth for j in plan.jobs} == {8}
    # numjobs clones get distinct seeds (fio's behaviour).
    assert len({j.randseed for j in plan.jobs}) == 3
    # num-queues "auto" is the vCPU count: one queue per job.
    assert plan.config.devices[0].num_queues == 3


def test_name_starts_jobs_and_earlier_options_are_global(
        cache: Path) -> None:
    plan = plan_run(["--bs=8k", "--name=a", "--iodepth=2", "--name=b",
                     "--rw=randwrite"])
    a, b = plan.jobs
    assert (a.name, a.bs[0], a.iodepth) == ("a", 8192, 2)
    assert (b.name, b.bs[0], b.iodepth, b.rw) == \
        ("b", 8192, 1, ReadWrite.RANDWRITE)
    assert plan.global_options == (("bs", "8k"),)


def test_job_file(cache: Path, tmp_path: Path) -> None:
    jobfile = tmp_path / "two.fio"
    jobfile.write_text("[global]\nbs=16k\nruntime=1\ntime_based\n"
                       "[r]\nrw=randread\n[w]\nrw=randwrite\niodepth=4\n")
    plan = plan_run([str(jobfile), "--output-format=json,normal"])
    assert [j.name for j in plan.jobs] == ["r", "w"]
    assert {j.bs[0] for j in plan.jobs} == {16384}
    assert plan.output_formats == ("json", "normal")


def test_devices_on_the_command_line_replace_the_default(
        image: Path, cache: Path) -> None:
    plan = plan_run(["-object", "iothread,id=io7", *drive(image),
                     "-device", "virtio-blk-pci,drive=d0,iothread=io7"])
    assert plan.image is None
    assert [t.id for t in plan.config.iothreads] == ["io7"]


def test_default_device_goes_on_the_first_given_iothread(
        cache: Path) -> None:
    plan = plan_run(["-object", "iothread,id=fast,poll-max-ns=100000",
                     "-object", "iothread,id=slow"])
    assert plan.config.devices[0].queue_iothreads == ["fast"]


def test_bad_output_format(cache: Path) -> None:
    with pytest.raises(FioOptionError):
        plan_run(["--output-format=terse"])


def test_bad_fio_option(cache: Path) -> None:
    with pytest.raises(FioOptionError, match="unrecognized option"):
        plan_run(["--frobnicate=1"])


def test_jobs_take_their_own_queues_round_robin(image: Path) -> None:
    argv = ["-object", "iothread,id=io0",
            "-drive", f"if=none,id=a,file={image},format=raw",
            "-drive", f"if=none,id=b,file={image},format=raw",
            "-device", "virtio-blk-pci,id=va,drive=a,iothread=io0,"
                       "num-queues=2",
            "-device", "virtio-blk-pci,id=vb,drive=b,iothread=io0,"
                       "num-queues=2"]
    qemu, _ = split_argv(argv)
    cfg = build_machine_config(qemu, 4)
    jobs = JobOptions().with_options([("numjobs", "4")]).expand_numjobs()
    assert assign_queues(cfg, jobs) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # filename= names a device: both jobs on vb.
    named = [JobOptions().with_options([("filename", "vb")])] * 2
    assert assign_queues(cfg, named) == [(1, 0), (1, 1)]
    # A third job on a two-queue device has no queue of its own.
    with pytest.raises(ConfigError, match="each job needs its own queue"):
        assign_queues(cfg, [*named, named[0]])


def test_no_device_at_all(image: Path) -> None:
    qemu, _ = split_argv(drive(image))
    cfg = build_machine_config(qemu, 1)
    with pytest.raises(ConfigError, match="no virtio-blk device"):
        assign_queues(cfg, [JobOptions()])


def test_cli_reports_qemu_errors_and_exits_1(
        capsys: pytest.CaptureFixture[str], image: Path,
        cache: Path) -> None:
    rc = cli_main(["run", *drive(image), "-device",
                   "virtio-blk-pci,drive=d0,num-queues=0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == ("qiothread: -device virtio-blk-pci,drive=d0,"
                   "num-queues=0: num-queues property must be larger "
                   "than 0\n")


def test_cli_help_version_and_unknown_command(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Help and bad options come before the default image is made.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli_main(["--help"]) == 0
    assert "qiothread run" in capsys.readouterr().out
    assert cli_main(["--version"]) == 0
    assert cli_main(["frob"]) == 2
    assert "unknown command 'frob'" in capsys.readouterr().err
    assert cli_main(["run", "-object", "iothread,help"]) == 0
    assert "poll-max-ns" in capsys.readouterr().out
    assert cli_main(["run", "-object", "iothread,id=x,poll-grow=-1"]) == 1
    assert "poll-grow value must be in range" in capsys.readouterr().err
    assert not (tmp_path / "qiothread").exists()


def test_backend_errors_blame_the_option_that_made_the_node(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        image: Path) -> None:
    missing = tmp_path / "nope.raw"
    arg = f"driver=file,node-name=f0,filename={missing},aio=threads"
    rc = cli_main(["run", "-blockdev", arg, "-device",
                   "virtio-blk-pci,drive=f0", "--runtime=1"])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"qiothread: -blockdev {arg}: Could not open '{missing}': "
        "No such file or directory\n")
    # file-posix's own check, with QEMU's words (reference §12).
    arg = f"if=none,id=d0,file={image},format=raw,aio=native"
    rc = cli_main(["run", "-drive", arg, "-device",
                   "virtio-blk-pci,drive=d0", "--runtime=1"])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"qiothread: -drive {arg}: aio=native was specified, but it "
        "requires cache.direct=on, which was not specified.\n")


def test_default_drive_falls_back_where_o_direct_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qiothread.run as run_mod

    image = tmp_path / "img.raw"
    image.write_bytes(bytes(1 << 20))
    # ext4 takes O_DIRECT (and tmpfs does since Linux 6.6), so the
    # refusal is simulated at the one probe that asks the kernel.
    assert run_mod._o_direct_works(image)
    monkeypatch.setattr(run_mod, "_o_direct_works", lambda path: False)
    plan = plan_run([f"--image={image}"])
    node = plan.config.nodes[0]
    assert (node.options["aio"], node.options["cache.direct"]) == \
        ("threads", False)
    assert plan.warnings == [
        f"qiothread: warning: {image}: the file system refuses O_DIRECT; "
        "using aio=threads,cache.direct=off"]


def test_fault_options_reach_the_backend(
        capsys: pytest.CaptureFixture[str], image: Path) -> None:
    qemu, _ = split_argv([
        "-blockdev", f"driver=file,node-name=f0,filename={image},"
                     "faults.latency=200us,faults.eio=0+4096",
        "-drive", f"if=none,id=d1,file={image},format=raw,"
                  "faults.stall=1s+10ms"])
    cfg = build_machine_config(qemu, 1)
    assert cfg.nodes[0].options["faults.latency"] == "200us"
    assert cfg.nodes[0].options["faults.eio"] == "0+4096"
    assert cfg.nodes[1].options["faults.stall"] == "1s+10ms"
    arg = f"driver=file,node-name=f0,filename={image},faults.bogus=1"
    assert cli_main(["run", "-blockdev", arg, "-device",
                     "virtio-blk-pci,drive=f0"]) == 1
    assert capsys.readouterr().err == (
        f"qiothread: -blockdev {arg}: Invalid parameter 'faults.bogus'\n")
