"""Tiny Stable-Diffusion-architecture bases, built from configs (no download), saved with `save_pretrained`.

Three families, shaped as the real ones differ (the code under test reads every difference from the
saved configs, never from a family name):

  sd15  SD-1.x: CLIP width 32 (768 in SD-1.5), quick-GELU, one head count for every block,
        conv projections in and out of each transformer, PNDM predicting the noise ("epsilon").
  sd2   SD-2.x (768-v): CLIP width 48 (OpenCLIP-H's 1024), GELU, padding with "!", a head count per
        block (``attention_head_dim``), linear projections, upcast attention, DDIM predicting
        the velocity ("v_prediction"), as stabilityai/stable-diffusion-2-1 ships.
  sdxl  SDXL: two text encoders (CLIP width 32 quick-GELU, as CLIP-L's 768; width 64 GELU with a
        text projection, as OpenCLIP-bigG's 1280), their penultimate states concatenated to 96
        (2048 in SDXL); the UNet's first block without cross-attention, two transformer blocks per
        attention (SDXL: 2 and 10), ``addition_embed_type="text_time"`` (pooled text plus six
        size/crop ids), Euler discrete, a VAE scaled by 0.13025 that upcasts, as
        stabilityai/stable-diffusion-xl-base-1.0 ships.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from concepts.errors import InvalidArgument
from concepts.tokenizer_files import write_clip_tokenizer_files

FAMILIES = ("sd15", "sd2", "sdxl")
HIDDEN = 32  # text-encoder width == UNet cross_attention_dim, as 768 is for SD-1.x
HIDDEN_SD2 = 48  # as 1024 is for SD-2.x
HIDDEN_SDXL = (32, 64)  # as (768, 1280)
SD2_PAD_TOKEN = "!"  # SD-2.x's tokenizer pads with "!" (id 0), SD-1.x's with <|endoftext|>
# Every family's UNet: two resolutions, one resnet per block; an 8x8 latent is a 64x64 image.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8)


def create_tiny_base(directory: str | Path, seed: int = 0, family: str = "sd15") -> Path:
    """Write a diffusers Stable Diffusion directory that `StableDiffusionPipeline.from_pretrained` loads.

    The UNet has 7 cross-attention blocks (2 down, 1 mid, 4 up); the VAE downsamples by 8 like SD's,
    so a 64x64 image is an 8x8x4 latent. The same seed and family always give the same bytes.

    Args:
        family: "sd15" (SD-1.x shaped), "sd2" (SD-2.x shaped, v-prediction) or "sdxl"
            (`StableDiffusionXLPipeline.from_pretrained` loads it); see the module doc.

    Raises:
        InvalidArgument: an unknown family.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if family not in FAMILIES:
        raise InvalidArgument("family", f"must be one of {list(FAMILIES)}, got {family!r}")
    if family == "sdxl":
        return _create_tiny_sdxl(Path(directory), seed)
    sd2 = family == "sd2"
    hidden = HIDDEN_SD2 if sd2 else HIDDEN
    out = Path(directory)
    tokenizer = _tokenizer(pad_token=SD2_PAD_TOKEN if sd2 else None)
    torch.manual_seed(seed)
    # SD-2.x: diffusers' `attention_head_dim` is the head count per block ((5, 10, 20, 20) there).
    sd2_unet = {"attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True}
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        **(sd2_unet if sd2 else {"attention_head_dim": 8}),
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden, 96 if sd2 else 37,
                                              **({"hidden_act": "gelu"} if sd2 else {})))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(family),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer_files(out / "tokenizer")  # CLIP's BPE files, as in a real SD directory
    return out


def _create_tiny_sdxl(out: Path, seed: int) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer(pad_token=SD2_PAD_TOKEN)
    torch.manual_seed(seed)
    width_1, width_2 = HIDDEN_SDXL
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=width_1 + width_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=width_2 + 6 * 8,  # pooled text + 6 time ids x 8
    )
    vae = _vae(scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_text_config(tokenizer, width_1, 37))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, width_2, 128, hidden_act="gelu", projection_dim=width_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler("sdxl"), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer_files(out / name)
    return out


def _vae(**config):
    """SD's VAE layout at tiny width: downsamples by 8, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


def _text_config(tokenizer, hidden: int, intermediate: int, **config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )


def _scheduler(family: str):
    """The family's scheduler: SD-1.5's PNDM (epsilon), SD-2.1's DDIM (v_prediction), SDXL's Euler (epsilon)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if family == "sdxl":
        return EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
        )

    if family == "sd2":
        return DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        )
    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )


def _tokenizer(pad_token: str | None = None):
    """A CLIPTokenizer over the BPE files `write_clip_tokenizer_files` writes (padding with `pad_token`,
    default CLIP's <|endoftext|>)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    pad = {"pad_token": pad_token} if pad_token else {}
    # transformers 5 builds a CLIPTokenizer from objects only with merges as a list of pairs.
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77, **pad)
