"""Low-rank compression of concept deltas by truncated SVD, in float64, with per-layer errors.

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

import torch

from concepts.errors import InvalidArgument
from merger.report import LayerReport

FACTOR_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


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


def compress_deltas(deltas: dict[str, torch.Tensor], rank: int | None = None, fraction: float | None = None,
                    energy: float | None = None, dtype: torch.dtype = torch.float16
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[LayerReport], dict[str, float]]:
    """Compress every delta; see `compress_delta_svd`.

    Args:
        deltas: module path -> dense delta [out, in].

    Returns:
        module path -> (up, down), one `LayerReport` (rank, relative_error) per layer, and the summary
        ``relative_error`` (over all layers: sqrt of summed squared errors / sqrt of summed squared norms),
        ``relative_error_max`` and ``rank_mean``.

    Raises:
        InvalidArgument: not exactly one valid target, or `dtype` is not float16/float32.
    """
    check_target(rank, fraction, energy, dtype)
    factors, reports = {}, []
    error_sq = norm_sq = 0.0
    for name, delta in sorted(deltas.items()):
        up, down, error = compress_delta_svd(delta, rank, fraction, energy, dtype)
        factors[name] = (up, down)
        reports.append(LayerReport(name, rank=int(up.shape[1]), relative_error=error))
        layer_norm_sq = float(delta.to(torch.float64).square().sum())
        error_sq += error**2 * layer_norm_sq
        norm_sq += layer_norm_sq
    summary = {
        "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0,
        "relative_error_max": max((r.relative_error for r in reports), default=0.0),
        "rank_mean": sum(r.rank for r in reports) / len(reports) if reports else 0.0,
    }
    return factors, reports, summary
