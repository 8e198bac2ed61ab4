"""Dynamic batching: concurrent requests share kernel calls and get exactly their unbatched answers."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from streamrec.clients.client import StreamrecClient
from streamrec.engine.errors import DeadlineExceeded
from streamrec.engine.retrieval.batcher import MicroBatcher


def test_lone_request_does_not_wait():
    batcher = MicroBatcher(lambda qs: [q * 2 for q in qs], max_batch=64, max_wait_us=200_000)
    started = time.perf_counter()
    assert batcher.submit(21).result(5) == 42
    assert time.perf_counter() - started < 0.1, "a lone request must not wait for max_wait_us"
    batcher.close()


def test_concurrent_requests_are_batched_and_answered_in_place():
    sizes = []
    gate = threading.Event()

    def run(queries):
        sizes.append(len(queries))
        gate.wait(5)  # hold the first batch so the rest queue up behind it
        return [q + 1000 for q in queries]

    batcher = MicroBatcher(run, max_batch=16)
    futures = [batcher.submit(i) for i in range(40)]
    gate.set()
    assert [f.result(5) for f in futures] == [i + 1000 for i in range(40)]
    assert max(sizes) == 16 and len(sizes) >= 3 and sum(sizes) == 40
    assert batcher.histogram.snapshot()[16] >= 2
    batcher.close()


def test_expired_requests_are_dropped_and_failures_reach_every_caller():
    batcher = MicroBatcher(lambda qs: 1 / 0)
    with pytest.raises(DeadlineExceeded):
        batcher.submit(1, deadline=time.monotonic() - 1).result(5)
    with pytest.raises(ZeroDivisionError):
        batcher.submit(2).result(5)
    batcher.close()


def test_server_batches_concurrent_calls_and_answers_as_unbatched(server):
    engine = server.engine
    users = [f"u{i}" for i in range(120)] + [f"nobody-{i}" for i in range(8)]
    queries = {u: engine.build_query(u, 1 + len(u) % 17, exclude_item_ids=["i1", "i2"],
                                     exclude_categories=["c3"] if len(u) % 2 else []) for u in users}
    alone = {u: engine.retriever.recommend([q])[0] for u, q in queries.items()}  # no batcher, batch of one
    before = engine.batcher.histogram.batches
    with StreamrecClient(server.address) as client, ThreadPoolExecutor(16) as pool:
        def ask(user):
            return client.recommend(user, k=queries[user].k, exclude_item_ids=["i1", "i2"],
                                    exclude_categories=list(queries[user].exclude_categories))
        responses = dict(zip(users, pool.map(ask, users * 3)))
    for user, response in responses.items():
        assert [i.item_id for i in response.items] == alone[user].item_ids, user
        assert np.array_equal(np.array([i.score for i in response.items], np.float32), alone[user].scores)
    batches = engine.batcher.histogram.batches - before
    assert batches < len(users) * 3, "concurrent calls should have shared kernel batches"
    with StreamrecClient(server.address) as client:
        stats = client.stats()
    assert stats.recommend_batches >= batches and sum(stats.recommend_batch_sizes.values()) == stats.recommend_batches
