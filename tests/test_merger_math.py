"""The merge and compression math on synthetic tensors: closed form, optimality, numerics, report numbers."""

from __future__ import annotations

import pytest
import torch

from concepts.errors import InvalidArgument
from merger.compress import compress_delta_svd, compress_deltas, kept_rank
from merger.merge import duplicate_groups, merge_closed_form, merge_projection, regularization_gram

F64 = torch.float64


def _problem(n_concepts: int, rows: int = 6, n_in: int = 48, out: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(out, n_in, generator=g, dtype=F64),
            "b": torch.randn(2 * out, n_in, generator=g, dtype=F64)}
    deltas = [{k: 0.05 * torch.randn(w.shape, generator=g, dtype=F64) for k, w in base.items()}
              for _ in range(n_concepts)]
    targets = [torch.randn(rows, n_in, generator=g, dtype=F64) for _ in range(n_concepts)]
    c_reg = torch.randn(4000, n_in, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, n_in, dtype=F64)
    return base, deltas, targets, c_reg


def test_closed_form_matches_the_lagrange_solution_and_meets_every_constraint():
    base, deltas, targets, c_reg = _problem(3)
    reg_gram = regularization_gram(c_reg)
    merged, reports, summary = merge_closed_form(base, deltas, targets, reg_gram, ridge=0.0)
    c = torch.cat(targets)
    r_inv = torch.linalg.inv(reg_gram)
    for name, w0 in base.items():
        v = torch.cat([(w0 + d[name]) @ t.T for d, t in zip(deltas, targets)], dim=1)  # [out, m]
        expected = (v - w0 @ c.T) @ torch.linalg.inv(c @ r_inv @ c.T) @ c @ r_inv
        # REG_FLOOR (1e-6 of the mean eigenvalue) is the only difference from the textbook formula.
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-6)
        assert torch.linalg.norm((w0 + merged[name]) @ c.T - v) / torch.linalg.norm(v) < 1e-10
    assert summary["residual"] < 1e-10 and summary["constraints"] == 18 and summary["duplicate_rows"] == 0
    assert [r.layer for r in reports] == ["a", "b"]


def test_no_other_feasible_update_drifts_less():
    base, deltas, targets, c_reg = _problem(2)
    reg_gram = regularization_gram(c_reg)
    merged, _, _ = merge_closed_form(base, deltas, targets, reg_gram)
    c = torch.cat(targets)
    null = torch.eye(c.shape[1], dtype=F64) - torch.linalg.pinv(c) @ c  # X @ null meets X C^T = 0
    g = torch.Generator().manual_seed(5)
    d = merged["a"]
    for _ in range(5):
        other = d + 0.01 * torch.randn(d.shape, generator=g, dtype=F64) @ null
        assert torch.linalg.norm(other @ c.T - d @ c.T) < 1e-9
        assert torch.trace(other @ reg_gram @ other.T) > torch.trace(d @ reg_gram @ d.T)


def test_report_numbers_are_the_defined_ratios():
    base, deltas, targets, c_reg = _problem(2)
    merged, reports, summary = merge_closed_form(base, deltas, targets, regularization_gram(c_reg))
    c = torch.cat(targets)
    w0, report = base["b"], reports[1]
    v = torch.cat([(w0 + d["b"]) @ t.T for d, t in zip(deltas, targets)], dim=1)
    naive = (deltas[0]["b"] + deltas[1]["b"]) / 2
    ref = torch.linalg.norm(w0 @ c_reg.T)
    residual = torch.linalg.norm((w0 + merged["b"]) @ c.T - v) / torch.linalg.norm(v)
    assert report.residual == pytest.approx(float(residual), abs=1e-12)
    assert report.drift == pytest.approx(float(torch.linalg.norm(merged["b"] @ c_reg.T) / ref), rel=1e-9)
    naive_residual = torch.linalg.norm((w0 + naive) @ c.T - v) / torch.linalg.norm(v)
    assert report.naive_residual == pytest.approx(float(naive_residual), rel=1e-9)
    assert report.naive_drift == pytest.approx(float(torch.linalg.norm(naive @ c_reg.T) / ref), rel=1e-9)
    assert summary["residual_max"] == max(r.residual for r in reports)


def test_regularization_gram_is_exact_across_chunks():
    x = torch.randn(20000, 16, dtype=torch.float32)
    torch.testing.assert_close(regularization_gram(x), x.double().T @ x.double())


def test_duplicate_rows_are_dropped_and_their_targets_averaged():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 8, generator=g, dtype=F64)
    c = torch.cat([rows, rows[1:2] * (1 + 1e-7), rows[0:1]])  # rows 3 and 4 repeat rows 1 and 0
    keep, average = duplicate_groups(c)
    assert keep.tolist() == [0, 1, 2]
    assert average.tolist() == [[0.5, 0, 0, 0, 0.5], [0, 0.5, 0, 0.5, 0], [0, 0, 1, 0, 0]]
    base, deltas, targets, c_reg = _problem(2, rows=3, n_in=8)
    targets[1] = targets[1].clone()
    targets[1][0] = targets[0][0]  # one row in both concepts, with conflicting targets
    merged, _, summary = merge_closed_form(base, deltas, targets, regularization_gram(c_reg))
    assert summary["duplicate_rows"] == 1
    shared = targets[0][0]
    wanted = (deltas[0]["a"] @ shared + deltas[1]["a"] @ shared) / 2
    torch.testing.assert_close(merged["a"] @ shared, wanted, rtol=1e-6, atol=1e-8)


def test_ridge_bounds_the_update_from_near_duplicate_rows():
    _, _, targets, c_reg = _problem(2, n_in=16)
    reg_gram = regularization_gram(c_reg)
    c = torch.cat(targets[:1])
    near = torch.cat([c, c[:1] + 1e-9 * torch.randn(1, 16, generator=torch.Generator().manual_seed(2), dtype=F64)])
    plain = torch.linalg.norm(merge_projection(c, reg_gram))
    unbounded = torch.linalg.norm(merge_projection(near, reg_gram, ridge=0.0))
    bounded = torch.linalg.norm(merge_projection(near, reg_gram))
    assert unbounded > 1e6 * plain
    assert torch.isfinite(bounded) and bounded < 100 * plain


def _delta(out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """A delta with a decaying spectrum, like a fine-tuned one."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, n_in)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n_in, n, generator=g, dtype=F64))
    return (u * torch.exp(-torch.arange(n, dtype=F64) / 6)) @ v.T


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_full_rank_reproduces_the_delta(shape):
    delta = _delta(*shape).float()
    up, down, error = compress_delta_svd(delta, rank=100, dtype=torch.float32)
    assert up.shape == (shape[0], 24) and down.shape == (24, shape[1]) and up.dtype == torch.float32
    assert torch.linalg.norm(up @ down - delta) / torch.linalg.norm(delta) < 1e-5
    assert error < 1e-5


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("rank", [1, 3, 10])
def test_rank_r_error_is_the_svd_tail(shape, rank):
    delta = _delta(*shape, seed=rank)
    s = torch.linalg.svdvals(delta)
    up, _, error = compress_delta_svd(delta, rank=rank, dtype=torch.float32)
    tail = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    assert up.shape[1] == rank
    assert error == pytest.approx(tail, rel=1e-5)


def test_fraction_keeps_exactly_the_components_whose_running_sum_reaches_it():
    delta = _delta(48, 32, seed=3)
    s = torch.linalg.svdvals(delta)
    running = s.cumsum(0) / s.sum()
    expected = int(torch.nonzero(running >= 0.6)[0]) + 1
    assert running[expected - 2] < 0.6 <= running[expected - 1]
    up, _, _ = compress_delta_svd(delta, fraction=0.6)
    assert up.shape[1] == expected and up.dtype == torch.float16
    energy = s.square().cumsum(0) / s.square().sum()
    up, _, error = compress_delta_svd(delta, energy=0.99, dtype=torch.float32)
    assert up.shape[1] == int(torch.nonzero(energy >= 0.99)[0]) + 1
    assert error <= 0.1 + 1e-6  # 99% of the energy kept: at most sqrt(1%) relative error


def test_kept_rank_edges():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    assert kept_rank(s, fraction=1.0) == 3 and kept_rank(s, fraction=0.5) == 1 and kept_rank(s, fraction=0.51) == 2
    assert kept_rank(s, rank=9) == 3 and kept_rank(torch.zeros(3, dtype=F64), energy=0.5) == 1
    up, down, error = compress_delta_svd(torch.zeros(5, 4), fraction=0.6)
    assert up.shape == (5, 1) and error == 0.0 and not (up @ down).any()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "target"),
    ({"rank": 2, "fraction": 0.5}, "target"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"energy": -1.0}, "energy"),
    ({"rank": 2, "dtype": torch.bfloat16}, "dtype"),
])
def test_invalid_targets_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        compress_deltas({"a": torch.ones(3, 3)}, **kwargs)
    assert err.value.field == field


def test_fp16_factors_report_their_rounding():
    delta = _delta(64, 32)
    _, _, error16 = compress_delta_svd(delta, rank=32, dtype=torch.float16)
    _, _, error32 = compress_delta_svd(delta, rank=32, dtype=torch.float32)
    assert error32 < 1e-6 < error16 < 1e-2
