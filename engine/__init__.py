"""streamrec's engine: the API a server (or any embedding program) calls, stated once.

    from streamrec.engine import Engine, EngineConfig, Event, RecommendQuery

`Engine` (engine.py) is the only entry point; every type it takes or returns lives in `api.py`, its settings
in `config.py`, its errors in `errors.py`. Behind it, one folder per stage of the path of data:

    write/      the writer thread: group commit (plan -> log append -> apply), checkpoints, recovery
    replica/    read replicas: another process's log applied to this one's state (Engine(..., replica=True))
    store/      LMDB: the log, the checkpointed state, their records and format upgrades
    state/      the in-memory model (catalog, users) and the online rule that events apply
    retrieval/  the path of a request: micro-batching, filters, the top-k backend interface
    rerank/     the second stage: ONNX model, features, hot swap
    sequence/   the sequence user tower: an ONNX model of each user's latest events, a second user model
    cpu/ gpu/   Numba and CUDA kernels, each named after the module it accelerates
    offline/    datasets, training, evaluation and seeding; the serving path never imports it

Names are resolved on first use, so `import streamrec.engine.api` stays light (no Numba) for code that only
needs the types.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "engine",
    "EngineConfig": "config",
    "Limits": "config",
    "EngineObserver": "observer",
    "SHIPPED_RERANKER": "rerank.reranker",  # the reranking model that ships with the package (ML-100K, d=64)
    "sidecar_path": "rerank.reranker",  # where a reranking model's metadata file lives
    "SHIPPED_SEQUENCE_MODEL": "sequence.tower",  # the sequence user tower that ships (ML-100K as `serve` seeds it)
    "SequenceModelRejected": "sequence.tower",
    **{name: "errors" for name in ("EngineError", "InvalidArgument", "NotFound", "ResourceExhausted", "Unavailable",
                                   "OutOfRange", "FailedPrecondition", "OtherLog", "DeadlineExceeded")},
    **{name: "api" for name in ("Event", "EventType", "ItemSpec", "Rejection", "IngestResult", "UpsertResult",
                                "DeleteResult", "ForgetResult", "RecommendQuery", "Recommendation", "ItemView", "UserView",
                                "ServedBy", "EngineStats", "SnapshotData", "Arm", "Experiment")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamrec.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"streamrec.engine.{module}"), name)
