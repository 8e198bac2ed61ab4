"""The install is consistent and serving stays free of training-only packages."""
from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

import pytest


def installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_onnxruntime_flavours_are_not_mixed():
    # Both distributions install into the same `onnxruntime` package and break each other.
    assert not (installed("onnxruntime") and installed("onnxruntime-gpu"))


@pytest.mark.parametrize("dist, module", [("cupy-cuda12x", "cupy"), ("onnxruntime-gpu", "onnxruntime"), ("onnxruntime", "onnxruntime")])
def test_installed_optional_packages_import(dist, module):
    if not installed(dist):
        pytest.skip(f"{dist} not installed (optional extra)")
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)


def test_serving_never_imports_torch():
    # Not scipy: numba itself imports it whenever it is installed (the `implicit` peer brings it in).
    code = ("import sys, streamrec.server.app, streamrec.clients.client, streamrec.engine.offline.seeding; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', 'onnx', 'implicit')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject lists packages explicitly (folders map to streamrec.*); a folder missing there imports in an
    editable install but is absent from the wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {Path(folder): name for name, folder in config["package-dir"].items()}
    missing = set()
    for folder, name in folders.items():
        for init in (root / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(root / folder).parts
            dotted = ".".join((name, *relative))
            if dotted not in listed and "node_modules" not in init.parts:
                missing.add(dotted)
    assert missing == set()
