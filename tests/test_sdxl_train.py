"""Training and merging on the tiny SDXL-shaped base: the modifier token in both text encoders, the SDXL
conditioning (both encoders' penultimate states, the pooled text and the size/crop ``time_ids``) in the
training forward, and merge constraints on the 96-wide concatenated features.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from concepts.base import KV_SUFFIXES, kv_layers, load_base
from concepts.errors import InvalidArgument
from concepts.store import ArtifactStore
from concepts.tiny import HIDDEN_SDXL, create_tiny_base
from engine.engine import Engine
from engine.request import GenerationRequest
from merger.features import concept_features
from merger.run import compress_concept, merge_concepts, rename_clashing_tokens
from tests.conftest import random_concept
from tests.trainer_helpers import job_dict, pattern_images
from trainer.data import ZOOM_IN_PREFIXES, augmented_view, center_square, class_examples, instance_examples
from trainer.distributed import init_distributed
from trainer.job import build_state, run_job
from trainer.progress import ProgressLog
from trainer.spec import JobSpec, check_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, family="sdxl")


@pytest.fixture(scope="module")
def trained(sdxl_dir, tmp_path_factory):
    """One concept trained for 3 steps on the SDXL base (with generated class images): (result, store)."""
    root = tmp_path_factory.mktemp("sdxl-train")
    result = run_job(JobSpec.from_dict(job_dict(sdxl_dir, root, pattern_images(root / "stripes"),
                                                {"max_train_steps": 3, "learning_rate": 1e-4})))
    return result, ArtifactStore(str(root / "store"))


def _embedding_name(encoder: torch.nn.Module) -> str:
    return next(n for n, p in encoder.named_parameters() if p is encoder.get_input_embeddings().weight)


def test_training_changes_only_kv_and_both_token_rows(trained, sdxl_dir):
    result, store = trained
    fresh = load_base(sdxl_dir)
    concept = store.get_concept(result.digest)
    assert concept.tokens == ("<new1>",) and concept.base_fingerprint == fresh.fingerprint
    assert concept.family == "sdxl"
    assert concept.embeddings.shape == (1, HIDDEN_SDXL[0]) and concept.embeddings_2.shape == (1, HIDDEN_SDXL[1])
    layers = kv_layers(fresh.unet, KV_SUFFIXES)
    assert sorted(concept.deltas) == sorted(layers)
    for name, delta in concept.deltas.items():
        assert delta.shape == tuple(layers[name].weight.shape) and delta.to_dense().abs().max() > 0, name
    ref = dict(fresh.unet.named_parameters())
    changed = {n for n, p in result.base.unet.named_parameters() if not torch.equal(p.detach(), ref[n])}
    assert changed == {f"{name}.weight" for name in layers}
    pairs = zip(fresh.text_pairs, result.base.text_pairs, concept.token_rows, HIDDEN_SDXL, strict=True)
    for (tokenizer, encoder), (_, tuned_encoder), rows, width in pairs:
        embedding = _embedding_name(encoder)
        ref_te = dict(encoder.named_parameters())
        for name, p in tuned_encoder.named_parameters():
            if name != embedding:
                assert torch.equal(p, ref_te[name]), name
        tuned = dict(tuned_encoder.named_parameters())[embedding]
        vocab = ref_te[embedding].shape[0]
        assert tuned.shape == (vocab + 1, width) and torch.equal(tuned[:vocab], ref_te[embedding])
        assert torch.equal(tuned[vocab:], rows)  # the stored row is the row the encoder was left with
        initial = ref_te[embedding][tokenizer.encode("ktn", add_special_tokens=False)]
        assert (rows - initial).norm() > 1e-4  # the token row trained


class _Draws:
    """A stand-in for `np.random.Generator` that makes the draws `augmented_view` asks for."""

    def __init__(self, uniform: float, scale: int, corner: tuple[int, int]) -> None:
        self.uniform, self.scale, self.corner = uniform, scale, corner

    def random(self) -> float:
        return self.uniform

    def integers(self, low: int, high: int | None = None, size: int | None = None):
        if size == 2:
            return np.array(self.corner)
        return 0 if high is None else self.scale  # a caption prefix, or the zoom scale


def test_time_ids_are_the_source_size_the_crop_and_the_target(sdxl_dir, tmp_path):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))  # h 80, w 120
    square = center_square(source, 64)  # cut at x 20 of 120: x 16 once the source is resized to 64 px high
    (plain,) = instance_examples([(source, "a")], 64, 8, 1, seed=0, augment=False, hflip=False)
    assert plain.time_ids == (80, 120, 0, 16, 64, 64)
    assert [e.time_ids for e in class_examples([(source, "dog")], 64, 8, hflip=True)] == [(80, 120, 0, 16, 64, 64)] * 2
    # Zoom-in to 80 px: the square starts at x 20 of the source resized to 80 px high, the view 3 down, 5 right.
    zoom_in = augmented_view(square, "a", 64, 8, _Draws(0.9, 80, (3, 5)), True, False, (80, 120))
    assert zoom_in.caption == ZOOM_IN_PREFIXES[0] + "a" and zoom_in.time_ids == (80, 120, 3, 25, 64, 64)
    # Zoom-out to 40 px: the whole square shows, at x 10 of the source resized to 40 px high.
    zoom_out = augmented_view(square, "a", 64, 8, _Draws(0.1, 40, (3, 5)), True, False, (80, 120))
    assert zoom_out.time_ids == (80, 120, 0, 10, 64, 64)
    # Every example of a training batch gets its own: a 64 x 96 (w x h) target, centered, no augmentation.
    Image.fromarray(np.full((96, 64, 3), 200, np.uint8)).save(tmp_path / "tall.png")
    hp = {"with_prior_preservation": False, "views_per_image": 1, "augment": False, "hflip": False,
          "train_batch_size": 2}
    spec = check_inputs(JobSpec.from_dict(job_dict(sdxl_dir, tmp_path, [str(tmp_path / "tall.png")], hp)))
    state, _, _ = build_state(spec, load_base(sdxl_dir), [], init_distributed("cpu"), ProgressLog(spec.work_dir))
    batch = state.batches.make(0)
    assert batch.time_ids.tolist() == [[96, 64, 16, 0, 64, 64]] * 2
    assert batch.instance_ids.shape == (2, 2, 77)  # the caption's ids for each tokenizer


def test_trained_concept_generates_and_merges_within_its_constraints(trained, sdxl_dir):
    result, store = trained
    base = load_base(sdxl_dir)
    (image,) = Engine(base, store).generate(GenerationRequest("photo of a <new1> dog", concept_digests=(result.digest,),
                                                              num_inference_steps=2, seed=0))
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    concepts = [store.get_concept(result.digest), random_concept(base, 5, "<new1>", class_word="cat")]
    merged, report = merge_concepts(base, concepts)
    assert merged.tokens == ("<new1>", "<new2>") and merged.family == "sdxl"
    assert merged.embeddings.shape == (2, HIDDEN_SDXL[0]) and merged.embeddings_2.shape == (2, HIDDEN_SDXL[1])
    torch.testing.assert_close(merged.embeddings_2, torch.cat([c.embeddings_2 for c in concepts]))
    renamed, _ = rename_clashing_tokens(concepts, set(base.tokenizer.get_vocab()))
    targets = concept_features(base.tokenizer, base.text_encoder, renamed, (), 0, base.tokenizer_2, base.text_encoder_2)
    assert [t.shape for t in targets] == [(6, sum(HIDDEN_SDXL))] * 2  # (<new_i>, class, end) twice, 96 wide
    assert report.summary["constraints"] == 12 and report.summary["residual"] <= 1e-4
    layers = kv_layers(base.unet)
    for concept, c in zip(concepts, targets):  # C_i W_merged^T = C_i W_i^T on every layer
        errors, norms = 0.0, 0.0
        for name, layer in layers.items():
            w0 = layer.weight.double()
            want = c @ (w0 + concept.deltas[name].to_dense(torch.float64)).T
            errors += float((c @ (w0 + merged.deltas[name].to_dense(torch.float64)).T - want).square().sum())
            norms += float(want.square().sum())
        assert (errors / norms) ** 0.5 <= 1e-4
    compressed, _ = compress_concept(merged, fraction=0.6)
    assert torch.equal(compressed.embeddings_2, merged.embeddings_2) and compressed.family == "sdxl"
    assert sorted(compressed.deltas) == sorted(layers)
    for name, delta in compressed.deltas.items():
        assert delta.rank is not None and delta.shape == tuple(layers[name].weight.shape), name
    with pytest.raises(InvalidArgument) as err:  # rows for one text encoder cannot be merged on SDXL
        merge_concepts(base, [concepts[0], dataclasses.replace(concepts[1], embeddings_2=None)])
    assert err.value.field == "concepts[1]"
