"""Token features the merge constrains (C) and regularizes on (C_reg), from a base text encoder.

Which positions count follows the reference (adobe-research/custom-diffusion, src/composenW.py and
src/diffusers_composenW.py): the text encoder's last hidden state of every token after the start token
up to and including the end token. For a concept's target captions ``<newi> <class>`` and
``photo of a <newi> <class>`` the rows start at the modifier token (the reference's ``[:, 1:]`` and
``[:, 4:]``), so each caption gives the rows of ``<newi>``, the class word's tokens and the end token.
Padding after the end token is never used: the encoder's causal mask makes every row independent of it.

With two text encoders (SDXL) a row is what the UNet's cross-attention sees there: both encoders'
penultimate hidden states concatenated (`StableDiffusionXLPipeline.encode_prompt`), each concept's
tokens installed in both with their own rows.

Optionally (`context_captions`) a concept also gets regularization captions that name its class word,
with its token put before the word: the concept's rows in the contexts users prompt it in, not only
after ``photo of a``. That matters where the text features are narrow (64 wide on the toy world's base,
docs/toyworld.md): there the reference's two captions pin the concept's rows and leave every other
context to the regularization term, which pulls it back to the base.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from importlib import resources

import torch
from torch import nn

from concepts.apply import add_tokens
from concepts.artifact import Concept

TARGET_PREFIX = "photo of a"
_BATCH = 64


def default_captions() -> list[str]:
    """The shipped regularization captions (merger/data/regularization_captions.txt), one per line."""
    text = resources.files("merger.data").joinpath("regularization_captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def target_captions(token: str, class_word: str) -> tuple[str, str]:
    """The two captions whose features a concept's merge constraints use."""
    phrase = f"{token} {class_word}".strip()
    return phrase, f"{TARGET_PREFIX} {phrase}"


def context_captions(captions: Iterable[str], token: str, class_word: str, limit: int) -> list[str]:
    """The first `limit` of `captions` that name `class_word` (as a whole word), with `token` put before
    its first mention: ``a ring on a navy background`` -> ``a <new1> ring on a navy background``."""
    if limit <= 0 or not class_word:
        return []
    pattern = re.compile(rf"(?<![\w<]){re.escape(class_word)}(?!\w)")
    out = []
    for caption in captions:
        match = pattern.search(caption)
        if match:
            out.append(f"{caption[:match.start()]}{token} {caption[match.start():]}")
            if len(out) == limit:
                break
    return out


def _copy_sharing_weights(tokenizer, text_encoder: nn.Module) -> tuple:
    """A copy of the pair whose encoder shares every weight with `text_encoder` but the token embeddings,
    which `add_tokens` grows: it costs the embedding table (SDXL's second encoder: 253 MB, not 2.6 GB)."""
    table = text_encoder.get_input_embeddings().weight
    shared = {id(t): t for t in (*text_encoder.parameters(), *text_encoder.buffers()) if t is not table}
    return copy.deepcopy(tokenizer), copy.deepcopy(text_encoder, shared)


def _pairs(tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module | None) -> list[tuple]:
    return [(tokenizer, text_encoder)] + ([(tokenizer_2, text_encoder_2)] if text_encoder_2 is not None else [])


def _encoder_rows(tokenizer, text_encoder: nn.Module, captions: list[str], first_tokens: list[str | None],
                  penultimate: bool) -> list[torch.Tensor]:
    """One encoder's rows of each caption, from its first position to its end token."""
    batch = tokenizer(captions, padding="longest", truncation=True, max_length=tokenizer.model_max_length,
                      return_tensors="pt")
    device = next(text_encoder.parameters()).device
    out = text_encoder(input_ids=batch.input_ids.to(device), output_hidden_states=penultimate)
    hidden = (out.hidden_states[-2] if penultimate else out[0]).to("cpu", torch.float64)
    rows = []
    for i, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        ids = batch.input_ids[i, :length].tolist()
        first = first_tokens[i]
        start = ids.index(tokenizer.convert_tokens_to_ids(first)) if first is not None else 1
        rows.append(hidden[i, start:length])
    return rows


def encode_rows(tokenizer, text_encoder: nn.Module, captions: list[str], first_tokens: list[str | None],
                tokenizer_2=None, text_encoder_2: nn.Module | None = None) -> torch.Tensor:
    """Rows of each caption, from its first position to its end token, stacked: one encoder's last
    hidden state, or with a second encoder (SDXL) both encoders' penultimate states concatenated.

    Args:
        tokenizer: a CLIP tokenizer.
        text_encoder: the matching CLIPTextModel.
        captions: the texts.
        first_tokens: per caption, the token whose first occurrence starts its rows, or None to start
            right after the start token.
        tokenizer_2, text_encoder_2: SDXL's second pair, or None.

    Returns:
        [rows, hidden] float64 (hidden: the widths summed with two encoders).
    """
    return _rows(_pairs(tokenizer, text_encoder, tokenizer_2, text_encoder_2), captions, first_tokens)


@torch.no_grad()
def _rows(pairs: list[tuple], captions: list[str], first_tokens: list[str | None]) -> torch.Tensor:
    """`encode_rows` with the (tokenizer, text encoder) pairs given."""
    rows = []
    for at in range(0, len(captions), _BATCH):
        chunk, firsts = captions[at : at + _BATCH], first_tokens[at : at + _BATCH]
        per_encoder = [_encoder_rows(tok, enc, chunk, firsts, len(pairs) > 1) for tok, enc in pairs]
        rows.extend(torch.cat(parts, dim=-1) for parts in zip(*per_encoder))
    return torch.cat(rows)


def regularization_features(tokenizer, text_encoder: nn.Module, captions: list[str], tokenizer_2=None,
                            text_encoder_2: nn.Module | None = None) -> torch.Tensor:
    """C_reg: rows of every caption after its start token, [rows, hidden] float64 (`encode_rows`)."""
    return encode_rows(tokenizer, text_encoder, captions, [None] * len(captions), tokenizer_2, text_encoder_2)


def concept_features(tokenizer, text_encoder: nn.Module, concepts: list[Concept], contexts: Sequence[str] = (),
                     per_token: int = 0, tokenizer_2=None,
                     text_encoder_2: nn.Module | None = None) -> list[torch.Tensor]:
    """C_i of each concept: its target captions' rows (`encode_rows`) from the encoders with its token
    embeddings installed (each encoder its own rows: `Concept.token_rows`).

    With `per_token` > 0, each token's captions also include `context_captions(contexts, token, class
    word, per_token)`.

    The tokenizers and encoders are copied (sharing every weight but the token embeddings), never
    changed. Token strings must be distinct across
    `concepts` (rename clashes first); every concept's tokens are installed into one copy, which gives
    the same rows as one copy per concept because a caption only holds its own concept's tokens.

    Returns:
        per concept, [m_i, hidden] float64, m_i = rows of its 2 * len(tokens) captions.
    """
    pairs = [_copy_sharing_weights(*pair) for pair in _pairs(tokenizer, text_encoder, tokenizer_2, text_encoder_2)]
    for concept in concepts:
        for (tok, enc), rows in zip(pairs, concept.token_rows, strict=True):
            add_tokens(tok, enc, concept.tokens, rows)
    features = []
    for concept in concepts:
        class_words = concept.class_words or ("",) * len(concept.tokens)
        captions, first_tokens = [], []
        for token, class_word in zip(concept.tokens, class_words):
            mine = [*target_captions(token, class_word), *context_captions(contexts, token, class_word, per_token)]
            captions.extend(mine)
            first_tokens.extend([token] * len(mine))
        features.append(_rows(pairs, captions, first_tokens))
    return features
