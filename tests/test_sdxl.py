"""SDXL on the tiny SDXL-shaped base: two text encoders, their penultimate states concatenated, the pooled
``text_embeds`` and ``time_ids`` as the UNet's added conditions, all read from the base's own configs.

The engine against `StableDiffusionXLPipeline` with the deltas in its weights and the token rows in
both encoders, for dense and low-rank concepts and several schedulers; a mixed batch of concepts at
different sizes against single runs; the step-level loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from concepts.apply import apply_concepts
from concepts.artifact import concept_from_bytes, concept_to_bytes
from concepts.base import kv_layers, load_base
from concepts.store import ArtifactStore
from concepts.tiny import HIDDEN_SDXL, create_tiny_base
from customdiff.__main__ import main
from engine.engine import Engine
from engine.kv import install_kv_processors
from engine.loop import StepLoop
from engine.request import GenerationRequest
from tests.conftest import random_concept

STEPS = 4
PROMPT = "photo of a <new1> dog"
OTHER_SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpm_solver_multistep": DPMSolverMultistepScheduler}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, family="sdxl")


@pytest.fixture(scope="module")
def sdxl_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(str(tmp_path_factory.mktemp("sdxl-store")))


@pytest.fixture(scope="module")
def digests(sdxl_dir, sdxl_store) -> dict[str, str]:
    base = load_base(sdxl_dir)
    return {"dense": sdxl_store.put_concept(random_concept(base, 1)),
            "lowrank": sdxl_store.put_concept(random_concept(base, 2, rank=2)),
            "cat": sdxl_store.put_concept(random_concept(base, 3, "<new2>", rank=3, class_word="cat")),
            "lowrank2": sdxl_store.put_concept(random_concept(base, 4, "<new3>", rank=2))}


@pytest.fixture(scope="module")
def engine(sdxl_dir, sdxl_store) -> Engine:
    return Engine(load_base(sdxl_dir), sdxl_store)


def _pipe(base_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(base_dir: Path, store: ArtifactStore, request: GenerationRequest) -> np.ndarray:
    """A plain SDXL pipeline from the directory: the deltas in its UNet, the token rows in both encoders."""
    pipe = _pipe(base_dir)
    concepts = [store.get_concept(d) for d in request.concept_digests]
    apply_concepts(pipe.unet, pipe.text_encoder, pipe.tokenizer, concepts, text_encoder_2=pipe.text_encoder_2,
                   tokenizer_2=pipe.tokenizer_2)
    if request.scheduler:
        pipe.scheduler = OTHER_SCHEDULERS[request.scheduler].from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                num_images_per_prompt=request.num_images, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale, generator=generators, height=request.height or None,
                width=request.width or None, output_type="np").images


def max_diff(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


def test_the_sdxl_base_loads_in_diffusers_and_its_family_is_read_from_its_configs(sdxl_dir, tmp_path):
    pipe = _pipe(sdxl_dir)
    assert type(pipe.scheduler) is EulerDiscreteScheduler and pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    assert widths == HIDDEN_SDXL and pipe.unet.config.cross_attention_dim == sum(HIDDEN_SDXL)
    base = load_base(sdxl_dir)
    assert base.family == "sdxl" and base.force_zeros_for_empty_prompt and base.tokenizer_2.pad_token == "!"
    assert [type(e).__name__ for _, e in base.text_pairs] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    layers = kv_layers(base.unet)
    # No cross-attention in the first block; two transformer blocks per attention in the second.
    assert not any(n.startswith("down_blocks.0") for n in layers) and len(layers) == 16
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in layers
    assert all(layer.in_features == sum(HIDDEN_SDXL) for layer in layers.values())
    assert len(install_kv_processors(base.unet)) == 8
    # The CLI writes the same bytes.
    assert main(["base", "create-tiny", str(tmp_path / "cli"), "--family", "sdxl"]) == 0
    for f in sorted(p.relative_to(sdxl_dir) for p in sdxl_dir.rglob("*") if p.is_file()):
        assert (tmp_path / "cli" / f).read_bytes() == (sdxl_dir / f).read_bytes(), f


def test_an_sdxl_artifact_keeps_both_token_rows_and_its_family(sdxl_dir):
    concept = random_concept(load_base(sdxl_dir), 9)
    assert concept.embeddings.shape == (1, HIDDEN_SDXL[0]) and concept.embeddings_2.shape == (1, HIDDEN_SDXL[1])
    back = concept_from_bytes(concept_to_bytes(concept))
    assert back.family == "sdxl" and torch.equal(back.embeddings_2, concept.embeddings_2)
    assert back.nbytes == concept.nbytes and concept_to_bytes(back) == concept_to_bytes(concept)


@pytest.mark.parametrize("scheduler", ["", *OTHER_SCHEDULERS])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_parity_with_the_sdxl_pipeline(engine, sdxl_store, digests, sdxl_dir, kind, scheduler):
    request = GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=(digests[kind],),
                                num_inference_steps=STEPS, seed=7, scheduler=scheduler)
    assert max_diff(engine.generate(request), reference_images(sdxl_dir, sdxl_store, request)) <= 1e-4


def test_an_empty_negative_prompt_conditions_on_zeros_as_the_pipeline_does(engine, sdxl_store, digests, sdxl_dir):
    request = GenerationRequest("a <new1> dog and a <new2> cat", concept_digests=(digests["dense"], digests["cat"]),
                                num_inference_steps=STEPS, seed=3, num_images=2)
    ours = engine.generate(request)
    assert max_diff(ours, reference_images(sdxl_dir, sdxl_store, request)) <= 1e-4
    # Not the same as encoding "" (what the pipeline does when force_zeros_for_empty_prompt is off).
    encoded = dataclasses.replace(request, negative_prompt=" ")
    assert max_diff(ours, engine.generate(encoded)) > 1e-3


def test_a_mixed_batch_of_four_concepts_at_four_sizes_equals_four_single_runs(engine, sdxl_store, digests):
    sizes = [(64, 64), (64, 96), (96, 64), (64, 64)]
    kinds = ["dense", "lowrank", "cat", "lowrank2"]
    tokens = ["<new1>", "<new1>", "<new2>", "<new3>"]
    requests = [GenerationRequest(f"a {tok} thing", concept_digests=(digests[k],), num_inference_steps=STEPS,
                                  seed=10 + i, height=h, width=w)
                for i, (k, tok, (h, w)) in enumerate(zip(kinds, tokens, sizes))]
    mixed = engine.generate_batch(requests)
    singles = [engine.generate(r) for r in requests]
    for (h, w), got, want in zip(sizes, mixed, singles):
        assert np.stack(got).shape == (1, h, w, 3) and max_diff(got, want) <= 1e-5
    # The size reaches the UNet through time_ids: the same noise at another declared size differs.
    assert max_diff(singles[0], singles[3]) > 1e-3


def test_a_request_joining_the_step_loop_mid_way_gives_its_images_alone(engine, sdxl_store, digests):
    loop = StepLoop(engine, max_batch_images=8)
    long = GenerationRequest(PROMPT, concept_digests=(digests["dense"],), num_inference_steps=8, seed=1)
    short = GenerationRequest("a <new2> cat", concept_digests=(digests["cat"],), num_inference_steps=3, seed=2,
                              scheduler="dpm_solver_multistep")
    first = loop.submit(long)
    for _ in range(3):
        loop.step()
    second = loop.submit(short)
    loop.step()
    assert len(loop.running) == 2  # the second joined at step 4 of the first
    loop.run_until_idle()
    for future, request in ((first, long), (second, short)):
        assert max_diff(future.result(), engine.generate(request)) <= 1e-5
