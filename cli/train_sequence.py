"""`streamrec train-sequence`: train the sequence user tower (streamrec.engine.offline.sequence) and export it to
ONNX with its serving sidecar (engine/sequence/tower.py).

Two modes:
- evaluation (default): train on the training part of the prequential split and replay the tower against
  streamrec online and the best fair online peer (EASE) on the same events, with the per-user paired bootstrap;
- serving (--store DATA_DIR --out FILE): train on every event of --dataset or --events against the item vectors
  of that data dir (a seeded or running server's), so `serve --user-model sequence --sequence-model FILE` scores
  its queries in the same item space. The last --valid-fraction of the events chooses the epoch count; --refit
  then retrains on all of them.

The frozen item vectors are the engine's own: the engine is seeded with the training part exactly as
`streamrec evaluate` seeds it, and every catalog item's vector is read back (derived vectors of items without
training events included), so the tower's query lives in the retrieval's item space.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from streamrec.cli.rerank import serving_model_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    parser.add_argument("--events", type=Path, default=None,
                        help="with --store: a CSV (.tsv) or Parquet interaction log to train on instead of --dataset "
                             "(columns user_id, item_id, optional type, value, timestamp)")
    parser.add_argument("--store", type=Path, default=None, metavar="DATA_DIR",
                        help="serving mode: train against this data dir's item vectors (read-only; a server may be "
                             "running on it) and write --out")
    parser.add_argument("--out", type=Path, default=None, help="serving mode: the ONNX file to write (sidecar .json beside it)")
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="tail of the training part for validation")
    parser.add_argument("--length", type=int, default=50, help="events in the user's window (L)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--refit", action="store_true",
                        help="after choosing the epoch count on the tail, retrain on the whole training part")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", default="/tmp/sequence_tower.onnx")
    parser.add_argument("--models", default="sequence,shuffled,online,ease,served,served-rerank,online-rerank",
                        help="which to replay: sequence, shuffled (the tower offline), online, ease, served (the "
                             "tower through the engine, as `serve --user-model sequence` answers), served-rerank, "
                             "online-rerank (either with --reranker)")
    parser.add_argument("--reranker", default="default",
                        help="the reranking model of the *-rerank replays: a path or 'default' (the shipped one, "
                             "trained on the first 80%% of ML-100K only)")
    parser.add_argument("--sequence-reranker", default=None,
                        help="served-rerank's model instead of --reranker: one trained behind the sequence tower "
                             "(streamrec train-reranker --user-model sequence)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N replay events")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")


def register(subparsers) -> None:
    add_arguments(subparsers.add_parser("train-sequence", help="train, export and evaluate the sequence user tower"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seeded_item_vectors(train, catalog, folder: Path, dim: int, seed: int) -> np.ndarray:
    """Seed an engine with `train` (as `streamrec evaluate` does) and read every catalog item's vector."""
    from streamrec.cli.evaluate import _seed_store
    from streamrec.engine import Engine
    from streamrec.engine.config import EngineConfig

    config = EngineConfig(dim=dim, backend="numpy", sync=False)
    _seed_store(train, folder, config, seed)
    with Engine(folder / "lmdb", config) as engine:
        return np.stack([np.asarray(engine.get_item(item).vector, np.float32) for item in catalog.ids])


def tower_params(args):
    from streamrec.engine.offline.sequence import TowerParams

    return TowerParams(length=args.length, dim=args.dim, blocks=args.blocks, heads=args.heads, dropout=args.dropout,
                       epochs=args.epochs, batch=args.batch, lr=args.lr, valid_fraction=args.valid_fraction,
                       refit=args.refit, seed=args.seed, k=args.k, threads=args.threads)


def train_and_export(args, train, catalog, item_vectors) -> dict:
    from streamrec.engine.offline.sequence import fit_and_export

    return fit_and_export(train, catalog, item_vectors, args.onnx, tower_params(args), say=_say)


def store_item_vectors(store: Path, item_ids) -> tuple[list[str], np.ndarray]:
    """(ids the store holds live, their vectors) among `item_ids`, read through a read-only replica Engine."""
    from streamrec.engine import Engine, EngineConfig
    from streamrec.engine.config import STORE_FOLDER
    from streamrec.engine.offline.sequence import engine_item_vectors

    folder = store / STORE_FOLDER if (store / STORE_FOLDER).exists() else store
    if not Engine.holds_store(folder):
        raise SystemExit(f"no streamrec store in {store} (seed one first: streamrec serve --data-dir {store})")
    with Engine(folder, EngineConfig(backend="numpy", sync=False), replica=True) as engine:
        found, vectors = engine_item_vectors(engine, item_ids)
    if not found:
        raise SystemExit(f"none of the events' items is in the store at {store}")
    return found, vectors


def run_for_store(args) -> int:
    from streamrec.engine.offline import datasets
    from streamrec.engine.offline import evaluation as ev
    from streamrec.engine.offline import sequence as seq

    if args.out is None:
        raise SystemExit("--store needs --out (the ONNX file to write)")
    dataset = datasets.dataset_from_file(args.events) if args.events is not None else datasets.load(args.dataset, args.seed)
    interactions, name, item_ids = dataset.interactions, dataset.name, list(dataset.item_categories)
    ids, item_vectors = store_item_vectors(args.store, item_ids)
    _say(f"{len(interactions)} events; {len(ids)} of {len(item_ids)} items have a vector in {args.store} "
         f"(dimension {item_vectors.shape[1]})")
    catalog = ev.Catalog(ids)
    everything = datasets.Dataset(name, interactions, {i: [] for i in ids}, {})
    args.dim, args.onnx = int(item_vectors.shape[1]), str(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = train_and_export(args, everything, catalog, item_vectors)
    meta = json.loads(seq.sidecar_path(args.onnx).read_text())
    _say(f"wrote {args.out} and {seq.sidecar_path(args.onnx)} (version {meta['version']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "training": info}, indent=2, default=str) + "\n")
    return 0


def run(args) -> int:
    if args.store is not None:
        return run_for_store(args)
    from streamrec.engine import Engine
    from streamrec.engine.config import EngineConfig
    from streamrec.engine.offline import datasets, peers, significance
    from streamrec.engine.offline import evaluation as ev
    from streamrec.engine.offline import sequence as seq

    logging.getLogger("streamrec").setLevel(logging.WARNING)
    started = time.perf_counter()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    dataset = datasets.load(args.dataset, args.seed)
    catalog = ev.Catalog.of(dataset)
    train, test = ev.time_split(dataset, args.train_fraction)
    events = ev.replay_events(test)[: args.limit]
    history = train.interactions
    results, record = {}, {"dataset": dataset.name, "args": vars(args)}

    def replay(model):
        result = ev.prequential_replay(events, model, args.k, catalog=catalog, history=history)
        _say(f"  {result.model:<32} HR@{args.k} {result.hr:.4f}  NDCG@{args.k} {result.ndcg:.4f}  "
             f"({result.events} evaluated, {result.seconds:.1f} s)")
        results[result.model] = result
        return result

    with tempfile.TemporaryDirectory(prefix="streamrec-seq-") as tmp:
        t0 = time.perf_counter()
        item_vectors = seeded_item_vectors(train, catalog, Path(tmp) / "engine", args.dim, args.seed)
        _say(f"seeded the engine and read {len(item_vectors)} item vectors in {time.perf_counter() - t0:.1f} s")
        record["training"] = train_and_export(args, train, catalog, item_vectors)
        if "sequence" in wanted:
            replay(seq.TowerRecommender(args.onnx, item_vectors, catalog, history, args.length))
        if "shuffled" in wanted:
            replay(seq.TowerRecommender(args.onnx, item_vectors, catalog, history, args.length,
                                     "sequence tower, shuffled history", shuffle=True, seed=args.seed))
        served = {"online": ("ials", False, "streamrec online"),
                  "online-rerank": ("ials", True, "streamrec online + reranker"),
                  "served": ("sequence", False, "sequence tower, served"),
                  "served-rerank": ("sequence", True, "sequence tower, served + reranker")}
        for key, (user_model, rerank, name) in served.items():
            if key not in wanted:
                continue
            reranker = serving_model_path(args.reranker, args.dim) if rerank else None
            if rerank and user_model == "sequence" and args.sequence_reranker:
                reranker = args.sequence_reranker
            if rerank and reranker is None:
                raise SystemExit(f"--models {key} needs a reranker at dimension {args.dim}")
            config = EngineConfig(dim=args.dim, backend="numpy", sync=False, user_model=user_model,
                                  sequence_model_path=args.onnx if user_model == "sequence" else None,
                                  reranker_path=reranker)
            folder = Path(tmp) / key
            shutil.copytree(Path(tmp) / "engine", folder)  # every replay starts from the seeded store
            with Engine(folder / "lmdb", config) as engine:
                replay(ev.StreamrecEngine(engine, name))
            record.setdefault("served_user_models", {})[name] = engine.user_model_info()
    if "ease" in wanted:
        model = peers.builders(catalog, args.seed)["ease"](train, peers.DEFAULTS["ease"])
        model.name = "EASE (online history)"
        replay(model)

    record["results"] = [{**r.record(), "dataset": dataset.name} for r in results.values()]
    # Each sequence tower (offline replay, served, served + reranker) against every other model, paired.
    bases = {"vs_sequence": "sequence tower (ONNX)", "vs_served": "sequence tower, served",
             "vs_served_rerank": "sequence tower, served + reranker"}
    for key, base_name in bases.items():
        base = results.get(base_name)
        if base is None or args.resamples <= 0:
            continue
        _, users = np.unique([events[p].user_id for p in base.positions], return_inverse=True)
        record[key] = {}
        for name, other in results.items():
            if other is base:
                continue
            test = significance.compare(base.hits, base.gains, other.hits, other.gains, args.k, args.resamples,
                                        args.seed, users.ravel())
            record[key][name] = test
            by_user = test[f"ndcg@{args.k}_by_user"]
            hr_user = test[f"hr@{args.k}_by_user"]
            _say(f"  {base_name} minus {name:<34} dHR {hr_user['difference']:+.4f} p {hr_user['p_value']:.4f}  "
                 f"dNDCG {by_user['difference']:+.4f} [{by_user['ci_low']:+.4f}, {by_user['ci_high']:+.4f}] "
                 f"p {by_user['p_value']:.4f} (users)")
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'model':<34} {'HR@' + str(args.k):>7} {'NDCG@' + str(args.k):>8} {'events':>7} {'seconds':>8}")
    for r in results.values():
        print(f"{r.model:<34} {r.hr:>7.4f} {r.ndcg:>8.4f} {r.events:>7} {r.seconds:>8.1f}")
    print(f"total wall time {record['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
