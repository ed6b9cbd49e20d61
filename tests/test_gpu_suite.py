"""benchmarks/gpu_suite.py --dry-run: each GPU part's code at tiny size on the CPU, and how parts fail."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("train", "serving", "arrivals", "onnx")
KEYS = {
    "train": {"images_per_s", "baseline_images_per_s", "speedup", "peak_mb", "baseline_peak_mb",
              "s_per_250_steps", "extrapolated", "timed_steps"},
    "serving": {"overhead_single", "overhead_mixed", "cold_swap_ms", "artifact_read_ms", "batching_gain",
                "vs_diffusers", "concepts_per_gb"},
    "arrivals": {"capacity_rps", "requests", "request", "step", "p95_ratio", "throughput_ratio"},
    "onnx": {"onnx_vs_torch", "onnxruntime", "providers"},
}


@pytest.fixture
def suite(monkeypatch):
    """The module, loaded in this process; the sys.path entries it adds and torch's threads are restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop("gpu_rows", None)


def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    run = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert json.loads(out.read_text()) == report
    assert report["dry_run"] is True and report["device"] == "CPU (dry run)"
    for name in PARTS:  # the GPU plan comes first, then each part ran and has its keys
        assert any(line.startswith(f"  {name} ") and "limit" in line for line in lines[:6]), lines[:6]
        entry = report["parts"][name]
        assert entry["status"] == "ok", entry
        assert KEYS[name] <= set(entry["result"]), (name, sorted(entry["result"]))
        assert entry["seconds"] > 0 and entry["peak_mb"] > 0
    assert {"p50_s", "p95_s", "throughput_rps"} <= set(report["parts"]["arrivals"]["result"]["step"])
    assert "SD-1.5 shapes" in report["plan"]["train"] or "tiny base" in report["plan"]["train"]
    rows = "\n".join(report["rows"])
    assert rows in run.stdout and "extrapolated from 2 steps" in rows and "CPU provider" in rows


def test_missing_package_and_failing_part_are_reported(suite, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: find_spec and import fail

    def broken(ws, config):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(suite.RUNNERS, "train", broken)
    out = tmp_path / "suite.json"
    report = suite.main(["--dry-run", "--parts", "train,onnx", "--out", str(out)])
    train, onnx = report["parts"]["train"], report["parts"]["onnx"]
    assert train["status"] == "failed" and "RuntimeError: simulated failure" in train["error"]
    assert "simulated failure" in train["traceback"]
    assert onnx == {**onnx, "status": "not installed", "error": "missing onnxruntime"}
    assert json.loads(out.read_text())["parts"] == report["parts"]
    assert any("not installed: missing onnxruntime" in row for row in report["rows"])


def test_time_limit_and_exhausted_budget(suite, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "DRY", dataclasses.replace(suite.DRY, min_part_s=0.5))
    monkeypatch.setitem(suite.RUNNERS, "serving", lambda ws, config: time.sleep(30))
    start = time.monotonic()
    report = suite.main(["--dry-run", "--parts", "serving,arrivals", "--budget", "1",
                         "--out", str(tmp_path / "s.json")])
    assert time.monotonic() - start < 20
    serving, arrivals = report["parts"]["serving"], report["parts"]["arrivals"]
    assert serving["status"] == "timed out" and "1 s limit" in serving["error"]
    assert arrivals["status"] == "skipped" and "budget exhausted" in arrivals["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_cuda_only_the_dry_run(suite):
    with pytest.raises(SystemExit):
        suite.main([])
