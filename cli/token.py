"""`streamrec token new|revoke`: edit the server's tokens file (hashes only; a new token is printed once)."""
from __future__ import annotations

import sys
from pathlib import Path

from streamrec.cli import env
from streamrec.server import auth


def register(subparsers) -> None:
    token = subparsers.add_parser("token", help="manage the tokens file (hashes only; a token is printed once)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="generate a token, append its hash to the file, print the token once")
    new.add_argument("--role", required=True, choices=auth.ROLES)
    new.add_argument("--file", type=Path, default=env("TOKENS_FILE", None), required=env("TOKENS_FILE", None) is None,
                     help="tokens file, created (mode 600) if absent (env STREAMREC_TOKENS_FILE)")
    new.add_argument("--name", default=None, help="label for logs and revocation (default ROLE-N)")
    revoke = token_sub.add_parser("revoke", help="remove the token(s) with this name from the file")
    revoke.add_argument("name")
    revoke.add_argument("--file", type=Path, default=env("TOKENS_FILE", None), required=env("TOKENS_FILE", None) is None)


def run(args) -> int:
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
