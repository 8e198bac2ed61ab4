"""The committed stubs must be what grpcio-tools generates from proto/ today."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_current():
    assert load_generator().stale_stubs() == [], "run: python proto/generate.py"


def test_check_notices_a_changed_proto(tmp_path, monkeypatch):
    generator = load_generator()
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy)
    events = copy / "streamrec" / "v1" / "events.proto"
    events.write_text(events.read_text().replace("uint64 first_seq = 6;", "uint64 first_seq = 6;\n  string note = 99;"))
    monkeypatch.setattr(generator, "PROTO_ROOT", copy)
    monkeypatch.setattr(generator, "PACKAGE_DIR", copy / "streamrec" / "v1")
    assert generator.stale_stubs() == ["events_pb2.py", "events_pb2.pyi"]
