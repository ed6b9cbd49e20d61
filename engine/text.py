"""Prompt encoding where each prompt's modifier tokens resolve to its own concepts' embeddings.

diffusers learns a concept's token by adding it to the tokenizer and the text encoder's embedding
table. One shared vocabulary cannot serve two tenants who both own ``<new1>``, nor keep a third
request's literal ``<new1>`` (no concept) from matching either. So the shared tokenizer and weights
stay untouched: each prompt is split on *its* concepts' token strings the way the tokenizer splits
on added tokens (case-insensitively, since CLIP's added tokens are normalized, longest match first),
the pieces between are tokenized normally, and each modifier token's position gets its embedding
row from a forward hook on the token-embedding layer, exactly where an added token's row would be.
"""

from __future__ import annotations

import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from concepts.errors import InvalidArgument

# (mask [rows, tokens] bool, rows [rows, tokens, hidden]) for the text encoder call in progress.
_OVERRIDE: ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = ContextVar("customdiff_tokens", default=None)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as token ids padded to the tokenizer's length, and the modifier-token embeddings.

    Args:
        ids: [max_length] ids; a modifier token's position holds a placeholder id.
        overrides: position -> [hidden] embedding of the modifier token there.
    """

    ids: tuple[int, ...]
    overrides: dict[int, torch.Tensor]


class PromptEncoder:
    """Tokenizes with per-prompt modifier tokens and runs the (shared, unmodified) CLIP text encoder.

    Thread-safe: tokenizer calls are serialized by a lock (a fast tokenizer's settings are
    mutable state); the embedding overrides live in a ContextVar per encoder call.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(tokenizer.model_max_length)
        self._lock = threading.Lock()
        text_encoder.get_input_embeddings().register_forward_hook(_override_rows)

    def tokenize(self, text: str, embeddings: dict[str, torch.Tensor], field: str) -> TokenizedPrompt:
        """Token ids of `text` with each token string of `embeddings` as one modifier token.

        Args:
            embeddings: modifier-token string -> [hidden] embedding, this prompt's concepts' only.
            field: the request field `text` came from, for errors.

        Raises:
            InvalidArgument: the text needs more tokens than the tokenizer's maximum length.
        """
        by_lower = {token.lower(): emb for token, emb in embeddings.items()}
        pieces: list[str | torch.Tensor] = [text]
        if by_lower:
            pattern = "|".join(re.escape(t) for t in sorted(by_lower, key=len, reverse=True))
            pieces = [by_lower[p.lower()] if i % 2 else p
                      for i, p in enumerate(re.split(f"({pattern})", text, flags=re.IGNORECASE))]
        ids: list[int] = []
        overrides: dict[int, torch.Tensor] = {}
        with self._lock:
            for piece in pieces:
                if isinstance(piece, torch.Tensor):
                    overrides[len(ids) + 1] = piece  # + 1: the start token comes first
                    ids.append(self.tokenizer.unk_token_id or 0)
                elif piece:
                    ids.extend(self.tokenizer(piece, add_special_tokens=False, verbose=False).input_ids)
        limit = self.max_length - 2
        if len(ids) > limit:
            raise InvalidArgument(field, f"{len(ids)} tokens, more than the {limit} the text encoder takes "
                                        f"(text starts {text[:60]!r})")
        full = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        full += [self.tokenizer.pad_token_id] * (self.max_length - len(full))
        return TokenizedPrompt(tuple(full), overrides)

    def encode(self, prompts: list[TokenizedPrompt]) -> torch.Tensor:
        """The text encoder's last hidden state, [len(prompts), max_length, hidden]."""
        device = self.text_encoder.device
        ids = torch.tensor([p.ids for p in prompts], device=device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        hidden = self.text_encoder.get_input_embeddings().weight.shape[1]
        rows = torch.zeros((*ids.shape, hidden), dtype=self.text_encoder.dtype, device=device)
        for i, prompt in enumerate(prompts):
            for position, embedding in prompt.overrides.items():
                mask[i, position] = True
                rows[i, position] = embedding
        token = _OVERRIDE.set((mask, rows) if any(p.overrides for p in prompts) else None)
        try:
            return self.text_encoder(ids)[0]
        finally:
            _OVERRIDE.reset(token)


def _override_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the token-embedding layer: modifier-token positions get their concept's row."""
    override = _OVERRIDE.get()
    if override is None:
        return output
    mask, rows = override
    return torch.where(mask.unsqueeze(-1), rows, output)
