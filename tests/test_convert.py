"""Engine results -> response messages (server/convert.py): every field lands where the proto says."""
from __future__ import annotations

import numpy as np
import pytest

from streamrec.engine.api import Recommendation, ServedBy
from streamrec.server import convert

SERVED_BY = ServedBy(model_version="ials-test-d8", embedding_version=7, applied_seq=42, backend="numba")


def recommendation(reranked: bool) -> Recommendation:
    return Recommendation(
        request_id="r1", user_id="u1", item_ids=["i3", "i1"], scores=np.array([0.9, 0.25], np.float32),
        categories=[["c1", "c2"], []], strategy="personalized",
        retrieval_scores=np.array([0.5, 0.75], np.float32) if reranked else None,
        reranker="rerank-v2" if reranked else "")


@pytest.mark.parametrize("reranked", [False, True])
def test_recommend_response_carries_every_field(reranked):
    response = convert.recommend_response(SERVED_BY, recommendation(reranked), latency_us=123)
    assert (response.request_id, response.user_id, response.strategy, response.server_latency_us) == ("r1", "u1", "personalized", 123)
    assert [(i.item_id, i.score, list(i.categories)) for i in response.items] == [("i3", pytest.approx(0.9), ["c1", "c2"]),
                                                                                   ("i1", 0.25, [])]
    assert [i.retrieval_score for i in response.items] == ([0.5, 0.75] if reranked else [pytest.approx(0.9), 0.25])
    served = response.served_by
    assert (served.model_version, served.embedding_version, served.applied_seq, served.backend, served.reranker) == \
        ("ials-test-d8", 7, 42, "numba", "rerank-v2" if reranked else "")


def test_similar_items_response_carries_every_field():
    response = convert.similar_items_response(SERVED_BY, recommendation(False), "i9", latency_us=5)
    assert (response.request_id, response.item_id, response.server_latency_us) == ("r1", "i9", 5)
    assert [i.item_id for i in response.items] == ["i3", "i1"] and list(response.items[0].categories) == ["c1", "c2"]
    assert (response.served_by.model_version, response.served_by.applied_seq) == ("ials-test-d8", 42)
