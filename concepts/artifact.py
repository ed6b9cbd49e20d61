"""The concept artifact: K/V deltas, modifier-token embeddings and metadata in one safetensors file.

Layout (see docs/artifact-format.md):
  tensors  ``kv.<module path>.delta``            dense delta W - W0, [out, in]
           ``kv.<module path>.up`` / ``.down``   low-rank factors, [out, r] and [r, in]
           ``tokens.embeddings``                 [n_tokens, hidden], row i belongs to tokens[i]
           ``tokens.embeddings_2``               [n_tokens, hidden_2], the second text encoder's (SDXL)
  metadata format, format_version, base_fingerprint, family, tokens, class_words, ranks, dtype, provenance
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from concepts.errors import CorruptArtifact, InvalidArgument, quote

FORMAT = "customdiff.concept"
FORMAT_VERSION = 2  # 2: the second text encoder's rows and the family; version 1 is still read


@dataclass(frozen=True)
class LinearDelta:
    """W - W0 of one linear layer, either dense or as low-rank factors ``up @ down``."""

    dense: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None

    def __post_init__(self) -> None:
        low_rank = self.up is not None or self.down is not None
        if (self.dense is None) == (not low_rank) or (low_rank and (self.up is None or self.down is None)):
            raise ValueError("a LinearDelta is either dense or has both up and down factors")
        if low_rank and self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"factor ranks differ: up {tuple(self.up.shape)}, down {tuple(self.down.shape)}")

    @property
    def rank(self) -> int | None:
        """The factor rank, or None for a dense delta."""
        return None if self.dense is not None else int(self.up.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.up, self.down) if t is not None)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [out, in] delta."""
        if self.dense is not None:
            return self.dense.to(dtype)
        return self.up.to(dtype) @ self.down.to(dtype)


@dataclass(frozen=True)
class Concept:
    """One or more learned concepts as deltas against one base model.

    Args:
        deltas: module path of a cross-attention projection (e.g.
            ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``) to its delta.
        tokens: modifier-token strings, e.g. ``("<new1>",)``.
        embeddings: [len(tokens), hidden] learned token embeddings, row i for tokens[i].
        base_fingerprint: `concepts.base.base_fingerprint` of the base the deltas apply to.
        class_words: class word of each token's concept (e.g. "dog"); used by the merge captions.
        provenance: JSON-serializable facts about how the artifact was made.
        embeddings_2: [len(tokens), hidden_2] rows of the base's second text encoder (SDXL), else None.
        family: the base's model family (`concepts.base.family_of`); "" when unknown (version 1).
    """

    deltas: dict[str, LinearDelta]
    tokens: tuple[str, ...]
    embeddings: torch.Tensor
    base_fingerprint: str
    class_words: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    embeddings_2: torch.Tensor | None = None
    family: str = ""

    def __post_init__(self) -> None:
        for name, rows in (("embeddings", self.embeddings), ("embeddings_2", self.embeddings_2)):
            if rows is not None and (rows.ndim != 2 or rows.shape[0] != len(self.tokens)):
                raise ValueError(f"{name} must be [len(tokens)={len(self.tokens)}, hidden], got {tuple(rows.shape)}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"tokens must be distinct, got {list(self.tokens)}")
        if self.class_words and len(self.class_words) != len(self.tokens):
            raise ValueError("class_words must have one entry per token")

    @property
    def token_rows(self) -> tuple[torch.Tensor, ...]:
        """The token embeddings per text encoder, in the base's order (`BaseModel.text_pairs`)."""
        return (self.embeddings,) if self.embeddings_2 is None else (self.embeddings, self.embeddings_2)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (deltas and embeddings)."""
        emb = sum(rows.numel() * rows.element_size() for rows in self.token_rows)
        return emb + sum(d.nbytes for d in self.deltas.values())

    def ranks(self) -> dict[str, int | None]:
        return {name: d.rank for name, d in sorted(self.deltas.items())}


def concept_to_bytes(concept: Concept) -> bytes:
    """Serialize to safetensors bytes; the same concept always gives the same bytes."""
    tensors: dict[str, torch.Tensor] = {}
    dtypes = set()
    for key, rows in zip(_EMBEDDING_KEYS, concept.token_rows):
        tensors[key] = rows.detach().cpu().contiguous()
        dtypes.add(str(rows.dtype).removeprefix("torch."))
    for name, delta in concept.deltas.items():
        parts = {"delta": delta.dense} if delta.dense is not None else {"up": delta.up, "down": delta.down}
        for suffix, tensor in parts.items():
            tensors[f"kv.{name}.{suffix}"] = tensor.detach().cpu().contiguous()
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_fingerprint": concept.base_fingerprint,
        "family": concept.family,
        "tokens": json.dumps(list(concept.tokens)),
        "class_words": json.dumps(list(concept.class_words)),
        "ranks": json.dumps(concept.ranks(), sort_keys=True),
        "dtype": ",".join(sorted(dtypes)),
        "provenance": json.dumps(concept.provenance, sort_keys=True),
    }
    return _canonical(st_save(tensors, metadata=metadata))


_EMBEDDING_KEYS = ("tokens.embeddings", "tokens.embeddings_2")


def _canonical(data: bytes) -> bytes:
    """Rewrite the safetensors header with sorted keys: safetensors orders metadata arbitrarily."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + header_len]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + header_len :]


def _read_metadata(data: bytes, source: str) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptArtifact(f"{source}: {len(data)} bytes is too short to be a concept artifact")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CorruptArtifact(f"{source}: truncated safetensors header ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as e:
        raise CorruptArtifact(f"{source}: unreadable safetensors header: {e}") from e
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CorruptArtifact(f"{source}: not a customdiff concept artifact (format={metadata.get('format')!r})")
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise CorruptArtifact(
            f"{source}: format version {metadata['format_version']} is newer than this build "
            f"understands ({FORMAT_VERSION}); upgrade customdiff"
        )
    return metadata


def concept_from_bytes(data: bytes, source: str = "<bytes>") -> Concept:
    """Parse artifact bytes; raise `CorruptArtifact` naming `source` when they do not parse."""
    metadata = _read_metadata(data, source)
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise CorruptArtifact(f"{source}: {e}") from e
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("kv."):
            name, suffix = key[3:].rsplit(".", 1)
            deltas.setdefault(name, {})[suffix] = tensor
    try:
        return Concept(
            deltas={
                name: LinearDelta(dense=p.get("delta"), up=p.get("up"), down=p.get("down"))
                for name, p in sorted(deltas.items())
            },
            tokens=tuple(json.loads(metadata["tokens"])),
            embeddings=tensors["tokens.embeddings"],
            base_fingerprint=metadata["base_fingerprint"],
            class_words=tuple(json.loads(metadata.get("class_words", "[]"))),
            provenance=json.loads(metadata.get("provenance", "{}")),
            embeddings_2=tensors.get("tokens.embeddings_2"),
            family=metadata.get("family", ""),
        )
    except (KeyError, ValueError) as e:
        raise CorruptArtifact(f"{source}: inconsistent artifact: {e}") from e


def digest_of(data: bytes) -> str:
    """The artifact's address: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str, field_name: str = "digest") -> str:
    """Validate a hex sha256 digest string and return it lower-cased."""
    d = digest.lower().removeprefix("sha256:")
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise InvalidArgument(field_name, f"expected 64 hex characters of a sha256 digest, got {quote(digest)}")
    return d
