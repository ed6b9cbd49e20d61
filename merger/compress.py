"""Low-rank compression of concept deltas by truncated SVD, in float64, with per-layer errors.

Plain (`compress_delta_svd`) or in the metric of the layer's input features (`compress_delta_weighted`).

The kept rank k of a delta with singular values s_1 >= s_2 >= ... >= s_n is chosen by exactly one of:
  rank      k = min(rank, n)
  fraction  the smallest k with s_1 + ... + s_k >= fraction * (s_1 + ... + s_n)   (the paper's "top 60%")
  energy    the smallest k with s_1^2 + ... + s_k^2 >= energy * (s_1^2 + ... + s_n^2)
and at least 1. The factors are ``up = U_k diag(sqrt s_k)`` [out, k] and ``down = diag(sqrt s_k) V_k^T``
[k, in]: splitting the singular values evenly keeps both factors' entries in float16's normal range.

The SVD comes from ``eigh`` of the smaller Gram matrix (delta^T delta or delta delta^T) in float64,
about 3x faster than a full float64 SVD at SD shapes; squaring the condition number only blurs components
below 1e-8 of the largest singular value, which carry no measurable part of the delta. The reported
error is measured on the stored (cast) factors, so it includes float16 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from concepts.errors import InvalidArgument
from merger.report import LayerReport

FACTOR_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Eigenvalues of a feature Gram below this share of the largest count as 0: float32 features carry
# rounding of ~6e-8 relative in every direction, i.e. Gram eigenvalues of ~4e-15 relative that no
# feature really reaches (the tiny base's LayerNorm normal sits there, docs/merge.md).
FEATURE_FLOOR = 1e-12


def check_target(rank: int | None, fraction: float | None, energy: float | None, dtype: torch.dtype) -> None:
    """Raise `InvalidArgument` naming the field unless exactly one valid target and a factor dtype are given."""
    given = {k: v for k, v in (("rank", rank), ("fraction", fraction), ("energy", energy)) if v is not None}
    if len(given) != 1:
        raise InvalidArgument("target", f"give exactly one of rank, fraction, energy; got {given or 'none'}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidArgument("rank", f"must be an integer >= 1, got {rank!r}")
    for name, value in (("fraction", fraction), ("energy", energy)):
        if value is not None and not 0.0 < value <= 1.0:
            raise InvalidArgument(name, f"must be in (0, 1], got {value!r}")
    if dtype not in FACTOR_DTYPES.values():
        raise InvalidArgument("dtype", f"factors are stored as float16 or float32, got {dtype}")


def kept_rank(singular_values: torch.Tensor, rank: int | None = None, fraction: float | None = None,
              energy: float | None = None) -> int:
    """The rank the target keeps (module docstring), for singular values [n] in descending order."""
    n = singular_values.numel()
    if rank is not None:
        return max(1, min(rank, n))
    values = singular_values if fraction is not None else singular_values.square()
    share = fraction if fraction is not None else energy
    running = values.cumsum(dim=0)
    # Components before the one whose running sum first reaches share * total, plus that one.
    return min(n, int((running < share * running[-1]).sum()) + 1)


def compress_delta_svd(delta: torch.Tensor, rank: int | None = None, fraction: float | None = None,
                       energy: float | None = None, dtype: torch.dtype = torch.float16
                       ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of one delta.

    Args:
        delta: [out, in], any float dtype.
        rank, fraction, energy: exactly one target (module docstring).
        dtype: dtype of the returned factors.

    Returns:
        ``up`` [out, k], ``down`` [k, in] in `dtype`, and ``||delta - up @ down||_F / ||delta||_F``
        (0 for a zero delta) computed in float64 from the cast factors.
    """
    d = delta.to(torch.float64)
    tall = d.shape[0] >= d.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(d.T @ d if tall else d @ d.T)
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    k = kept_rank(singular, rank, fraction, energy)
    basis = vectors.flip(1)[:, :k]  # V_k [in, k] when tall, else U_k [out, k]
    root = singular[:k].sqrt()
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    if tall:
        up, down = (d @ basis) * inv_root, (basis * root).T
    else:
        up, down = basis * root, inv_root[:, None] * (basis.T @ d)
    up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    norm = d.norm()
    error = (d - up.to(torch.float64) @ down.to(torch.float64)).norm()
    return up, down, float(error / norm) if norm > 0 else 0.0


@dataclass(frozen=True)
class FeatureMetric:
    """The output metric of input features X [n, in]: ``||M X^T||_F = ||weigh(M)||_F`` for any M [out, in].

    With G = X^T X = Q diag(lambda) Q^T, ``vectors`` are the columns of Q whose eigenvalue exceeds
    `FEATURE_FLOOR` times the largest ([in, r], orthonormal) and ``roots`` their sqrt(lambda) [r]; the
    other directions are reached by no feature, so no output depends on them.
    """

    vectors: torch.Tensor
    roots: torch.Tensor

    @classmethod
    def from_gram(cls, gram: torch.Tensor, floor: float = FEATURE_FLOOR) -> FeatureMetric:
        """The metric of the features whose Gram X^T X is `gram` [in, in].

        Raises:
            InvalidArgument: ``features``, when the Gram has no eigenvalue above the floor (no features).
        """
        g = gram.to(torch.float64)
        eigenvalues, vectors = torch.linalg.eigh((g + g.T) / 2)
        keep = eigenvalues > floor * eigenvalues.max()
        if not bool(keep.any()):
            raise InvalidArgument("features", "the feature Gram is zero: no feature reaches any direction")
        return cls(vectors=vectors[:, keep], roots=eigenvalues[keep].sqrt())

    def weigh(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta G^{1/2}`` up to a rotation of its columns: [out, r] float64."""
        return (delta.to(torch.float64) @ self.vectors) * self.roots


def compress_delta_weighted(delta: torch.Tensor, metric: FeatureMetric, rank: int | None = None,
                            fraction: float | None = None, energy: float | None = None,
                            dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-k delta closest to `delta` in the layer's outputs on the features of `metric`.

    That is ``trunc_k(D G^{1/2}) G^{+1/2}`` = ``U_k U_k^T D P``, U_k the top left singular vectors of
    ``D G^{1/2}`` and P the projector onto the directions the features reach: the minimum-norm one of
    the optimal rank-k deltas (a component along an unreached direction changes no output). k follows
    the target (module docstring) on the singular values of ``D G^{1/2}``.

    Returns:
        ``up`` [out, k], ``down`` [k, in] in `dtype` (balanced like `compress_delta_svd`'s), and
        ``||(delta - up @ down) G^{1/2}||_F / ||delta G^{1/2}||_F`` (0 for no output) from the cast factors.
    """
    d = delta.to(torch.float64)
    weighted = metric.weigh(d)
    tall = weighted.shape[0] >= weighted.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(weighted.T @ weighted if tall else weighted @ weighted.T)
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    k = kept_rank(singular, rank, fraction, energy)
    basis = vectors.flip(1)[:, :k]  # V_k [r, k] when tall, else U_k [out, k]
    left = torch.linalg.qr(weighted @ basis).Q if tall else basis  # U_k [out, k], orthonormal
    kept = (left.T @ d @ metric.vectors) @ metric.vectors.T  # U_k^T D P, [k, in]
    # A small SVD of `kept` turns U_k kept into the result's own SVD: factors balanced as in
    # `compress_delta_svd`.
    rotation, values, right = torch.linalg.svd(kept, full_matrices=False)
    root = values.sqrt()
    up = ((left @ rotation) * root).to(dtype).contiguous()
    down = (root[:, None] * right).to(dtype).contiguous()
    norm = weighted.norm()
    error = metric.weigh(d - up.to(torch.float64) @ down.to(torch.float64)).norm()
    return up, down, float(error / norm) if norm > 0 else 0.0


def compress_deltas(deltas: dict[str, torch.Tensor], rank: int | None = None, fraction: float | None = None,
                    energy: float | None = None, dtype: torch.dtype = torch.float16,
                    metric: FeatureMetric | None = None,
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[LayerReport], dict[str, float]]:
    """Compress every delta: `compress_delta_svd`, or `compress_delta_weighted` when `metric` is given.

    Args:
        deltas: module path -> dense delta [out, in].
        metric: the features every layer's input sees, or None for the plain SVD.

    Returns:
        module path -> (up, down), one `LayerReport` (rank, relative_error) per layer, and the summary
        ``relative_error`` (over all layers: sqrt of summed squared errors / sqrt of summed squared norms),
        ``relative_error_max`` and ``rank_mean``. With `metric`, errors and norms are the layers'
        outputs on the features.

    Raises:
        InvalidArgument: not exactly one valid target, `dtype` is not float16/float32, or a delta's input
            width is not the metric's (the field names the layer).
    """
    check_target(rank, fraction, energy, dtype)
    factors, reports = {}, []
    error_sq = norm_sq = 0.0
    for name, delta in sorted(deltas.items()):
        if metric is None:
            up, down, error = compress_delta_svd(delta, rank, fraction, energy, dtype)
            layer_norm_sq = float(delta.to(torch.float64).square().sum())
        else:
            if delta.shape[1] != metric.vectors.shape[0]:
                raise InvalidArgument(f"deltas[{name}]", f"input width {delta.shape[1]}, but the features "
                                      f"are {metric.vectors.shape[0]} wide")
            up, down, error = compress_delta_weighted(delta, metric, rank, fraction, energy, dtype)
            layer_norm_sq = float(metric.weigh(delta).square().sum())
        factors[name] = (up, down)
        reports.append(LayerReport(name, rank=int(up.shape[1]), relative_error=error))
        error_sq += error**2 * layer_norm_sq
        norm_sq += layer_norm_sq
    summary = {
        "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0,
        "relative_error_max": max((r.relative_error for r in reports), default=0.0),
        "rank_mean": sum(r.rank for r in reports) / len(reports) if reports else 0.0,
    }
    return factors, reports, summary
