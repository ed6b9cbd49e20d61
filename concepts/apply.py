"""Install a concept into plain diffusers modules: deltas added to the weights, tokens added to the vocab.

This is the reference semantics of a concept (DESIGN.md, "Parity is the contract"); the serving engine
must produce the same images without touching the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from concepts.artifact import Concept, LinearDelta
from concepts.base import KV_SUFFIXES, base_fingerprint
from concepts.errors import BaseMismatch, InvalidArgument


def check_base(concept: Concept, fingerprint: str, what: str = "concept") -> None:
    """Raise `BaseMismatch` naming both fingerprints when the concept was made for another base."""
    if concept.base_fingerprint != fingerprint:
        raise BaseMismatch(what, expected=fingerprint, actual=concept.base_fingerprint)


def add_tokens(tokenizer, text_encoder: nn.Module, tokens: tuple[str, ...], embeddings: torch.Tensor) -> list[int]:
    """Add each token to the tokenizer and set its embedding row; return the token ids.

    Raises:
        InvalidArgument: a token already exists in the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    clashes = [t for t in tokens if t in vocab]
    if clashes:
        raise InvalidArgument("tokens", f"modifier token(s) {clashes} already exist in the tokenizer's vocabulary")
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = embeddings.to(weight.device, weight.dtype)  # rows may come from the CPU (the store's)
    return ids


def apply_concepts(unet: nn.Module, text_encoder: nn.Module, tokenizer, concepts: list[Concept],
                   weights: Sequence[float] | None = None, text_encoder_2: nn.Module | None = None,
                   tokenizer_2=None) -> None:
    """Add each concept's deltas into `unet` in place and its tokens into `tokenizer`/`text_encoder`
    (and its second rows into `tokenizer_2`/`text_encoder_2`, SDXL's second pair).

    Args:
        weights: per concept, the factor on its deltas (``W0 + w Δ``; a request's concept weight);
            the token embeddings are added unscaled. None is 1 for every concept.

    Raises:
        BaseMismatch: a concept was made for another base than the modules' (checked before any change).
    """
    weights = [1.0] * len(concepts) if weights is None else list(weights)
    if len(weights) != len(concepts):
        raise InvalidArgument("weights", f"one weight per concept ({len(concepts)}), got {len(weights)}")
    fingerprint = base_fingerprint(unet, tokenizer)
    for i, concept in enumerate(concepts):
        check_base(concept, fingerprint, what=f"concepts[{i}]")
    modules = dict(unet.named_modules())
    for concept, scale in zip(concepts, weights):
        missing = [name for name in concept.deltas if name not in modules]
        if missing:
            raise InvalidArgument("concept", f"deltas name layers this UNet does not have: {missing[:3]}")
        with torch.no_grad():
            for name, delta in concept.deltas.items():
                weight = modules[name].weight
                weight += (scale * delta.to_dense(torch.float32)).to(weight.device, weight.dtype)
        add_tokens(tokenizer, text_encoder, concept.tokens, concept.embeddings)
        if text_encoder_2 is not None:
            if concept.embeddings_2 is None:
                raise InvalidArgument("concept", "the base has two text encoders; the concept has rows for one")
            add_tokens(tokenizer_2, text_encoder_2, concept.tokens, concept.embeddings_2)


def extract_deltas(
    tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], suffixes: tuple[str, ...] = KV_SUFFIXES
) -> dict[str, LinearDelta]:
    """Dense deltas ``tuned - base`` for every ``<module>.weight`` whose module path ends with `suffixes`.

    Args:
        tuned: state dict of the fine-tuned UNet (or just its cross-attention weights).
        base: state dict of the base UNet.
    """
    deltas = {}
    for key, weight in tuned.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module.endswith(suffixes):
            deltas[module] = LinearDelta(dense=(weight.float() - base[key].float()).contiguous())
    return deltas
