"""Prompt encoding where each prompt's modifier tokens resolve to its own concepts' embeddings.

diffusers learns a concept's token by adding it to the tokenizer and the text encoder's embedding
table. One shared vocabulary cannot serve two tenants who both own ``<new1>``, nor keep a third
request's literal ``<new1>`` (no concept) from matching either. So the shared tokenizer and weights
stay untouched: each prompt is split on *its* concepts' token strings the way the tokenizer splits
on added tokens (case-insensitively, since CLIP's added tokens are normalized, longest match first),
the pieces between are tokenized normally, and each modifier token's position gets its embedding
row from a forward hook on the token-embedding layer, exactly where an added token's row would be.

With two text encoders (SDXL) the prompt is tokenized by each tokenizer and each encoder gets its
own row of the token; the conditioning is what `StableDiffusionXLPipeline.encode_prompt` builds:
every encoder's penultimate hidden states concatenated, and the last encoder's pooled, projected
output (``text_embeds``), pooled at the end token (`concepts.conditioning`). With ``force_zeros_for_empty_prompt`` (SDXL's default) an empty negative
prompt is all zeros, as the pipeline makes it when given none.
"""

from __future__ import annotations

import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from concepts.conditioning import pooled_at_end
from concepts.errors import InvalidArgument

# (mask [rows, tokens] bool, rows [rows, tokens, hidden]) for the text encoder call in progress.
_OVERRIDE: ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = ContextVar("customdiff_tokens", default=None)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as token ids padded to the tokenizer's length, and the modifier-token embeddings, per
    text encoder.

    Args:
        ids: per text encoder, [max_length] ids; a modifier token's position holds a placeholder id.
        overrides: per text encoder, position -> [hidden] embedding of the modifier token there.
        zero: the conditioning is all zeros (an empty negative prompt with force_zeros_for_empty_prompt).
    """

    ids: tuple[tuple[int, ...], ...]
    overrides: tuple[dict[int, torch.Tensor], ...]
    zero: bool = False


@dataclass(frozen=True)
class TextConditioning:
    """What the UNet is conditioned on: `states` [rows, tokens, hidden] (its cross-attention input) and,
    with a pooled text input (SDXL's ``text_embeds``), `pooled` [rows, pooled width]."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def index_select(self, rows: torch.Tensor) -> TextConditioning:
        """The rows `rows` [n] of both."""
        pooled = None if self.pooled is None else self.pooled.index_select(0, rows)
        return TextConditioning(self.states.index_select(0, rows), pooled)

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.states for p in parts]), pooled)


class PromptEncoder:
    """Tokenizes with per-prompt modifier tokens and runs the (shared, unmodified) CLIP text encoders.

    Thread-safe: tokenizer calls are serialized by a lock (a fast tokenizer's settings are
    mutable state); the embedding overrides live in a ContextVar per encoder call.

    Args:
        pairs: (tokenizer, text encoder) per text encoder (`BaseModel.text_pairs`); with more than
            one, the SDXL conditioning of the module doc.
        zero_empty_negative: an empty negative prompt conditions on zeros (SDXL's
            ``force_zeros_for_empty_prompt``).
    """

    def __init__(self, pairs: list[tuple[object, nn.Module]], zero_empty_negative: bool = False) -> None:
        self.pairs = pairs
        self.zero_empty_negative = zero_empty_negative
        self._lock = threading.Lock()
        for _, text_encoder in pairs:
            text_encoder.get_input_embeddings().register_forward_hook(_override_rows)

    def tokenize(self, text: str, embeddings: dict[str, tuple[torch.Tensor, ...]], field: str) -> TokenizedPrompt:
        """Token ids of `text` with each token string of `embeddings` as one modifier token.

        Args:
            embeddings: modifier-token string -> its [hidden] embedding per text encoder, this
                prompt's concepts' only.
            field: the request field `text` came from, for errors.

        Raises:
            InvalidArgument: the text needs more tokens than the tokenizer's maximum length.
        """
        if self.zero_empty_negative and field == "negative_prompt" and not text:
            return TokenizedPrompt((), (), zero=True)
        by_lower = {token.lower(): rows for token, rows in embeddings.items()}
        pieces: list[str | tuple[torch.Tensor, ...]] = [text]
        if by_lower:
            pattern = "|".join(re.escape(t) for t in sorted(by_lower, key=len, reverse=True))
            pieces = [by_lower[p.lower()] if i % 2 else p
                      for i, p in enumerate(re.split(f"({pattern})", text, flags=re.IGNORECASE))]
        all_ids, all_overrides = [], []
        for encoder, (tokenizer, _) in enumerate(self.pairs):
            ids: list[int] = []
            overrides: dict[int, torch.Tensor] = {}
            with self._lock:
                for piece in pieces:
                    if isinstance(piece, tuple):
                        overrides[len(ids) + 1] = piece[encoder]  # + 1: the start token comes first
                        ids.append(tokenizer.bos_token_id)  # any id but the end token's: its row is replaced
                    elif piece:
                        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False).input_ids)
            max_length = int(tokenizer.model_max_length)
            if len(ids) > max_length - 2:
                raise InvalidArgument(field, f"{len(ids)} tokens, more than the {max_length - 2} the text encoder "
                                             f"takes (text starts {text[:60]!r})")
            full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
            all_ids.append(tuple(full + [tokenizer.pad_token_id] * (max_length - len(full))))
            all_overrides.append(overrides)
        return TokenizedPrompt(tuple(all_ids), tuple(all_overrides))

    def encode(self, prompts: list[TokenizedPrompt]) -> TextConditioning:
        """The UNet's text conditioning of each prompt: one text encoder's last hidden state
        [len(prompts), max_length, hidden], or SDXL's (module doc)."""
        encoded = [p for p in prompts if not p.zero]
        sdxl = len(self.pairs) > 1
        states, pooled = [], None
        for encoder, (_, text_encoder) in enumerate(self.pairs):
            if not encoded:
                break
            device = text_encoder.device
            ids = torch.tensor([p.ids[encoder] for p in encoded], device=device)
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            hidden = text_encoder.get_input_embeddings().weight.shape[1]
            rows = torch.zeros((*ids.shape, hidden), dtype=text_encoder.dtype, device=device)
            for i, prompt in enumerate(encoded):
                for position, embedding in prompt.overrides[encoder].items():
                    mask[i, position] = True
                    rows[i, position] = embedding
            token = _OVERRIDE.set((mask, rows) if mask.any() else None)
            try:
                if sdxl:
                    out = text_encoder(ids, output_hidden_states=True)
                    states.append(out.hidden_states[-2])
                    if encoder == len(self.pairs) - 1:  # the last encoder's pooled projection is text_embeds
                        eos = self.pairs[encoder][0].eos_token_id
                        pooled = pooled_at_end(text_encoder, out.last_hidden_state, ids, eos)
                else:
                    states.append(text_encoder(ids)[0])
            finally:
                _OVERRIDE.reset(token)
        if len(encoded) == len(prompts):
            return TextConditioning(torch.cat(states, -1), pooled)
        return self._with_zeros(prompts, TextConditioning(torch.cat(states, -1), pooled) if encoded else None)

    def _with_zeros(self, prompts: list[TokenizedPrompt], encoded: TextConditioning | None) -> TextConditioning:
        """`encoded` (the non-zero prompts' rows, in order) with zero rows where `prompts` are zero."""
        _, last = self.pairs[-1]
        width = sum(enc.get_input_embeddings().weight.shape[1] for _, enc in self.pairs)
        length = int(self.pairs[0][0].model_max_length)
        states = torch.zeros((len(prompts), length, width), dtype=last.dtype, device=last.device)
        pooled = torch.zeros((len(prompts), last.config.projection_dim), dtype=last.dtype, device=last.device)
        where = torch.tensor([i for i, p in enumerate(prompts) if not p.zero], device=last.device, dtype=torch.long)
        if encoded is not None:
            states[where] = encoded.states.to(states.dtype)
            pooled[where] = encoded.pooled.to(pooled.dtype)
        return TextConditioning(states, pooled)


def _override_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the token-embedding layer: modifier-token positions get their concept's row."""
    override = _OVERRIDE.get()
    if override is None:
        return output
    mask, rows = override
    return torch.where(mask.unsqueeze(-1), rows, output)
