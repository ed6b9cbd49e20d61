"""What trains and how it runs: trainable cross-attention weights in float32, the rest frozen in the
compute dtype, K/V of the start token detached, SDPA attention, optional gradient checkpointing.

With two text encoders (SDXL) both get the modifier tokens and the UNet is conditioned as
`StableDiffusionXLPipeline.encode_prompt` conditions it: both encoders' penultimate hidden states
concatenated, plus the last encoder's pooled projection (``text_embeds``) and each example's size and
crop ``time_ids`` as the UNet's added conditions.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from concepts.base import KV_SUFFIXES, BaseModel, kv_layers
from concepts.conditioning import pooled_at_end
from trainer.tokens import TokenRows

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKEN_PARAM = "token_rows"
TOKEN_PARAM_2 = "token_rows_2"  # the second text encoder's rows (SDXL)


def autocast(device: torch.device, precision: str):
    """Autocast to the mixed-precision dtype, or nothing for "no"."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def _detach_start_token(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """As in the reference: K and V of position 0 (the start token, identical in every prompt) get no gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def encode_text(text_encoders: list[nn.Module], ids: torch.Tensor, eos_token_id: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text conditioning of token ids.

    Args:
        text_encoders: the base's text encoders (`BaseModel.text_pairs` order).
        ids: [N, E, L] token ids per text encoder.
        eos_token_id: with two encoders, the last tokenizer's end token, where the pooled text is
            taken (`concepts.conditioning.pooled_at_end`, as the engine takes it).

    Returns:
        One encoder's last hidden state [N, L, hidden] and None; with two, their penultimate hidden
        states concatenated [N, L, hidden_1 + hidden_2] and the last one's pooled projection [N, pooled].
    """
    if len(text_encoders) == 1:
        return text_encoders[0](ids[:, 0])[0], None
    states, pooled = [], None
    for i, text_encoder in enumerate(text_encoders):
        out = text_encoder(ids[:, i], output_hidden_states=True)
        states.append(out.hidden_states[-2])
    pooled = pooled_at_end(text_encoders[-1], out.last_hidden_state, ids[:, -1], eos_token_id)
    return torch.cat(states, dim=-1), pooled


class CustomDiffusionModel(nn.Module):
    """The module DDP wraps: the text encoders (with the token rows spliced in) and the UNet in one forward."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, token_rows: TokenRows,
                 text_encoder_2: nn.Module | None = None, token_rows_2: TokenRows | None = None,
                 eos_token_id: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.token_rows = token_rows
        self.text_encoder_2 = text_encoder_2
        self.token_rows_2 = token_rows_2
        self.text_time = unet.config.addition_embed_type == "text_time"
        self.eos_token_id = eos_token_id  # the last tokenizer's, with two encoders (`encode_text`)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, instance_ids: torch.Tensor,
                class_states: torch.Tensor | None, class_pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (or velocity) of instance examples followed by class examples.

        Args:
            noisy_latents: [B + C, 4, h, w], the B instance examples first.
            timesteps: [B + C] long.
            instance_ids: [B, E, L] token ids of the instance captions per text encoder (they hold
                modifier tokens).
            class_states: [C, L, hidden] precomputed `encode_text` states of the class captions, or None.
            class_pooled: [C, pooled] their pooled text (SDXL), else None.
            time_ids: [B + C, 6] size and crop conditioning; used when the UNet takes ``text_time``.

        Returns:
            [B + C, 4, h, w] the UNet's prediction.
        """
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        states, pooled = encode_text(encoders, instance_ids, self.eos_token_id)
        if class_states is not None:
            states = torch.cat([states, class_states.to(states.dtype)])
            if pooled is not None:
                pooled = torch.cat([pooled, class_pooled.to(pooled.dtype)])
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.text_time else None
        return self.unet(noisy_latents, timesteps, states, added_cond_kwargs=added).sample


def prepare_model(
    base: BaseModel, token_rows: TokenRows, precision: str, device: torch.device,
    gradient_checkpointing: bool, token_rows_2: TokenRows | None = None,
) -> tuple[CustomDiffusionModel, dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """Freeze and cast the base, make the trained weights float32 parameters, install the hooks.

    `token_rows_2` are the second text encoder's rows (SDXL), trained as ``token_rows_2``.

    Frozen UNet and text-encoder weights take the compute dtype (bf16/fp16 halve their memory);
    trained weights stay float32 masters that autocast casts on use, so small AdamW updates are not
    rounded away (and fp16 gradients can be unscaled). The VAE stays float32: it encodes once per job.

    Returns:
        The model; the trained parameters by name (``<module path>.weight``, ``token_rows`` and, with
        two text encoders, ``token_rows_2``); the original float32 weights by module path, for the deltas.
    """
    dtype = PRECISION_DTYPES[precision]
    layers = kv_layers(base.unet)
    originals = {name: layer.weight.detach().float().cpu().clone() for name, layer in sorted(layers.items())}
    encoders = [encoder for _, encoder in base.text_pairs]
    for module in (base.unet, *encoders, base.vae):
        module.requires_grad_(False)
    for module in (base.unet, *encoders):
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
    for name, rows in ((TOKEN_PARAM, token_rows), (TOKEN_PARAM_2, token_rows_2)):
        if rows is not None:
            rows.to(device)
            params[name] = rows.rows
    eos = base.tokenizer_2.eos_token_id if base.tokenizer_2 is not None else None
    model = CustomDiffusionModel(base.unet, base.text_encoder, token_rows, base.text_encoder_2, token_rows_2, eos)
    return model, params, originals
