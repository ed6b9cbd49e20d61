"""Token features the merge constrains (C) and regularizes on (C_reg), from a base text encoder.

Which positions count follows the reference (adobe-research/custom-diffusion, src/composenW.py and
src/diffusers_composenW.py): the text encoder's last hidden state of every token after the start token
up to and including the end token. For a concept's target captions ``<newi> <class>`` and
``photo of a <newi> <class>`` the rows start at the modifier token (the reference's ``[:, 1:]`` and
``[:, 4:]``), so each caption gives the rows of ``<newi>``, the class word's tokens and the end token.
Padding after the end token is never used: the encoder's causal mask makes every row independent of it.

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


@torch.no_grad()
def encode_rows(tokenizer, text_encoder: nn.Module, captions: list[str],
                first_ids: list[int | None]) -> torch.Tensor:
    """Last-hidden-state rows of each caption, from its first position to its end token, stacked.

    Args:
        tokenizer: a CLIP tokenizer.
        text_encoder: the matching CLIPTextModel.
        captions: the texts.
        first_ids: per caption, the token id whose first occurrence starts its rows, or None to start
            right after the start token.

    Returns:
        [rows, hidden] float64.
    """
    rows = []
    for at in range(0, len(captions), _BATCH):
        batch = tokenizer(captions[at : at + _BATCH], padding="longest", truncation=True,
                          max_length=tokenizer.model_max_length, return_tensors="pt")
        device = next(text_encoder.parameters()).device
        hidden = text_encoder(input_ids=batch.input_ids.to(device))[0].to("cpu", torch.float64)
        for i, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
            ids = batch.input_ids[i, :length].tolist()
            first_id = first_ids[at + i]
            start = ids.index(first_id) if first_id is not None else 1
            rows.append(hidden[i, start:length])
    return torch.cat(rows)


def regularization_features(tokenizer, text_encoder: nn.Module, captions: list[str]) -> torch.Tensor:
    """C_reg: rows of every caption after its start token, [rows, hidden] float64."""
    return encode_rows(tokenizer, text_encoder, captions, [None] * len(captions))


def concept_features(tokenizer, text_encoder: nn.Module, concepts: list[Concept], contexts: Sequence[str] = (),
                     per_token: int = 0) -> list[torch.Tensor]:
    """C_i of each concept: its target captions' rows from the encoder with its token embeddings installed.

    With `per_token` > 0, each token's captions also include `context_captions(contexts, token, class
    word, per_token)`.

    The tokenizer and encoder are copied, never changed. Token strings must be distinct across
    `concepts` (rename clashes first); every concept's tokens are installed into one copy, which gives
    the same rows as one copy per concept because a caption only holds its own concept's tokens.

    Returns:
        per concept, [m_i, hidden] float64, m_i = rows of its 2 * len(tokens) captions.
    """
    tokenizer = copy.deepcopy(tokenizer)
    text_encoder = copy.deepcopy(text_encoder)
    for concept in concepts:
        add_tokens(tokenizer, text_encoder, concept.tokens, concept.embeddings)
    features = []
    for concept in concepts:
        class_words = concept.class_words or ("",) * len(concept.tokens)
        captions, first_ids = [], []
        for token, class_word in zip(concept.tokens, class_words):
            mine = [*target_captions(token, class_word), *context_captions(contexts, token, class_word, per_token)]
            captions.extend(mine)
            first_ids.extend([tokenizer.convert_tokens_to_ids(token)] * len(mine))
        features.append(encode_rows(tokenizer, text_encoder, captions, first_ids))
    return features
