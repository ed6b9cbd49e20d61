"""Training on the tiny base, in process: what changes, what is stored, loss, resume, precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from concepts.base import KV_SUFFIXES, kv_layers, load_base
from concepts.store import ArtifactStore
from tests.trainer_helpers import job_dict, pattern_images
from trainer.job import run_job
from trainer.model import prepare_model
from trainer.spec import JobSpec
from trainer.tokens import TokenRows, add_modifier_tokens



pytestmark = pytest.mark.usefixtures("one_thread")


def _run(d: dict) -> tuple:
    events: list[dict] = []
    result = run_job(JobSpec.from_dict(d), listener=events.append)
    return result, events


def _changed(tuned: torch.nn.Module, fresh: torch.nn.Module) -> set[str]:
    ref = dict(fresh.named_parameters())
    return {n for n, p in tuned.named_parameters() if not torch.equal(p.detach().float(), ref[n].detach().float())}


@pytest.fixture(scope="module")
def joint(tiny_base_dir, tmp_path_factory):
    """Two concepts trained jointly for 5 steps with generated class images."""
    root = tmp_path_factory.mktemp("joint")
    d = job_dict(tiny_base_dir, root, pattern_images(root / "stripes"), {"max_train_steps": 5, "learning_rate": 1e-4})
    d["concepts"].append({"name": "checks", "class_prompt": "cat", "images": pattern_images(root / "checks", kind="checks"),
                          "num_class_images": 2})
    result, events = _run(d)
    return result, events, root, d


def test_only_the_intended_tensors_change(joint, tiny_base_dir):
    result, _, _, _ = joint
    fresh = load_base(tiny_base_dir)
    kv = {f"{name}.weight" for name in kv_layers(fresh.unet, KV_SUFFIXES)}
    assert len(kv) == 14
    assert _changed(result.base.unet, fresh.unet) == kv
    assert _changed(result.base.vae, fresh.vae) == set()
    fresh_te = dict(fresh.text_encoder.named_parameters())
    emb_name = next(n for n, p in fresh_te.items() if p is fresh.text_encoder.get_input_embeddings().weight)
    for name, p in result.base.text_encoder.named_parameters():
        if name != emb_name:
            assert torch.equal(p, fresh_te[name]), name
    vocab = fresh_te[emb_name].shape[0]
    tuned = dict(result.base.text_encoder.named_parameters())[emb_name]
    assert tuned.shape[0] == vocab + 2
    assert torch.equal(tuned[:vocab], fresh_te[emb_name])  # every original row bit-identical


def test_every_modifier_token_moves_and_one_artifact_holds_both(joint, tiny_base_dir):
    result, _, root, _ = joint
    fresh = load_base(tiny_base_dir)
    concept = ArtifactStore(str(root / "store")).get_concept(result.digest)
    assert concept.tokens == ("<new1>", "<new2>") and concept.class_words == ("dog", "cat")
    assert concept.base_fingerprint == fresh.fingerprint
    init_ids = [fresh.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("ktn", "pll")]
    initial = fresh.text_encoder.get_input_embeddings().weight[init_ids]
    moved = (concept.embeddings - initial).norm(dim=1)
    assert (moved > 1e-4).all(), f"token rows moved by {moved.tolist()}"
    emb = result.base.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb[-2:], concept.embeddings)
    tuned = dict(result.base.unet.named_modules())
    for name, delta in concept.deltas.items():
        assert torch.equal(delta.dense, tuned[name].weight.detach() - dict(fresh.unet.named_modules())[name].weight)
    assert set(concept.deltas) == set(kv_layers(fresh.unet)) and all(d.dense.abs().max() > 0 for d in concept.deltas.values())
    assert concept.provenance["kind"] == "training" and concept.provenance["steps"] == 5
    assert concept.provenance["hyperparameters"]["learning_rate"] == 1e-4
    stored = json.loads((root / "work" / "result.json").read_text())
    assert stored == {"digest": result.digest, "tokens": ["<new1>", "<new2>"], "class_words": ["dog", "cat"],
                      "bytes": len(ArtifactStore(str(root / "store")).get(result.digest))}


def test_progress_lines(joint):
    _, events, root, _ = joint
    lines = [json.loads(x) for x in (root / "work" / "progress.jsonl").read_text().splitlines()]
    assert lines == events
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states == ["loading base model", "generating class images", "generating class images", "encoding latents",
                      "training", "saving artifact"]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5]
    assert set(progress[0]) == {"event", "step", "total_steps", "loss", "lr", "images_per_s", "steps_per_s",
                                "eta_s"}
    assert progress[0]["total_steps"] == 5 and progress[-1]["eta_s"] == 0
    # lr 1e-4 x batch 2 x 1 process x 1 accumulation x 2 for prior preservation
    assert progress[0]["lr"] == pytest.approx(4e-4) and all(np.isfinite(e["loss"]) for e in progress)
    assert events[-1] == {"event": "done", "digest": json.loads((root / "work" / "result.json").read_text())["digest"]}


def test_a_second_job_reuses_cached_class_images_and_a_relaunch_reuses_the_result(joint, tiny_base_dir, tmp_path):
    result, _, root, d = joint
    cached = sorted((root / "class-images").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert len(cached) == 4
    _, events = _run({**d, "work_dir": str(tmp_path / "work"), "hyperparameters": {**d["hyperparameters"], "max_train_steps": 1}})
    assert "generating class images" not in [e.get("state") for e in events]
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    again, events = _run(d)  # the finished job's work dir: nothing is recomputed
    assert again.digest == result.digest and events == [{"event": "done", "digest": result.digest}]


def test_training_lowers_the_loss_on_a_distinctive_pattern(tiny_base_dir, tmp_path):
    images = pattern_images(tmp_path / "img")

    def losses(lr: float, name: str) -> np.ndarray:
        d = job_dict(tiny_base_dir, tmp_path / name, images, {"max_train_steps": 100, "learning_rate": lr,
                     "train_batch_size": 4, "with_prior_preservation": False})
        _, events = _run(d)
        return np.array([e["loss"] for e in events if e["event"] == "progress"])

    trained = losses(5e-4, "trained")
    # Same batches, noise and timesteps (they depend on seed and step only), a learning rate too small to matter.
    control = losses(1e-9, "control")
    first, last, last_control = trained[:10].mean(), trained[-10:].mean(), control[-10:].mean()
    assert last < 0.92 * first, f"first 10 steps {first:.4f}, last 10 steps {last:.4f}"
    assert last < 0.92 * last_control, f"last 10 steps {last:.4f}, untrained on the same batches {last_control:.4f}"


def test_resume_equals_no_interruption(tiny_base_dir, tmp_path):
    images = pattern_images(tmp_path / "img")
    hp = {"max_train_steps": 6, "gradient_accumulation_steps": 2, "mixed_precision": "no"}
    whole, _ = _run(job_dict(tiny_base_dir, tmp_path / "whole", images, hp))
    d = job_dict(tiny_base_dir, tmp_path / "parts", images, hp, class_image_cache_dir=str(tmp_path / "whole" / "class-images"))
    stopped, events = _run({**d, "stop_after_steps": 3})
    assert stopped.digest is None and stopped.step == 3
    assert events[-1] == {"event": "state", "state": "stopped", "message": "checkpoint at step 3 of 6; run again to resume"}
    assert (tmp_path / "parts" / "work" / "checkpoint" / "state.pt").exists()
    resumed, events = _run(d)
    assert [e["step"] for e in events if e["event"] == "progress"] == [4, 5, 6]
    assert resumed.digest == whole.digest  # the very same bytes
    assert not (tmp_path / "parts" / "work" / "checkpoint").exists()


def _fp32_and_mixed(tiny_base_dir, tmp_path, precision: str, device: str) -> tuple:
    """The same 3-step job in float32 and in `precision`; returns both results and artifacts."""
    images = pattern_images(tmp_path / "img")
    hp = {"max_train_steps": 3, "learning_rate": 1e-4}
    out = []
    for name, mp in (("fp32", "no"), (precision, precision)):
        d = job_dict(tiny_base_dir, tmp_path / name, images, {**hp, "mixed_precision": mp}, device=device,
                     class_image_cache_dir=str(tmp_path / "cache"))
        result, _ = _run(d)
        out.append((result, ArtifactStore(str(tmp_path / name / "store")).get_concept(result.digest)))
    return out


def _assert_same_direction(full, mixed, precision: str) -> None:
    # Mixed precision changes the gradients' rounding, not the direction of the update.
    for layer, delta in full.deltas.items():
        half = mixed.deltas[layer].dense
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        cos = torch.nn.functional.cosine_similarity(half.flatten(), delta.dense.flatten(), dim=0)
        assert cos > 0.95, f"{layer}: cosine {cos:.3f} between {precision} and float32 deltas"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_float32_masters(tiny_base_dir, tmp_path, precision):
    (_, full), (result, mixed) = _fp32_and_mixed(tiny_base_dir, tmp_path, precision, "cpu")
    _assert_same_direction(full, mixed, precision)  # on this CPU: bf16 >= 0.98, fp16 >= 0.99
    unet = result.base.unet
    assert unet.conv_in.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(layer.weight.dtype == torch.float32 for layer in kv_layers(unet).values())


def test_gradient_checkpointing_gives_the_same_weights(tiny_base_dir, tmp_path):
    images = pattern_images(tmp_path / "img")
    hp = {"max_train_steps": 2, "with_prior_preservation": False, "learning_rate": 1e-4}
    plain, _ = _run(job_dict(tiny_base_dir, tmp_path / "a", images, hp))
    ckpt, _ = _run(job_dict(tiny_base_dir, tmp_path / "b", images, {**hp, "gradient_checkpointing": True}))
    a = ArtifactStore(str(tmp_path / "a" / "store")).get_concept(plain.digest)
    b = ArtifactStore(str(tmp_path / "b" / "store")).get_concept(ckpt.digest)
    for name in a.deltas:
        torch.testing.assert_close(b.deltas[name].dense, a.deltas[name].dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.embeddings, a.embeddings, rtol=0, atol=1e-6)


def test_key_and_value_of_the_start_token_get_no_gradient(tiny_base):
    ids, rows = add_modifier_tokens(tiny_base.tokenizer, tiny_base.text_encoder, ["<new1>"], ["ktn"])
    token_rows = TokenRows(tiny_base.text_encoder.get_input_embeddings(), ids, rows)
    prepare_model(tiny_base, token_rows, "no", torch.device("cpu"), False)
    layer = next(iter(kv_layers(tiny_base.unet).values()))
    states = torch.randn(1, 77, layer.in_features)
    torch.nn.functional.linear(states, layer.weight)[:, 0].sum().backward()  # without the hook
    assert layer.weight.grad.abs().sum() > 0
    layer.weight.grad = None
    layer(states)[:, 0].sum().backward()
    assert layer.weight.grad is None or not layer.weight.grad.any()
    layer(states)[:, 1].sum().backward()
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_follows_float32(tiny_base_dir, tmp_path, precision):
    (_, full), (result, mixed) = _fp32_and_mixed(tiny_base_dir, tmp_path, precision, "cuda")
    _assert_same_direction(full, mixed, precision)
    assert next(result.base.unet.parameters()).device.type == "cuda"
