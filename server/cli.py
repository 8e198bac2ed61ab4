"""The `streamrec` command: `serve` runs the server; the other commands are clients of a running one."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from streamrec.clients import cli as client_cli
from streamrec.engine.config import EngineConfig

from .app import ServerConfig, StreamrecServer


def _env(name: str, default):
    return os.environ.get(f"STREAMREC_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec", description="Real-time recommendation engine over gRPC.")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (seeds an empty data dir with a dataset)")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (env STREAMREC_HOST)")
    serve.add_argument("--port", type=int, default=int(_env("PORT", 50051)), help="0 = any free port (env STREAMREC_PORT)")
    serve.add_argument("--data-dir", type=Path, default=Path(_env("DATA_DIR", "data")), help="LMDB folder (env STREAMREC_DATA_DIR)")
    serve.add_argument("--dataset", choices=["ml-100k", "synthetic", "none"], default=_env("DATASET", "ml-100k"),
                       help="seeds an empty data dir (env STREAMREC_DATASET)")
    serve.add_argument("--dim", type=int, default=int(_env("DIM", 64)), help="embedding dimension of a new data dir")
    serve.add_argument("--backend", default=_env("BACKEND", "auto"), help="top-k backend: auto, numpy, ...")
    serve.add_argument("--workers", type=int, default=int(_env("WORKERS", 32)), help="RPC worker threads")
    serve.add_argument("--checkpoint-interval", type=float, default=float(_env("CHECKPOINT_INTERVAL", 30.0)), help="seconds")
    serve.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", None),
                       help="serve Prometheus metrics on this port (env STREAMREC_METRICS_PORT; off by default)")
    serve.add_argument("--no-sync", action="store_true", help="skip fsync per commit (faster; acks no longer survive power loss)")

    client_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        engine = EngineConfig(dim=args.dim, backend=args.backend, checkpoint_interval_s=args.checkpoint_interval, sync=not args.no_sync)
        config = ServerConfig(host=args.host, port=args.port, data_dir=args.data_dir, dataset=args.dataset,
                              workers=args.workers, engine=engine,
                              metrics_port=None if args.metrics_port is None else int(args.metrics_port))
        StreamrecServer(config).serve_forever()
        return 0
    return client_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
