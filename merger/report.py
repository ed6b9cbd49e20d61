"""Merge and compression reports; they map 1:1 onto LayerReport/MergerReport in merger_service.proto."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerReport:
    """Numbers of one cross-attention projection; fields that do not apply stay 0.

    Args:
        layer: module path, e.g. ``mid_block.attentions.0.transformer_blocks.0.attn2.to_k``.
        residual: merge, ``||W C^T - V|| / ||V||`` over every concept's target features.
        drift: merge, ``||(W - W0) C_reg^T|| / ||W0 C_reg^T||`` over the regularization features.
        naive_residual: the residual of naive averaging, ``W = W0 + mean_i delta_i``.
        naive_drift: the drift of naive averaging.
        rank: compression, the kept rank.
        relative_error: compression, ``||delta - up @ down||_F / ||delta||_F`` with the stored factors;
            feature-weighted, ``||(delta - up @ down) X^T||_F / ||delta X^T||_F`` on the features X.
    """

    layer: str
    residual: float = 0.0
    drift: float = 0.0
    naive_residual: float = 0.0
    naive_drift: float = 0.0
    rank: int = 0
    relative_error: float = 0.0

    def __post_init__(self) -> None:
        if not self.layer:
            raise ValueError("layer must name a module path")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")


@dataclass(frozen=True)
class MergerReport:
    """Per-layer numbers, overall numbers by name, and the token renames made to resolve clashes."""

    layers: tuple[LayerReport, ...]
    summary: dict[str, float] = field(default_factory=dict)
    renamed_tokens: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, keyed like the proto message MergerReport."""
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "summary": {k: float(v) for k, v in self.summary.items()},
            "renamed_tokens": list(self.renamed_tokens),
        }


class MergeReport(MergerReport):
    """Report of a merge: residual, drift and their naive-averaging baselines per layer."""


class CompressReport(MergerReport):
    """Report of a compression: kept rank and relative error per layer, bytes before and after."""
