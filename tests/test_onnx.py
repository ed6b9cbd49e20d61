"""The ONNX path: exported graphs with K/V inputs against torch with the concepts' deltas in the weights."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from concepts.apply import apply_concepts
from concepts.base import load_base
from concepts.errors import BaseMismatch, InvalidArgument
from customdiff.__main__ import main
from engine.engine import Engine, to_png
from engine.kv import compute_kv, install_kv_processors
from engine.onnx_export import graph_io
from engine.onnx_pipeline import exported_engine
from engine.onnx_unet import (
    GRAPH_FILE,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    OrtModel,
    kv_layout,
    onnx_unet,
    pack_kv,
    unpack_kv,
)
from engine.request import GenerationRequest
from services.inference.triton_client import generate_via_triton
from services.inference.triton_protocol import MODEL_NAME, ModelSettings
from services.inference.triton_server import start_triton
from tests.conftest import random_concept

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "deploy" / "triton" / "model_repository_onnx"
MODELS = (UNET, TEXT_ENCODER, VAE_DECODER)
DTYPES = {model_config_pb2.TYPE_FP32: "float32", model_config_pb2.TYPE_FP16: "float16",
          model_config_pb2.TYPE_INT64: "int64"}


@pytest.fixture(scope="module")
def exported(tiny_base_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`customdiff export-onnx` of the tiny base: the directory and the JSON summary it printed."""
    out = tmp_path_factory.mktemp("onnx")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export-onnx", str(tiny_base_dir), str(out)]) == 0
    return out, json.loads(stdout.getvalue())


@pytest.fixture(scope="module")
def requests(tiny_base_dir, store) -> list[GenerationRequest]:
    """A mixed batch: a dense concept with a negative prompt, a low-rank one with 2 images, no concept."""
    base = load_base(tiny_base_dir)
    dense = store.put_concept(random_concept(base, 1, "<new1>"))
    low_rank = store.put_concept(random_concept(base, 2, "<new2>", rank=2))
    return [
        GenerationRequest("photo of a <new1> dog", negative_prompt="blurry", concept_digests=(dense,),
                          num_inference_steps=4, seed=5),
        GenerationRequest("a <new2> cat", concept_digests=(low_rank,), num_images=2, num_inference_steps=4,
                          seed=11, guidance_scale=6.0),
        GenerationRequest("photo of a ktn dog", num_inference_steps=4, seed=2),
    ]


def parse_config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_export_writes_checked_graphs_with_documented_inputs_and_layout(exported, tiny_base_dir):
    out, summary = exported
    tensor = lambda *shape: {"dtype": "float32", "shape": list(shape)}  # noqa: E731
    latent = tensor("batch", 4, "height", "width")
    assert summary[UNET] == {
        "inputs": {"sample": latent, "timestep": tensor("batch", 1),
                   "k": tensor("batch", "tokens", "kv_width"), "v": tensor("batch", "tokens", "kv_width")},
        "outputs": {"noise_pred": latent}}
    assert summary[TEXT_ENCODER] == {"inputs": {"inputs_embeds": tensor("batch", 77, "hidden")},
                                     "outputs": {"last_hidden_state": tensor("batch", 77, "hidden")}}
    assert summary[VAE_DECODER] == {"inputs": {"latent_sample": latent},
                                    "outputs": {"image": tensor("batch", 3, "image_height", "image_width")}}
    base = load_base(tiny_base_dir)
    layers = install_kv_processors(base.unet)
    assert summary["kv_layout"] == [[path, attn.heads, attn.to_k.out_features // attn.heads]
                                    for path, attn in layers.items()]
    assert len(summary["kv_layout"]) == 7 and summary["base_fingerprint"] == base.fingerprint
    for name in MODELS:
        path = out / name / "1" / GRAPH_FILE
        onnx.checker.check_model(str(path), full_check=True)
        opset = onnx.load(str(path), load_external_data=False).opset_import[0].version
        assert opset == summary["opset"] == 17


def test_pack_and_unpack_are_inverse_and_follow_the_layout(tiny_base):
    layout = kv_layout(install_kv_processors(tiny_base.unet))
    g = torch.Generator().manual_seed(0)
    kv = {layer.path: (torch.randn(5, layer.heads, 7, layer.head_dim, generator=g),
                       torch.randn(5, layer.heads, 7, layer.head_dim, generator=g)) for layer in layout}
    k, v = pack_kv(kv, layout)
    assert k.shape == v.shape == (5, 7, sum(layer.width for layer in layout))
    first = layout[0]  # layer 0's columns come first, head-major like its to_k output
    assert torch.equal(k[:, :, : first.width], kv[first.path][0].transpose(1, 2).reshape(5, 7, first.width))
    unpacked = unpack_kv(k, v, layout)
    assert all(torch.equal(unpacked[p][i], kv[p][i]) for p in kv for i in (0, 1))


@torch.no_grad()
def test_onnx_unet_matches_torch_unet_with_deltas_applied_for_a_mixed_batch(exported, tiny_base_dir):
    out, _ = exported
    base = load_base(tiny_base_dir)
    dense, low_rank = random_concept(base, 1, "<new1>"), random_concept(base, 2, "<new2>", rank=2)
    rows = [(dense,), (low_rank,), (), (dense, low_rank)]  # each sample its own concepts
    g = torch.Generator().manual_seed(3)
    text = torch.randn(len(rows), 77, 32, generator=g)
    sample = torch.randn(len(rows), 4, 16, 8, generator=g)  # not the traced size, not square
    t = torch.tensor(981)
    runner = onnx_unet("onnxruntime", str(out), base)
    noise = runner.bind(compute_kv(install_kv_processors(base.unet), text, rows))(sample, t)
    plain = load_base(tiny_base_dir).unet(sample, t, encoder_hidden_states=text).sample
    for i, concepts in enumerate(rows):
        reference = load_base(tiny_base_dir)
        apply_concepts(reference.unet, reference.text_encoder, reference.tokenizer, list(concepts))
        expected = reference.unet(sample[i: i + 1], t, encoder_hidden_states=text[i: i + 1]).sample[0]
        assert (noise[i] - expected).abs().max() < 1e-4, i
        if concepts:  # ... at a scale where the concepts matter
            assert (expected - plain[i]).abs().max() > 1e-2, i


def test_onnx_unet_refuses_another_base_and_bad_options(exported, other_base_dir, tiny_base_dir):
    out, _ = exported
    with pytest.raises(BaseMismatch, match="ONNX UNet"):
        onnx_unet("onnxruntime", str(out), load_base(other_base_dir))
    base = load_base(tiny_base_dir)
    with pytest.raises(InvalidArgument, match="unet_backend: must be one of .* got 'tensorrt'"):
        onnx_unet("tensorrt", str(out), base)
    with pytest.raises(InvalidArgument, match="unet_onnx: .* got ''"):
        onnx_unet("onnxruntime", "", base)
    assert onnx_unet("torch", "", base) is None


def test_export_refuses_an_unsupported_opset(tiny_base_dir, tmp_path, capsys):
    assert main(["export-onnx", str(tiny_base_dir), str(tmp_path), "--opset", "9"]) == 2
    assert "opset: must be within [14, 20], got 9" in capsys.readouterr().err


@pytest.fixture(scope="module")
def torch_images(tiny_base_dir, store, requests) -> list[list[np.ndarray]]:
    return Engine(load_base(tiny_base_dir), store).generate_batch(requests)


def _max_diff(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    return max(float(np.abs(np.stack(x) - np.stack(y)).max()) for x, y in zip(a, b))


def test_engine_with_onnxruntime_unet_matches_the_torch_engine(exported, tiny_base_dir, store, requests,
                                                               torch_images):
    out, _ = exported
    engine = Engine.from_paths(tiny_base_dir, store.url, unet_backend="onnxruntime", unet_onnx=str(out))
    images = engine.generate_batch(requests)
    assert [len(i) for i in images] == [1, 2, 1]
    assert _max_diff(images, torch_images) < 1e-3


def test_pipeline_on_the_three_exported_graphs_matches_the_torch_engine(exported, tiny_base_dir, store,
                                                                        requests, torch_images):
    # What the ONNX repository's Python model does, with onnxruntime standing in for Triton's BLS calls.
    out, _ = exported
    calls: list[str] = []

    def run_for(name: str):
        model = OrtModel(out / name / "1" / GRAPH_FILE)
        return lambda inputs: calls.append(name) or model(inputs)

    engine = exported_engine(load_base(tiny_base_dir), store, run_for, out / UNET / "1" / GRAPH_FILE)
    images = engine.generate_batch(requests)
    assert _max_diff(images, torch_images) < 1e-3
    # One batch: the text once, the UNet once per timestep (PNDM's 4 steps take 5 calls), the VAE decoder
    # once per image (the engine decodes one image at a time).
    engine.base.scheduler.set_timesteps(4)
    assert calls.count(TEXT_ENCODER) == 1 and calls.count(VAE_DECODER) == sum(r.num_images for r in requests) == 4
    assert calls.count(UNET) == len(engine.base.scheduler.timesteps) == 5


def _triton_accepts(config: model_config_pb2.ModelConfig, io, graph: dict) -> bool:
    """Triton's onnxruntime backend's rule: batch dim first, same rank, every fixed graph dim equal."""
    dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
    full = ([-1] if config.max_batch_size > 0 else []) + dims
    shape = [d if isinstance(d, int) else -1 for d in graph["shape"]]
    return len(full) == len(shape) and all(s == -1 or s == d for s, d in zip(shape, full)) and \
        (config.max_batch_size == 0 or shape[0] == -1)


@pytest.mark.parametrize("name", MODELS)
def test_triton_configs_match_the_exported_graphs(exported, name):
    out, _ = exported
    config = parse_config(name)
    graph = graph_io(out / name / "1" / GRAPH_FILE)
    assert (config.name, config.backend) == (name, "onnxruntime")
    for tensors, kind in ((config.input, "inputs"), (config.output, "outputs")):
        assert [t.name for t in tensors] == list(graph[kind])
        for t in tensors:
            assert DTYPES[t.data_type] == graph[kind][t.name]["dtype"]
            assert _triton_accepts(config, t, graph[kind][t.name]), (name, t.name)


def test_pipeline_config_serves_like_stable_diffusion_and_fits_the_graph_batches():
    pipeline = parse_config("stable_diffusion")
    torch_config = ROOT / "deploy" / "triton" / "model_repository" / "stable_diffusion" / "config.pbtxt"
    torch_model = text_format.Parse(torch_config.read_text(), model_config_pb2.ModelConfig())
    # A drop-in for clients: the same name, inputs, outputs and batching.
    assert pipeline.backend == "python"
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching"):
        assert getattr(pipeline, field) == getattr(torch_model, field), field
    params = {k: {"string_value": v.string_value} for k, v in pipeline.parameters.items()}
    settings = ModelSettings.from_config(params, {})
    assert settings.dtype == "float32"
    # Classifier-free guidance doubles the UNet rows; a request has a prompt and a negative prompt.
    assert parse_config(UNET).max_batch_size >= 2 * settings.max_batch_images
    assert parse_config(VAE_DECODER).max_batch_size >= settings.max_batch_images
    assert parse_config(TEXT_ENCODER).max_batch_size >= 2 * pipeline.max_batch_size


def test_model_settings_select_the_onnx_unet_by_parameter_or_environment():
    params = {"base_model": {"string_value": "/models/base"}, "store_url": {"string_value": "/store"},
              "unet_backend": {"string_value": "torch"}}
    assert ModelSettings.from_config(params, {}).unet_backend == "torch"
    settings = ModelSettings.from_config(params, {"CUSTOMDIFF_UNET_BACKEND": "onnxruntime",
                                                  "CUSTOMDIFF_UNET_ONNX": "/models/repository-onnx"})
    assert (settings.unet_backend, settings.unet_onnx) == ("onnxruntime", "/models/repository-onnx")


# A Python-backend stand-in for an onnxruntime-backend model: the same graph, config and tensors.
STAND_IN = """
import torch
import triton_python_backend_utils as pb_utils
from pathlib import Path
from engine.onnx_unet import GRAPH_FILE, OrtModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = OrtModel(Path(args["model_repository"]) / args["model_version"] / GRAPH_FILE)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: torch.from_numpy(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                      for name in self.model.inputs}
            output = pb_utils.Tensor(self.model.output, self.model(inputs).numpy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
"""


def test_onnx_repository_pipeline_through_tritonserver_bls(exported, tiny_base_dir, store, requests,
                                                           torch_images, tmp_path):
    # The local tritonserver has no onnxruntime backend: each graph runs in a Python model with the
    # repository's own config (backend and device aside), so the pipeline's BLS calls are the real ones.
    out, _ = exported
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    for name in MODELS:
        shutil.copytree(out / name / "1", repository / name / "1", dirs_exist_ok=True)
        (repository / name / "1" / "model.py").write_text(STAND_IN)
        config = (repository / name / "config.pbtxt").read_text()
        config = config.replace('backend: "onnxruntime"', 'backend: "python"').replace("KIND_GPU", "KIND_CPU")
        (repository / name / "config.pbtxt").write_text(config)
    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    with start_triton(repository, base_model=str(tiny_base_dir), store_url=store.url, grpc_port=ports[0],
                      http_port=ports[1], metrics_port=ports[2], host="127.0.0.1") as server, \
            ThreadPoolExecutor(len(requests)) as pool:
        pngs = list(pool.map(lambda r: generate_via_triton(server.grpc_url, MODEL_NAME, r, 300), requests))
        executions = _execution_counts(server.grpc_url, (MODEL_NAME, *MODELS))
    # Each pipeline execution called the text encoder once, the UNet once a timestep; the VAE decoder ran
    # once per image (the engine decodes one image at a time).
    batches = executions[MODEL_NAME]
    assert executions[TEXT_ENCODER] == batches >= 1
    assert executions[VAE_DECODER] == sum(r.num_images for r in requests)
    assert executions[UNET] == 5 * batches
    for got, want in zip(pngs, torch_images):
        assert len(got) == len(want)
        for png, image in zip(got, want):  # the same image, up to one quantization level
            assert np.abs(_pixels(png) - _pixels(to_png(image))).max() <= 1


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _execution_counts(url: str, models: tuple[str, ...]) -> dict[str, int]:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url)
    try:
        stats = [client.get_inference_statistics(name, as_json=True)["model_stats"][0] for name in models]
    finally:
        client.close()
    return {name: int(stat.get("execution_count", 0)) for name, stat in zip(models, stats)}
