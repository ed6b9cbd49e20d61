"""Compression in the metric of a layer's input features (`merger.compress.compress_delta_weighted`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from concepts.artifact import LinearDelta
from concepts.base import kv_layers, load_base
from concepts.errors import BaseMismatch, InvalidArgument
from merger.compress import FeatureMetric, compress_delta_svd, compress_delta_weighted
from merger.features import concept_features, default_captions, regularization_features
from merger.run import compress_concept, compresses_by_features, concept_metric, merge_concepts
from tests.conftest import random_concept


def _output_error(delta: torch.Tensor, approx: torch.Tensor, features: torch.Tensor) -> float:
    """``||(delta - approx) X^T|| / ||delta X^T||`` in float64."""
    d, x = delta.to(torch.float64), features.to(torch.float64)
    return float(((d - approx.to(torch.float64)) @ x.T).norm() / (d @ x.T).norm())


def test_an_unreached_direction_takes_plain_top_60_but_not_the_feature_weighted_one():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 24, 16
    unreached = torch.zeros(in_f, dtype=torch.float64)
    unreached[0] = 1.0
    # Caption rows and a few concept rows, none of which reaches input direction 0.
    captions, concept = (torch.randn(n, in_f, generator=g, dtype=torch.float64) for n in (400, 6))
    captions[:, 0] = concept[:, 0] = 0.0
    # The delta: 100 along the unreached direction, a rank-1 useful part of norm 1 and a little noise.
    useful = torch.randn(out_f, 1, generator=g, dtype=torch.float64) @ concept[:1]
    delta = (100 * torch.randn(out_f, 1, generator=g, dtype=torch.float64) @ unreached[None]
             + useful / useful.norm() + 1e-3 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64))
    metric = FeatureMetric.from_gram(concept.T @ concept / 6 + captions.T @ captions / 400)
    assert metric.vectors.shape == (in_f, in_f - 1)  # direction 0 is dropped

    up, down, _ = compress_delta_svd(delta, fraction=0.6, dtype=torch.float32)
    plain = _output_error(delta, up.double() @ down.double(), concept)
    up_w, down_w, reported = compress_delta_weighted(delta, metric, fraction=0.6, dtype=torch.float32)
    weighted = _output_error(delta, up_w.double() @ down_w.double(), concept)
    assert up.shape[1] == up_w.shape[1] == 1  # the same size
    assert plain > 0.99  # it kept the unreached direction, whose output is 0
    assert weighted < 0.02 and reported < 0.02
    # Nothing of the unreached direction is stored.
    assert float((up_w.double() @ down_w.double() @ unreached).norm()) < 1e-6


@pytest.mark.parametrize("target", [{"fraction": 0.6}, {"energy": 0.9}, {"rank": 5}, {"rank": 100}])
def test_features_that_reach_every_direction_alike_give_the_plain_svd(target):
    g = torch.Generator().manual_seed(1)
    features = torch.linalg.qr(torch.randn(200, 24, generator=g, dtype=torch.float64)).Q  # X^T X = I
    left, right = (torch.linalg.qr(torch.randn(n, 20, generator=g, dtype=torch.float64)).Q for n in (30, 24))
    delta = (left * torch.exp(-torch.arange(20.0, dtype=torch.float64) / 4)) @ right.T
    up, down, error = compress_delta_svd(delta, dtype=torch.float32, **target)
    up_w, down_w, error_w = compress_delta_weighted(delta, FeatureMetric.from_gram(features.T @ features),
                                                    dtype=torch.float32, **target)
    assert up_w.shape == up.shape
    assert float((up_w.double() @ down_w.double() - up.double() @ down.double()).abs().max()) <= 1e-6
    assert error_w == pytest.approx(error, abs=1e-6)


def test_a_zero_gram_is_refused_naming_the_features():
    with pytest.raises(InvalidArgument) as err:
        FeatureMetric.from_gram(torch.zeros(4, 4))
    assert err.value.field == "features"


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(tiny_base_dir)


@pytest.fixture(scope="module")
def merged(base):
    concepts = [random_concept(base, seed=i, token=f"<new{i + 1}>", class_word=word)
                for i, word in enumerate(("dog", "cat"))]
    return merge_concepts(base, concepts)[0]


def test_the_metric_weighs_constraint_and_caption_rows_alike(base, merged):
    metric = concept_metric(base, merged)
    (rows,) = concept_features(base.tokenizer, base.text_encoder, [merged])
    reg = regularization_features(base.tokenizer, base.text_encoder, default_captions())
    gram = rows.T @ rows / rows.shape[0] + reg.T @ reg / reg.shape[0]
    torch.testing.assert_close((metric.vectors * metric.roots.square()) @ metric.vectors.T, gram,
                               rtol=1e-6, atol=1e-9 * float(gram.norm()))


def test_a_compressed_merge_keeps_its_outputs_on_the_concepts_features(base, merged):
    (rows,) = concept_features(base.tokenizer, base.text_encoder, [merged])
    weights = {name: layer.weight.detach().to(torch.float64) for name, layer in kv_layers(base.unet).items()}

    def error(compressed) -> float:  # ||(W' - W) C^T|| / ||W C^T|| over all layers, W = W0 + merged delta
        num = den = 0.0
        for name, delta in merged.deltas.items():
            d = delta.to_dense(torch.float64)
            num += float(((d - compressed.deltas[name].to_dense(torch.float64)) @ rows.T).square().sum())
            den += float(((weights[name] + d) @ rows.T).square().sum())
        return (num / den) ** 0.5

    plain, _ = compress_concept(merged, fraction=0.6, dtype=torch.float32)
    weighted, report = compress_concept(merged, fraction=0.6, dtype=torch.float32, base=base)
    # Measured: 0.156 against 0.284, at mean rank 3.0 against 3.5.
    assert error(weighted) < 0.2 and error(weighted) < 0.6 * error(plain)
    assert report.summary["rank_mean"] <= 3.5 and weighted.nbytes < merged.nbytes
    assert weighted.provenance["metric"] == "features" and weighted.provenance["context_captions"] == 0
    assert compresses_by_features(merged) and compresses_by_features(weighted)
    assert not compresses_by_features(plain)

    # The toy world's failure (docs/toyworld.md): a large component along the direction no feature reaches
    # (the tiny base's LayerNorm normal, all ones). Plain top 60% keeps only it; the weighted one drops it.
    g = torch.Generator().manual_seed(5)
    normal = torch.ones(1, 32) / 32**0.5
    spiked = dataclasses.replace(merged, deltas={
        name: LinearDelta(dense=d.to_dense() + 100 * torch.randn(d.shape[0], 1, generator=g) @ normal)
        for name, d in merged.deltas.items()})
    plain, report = compress_concept(spiked, fraction=0.6, dtype=torch.float32)
    assert report.summary["rank_mean"] == 1 and error(plain) > 0.4  # measured 0.43
    again, _ = compress_concept(spiked, fraction=0.6, dtype=torch.float32, base=base)
    assert error(again) == pytest.approx(error(weighted), abs=1e-6)
    for name, delta in weighted.deltas.items():  # (the features lie 4e-8 off the normal: 100 x that)
        torch.testing.assert_close(again.deltas[name].to_dense(), delta.to_dense(), rtol=0, atol=1e-4)


def test_the_feature_weighted_compression_checks_the_base(merged, other_base_dir):
    with pytest.raises(BaseMismatch):
        compress_concept(merged, fraction=0.6, base=load_base(other_base_dir))
    with pytest.raises(InvalidArgument) as err:
        compress_concept(merged, fraction=0.6, base=load_base(other_base_dir), captions=[" "])
    assert err.value.field == "regularization_captions"
