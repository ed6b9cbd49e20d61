"""The toy world's base: Stable Diffusion's architecture (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, DDIM), shrunk to 64x64 images and 8x8x4 latents, built from configs, saved as a diffusers
directory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from concepts.tokenizer_files import write_clip_tokenizer_files
from evals.toyworld.world import vocabulary

HIDDEN = 64  # text-encoder width == UNet cross_attention_dim
MAX_TOKENS = 40  # the longest pair caption (26 tokens), a trainer prefix and modifier tokens fit with room to spare


def build_tokenizer():
    """A CLIP BPE tokenizer whose vocabulary holds every word of the world as one token."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp), words=vocabulary())
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    # transformers 5 builds a CLIPTokenizer from objects only with merges as a list of pairs.
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MAX_TOKENS)


def build_vae():
    """64x64x3 images <-> 8x8x4 latents: three 2x downsamplings, as Stable Diffusion's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        # Several channels per group: with one channel per group (as 8 groups of 8 would be) the norm
        # removes each channel's mean, i.e. a flat image's colour, and the VAE learns far more slowly.
        norm_num_groups=2,
        sample_size=64,
    )


def build_unet():
    """A 4.2M-parameter UNet on 8x8x4 latents with cross-attention at 8x8 and 4x4 (9 attention blocks)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=4 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_noise_scheduler():
    """Stable Diffusion's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def build_sampling_scheduler():
    """Stable Diffusion's DDIM configuration; the base directory names it, so pipelines sample with it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def save_base(out: str | Path, vae, unet, text_encoder, tokenizer) -> Path:
    """Write a diffusers Stable Diffusion directory that `StableDiffusionPipeline.from_pretrained` loads."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer_files(out / "tokenizer", words=vocabulary())  # CLIP's BPE files, as in SD-1.x
    return out


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
