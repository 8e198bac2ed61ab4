"""`streamrec train-sequence`: train the sequence user tower (streamrec.engine.offline.sequence) on the training
part of the prequential split, export it to ONNX, and replay it against streamrec online and the best fair online
peer (EASE) on the same events, with the per-user paired bootstrap (significance.py).

The frozen item vectors are the engine's own: the engine is seeded with the training part exactly as
`streamrec evaluate` seeds it, and every catalog item's vector is read back (derived vectors of items without
training events included), so the tower's query lives in the retrieval's item space.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
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
    parser.add_argument("--models", default="sequence,shuffled,online,ease",
                        help="which to replay: sequence, shuffled, online, ease")
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


def train_and_export(args, train, catalog, item_vectors) -> dict:
    import torch

    from streamrec.engine.offline import sequence as seq
    from streamrec.engine.offline.evaluation import time_split

    torch.set_num_threads(args.threads)
    fit_part, tail = time_split(train, 1.0 - args.valid_fraction)
    fit_logs = seq.user_logs(fit_part.interactions, catalog)
    windows = seq.training_windows(fit_logs, args.length)
    valid = seq.validation_steps(seq.user_logs(fit_part.interactions, catalog), tail, catalog, args.length)
    _say(f"training windows {len(windows['items'])} ({int((windows['targets'] > 0).sum())} targets), "
         f"validation steps {len(valid['target'])}")
    model = seq.build_model(item_vectors, args.length, args.dim, args.blocks, args.heads, args.dropout, args.seed)
    report = seq.train_tower(model, windows, valid, args.epochs, args.batch, args.lr, seed=args.seed, k=args.k)
    info = {"history": report.history, "best_epoch": report.best_epoch, "train_seconds": round(report.seconds, 1),
            "windows": len(windows["items"]), "validation_steps": len(valid["target"])}
    best = report.history[report.best_epoch - 1]
    _say(f"best epoch {report.best_epoch}: validation HR@{args.k} {best[f'hr@{args.k}']:.4f} "
         f"NDCG@{args.k} {best[f'ndcg@{args.k}']:.4f} ({report.seconds:.0f} s)")
    if args.refit:
        windows = seq.training_windows(seq.user_logs(train.interactions, catalog), args.length)
        model = seq.build_model(item_vectors, args.length, args.dim, args.blocks, args.heads, args.dropout, args.seed)
        refit = seq.train_tower(model, windows, None, report.best_epoch, args.batch, args.lr, seed=args.seed, k=args.k)
        info.update(refit_epochs=report.best_epoch, refit_seconds=round(refit.seconds, 1))
        _say(f"refit on the whole training part for {report.best_epoch} epochs ({refit.seconds:.0f} s)")
    seq.export_onnx(model, args.onnx, args.length)
    info["onnx_max_abs_diff"] = seq.check_export(model, args.onnx, args.length)
    _say(f"exported {args.onnx}; torch vs onnxruntime max abs diff {info['onnx_max_abs_diff']:.2e}")
    if info["onnx_max_abs_diff"] >= 1e-4:
        raise RuntimeError(f"ONNX export differs from torch by {info['onnx_max_abs_diff']}")
    return info


def run(args) -> int:
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
            replay(seq.SequenceTower(args.onnx, item_vectors, catalog, history, args.length))
        if "shuffled" in wanted:
            replay(seq.SequenceTower(args.onnx, item_vectors, catalog, history, args.length,
                                     "sequence tower, shuffled history", shuffle=True, seed=args.seed))
        if "online" in wanted:
            config = EngineConfig(dim=args.dim, backend="numpy", sync=False)
            with Engine(Path(tmp) / "engine" / "lmdb", config) as engine:
                replay(ev.StreamrecEngine(engine, "streamrec online"))
    if "ease" in wanted:
        model = peers.builders(catalog, args.seed)["ease"](train, peers.DEFAULTS["ease"])
        model.name = "EASE (online history)"
        replay(model)

    base = results.get("sequence tower (ONNX)")
    record["results"] = [{**r.record(), "dataset": dataset.name} for r in results.values()]
    if base is not None and args.resamples > 0:
        _, users = np.unique([events[p].user_id for p in base.positions], return_inverse=True)
        record["vs_sequence"] = {}
        for name, other in results.items():
            if other is base:
                continue
            test = significance.compare(base.hits, base.gains, other.hits, other.gains, args.k, args.resamples,
                                        args.seed, users.ravel())
            record["vs_sequence"][name] = test
            by_user = test[f"ndcg@{args.k}_by_user"]
            hr_user = test[f"hr@{args.k}_by_user"]
            _say(f"  sequence minus {name:<32} dHR {hr_user['difference']:+.4f} p {hr_user['p_value']:.4f}  "
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
