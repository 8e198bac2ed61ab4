#!/usr/bin/env python3
"""Reranker latency: 200 retrieved candidates per request x batch sizes {1, 16, 64}, on the shipped model.

An engine seeded with ML-100K (the demo data set) and the shipped reranker (engine/rerank/models/ml100k-reranker.onnx)
gives real users, real candidates and real feature values. Per batch size it times, interleaved repeat by
repeat (other load hits all of them alike):

  features     rerank.features.build_features for the whole batch (the Numba kernel training and serving use)
  features-numpy  rerank.features.build_features_numpy: the NumPy reference (the implementation before the
               kernel), same rows
  ort          one ONNX Runtime session call on those rows (the serving session: 1 intra-op thread, CPU
               unless --provider cuda and a usable GPU)
  rerank       features + ort: what reranking adds to a micro-batch (this is the p99 <= 2 ms target for
               one request of 200 candidates on CPU)
  torch-peer   the same network in torch eval mode (rebuilt from the ONNX weights; torch threads = 1), on the
               same rows, when torch is installed
  numpy-peer   the same network as NumPy matmuls (float32), on the same rows
  retrieval    the engine's Retriever.recommend for the batch, rerank off (k = 10: the first stage alone)
  end-to-end   Retriever.recommend with rerank on (retrieves 200, features, one ORT call, top 10)

    .venv/bin/python benchmarks/rerank.py                       # batch 1, 16, 64; JSON to benchmarks/out/rerank.json
    .venv/bin/python benchmarks/rerank.py --batches 1 --repeats 2000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import load as load_dataset
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.rerank.features import (
    ItemArrays,
    build_features,
    build_features_numpy,
    capture_user,
    state_clock_ms,
)
from streamrec.engine.rerank.reranker import SHIPPED_RERANKER


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


class NumpyNet:
    """The exported RerankNet (engine/offline/rerank_training.py) evaluated with NumPy, from the ONNX initialisers
    in graph order: mean, inv_std, then per cross layer (V, U, b), then the MLP's (W, b) pairs."""

    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.input = model.graph.input[0].name
        self.output = model.graph.output[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """A tiny interpreter for the ops the exporter emits for this network."""
        env = dict(self.inits)
        env[self.input] = x
        for node in self.nodes:
            a = [env[name] if name else None for name in node.input]
            op = node.op_type
            if op == "Sub":
                out = a[0] - a[1]
            elif op == "Mul":
                out = a[0] * a[1]
            elif op == "Add":
                out = a[0] + a[1]
            elif op == "MatMul":
                out = a[0] @ a[1]
            elif op == "Gemm":
                attrs = {at.name: at for at in node.attribute}
                b = a[1].T if attrs.get("transB") and attrs["transB"].i else a[1]
                out = a[0] @ b + (a[2] if len(a) > 2 and a[2] is not None else 0)
            elif op == "Relu":
                out = np.maximum(a[0], 0)
            elif op == "Reshape":
                out = a[0].reshape([int(v) if v != 0 else a[0].shape[i] for i, v in enumerate(a[1])])
            elif op == "Constant":
                from onnx import numpy_helper
                out = numpy_helper.to_array(node.attribute[0].t)
            elif op == "Gather":
                attrs = {at.name: at.i for at in node.attribute}
                out = np.take(a[0], a[1], axis=attrs.get("axis", 0))
            elif op == "Identity":
                out = a[0]
            else:
                raise NotImplementedError(op)
            env[node.output[0]] = out
        return env[self.output]


def torch_peer(path: Path):
    """The same network in torch eval mode, weights copied from the ONNX file; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from streamrec.engine.offline.rerank_training import TrainConfig, build_model

    meta = json.loads(path.with_suffix(".json").read_text())
    config = meta["model"]
    trained = meta["training"]["config"]
    cfg = TrainConfig(dim=meta["dim"], cross_layers=config["cross_layers"], cross_rank=config["cross_rank"],
                      hidden=tuple(config["hidden"]), inputs=trained.get("inputs", "all"))
    weights = onnx_weights(path)
    width = meta["features"]
    model = build_model(width, np.zeros(width, np.float32), np.ones(width, np.float32), cfg)
    state = model.state_dict()
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for name in weights:  # exporter names: the module's own, or onnx::MatMul_N for weights it transposed
        if name not in state:
            by_shape.setdefault(weights[name].shape, []).append(weights[name])
    loaded = {}
    for name, tensor in state.items():
        if name == "keep":  # fixed by cfg.inputs (a constant in the graph)
            loaded[name] = tensor
        elif name in weights:
            loaded[name] = torch.from_numpy(weights[name].copy())
        elif tuple(tensor.shape[::-1]) in by_shape and tensor.dim() == 2:
            loaded[name] = torch.from_numpy(by_shape[tuple(tensor.shape[::-1])].pop(0).T.copy())
        else:
            return None
    model.load_state_dict(loaded)
    model.eval()
    torch.set_num_threads(1)

    def run(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy()

    return run


def percentiles(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": len(a)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_RERANKER)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls per implementation and batch size")
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--backend", default="numba", help="top-k backend of the engine")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/rerank.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    meta = json.loads(args.model.with_suffix(".json").read_text())
    dim = meta["dim"]
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp) / "lmdb", EngineConfig(dim=dim, sync=False, backend=args.backend, rerank_provider=args.provider,
                                                         rerank_candidates=args.candidates))
        seed_engine(engine, load_dataset("ml-100k"))
        engine.load_reranker(args.model)
        model = engine.reranker.model
        numpy_net = NumpyNet(args.model)
        torch_net = torch_peer(args.model)
        state = engine.state
        users = [u for u in state.users.ids if u is not None and state.users.query_vector(state.users.rows[u]) is not None]
        rng = np.random.default_rng(0)
        for batch in args.batches:
            picks = [list(rng.choice(users, size=batch, replace=False)) for _ in range(8)]
            inputs = []
            for group in picks:  # real candidates: the retrieval stage's top 200 for each user
                answers = engine.recommend([engine.build_query(u, args.candidates, rerank=False) for u in group])
                with engine.lock:
                    ctx = [capture_user(state.users, state.users.rows[u], state.users.query_vector(state.users.rows[u])) for u in group]
                    items = ItemArrays.of(state.items)
                    now = state_clock_ms(state.items)
                rows = [np.fromiter((state.items.rows[i] for i in a.item_ids), np.int64) for a in answers]
                inputs.append((ctx, rows, [a.scores for a in answers], items, now, group))
            features0 = build_features(*inputs[0][:5])
            reference = model.score(features0)
            check = {"numpy_peer_max_abs_diff": float(np.max(np.abs(numpy_net(features0) - reference))),
                     "features_numpy_max_abs_diff": float(np.max(np.abs(build_features_numpy(*inputs[0][:5]) - features0))),
                     "scores_from_numpy_features_max_abs_diff": float(np.max(np.abs(
                         model.score(build_features_numpy(*inputs[0][:5])) - reference)))}
            if torch_net is not None:
                check["torch_peer_max_abs_diff"] = float(np.max(np.abs(torch_net(features0) - reference)))
            impls = {
                "features": lambda inp: build_features(*inp[:5]),
                "features-numpy": lambda inp: build_features_numpy(*inp[:5]),
                "ort": None,  # on precomputed rows
                "rerank": lambda inp: model.score(build_features(*inp[:5])),
                "numpy-peer": None,
                "torch-peer": None,
                "retrieval": lambda inp: engine.retriever.recommend([engine.build_query(u, 10, rerank=False) for u in inp[5]]),
                "end-to-end": lambda inp: engine.retriever.recommend(
                    [engine.build_query(u, 10, rerank=True, candidates=args.candidates) for u in inp[5]]),
            }
            rows_cache = [build_features(*inp[:5]) for inp in inputs]
            timed = {name: [] for name in impls}
            if torch_net is None:
                del timed["torch-peer"]
            for repeat in range(args.repeats + 20):
                j = repeat % len(inputs)
                for name in timed:
                    started = time.perf_counter()
                    if name == "ort":
                        model.score(rows_cache[j])
                    elif name == "numpy-peer":
                        numpy_net(rows_cache[j])
                    elif name == "torch-peer":
                        torch_net(rows_cache[j])
                    else:
                        impls[name](inputs[j])
                    if repeat >= 20:  # warm-up
                        timed[name].append(time.perf_counter() - started)
            for name, samples in timed.items():
                results.append({"batch": batch, "candidates": args.candidates, "impl": name, "rows": batch * args.candidates,
                                **percentiles(samples)})
            results.append({"batch": batch, "impl": "check", **check})
            print(f"batch {batch}: checked peers against ORT: {check}", file=sys.stderr)
        provider = model.provider
        engine.close(checkpoint=False)

    header = f"{'batch':>5} {'impl':<14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'per request p50 us':>19}"
    print(header)
    for r in results:
        if r["impl"] == "check":
            continue
        print(f"{r['batch']:>5} {r['impl']:<14} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} {r['p99_ms']:8.3f} {r['p50_ms'] * 1e3 / r['batch']:19.1f}")
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "provider": provider, "model": str(args.model), "model_version": meta.get("version"),
        "onnxruntime": __import__("onnxruntime").__version__, "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
