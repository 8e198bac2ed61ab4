"""`streamrec deploy-ray`: read replicas on a Ray cluster behind Serve's gRPC ingress (deploy/ray.py). Run it
again with another --replicas (or --autoscale-max) to scale; the primary runs apart (`streamrec serve`)."""
from __future__ import annotations

import sys
from pathlib import Path

from streamrec.cli import env


def register(subparsers) -> None:
    deploy = subparsers.add_parser("deploy-ray", help="serve read replicas on a Ray cluster (extra: ray)")
    deploy.add_argument("--address", default=env("RAY_ADDRESS", "auto"), help="Ray cluster (env STREAMREC_RAY_ADDRESS)")
    deploy.add_argument("--primary", required=True, metavar="HOST:PORT", help="the primary's address, reachable from every node")
    deploy.add_argument("--replicas", type=int, default=2, help="Serve replicas (ignored with --autoscale-max)")
    deploy.add_argument("--autoscale-min", type=int, default=1)
    deploy.add_argument("--autoscale-max", type=int, default=0, help="> 0: let Serve scale between min and max")
    deploy.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC ingress port, on every node")
    deploy.add_argument("--data-root", default="/tmp/streamrec-ray", help="each replica's copy: <data-root>/replica-<rank> on its node")
    deploy.add_argument("--dim", type=int, default=64, help="the primary's embedding dimension")
    deploy.add_argument("--replication-token-file", type=Path, default=None,
                        help="a file holding an admin token for the primary, when it checks tokens")


def run(args) -> int:
    try:
        import ray

        from streamrec.deploy.ray import APPLICATION, deploy
    except ImportError as error:
        print(f"error: {error}; install the extra: pip install 'streamrec[ray]'", file=sys.stderr)
        return 2
    ray.init(address=args.address)
    autoscaling = ({"min_replicas": args.autoscale_min, "max_replicas": args.autoscale_max}
                   if args.autoscale_max else None)
    token = args.replication_token_file.read_text().strip() if args.replication_token_file else None
    deploy(args.primary, args.data_root, args.replicas, args.grpc_port, {"dim": args.dim}, token, autoscaling)
    print(f"streamrec replicas serving RecommendService on port {args.grpc_port} of every node "
          f"(gRPC metadata application={APPLICATION}); writes go to the primary at {args.primary}")
    return 0
