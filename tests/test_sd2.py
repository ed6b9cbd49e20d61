"""Stable Diffusion 2.x end to end on the tiny SD-2-shaped base: v-prediction, linear projections, a head
count per block, upcast attention and a wider text encoder, all read from the base's own configs.

Load, train, merge and compress, generate (engine against `StableDiffusionPipeline` with the deltas in
its weights, for the base's scheduler and others), ONNX export, diffusers interop, and one Generate
through the gRPC service and a real tritonserver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from concepts.apply import apply_concepts
from concepts.base import KV_SUFFIXES, kv_layers, load_base
from concepts.errors import InvalidArgument
from concepts.interop import export_diffusers, import_concept
from concepts.store import ArtifactStore
from concepts.tiny import HIDDEN, HIDDEN_SD2, create_tiny_base
from customdiff.__main__ import main
from engine.engine import Engine
from engine.kv import compute_kv, install_kv_processors
from engine.onnx_export import export_onnx
from engine.onnx_unet import onnx_unet
from engine.request import GenerationRequest
from engine.schedulers import SCHEDULERS, make_scheduler
from merger.run import compress_concept, merge_concepts
from tests.conftest import assert_served_like_the_engine, random_concept
from tests.test_interop import _install_exported
from tests.trainer_helpers import job_dict, pattern_images
from trainer.distributed import init_distributed
from trainer.job import build_state, run_job
from trainer.progress import ProgressLog
from trainer.spec import JobSpec, check_inputs

STEPS = 4
PROMPT = "photo of a <new1> dog"
# The engine's scheduler names -> the diffusers class a user would swap into the pipeline.
OTHER_SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpm_solver_multistep": DPMSolverMultistepScheduler}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-sd2"), seed=0, family="sd2")


@pytest.fixture(scope="module")
def sd2_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(str(tmp_path_factory.mktemp("sd2-store")))


@pytest.fixture(scope="module")
def trained(sd2_dir, tmp_path_factory):
    """One concept trained for 3 steps on the sd2 base (with generated class images): (result, store)."""
    root = tmp_path_factory.mktemp("sd2-train")
    result = run_job(JobSpec.from_dict(job_dict(sd2_dir, root, pattern_images(root / "stripes"),
                                                {"max_train_steps": 3, "learning_rate": 1e-4})))
    return result, ArtifactStore(str(root / "store"))


@pytest.fixture(scope="module")
def digests(sd2_dir, sd2_store, trained) -> dict[str, str]:
    """A dense and a low-rank random concept, the trained one, and the compressed merge of two."""
    base = load_base(sd2_dir)
    result, store = trained
    merged, _ = merge_concepts(base, [result.concept, random_concept(base, 5, "<new1>", class_word="cat")])
    compressed, _ = compress_concept(merged, fraction=0.6)
    return {"dense": sd2_store.put_concept(random_concept(base, 1)),
            "lowrank": sd2_store.put_concept(random_concept(base, 2, rank=2)),
            "trained": sd2_store.put(store.get(result.digest)),
            "compressed": sd2_store.put_concept(compressed)}


@pytest.fixture(scope="module")
def engine(sd2_dir, sd2_store) -> Engine:
    return Engine(load_base(sd2_dir), sd2_store)


def _pipe(base_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(base_dir: Path, store: ArtifactStore, request: GenerationRequest,
                     prediction_type: str | None = None) -> np.ndarray:
    """A plain diffusers pipeline from the directory, the concepts' deltas in its weights and their tokens
    added, the scheduler swapped as a diffusers user swaps it (`from_config` of the pipeline's own)."""
    pipe = _pipe(base_dir)
    concepts = [store.get_concept(d) for d in request.concept_digests]
    apply_concepts(pipe.unet, pipe.text_encoder, pipe.tokenizer, concepts)
    if request.scheduler:
        pipe.scheduler = OTHER_SCHEDULERS[request.scheduler].from_config(pipe.scheduler.config)
    if prediction_type is not None:
        config = pipe.scheduler.config
        pipe.scheduler = type(pipe.scheduler).from_config(config, prediction_type=prediction_type)
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                num_images_per_prompt=request.num_images, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale, generator=generators, output_type="np").images


def max_diff(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


def test_the_sd2_base_loads_in_diffusers_and_its_family_is_in_its_configs(sd2_dir, tiny_base_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd2_dir)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.prediction_type == "v_prediction"
    unet, sd15 = pipe.unet.config, load_base(tiny_base_dir).unet.config
    assert unet.use_linear_projection and unet.upcast_attention and not sd15.use_linear_projection
    assert tuple(unet.attention_head_dim) == (2, 4)  # diffusers' name for the head count per block
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size == HIDDEN_SD2 != HIDDEN
    assert pipe.tokenizer.pad_token == "!" and pipe.text_encoder.config.hidden_act == "gelu"
    base = load_base(sd2_dir)  # what every stage loads
    assert type(base.scheduler) is DDIMScheduler and base.scheduler.config.prediction_type == "v_prediction"
    heads = {path: attn.heads for path, attn in install_kv_processors(base.unet).items()}
    assert sorted(set(heads.values())) == [2, 4] and len(kv_layers(base.unet)) == 14
    assert all(layer.in_features == HIDDEN_SD2 for layer in kv_layers(base.unet).values())
    out = pipe("photo of a dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0.01
    # The CLI writes the same bytes; the family is a choice.
    assert main(["base", "create-tiny", str(tmp_path / "cli"), "--family", "sd2"]) == 0
    for f in sorted(p.relative_to(sd2_dir) for p in sd2_dir.rglob("*") if p.is_file()):
        assert (tmp_path / "cli" / f).read_bytes() == (sd2_dir / f).read_bytes(), f
    with pytest.raises(InvalidArgument, match="family"):
        create_tiny_base(tmp_path / "x", family="sd3")


def test_every_scheduler_the_engine_offers_keeps_the_bases_prediction_type(sd2_dir):
    base = load_base(sd2_dir)
    for name in SCHEDULERS:
        scheduler = make_scheduler(base.scheduler, name)
        assert scheduler.config.prediction_type == "v_prediction", name


def test_training_changes_only_kv_and_the_token_row(trained, sd2_dir):
    result, store = trained
    fresh = load_base(sd2_dir)
    concept = store.get_concept(result.digest)
    assert concept.tokens == ("<new1>",) and concept.base_fingerprint == fresh.fingerprint
    assert concept.embeddings.shape == (1, HIDDEN_SD2)
    layers = kv_layers(fresh.unet, KV_SUFFIXES)
    assert sorted(concept.deltas) == sorted(layers)
    for name, delta in concept.deltas.items():
        assert delta.shape == tuple(layers[name].weight.shape) and delta.to_dense().abs().max() > 0, name
    ref = dict(fresh.unet.named_parameters())
    changed = {n for n, p in result.base.unet.named_parameters() if not torch.equal(p.detach(), ref[n])}
    assert changed == {f"{name}.weight" for name in layers}
    ref_te = dict(fresh.text_encoder.named_parameters())
    embedding = next(n for n, p in ref_te.items() if p is fresh.text_encoder.get_input_embeddings().weight)
    for name, p in result.base.text_encoder.named_parameters():
        if name != embedding:
            assert torch.equal(p, ref_te[name]), name
    tuned = dict(result.base.text_encoder.named_parameters())[embedding]
    vocab = ref_te[embedding].shape[0]
    assert tuned.shape == (vocab + 1, HIDDEN_SD2) and torch.equal(tuned[:vocab], ref_te[embedding])
    initializer = fresh.tokenizer.encode("ktn", add_special_tokens=False)
    initial = fresh.text_encoder.get_input_embeddings().weight[initializer]
    assert (concept.embeddings - initial).norm() > 1e-4  # the token row trained


def test_training_regresses_the_velocity_the_bases_scheduler_predicts(sd2_dir, tmp_path):
    images = pattern_images(tmp_path / "stripes", count=1)
    hp = {"with_prior_preservation": False, "views_per_image": 1}
    spec = check_inputs(JobSpec.from_dict(job_dict(sd2_dir, tmp_path, images, hp)))
    ctx, progress = init_distributed("cpu"), ProgressLog(spec.work_dir)
    state, _, _ = build_state(spec, load_base(sd2_dir), [], ctx, progress)
    assert state.noise_scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    alpha = state.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents  # v = sqrt(a) eps - sqrt(1 - a) x0
    torch.testing.assert_close(state.target(latents, noise, t), velocity)


def test_merge_and_compress_keep_the_sd2_widths(sd2_store, digests, sd2_dir):
    compressed = sd2_store.get_concept(digests["compressed"])
    assert compressed.tokens == ("<new1>", "<new2>") and compressed.class_words == ("dog", "cat")
    assert compressed.embeddings.shape == (2, HIDDEN_SD2)
    assert compressed.provenance["kind"] == "compress" and compressed.provenance["fraction"] == 0.6
    layers = kv_layers(load_base(sd2_dir).unet)
    assert sorted(compressed.deltas) == sorted(layers)
    for name, delta in compressed.deltas.items():
        assert delta.rank is not None and delta.shape == tuple(layers[name].weight.shape), name


@pytest.mark.parametrize("scheduler", ["", *OTHER_SCHEDULERS])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_parity_with_diffusers(engine, sd2_store, digests, sd2_dir, kind, scheduler):
    request = GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=(digests[kind],),
                                num_inference_steps=STEPS, seed=7, scheduler=scheduler)
    assert max_diff(engine.generate(request), reference_images(sd2_dir, sd2_store, request)) <= 1e-4


def test_parity_of_trained_and_merged_concepts_and_v_prediction_matters(engine, sd2_store, digests, sd2_dir):
    trained = GenerationRequest(PROMPT, concept_digests=(digests["trained"],), num_inference_steps=STEPS,
                                seed=3)
    ours = engine.generate(trained)
    assert max_diff(ours, reference_images(sd2_dir, sd2_store, trained)) <= 1e-4
    # The same pipeline stepping the prediction as noise gives another image: the test sees the type.
    assert max_diff(ours, reference_images(sd2_dir, sd2_store, trained, prediction_type="epsilon")) > 1e-2
    merged = GenerationRequest("a <new1> dog and a <new2> cat", concept_digests=(digests["compressed"],),
                               num_inference_steps=STEPS, seed=4, scheduler="euler")
    assert max_diff(engine.generate(merged), reference_images(sd2_dir, sd2_store, merged)) <= 1e-4


@torch.no_grad()
def test_onnx_export_matches_torch_with_deltas_applied(sd2_dir, tmp_path):
    summary = export_onnx(sd2_dir, tmp_path / "onnx")
    assert sorted({heads for _, heads, _ in summary["kv_layout"]}) == [2, 4]
    base = load_base(sd2_dir)
    dense, low_rank = random_concept(base, 1, "<new1>"), random_concept(base, 2, "<new2>", rank=2)
    rows = [(dense,), (low_rank,), (), (dense, low_rank)]
    g = torch.Generator().manual_seed(3)
    text = torch.randn(len(rows), 77, HIDDEN_SD2, generator=g)
    sample = torch.randn(len(rows), 4, 16, 8, generator=g)  # not the traced size, not square
    t = torch.tensor(981)
    runner = onnx_unet("onnxruntime", str(tmp_path / "onnx"), base)
    noise = runner.bind(compute_kv(install_kv_processors(base.unet), text, rows))(sample, t)
    for i, concepts in enumerate(rows):
        reference = load_base(sd2_dir)
        apply_concepts(reference.unet, reference.text_encoder, reference.tokenizer, list(concepts))
        expected = reference.unet(sample[i: i + 1], t, encoder_hidden_states=text[i: i + 1]).sample[0]
        assert (noise[i] - expected).abs().max() <= 1e-4, i


def test_diffusers_custom_diffusion_files_round_trip(sd2_dir, tmp_path):
    base = load_base(sd2_dir)
    concept = random_concept(base, 21)
    export_diffusers(concept, base, tmp_path / "export")
    theirs = _pipe(sd2_dir)
    _install_exported(theirs, tmp_path / "export")  # diffusers' own Custom Diffusion processors
    ours = _pipe(sd2_dir)
    apply_concepts(ours.unet, ours.text_encoder, ours.tokenizer, [concept])
    images = [pipe(PROMPT, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images for pipe in (theirs, ours)]
    assert max_diff(*images) <= 1e-4
    back = import_concept(tmp_path / "export", base)
    assert back.embeddings.shape == (1, HIDDEN_SD2) and torch.equal(back.embeddings, concept.embeddings)
    assert all((back.deltas[n].dense - d.dense).abs().max() <= 1e-6 for n, d in concept.deltas.items())


def test_generate_through_the_grpc_service_and_tritonserver(sd2_dir, trained, tmp_path):
    """One Generate with the trained concept, imported as diffusers files through ConceptService."""
    result, store = trained
    assert_served_like_the_engine(load_base(sd2_dir), store.get_concept(result.digest), tmp_path, PROMPT, STEPS)
