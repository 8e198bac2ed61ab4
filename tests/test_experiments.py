"""A/B experiments (engine/feedback/experiments.py, server/experiments.py): stable hashed assignment, arm options
filling what a request leaves unset, live outcomes per arm from attributed events, persistence across
restarts, one running at a time, names never reused, and bad definitions refused by field."""
from __future__ import annotations

import logging
import time
from collections import Counter

import grpc
import pytest

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.api import Event, EventType
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.errors import FailedPrecondition, InvalidArgument, NotFound
from streamrec.engine.api import Arm, Experiment
from streamrec.engine.feedback.experiments import assign, wilson
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.server.app import ServerConfig, StreamrecServer

CONFIG = EngineConfig(dim=16, sync=False, backend="numpy", checkpoint_interval_s=3600, checkpoint_every_records=10**9)
USERS = [f"u{n}" for n in range(40)]


@pytest.fixture()
def engine(tmp_path):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    with Engine(tmp_path / "lmdb", CONFIG) as eng:
        seed_engine(eng, synthetic(n_users=40, n_items=150, seed=4))
        yield eng


def ask(engine: Engine, user: str, **options):
    return engine.recommend([engine.build_query(user, 5, **options)])[0]


def test_assignment_is_a_stable_weighted_hash():
    experiment = Experiment("homepage", [Arm("a", 1.0), Arm("b", 3.0)])
    arms = [assign(experiment, f"user-{n}").name for n in range(20_000)]
    assert arms == [assign(experiment, f"user-{n}").name for n in range(20_000)]  # same user, same arm
    share = Counter(arms)["b"] / len(arms)
    assert 0.74 < share < 0.76  # 3:1 weights (binomial sd ~0.003)
    other = Experiment("checkout", [Arm("a", 1.0), Arm("b", 3.0)])
    agree = sum(x == assign(other, f"user-{n}").name for n, x in enumerate(arms)) / len(arms)
    assert agree < 0.7  # another experiment reshuffles users (independent: 0.625 expected)


def test_arms_fill_unset_options_and_answers_say_which(engine):
    engine.create_experiment("rerank-test", [Arm("retrieval", 1.0, {"rerank": False}), Arm("control", 1.0)])
    seen = Counter()
    for user in USERS:
        answer = ask(engine, user)
        assert answer.experiment == "rerank-test" and answer.arm in ("retrieval", "control")
        seen[answer.arm] += 1
        assert answer.arm == assign(Experiment("rerank-test", [Arm("retrieval", 1), Arm("control", 1)]), user).name
    assert seen["retrieval"] and seen["control"]
    engine.impressions.flush()
    totals = engine.impressions.totals()
    assert totals["rerank-test/retrieval"]["impressions"] == seen["retrieval"]
    assert totals["rerank-test/control"]["impressions"] == seen["control"]


def test_outcomes_are_counted_per_arm_with_intervals(engine):
    engine.create_experiment("ctr", [Arm("a", 1.0), Arm("b", 1.0)])
    now = int(time.time() * 1000)
    clicks, clicked = Counter(), Counter()
    for n, user in enumerate(USERS):
        answer = ask(engine, user)
        if n % 2 == 0 and len(answer.item_ids) >= 2:
            shown = answer.item_ids[: 2 if n % 4 == 0 else 1]  # some impressions get two clicks
            engine.ingest([Event(f"c{n}-{j}", user, item, EventType.CLICK, 1.0, now, answer.recommendation_id)
                           for j, item in enumerate(shown)])
            clicks[answer.arm] += len(shown)
            clicked[answer.arm] += 1
    engine.impressions.flush()
    report = engine.experiment_report("ctr")
    for arm in ("a", "b"):
        row = report["arms"][arm]
        assert row["clicks"] == clicks[arm] and row["impressions"] > 0
        assert row["ctr"] == pytest.approx(clicked[arm] / row["impressions"])  # impressions with a click
        assert row["ctr_low"] <= row["ctr"] <= row["ctr_high"]


def test_one_running_at_a_time_names_never_reused_and_restarts_keep_them(tmp_path):
    with Engine(tmp_path / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=10, n_items=40, seed=5))
        engine.create_experiment("first", [Arm("a", 1.0), Arm("b", 1.0)])
        with pytest.raises(FailedPrecondition, match="is running"):
            engine.create_experiment("second", [Arm("a", 1.0), Arm("b", 1.0)])
        engine.stop_experiment("first")
        with pytest.raises(FailedPrecondition, match="never reused"):
            engine.create_experiment("first", [Arm("a", 1.0), Arm("c", 1.0)])
        engine.create_experiment("second", [Arm("x", 2.0, {"user_model": "ials"}), Arm("y", 1.0)])
        with pytest.raises(NotFound):
            engine.stop_experiment("third")
    with Engine(tmp_path / "lmdb", CONFIG) as engine:
        listed = {e.name: e for e in engine.list_experiments()}
        assert not listed["first"].running and listed["second"].running
        assert listed["second"].arms[0].options == {"user_model": "ials"}
        assert ask(engine, "u1").experiment == "second"


@pytest.mark.parametrize("arms, field", [
    ([Arm("a", 1.0)], "arms"),
    ([Arm("a", 1.0), Arm("a", 1.0)], "arms[1].name"),
    ([Arm("a", 1.0), Arm("B!", 1.0)], "arms[1].name"),
    ([Arm("a", 0.0), Arm("b", 1.0)], "arms[0].weight"),
    ([Arm("a", float("nan")), Arm("b", 1.0)], "arms[0].weight"),
    ([Arm("a", 1.0), Arm("b", 1.0, {"k": 5})], "arms[1].options"),
    ([Arm("a", 1.0), Arm("b", 1.0, {"candidates": 10**6})], "arms[1].rerank.candidates"),
    ([Arm("a", 1.0), Arm("b", 1.0, {"user_model": "nope"})], "arms[1].user_model"),
])
def test_bad_definitions_are_refused_by_field(engine, arms, field):
    with pytest.raises(InvalidArgument) as error:
        engine.create_experiment("bad", arms)
    assert error.value.field == field
    with pytest.raises(InvalidArgument) as error:
        engine.create_experiment("Bad Name", [Arm("a", 1.0), Arm("b", 1.0)])
    assert error.value.field == "name"
    with pytest.raises(FailedPrecondition) as error:  # no sequence model on this server
        engine.create_experiment("seq", [Arm("a", 1.0), Arm("b", 1.0, {"user_model": "sequence"})])
    assert error.value.field == "arms[1].user_model"
    assert not engine.list_experiments()


def test_wilson_interval():
    assert wilson(0, 0) == (0.0, 0.0, 0.0)
    rate, low, high = wilson(50, 1000)
    assert rate == 0.05 and low == pytest.approx(0.0381, abs=1e-3) and high == pytest.approx(0.0653, abs=1e-3)


def test_grpc_experiment_lifecycle(tmp_path):
    with Engine(tmp_path / "data" / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=20, n_items=60, seed=6))
    server = StreamrecServer(ServerConfig(port=0, data_dir=tmp_path / "data", dataset="none", engine=CONFIG))
    server.start()
    try:
        with StreamrecClient(f"127.0.0.1:{server.port}") as client:
            created = client.create_experiment("grpc-test", [("plain", 1.0, {"rerank": False}), ("default", 1.0, {})])
            assert created.running and [a.name for a in created.arms] == ["plain", "default"]
            assert created.arms[0].options.rerank.HasField("enabled") and not created.arms[0].options.rerank.enabled
            answer = client.recommend("u3", k=3)
            assert answer.experiment == "grpc-test" and answer.arm in ("plain", "default")
            client.send_events([make_event("u3", answer.items[0].item_id, "click", 1.0, event_id="x1",
                                           recommendation_id=answer.recommendation_id)])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                result = {r.arm: r for r in client.get_experiment("grpc-test").results}
                if result[answer.arm].clicks:
                    break
                time.sleep(0.05)
            assert result[answer.arm].clicks == 1 and result[answer.arm].impressions >= 1
            bad = client.recommend_request("u1", 5)  # a request field inside an arm's options
            with pytest.raises(grpc.RpcError) as error:
                client.experiments.CreateExperiment(
                    __import__("streamrec.v1.experiments_pb2", fromlist=["x"]).CreateExperimentRequest(
                        experiment={"name": "bad", "arms": [{"name": "a", "weight": 1, "options": bad},
                                                            {"name": "b", "weight": 1}]}))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "arms[0].options.user_id" in error.value.details()
            stopped = client.stop_experiment("grpc-test")
            assert not stopped.running and stopped.stopped_ms > 0 and len(stopped.results) == 2
            assert [e.name for e in client.list_experiments()] == ["grpc-test"]
            with pytest.raises(grpc.RpcError) as error:
                client.get_experiment("missing")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_cli_arm_syntax():
    import argparse

    from streamrec.cli.experiment import parse_arm

    assert parse_arm("a:2") == ("a", 2.0, {})
    assert parse_arm("b:1:rerank=false,user_model=ials,candidates=50,mmr_lambda=0.3") == (
        "b", 1.0, {"rerank": False, "user_model": "ials", "candidates": 50, "mmr_lambda": 0.3})
    for bad in ("a", "a:x", "a:1:k=5", "a:1:rerank=maybe", "a:1:candidates=many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_arm(bad)


def test_cli_create_report_plot_stop(tmp_path, capsys):
    from streamrec.cli import main

    with Engine(tmp_path / "data" / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=20, n_items=60, seed=7))
    server = StreamrecServer(ServerConfig(port=0, data_dir=tmp_path / "data", dataset="none", engine=CONFIG))
    server.start()
    address = ["--address", f"127.0.0.1:{server.port}"]
    try:
        assert main(["experiment", "create", "cli-test", "--arm", "a:1", "--arm", "b:1:rerank=false", *address]) == 0
        with StreamrecClient(f"127.0.0.1:{server.port}") as client:
            for n in range(6):
                client.recommend(f"u{n}", k=3)
        capsys.readouterr()
        plot = tmp_path / "report.png"
        args = ["experiment", "report", "cli-test", *address]
        if __import__("importlib").util.find_spec("matplotlib"):
            args += ["--plot", str(plot)]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "experiment cli-test (running)" in out and "CTR (95% CI)" in out
        assert sum(int(line.split()[2]) for line in out.splitlines() if line.startswith(("a ", "b "))) == 6
        assert "--plot" not in args or plot.stat().st_size > 1000
        assert main(["experiment", "stop", "cli-test", *address]) == 0 and "(stopped)" in capsys.readouterr().out
        assert main(["experiment", "create", "cli-test", "--arm", "a:1", "--arm", "b:1", *address]) == 1
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
    finally:
        server.stop()


def test_asyncio_client_runs_an_experiment(tmp_path):
    import asyncio

    from streamrec.clients.aio import AsyncStreamrecClient

    with Engine(tmp_path / "data" / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=10, n_items=40, seed=9))
    server = StreamrecServer(ServerConfig(port=0, data_dir=tmp_path / "data", dataset="none", engine=CONFIG))
    server.start()

    async def run():
        async with AsyncStreamrecClient(f"127.0.0.1:{server.port}") as client:
            created = await client.create_experiment("aio", [("a", 1.0, {}), ("b", 1.0, {"rerank": False})])
            answer = await client.recommend("u1", k=3)
            stopped = await client.stop_experiment("aio")
            return created, answer, stopped, await client.list_experiments(), await client.get_experiment("aio")

    try:
        created, answer, stopped, listed, got = asyncio.run(run())
        assert created.running and answer.experiment == "aio" and not stopped.running
        assert [e.name for e in listed] == ["aio"] and {r.arm for r in got.results} == {"a", "b"}
    finally:
        server.stop()
