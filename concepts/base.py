"""Loading a Stable Diffusion base through `from_pretrained(dir)`, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from concepts.errors import InvalidArgument

KV_SUFFIXES = ("attn2.to_k", "attn2.to_v")
CROSSATTN_SUFFIXES = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


@dataclass
class BaseModel:
    """The components of a diffusers Stable Diffusion directory.

    `text_encoder_2`/`tokenizer_2` are SDXL's second pair (None for one text encoder); `family` is
    read from the directory's configs (`family_of`).
    """

    path: Path
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    fingerprint: str
    text_encoder_2: nn.Module | None = None
    tokenizer_2: object = None
    family: str = "sd1"
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt conditions on zeros

    @property
    def text_pairs(self) -> list[tuple[object, nn.Module]]:
        """(tokenizer, text encoder) of each text encoder, in the order their states are concatenated."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs


def model_index(path: Path, field: str = "base") -> dict:
    """The directory's `model_index.json`, or `InvalidArgument(field, ...)`."""
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(field, f"{path}/model_index.json is unreadable: {e}") from None


def family_of(path: Path) -> str:
    """"sdxl" when the directory names a second text encoder, "sd2" when its text encoder is OpenCLIP's
    (GELU), else "sd1": read from `model_index.json` and the text encoder's config, never a model name."""
    if "text_encoder_2" in model_index(path):
        return "sdxl"
    act = json.loads((path / "text_encoder" / "config.json").read_text()).get("hidden_act")
    return "sd2" if act == "gelu" else "sd1"


def check_base_dir(path: str | Path, field: str = "base") -> Path:
    """Raise `InvalidArgument` unless `path` is a diffusers Stable Diffusion directory."""
    p = Path(path)
    components = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if (p / "model_index.json").exists() and "text_encoder_2" in model_index(p, field):
        components += ["text_encoder_2", "tokenizer_2"]
    missing = [c for c in components if not (p / c).exists()]
    if missing:
        raise InvalidArgument(
            field, f"{p} is not a diffusers Stable Diffusion directory (missing {', '.join(missing)})"
        )
    return p


def load_base(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> BaseModel:
    """Load every component with `from_pretrained(dir/<component>)`, as for a real SD-1.x/2.x/XL directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    p = check_base_dir(path)
    family = family_of(p)
    unet = UNet2DConditionModel.from_pretrained(p / "unet", torch_dtype=dtype).to(device).eval()
    vae = AutoencoderKL.from_pretrained(p / "vae", torch_dtype=dtype).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(p / "text_encoder", torch_dtype=dtype).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(p / "tokenizer")
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            p / "text_encoder_2", torch_dtype=dtype).to(device).eval()
        tokenizer_2 = CLIPTokenizer.from_pretrained(p / "tokenizer_2")
    scheduler = load_scheduler(p)
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    zeros = bool(model_index(p).get("force_zeros_for_empty_prompt", False))
    return BaseModel(p, unet, vae, text_encoder, tokenizer, scheduler, base_fingerprint(unet, tokenizer),
                     text_encoder_2, tokenizer_2, family, zeros)


def load_scheduler(path: Path):
    """The scheduler class and config named in the directory's `model_index.json`."""
    import diffusers

    class_name = model_index(path)["scheduler"][1]
    return getattr(diffusers, class_name).from_pretrained(path / "scheduler")


def kv_layers(unet: nn.Module, suffixes: tuple[str, ...] = KV_SUFFIXES) -> dict[str, nn.Linear]:
    """Cross-attention projections by module path, e.g. ``mid_block.attentions.0...attn2.to_k``."""
    return {name: m for name, m in unet.named_modules() if name.endswith(suffixes) and isinstance(m, nn.Linear)}


def base_fingerprint(unet: nn.Module, tokenizer) -> str:
    """sha256 over the cross-attention K/V weights (rounded to fp16, so fp32 and fp16 loads agree) and the vocab."""
    h = hashlib.sha256()
    for name, layer in sorted(kv_layers(unet).items()):
        h.update(name.encode())
        h.update(layer.weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    vocab = tokenizer.get_vocab()
    base_vocab = {t: i for t, i in vocab.items() if t not in tokenizer.get_added_vocab()}
    h.update(json.dumps(base_vocab, sort_keys=True).encode())
    return h.hexdigest()[:32]
