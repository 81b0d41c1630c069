"""``qiothread replay``: inputs, exact trajectories, and agreement with
the real AioContext driven in virtual time."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from qiothread.aio import AioContext
from qiothread.event_notifier import EventNotifier
from qiothread.fio.iolog import parse_iolog
from qiothread.replay import main, replay
from qiothread.replay_input import (
    EventSeq,
    ReplayInputError,
    events_from_iolog,
    events_from_trace,
    parse_duration_ns,
    parse_service,
)

from .vworld import World, WorldIdle, world_ctx

#: Virtual ns of one io_poll call in the model-against-loop test.
COST = 100

BASE = "1796314261"
# One queue and one thread pool, as QEMU 7.2's log backend writes them
# with -msg timestamp=on; other events are skipped.
TRACE = f"""\
15083@{BASE}.000000:virtqueue_pop vq 0x55aa01 elem 0x55bb00 in_num 2 out_num 1
1@{BASE}.000000:virtio_blk_handle_read vdev 0x5c req 0x5b sector 8 nsectors 1
15083@{BASE}.000001:poll_grow ctx 0x55dd old 0 new 4000
15083@{BASE}.000100:thread_pool_complete pool 0x55ee req 0x1 opaque 0x2 ret 0
15083@{BASE}.000103:virtqueue_pop vq 0x55aa01 elem 0x55bb01 in_num 2 out_num 1
15083@{BASE}.000203:thread_pool_complete pool 0x55ee req 0x3 opaque 0x4 ret 0
15083@{BASE}.000206:virtqueue_pop vq 0x55aa01 elem 0x55bb02 in_num 2 out_num 1
15083@{BASE}.000209:virtqueue_pop vq 0x55aa01 elem 0x55bb03 in_num 2 out_num 1
15084@{BASE}.000150:virtqueue_pop vq 0x66aa01 elem 0x1 in_num 2 out_num 1
"""


def test_trace_becomes_timed_source_events() -> None:
    seq = events_from_trace(TRACE.splitlines(), tid=15083)
    assert seq.source_names == ["queue vq 0x55aa01",
                                "completion pool 0x55ee"]
    t0 = int(BASE) * 10**9
    assert [t - t0 for t in seq.times] == [
        0, 100_000, 103_000, 203_000, 206_000, 209_000]
    assert seq.sources == [0, 1, 0, 1, 0, 0]
    # Without the thread filter the other iothread's queue is a source.
    assert len(events_from_trace(TRACE.splitlines()).source_names) == 3


def test_trace_formats_and_errors() -> None:
    iso = ["2025-07-21T18:43:28.089797Z virtqueue_pop vq 0x1 elem 0x2 "
           "in_num 1 out_num 1"]
    seq = events_from_trace(iso)
    assert seq.times == [1753123408089797000]
    with pytest.raises(ReplayInputError, match=r"trace:1: no timestamp"):
        events_from_trace(["poll_grow ctx 0x1 old 0 new 4000"])
    with pytest.raises(ReplayInputError, match="no replayable events"):
        events_from_trace([f"1@{BASE}.000001:poll_grow ctx 0x1 old 0 "
                           "new 4000"])
    with pytest.raises(ReplayInputError, match="without its 'vq'"):
        events_from_trace([f"1@{BASE}.000001:virtqueue_pop elem 0x1"])


def test_rw_complete_stands_in_only_without_engine_events() -> None:
    lines = [f"1@{BASE}.000001:virtqueue_pop vq 0x1 elem 0x2 in_num 1 "
             "out_num 1",
             f"1@{BASE}.000050:virtio_blk_rw_complete vdev 0x9 req 0x2 "
             "ret 0"]
    assert events_from_trace(lines).source_names == [
        "queue vq 0x1", "completion vdev 0x9"]
    lines.append(f"1@{BASE}.000060:thread_pool_complete pool 0x7 req 0x2 "
                 "opaque 0x3 ret 0")
    assert events_from_trace(lines).source_names == [
        "queue vq 0x1", "completion pool 0x7"]


def test_replay_72_exact_trajectory() -> None:
    seq = events_from_trace(TRACE.splitlines(), tid=15083)
    r = replay(seq, "7.2")
    # Hand-computed (poll-max-ns 32768, grow 2, shrink 0): 3 µs blocks
    # grow 0 -> 4000, 100 µs blocks shrink to 0; only the last request
    # (3 µs after the one before) is found by polling.
    assert r.trajectory == [(0, 0), (103_000, 4000), (203_000, 0),
                            (206_000, 4000)]
    assert (r.iterations, r.poll_rounds, r.poll_hits) == (6, 2, 1)
    # 4000 ns in 2000 passes over two sources, plus the final pass;
    # then 3000 ns to the hit.
    assert r.polling_ns == 4002 + 3000
    assert (r.grow, r.shrink) == (2, 2)
    assert r.duration_ns == 209_000
    # Time-weighted: 4000 ns over [103, 203) and [206, 209] µs.
    assert r.poll_ns_mean == pytest.approx(4000 * 103_000 / 209_000)
    assert r.near_max_share == 0.0
    assert replay(seq, "7.2", poll_max_ns=4000).near_max_share == \
        pytest.approx(103_000 / 209_000)


def test_replay_100_keeps_polling_the_queue() -> None:
    seq = events_from_trace(TRACE.splitlines(), tid=15083)
    r = replay(seq, "10.0")
    assert r.trajectory == [(0, 0), (103_000, 4000)]
    assert (r.poll_rounds, r.poll_hits) == (3, 2)
    assert r.polling_ns == 4002 + 3000 + 3000
    assert r.handler_poll_ns == {"queue vq 0x55aa01": 4000,
                                 "completion pool 0x55ee": 0}


def test_iolog_with_a_service_model() -> None:
    log = parse_iolog("fio version 3 iolog\n0 disk add\n0 disk open\n"
                      "0 disk read 0 4096\n0 disk read 4096 4096\n"
                      "500 disk read 8192 4096\n")
    seq = events_from_iolog(log, iodepth=1,
                            service=parse_service("const:100us"),
                            think_ns=parse_duration_ns("3us"))
    # QD1: issue, complete 100 µs later, next issue 3 µs after that.
    assert seq.source_names == ["queue", "completion"]
    assert list(zip(seq.times, seq.sources, strict=True)) == [
        (0, 0), (100_000, 1), (103_000, 0), (203_000, 1),
        (500_000, 0), (600_000, 1)]
    seq2 = events_from_iolog(log, iodepth=2,
                             service=parse_service("uniform:10us:20us"),
                             think_ns=0, seed=3)
    assert seq2.times[:2] == [0, 0] or seq2.sources[:2] == [0, 1]
    assert all(10_000 <= t <= 20_000 for t, s in
               zip(seq2.times, seq2.sources, strict=True)
               if s == 1 and t < 500_000)


def test_service_models_and_durations() -> None:
    rng = random.Random(1)
    assert parse_service("250us")(rng) == 250_000
    exp = parse_service("exp:40us")
    draws = [exp(rng) for _ in range(20000)]
    assert 38_000 < sum(draws) / len(draws) < 42_000
    assert parse_duration_ns("1.5ms") == 1_500_000
    for bad in ("gauss:3us", "uniform:5us:1us", "const:fast"):
        with pytest.raises(ReplayInputError, match="invalid service"):
            parse_service(bad)


# ----------------------------------------------------------------------
# The model against the real loop


class _Source:
    """A source for the real loop: eventfd plus a flag io_poll reads.

    Its io_poll charges ``charge`` ns of virtual time before it looks,
    so that (with the head of the poll list charging a whole pass) every
    check of a pass happens at the pass's end, as the model assumes.
    """

    def __init__(self, world: World, ctx: AioContext) -> None:
        self.world = world
        self.n = EventNotifier()
        self.ready = 0
        self.charge = COST
        self.joined = False
        self.on_join = lambda: None
        ctx.set_event_notifier(self.n, self._read, self._poll,
                               self._read)

    def fire(self) -> None:
        self.ready += 1
        self.n.set()

    def _poll(self) -> bool:
        self.world.advance(self.charge)
        return self.ready > 0

    def _read(self) -> None:
        self.n.test_and_clear()
        self.ready = 0
        if not self.joined:
            self.joined = True
            self.on_join()


def _real_trajectory(seq: EventSeq, policy: str) -> list[tuple[int, int]]:
    world = World()
    ctx = world_ctx(world, policy)
    ctx.aio_poll(False)               # consume set_poll_params' notify
    a, b = _Source(world, ctx), _Source(world, ctx)
    srcs = [a, b]

    def b_joined() -> None:           # b is now the poll list's head
        a.charge, b.charge = 0, 2 * COST

    first = {s: seq.times[seq.sources.index(s)] for s in (0, 1)}
    assert first[0] < first[1]
    b.on_join = b_joined
    t0 = seq.times[0]
    world.clock.set(t0)
    for t, s in zip(seq.times, seq.sources, strict=True):
        world.at(t, srcs[s].fire)
    traj = [(0, 0)]
    orig = ctx.policy.poll_budget

    def recording(c: AioContext) -> int:
        v = orig(c)
        if v != traj[-1][1]:
            traj.append((world.now - t0, v))
        return v

    ctx.policy.poll_budget = recording  # type: ignore[method-assign]
    try:
        while world.next_time() is not None:
            ctx.aio_poll(True)
    except WorldIdle:
        pass
    recording(ctx)                    # the budget the next one would use
    for s in srcs:
        s.n.close()
    ctx.close()
    return traj


@pytest.mark.parametrize("policy", ["7.2", "8.0", "10.0", "weighted"])
def test_the_model_gives_the_real_loops_budgets(policy: str) -> None:
    rng = random.Random(11)
    pairs = []
    t = 10**9
    for _ in range(150):
        # Whole passes apart (200 ns): guest 2-8 µs, backend ~40 µs.
        t += 200 * (10 + int(rng.random() * 30))
        pairs.append((t, "queue"))
        t += 200 * int(-200 * math.log(1 - rng.random()))
        pairs.append((t, "completion"))
    seq = EventSeq.from_pairs(pairs)
    model = replay(seq, policy, pass_ns=COST)
    real = _real_trajectory(seq, policy)
    assert len(model.trajectory) > 20
    assert model.trajectory == real


def test_cli_writes_table_json_and_csv(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    f = tmp_path / "t.log"
    f.write_text(TRACE)
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main([str(f), "--tid", "15083", "--policy", "7.2,10.0",
                 "--json", str(out_json), "--trajectory-csv",
                 str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "6 events from 2 sources over 0.209 ms" in text
    lines = text.splitlines()
    assert lines[1].split() == ["policy", "iters", "rounds", "hit%",
                                "poll-cpu%", "mean-poll-ns", "near-max%",
                                "grow", "shrink", "final"]
    assert lines[2].split()[:4] == ["7.2", "6", "2", "50.0"]
    assert lines[3].split()[:4] == ["10.0", "6", "3", "66.7"]
    doc = json.loads(out_json.read_text())
    assert [r["policy"] for r in doc["results"]] == ["7.2", "10.0"]
    assert doc["results"][0]["trajectory"][1] == [103000, 4000]
    assert out_csv.read_text().splitlines()[:3] == [
        "t_ns,policy,poll_ns", "0,7.2,0", "103000,7.2,4000"]
    assert main([str(tmp_path / "missing")]) == 1


def test_cli_replays_an_iolog(tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "io.log"
    f.write_text("fio version 2 iolog\ndisk add\ndisk open\n" +
                 "".join(f"disk read {i * 4096} 4096\n"
                         for i in range(200)))
    assert main([str(f), "--policy", "7.2,10.0", "--service",
                 "const:200us", "--think", "3us"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "400 events from 2 sources" in lines[0]
    r72, r100 = lines[2].split(), lines[3].split()
    # QD1 with a slow backend: 7.2 never finds the next request by
    # polling; 10.0 finds all but the first.
    assert (r72[0], r72[3]) == ("7.2", "0.0")
    assert r100[0] == "10.0" and float(r100[3]) > 49.0


def test_the_qiothread_command_dispatches_replay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qiothread.cli import main as cli_main

    f = tmp_path / "t.log"
    f.write_text(TRACE)
    assert cli_main(["replay", str(f), "--policy", "10.0"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "10.0"
    assert cli_main(["report", str(tmp_path)]) == 1
