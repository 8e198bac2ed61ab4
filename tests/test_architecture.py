"""The boundaries the layout promises, checked by importing and by scanning imports.

- Serving (every module of streamrec.server) loads nothing from streamrec.engine.offline, torch or matplotlib.
- The client library loads neither numpy nor the engine.
- Code outside engine/ reaches the engine only through its public API: the package itself (Engine and the
  api types), api, config, errors, the observer hooks, and the offline toolkit for the commands that train, evaluate and seed.
- No module outside the kernels (engine/cpu, engine/gpu) is much over 500 lines.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("streamrec.engine", "streamrec.engine.api", "streamrec.engine.config", "streamrec.engine.errors",
          "streamrec.engine.observer")
OFFLINE = "streamrec.engine.offline"
MAX_LINES = 550  # "about 500"; kernels are exempt


def _loaded_after(imports: list[str]) -> list[str]:
    code = "import importlib, json, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in imports) + \
        "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules_under(folder: str, package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__main__" or "_pb2" in parts[-1]:
            continue
        names.append(".".join((package, *parts))[: -len(".__init__")] if parts[-1] == "__init__"
                     else ".".join((package, *parts)))
    return names


def test_serving_loads_no_offline_code_torch_or_matplotlib():
    loaded = _loaded_after(_modules_under("server", "streamrec.server"))
    assert "streamrec.server.app" in loaded and "streamrec.engine.engine" in loaded
    leaked = [m for m in loaded if m.startswith((OFFLINE, "torch", "matplotlib"))]
    assert leaked == []


def test_client_library_loads_neither_numpy_nor_the_engine():
    loaded = _loaded_after(["streamrec.clients.client", "streamrec.clients.aio"])
    assert "streamrec.clients.client" in loaded
    assert [m for m in loaded if m.split(".")[0] == "numpy" or m.startswith("streamrec.engine")] == []


def _engine_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "streamrec.engine":
                found += [f"streamrec.engine.{a.name}" if f"streamrec.engine.{a.name}" not in PUBLIC else node.module
                          for a in node.names if (ROOT / "engine" / a.name).with_suffix(".py").exists()
                          or (ROOT / "engine" / a.name).is_dir()] or [node.module]
            elif node.module.startswith("streamrec.engine."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("streamrec.engine")]
    return found


@pytest.mark.parametrize("folder", ["server", "clients", "cli"])
def test_outside_the_engine_only_the_public_api_is_imported(folder):
    if not (ROOT / folder).is_dir():
        pytest.skip(f"no {folder}/ folder")
    bad = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        private = [m for m in _engine_imports(path) if m not in PUBLIC and not m.startswith(OFFLINE)]
        if folder == "clients":  # the client library does not use the engine at all
            private = _engine_imports(path)
        if private:
            bad[str(path.relative_to(ROOT))] = private
    assert bad == {}


def test_the_scan_sees_a_private_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from streamrec.engine.state.state import State\nfrom streamrec.engine import Engine\n"
                     "from streamrec.engine import store\n")
    assert _engine_imports(probe) == ["streamrec.engine.state.state", "streamrec.engine", "streamrec.engine.store"]


def test_no_module_outside_the_kernels_is_much_over_500_lines():
    kernels = (ROOT / "engine" / "cpu", ROOT / "engine" / "gpu")
    long = {}
    for folder in ("engine", "server", "clients", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            if "_pb2" in path.name or any(k in path.parents for k in kernels):
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long[str(path.relative_to(ROOT))] = lines
    assert long == {}
