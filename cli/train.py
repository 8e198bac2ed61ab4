"""`streamrec train`: learn the bootstrap model offline and write it into a new data dir's LMDB store.

    streamrec train --dataset ml-100k --data-dir data                # iALS, dim 64, 10 epochs
    streamrec train --events log.csv --data-dir data --epochs 15 --validate
    streamrec train --dataset synthetic --method svd --data-dir /tmp/syn

The store receives the catalog, every event (as the log the server replays) and the trained vectors, with the
model version (e.g. `ials-ml-100k-d64-e10-s0`) that Stats reports. An existing store is refused: the online
model has been learning in it since it was seeded, and replacing its vectors is not supported yet.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from streamrec.cli import env


def register(subparsers) -> None:
    from streamrec.engine.offline.training import DEFAULTS

    p = subparsers.add_parser("train", help="train the bootstrap model offline and write it into a new data dir")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["ml-100k", "synthetic"], default=None,
                        help="built-in interaction log (default ml-100k)")
    source.add_argument("--events", type=Path, default=None,
                        help="CSV/TSV/Parquet log: user_id, item_id[, type, value, timestamp]")
    p.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")),
                   help="the model goes into <data-dir>/lmdb, which must not exist yet (env STREAMREC_DATA_DIR)")
    p.add_argument("--method", choices=["ials", "svd"], default="ials")
    p.add_argument("--dim", type=int, default=DEFAULTS["dim"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--reg", type=float, default=DEFAULTS["reg"])
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="confidence = 1 + alpha * strength")
    p.add_argument("--cg-steps", type=int, default=DEFAULTS["cg_steps"], help="CG steps per row and sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate", action="store_true",
                   help="report HR@10 per epoch on each user's last liked item held out (trains once more, on "
                        "everything, for the store)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="train and report, write nothing")


def _load(args):
    from streamrec.engine.offline import datasets

    if args.events is not None:
        return datasets.dataset_from_file(args.events)
    if (args.dataset or "ml-100k") == "ml-100k":
        return datasets.load_ml100k()
    return datasets.synthetic(seed=args.seed)


def _print_history(history: list[dict]) -> None:
    for row in history:
        parts = [f"epoch {row['epoch']:3d}"]
        parts += [f"{key} {row[key]:.4f}" for key in ("loss", "hr@10", "hr@10 (served)") if key in row]
        parts.append(f"{row['seconds']:.2f} s")
        print("  ".join(parts))


def run(args) -> int:
    from streamrec.engine.config import STORE_FOLDER, EngineConfig
    from streamrec.engine import Engine
    from streamrec.engine.offline.seeding import seed_trained
    from streamrec.engine.offline.training import leave_last_out, train

    store_dir = args.data_dir / STORE_FOLDER
    if not args.dry_run and Engine.holds_store(store_dir):
        print(f"error: {store_dir} already holds a store; train into a new --data-dir (replacing the vectors of a "
              f"live store is not supported)", file=sys.stderr)
        return 1
    try:
        dataset = _load(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = EngineConfig(dim=args.dim)
    options = dict(method=args.method, dim=args.dim, epochs=args.epochs, reg=args.reg, alpha=args.alpha,
                   cg_steps=args.cg_steps, seed=args.seed, progress=args.progress, item_ids=list(dataset.item_categories),
                   fold_alpha=config.online_alpha, fold_reg=config.online_reg)
    print(f"{dataset.name}: {len(dataset.interactions)} events, {len(set(dataset.interactions.user_ids))} users, "
          f"{len(dataset.item_categories)} items; {args.method} dim {args.dim}")
    if args.validate:
        part, held = leave_last_out(dataset.interactions)
        print(f"validation: {len(held)} held-out items (each user's last liked one)")
        _print_history(train(part, validation=held, **options).history)
    started = time.perf_counter()
    result = train(dataset.interactions, **options)
    _print_history(result.history)
    version = result.model_version(dataset.name)
    print(f"trained {version} in {time.perf_counter() - started:.1f} s")
    if args.dry_run:
        return 0
    staging = args.data_dir / f"{STORE_FOLDER}.seeding"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with Engine(staging, EngineConfig(dim=args.dim, backend="numpy")) as engine:
        seed_trained(engine, dataset, result.factors.item_ids, result.factors.item_vectors, result.factors.user_ids,
                     result.user_raw, version)
    staging.rename(store_dir)
    print(f"wrote {store_dir} (model {version}); start it with: streamrec serve --data-dir {args.data_dir}")
    return 0
