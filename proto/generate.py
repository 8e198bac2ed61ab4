"""Generate the Python stubs from proto/ (the single source of truth), or check they are current.

    python proto/generate.py          # write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py next to the .proto files
    python proto/generate.py --check  # exit 1 when a committed stub differs from a fresh generation
"""
from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "streamrec" / "v1"
# Lines that only record which grpcio-tools/protobuf produced a stub; they differ between tool releases
# without the stub's content changing, so --check ignores them.
_TOOL_VERSION_LINE = re.compile(r"(Protobuf Python Version|GRPC_GENERATED_VERSION|ValidateProtobufRuntimeVersion|^\s*\d+,\s*$|^\s*'',\s*$)")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # imported here: only codegen needs grpcio-tools' compiler
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: see the messages above")
    return sorted((out_root / "streamrec" / "v1").glob("*_pb2*.py*"))


def _normalised(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not _TOOL_VERSION_LINE.search(line)]


def stale_stubs() -> list[str]:
    """Names of stubs that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in PACKAGE_DIR.glob("*_pb2*.py*")}
        stale = sorted(set(fresh) ^ set(committed))
        for name in sorted(set(fresh) & set(committed)):
            if not filecmp.cmp(fresh[name], committed[name], shallow=False) and _normalised(fresh[name]) != _normalised(committed[name]):
                stale.append(name)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args()
    if args.check:
        stale = stale_stubs()
        if stale:
            print("stale generated stubs (run: python proto/generate.py):", ", ".join(stale), file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PACKAGE_DIR / path.name)
            print("wrote", (PACKAGE_DIR / path.name).relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
