"""A tiny Stable-Diffusion-architecture base, built from configs (no download), saved with `save_pretrained`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from concepts.tokenizer_files import write_clip_tokenizer_files

HIDDEN = 32  # text-encoder width == UNet cross_attention_dim, as 768 is for SD-1.x


def create_tiny_base(directory: str | Path, seed: int = 0) -> Path:
    """Write a diffusers Stable Diffusion directory that `StableDiffusionPipeline.from_pretrained` loads.

    The UNet has 7 cross-attention blocks (2 down, 1 mid, 4 up); the VAE downsamples by 8 like SD's,
    so a 64x64 image is an 8x8x4 latent. The same seed always gives the same bytes.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(directory)
    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer_files(out / "tokenizer")  # CLIP's BPE files, as in a real SD-1.x directory
    return out


def _tokenizer():
    """A CLIPTokenizer over the BPE files `write_clip_tokenizer_files` writes."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    # transformers 5 builds a CLIPTokenizer from objects only with merges as a list of pairs.
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
