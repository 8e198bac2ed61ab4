"""`streamrec serve`: run the server (seeds an empty data dir with a dataset)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamrec.cli import env
from streamrec.cli.rerank import serving_model_path
from streamrec.engine.config import EngineConfig
from streamrec.server import auth
from streamrec.server.app import ServerConfig, StreamrecServer
from streamrec.server.supervisor import Supervisor, free_port
from streamrec.server.tls import TlsConfigError, tls_files


# Flags the supervisor sets per child; every other flag is passed to each child as given.
_TOPOLOGY_DESTS = {"replicas", "process_ports", "role", "primary", "process_port", "metrics_port", "port"}
_parser = None


def register(subparsers) -> None:
    global _parser
    serve = _parser = subparsers.add_parser("serve", help="run the server (seeds an empty data dir with a dataset)")
    serve.add_argument("--host", default=env("HOST", "127.0.0.1"), help="bind address (env STREAMREC_HOST)")
    serve.add_argument("--port", type=int, default=int(env("PORT", 50051)), help="0 = any free port (env STREAMREC_PORT)")
    serve.add_argument("--data-dir", type=Path, default=Path(env("DATA_DIR", "data")), help="LMDB folder (env STREAMREC_DATA_DIR)")
    serve.add_argument("--dataset", choices=["ml-100k", "synthetic", "none"], default=env("DATASET", "ml-100k"),
                       help="seeds an empty data dir (env STREAMREC_DATASET)")
    serve.add_argument("--dim", type=int, default=int(env("DIM", 64)), help="embedding dimension of a new data dir")
    serve.add_argument("--backend", default=env("BACKEND", "auto"),
                       help="top-k backend: auto (cuda with a usable GPU, else numba), numpy, numba, cuda")
    serve.add_argument("--gpu-storage", choices=["float32", "float16"], default=env("GPU_STORAGE", "float32"),
                       help="item matrix storage on the GPU (accumulation is float32)")
    serve.add_argument("--workers", type=int, default=int(env("WORKERS", 32)), help="RPC worker threads")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=env("MAX_CONCURRENT_RPCS", None),
                       help="calls admitted at once, running or waiting; beyond: RESOURCE_EXHAUSTED (default 4 x workers)")
    serve.add_argument("--reranker", default=env("RERANKER", "default"),
                       help="ONNX reranking model (env STREAMREC_RERANKER): a path, 'default' (the shipped ML-100K "
                            "model, skipped when the dimension differs) or 'none' (retrieval only)")
    serve.add_argument("--no-rerank", action="store_true",
                       help="requests are reranked only when they ask (rerank.enabled=true); the model stays loaded")
    serve.add_argument("--rerank-candidates", type=int, default=int(env("RERANK_CANDIDATES", 200)),
                       help="retrieved candidates the model reorders per request (env STREAMREC_RERANK_CANDIDATES)")
    serve.add_argument("--rerank-provider", choices=["auto", "cpu", "cuda"], default=env("RERANK_PROVIDER", "auto"),
                       help="ONNX Runtime provider: auto = CUDA when usable, else CPU (decided once at start)")
    serve.add_argument("--user-model", choices=["auto", "ials", "sequence"], default=env("USER_MODEL", "auto"),
                       help="the user model of requests that name none (env STREAMREC_USER_MODEL): ials, the online "
                            "fold-in; sequence, the ONNX sequence tower (--sequence-model); auto (default): sequence "
                            "when that model was trained against this store's item space, else ials")
    serve.add_argument("--sequence-model", default=env("SEQUENCE_MODEL", ""),
                       help="the sequence tower's ONNX file (env STREAMREC_SEQUENCE_MODEL; trained by streamrec "
                            "train-sequence --store), or none. Unset: the shipped ML-100K model with --user-model "
                            "auto or sequence. A path with --user-model ials: kept current and chosen per request")
    serve.add_argument("--sequence-update", choices=["read", "event"], default=env("SEQUENCE_UPDATE", "read"),
                       help="when the sequence tower recomputes a user's query: on the first read after their events "
                            "(read) or on the writer for every event (event); same answers, different cost")
    serve.add_argument("--no-impressions", action="store_true",
                       help="do not log what is shown (no recommendation_id attribution, no experiments)")
    serve.add_argument("--impression-features", type=float, default=float(env("IMPRESSION_FEATURES", 0.0)),
                       help="share of personalised answers whose reranker feature rows are logged with the impression "
                            "(0..1; what train-reranker --from-log learns from; ~4 KB per answer)")
    serve.add_argument("--impression-max-records", type=int, default=int(env("IMPRESSION_MAX_RECORDS", 1_000_000)),
                       help="impressions kept (the oldest go first; also at most 30 days)")
    serve.add_argument("--attribution-window", type=float, default=float(env("ATTRIBUTION_WINDOW", 86400.0)),
                       help="seconds after an impression within which an event naming it is attributed")
    serve.add_argument("--checkpoint-interval", type=float, default=float(env("CHECKPOINT_INTERVAL", 30.0)), help="seconds")
    serve.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", None),
                       help="serve Prometheus metrics on this port (env STREAMREC_METRICS_PORT; off by default)")
    serve.add_argument("--no-sync", action="store_true", help="skip fsync per commit (faster; acks no longer survive power loss)")
    serve.add_argument("--replicas", type=int, default=int(env("REPLICAS", 0)),
                       help="read replicas besides the primary, each a process of its own on the same port "
                            "(env STREAMREC_REPLICAS; 0 = one process; README: choosing N)")
    serve.add_argument("--process-ports", default=env("PROCESS_PORTS", ""),
                       help="with --replicas: a port of each process alone, primary first, comma-separated, for "
                            "clients that balance calls themselves (default: free ports, logged at start)")
    serve.add_argument("--replicate-from", default=env("REPLICATE_FROM", None), metavar="HOST:PORT",
                       help="run as a replica of the primary at HOST:PORT on another machine: copy its state into "
                            "--data-dir, follow its log, serve reads, forward writes (env STREAMREC_REPLICATE_FROM)")
    serve.add_argument("--replication-token-file", type=Path, default=env("REPLICATION_TOKEN_FILE", None),
                       help="with --replicate-from: a file holding an admin token for the primary, when it checks tokens")
    serve.add_argument("--role", choices=["primary", "replica"], default="primary", help=argparse.SUPPRESS)
    serve.add_argument("--primary", default=None, help=argparse.SUPPRESS)  # a replica forwards writes here
    serve.add_argument("--process-port", type=int, default=None, help=argparse.SUPPRESS)
    # Security: file paths only, never secrets on the command line (see server/tls.py and server/auth.py).
    serve.add_argument("--tls-cert", type=Path, default=env("TLS_CERT", None), help="PEM server certificate chain (env STREAMREC_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, default=env("TLS_KEY", None), help="PEM private key (env STREAMREC_TLS_KEY)")
    serve.add_argument("--tls-client-ca", type=Path, default=env("TLS_CLIENT_CA", None),
                       help="PEM CA bundle; clients must present a certificate it signed (mutual TLS; env STREAMREC_TLS_CLIENT_CA)")
    serve.add_argument("--tokens-file", type=Path, default=env("TOKENS_FILE", None),
                       help="bearer tokens with roles, lines 'ROLE SHA256HEX [NAME]'; re-read when it changes "
                            "(env STREAMREC_TOKENS_FILE; off by default = no authentication)")


def child_argv(args, role: str, process_port: int, primary: str | None, index: int) -> list[str]:
    """The `serve` arguments of one supervised process: the user's flags, then its place in the topology."""
    argv = ["--log-level", args.log_level, "serve"]
    for action in _parser._actions:
        if not action.option_strings or action.dest in _TOPOLOGY_DESTS or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    argv += ["--port", str(args.port), "--replicas", "0", "--role", role, "--process-port", str(process_port)]
    if primary:
        argv += ["--primary", primary]
    if args.metrics_port is not None:  # one metrics port per process: the given one, then the next ones
        argv += ["--metrics-port", str(int(args.metrics_port) + index if int(args.metrics_port) else 0)]
    return argv


def supervise(args) -> int:
    ports = [int(p) for p in str(args.process_ports).split(",") if p.strip()]
    args.port = args.port or free_port(args.host)  # every child binds the same one
    names = iter(range(args.replicas + 1))
    supervisor = Supervisor(
        lambda role, port, primary: child_argv(args, role, port, primary, next(names)), args.host, args.port,
        args.replicas, ports, tls=tls_files(args.tls_cert, args.tls_key, args.tls_client_ca))
    return supervisor.run_forever()


def user_model_settings(args) -> tuple[str, str | None]:
    """(user_model, sequence_model_path) of the engine from --user-model and --sequence-model."""
    from streamrec.engine import SHIPPED_SEQUENCE_MODEL

    if args.sequence_model == "none":
        return ("ials" if args.user_model == "auto" else args.user_model), None
    if args.sequence_model:
        return args.user_model, args.sequence_model
    return args.user_model, (str(SHIPPED_SEQUENCE_MODEL) if args.user_model in ("sequence", "auto") else None)


def _read_token(path: Path | None) -> str | None:
    return path.read_text().strip() if path else None


def run(args) -> int:
    if args.replicas < 0:
        print("error: --replicas must be 0 or more", file=sys.stderr)
        return 2
    if args.replicas and args.replicate_from:
        print("error: --replicas runs replicas of this machine's primary; --replicate-from makes this a replica "
              "of another machine's: choose one", file=sys.stderr)
        return 2
    ports = [p for p in str(args.process_ports).split(",") if p.strip()]
    if not args.replicas and ports:  # one process: its own port is the one given
        if len(ports) != 1:
            print(f"error: --process-ports lists {len(ports)} ports for 1 process", file=sys.stderr)
            return 2
        args.process_port = int(ports[0])
    if args.replicas:
        try:
            return supervise(args)
        except (TlsConfigError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    user_model, sequence_path = user_model_settings(args)
    engine = EngineConfig(dim=args.dim, backend=args.backend, gpu_storage=args.gpu_storage, checkpoint_interval_s=args.checkpoint_interval, sync=not args.no_sync,
                          reranker_path=serving_model_path(args.reranker, args.dim), rerank_by_default=not args.no_rerank,
                          rerank_candidates=args.rerank_candidates, rerank_provider=args.rerank_provider,
                          user_model=user_model, sequence_model_path=sequence_path, sequence_update=args.sequence_update,
                          impressions=not args.no_impressions, impression_features=args.impression_features,
                          impression_max_records=args.impression_max_records,
                          attribution_window_s=args.attribution_window)
    config = ServerConfig(host=args.host, port=args.port, data_dir=args.data_dir, dataset=args.dataset,
                          workers=args.workers, engine=engine,
                          max_concurrent_rpcs=None if args.max_concurrent_rpcs is None else int(args.max_concurrent_rpcs),
                          metrics_port=None if args.metrics_port is None else int(args.metrics_port),
                          tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          tokens_file=args.tokens_file, role="replica" if args.replicate_from else args.role,
                          primary_target=args.replicate_from or args.primary, process_port=args.process_port,
                          remote=bool(args.replicate_from), replication_token=_read_token(args.replication_token_file))
    try:
        server = StreamrecServer(config)
    except (TlsConfigError, auth.TokensFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server.serve_forever()
    return 0
