"""Diversity and explanations (issue 20): MMR re-selection and the per-category cap over the retrieved pool
(engine/retrieval/diversity.py), `because` from the user's recent positive items (engine/retrieval/explain.py),
through the engine and through gRPC, with bad values refused by field name."""
from __future__ import annotations

import logging
import math
from itertools import combinations

import grpc
import numpy as np
import pytest

from streamrec.cli import main
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.api import Event, EventType
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.errors import InvalidArgument
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.retrieval import diversity

CONFIG = EngineConfig(dim=16, sync=False, backend="numpy", checkpoint_interval_s=3600, checkpoint_every_records=10**9)
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    folder = tmp_path_factory.mktemp("diversity")
    with Engine(folder / "lmdb", CONFIG) as engine:
        seed_engine(engine, synthetic(n_users=60, n_items=300, seed=5))
        yield engine


def answer(engine: Engine, user: str, k: int = 10, **options):
    return engine.recommend([engine.build_query(user, k, rerank=False, **options)])[0]


def vector(engine: Engine, item_id: str) -> np.ndarray:
    return engine.get_item(item_id).vector.astype(np.float64)


def reference_mmr(engine, ids, scores, k, lam, cap, categories) -> list[str]:
    """The greedy rule written out item by item, as the docstring of diversity.py states it."""
    scores = np.asarray(scores, np.float64)
    rel = (scores - scores.min()) / (scores.max() - scores.min())
    vectors = [vector(engine, i) for i in ids]
    picked: list[int] = []
    counts: dict[str, int] = {}
    while len(picked) < k:
        best, best_value = None, -math.inf
        for j in range(len(ids)):
            if j in picked or (cap and any(counts.get(c, 0) >= cap for c in categories[j])):
                continue
            closest = max((float(vectors[j] @ vectors[p]) for p in picked), default=-1.0)
            value = (1 - lam) * rel[j] - lam * closest
            if value > best_value:
                best, best_value = j, value
        if best is None:
            break
        picked.append(best)
        for c in categories[best]:
            counts[c] = counts.get(c, 0) + 1
    return [ids[j] for j in picked]


def mean_pairwise_cosine(engine, ids) -> float:
    return float(np.mean([vector(engine, a) @ vector(engine, b) for a, b in combinations(ids, 2)]))


def test_select_takes_the_less_similar_item_when_lambda_is_positive():
    vectors = np.array([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0]], np.float32)  # 0 and 1 near-duplicates
    scores = np.array([0.9, 0.85, 0.5], np.float32)
    bits = np.zeros((3, 1), np.uint64)
    assert diversity.select(scores, vectors, bits, 2, 0.0, 0).tolist() == [0, 1]
    assert diversity.select(scores, vectors, bits, 2, 0.5, 0).tolist() == [0, 2]
    assert diversity.select(scores, vectors, bits, 3, 0.5, 0).tolist() == [0, 2, 1]
    # A small weight keeps relevance first: the near-duplicate's lead outweighs its similarity.
    assert diversity.select(scores, vectors, bits, 2, 0.05, 0).tolist() == [0, 1]


def test_select_caps_every_category_of_multi_category_items():
    a, b, c = 1, 2, 4  # category bits
    bits = np.array([[a], [a | b], [b], [c], [a]], np.uint64)
    scores = np.array([5, 4, 3, 2, 1], np.float32)
    vectors = np.eye(5, dtype=np.float32)
    assert diversity.select(scores, vectors, bits, 5, 0.0, 1).tolist() == [0, 2, 3]
    assert diversity.select(scores, vectors, bits, 5, 0.0, 2).tolist() == [0, 1, 2, 3]


def test_lambda_zero_is_the_plain_order(engine):
    plain = answer(engine, "u3")
    off = answer(engine, "u3", mmr_lambda=0.0, max_per_category=0)
    assert off.item_ids == plain.item_ids and np.array_equal(off.scores, plain.scores)


def test_mmr_equals_the_greedy_rule_over_the_retrieved_pool(engine):
    k, lam = 10, 0.6
    pool = answer(engine, "u3", diversity.pool_size(k, engine.limits.max_k))  # the candidates diversity chooses from
    plain = answer(engine, "u3", k)
    mixed = answer(engine, "u3", k, mmr_lambda=lam)
    assert mixed.item_ids == reference_mmr(engine, pool.item_ids, pool.scores, k, lam, 0, pool.categories)
    assert mixed.item_ids[0] == plain.item_ids[0]
    assert set(mixed.item_ids) != set(plain.item_ids)  # it reached past the plain top k
    assert mean_pairwise_cosine(engine, mixed.item_ids) < mean_pairwise_cosine(engine, plain.item_ids) - 0.05
    by_id = dict(zip(pool.item_ids, pool.scores.tolist()))
    assert [by_id[i] for i in mixed.item_ids] == pytest.approx(mixed.scores.tolist())  # scores travel with items
    assert answer(engine, "u3", k, mmr_lambda=lam).item_ids == mixed.item_ids  # deterministic


def linear_reranker(path, seed: int = 0):
    """A linear ONNX scorer over the feature rows (random weights: distinct scores, an order unlike retrieval's)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from streamrec.engine.rerank.features import feature_count

    width = feature_count(CONFIG.dim)
    weights = np.random.default_rng(seed).standard_normal((width, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["score"])],
        "linear", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([-1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_diversity_chooses_from_the_reranked_pool(engine, tmp_path):
    engine.load_reranker(linear_reranker(tmp_path / "linear.onnx"))
    try:
        k, lam = 10, 0.6
        ask = dict(rerank=True, candidates=200)
        pool = engine.recommend([engine.build_query("u7", diversity.pool_size(k, engine.limits.max_k), **ask)])[0]
        plain = engine.recommend([engine.build_query("u7", k, **ask)])[0]
        mixed = engine.recommend([engine.build_query("u7", k, mmr_lambda=lam, **ask)])[0]
    finally:
        engine.unload_reranker()
    assert pool.reranker and mixed.reranker == pool.reranker
    assert plain.item_ids == pool.item_ids[:k]
    assert mixed.item_ids == reference_mmr(engine, pool.item_ids, pool.scores, k, lam, 0, pool.categories)
    assert mixed.item_ids != plain.item_ids
    model, retrieval = (dict(zip(pool.item_ids, s.tolist())) for s in (pool.scores, pool.retrieval_scores))
    assert mixed.scores.tolist() == [model[i] for i in mixed.item_ids]
    assert mixed.retrieval_scores.tolist() == [retrieval[i] for i in mixed.item_ids]


def test_category_cap_holds(engine):
    plain = answer(engine, "u5")
    counts = {}
    for categories in plain.categories:
        for c in categories:
            counts[c] = counts.get(c, 0) + 1
    assert max(counts.values()) > 2  # otherwise the cap below would change nothing
    pool = answer(engine, "u5", diversity.pool_size(10, engine.limits.max_k))
    for lam in (0.0, 0.4):
        capped = answer(engine, "u5", mmr_lambda=lam, max_per_category=2)
        held = {}
        for categories in capped.categories:
            for c in categories:
                held[c] = held.get(c, 0) + 1
        assert max(held.values()) <= 2
        assert capped.item_ids == reference_mmr(engine, pool.item_ids, pool.scores, 10, lam, 2, pool.categories)
    # A hard cap: one category allowed, two per category: two items, not k.
    only = answer(engine, "u5", include_categories=["c3"], max_per_category=2)
    assert len(only.item_ids) == 2 and all(c == ["c3"] for c in only.categories)
    popular = answer(engine, "nobody-yet", max_per_category=1)  # cold start: popularity order, capped too
    assert popular.strategy == "popular" and len({c[0] for c in popular.categories}) == len(popular.item_ids) > 1


def test_explanations_name_positive_history_items_with_their_cosine(engine):
    liked = ["i10", "i11", "i150", "i200"]  # a click, a purchase, a 5-star rating, a view
    disliked = ["i12", "i151", "i201"]  # a skip, a dislike, a 2-star rating
    kinds = [(EventType.CLICK, 1.0), (EventType.PURCHASE, 1.0), (EventType.RATING, 5.0), (EventType.VIEW, 1.0),
             (EventType.SKIP, 1.0), (EventType.DISLIKE, 1.0), (EventType.RATING, 2.0)]
    engine.ingest([Event(f"ex-{n}", "explainer", item, t, v, T0 + n * 1000)
                   for n, (item, (t, v)) in enumerate(zip(liked + disliked, kinds))])
    assert answer(engine, "explainer").because is None  # off by default
    result = answer(engine, "explainer", explain=True)
    assert result.because is not None and len(result.because) == len(result.item_ids)
    assert any(result.because)
    for item_id, reasons in zip(result.item_ids, result.because):
        expected = sorted(((float(vector(engine, item_id) @ vector(engine, h)), h) for h in liked), reverse=True)
        expected = [(h, cos) for cos, h in expected if cos > 0][:3]
        assert [h for h, _ in reasons] == [h for h, _ in expected]
        assert [cos for _, cos in reasons] == pytest.approx([cos for _, cos in expected], abs=1e-9)
        assert not set(h for h, _ in reasons) & set(disliked)
    # With exclude_seen off an answered item may be a liked one: it never explains itself.
    seen_too = answer(engine, "explainer", k=50, exclude_seen=False, explain=True)
    assert set(seen_too.item_ids) & set(liked)
    for item_id, reasons in zip(seen_too.item_ids, seen_too.because):
        assert item_id not in [h for h, _ in reasons]


@pytest.mark.parametrize("options, field", [
    (dict(mmr_lambda=1.5), "diversity.mmr_lambda"),
    (dict(mmr_lambda=-0.1), "diversity.mmr_lambda"),
    (dict(mmr_lambda=float("nan")), "diversity.mmr_lambda"),
    (dict(max_per_category=-1), "diversity.max_per_category"),
])
def test_engine_refuses_bad_diversity(engine, options, field):
    with pytest.raises(InvalidArgument) as error:
        engine.build_query("u1", 10, **options)
    assert error.value.field == field


@pytest.mark.parametrize("options, field", [
    (dict(mmr_lambda=1.5), "diversity.mmr_lambda"),
    (dict(mmr_lambda=-0.25), "diversity.mmr_lambda"),
    (dict(mmr_lambda=float("nan")), "diversity.mmr_lambda"),
    (dict(mmr_lambda=float("inf")), "diversity.mmr_lambda"),
    (dict(max_per_category=2**32 - 1), "diversity.max_per_category"),
])
def test_grpc_refuses_bad_diversity_by_field_and_keeps_serving(server, client: StreamrecClient, options, field):
    with pytest.raises(grpc.RpcError) as error:
        client.recommend("u1", k=5, retry=False, **options)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.recommend_batch([client.recommend_request("u1", 5), client.recommend_request("u2", 5, **options)],
                               retry=False)
    assert error.value.details().startswith(f"requests[1].{field}"), error.value.details()
    served = client.recommend("u1", k=10, mmr_lambda=0.5, max_per_category=2, explain=True)
    held = [item.categories[0] for item in served.items]
    assert served.items and max(held.count(c) for c in held) <= 2
    assert any(len(item.because) for item in served.items)


def test_grpc_and_cli_carry_explanations(server, client: StreamrecClient, capsys):
    client.send_events([make_event("because-user", "i7", "purchase", 1.0),
                        make_event("because-user", "i8", "click", 1.0)])
    plain = client.recommend("because-user", k=5)
    assert all(len(item.because) == 0 for item in plain.items)
    explained = client.recommend("because-user", k=5, explain=True)
    assert [i.item_id for i in explained.items] == [i.item_id for i in plain.items]
    assert any(len(item.because) for item in explained.items)
    for item in explained.items:
        for reason in item.because:
            assert reason.item_id in ("i7", "i8") and 0 < reason.similarity <= 1.0001
    assert main(["recommend", "because-user", "-k", "5", "--explain", "--mmr-lambda", "0.3",
                 "--address", server.address]) == 0
    assert "because you liked i" in capsys.readouterr().out
    assert main(["recommend", "because-user", "--mmr-lambda", "2", "--address", server.address]) == 1
    assert "INVALID_ARGUMENT: diversity.mmr_lambda" in capsys.readouterr().err
