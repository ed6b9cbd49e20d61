"""The training step: noise, predict, masked loss, backward, clip, AdamW step (with a GradScaler for fp16)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from concepts.errors import FailedPrecondition
from trainer.batches import BatchMaker
from trainer.distributed import DistContext
from trainer.model import autocast


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   prior_loss_weight: float) -> torch.Tensor:
    """Masked MSE on the instance examples plus `prior_loss_weight` x MSE on the class examples.

    Args:
        pred, target: [B + C, 4, h, w], the B instance examples first.
        mask: [B, 1, h, w]; each instance example's error is averaged over its masked elements.

    The mask is broadcast over the latent channels before it is counted. The diffusers port divides
    a sum over 4 channels by a 1-channel count, weighting the instance term 4x against the prior term.
    """
    n = mask.shape[0]
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    m = mask.expand_as(err[:n])
    loss = ((err[:n] * m).sum((1, 2, 3)) / m.sum((1, 2, 3))).mean()
    if err.shape[0] > n:
        loss = loss + prior_loss_weight * err[n:].mean()
    return loss


def learning_rate(base_lr: float, batch: int, world_size: int, accumulation: int, prior: bool, scale: bool) -> float:
    """The reference's `--scale_lr`: lr x batch x processes x accumulation, x2 with prior preservation."""
    if not scale:
        return base_lr
    return base_lr * batch * world_size * accumulation * (2.0 if prior else 1.0)


MICRO_BATCH = 2  # target images per process at once when the spec leaves it to the trainer (memory)


def batch_plan(effective: int, world_size: int, batch: int | None, accumulation: int | None) -> tuple[int, int]:
    """(target images per process and micro-batch, micro-batches per optimizer step) for `world_size`
    processes: what the spec sets, the rest chosen so that an optimizer step sees `effective` target images
    (the next multiple of the process count when it does not divide)."""
    per_process = -(-effective // world_size)
    if batch is None:
        batch = min(MICRO_BATCH, per_process) if accumulation is None else -(-per_process // accumulation)
    if accumulation is None:
        accumulation = -(-per_process // batch)
    return batch, accumulation


@dataclass
class TrainState:
    """Everything a step needs. `model` is the DDP wrapper when there are several processes."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: BatchMaker
    noise_scheduler: object
    ctx: DistContext
    precision: str
    accumulation: int
    max_grad_norm: float
    prior_loss_weight: float

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise FailedPrecondition(f"the base's scheduler predicts {kind!r}; only 'epsilon' and 'v_prediction' train")


def make_optimizer(params: dict[str, nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trained parameters in name order (the checkpoint relies on the order)."""
    return torch.optim.AdamW([params[k] for k in sorted(params)], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=weight_decay, fused=device.type == "cuda")


def wrap_distributed(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over the trained parameters (frozen ones take no part in the gradient all-reduce)."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def train_step(state: TrainState, step: int) -> float:
    """One optimizer step (`accumulation` micro-batches); returns the loss averaged over micro-batches and ranks."""
    total = torch.zeros((), device=state.ctx.device)
    for micro in range(state.accumulation):
        batch = state.batches.make(step * state.accumulation + micro)
        last = micro == state.accumulation - 1
        sync = contextlib.nullcontext() if last or not state.ctx.distributed else state.model.no_sync()
        with sync:
            noisy = state.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
            with autocast(state.ctx.device, state.precision):
                pred = state.model(noisy, batch.timesteps, batch.instance_ids, batch.class_states, batch.class_pooled,
                                   batch.time_ids)
            target = state.target(batch.latents, batch.noise, batch.timesteps)
            loss = diffusion_loss(pred, target, batch.mask, state.prior_loss_weight) / state.accumulation
            state.scaler.scale(loss).backward()
        total += loss.detach()
    state.scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(list(state.params.values()), state.max_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return state.ctx.mean(total)
