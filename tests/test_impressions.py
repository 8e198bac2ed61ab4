"""The impression log (engine/feedback/impressions.py): every answer gets a recommendation_id and its impression;
events that name it are attributed (or counted as unattributed, by reason, and still accepted); retention bounds
the log; ForgetUser erases a user's impressions; a full queue sheds instead of blocking."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.api import Event, EventType
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.feedback.impressions import Impression, ImpressionLog, RetentionPolicy, new_recommendation_id
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.server.app import ServerConfig, StreamrecServer

CONFIG = EngineConfig(dim=16, sync=False, backend="numpy", checkpoint_interval_s=3600, checkpoint_every_records=10**9,
                      attribution_window_s=60.0)


@pytest.fixture()
def engine(tmp_path):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    with Engine(tmp_path / "lmdb", CONFIG) as eng:
        seed_engine(eng, synthetic(n_users=30, n_items=120, seed=1))
        yield eng


def click(user: str, item: str, recommendation_id: str, event_id: str, ms: int | None = None) -> Event:
    return Event(event_id, user, item, EventType.CLICK, 1.0, ms or int(time.time() * 1000), recommendation_id)


def test_answers_carry_an_id_and_their_impression(engine):
    answer = engine.recommend([engine.build_query("u1", 5, rerank=False)])[0]
    assert len(answer.recommendation_id) == 32 and int(answer.recommendation_id, 16) >= 0
    other = engine.recommend([engine.build_query("u1", 5, rerank=False)])[0]
    assert other.recommendation_id != answer.recommendation_id
    engine.impressions.flush()
    shown = engine.impressions.get(answer.recommendation_id)
    assert shown.user_id == "u1" and shown.item_ids == answer.item_ids
    assert shown.scores == pytest.approx(answer.scores.tolist()) and shown.user_model == answer.user_model
    assert engine.impressions_info()["arms"]["/"]["impressions"] == 2


def test_events_are_attributed_by_id_item_user_and_window(engine):
    answer = engine.recommend([engine.build_query("u2", 5, rerank=False)])[0]
    rid, shown = answer.recommendation_id, answer.item_ids
    unshown = next(f"i{j}" for j in range(120) if f"i{j}" not in shown)
    now = int(time.time() * 1000)
    result = engine.ingest([
        click("u2", shown[2], rid, "a"),                            # attributed at position 3
        click("u2", shown[2], rid, "a"),                            # the same event again: a duplicate
        Event("b", "u2", shown[0], EventType.PURCHASE, 1.0, now, rid),  # attributed
        click("u2", unshown, rid, "c"),                             # not in the answer
        click("u3", shown[1], rid, "d"),                            # another user's answer
        click("u2", shown[1], "f" * 32, "e"),                       # an id never given
        click("u2", shown[1], "not-hex", "f"),                      # malformed: unknown too
        click("u2", shown[3], rid, "g", ms=now + 120_000),          # after the 60 s window
    ])
    assert not result.rejections and result.accepted == 7 and result.duplicates == 1  # all accepted
    engine.impressions.flush()
    impression = engine.impressions.get(rid)
    assert [(o[0], o[1], o[2]) for o in impression.outcomes] == [("click", shown[2], 3), ("purchase", shown[0], 1)]
    info = engine.impressions_info()
    assert info["attributed"] == 2 and info["unattributed_not_shown"] == 1 and info["unattributed_other_user"] == 1
    assert info["unattributed_unknown_id"] == 2 and info["unattributed_outside_window"] == 1
    assert info["arms"]["/"]["click"] == 1 and info["arms"]["/"]["purchase"] == 1 and info["arms"]["/"]["attributed"] == 2


def test_forget_erases_the_users_impressions_but_not_the_anonymous_totals(engine):
    for user in ("u4", "u4", "u5"):
        engine.recommend([engine.build_query(user, 3, rerank=False)])
    engine.impressions.flush()
    assert len(engine.impressions.user_impressions("u4")) == 2
    engine.forget_user("u4")
    assert engine.impressions.user_impressions("u4") == [] and len(engine.impressions.user_impressions("u5")) == 1
    assert engine.impressions.size() == 1 and engine.impressions_info()["arms"]["/"]["impressions"] == 3


def test_impressions_survive_a_restart(tmp_path):
    with Engine(tmp_path / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=10, n_items=50, seed=2))
        rid = engine.recommend([engine.build_query("u1", 3, rerank=False)])[0].recommendation_id
    with Engine(tmp_path / "lmdb", CONFIG) as engine:
        assert engine.impressions.get(rid).user_id == "u1"


def test_retention_keeps_the_newest_within_count_and_age(tmp_path):
    log = ImpressionLog(tmp_path / "imp", RetentionPolicy(max_records=5, max_age_ms=10_000), sync=False)
    try:
        now = int(time.time() * 1000)
        ids = [new_recommendation_id() for _ in range(12)]
        for n, rid in enumerate(ids):
            log.record(Impression(rid, f"u{n % 3}", ["i1"], [0.5], now - 1000 * (12 - n)))
        log.flush()
        assert log.prune(now) == 7 and log.size() == 5
        assert [log.get(rid) is not None for rid in ids] == [False] * 7 + [True] * 5
        assert log.prune(now + 8_000) == 3 and log.size() == 2  # older than 10 s at that time
        assert sum(len(log.user_impressions(f"u{u}")) for u in range(3)) == 2  # the user index follows
    finally:
        log.close()


def test_a_full_queue_sheds_instead_of_blocking(tmp_path):
    log = ImpressionLog(tmp_path / "imp", queue_size=1, sync=False)
    try:
        started = time.perf_counter()
        kept = sum(log.record(Impression(new_recommendation_id(), "u", ["i"] * 50, [0.1] * 50, 1)) for _ in range(3000))
        assert time.perf_counter() - started < 2.0  # never waited for the writer
        log.flush()
        assert log.counters["shed"] == 3000 - kept > 0 and log.counters["recorded"] == kept == log.size()
    finally:
        log.close()


def test_grpc_round_trip_and_bad_ids(tmp_path):
    with Engine(tmp_path / "data" / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=10, n_items=50, seed=3))
    server = StreamrecServer(ServerConfig(port=0, data_dir=tmp_path / "data", dataset="none", engine=CONFIG))
    server.start()
    try:
        with StreamrecClient(f"127.0.0.1:{server.port}") as client:
            answer = client.recommend("u1", k=4, rerank=False)
            assert len(answer.recommendation_id) == 32
            result = client.send_events([
                make_event("u1", answer.items[0].item_id, "click", 1.0, event_id="g1",
                           recommendation_id=answer.recommendation_id),
                make_event("u1", answer.items[1].item_id, "click", 1.0, event_id="g2", recommendation_id="x" * 65),
            ])
            assert [(r.event_id, r.field) for r in result.rejections] == [("g2", "recommendation_id")]
            deadline = time.monotonic() + 5
            while client.stats().impressions.attributed < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = client.stats().impressions
            assert stats.enabled and stats.attributed == 1 and stats.stored >= 1
            arm = next(a for a in stats.arms if a.experiment == "" and a.arm == "")
            assert arm.impressions >= 1 and arm.events["click"] == 1
            assert client.recommend("u1", k=2).items  # still serving
    finally:
        server.stop()


def test_sampled_answers_log_the_reranker_features_they_were_served_with(tmp_path):
    from streamrec.engine.rerank.features import feature_count

    config = EngineConfig(**{**CONFIG.__dict__, "impression_features": 1.0})
    with Engine(tmp_path / "lmdb", config) as engine:
        seed_engine(engine, synthetic(n_users=10, n_items=60, seed=8))
        answer = engine.recommend([engine.build_query("u1", 6, rerank=False)])[0]
        expected = engine.rerank_features("u1", answer.item_ids, answer.scores, answer.user_model)
        cold = engine.recommend([engine.build_query("stranger", 6, rerank=False)])[0]  # popularity: nothing to log
        engine.impressions.flush()
        logged = engine.impressions.features(answer.recommendation_id)
        assert logged.shape == (6, feature_count(16)) and engine.impressions.features(cold.recommendation_id) is None
        assert np.allclose(logged, expected, rtol=2e-3, atol=2e-3)  # stored as float16
        engine.forget_user("u1")
        assert engine.impressions.features(answer.recommendation_id) is None
    with pytest.raises(ValueError, match="impression_features"):
        Engine(tmp_path / "other", EngineConfig(**{**CONFIG.__dict__, "impression_features": 1.5}))
