"""Closed-form multi-concept merge (Kumari et al., CVPR 2023, sec. 3.2) in float64, with its report.

For one cross-attention projection with base weight W0 [out, in], concept i brings target features
C_i [m_i, in] (the token features of its captions) and its fine-tuned delta D_i; its targets are
V_i = (W0 + D_i) C_i^T. The merge solves

    min_W ||(W - W0) C_reg^T||_F   subject to   W C^T = V,

with C, V the concepts' rows stacked and C_reg [n, in] the features of generic captions. With
R = C_reg^T C_reg and E = V - W0 C^T = [D_1 C_1^T, ..., D_N C_N^T] [out, m] the solution is

    W - W0 = E (C R^-1 C^T)^-1 C R^-1 = E P,

and P [m, in] depends only on the features, so one P serves every layer of the UNet.

Numerics (docs/merge.md), all in float64:
  1. Rows of C equal up to float32 noise are merged into one (their targets averaged).
  2. R gets a floor, R + REG_FLOOR * mean_eigenvalue(R) * I: a direction no regularization caption
     reaches (the tiny base's features all lie in one hyperplane) would otherwise cost nothing, and the
     solve would put an unbounded update there, driven by rounding noise of C.
  3. With R = L L^T and A = L^-1 C^T = U S Q^T, the inverse of A^T A = C R^-1 C^T is Tikhonov-filtered,
     s / (s^2 + ridge * s_max^2): a constraint direction with singular value s is met up to a relative
     residual ridge * (s_max / s)^2, and no direction is amplified beyond 1 / (2 sqrt(ridge)), so
     near-duplicate rows bend the result instead of breaking it.
"""

from __future__ import annotations

import torch

from merger.report import LayerReport

DEFAULT_RIDGE = 1e-10
REG_FLOOR = 1e-6
DUPLICATE_TOL = 1e-5
_GRAM_CHUNK_ROWS = 8192


def regularization_gram(features: torch.Tensor) -> torch.Tensor:
    """R = C_reg^T C_reg in float64, accumulated in chunks so a float64 copy of C_reg never exists.

    Args:
        features: C_reg, [n, in], any float dtype.

    Returns:
        [in, in] float64.
    """
    gram = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for chunk in features.split(_GRAM_CHUNK_ROWS):
        c = chunk.to(torch.float64)
        gram += c.T @ c
    return gram


def duplicate_groups(targets: torch.Tensor, tol: float = DUPLICATE_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Group rows of C that are equal up to ``tol`` relative distance, keeping first-occurrence order.

    Args:
        targets: C, [m, in].
        tol: rows i, j are duplicates when ``||c_i - c_j|| <= tol * max(||c_i||, ||c_j||)``; the default
            absorbs the float32 noise of one caption encoded in two batches.

    Returns:
        ``keep`` [k] indices of the first row of each group, and ``average`` [k, m]: row g averages
        the members of group g, so ``E @ average.T`` gives one target column per kept row.
    """
    c = targets.to(torch.float64)
    norms = c.norm(dim=1)
    close = torch.cdist(c, c) <= tol * torch.maximum(norms[:, None], norms[None, :])
    group_of: list[int] = []
    keep: list[int] = []
    for row in range(c.shape[0]):
        match = next((g for g, first in enumerate(keep) if close[row, first]), None)
        if match is None:
            keep.append(row)
            match = len(keep) - 1
        group_of.append(match)
    average = torch.zeros(len(keep), c.shape[0], dtype=torch.float64)
    average[group_of, torch.arange(c.shape[0])] = 1.0
    return torch.tensor(keep, dtype=torch.long), average / average.sum(dim=1, keepdim=True)


def merge_projection(targets: torch.Tensor, reg_gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """P with ``W - W0 = E P``: the regularized ``(C R^-1 C^T)^-1 C R^-1`` of the module docstring.

    Args:
        targets: C without duplicate rows, [m, in] float64.
        reg_gram: R = C_reg^T C_reg, [in, in] float64.
        ridge: relative Tikhonov term of the constraint solve (>= 0), see the module docstring.

    Returns:
        [m, in] float64.
    """
    n_in = reg_gram.shape[0]
    scale = torch.trace(reg_gram) / n_in
    if scale <= 0:
        scale = torch.ones((), dtype=torch.float64)  # no regularization features: plain minimum-norm update
    chol = torch.linalg.cholesky(reg_gram + REG_FLOOR * scale * torch.eye(n_in, dtype=torch.float64))
    a = torch.linalg.solve_triangular(chol, targets.T, upper=False)  # L^-1 C^T, [in, m]
    u, s, qt = torch.linalg.svd(a, full_matrices=False)
    denominator = s.square() + ridge * s.max().square()
    filtered = torch.where(denominator > 0, s / denominator, torch.zeros_like(s))  # ridge 0 on exact rank loss
    left = (qt.T * filtered) @ u.T  # [m, in] = Q diag(s/(s^2+mu)) U^T
    return torch.linalg.solve_triangular(chol, left, upper=False, left=False)  # ... L^-1


def merge_closed_form(
    base_weights: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    targets: list[torch.Tensor],
    reg_gram: torch.Tensor,
    ridge: float = DEFAULT_RIDGE,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, float]]:
    """Merge N concepts' deltas on every layer of `base_weights`.

    Args:
        base_weights: module path -> W0, [out, in]; the layers to merge.
        deltas: per concept, module path -> its delta [out, in]; a missing layer counts as zero.
        targets: per concept, C_i [m_i, in] (every layer shares the input width `in`).
        reg_gram: R = C_reg^T C_reg, [in, in] float64 (see `regularization_gram`).
        ridge: relative Tikhonov term, see the module docstring.
        dtype: of the merged deltas returned (solved in float64 one layer at a time; all of SDXL's in
            float64 would hold 2.5 GB).

    Returns:
        module path -> merged delta W - W0 [out, in] in `dtype`, one `LayerReport` per layer, and the
        overall numbers (norms summed over layers before the ratio; ``*_max`` over layers).
    """
    if len(deltas) != len(targets):
        raise ValueError(f"{len(deltas)} delta sets but {len(targets)} target feature sets")
    c_all = torch.cat([t.to(torch.float64) for t in targets])
    keep, average = duplicate_groups(c_all)
    projection = merge_projection(c_all[keep], reg_gram, ridge)
    # tr(X R X^T) for X = E' P is tr(E' (P R P^T) E'^T): the merged drift without an [out, in] @ [in, in].
    drift_gram = projection @ reg_gram @ projection.T
    merged, reports, totals = {}, [], torch.zeros(6, dtype=torch.float64)
    for name, w0 in sorted(base_weights.items()):
        w0 = w0.to(torch.float64)
        layer_deltas = [d[name].to(torch.float64) if name in d else torch.zeros_like(w0) for d in deltas]
        errors = torch.cat([d @ c.to(torch.float64).T for d, c in zip(layer_deltas, targets)], dim=1)  # E
        kept = errors @ average.T
        delta = kept @ projection
        naive = sum(layer_deltas) / len(layer_deltas)
        squares = torch.stack([
            (delta @ c_all.T - errors).square().sum(),                        # residual^2
            ((kept @ drift_gram) * kept).sum(),                               # drift^2
            (naive @ c_all.T - errors).square().sum(),                        # naive residual^2
            ((naive @ reg_gram) * naive).sum(),                               # naive drift^2
            (w0 @ c_all.T + errors).square().sum(),                           # ||V||^2
            ((w0 @ reg_gram) * w0).sum(),                                     # ||W0 C_reg^T||^2
        ]).clamp_min(0)
        totals += squares
        reports.append(_layer_report(name, squares))
        merged[name] = delta.to(dtype)
    summary = _summary(reports, totals)
    summary.update(constraints=float(c_all.shape[0]), duplicate_rows=float(c_all.shape[0] - keep.numel()),
                   ridge=float(ridge), concepts=float(len(deltas)))
    return merged, reports, summary


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num.sqrt() / den.sqrt()) if den > 0 else 0.0


def _layer_report(name: str, squares: torch.Tensor) -> LayerReport:
    res, drift, naive_res, naive_drift, v, reg = squares
    return LayerReport(name, residual=_ratio(res, v), drift=_ratio(drift, reg),
                       naive_residual=_ratio(naive_res, v), naive_drift=_ratio(naive_drift, reg))


def _summary(reports: list[LayerReport], totals: torch.Tensor) -> dict[str, float]:
    overall = _layer_report("overall", totals)
    return {
        "residual": overall.residual,
        "drift": overall.drift,
        "naive_residual": overall.naive_residual,
        "naive_drift": overall.naive_drift,
        "residual_max": max((r.residual for r in reports), default=0.0),
        "drift_max": max((r.drift for r in reports), default=0.0),
    }
