"""Modifier tokens: added to the tokenizer, initialized from a word, trained as their own parameter.

The reference trains the whole embedding matrix and zeroes the gradient of the other rows, which
(1) misses the last token when there are several (an off-by-one in its mask) and (2) still moves
every row through AdamW's weight decay. Here only the new rows are a parameter (`TokenRows`); the
frozen embedding's output is patched at the positions of the new tokens, so every other row stays
bit-identical by construction and the optimizer never sees the 49k-row matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from concepts.errors import InvalidArgument


def in_vocabulary(tokenizer, token: str) -> bool:
    """Whether `token` is already a word of the tokenizer. CLIP lower-cases text and stores word-final
    pieces as ``word</w>``, so "Dog" is taken by ``dog</w>``; adding it would hijack the word."""
    vocab = tokenizer.get_vocab()
    return any(t in vocab for t in (token, token.lower(), f"{token.lower()}</w>"))


def add_modifier_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str],
                        initializers: list[str]) -> tuple[list[int], torch.Tensor]:
    """Add `tokens` to the vocabulary and give each the embedding of its initializer word.

    Returns:
        The new token ids and their initial rows, [len(tokens), hidden] float32.

    Raises:
        InvalidArgument: a token already exists, or an initializer is not exactly one token.
    """
    initializer_ids = []
    for i, (token, word) in enumerate(zip(tokens, initializers)):
        if in_vocabulary(tokenizer, token):
            raise InvalidArgument(f"concepts[{i}].modifier_token",
                                  f"{token!r} already exists in the tokenizer's vocabulary")
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidArgument(f"concepts[{i}].initializer_token", f"{word!r} is {len(ids)} tokens; it must be one")
        initializer_ids.append(ids[0])
    tokenizer.add_tokens(list(tokens))
    token_ids = tokenizer.convert_tokens_to_ids(list(tokens))
    rows_now = text_encoder.get_input_embeddings().weight.shape[0]
    if max(token_ids) >= rows_now:  # an embedding padded beyond the vocabulary may already have the rows
        text_encoder.resize_token_embeddings(max(token_ids) + 1, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    rows = weight.detach()[initializer_ids].float().clone()
    with torch.no_grad():
        weight[token_ids] = rows.to(weight.dtype)
    return token_ids, rows


class TokenRows(nn.Module):
    """The trainable embeddings of the modifier tokens, spliced into a frozen `nn.Embedding`'s output.

    Args:
        embedding: the text encoder's token embedding; a forward hook replaces its output rows at
            the positions of `token_ids` with `rows` (so gradients reach only `rows`).
        token_ids: vocabulary ids of the modifier tokens.
        rows: [len(token_ids), hidden] initial embeddings; kept in float32 whatever the model dtype.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: list[int], rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = nn.Parameter(rows.float().clone())
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self._embedding = [embedding]  # a list, so the frozen embedding is not a submodule of this one
        self._hook = embedding.register_forward_hook(self._splice)

    def _splice(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]  # [B, L]
        onehot = (input_ids[..., None] == self.token_ids).to(self.rows.dtype)  # [B, L, n]
        hit = onehot.sum(-1, keepdim=True) > 0
        return torch.where(hit, (onehot @ self.rows).to(output.dtype), output)

    def detach_from_embedding(self) -> None:
        """Remove the hook and write the learned rows into the embedding matrix."""
        self._hook.remove()
        weight = self._embedding[0].weight
        with torch.no_grad():
            weight[self.token_ids] = self.rows.detach().to(weight.dtype)
