"""Pretrain the toy world's base model, deterministically from a seed and resumably.

    python -m evals.toyworld.pretrain --out evals/toyworld/base --seed 0

Stage 1 trains the AutoencoderKL on the rendered pretraining scenes. Stage 2 encodes every pretraining
scene once and trains the UNet and the CLIP text encoder together on (latent, caption) pairs, half the
steps on single scenes (8x8 latents) and half on pairs of scenes side by side (8x16 latents, each pair
encoded as one image, captioned "... left of ..."; world v2): epsilon
prediction on Stable Diffusion's noise schedule, 10% empty captions for classifier-free guidance,
min-SNR loss weighting, AdamW with warmup and cosine decay, and an EMA of the weights, which is what
gets saved. Both stages checkpoint to the work directory every `checkpoint_every` steps (with every
random-number state), and a restarted run resumes from there and ends with the same weights.
Held-out scenes (the concepts' class and look, `world.is_held_out`) appear in neither stage, alone
or in a pair.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from evals.toyworld import models
from evals.toyworld.render import render_batch, render_pairs
from evals.toyworld.world import Pair, pretraining_scenes, sample_caption, sample_pair, sample_pair_caption


LOGVAR_INIT = -10.0


@dataclass(frozen=True)
class PretrainConfig:
    """Hyperparameters of both stages (the defaults built the committed base)."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 5000
    batch: int = 64  # single scenes per step; a step on pairs takes batch / 2 pairs (the same latent cells)
    pairs: float = 0.5  # fraction of steps (in both stages) on pairs
    pair_pool: int = 24000  # pairs drawn once (seeded); each step's pairs come from these
    lr: float = 1e-3
    lr_end: float = 1e-4
    warmup: int = 100
    weight_decay: float = 1e-2
    uncond: float = 0.1  # fraction of empty captions, for classifier-free guidance
    min_snr: float = 5.0  # min-SNR-gamma loss weighting (Hang et al., 2023)
    ema: float = 0.999
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch", "steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.uncond < 1.0 or not 0.0 < self.ema < 1.0:
            raise ValueError(f"uncond must be in [0, 1) and ema in (0, 1), got {self.uncond}, {self.ema}")


class Progress:
    """JSON lines to a log file (and stdout), with wall and CPU time per step for idle-machine estimates."""

    def __init__(self, path: Path, stage: str, total: int, start: int) -> None:
        self.path, self.stage, self.total, self.start = path, stage, total, start
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def log(self, step: int, **values: float) -> None:
        done = max(step - self.start, 1)
        wall = (time.perf_counter() - self.t0) / done
        record = {"stage": self.stage, "step": step, "of": self.total, **values, "s_per_step": round(wall, 3),
                  "cpu_s_per_step": round((time.process_time() - self.c0) / done, 3),
                  "eta_min": round(wall * (self.total - step) / 60, 1)}
        line = json.dumps(record)
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def lr_at(step: int, total: int, lr: float, lr_end: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr_end` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save(path: Path, state: dict) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _images(scenes) -> torch.Tensor:
    """Rendered scenes as [N, 3, 64, 64] floats in [-1, 1]."""
    return torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _pair_images(pairs: list[Pair]) -> torch.Tensor:
    """Rendered pairs as [N, 3, 64, 128] floats in [-1, 1]."""
    return torch.from_numpy(render_pairs(pairs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pair_pool(cfg: PretrainConfig) -> list[Pair]:
    """The pretraining pairs: `cfg.pair_pool` random pairs of pretraining scenes on a shared background."""
    rng, scenes = random.Random(cfg.seed + 2), pretraining_scenes()
    return [sample_pair(scenes, rng) for _ in range(cfg.pair_pool)]


def train_vae(cfg: PretrainConfig, vae, pairs: list[Pair], work: Path) -> None:
    """Stage 1: L1 + L2 reconstruction with a small KL term, on uniformly drawn pretraining scenes (a
    `cfg.pairs` share of the steps on half as many pairs: the norms and the attention see both shapes).

    The posterior's log-variance starts at -10: from its default of 0, unit-variance noise on every
    latent drowns the signal and reconstruction only starts once the encoder has learned to shrink it.
    """
    scenes = pretraining_scenes()
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = LOGVAR_INIT
    images = _images(scenes)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt, step = work / "vae.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, step = state["rng"], state["step"]
        gen.set_state(state["gen"])
    progress, vae = Progress(work / "log.jsonl", "vae", cfg.vae_steps, step), vae.train()
    while step < cfg.vae_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_lr / 100, cfg.warmup)
        if rng.random() < cfg.pairs:
            x = _pair_images([pairs[i] for i in rng.integers(len(pairs), size=cfg.vae_batch // 2)])
        else:
            x = images[torch.from_numpy(rng.integers(len(scenes), size=cfg.vae_batch))]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            progress.log(step, loss=round(loss.item(), 5))
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            _save(ckpt, {"vae": vae.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                         "gen": gen.get_state(), "step": step})
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, scenes, batch: int = 256) -> torch.Tensor:
    """Posterior means of the scenes' images, [N, 4, 8, 8], unscaled."""
    images = _images(scenes)
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def encode_pairs(vae, pairs: list[Pair], batch: int = 256) -> torch.Tensor:
    """Posterior means of the pairs' images, [N, 4, 8, 16], unscaled."""
    return torch.cat([vae.encode(_pair_images(pairs[i : i + batch])).latent_dist.mean
                      for i in range(0, len(pairs), batch)])


class Captions:
    """Token ids of captions, cached: the world has few distinct captions."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tokenizer(c, padding="max_length", max_length=self.tokenizer.model_max_length,
                                               truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


@torch.no_grad()
def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1.0 - decay)


def denoise_loss(cfg, unet, text_encoder, latents, ids, gen, alphas_cumprod) -> torch.Tensor:
    """Min-SNR-weighted epsilon-prediction loss of one batch: latents [B, 4, 8, 8 or 16], ids [B, T]."""
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, text_encoder(ids)[0]).sample
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    weight = torch.clamp(snr, max=cfg.min_snr) / snr
    return (weight * (pred - noise).square().mean(dim=(1, 2, 3))).mean()


def train_denoiser(cfg: PretrainConfig, unet, text_encoder, tokenizer, latents: torch.Tensor,
                   pairs: list[Pair], pair_latents: torch.Tensor, work: Path):
    """Stage 2: the UNet and the text encoder together, on scenes (`latents`) and pairs (`pair_latents`);
    returns their EMA copies."""
    scenes = pretraining_scenes()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema = list(ema_unet.parameters()) + list(ema_text.parameters())
    rng, pyrng, gen = np.random.default_rng(cfg.seed + 1), random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    ckpt, step = work / "denoiser.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, step = state["rng"], state["step"]
        pyrng.setstate(state["pyrng"])
        gen.set_state(state["gen"])
    alphas_cumprod = models.build_noise_scheduler().alphas_cumprod
    captions, progress, running = Captions(tokenizer), Progress(work / "log.jsonl", "denoiser", cfg.steps, step), []
    unet.train(), text_encoder.train()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.lr_end, cfg.warmup)
        if rng.random() < cfg.pairs:
            idx = rng.integers(len(pairs), size=cfg.batch // 2)
            texts = ["" if pyrng.random() < cfg.uncond else sample_pair_caption(pairs[i], pyrng) for i in idx]
            x = pair_latents[torch.from_numpy(idx)]
        else:
            idx = rng.integers(len(scenes), size=cfg.batch)
            texts = ["" if pyrng.random() < cfg.uncond else sample_caption(scenes[i], pyrng) for i in idx]
            x = latents[torch.from_numpy(idx)]
        loss = denoise_loss(cfg, unet, text_encoder, x, captions(texts), gen, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, params, min(cfg.ema, (1 + step) / (10 + step)))
        step, running = step + 1, running[-49:] + [loss.item()]
        if step % 25 == 0:
            progress.log(step, loss=round(sum(running) / len(running), 5), lr=round(opt.param_groups[0]["lr"], 6))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(ckpt, {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                         "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                         "pyrng": pyrng.getstate(), "gen": gen.get_state(), "step": step})
    return ema_unet.eval(), ema_text.eval()


def pretrain(cfg: PretrainConfig, out: str | Path, work: str | Path) -> Path:
    """Both stages, then the base directory at `out` (EMA weights; VAE scaling factor from the data)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    tokenizer = models.build_tokenizer()
    vae, unet, text_encoder = models.build_vae(), models.build_unet(), models.build_text_encoder(tokenizer)
    pairs = pair_pool(cfg)
    train_vae(cfg, vae, pairs, work)
    latents = encode_scenes(vae, pretraining_scenes())
    pair_latents = encode_pairs(vae, pairs)
    scaling = 1.0 / latents.std().item()  # as SD's 0.18215: unit-variance latents for the UNet
    vae.register_to_config(scaling_factor=scaling)
    unet, text_encoder = train_denoiser(cfg, unet, text_encoder, tokenizer, latents * scaling, pairs,
                                        pair_latents * scaling, work)
    return models.save_base(out, vae, unet, text_encoder, tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.toyworld.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="base directory to write (diffusers format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="checkpoints and log.jsonl (default /tmp/toyworld-pretrain-<seed>)")
    # The weights are bit-identical only for the same thread count; 2 built the committed base (world v2).
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="denoiser steps")
    parser.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(seed=args.seed, steps=args.steps, vae_steps=args.vae_steps)
    work = args.work or f"/tmp/toyworld-pretrain-{args.seed}"
    out = pretrain(cfg, args.out, work)
    print(json.dumps({"base": str(out), "work": str(work), "config": asdict(cfg)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
