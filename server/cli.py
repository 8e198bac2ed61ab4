"""The `streamrec` command: `serve` runs the server; the other commands are clients of a running one."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from streamrec.clients import cli as client_cli
from streamrec.engine.config import EngineConfig
from streamrec.server import auth, evaluate_cli, rerank_cli, train_cli
from streamrec.server.app import ServerConfig, StreamrecServer
from streamrec.server.tls import TlsConfigError


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
    serve.add_argument("--backend", default=_env("BACKEND", "auto"),
                       help="top-k backend: auto (cuda with a usable GPU, else numba), numpy, numba, cuda")
    serve.add_argument("--gpu-storage", choices=["float32", "float16"], default=_env("GPU_STORAGE", "float32"),
                       help="item matrix storage on the GPU (accumulation is float32)")
    serve.add_argument("--workers", type=int, default=int(_env("WORKERS", 32)), help="RPC worker threads")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=_env("MAX_CONCURRENT_RPCS", None),
                       help="calls admitted at once, running or waiting; beyond: RESOURCE_EXHAUSTED (default 4 x workers)")
    serve.add_argument("--reranker", default=_env("RERANKER", "default"),
                       help="ONNX reranking model (env STREAMREC_RERANKER): a path, 'default' (the shipped ML-100K "
                            "model, skipped when the dimension differs) or 'none' (retrieval only)")
    serve.add_argument("--no-rerank", action="store_true",
                       help="requests are reranked only when they ask (rerank.enabled=true); the model stays loaded")
    serve.add_argument("--rerank-candidates", type=int, default=int(_env("RERANK_CANDIDATES", 200)),
                       help="retrieved candidates the model reorders per request (env STREAMREC_RERANK_CANDIDATES)")
    serve.add_argument("--rerank-provider", choices=["auto", "cpu", "cuda"], default=_env("RERANK_PROVIDER", "auto"),
                       help="ONNX Runtime provider: auto = CUDA when usable, else CPU (decided once at start)")
    serve.add_argument("--checkpoint-interval", type=float, default=float(_env("CHECKPOINT_INTERVAL", 30.0)), help="seconds")
    serve.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", None),
                       help="serve Prometheus metrics on this port (env STREAMREC_METRICS_PORT; off by default)")
    serve.add_argument("--no-sync", action="store_true", help="skip fsync per commit (faster; acks no longer survive power loss)")
    # Security: file paths only, never secrets on the command line (see server/tls.py and server/auth.py).
    serve.add_argument("--tls-cert", type=Path, default=_env("TLS_CERT", None), help="PEM server certificate chain (env STREAMREC_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, default=_env("TLS_KEY", None), help="PEM private key (env STREAMREC_TLS_KEY)")
    serve.add_argument("--tls-client-ca", type=Path, default=_env("TLS_CLIENT_CA", None),
                       help="PEM CA bundle; clients must present a certificate it signed (mutual TLS; env STREAMREC_TLS_CLIENT_CA)")
    serve.add_argument("--tokens-file", type=Path, default=_env("TOKENS_FILE", None),
                       help="bearer tokens with roles, lines 'ROLE SHA256HEX [NAME]'; re-read when it changes "
                            "(env STREAMREC_TOKENS_FILE; off by default = no authentication)")

    token = sub.add_parser("token", help="manage the tokens file (hashes only; a token is printed once)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="generate a token, append its hash to the file, print the token once")
    new.add_argument("--role", required=True, choices=auth.ROLES)
    new.add_argument("--file", type=Path, default=_env("TOKENS_FILE", None), required=_env("TOKENS_FILE", None) is None,
                     help="tokens file, created (mode 600) if absent (env STREAMREC_TOKENS_FILE)")
    new.add_argument("--name", default=None, help="label for logs and revocation (default ROLE-N)")
    revoke = token_sub.add_parser("revoke", help="remove the token(s) with this name from the file")
    revoke.add_argument("name")
    revoke.add_argument("--file", type=Path, default=_env("TOKENS_FILE", None), required=_env("TOKENS_FILE", None) is None)

    client_cli.register(sub)
    evaluate_cli.register(sub)
    rerank_cli.register(sub)
    train_cli.register(sub)
    return parser


def run_token(args) -> int:
    try:
        if args.token_command == "new":
            token = auth.add_token(args.file, args.role, args.name)
            print(f"new {args.role} token (shown once; only its hash is stored in {args.file}):", file=sys.stderr)
            print(token)
            return 0
        dropped = auth.revoke_token(args.file, args.name)
        print(f"revoked {dropped} token(s) named {args.name!r}" if dropped else f"no token named {args.name!r}", file=sys.stderr)
        return 0 if dropped else 1
    except (OSError, auth.TokensFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        engine = EngineConfig(dim=args.dim, backend=args.backend, gpu_storage=args.gpu_storage, checkpoint_interval_s=args.checkpoint_interval, sync=not args.no_sync,
                              reranker_path=rerank_cli.serving_model_path(args.reranker, args.dim), rerank_by_default=not args.no_rerank,
                              rerank_candidates=args.rerank_candidates, rerank_provider=args.rerank_provider)
        config = ServerConfig(host=args.host, port=args.port, data_dir=args.data_dir, dataset=args.dataset,
                              workers=args.workers, engine=engine,
                              max_concurrent_rpcs=None if args.max_concurrent_rpcs is None else int(args.max_concurrent_rpcs),
                              metrics_port=None if args.metrics_port is None else int(args.metrics_port),
                              tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                              tokens_file=args.tokens_file)
        try:
            server = StreamrecServer(config)
        except (TlsConfigError, auth.TokensFileError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        server.serve_forever()
        return 0
    if args.command == "evaluate":
        return evaluate_cli.run(args)
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "train-reranker":
        return rerank_cli.run(args)
    if args.command == "token":
        return run_token(args)
    return client_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
