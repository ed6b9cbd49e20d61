"""SDXL beyond the torch engine: the ONNX export (added conditions and both text encoders as graphs), the
Custom Diffusion files of diffusers and of the paper's repository, and one Generate through the gRPC
service and a real tritonserver, all on the tiny SDXL-shaped base.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from google.protobuf import text_format
from safetensors.torch import load_file
from tritonclient.grpc import model_config_pb2

from concepts.apply import apply_concepts
from concepts.base import load_base
from concepts.interop import SDXL_TOKEN_KEYS, WEIGHTS_NAME, export_diffusers, import_concept
from concepts.tiny import HIDDEN_SDXL, create_tiny_base
from customdiff.__main__ import main
from engine.engine import Engine
from engine.kv import compute_kv, install_kv_processors
from engine.onnx_export import graph_io
from engine.onnx_pipeline import exported_engine
from engine.onnx_unet import (
    ADDED_CONDITIONS,
    GRAPH_FILE,
    PENULTIMATE,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    OrtModel,
    onnx_unet,
)
from engine.request import GenerationRequest
from tests.conftest import assert_served_like_the_engine, random_concept
from tests.test_onnx import DTYPES, _triton_accepts

STEPS = 3
PROMPT = "photo of a <new1> dog"
ROOT = Path(__file__).resolve().parents[1]
REPOSITORIES = ROOT / "deploy" / "triton"
MODELS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, family="sdxl")


@pytest.fixture(scope="module")
def digests(sdxl_dir, store) -> dict[str, str]:
    base = load_base(sdxl_dir)
    return {"dense": store.put_concept(random_concept(base, 1)),
            "lowrank": store.put_concept(random_concept(base, 2, "<new2>", rank=2))}


@pytest.fixture(scope="module")
def exported(sdxl_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`customdiff export-onnx` of the SDXL base: the directory and the JSON summary it printed."""
    out = tmp_path_factory.mktemp("sdxl-onnx")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export-onnx", str(sdxl_dir), str(out)]) == 0
    return out, json.loads(stdout.getvalue())


@pytest.fixture(scope="module")
def requests(digests) -> list[GenerationRequest]:
    """A dense concept with a negative prompt; a low-rank one with 2 images at another size, its empty negative
    prompt conditioning on zeros (SDXL's force_zeros_for_empty_prompt)."""
    return [GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=(digests["dense"],),
                              num_inference_steps=STEPS, seed=5),
            GenerationRequest("a <new2> cat", concept_digests=(digests["lowrank"],), num_images=2,
                              num_inference_steps=STEPS, seed=11, height=64, width=96)]


@pytest.fixture(scope="module")
def torch_images(sdxl_dir, store, requests) -> list[list[np.ndarray]]:
    return [Engine(load_base(sdxl_dir), store).generate(r) for r in requests]


def _pipe(base_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.stack(x) - np.stack(y)).max()) for x, y in zip(a, b))


def test_export_writes_both_text_encoders_and_the_unets_added_conditions(exported, sdxl_dir):
    out, summary = exported
    tensor = lambda *shape: {"dtype": "float32", "shape": list(shape)}  # noqa: E731
    assert summary["added_conditions"] == list(ADDED_CONDITIONS)
    unet_inputs = summary[UNET]["inputs"]
    assert list(unet_inputs) == ["sample", "timestep", "k", "v", *ADDED_CONDITIONS]
    assert unet_inputs["text_embeds"] == tensor("batch", "pooled_width") and unet_inputs["time_ids"] == tensor(
        "batch", 6)
    assert summary[TEXT_ENCODER] == {"inputs": {"inputs_embeds": tensor("batch", 77, "hidden")},
                                     "outputs": {PENULTIMATE: tensor("batch", 77, "hidden")}}
    assert summary[TEXT_ENCODER_2] == {  # the engine pools and projects the last hidden state itself
        "inputs": {"inputs_embeds": tensor("batch", 77, "hidden")},
        "outputs": {PENULTIMATE: tensor("batch", 77, "hidden"), "last_hidden_state": tensor("batch", 77, "hidden")}}
    assert len(summary["kv_layout"]) == 8 and summary["base_fingerprint"] == load_base(sdxl_dir).fingerprint


@torch.no_grad()
def test_onnx_unet_matches_the_torch_unet_with_deltas_applied(exported, sdxl_dir):
    out, _ = exported
    base = load_base(sdxl_dir)
    dense, low_rank = random_concept(base, 1, "<new1>"), random_concept(base, 2, "<new2>", rank=2)
    rows = [(dense,), (low_rank,), (), (dense, low_rank)]
    g = torch.Generator().manual_seed(3)
    text = torch.randn(len(rows), 77, sum(HIDDEN_SDXL), generator=g)
    added = {"text_embeds": torch.randn(len(rows), HIDDEN_SDXL[1], generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 0, 0, 128, 96], [64, 64, 8, 16, 64, 64],
                                       [1024, 1024, 0, 0, 64, 128]])}
    sample = torch.randn(len(rows), 4, 16, 8, generator=g)  # not the traced size, not square
    t = torch.tensor(981)
    runner = onnx_unet("onnxruntime", str(out), base)
    kv = compute_kv(install_kv_processors(base.unet), text, rows)
    noise = runner.bind(kv, added)(sample, t)
    with pytest.raises(ValueError, match="takes added conditions"):
        runner.bind(kv)
    for i, concepts in enumerate(rows):
        reference = load_base(sdxl_dir)
        apply_concepts(reference.unet, reference.text_encoder, reference.tokenizer, list(concepts),
                       text_encoder_2=reference.text_encoder_2, tokenizer_2=reference.tokenizer_2)
        expected = reference.unet(sample[i: i + 1], t, encoder_hidden_states=text[i: i + 1],
                                  added_cond_kwargs={k: v[i: i + 1] for k, v in added.items()}).sample[0]
        assert (noise[i] - expected).abs().max() <= 1e-4, i


def test_the_engine_on_the_onnx_unet_matches_the_torch_engine_in_both_batching_modes(
        exported, sdxl_dir, store, requests, torch_images):
    out, _ = exported
    for batching in ("request", "step"):
        engine = Engine.from_paths(sdxl_dir, store.url, unet_backend="onnxruntime", unet_onnx=str(out),
                                   batching=batching)
        try:
            assert _max_diff(engine.generate_batch(requests), torch_images) < 1e-3, batching
        finally:
            engine.close()


def test_the_pipeline_on_the_four_exported_graphs_matches_the_torch_engine(exported, sdxl_dir, store, requests,
                                                                           torch_images):
    # What the ONNX repository's Python model does, with onnxruntime standing in for Triton's BLS calls.
    out, _ = exported
    calls: list[str] = []

    def run_for(name: str):
        model = OrtModel(out / name / "1" / GRAPH_FILE)
        return lambda inputs: calls.append(name) or model(inputs)

    engine = exported_engine(load_base(sdxl_dir), store, run_for, out / UNET / "1" / GRAPH_FILE)
    assert _max_diff(engine.generate_batch(requests), torch_images) < 1e-3
    # One call per text encoder and UNet batch (the two sizes make two batches), one decode per image.
    assert calls.count(TEXT_ENCODER) == calls.count(TEXT_ENCODER_2) == 2
    assert calls.count(VAE_DECODER) == sum(r.num_images for r in requests) == 3


def _config(repository: str, name: str) -> model_config_pb2.ModelConfig:
    text = (REPOSITORIES / repository / name / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", MODELS)
def test_the_sdxl_onnx_repository_fits_the_exported_graphs(exported, name):
    out, _ = exported
    config, graph = _config("model_repository_onnx_sdxl", name), graph_io(out / name / "1" / GRAPH_FILE)
    assert (config.name, config.backend) == (name, "onnxruntime")
    for tensors, kind in ((config.input, "inputs"), (config.output, "outputs")):
        assert [t.name for t in tensors] == list(graph[kind])
        for t in tensors:
            assert DTYPES[t.data_type] == graph[kind][t.name]["dtype"]
            assert _triton_accepts(config, t, graph[kind][t.name]), (name, t.name)


def test_the_sdxl_onnx_repository_serves_like_the_onnx_one():
    ours, theirs = _config("model_repository_onnx_sdxl", "stable_diffusion"), _config("model_repository_onnx",
                                                                                      "stable_diffusion")
    for field in ("name", "backend", "input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(ours, field) == getattr(theirs, field), field
    model = Path("stable_diffusion") / "1" / "model.py"  # one file: a link to the ONNX repository's
    assert (REPOSITORIES / "model_repository_onnx_sdxl" / model).resolve() == (
        REPOSITORIES / "model_repository_onnx" / model).resolve()
    assert _config("model_repository_onnx_sdxl", VAE_DECODER) == _config("model_repository_onnx", VAE_DECODER)


def _install_exported(pipe: StableDiffusionXLPipeline, out: Path) -> None:
    """diffusers' own loaders: a Custom Diffusion processor per attention layer with the file's weights,
    and each token file's rows through `load_textual_inversion`, one key per text encoder."""
    weights = load_file(out / WEIGHTS_NAME)
    procs = {}
    for name in pipe.unet.attn_processors:
        own = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
        shape = own["to_k_custom_diffusion.weight"].shape if own else (None, None)
        procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=bool(own), train_q_out=False, hidden_size=shape[0],
                                                      cross_attention_dim=shape[1])
        procs[name].load_state_dict(own)
    pipe.unet.set_attn_processor(procs)
    for token_file in sorted(out.glob("<*>.safetensors")):
        rows = load_file(token_file)
        pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
        for key, (encoder, tokenizer) in zip(SDXL_TOKEN_KEYS, pairs):
            pipe.load_textual_inversion(rows[key], token=token_file.stem, text_encoder=encoder, tokenizer=tokenizer)


def test_diffusers_custom_diffusion_files_round_trip(sdxl_dir, tmp_path):
    base = load_base(sdxl_dir)
    concept = random_concept(base, 21)
    export_diffusers(concept, base, tmp_path / "export")
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "export" / "<new1>.safetensors").items()} == {
        "clip_l": (1, HIDDEN_SDXL[0]), "clip_g": (1, HIDDEN_SDXL[1])}
    theirs = _pipe(sdxl_dir)
    _install_exported(theirs, tmp_path / "export")
    ours = _pipe(sdxl_dir)
    apply_concepts(ours.unet, ours.text_encoder, ours.tokenizer, [concept], text_encoder_2=ours.text_encoder_2,
                   tokenizer_2=ours.tokenizer_2)
    image = _images(theirs)
    assert _max_diff(image, _images(ours)) <= 1e-4
    assert _max_diff(image, _images(_pipe(sdxl_dir))) > 1e-2  # the concept does change the image
    back = import_concept(tmp_path / "export", base)
    assert back.family == "sdxl" and back.tokens == concept.tokens
    assert torch.equal(back.embeddings, concept.embeddings) and torch.equal(back.embeddings_2, concept.embeddings_2)
    assert all((back.deltas[n].dense - d.dense).abs().max() <= 1e-6 for n, d in concept.deltas.items())


def _load_delta_by_hand(pipe: StableDiffusionXLPipeline, path: Path) -> None:
    """What the reference repository's `CustomDiffusionXLPipeline.load_model` does with its delta.bin: the
    UNet's weights replaced (or, compressed, ``u @ v`` added), each token's two rows added to the two encoders."""
    delta = torch.load(path, weights_only=True)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, value in delta["unet"].items():
            if isinstance(value, dict):
                params[name] += value["u"] @ value["v"]
            else:
                params[name].copy_(value)
    for token, rows in delta["modifier_token"].items():
        for row, encoder, tokenizer in zip(rows, (pipe.text_encoder, pipe.text_encoder_2),
                                           (pipe.tokenizer, pipe.tokenizer_2)):
            tokenizer.add_tokens(token)
            encoder.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = row


def test_a_reference_sdxl_delta_bin_imports_as_it_loads_there(sdxl_dir, tmp_path):
    base = load_base(sdxl_dir)
    concept = random_concept(base, 31)
    layers = dict(base.unet.named_modules())
    unet = {f"{name}.weight": layers[name].weight.detach() + delta.to_dense() for name, delta in concept.deltas.items()}
    compressed = sorted(unet)[0]  # src/compress.py's entries hold the delta as factors
    up, down = torch.randn(unet[compressed].shape[0], 2), torch.randn(2, unet[compressed].shape[1]) * 0.05
    unet[compressed] = {"u": up, "v": down}
    torch.save({"unet": unet, "modifier_token": {"<new1>": [concept.embeddings[0], concept.embeddings_2[0]]}},
               tmp_path / "delta.bin")
    imported = import_concept(tmp_path / "delta.bin", base)
    assert imported.family == "sdxl" and imported.provenance["format"] == "original-diffusers"
    assert torch.equal(imported.embeddings_2, concept.embeddings_2)
    by_hand = _pipe(sdxl_dir)
    _load_delta_by_hand(by_hand, tmp_path / "delta.bin")
    ours = _pipe(sdxl_dir)
    apply_concepts(ours.unet, ours.text_encoder, ours.tokenizer, [imported], text_encoder_2=ours.text_encoder_2,
                   tokenizer_2=ours.tokenizer_2)
    assert _max_diff(_images(by_hand), _images(ours)) <= 1e-4


def test_generate_through_the_grpc_service_and_tritonserver(sdxl_dir, tmp_path):
    """One Generate with a concept imported as diffusers files through ConceptService, on the SDXL base."""
    base = load_base(sdxl_dir)
    assert_served_like_the_engine(base, random_concept(base, 41), tmp_path, PROMPT, STEPS)
