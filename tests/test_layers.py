"""The layout's rules: layers point one way (app.py -> web -> live -> {preview, sadtalker} -> core), core and
preview never import torch, sadtalker's model code does no file I/O."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from support.paths import ROOT

# package -> the packages it may import (its own is always allowed)
ALLOWED = {
    "core": set(),
    "preview": {"core"},
    "sadtalker": {"core"},
    "live": {"core", "preview", "sadtalker"},
    "web": {"core", "preview", "sadtalker", "live"},
}
PROJECT = set(ALLOWED)


def imported_packages(path) -> set[str]:
    """Top-level project packages a module imports (anywhere in it, lazily or not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_it(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for other in imported_packages(path) - ALLOWED[package] - {package}:
            wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_app_is_the_top():
    assert imported_packages(ROOT / "app.py") <= PROJECT
    for package in PROJECT:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            assert not any(isinstance(n, ast.Import) and any(a.name == "app" for a in n.names) for n in ast.walk(tree))


def test_bench_does_not_import_tests():
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text and "from support" not in text and "tests" not in imported_modules(path), path


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}


def test_core_and_preview_import_without_torch():
    """A fresh interpreter: everything in core and preview imports, and torch is not among what got loaded."""
    modules = sorted({f"{p.parent.name}.{p.stem}" if p.stem != "__init__" else p.parent.name
                      for package in ("core", "preview") for p in (ROOT / package).glob("*.py")})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"importing {modules} loaded torch"


def test_model_code_does_no_file_io():
    forbidden = {"open", "print"}
    for path in sorted((ROOT / "sadtalker" / "models").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & forbidden, f"{path.name} calls {calls & forbidden}"
        assert not imported_modules(path) & {"os", "cv2", "PIL", "pathlib"}, path.name
