"""Per-request concept weight: a concept at weight w is diffusers with `W0 + w Δ` installed, per sample
of a mixed batch, from the gRPC front (ConceptRef.weight) through the client and the CLI to the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from concepts.apply import add_tokens, apply_concepts
from concepts.base import load_base
from customdiff.__main__ import main
from customdiff_client import Client, concept_ref
from engine.engine import Engine
from engine.schedulers import make_scheduler
from engine.kv import compute_kv
from engine.request import GenerationRequest
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings
from tests.conftest import random_concept

STEPS = 4
PROMPT = "photo of a <new1> dog"
TOLERANCE = 1e-4  # the parity tests' (tests/test_inference_engine.py)


@pytest.fixture(scope="module")
def d(store, tiny_base_dir) -> dict[str, str]:
    base = load_base(tiny_base_dir)
    return {
        "dense": store.put_concept(random_concept(base, 31, "<new1>", scale=0.1)),
        "lowrank": store.put_concept(random_concept(base, 32, "<new1>", rank=2, scale=0.1)),
        "new2": store.put_concept(random_concept(base, 33, "<new2>", rank=3, scale=0.1)),
    }


@pytest.fixture(scope="module")
def engine(tiny_base_dir, store) -> Engine:
    return Engine(load_base(tiny_base_dir), store, max_batch_images=16)


def pipeline_images(base, request: GenerationRequest) -> np.ndarray:
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=make_scheduler(base.scheduler, request.scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                num_images_per_prompt=request.num_images, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=generators, height=request.height or None, width=request.width or None,
                output_type="np").images


def reference(base_dir, store, request: GenerationRequest) -> np.ndarray:
    """diffusers with each concept's delta scaled by its weight added to the weights, tokens added."""
    base = load_base(base_dir)
    concepts = [store.get_concept(x) for x in request.concept_digests]
    apply_concepts(base.unet, base.text_encoder, base.tokenizer, concepts, weights=request.weights)
    return pipeline_images(base, request)


def max_diff(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


@pytest.mark.parametrize("weight", [0.5, 2.0])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_weighted_concept_is_diffusers_with_the_scaled_delta(engine, store, d, tiny_base_dir, kind, weight):
    request = GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=(d[kind],),
                                concept_weights=(weight,), num_inference_steps=STEPS, seed=7,
                                scheduler="ddim")
    ours = engine.generate(request)
    assert max_diff(ours, reference(tiny_base_dir, store, request)) < TOLERANCE
    # ... and the weight matters: weight 1 gives other images.
    unweighted = engine.generate(dataclasses.replace(request, concept_weights=()))
    assert max_diff(ours, unweighted) > 1e-2


def test_two_concepts_each_at_its_own_weight(engine, store, d, tiny_base_dir):
    request = GenerationRequest("a <new1> dog and a <new2> cat", concept_digests=(d["dense"], d["new2"]),
                                concept_weights=(0.3, 1.7), num_inference_steps=STEPS, seed=5,
                                scheduler="dpm_solver_multistep")
    assert max_diff(engine.generate(request), reference(tiny_base_dir, store, request)) < TOLERANCE


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_weight_zero_is_the_base_with_the_token_embedding_only(engine, store, d, tiny_base_dir, kind):
    request = GenerationRequest(PROMPT, concept_digests=(d[kind],), concept_weights=(0.0,),
                                num_inference_steps=STEPS, seed=3)
    base = load_base(tiny_base_dir)
    concept = store.get_concept(d[kind])
    add_tokens(base.tokenizer, base.text_encoder, concept.tokens, concept.embeddings)  # no deltas at all
    ours = engine.generate(request)
    assert max_diff(ours, pipeline_images(base, request)) < TOLERANCE
    # The embedding still acts: without the concept "<new1>" is plain BPE text.
    plain = engine.generate(GenerationRequest(PROMPT, num_inference_steps=STEPS, seed=3))
    assert max_diff(ours, plain) > 1e-2


def test_one_concept_at_different_weights_in_one_unet_batch(engine, store, d, tiny_base_dir):
    digest = d["lowrank"]
    first = GenerationRequest(PROMPT, concept_digests=(digest,), concept_weights=(0.5,),
                              num_inference_steps=STEPS, seed=1)
    requests = [
        first,
        dataclasses.replace(first, negative_prompt="blurry", concept_weights=(1.5,), seed=2, num_images=2,
                            guidance_scale=3.0),
        dataclasses.replace(first, concept_weights=()),
        dataclasses.replace(first, concept_weights=(0.0,)),
        dataclasses.replace(first, concept_digests=(d["dense"],), concept_weights=(2.0,), seed=4,
                            guidance_scale=1.0),
    ]
    device, host = engine.cache.cached()
    loads, new_digests = engine.cache.stats.loads, {digest, d["dense"]} - set(device + host)
    calls = []
    hook = engine.base.unet.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        batched = engine.generate_batch(requests)
    finally:
        hook.remove()
    scheduler = make_scheduler(engine.base.scheduler, "")
    scheduler.set_timesteps(STEPS)
    assert calls == [6 + 5] * len(scheduler.timesteps)  # one UNet batch: 6 images, 5 with guidance
    for request, images in zip(requests, batched):
        assert not isinstance(images, Exception), images
        assert max_diff(images, reference(tiny_base_dir, store, request)) < TOLERANCE
    assert max_diff(batched[0], batched[2]) > 1e-2 and max_diff(batched[2], batched[3]) > 1e-2
    # One cache entry per digest whatever its weights, and the weights never reached the cached tensors.
    assert engine.cache.stats.loads - loads == len(new_digests)
    cached, stored = engine.cache.get(digest), store.get_concept(digest)
    for name, delta in stored.deltas.items():
        torch.testing.assert_close(cached.deltas[name].up, delta.up.to(cached.deltas[name].up.dtype))
        torch.testing.assert_close(cached.deltas[name].down, delta.down.to(cached.deltas[name].down.dtype))


def test_kv_scales_each_rows_own_deltas(engine, store, d):
    a, b, dense = (store.get_concept(d[k]) for k in ("lowrank", "new2", "dense"))
    row_concepts = [(a, b), (a, b), (), (dense, a), (a,), (dense,)]
    row_weights = [(0.5, 1.0), (1.0, 2.0), (), (0.25, 0.0), (1.0,), (0.0,)]
    text = torch.randn(len(row_concepts), 77, 32, generator=torch.Generator().manual_seed(0))
    kv = compute_kv(engine.layers, text, row_concepts, row_weights)
    for path, attn in engine.layers.items():
        for i, proj in enumerate(("to_k", "to_v")):
            name = f"{path}.{proj}"
            for row, (concepts, weights) in enumerate(zip(row_concepts, row_weights)):
                deltas = sum(w * c.deltas[name].to_dense() for c, w in zip(concepts, weights))
                weight = getattr(attn, proj).weight + deltas
                expected = F.linear(text[row], weight).view(77, attn.heads, -1).transpose(0, 1)
                torch.testing.assert_close(kv[path][i][row], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not aligned"):
        compute_kv(engine.layers, text, row_concepts, row_weights[:-1])
    with pytest.raises(ValueError, match="not aligned"):
        compute_kv(engine.layers, text, row_concepts, [(1.0,)] * len(row_concepts))


def test_generate_command_passes_each_concepts_weight(engine, store, d, tiny_base_dir, tmp_path):
    prompt = "a <new1> dog and a <new2> cat"
    argv = ["generate", "--base", str(tiny_base_dir), "--store", store.url, "--concept", d["dense"],
            "--weight", "0.5", "--concept", d["new2"], "--prompt", prompt, "--steps", str(STEPS),
            "--seed", "9", "--out", str(tmp_path)]
    assert main(argv) == 0
    expected = engine.generate_png(GenerationRequest(prompt, concept_digests=(d["dense"], d["new2"]),
                                                     concept_weights=(0.5, 1.0), num_inference_steps=STEPS,
                                                     seed=9))
    assert [p.read_bytes() for p in sorted(tmp_path.glob("*.png"))] == expected
    with pytest.raises(SystemExit):  # a --weight must follow the --concept it weights
        main(["generate", "--base", "b", "--store", "s", "--weight", "0.5", "--concept", d["dense"],
              "--prompt", "x", "--out", str(tmp_path)])


def test_client_concept_refs_carry_the_weight():
    assert not concept_ref("dog").HasField("weight")
    assert concept_ref(("dog", 0.5)).weight == 0.5
    zero = concept_ref(("dog", 0))
    assert zero.HasField("weight") and zero.weight == 0.0


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_base_dir):
    """The inference front alone, with Triton replaced by a recorder of the GenerationRequest it is sent."""
    import services.inference.servicer as servicer

    tmp = tmp_path_factory.mktemp("weight-front")
    settings = Settings(database_url=f"sqlite:///{tmp}/registry.db", store_url=str(tmp / "store"),
                        work_dir=str(tmp / "jobs"), api_keys="key-a=tenant-a", trainer_port=0, merger_port=0,
                        inference_port=0, base_model=str(tiny_base_dir), triton_url="127.0.0.1:1")
    sent: list[GenerationRequest] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(servicer, "generate_on_replicas",
                      lambda endpoints, model, request, timeout: sent.append(request) or [b"png"])
        stack = start_stack(settings, components=("inference",))
        registry = Registry(settings.database_url)
        registry.add_concept("tenant-a", "cat", "c" * 64, ["<new1>"], ["cat"], 1, "fp", {})
        registry.add_concept("tenant-a", "hat", "e" * 64, ["<new2>"], ["hat"], 1, "fp", {})
        address = f"127.0.0.1:{stack.ports['inference']}"
        client = Client(address, address, address, api_key="key-a")
        yield client, sent
        client.close()
        stack.stop(0)


@pytest.mark.parametrize("concepts, weights", [
    (["cat", "hat"], ()),
    ([("cat", 0.5), "hat"], (0.5, 1.0)),
    ([("cat", 0), ("hat", 2)], (0.0, 2.0)),
    ([("cat", 1.0)], ()),
])
def test_front_passes_the_weights_to_the_engine_request(front, concepts, weights):
    client, sent = front
    response = client.generate("a <new1> cat", concepts=concepts, seed=1)
    names = [c if isinstance(c, str) else c[0] for c in concepts]
    assert list(response.concept_digests) == [{"cat": "c" * 64, "hat": "e" * 64}[n] for n in names]
    assert sent[-1].concept_digests == tuple(response.concept_digests) and sent[-1].concept_weights == weights
