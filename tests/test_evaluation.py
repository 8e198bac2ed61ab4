"""Prequential evaluation (engine/offline/evaluation.py, cli/evaluate.py): the metric math, test-then-learn
order, the popularity baseline, streamrec against popularity on planted structure, the served path against
the engine path (real server subprocess), and the `implicit` peer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from streamrec.engine.api import EventType
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline import evaluation as ev
from streamrec.engine.offline.datasets import Dataset, build_interactions, synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.cli import evaluate as evaluate_cli

R = EventType.RATING


def make_dataset(rows, items) -> Dataset:
    """rows: (user, item, type, value, timestamp_ms)."""
    users, its, types, values, ts = zip(*rows)
    log = build_interactions(users, its, types, values, ts)
    return Dataset("hand", log, {i: [] for i in items}, {i: {} for i in items})


@pytest.fixture(scope="module")
def small():
    """Planted clusters, small enough for a quick seed and replay."""
    return synthetic(n_users=150, n_items=300, n_clusters=6, events_per_user=30, seed=3)


# --- metrics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", range(1, 11))
def test_hit_at_rank_r_scores_ndcg_one_over_log2_r_plus_1(rank):
    ranked = [f"x{i}" for i in range(1, 11)]
    ranked[rank - 1] = "held"
    hit, gain = ev.hit_and_ndcg(ranked, "held", 10)
    assert hit and gain == pytest.approx(1.0 / math.log2(rank + 1))


def test_miss_and_beyond_k_score_zero():
    assert ev.hit_and_ndcg(["a", "b", "c"], "z", 10) == (False, 0.0)
    assert ev.hit_and_ndcg(["a", "b", "c"], "c", 2) == (False, 0.0)  # rank 3 with k = 2
    assert ev.hit_and_ndcg(["held"], "held", 10) == (True, 1.0)


def test_top_rows_excludes_and_breaks_ties_by_row():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    assert ev.top_rows(scores, 3, np.array([], np.int64)).tolist() == [1, 3, 0]
    assert ev.top_rows(scores, 3, np.array([1])).tolist() == [3, 0, 2]
    assert ev.top_rows(scores, 10, np.array([0, 1, 2])).tolist() == [3, 4]  # fewer candidates than k


# --- protocol ----------------------------------------------------------------------------------------------

class Spy:
    """Records what the harness does, in order; always recommends a fixed list."""

    name = "spy"

    def __init__(self, catalog, answer):
        self.catalog, self.answer, self.log = catalog, answer, []

    def recommend(self, user_id, k, exclude_rows):
        self.log.append(("recommend", user_id, {self.catalog.ids[r] for r in exclude_rows}))
        return [i for i in self.answer if self.catalog.row(i) not in set(exclude_rows.tolist())][:k]

    def learn(self, event):
        self.log.append(("learn", event.user_id, event.item_id))


def test_test_then_learn_order_and_seen_items():
    items = ["a", "b", "c", "d", "z"]
    data = make_dataset([
        ("u1", "z", R, 5, 0),  # training part
        ("u1", "a", R, 5, 10),  # replay from here: positive -> evaluated
        ("u1", "b", EventType.SKIP, 1, 20),  # not positive: learned, not evaluated
        ("u1", "b", R, 4, 30),  # positive but already seen: skipped (cannot be hit)
        ("u1", "c", R, 2, 40),  # a low rating is not positive
        ("u1", "d", R, 4, 50),  # evaluated; a, b, c are seen now
    ], items)
    train, test = ev.time_split(data, 1 / 6)
    assert len(train.interactions) == 1 and len(test) == 5
    catalog = ev.Catalog.of(data)
    spy = Spy(catalog, ["b", "a", "d", "c", "z"])
    steps = []
    result = ev.prequential_replay(ev.replay_events(test), spy, 2, lambda *step: steps.append(step),
                                   catalog=catalog, history=train.interactions, n_candidates=3)
    assert spy.log == [
        ("recommend", "u1", {"z"}),  # the held item "a" is not seen yet when ranked
        ("learn", "u1", "a"),
        ("learn", "u1", "b"),
        ("learn", "u1", "b"),
        ("learn", "u1", "c"),
        ("recommend", "u1", {"z", "a", "b", "c"}),  # ... and it is afterwards
        ("learn", "u1", "d"),
    ]
    assert steps == [("u1", "a", ["b", "a", "d"]), ("u1", "d", ["d"])]  # n_candidates items go to the hook
    assert result.events == 2 and result.replayed == 5 and result.skipped["repeat"] == 1
    assert result.hits.tolist() == [1, 1]
    assert result.gains.tolist() == pytest.approx([1 / math.log2(3), 1.0])
    assert result.positions.tolist() == [0, 4]
    record = result.record()
    assert {"model", "hr@2", "ndcg@2", "events", "seconds"} <= set(record)


def test_time_split_keeps_time_order_and_catalog(small):
    train, test = ev.time_split(small, 0.8)
    assert len(train.interactions) == round(0.8 * len(small.interactions))
    assert len(train.interactions) + len(test) == len(small.interactions)
    assert train.interactions.timestamps_ms.max() <= test.timestamps_ms.min()
    assert train.item_categories == small.item_categories


def test_popularity_matches_a_hand_count():
    items = ["a", "b", "c", "d"]
    data = make_dataset([
        ("u1", "a", R, 5, 0), ("u2", "a", R, 4, 1), ("u3", "b", R, 5, 2), ("u1", "c", R, 1, 3),  # c: not positive
        ("u2", "c", EventType.VIEW, 1, 4), ("u4", "b", EventType.PURCHASE, 1, 5), ("u4", "b", R, 3, 6),
    ], items)
    catalog = ev.Catalog.of(data)
    model = ev.Popularity(catalog, data.interactions)
    assert model.counts.tolist() == [2, 2, 1, 0]  # a: two ratings >= 4; b: a 5 and a purchase; c: the view
    none = np.array([], np.int64)
    assert model.recommend("x", 4, none) == ["a", "b", "c", "d"]  # tie a/b: catalog order
    for _ in range(3):
        model.learn(next(make_dataset([("u9", "d", R, 5, 9)], items).interactions.events("e")))
    assert model.counts.tolist() == [2, 2, 1, 3]
    assert model.recommend("x", 2, np.array([0])) == ["d", "b"]


# --- models ------------------------------------------------------------------------------------------------

def _seeded(folder, train):
    engine = Engine(folder / "lmdb", EngineConfig(dim=16, backend="numpy", sync=False))
    seed_engine(engine, train)
    return engine


def test_streamrec_online_beats_popularity_on_planted_structure(small, tmp_path):
    catalog = ev.Catalog.of(small)
    train, test = ev.time_split(small, 0.7)
    events = ev.replay_events(test)
    history = train.interactions
    popularity = ev.prequential_replay(events, ev.Popularity(catalog, history), catalog=catalog, history=history)
    with _seeded(tmp_path, train) as engine:
        frozen_lists, online_lists = [], []
        frozen = ev.prequential_replay(events, ev.FrozenEngine(engine, catalog, history),
                                       on_step=lambda *step: frozen_lists.append(step), catalog=catalog,
                                       history=history)
        online = ev.prequential_replay(events, ev.StreamrecEngine(engine, verify_seen=True),
                                       on_step=lambda *step: online_lists.append(step), catalog=catalog,
                                       history=history)
    assert frozen_lists[0] == online_lists[0]  # same seeded state before the first event
    assert frozen_lists != online_lists  # online updates change later answers
    assert online.events == popularity.events == frozen.events > 300
    assert online.hr > 1.2 * popularity.hr and online.ndcg > 1.2 * popularity.ndcg, (online.record(), popularity.record())
    assert frozen.details["fallback_steps"] == 0  # every replay user has training history here


def test_frozen_factors_fall_back_to_online_popularity():
    catalog = ev.Catalog(["a", "b", "c"])
    model = ev.FrozenFactors("f", catalog, {"known": np.array([0.0, 1.0])}, np.array([[1, 0], [0, 1], [0, 0.5]]),
                             metric="dot")
    none = np.array([], np.int64)
    assert model.recommend("known", 2, none) == ["b", "c"]
    model.learn(next(make_dataset([("x", "c", R, 5, 0)], ["a", "b", "c"]).interactions.events("e")))
    assert model.recommend("stranger", 2, none) == ["c", "a"]
    assert model.details()["fallback_steps"] == 1


def test_served_path_equals_engine_path(small, tmp_path):
    """Replay through a real `streamrec serve` subprocess (events on the stream, acks awaited before each
    Recommend) and through the Engine API: identical hits and NDCG; JSON and plot are written."""
    parser = evaluate_cli.argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    args = parser.parse_args(["--models", "popularity,bootstrap,online", "--dim", "16", "--served", "--limit", "500",
                              "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"), "--window", "50"])
    assert evaluate_cli.run(args, dataset=small) == 0
    records = json.loads((tmp_path / "q.json").read_text())
    by_model = {r["model"]: r for r in records}
    assert set(by_model) == {"popularity", "streamrec bootstrap (frozen)", "streamrec online", "streamrec online (served)"}
    for r in records:
        assert {"model", "hr@10", "ndcg@10", "events", "seconds"} <= set(r) and r["events"] > 200
    served, online = by_model["streamrec online (served)"], by_model["streamrec online"]
    assert (served["hr@10"], served["ndcg@10"]) == (online["hr@10"], online["ndcg@10"])
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_implicit_peer_runs(small):
    reason = ev.implicit_available()
    if reason:
        pytest.skip(reason)
    catalog = ev.Catalog.of(small)
    train, test = ev.time_split(small, 0.8)
    events = ev.replay_events(test)[:600]
    history = train.interactions
    als_params = {**ev.ALS_DEFAULT, "factors": 16, "iterations": 5}
    grid = [als_params, {**als_params, "regularization": 50.0}]
    chosen, trials = ev.tune_implicit("als", train, catalog, grid)
    assert chosen in grid and len(trials) == 2
    results = [
        ev.prequential_replay(events, ev.implicit_model("als", train, catalog, als_params), catalog=catalog, history=history),
        ev.prequential_replay(events, ev.implicit_model("bpr", train, catalog, {**ev.BPR_DEFAULT, "factors": 16}),
                              catalog=catalog, history=history),
        ev.prequential_replay(events, ev.ImplicitALSRefit(train, catalog, als_params, every=200), catalog=catalog,
                              history=history),
    ]
    popularity = ev.prequential_replay(events, ev.Popularity(catalog, history), catalog=catalog, history=history)
    for result in results:
        assert result.events == popularity.events > 100
        assert 0.0 <= result.ndcg <= result.hr <= 1.0
    assert results[0].hr > popularity.hr  # ALS finds the planted clusters
    assert results[2].details["refits"] == 3 and results[2].details["refit_seconds"] > 0
    never = ev.prequential_replay(events, ev.ImplicitALSRefit(train, catalog, als_params, every=10**9),
                                  catalog=catalog, history=history)
    assert never.details["refits"] == 0 and np.array_equal(never.gains, results[0].gains)  # no refit = frozen ALS
