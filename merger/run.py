"""Concepts in, concept and report out: the thin wrapper around `merger.merge` and `merger.compress`."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import threading
from pathlib import Path

import torch

from concepts.apply import check_base
from concepts.artifact import (
    Concept,
    LinearDelta,
    check_digest,
    concept_from_bytes,
    concept_to_bytes,
    digest_of,
)
from concepts.base import BaseModel, kv_layers
from concepts.errors import BaseMismatch, InvalidArgument
from concepts.store import ArtifactStore
from merger.compress import FeatureMetric, check_target, compress_delta_svd, compress_deltas
from merger.features import concept_features, default_captions, regularization_features
from merger.merge import DEFAULT_RIDGE, merge_closed_form, regularization_gram
from merger.report import CompressReport, MergeReport

# (R, its row count) of recent (base, captions): encoding 1000+ captions with SD's text encoder takes
# seconds on a CPU, and a service merges on one base with the shipped captions again and again.
_GRAM_CACHE: dict[tuple[str, str, str, str], tuple[torch.Tensor, int]] = {}
_GRAM_CACHE_SIZE = 4
_GRAM_LOCK = threading.Lock()


def merge_concepts(base: BaseModel, concepts: list[Concept], captions: list[str] | None = None,
                   ridge: float | None = None, context_captions: int = 0,
                   parents: list[str] | None = None) -> tuple[Concept, MergeReport]:
    """Merge two or more concepts of `base` into one dense concept holding every token.

    Args:
        base: the base model the concepts were made for.
        concepts: dense or low-rank concepts; each may hold several tokens (e.g. an earlier merge).
        captions: regularization captions; None uses the shipped set (`merger.features.default_captions`).
        ridge: relative ridge term of the solve (docs/merge.md); None uses `DEFAULT_RIDGE`.
        context_captions: per token, how many regularization captions naming its class word also
            constrain it, with the token inserted (`merger.features.context_captions`); 0 keeps the
            reference's two target captions only.
        parents: the concepts' digests when the caller knows them (the store's), for the provenance;
            None serializes each concept to digest it (an SDXL full-rank concept: 1.4 GB, twice over).

    Returns:
        The merged concept (float32 dense deltas; provenance kind "merge") and its report.

    Raises:
        InvalidArgument: fewer than 2 concepts, an empty caption set, a negative ridge or
            context_captions, a delta on a layer the base has no cross-attention K/V projection for, or
            token rows for another number of text encoders than the base has.
        BaseMismatch: a concept was made for another base, or two concepts for different bases.
    """
    # 1. Validate everything before any work.
    if len(concepts) < 2:
        raise InvalidArgument("concepts", f"a merge needs at least 2 concepts, got {len(concepts)}")
    if parents is not None and len(parents) != len(concepts):
        raise InvalidArgument("parents", f"{len(parents)} digests for {len(concepts)} concepts")
    ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
    if not ridge >= 0:
        raise InvalidArgument("ridge", f"must be >= 0, got {ridge!r}")
    if context_captions < 0:
        raise InvalidArgument("context_captions", f"must be >= 0, got {context_captions}")
    captions = _captions(captions)
    _check_bases(base, concepts)
    layers = kv_layers(base.unet)
    _check_concepts(base, concepts, layers)
    # 2. Resolve token clashes, then the features: C_i per concept and R = C_reg^T C_reg.
    renamed, renames = rename_clashing_tokens(concepts, set(base.tokenizer.get_vocab()))
    targets = concept_features(base.tokenizer, base.text_encoder, renamed, captions, context_captions,
                               base.tokenizer_2, base.text_encoder_2)
    reg_gram, _ = _regularization_gram(base, captions)
    # 3. The closed-form solve on every layer any concept touches.
    names = sorted(set().union(*(c.deltas for c in concepts)))
    merged, reports, summary = merge_closed_form(
        # The weights as they are and the deltas float32, not float64: the solve upcasts one layer at a
        # time, so 10 SD concepts stay ~0.8 GB (and SDXL's K/V are not copied: 2.5 GB in float64).
        {n: layers[n].weight.detach().cpu() for n in names},
        [{n: d.to_dense() for n, d in c.deltas.items()} for c in concepts],
        targets, reg_gram, ridge, dtype=torch.float32,  # what the artifact stores
    )
    summary["captions"] = float(len(captions))
    # 4. One concept with every (renamed) token, its deltas stored exactly as they are cheapest.
    result = Concept(
        deltas=_exact_deltas(merged, int(summary["constraints"] - summary["duplicate_rows"])),
        tokens=tuple(t for c in renamed for t in c.tokens),
        embeddings=torch.cat([c.embeddings.to(torch.float32) for c in renamed]),
        embeddings_2=(torch.cat([c.embeddings_2.to(torch.float32) for c in renamed])
                      if base.text_encoder_2 is not None else None),
        family=base.family,
        base_fingerprint=base.fingerprint,
        class_words=tuple(w for c in renamed for w in (c.class_words or ("",) * len(c.tokens))),
        provenance={"kind": "merge", "parents": parents or [digest_of(concept_to_bytes(c)) for c in concepts],
                    "ridge": ridge, "captions": len(captions), "context_captions": context_captions,
                    "renamed_tokens": renames},
    )
    return result, MergeReport(layers=tuple(reports), summary=summary, renamed_tokens=tuple(renames))


def _captions(captions: list[str] | None) -> list[str]:
    """The regularization captions: the shipped set for None, else the non-empty ones, stripped."""
    captions = default_captions() if captions is None else [c.strip() for c in captions if c.strip()]
    if not captions:
        raise InvalidArgument("regularization_captions", "needs at least one non-empty caption")
    return captions


def _regularization_gram(base: BaseModel, captions: list[str]) -> tuple[torch.Tensor, int]:
    """R = C_reg^T C_reg of `captions` on `base`, [hidden, hidden] float64, and the rows of C_reg, from
    the cache when there."""
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    key = (str(base.path), base.fingerprint, str(base.text_encoder.dtype), digest)
    with _GRAM_LOCK:
        if key in _GRAM_CACHE:
            return _GRAM_CACHE[key]
    features = regularization_features(base.tokenizer, base.text_encoder, captions, base.tokenizer_2,
                                       base.text_encoder_2)
    entry = regularization_gram(features), int(features.shape[0])
    with _GRAM_LOCK:
        if len(_GRAM_CACHE) >= _GRAM_CACHE_SIZE:
            _GRAM_CACHE.pop(next(iter(_GRAM_CACHE)))
        _GRAM_CACHE[key] = entry
    return entry


def concept_metric(base: BaseModel, concept: Concept, captions: list[str] | None = None) -> FeatureMetric:
    """The features `concept`'s K/V layers see, as `merge_concepts` takes them: its constraint rows C
    (its tokens' target captions, plus its provenance's ``context_captions`` per token) and the
    regularization rows C_reg of `captions` (None: the shipped set).

    The two blocks weigh the same in total, G = C^T C / rows(C) + C_reg^T C_reg / rows(C_reg):
    counted row by row, a few dozen constraint rows would vanish next to ~10^4 caption rows, and
    they are where the concept's outputs are (docs/merge.md, compression).

    Raises:
        InvalidArgument: an empty caption set, deltas on layers that are not the base's cross-attention
            K/V, or token rows for another number of text encoders than the base has.
        BaseMismatch: `concept` was made for another base.
    """
    captions = _captions(captions)
    check_base(concept, base.fingerprint, what="concept")
    _check_concepts(base, [concept], kv_layers(base.unet))
    reg_gram, reg_rows = _regularization_gram(base, captions)
    (rows,) = concept_features(base.tokenizer, base.text_encoder, [concept], captions,
                               int(concept.provenance.get("context_captions", 0)), base.tokenizer_2,
                               base.text_encoder_2)
    return FeatureMetric.from_gram(rows.T @ rows / rows.shape[0] + reg_gram / reg_rows)


def _check_bases(base: BaseModel, concepts: list[Concept]) -> None:
    """All inputs must share one base, and it must be `base`; the error names both fingerprints."""
    first = concepts[0].base_fingerprint
    for i, concept in enumerate(concepts[1:], start=1):
        if concept.base_fingerprint != first:
            raise BaseMismatch(f"concepts[{i}] (while concepts[0] was made for base fingerprint {first})",
                               expected=base.fingerprint, actual=concept.base_fingerprint)
    check_base(concepts[0], base.fingerprint, what="concepts[0]")


def _check_concepts(base: BaseModel, concepts: list[Concept], layers: dict[str, torch.nn.Linear]) -> None:
    """Every delta on a K/V layer of the base, token rows for each of its text encoders."""
    for i, concept in enumerate(concepts):
        unknown = sorted(set(concept.deltas) - set(layers))
        if unknown:
            raise InvalidArgument(f"concepts[{i}].deltas",
                                  f"not cross-attention K/V layers of the base: {unknown[:3]}")
        if len(concept.token_rows) != len(base.text_pairs):
            raise InvalidArgument(f"concepts[{i}]", f"has token rows for {len(concept.token_rows)} text "
                                  f"encoder(s); the base has {len(base.text_pairs)}")


def rename_clashing_tokens(concepts: list[Concept], reserved: set[str]) -> tuple[list[Concept], list[str]]:
    """Give every token that an earlier concept (or the vocabulary) already uses a fresh ``<newK>`` name.

    A fresh name is the lowest ``<newK>`` used by no input, no earlier rename and not in `reserved`.

    Returns:
        The concepts with renamed tokens (others unchanged) and the renames as ``"old -> new"``.
    """
    taken = set(reserved) | {t for c in concepts for t in c.tokens}
    numbers = itertools.count(1)
    seen: set[str] = set(reserved)
    out, renames = [], []
    for concept in concepts:
        tokens = []
        for token in concept.tokens:
            if token in seen:
                new = next(f"<new{k}>" for k in numbers if f"<new{k}>" not in taken)
                taken.add(new)
                renames.append(f"{token} -> {new}")
                token = new
            seen.add(token)
            tokens.append(token)
        unchanged = tuple(tokens) == concept.tokens
        out.append(concept if unchanged else dataclasses.replace(concept, tokens=tuple(tokens)))
    return out, renames


def _exact_deltas(merged: dict[str, torch.Tensor], rank: int) -> dict[str, LinearDelta]:
    """Merged deltas as float32 factors of rank `rank` where those are smaller than the dense matrix.

    A merged delta is E' P ([out, m] @ [m, in], `merge_closed_form`): its rank is at most the m kept
    constraint rows, so rank-m factors hold it exactly (to float32 rounding). A merge of 3 SD-1.5
    concepts has m = 18: 73 MB dense, about 3 MB factored (benchmarks/rehearsal.py).
    """
    deltas = {}
    for name, delta in merged.items():
        out_f, in_f = delta.shape
        if 0 < rank and rank * (out_f + in_f) < out_f * in_f:  # (so rank < min(out_f, in_f) too)
            up, down, _ = compress_delta_svd(delta, rank, None, None, torch.float32)
            deltas[name] = LinearDelta(up=up.contiguous(), down=down.contiguous())
        else:
            deltas[name] = LinearDelta(dense=delta.to(torch.float32).contiguous())
    return deltas


def compresses_by_features(concept: Concept) -> bool:
    """Whether callers with the base compress `concept` in the metric of its features: a merge, or a
    feature-weighted compression of one (docs/merge.md, compression)."""
    return concept.provenance.get("kind") == "merge" or concept.provenance.get("metric") == "features"


def compress_concept(concept: Concept, rank: int | None = None, fraction: float | None = None,
                     energy: float | None = None, dtype: torch.dtype = torch.float16,
                     base: BaseModel | None = None,
                     captions: list[str] | None = None) -> tuple[Concept, CompressReport]:
    """Replace every delta of `concept` by low-rank factors; see `merger.compress`.

    Args:
        rank, fraction, energy: exactly one target.
        dtype: of the factors.
        base: the concept's base; given, each layer keeps the rank-k delta closest in its outputs on
            the features it sees (`concept_metric`, `merger.compress.compress_delta_weighted`) and the
            target applies to that feature-weighted spectrum. None: plain truncated SVD.
        captions: with `base`, the regularization captions (None: the shipped set).

    Returns:
        The low-rank concept (provenance kind "compress"; with `base` also ``"metric": "features"``,
        ``captions`` and ``context_captions``) and its report; the summary adds ``bytes_before``/
        ``bytes_after`` (tensor bytes, embeddings included) and ``compression_ratio``. With `base` the
        errors are relative output errors on those features.

    Raises:
        InvalidArgument: not exactly one of rank/fraction/energy, a value out of range, or a dtype
            other than float16/float32 (the field is named); with `base`, as `concept_metric`.
        BaseMismatch: with `base`, the concept was made for another base.
    """
    check_target(rank, fraction, energy, dtype)
    metric, facts = None, {}
    if base is not None:
        captions = _captions(captions)
        metric = concept_metric(base, concept, captions)
        facts = {"metric": "features", "captions": len(captions),
                 "context_captions": int(concept.provenance.get("context_captions", 0))}
    # Dense deltas as they are (the SVD upcasts one layer at a time); factors expanded exactly.
    dense = {name: delta.dense if delta.dense is not None else delta.to_dense(torch.float64)
             for name, delta in concept.deltas.items()}
    factors, reports, summary = compress_deltas(dense, rank, fraction, energy, dtype, metric)
    target = {k: v for k, v in (("rank", rank), ("fraction", fraction), ("energy", energy)) if v is not None}
    result = dataclasses.replace(
        concept,
        deltas={name: LinearDelta(up=up, down=down) for name, (up, down) in factors.items()},
        provenance={"kind": "compress", "parent": digest_of(concept_to_bytes(concept)), **target,
                    "dtype": str(dtype).removeprefix("torch."), **facts},
    )
    summary.update(bytes_before=float(concept.nbytes), bytes_after=float(result.nbytes),
                   compression_ratio=concept.nbytes / result.nbytes)
    return result, CompressReport(layers=tuple(reports), summary=summary)


def load_concept(ref: str, store: ArtifactStore | None) -> Concept:
    """A concept from a ``.safetensors`` artifact file, or by digest (``<hex>`` / ``sha256:<hex>``) from `store`.

    Raises:
        InvalidArgument: `ref` is neither an existing file nor a digest, or a digest without a store.
        NotFound, CorruptArtifact: from the store or the file's bytes.
    """
    path = Path(ref)
    if path.is_file():
        return concept_from_bytes(path.read_bytes(), source=str(path))
    digest = check_digest(ref, field_name="concept")
    if store is None:
        raise InvalidArgument("store", f"concept {ref} is a digest; give the store that holds it")
    return store.get_concept(digest)
