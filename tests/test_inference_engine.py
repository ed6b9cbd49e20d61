"""The multi-concept engine against diffusers' StableDiffusionPipeline with the concepts installed (the contract)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from concepts.apply import apply_concepts
from concepts.base import load_base
from concepts.errors import BaseMismatch, CorruptArtifact, InvalidArgument
from customdiff.__main__ import main
from engine.engine import Engine
from engine.schedulers import make_scheduler
from engine.kv import compute_kv
from engine.request import GenerationRequest
from tests.conftest import random_concept

STEPS = 4
PROMPT = "photo of a <new1> dog"
SCHEDULERS = ["", "ddim", "dpm_solver_multistep", "euler"]


@pytest.fixture(scope="module")
def d(store, tiny_base_dir) -> dict[str, str]:
    """Digests of four concepts: two both own "<new1>"."""
    base = load_base(tiny_base_dir)
    return {
        "dense": store.put_concept(random_concept(base, 1, "<new1>")),
        "lowrank": store.put_concept(random_concept(base, 2, "<new1>", rank=2)),
        "new2": store.put_concept(random_concept(base, 3, "<new2>", rank=3)),
        "new3": store.put_concept(random_concept(base, 4, "<NEW3>")),
    }


@pytest.fixture(scope="module")
def engine(tiny_base_dir, store) -> Engine:
    return Engine(load_base(tiny_base_dir), store, max_batch_images=16)


def diffusers_images(base_dir, store, request: GenerationRequest) -> np.ndarray:
    """The reference: a plain pipeline with the concepts' deltas added to the weights and tokens added."""
    base = load_base(base_dir)
    apply_concepts(base.unet, base.text_encoder, base.tokenizer, [store.get_concept(d) for d in request.concept_digests])
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=make_scheduler(base.scheduler, request.scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None, num_images_per_prompt=request.num_images,
                num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                generator=generators, height=request.height or None, width=request.width or None,
                output_type="np").images


def max_diff(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_parity_with_diffusers(engine, store, d, tiny_base_dir, kind, scheduler):
    request = GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=(d[kind],),
                                num_inference_steps=STEPS, seed=7, scheduler=scheduler)
    assert max_diff(engine.generate(request), diffusers_images(tiny_base_dir, store, request)) < 1e-4


def test_no_concept_is_plain_diffusers_even_with_a_literal_modifier_token(engine, store, d, tiny_base_dir):
    # Without a concept "<new1>" is ordinary text (BPE pieces), as in a pipeline that never saw it.
    request = GenerationRequest(PROMPT, num_inference_steps=STEPS, seed=3)
    plain = engine.generate(request)
    assert max_diff(plain, diffusers_images(tiny_base_dir, store, request)) < 1e-4
    # ... and a concept matters: the parity tests above compare images that differ from the plain one.
    with_concept = engine.generate(GenerationRequest(PROMPT, concept_digests=(d["dense"],), num_inference_steps=STEPS,
                                                     seed=3))
    assert max_diff(plain, with_concept) > 1e-2


def test_images_use_seed_plus_i_without_guidance(engine, store, d, tiny_base_dir):
    request = GenerationRequest(PROMPT, concept_digests=(d["lowrank"],), num_images=3, guidance_scale=1.0,
                                num_inference_steps=STEPS, seed=11, height=48, width=72)
    ours = engine.generate(request)
    assert [im.shape for im in ours] == [(48, 72, 3)] * 3
    assert max_diff(ours, diffusers_images(tiny_base_dir, store, request)) < 1e-4
    single = engine.generate(GenerationRequest(PROMPT, concept_digests=(d["lowrank"],), guidance_scale=1.0,
                                               num_inference_steps=STEPS, seed=12, height=48, width=72))
    assert max_diff(ours[1:2], single) < 1e-5


def test_two_concepts_in_one_request_add_up(engine, store, d, tiny_base_dir):
    digests = (d["dense"], d["new2"])
    request = GenerationRequest("a <new1> dog and a <new2> cat", concept_digests=digests,
                                num_inference_steps=STEPS, seed=5, scheduler="dpm_solver_multistep")
    assert max_diff(engine.generate(request), diffusers_images(tiny_base_dir, store, request)) < 1e-4


def test_kv_is_the_base_projection_plus_each_rows_own_deltas(engine, store, d):
    a, b, dense = (store.get_concept(d[k]) for k in ("lowrank", "new2", "dense"))  # ranks 2 and 3, dense
    row_concepts = [(a, b), (), (b,), (dense, a)]
    text = torch.randn(len(row_concepts), 77, 32, generator=torch.Generator().manual_seed(0))
    kv = compute_kv(engine.layers, text, row_concepts)
    for path, attn in engine.layers.items():
        for i, proj in enumerate(("to_k", "to_v")):
            name = f"{path}.{proj}"
            for row, concepts in enumerate(row_concepts):
                weight = getattr(attn, proj).weight + sum(c.deltas[name].to_dense() for c in concepts)
                expected = F.linear(text[row], weight).view(77, attn.heads, -1).transpose(0, 1)
                torch.testing.assert_close(kv[path][i][row], expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_single_runs_in_one_unet_batch(engine, d):
    requests = [
        GenerationRequest(PROMPT, concept_digests=(d["dense"],), num_inference_steps=STEPS, seed=1),
        GenerationRequest(PROMPT, "blurry", concept_digests=(d["lowrank"],), num_inference_steps=STEPS, seed=2,
                          num_images=2, guidance_scale=3.0),
        GenerationRequest("a <new2> cat", concept_digests=(d["new2"],), num_inference_steps=STEPS, seed=3,
                          guidance_scale=1.0),
        GenerationRequest("a <new3> in the snow", concept_digests=(d["new3"],), num_inference_steps=STEPS, seed=4),
    ]
    calls = []
    hook = engine.base.unet.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        batched = engine.generate_batch(requests)
    finally:
        hook.remove()
    # One UNet call per timestep for all four: 5 images, 4 of them (requests 0, 1, 3) with guidance.
    scheduler = make_scheduler(engine.base.scheduler, "")
    scheduler.set_timesteps(STEPS)
    assert calls == [5 + 4] * len(scheduler.timesteps)
    for request, images in zip(requests, batched):
        assert max_diff(images, engine.generate(request)) < 1e-4
    # Both "<new1>" owners got their own embedding and deltas.
    assert max_diff(batched[0][:1], engine.generate(GenerationRequest(
        PROMPT, concept_digests=(d["lowrank"],), num_inference_steps=STEPS, seed=1))) > 1e-2


def test_bad_requests_fail_alone(engine, store, d, other_base_dir):
    foreign = store.put_concept(random_concept(load_base(other_base_dir), 9))
    good = GenerationRequest(PROMPT, concept_digests=(d["dense"],), num_inference_steps=STEPS, seed=1)
    results = engine.generate_batch([
        GenerationRequest(PROMPT, concept_digests=("ab" * 32,), num_inference_steps=STEPS),
        good,
        GenerationRequest("dog " * 80, num_inference_steps=STEPS),
        GenerationRequest(PROMPT, concept_digests=(foreign,), num_inference_steps=STEPS),
        GenerationRequest(PROMPT, concept_digests=(d["dense"], d["lowrank"]),
                          num_inference_steps=STEPS),
    ])
    assert isinstance(results[0], CorruptArtifact)  # a digest the registry lists, gone from the store
    assert max_diff(results[1], engine.generate(good)) < 1e-4
    assert isinstance(results[2], InvalidArgument) and results[2].field == "prompt" and "80 tokens" in str(results[2])
    assert isinstance(results[3], BaseMismatch)
    assert isinstance(results[4], InvalidArgument) and results[4].field == "concept_digests"
    assert "'<new1>'" in str(results[4])


def test_generate_command_writes_the_engines_pngs(engine, store, d, tiny_base_dir, tmp_path):
    digest = d["new2"]
    argv = ["generate", "--base", str(tiny_base_dir), "--store", store.url, "--concept", digest,
            "--prompt", "a <new2> cat", "--steps", str(STEPS), "--seed", "9", "--num-images", "2",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == ["image-0-seed9.png", "image-1-seed10.png"]
    expected = engine.generate_png(GenerationRequest("a <new2> cat", concept_digests=(digest,), num_images=2,
                                                     num_inference_steps=STEPS, seed=9))
    assert [p.read_bytes() for p in written] == expected
