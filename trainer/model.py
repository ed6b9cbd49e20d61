"""What trains and how it runs: trainable cross-attention weights in float32, the rest frozen in the
compute dtype, K/V of the start token detached, SDPA attention, optional gradient checkpointing.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from concepts.base import CROSSATTN_SUFFIXES, KV_SUFFIXES, BaseModel, kv_layers
from trainer.tokens import TokenRows

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKEN_PARAM = "token_rows"


def trainable_suffixes(train_mode: str) -> tuple[str, ...]:
    """Module-path suffixes of the trained linear layers: K/V only, or all of attn2."""
    return KV_SUFFIXES if train_mode == "crossattn_kv" else CROSSATTN_SUFFIXES


def autocast(device: torch.device, precision: str):
    """Autocast to the mixed-precision dtype, or nothing for "no"."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def _detach_start_token(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """As in the reference: K and V of position 0 (the start token, identical in every prompt) get no gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


class CustomDiffusionModel(nn.Module):
    """The module DDP wraps: text encoder (with the token rows spliced in) and UNet in one forward."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, token_rows: TokenRows) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.token_rows = token_rows

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, instance_ids: torch.Tensor,
                class_states: torch.Tensor | None) -> torch.Tensor:
        """Predict the noise (or velocity) of instance examples followed by class examples.

        Args:
            noisy_latents: [B + C, 4, h, w], the B instance examples first.
            timesteps: [B + C] long.
            instance_ids: [B, L] token ids of the instance captions (they hold modifier tokens).
            class_states: [C, L, hidden] precomputed text-encoder output of the class captions, or None.

        Returns:
            [B + C, 4, h, w] the UNet's prediction.
        """
        states = self.text_encoder(instance_ids)[0]
        if class_states is not None:
            states = torch.cat([states, class_states.to(states.dtype)])
        return self.unet(noisy_latents, timesteps, states).sample


def prepare_model(
    base: BaseModel, token_rows: TokenRows, train_mode: str, precision: str, device: torch.device,
    gradient_checkpointing: bool,
) -> tuple[CustomDiffusionModel, dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """Freeze and cast the base, make the trained weights float32 parameters, install the hooks.

    Frozen UNet and text-encoder weights take the compute dtype (bf16/fp16 halve their memory);
    trained weights stay float32 masters that autocast casts on use, so small AdamW updates are not
    rounded away (and fp16 gradients can be unscaled). The VAE stays float32: it encodes once per job.

    Returns:
        The model; the trained parameters by name (``<module path>.weight`` and ``token_rows``); the
        original float32 weights by module path, for the deltas.
    """
    dtype = PRECISION_DTYPES[precision]
    layers = kv_layers(base.unet, trainable_suffixes(train_mode))
    originals = {name: layer.weight.detach().float().cpu().clone() for name, layer in sorted(layers.items())}
    for module in (base.unet, base.text_encoder, base.vae):
        module.requires_grad_(False)
    for module in (base.unet, base.text_encoder):
        module.to(device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, so cast only when needed
            module.to(dtype)
    base.vae.to(device)
    params: dict[str, nn.Parameter] = {}
    for name, layer in sorted(layers.items()):
        layer.weight = nn.Parameter(originals[name].to(device, copy=True))  # originals must not train
        params[f"{name}.weight"] = layer.weight
    for name, layer in kv_layers(base.unet, KV_SUFFIXES).items():
        layer.register_forward_hook(_detach_start_token)
    base.unet.set_attn_processor(AttnProcessor2_0())
    if gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout
    token_rows.to(device)
    params[TOKEN_PARAM] = token_rows.rows
    return CustomDiffusionModel(base.unet, base.text_encoder, token_rows), params, originals
