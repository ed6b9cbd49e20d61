"""Imports point downward: `engine/` is a library without transport, nothing but `customdiff eval` and the
tests import `evals`, and what the services image copies imports on its own (no package it leaves out)."""

from __future__ import annotations

import ast
import re
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


def test_the_services_image_imports_without_what_it_leaves_out():
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "deploy/docker/Dockerfile.services").read_text(), re.M))
    assert set(LIBRARIES) <= copied, copied
    left_out = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name not in copied)
    assert "evals" in left_out and "tests" in left_out
    result = import_all(sorted(copied & set(LIBRARIES)), left_out)
    assert result.stdout.strip() == "imported", result.stderr[-3000:]
    help_text = subprocess.run([sys.executable, "-c", BLOCKING.replace('print("imported")', "") +
                                "\nfrom customdiff.__main__ import main; main(['serve', '--help'])",
                                ",".join(left_out), "customdiff"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--only" in help_text.stdout, help_text.stderr[-3000:]


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
