"""Shared fixtures: one tiny base per test session, built the way `customdiff base create-tiny` builds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from concepts.artifact import Concept, LinearDelta
from concepts.base import BaseModel, kv_layers, load_base
from concepts.tiny import create_tiny_base


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 (needs a GPU or a real checkpoint)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory) -> Path:
    """A second tiny base with other weights, hence another fingerprint."""
    return create_tiny_base(tmp_path_factory.mktemp("tiny-base-1"), seed=1)


@pytest.fixture()
def tiny_base(tiny_base_dir) -> BaseModel:
    return load_base(tiny_base_dir)


def random_concept(base: BaseModel, seed: int, token: str = "<new1>", rank: int | None = None,
                   scale: float = 0.05, class_word: str = "dog") -> Concept:
    """A concept with random deltas on every K/V layer (dense, or low-rank when `rank` is given)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in kv_layers(base.unet).items():
        out_f, in_f = layer.weight.shape
        if rank is None:
            deltas[name] = LinearDelta(dense=scale * torch.randn(out_f, in_f, generator=g))
        else:
            deltas[name] = LinearDelta(up=scale * torch.randn(out_f, rank, generator=g),
                                       down=torch.randn(rank, in_f, generator=g))
    return Concept(
        deltas=deltas,
        tokens=(token,),
        embeddings=torch.randn(1, base.text_encoder.config.hidden_size, generator=g),
        base_fingerprint=base.fingerprint,
        class_words=(class_word,),
        provenance={"kind": "test", "seed": seed},
    )
