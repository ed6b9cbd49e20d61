"""Training-step throughput and peak memory: our trainer against a plain Custom Diffusion loop.

The baseline does what diffusers' examples/custom_diffusion/train_custom_diffusion.py does each step:
VAE-encode the batch's pixels in float32, run the text encoder with its whole token-embedding matrix
trainable (other rows' gradients zeroed), the UNet in float32 with K/V trainable, AdamW over the
embedding matrix and K/V, clip over all of them. Image decoding and augmentation are excluded (done
once before the loop), which favours the baseline. Ours is `trainer.loop.train_step` on latents
encoded once, with cached class-prompt states, token rows as the only embedding parameter and
mixed precision (bf16 on a GPU).

Always: the tiny base on the CPU (64x64). With a GPU: also an SD-1.5-shaped UNet, VAE and CLIP text
encoder with random weights (configs below, nothing downloaded) at 512x512 and 8 images per step (4
target + 4 regularization, as the paper's batch of 8), bf16. The last line is one JSON object; its
top-level numbers are the largest run (the GPU one when there is a GPU), the other nested. On a
shared machine read the CPU numbers with `load_avg_1m`; `--threads 1` is then often faster.

Usage: python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--threads N]
       python benchmarks/train_throughput.py --model sd15 --device cpu --resolution 64 --batch 2 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from concepts.base import KV_SUFFIXES, BaseModel, kv_layers, load_base
from concepts.tiny import create_tiny_base
from trainer.data import center_square, to_array
from trainer.distributed import DistContext
from trainer.job import build_state, tokenize
from trainer.loop import train_step
from trainer.progress import ProgressLog
from trainer.spec import JobSpec
from trainer.tokens import add_modifier_tokens

# Stable Diffusion 1.5's unet/config.json, vae/config.json and text_encoder/config.json, abridged.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512,
}
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}


def sd15_base(tokenizer_dir: Path, device: torch.device) -> BaseModel:
    """Random SD-1.5-shaped components built on `device` (the tokenizer is the tiny base's BPE)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return BaseModel(tokenizer_dir, unet, vae, text_encoder, tokenizer, scheduler, "benchmark")


def write_images(directory: Path, count: int, size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        blocks = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        path = directory / f"{i}.png"
        Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST).save(path)
        paths.append(str(path))
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, KiB on Linux


def _timed(step, device: torch.device, warmup: int, steps: int, images_per_step: int) -> dict:
    for s in range(warmup):
        step(s)
    _sync(device)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": images_per_step * steps / elapsed, "step_s": elapsed / steps, "peak_mb": _peak_mb(device)}


def run_ours(base: BaseModel, work: Path, device: torch.device, args: argparse.Namespace, precision: str) -> dict:
    images, classes = write_images(work / "target", 3, args.resolution, 0), write_images(work / "class", 4, args.resolution, 1)
    spec = JobSpec.from_dict({
        "base_model": str(work), "store_url": str(work / "store"), "work_dir": str(work / "job"),
        "concepts": [{"name": "bench", "class_prompt": "dog", "images": images}],
        "hyperparameters": {"resolution": args.resolution, "train_batch_size": args.batch // 2,
                            "gradient_accumulation_steps": 1, "mixed_precision": precision, "views_per_image": 4},
    })
    ctx = DistContext(0, 1, 0, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as run_job does
    state, _, _ = build_state(spec, base, [[(p, "dog") for p in classes]], ctx, ProgressLog(work, enabled=False))
    _peak_reset(device)
    return _timed(lambda s: train_step(state, s), device, args.warmup, args.steps, args.batch)


def run_baseline(base: BaseModel, device: torch.device, args: argparse.Namespace) -> dict:
    """The reference's step (see the module docstring), all float32."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the example's default (no --allow_tf32)
    base.unet.to(device)
    base.vae.to(device)
    base.text_encoder.to(device)
    token_ids, _ = add_modifier_tokens(base.tokenizer, base.text_encoder, ["<base1>"], ["ktn"])
    embedding = base.text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(True)
    kv = [layer.weight for layer in kv_layers(base.unet, KV_SUFFIXES).values()]
    for w in kv:
        w.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding, *kv], lr=1e-5, weight_decay=1e-2)
    b = args.batch // 2
    g = np.random.default_rng(0)
    noise_images = [Image.fromarray(g.integers(0, 255, (args.resolution,) * 2 + (3,), dtype=np.uint8))
                    for _ in range(2 * b)]
    pixels = torch.from_numpy(np.stack([to_array(center_square(im, args.resolution)) for im in noise_images]))
    pixels = pixels.to(device)
    ids = tokenize(base.tokenizer, ["photo of a <base1> dog"] * b + ["dog"] * b, device)
    keep = torch.zeros(embedding.shape[0], dtype=torch.bool, device=device)
    keep[token_ids] = True
    sf = base.vae.config.scaling_factor

    def step(_: int) -> None:
        latents = base.vae.encode(pixels).latent_dist.sample() * sf
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        pred = base.unet(base.scheduler.add_noise(latents, noise, t), t, base.text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred[:b], noise[:b]) + F.mse_loss(pred[b:], noise[b:])
        loss.backward()
        embedding.grad[~keep] = 0
        torch.nn.utils.clip_grad_norm_([embedding, *kv], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _peak_reset(device)
    return _timed(step, device, args.warmup, args.steps, args.batch)


def compare(model: str, device: torch.device, args: argparse.Namespace, tiny_dir: Path, work: Path) -> dict:
    """Ours, then the baseline on freshly built components (ours casts and hooks its modules)."""
    build = (lambda: load_base(tiny_dir)) if model == "tiny" else (lambda: sd15_base(tiny_dir / "tokenizer", device))
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    ours = run_ours(build(), work / model, device, args, precision)
    _peak_reset(device)
    baseline = run_baseline(build(), device, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name, "model": model, "resolution": args.resolution, "images_per_step": args.batch,
        "precision": precision, "images_per_s": round(ours["images_per_s"], 3),
        "baseline_images_per_s": round(baseline["images_per_s"], 3),
        "speedup": round(ours["images_per_s"] / baseline["images_per_s"], 3),
        "peak_mb": round(ours["peak_mb"], 1), "baseline_peak_mb": round(baseline["peak_mb"], 1),
        "step_s": round(ours["step_s"], 4), "s_per_250_steps": round(250 * ours["step_s"], 1),
        "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", choices=("auto", "tiny", "sd15"), default="auto",
                        help="auto: tiny on the CPU, plus sd15 on a GPU when there is one")
    parser.add_argument("--device", default="", help="device for --model sd15 (default: cuda)")
    parser.add_argument("--resolution", type=int, default=0, help="default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--batch", type=int, default=0, help="images per step, half target, half class (default 4 / 8)")
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="", help="ours' mixed precision")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = create_tiny_base(Path(tmp) / "tiny")
        runs = []
        if args.model in ("auto", "tiny"):
            tiny_args = argparse.Namespace(**{**vars(args), "resolution": args.resolution or 64,
                                              "batch": args.batch or 4})
            runs.append(compare("tiny", torch.device("cpu"), tiny_args, tiny_dir, Path(tmp)))
        if args.model == "sd15" or (args.model == "auto" and torch.cuda.is_available()):
            sd_args = argparse.Namespace(**{**vars(args), "resolution": args.resolution or 512,
                                            "batch": args.batch or 8})
            runs.append(compare("sd15", torch.device(args.device or "cuda"), sd_args, tiny_dir, Path(tmp)))
    for run in runs:
        print(json.dumps(run))
    print(json.dumps({**runs[-1], "runs": runs}))


if __name__ == "__main__":
    main()
