"""Merging and compressing concepts of the tiny base through `merger.run`, and using the result."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from concepts.apply import add_tokens
from concepts.artifact import LinearDelta, concept_to_bytes, digest_of
from concepts.base import kv_layers, load_base
from concepts.errors import BaseMismatch, InvalidArgument
from merger.data.make_captions import make_captions
from merger.features import (
    concept_features,
    context_captions,
    default_captions,
    encode_rows,
    regularization_features,
)
from merger.run import compress_concept, merge_concepts
from tests.conftest import random_concept

CLASSES = ("dog", "cat", "car", "chair", "vase")


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(tiny_base_dir)


@pytest.fixture(scope="module")
def concepts(base):
    return [random_concept(base, seed=i, token=f"<new{i + 1}>", class_word=CLASSES[i]) for i in range(5)]


@pytest.fixture(scope="module")
def merged_two(base, concepts):
    return merge_concepts(base, concepts[:2])


def test_shipped_captions_are_many_distinct_and_reproducible():
    captions = default_captions()
    assert len(captions) >= 1000 and len(set(captions)) == len(captions)
    assert captions == make_captions()
    assert not any("<" in c for c in captions)


def test_features_are_the_rows_from_the_modifier_token_to_the_end_token(base, concepts):
    (features,) = concept_features(base.tokenizer, base.text_encoder, concepts[:1])
    assert features.shape == (6, 32) and features.dtype == torch.float64  # (<new1>, dog, end) twice
    assert "<new1>" not in base.tokenizer.get_vocab()  # the base itself is left alone
    # The same caption alone, unpadded, gives the same rows: padding never leaks into them.
    tokenizer, encoder = copy.deepcopy(base.tokenizer), copy.deepcopy(base.text_encoder)
    add_tokens(tokenizer, encoder, ("<new1>",), concepts[0].embeddings)
    ids = tokenizer("photo of a <new1> dog").input_ids
    with torch.no_grad():
        alone = encoder(input_ids=torch.tensor([ids]))[0][0, 4:].double()
    torch.testing.assert_close(features[3:], alone, rtol=1e-5, atol=1e-5)
    reg = regularization_features(base.tokenizer, base.text_encoder, ["a red car", "a dog on the grass at night"])
    assert reg.shape[0] == 4 + 8  # the words and the end token of each, never the start token
    torch.testing.assert_close(reg[:4], encode_rows(base.tokenizer, base.text_encoder, ["a red car"], [None]),
                               rtol=1e-5, atol=1e-5)


def test_context_captions_put_the_token_before_the_first_whole_word_mention():
    captions = ["a hotdog stand", "a dog on a dog bed", "photo of a cat", "dog, running", "a <dog> toy", "two dogs"]
    assert context_captions(captions, "<new1>", "dog", 5) == ["a <new1> dog on a dog bed", "<new1> dog, running"]
    assert context_captions(captions, "<new1>", "dog", 1) == ["a <new1> dog on a dog bed"]
    assert context_captions(captions, "<new1>", "dog", 0) == [] and context_captions(captions, "<new1>", "", 5) == []


def test_context_captions_add_their_rows_and_the_merge_meets_them(base, concepts):
    captions = ["a dog on the grass", "a cat on the grass", "the dog in the grass", "a car"]
    plain, = concept_features(base.tokenizer, base.text_encoder, concepts[:1], captions, 0)
    more, = concept_features(base.tokenizer, base.text_encoder, concepts[:1], captions, 8)
    # + the rows of "<new1> dog on the grass <end>" and "<new1> dog in the grass <end>", 6 each
    assert more.shape[0] == plain.shape[0] + 12
    # Same rows; a longer padded batch may round differently in float32 (~1e-7).
    torch.testing.assert_close(more[: plain.shape[0]], plain, rtol=1e-5, atol=1e-6)
    concept, report = merge_concepts(base, concepts[:2], captions=captions, context_captions=8)
    assert report.summary["constraints"] == 12 + 12 + 6  # <new2> cat: "<new2> cat on the grass <end>"
    # 30 rows in a 32-wide feature space: the ridge bends the nearly dependent ones a little.
    assert report.summary["residual"] <= 0.02 and report.summary["naive_residual"] >= 0.3
    assert concept.provenance["context_captions"] == 8


def test_two_concepts_meet_their_constraints_and_drift_less_than_naive_averaging(merged_two):
    _, report = merged_two
    assert report.summary["residual"] <= 1e-4 and report.summary["residual_max"] <= 1e-4
    assert report.summary["drift"] < report.summary["naive_drift"]
    assert report.summary["naive_residual"] > 0.1  # averaging loses each concept's own behaviour
    assert len(report.layers) == 14 and report.summary["constraints"] == 12
    assert all(layer.drift < layer.naive_drift for layer in report.layers)


def test_five_concepts_meet_their_constraints(base, concepts):
    concept, report = merge_concepts(base, concepts)
    assert report.summary["residual"] <= 1e-4 and report.summary["residual_max"] <= 1e-4
    assert report.summary["naive_residual"] > 0.1
    assert concept.tokens == tuple(f"<new{i}>" for i in range(1, 6)) and concept.class_words == CLASSES


def test_merged_concept_holds_every_token_and_its_provenance(base, concepts, merged_two):
    concept, report = merged_two
    assert concept.base_fingerprint == base.fingerprint
    torch.testing.assert_close(concept.embeddings, torch.cat([c.embeddings for c in concepts[:2]]))
    assert set(concept.deltas) == set(kv_layers(base.unet))
    rank = int(report.summary["constraints"] - report.summary["duplicate_rows"])
    for delta in concept.deltas.values():  # rank-m factors where they are smaller than the dense matrix
        out_f, in_f = delta.shape
        assert delta.rank == (rank if rank * (out_f + in_f) < out_f * in_f else None)
    assert 0 < rank < 32
    assert concept.provenance == {
        "kind": "merge", "parents": [digest_of(concept_to_bytes(c)) for c in concepts[:2]],
        "ridge": report.summary["ridge"], "captions": len(default_captions()), "context_captions": 0,
        "renamed_tokens": [],
    }
    assert report.to_dict()["renamed_tokens"] == []


def test_merged_artifact_loads_and_generates(tiny_base_dir, base, merged_two, tmp_path):
    from diffusers import StableDiffusionPipeline

    from concepts.apply import apply_concepts
    from concepts.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    concept = store.get_concept(store.put_concept(merged_two[0]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    apply_concepts(pipe.unet, pipe.text_encoder, pipe.tokenizer, [concept])
    name = min(concept.deltas)
    w0 = kv_layers(base.unet)[name].weight
    torch.testing.assert_close(kv_layers(pipe.unet)[name].weight, w0 + concept.deltas[name].to_dense())
    image = pipe("photo of a <new1> dog and a <new2> cat", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_clashing_tokens_are_renamed_and_reported(base, concepts):
    clash = [concepts[0], random_concept(base, seed=7, token="<new1>", class_word="cat")]
    concept, report = merge_concepts(base, clash)
    assert concept.tokens == ("<new1>", "<new2>")
    assert report.renamed_tokens == ("<new1> -> <new2>",)
    assert report.to_dict()["renamed_tokens"] == ["<new1> -> <new2>"]
    assert concept.provenance["renamed_tokens"] == ["<new1> -> <new2>"]
    assert report.summary["residual"] <= 1e-4


def test_low_rank_inputs_merge_like_their_dense_expansion(base):
    low = [random_concept(base, seed=10 + i, token=f"<new{i + 1}>", rank=3, class_word=CLASSES[i])
           for i in range(2)]
    dense = [dataclasses.replace(c, deltas={n: LinearDelta(dense=d.to_dense()) for n, d in c.deltas.items()})
             for c in low]
    from_low, report = merge_concepts(base, low)
    from_dense, _ = merge_concepts(base, dense)
    assert report.summary["residual"] <= 1e-4
    for name, delta in from_low.deltas.items():
        torch.testing.assert_close(delta.dense, from_dense.deltas[name].dense)


def test_compressed_concepts_merge(base, concepts):
    compressed = [compress_concept(c, fraction=0.6)[0] for c in concepts[:2]]
    assert all(d.rank is not None for c in compressed for d in c.deltas.values())
    _, report = merge_concepts(base, compressed)
    assert report.summary["residual"] <= 1e-4


def test_concepts_of_another_base_fail_naming_both_fingerprints(base, concepts, other_base_dir):
    other = load_base(other_base_dir)
    stranger = random_concept(other, seed=3, token="<new9>")
    assert other.fingerprint != base.fingerprint
    with pytest.raises(BaseMismatch) as err:
        merge_concepts(base, [stranger, random_concept(other, seed=4, token="<new8>")])
    assert base.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    with pytest.raises(BaseMismatch) as err:
        merge_concepts(other, [concepts[0], stranger])  # the inputs disagree with each other
    assert base.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    assert "concepts[1]" in str(err.value)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"ridge": -1.0}, "ridge"),
    ({"captions": ["  ", ""]}, "regularization_captions"),
    ({"context_captions": -1}, "context_captions"),
])
def test_invalid_merge_arguments_name_the_field(base, concepts, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        merge_concepts(base, concepts[:2], **kwargs)
    assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:
        merge_concepts(base, concepts[:1])
    assert err.value.field == "concepts"


def test_compress_concept_reports_ranks_errors_and_bytes(concepts):
    concept = concepts[0]
    small, report = compress_concept(concept, rank=4, dtype=torch.float32)
    assert all(d.rank == 4 and d.up.dtype == torch.float32 for d in small.deltas.values())
    assert [layer.rank for layer in report.layers] == [4] * 14
    for layer in report.layers:
        delta = concept.deltas[layer.layer].to_dense(torch.float64)
        s = torch.linalg.svdvals(delta)
        assert layer.relative_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-5)
    assert report.summary["bytes_before"] == concept.nbytes and report.summary["bytes_after"] == small.nbytes
    assert small.tokens == concept.tokens and small.provenance == {
        "kind": "compress", "parent": digest_of(concept_to_bytes(concept)), "rank": 4, "dtype": "float32"}
    full, report = compress_concept(concept, rank=10_000, dtype=torch.float32)
    for name, delta in concept.deltas.items():
        dense = delta.to_dense()
        assert torch.linalg.norm(full.deltas[name].to_dense() - dense) / torch.linalg.norm(dense) < 1e-5
    with pytest.raises(InvalidArgument) as err:
        compress_concept(concept, rank=2, energy=0.9)
    assert err.value.field == "target"


def test_merged_factors_hold_the_closed_form_delta_exactly(base, concepts, merged_two, monkeypatch):
    from merger import run

    factored, _ = merged_two
    monkeypatch.setattr(run, "_exact_deltas",
                        lambda merged, rank: {n: LinearDelta(dense=d.to(torch.float32)) for n, d in merged.items()})
    dense, _ = merge_concepts(base, concepts[:2])
    for name, delta in dense.deltas.items():
        torch.testing.assert_close(factored.deltas[name].to_dense(), delta.dense, rtol=1e-5, atol=1e-7)


def test_known_parent_digests_go_into_the_provenance_without_serializing_the_parents(base, concepts, merged_two,
                                                                                     monkeypatch):
    digests = [digest_of(concept_to_bytes(c)) for c in concepts[:2]]
    monkeypatch.setattr("merger.run.concept_to_bytes", None)  # a parent serialized would fail
    concept, _ = merge_concepts(base, concepts[:2], parents=digests)
    assert concept.provenance == merged_two[0].provenance
    assert all(torch.equal(concept.deltas[n].to_dense(), d.to_dense()) for n, d in merged_two[0].deltas.items())
    with pytest.raises(InvalidArgument, match="parents: 1 digests for 2 concepts"):
        merge_concepts(base, concepts[:2], parents=digests[:1])
