"""`streamrec train-reranker`: build impressions from the event log, train the reranking network with
PyTorch (extra `train`), export it to ONNX with checks, and measure its lift on the held-out part.

    streamrec train-reranker                       # ML-100K -> engine/rerank/models/ml100k-reranker.onnx (+ .json)
    streamrec train-reranker --out /tmp/r.onnx --no-lift --epochs 5

The serving side (engine/rerank/reranker.py) never imports torch; this command does (lazily, here).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    from streamrec.engine import SHIPPED_RERANKER

    p = subparsers.add_parser("train-reranker", help="train the ONNX reranking model from the event log (needs torch: extra 'train')",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    p.add_argument("--from-log", type=Path, default=None, metavar="DATA_DIR",
                   help="train on a deployment's own impression log (served with --impression-features > 0): the "
                        "impressions with an attributed click; the lift is measured on its held-out last 20%%")
    p.add_argument("--events", type=Path, default=None,
                   help="train on this interaction log (CSV/.tsv/Parquet: user_id, item_id, optional type, value, "
                        "timestamp) instead of --dataset: its impressions are simulated by replaying it")
    p.add_argument("--out", type=Path, default=SHIPPED_RERANKER, help="ONNX file to write; the sidecar goes next to it (.json)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension of the engines it replays (must match serving)")
    p.add_argument("--candidates", type=int, default=200, help="retrieved candidates per impression / request")
    p.add_argument("--seed-fraction", type=float, default=0.6, help="first part of the log (by time) that seeds the engine")
    p.add_argument("--train-fraction", type=float, default=0.8, help="end of the impression part; the rest is the test part")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--backend", default="numba", help="top-k backend of the replay engines")
    p.add_argument("--user-model", choices=["ials", "sequence"], default=None,
                   help="the retrieval to train behind: sequence trains a sequence tower on each replay's seed part "
                        "first (torch) and builds the user features from its queries")
    p.add_argument("--no-lift", dest="lift", action="store_false", help="skip the lift measurement on the test part")
    p.set_defaults(handler=run)


def run(args) -> int:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        print(f"error: train-reranker needs the training extra ({error.name} is missing): "
              "pip install -e '.[train]'  (torch==2.13.0 CPU build, onnx)", file=sys.stderr)
        return 2
    from streamrec.engine.offline.rerank_training import TrainConfig, train_reranker
    from streamrec.engine.offline.datasets import dataset_from_file, load
    from streamrec.engine import SHIPPED_RERANKER

    overrides = {name: getattr(args, name) for name in ("dim", "candidates", "seed_fraction", "train_fraction", "seed",
                                                          "threads", "backend", "user_model") if getattr(args, name) is not None}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if (args.events is not None or args.from_log is not None) and Path(args.out) == SHIPPED_RERANKER:
        print("error: --events and --from-log train a model of your own log: give it an --out path (the default "
              "is the shipped ML-100K model)", file=sys.stderr)
        return 2
    if args.from_log is not None:
        from streamrec.engine.offline.rerank_from_log import train_reranker_from_log

        config = TrainConfig(**overrides)
        command = "streamrec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        try:
            metadata = train_reranker_from_log(args.from_log, args.out, config, command=command)
        except (FileNotFoundError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(json.dumps({"model": str(args.out), "version": metadata["version"],
                          "impressions": metadata["training"]["impressions"], "lift": metadata["lift"]}, indent=1))
        return 0
    dataset = dataset_from_file(args.events) if args.events is not None else load(args.dataset, args.seed)
    config = TrainConfig(dataset=dataset.name, **overrides)
    command = "streamrec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "streamrec train-reranker"
    metadata = train_reranker(dataset, args.out, config, command=command, lift=args.lift)
    summary = {"model": str(args.out), "version": metadata["version"], "export_check": metadata["export_check"],
               "best_epoch": metadata["training"]["history"]["best_epoch"],
               "valid": metadata["training"]["history"]["best_valid_ndcg"], "lift": metadata.get("lift")}
    print(json.dumps(summary, indent=1))
    return 0


def serving_model_path(choice: str, dim: int) -> str | None:
    """`serve --reranker`: a path, 'none', or 'default' (the shipped model when it fits this dimension)."""
    import logging

    from streamrec.engine import SHIPPED_RERANKER, sidecar_path

    if choice in ("", "none"):
        return None
    if choice != "default":
        return choice
    if not SHIPPED_RERANKER.exists():
        logging.getLogger(__name__).warning("no shipped reranker at %s; serving retrieval only", SHIPPED_RERANKER)
        return None
    try:
        trained_dim = json.loads(sidecar_path(SHIPPED_RERANKER).read_text()).get("dim")
    except (OSError, ValueError):
        trained_dim = None
    if trained_dim is not None and trained_dim != dim:
        logging.getLogger(__name__).warning("the shipped reranker was trained at dimension %s, the server runs %d: "
                                            "serving retrieval only (train one: streamrec train-reranker --dim %d)",
                                            trained_dim, dim, dim)
        return None
    return str(SHIPPED_RERANKER)
