"""benchmarks/rehearsal.py: SDXL's real configs on the meta device (no memory), and the memory guard."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rehearsal(monkeypatch):
    """The module, loaded in this process; the sys.path entries it adds are restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "benchmarks" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_throughput", None)  # imported from benchmarks/, which leaves sys.path


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_configs_have_sdxl_base_shapes(rehearsal):
    with torch.device("meta"):
        unet, vae, text_encoder, text_encoder_2 = rehearsal.sdxl_modules()
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts.
    assert [_params(m) for m in (unet, text_encoder, text_encoder_2, vae)] == [
        2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
    attn2 = {name: module for name, module in unet.named_modules() if name.endswith("attn2")}
    assert len(attn2) == 70
    assert {m.to_k.in_features for m in attn2.values()} == {2048}
    assert sum(m.to_k.out_features for m in attn2.values()) == 10 * 640 + 60 * 1280  # the packed K/V width
    assert type(text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert text_encoder_2.config.hidden_act == "gelu" and text_encoder.config.hidden_act == "quick_gelu"
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast


def test_a_stage_that_would_not_fit_is_skipped_without_starting(rehearsal, monkeypatch, tmp_path):
    monkeypatch.setattr(rehearsal, "available_gib", lambda: 20.0)
    monkeypatch.setattr(rehearsal.subprocess, "run", lambda *a, **k: pytest.fail("the stage was started"))
    args = argparse.Namespace(family="sdxl", serve_steps=2, serve_images=8, serve_guidance=7.5)
    result = rehearsal.run_stage("onnx", tmp_path, args)
    assert result == {"skipped": "needs ~26.0 GiB (estimate, module doc), 20.0 GiB available"}

