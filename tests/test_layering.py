"""Imports point downward: `engine/` is a library without transport, and nothing but `customdiff eval` and the
tests import `evals`. That each image's packages import and start without what it leaves out is
tests/test_deploy_images.py (installed from the emulated build context, `evals` unimportable)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("concepts", "trainer", "merger", "engine", "services", "customdiff")
# A meta-path finder that makes the named top-level packages unimportable, then the imports to try.
BLOCKING = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
for package in sys.argv[2].split(","):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if ".migrations" not in info.name:  # alembic's scripts run inside alembic only
            importlib.import_module(info.name)
print("imported")
"""


def import_all(packages: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKING, ",".join(blocked), ",".join(packages)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_engine_imports_no_transport_no_services():
    result = import_all(["engine"], ["grpc", "grpc_health", "tritonclient", "services", "evals", "customdiff"])
    assert result.stdout.strip() == "imported", result.stderr[-3000:]


@pytest.mark.parametrize("package", LIBRARIES)
def test_only_customdiff_eval_imports_evals(package):
    importers = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "evals" or n.startswith("evals.") for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert set(importers) <= {"customdiff/commands/eval.py"}, importers
