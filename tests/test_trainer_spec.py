"""The job spec: defaults, unknown keys, ranges, and `check_inputs` failing before any compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concepts.errors import InvalidArgument
from tests.trainer_helpers import job_dict, pattern_images
from trainer.spec import JobSpec, check_inputs


@pytest.fixture()
def images(tmp_path):
    return pattern_images(tmp_path / "images")


def _error(fn, *args) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    return info.value.field, info.value.description


def test_defaults_follow_the_reference_and_round_trip(tiny_base_dir, tmp_path, images):
    d = job_dict(tiny_base_dir, tmp_path, images, hyperparameters={})
    del d["hyperparameters"]
    d["concepts"].append({"name": "checks", "class_prompt": "cat", "images": images})
    spec = JobSpec.from_dict(d)
    hp = spec.hyperparameters
    assert [c.modifier_token for c in spec.concepts] == ["<new1>", "<new2>"]
    assert [c.initializer_token for c in spec.concepts] == ["ktn", "pll"]
    assert spec.concepts[1].instance_caption() == "photo of a <new2> cat"
    assert spec.concepts[1].num_class_images == 200
    assert (hp.max_train_steps, hp.learning_rate, hp.scale_lr, hp.weight_decay, hp.max_grad_norm) == (500, 1e-5, True, 1e-2, 1.0)
    # resolution None: the base's own size, resolved when the base is loaded
    assert (hp.with_prior_preservation, hp.prior_loss_weight, hp.train_mode, hp.resolution) == (True, 1.0, "crossattn_kv", None)
    assert spec.concept_name == "stripes+checks"
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    one = JobSpec.from_dict({**d, "concepts": d["concepts"][:1]})
    assert one.hyperparameters.max_train_steps == 250


@pytest.mark.parametrize("mutate, field, message", [
    (lambda d: d.update(colour="red"), "colour", "unknown key(s) ['colour']; known keys: "),
    (lambda d: d["hyperparameters"].update(lr=1), "hyperparameters.lr", "unknown key(s) ['lr']; known keys: "),
    (lambda d: d["concepts"][0].update(picture=1), "concepts[0].picture", "unknown key(s) ['picture']; known keys: "),
    (lambda d: d["concepts"][0].update(class_images=[{"path": "x", "text": "y"}]),
     "concepts[0].class_images[0].text", "unknown key(s) ['text']; known keys: ['caption', 'path']"),
    (lambda d: d.pop("store_url"), "store_url", "is required"),
    (lambda d: d["concepts"][0].update(images=[]), "concepts[0].images", "needs at least one image file, got []"),
    (lambda d: d.update(concepts=[]), "concepts", "needs at least one concept, got []"),
    (lambda d: d["hyperparameters"].update(max_train_steps=0), "hyperparameters.max_train_steps",
     "must be between 1 and 20000, got 0"),
    (lambda d: d["hyperparameters"].update(max_train_steps=20001), "hyperparameters.max_train_steps",
     "must be between 1 and 20000, got 20001"),
    (lambda d: d["hyperparameters"].update(learning_rate=0), "hyperparameters.learning_rate",
     "must be > 0.0 and <= 0.001, got 0"),
    (lambda d: d["hyperparameters"].update(learning_rate=0.5), "hyperparameters.learning_rate",
     "must be > 0.0 and <= 0.001, got 0.5"),
    (lambda d: d["hyperparameters"].update(train_mode="all"), "hyperparameters.train_mode",
     "must be one of ['crossattn_kv'], got 'all'"),
    (lambda d: d["hyperparameters"].update(train_mode="crossattn"), "hyperparameters.train_mode",
     "'crossattn' (to_q and to_out too) is not offered: those deltas act on the image features at every step, "
     "which the engine cannot apply per request; use 'crossattn_kv'"),
    (lambda d: d["hyperparameters"].update(mixed_precision="fp8"), "hyperparameters.mixed_precision",
     "must be one of ['no', 'fp16', 'bf16'], got 'fp8'"),
    (lambda d: d["hyperparameters"].update(resolution=100), "hyperparameters.resolution",
     "must be a multiple of 64, got 100"),
    (lambda d: d["concepts"][0].update(instance_prompt="photo of a dog"), "concepts[0].instance_prompt",
     "must contain the modifier token '<new1>' (or {token}) as a word, got 'photo of a dog'"),
    (lambda d: d["concepts"].append({**d["concepts"][0], "name": "b", "modifier_token": "<NEW1>"}),
     "concepts[1].modifier_token", "'<new1>' is already used by concepts[0]"),
    (lambda d: d.update(concepts=[{**d["concepts"][0], "name": f"c{i}"} for i in range(5)]),
     "concepts[4].initializer_token", "has no default beyond the 4th concept; set a word that is one token"),
])
def test_spec_rejects_with_the_field_named(tiny_base_dir, tmp_path, images, mutate, field, message):
    d = job_dict(tiny_base_dir, tmp_path, images)
    mutate(d)
    got_field, got_message = _error(JobSpec.from_dict, d)
    assert got_field == field
    assert got_message.startswith(message), got_message


def _corrupt(tmp_path, images):
    path = tmp_path / "broken.png"
    path.write_bytes(Path(images[0]).read_bytes()[:60])
    return str(path)


def _text(tmp_path, images):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    return str(path)


def _small(tmp_path, images):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (_corrupt, "is not a readable image"),
    (_text, "is not a readable image (cannot identify image file"),
    (_small, "is 40x20 pixels; its shorter side must be at least 32 (half the training resolution)"),
    (lambda tmp_path, images: str(tmp_path / "missing.png"), "does not exist or is not a file"),
])
def test_check_inputs_names_the_bad_image(tiny_base_dir, tmp_path, images, make, message):
    bad = make(tmp_path, images)
    spec = JobSpec.from_dict(job_dict(tiny_base_dir, tmp_path, images + [bad]))
    field, got = _error(check_inputs, spec)
    assert field == "concepts[0].images[3]"
    assert got.startswith(bad) and message in got, got


def test_check_inputs_rejects_base_tokens_and_prompts(tiny_base_dir, tmp_path, images):
    def check(**changes):
        d = job_dict(tiny_base_dir, tmp_path, images)
        d["concepts"][0].update(changes.pop("concept", {}))
        d.update(changes)
        return _error(check_inputs, JobSpec.from_dict(d))

    assert check(base_model=str(tmp_path)) == (
        "base_model", (f"{tmp_path} is not a diffusers Stable Diffusion directory "
                       "(missing model_index.json, unet, vae, text_encoder, tokenizer, scheduler)"))
    other = tmp_path / "sdxl"
    shutil.copytree(tiny_base_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    assert check(base_model=str(other)) == (
        "base_model", (f"{other} holds a 'StableDiffusionXLPipeline'; a base with 1 text encoder must be a "
                       "'StableDiffusionPipeline' (Stable Diffusion 1.x/2.x)"))
    assert check(concept={"modifier_token": "Dog", "instance_prompt": "a {token}"}) == (
        "concepts[0].modifier_token",
        "'Dog' already exists in the tokenizer's vocabulary; choose a new word such as <new1>")
    assert check(concept={"initializer_token": "zzyzx"})[0] == "concepts[0].initializer_token"
    assert check(concept={"initializer_token": "zzyzx"})[1].startswith("'zzyzx' is ")
    assert check(concept={"instance_prompt": "photo " * 80 + "{token}"})[0] == "concepts[0].instance_prompt"
    assert check(concept={"class_images": [{"path": images[0], "caption": "a <new1> dog"}]}) == (
        "concepts[0].class_images[0].caption", "must not contain modifier tokens, got 'a <new1> dog'")


def test_check_inputs_accepts_a_good_spec(tiny_base_dir, tmp_path, images):
    spec = JobSpec.from_dict(job_dict(tiny_base_dir, tmp_path, images))
    check_inputs(spec)
    assert (tmp_path / "work").is_dir() and (tmp_path / "store" / "sha256").is_dir()
