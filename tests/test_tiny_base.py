import hashlib
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from concepts.base import kv_layers, load_base
from concepts.tiny import create_tiny_base
from customdiff.__main__ import main


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_plain_diffusers_loads_and_generates(tiny_base_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("photo of a dog", num_inference_steps=10, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01
    again = pipe("photo of a dog", num_inference_steps=10, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(out, again)


def test_tokenizer_has_clip_bpe_files_and_single_token_words(tiny_base_dir):
    assert (tiny_base_dir / "tokenizer" / "vocab.json").exists()
    assert (tiny_base_dir / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2\n")
    base = load_base(tiny_base_dir)
    assert base.tokenizer.tokenize("photo of a ktn dog") == ["photo</w>", "of</w>", "a</w>", "ktn</w>", "dog</w>"]
    assert len(kv_layers(base.unet)) == 14  # 7 cross-attention blocks x (to_k, to_v)


def test_same_seed_same_bytes_other_seed_other_fingerprint(tmp_path, tiny_base_dir):
    assert main(["base", "create-tiny", str(tmp_path / "a"), "--seed", "0"]) == 0
    assert _tree_digest(tmp_path / "a") == _tree_digest(tiny_base_dir)
    create_tiny_base(tmp_path / "b", seed=1)
    assert load_base(tmp_path / "b").fingerprint != load_base(tiny_base_dir).fingerprint


def test_fingerprint_is_dtype_independent(tiny_base_dir):
    assert load_base(tiny_base_dir, dtype=torch.float16).fingerprint == load_base(tiny_base_dir).fingerprint
