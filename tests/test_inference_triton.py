"""Through a real tritonserver on loopback, started by `customdiff triton` and stopped by SIGTERM."""

from __future__ import annotations

import io
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

from concepts.base import load_base
from concepts.errors import CorruptArtifact, DeadlineExceeded, InvalidArgument, Unavailable
from engine.engine import Engine, to_png
from engine.request import GenerationRequest
from services.inference.triton_client import generate_via_triton
from services.inference.triton_protocol import MODEL_NAME, error_from_text
from services.inference.triton_server import start_triton
from tests.conftest import random_concept

STEPS = 4
REPOSITORY = Path(__file__).resolve().parents[1] / "deploy" / "triton" / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def concept_a(store, tiny_base_dir) -> str:
    return store.put_concept(random_concept(load_base(tiny_base_dir), 21, "<new1>", rank=4))


@pytest.fixture(scope="module")
def server(tiny_base_dir, store, concept_a, tmp_path_factory):
    """`customdiff triton` in a subprocess; yields (gRPC URL, log path). Teardown: SIGTERM, clean exit."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "customdiff", "triton", "--base", str(tiny_base_dir), "--store", store.url,
         "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
         "--host", "127.0.0.1", "--log-file", str(log)],
        stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed once the model is ready; empty if the command failed
        assert line, f"customdiff triton exited with {process.wait()}:\n{log.read_text() if log.exists() else ''}"
        assert json.loads(line)["grpc_port"] == ports[0]
        yield f"127.0.0.1:{ports[0]}", log
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=90)
    assert code == 0
    assert "successfully unloaded 'stable_diffusion'" in log.read_text()


@pytest.fixture(scope="module")
def engine(tiny_base_dir, store) -> Engine:
    return Engine(load_base(tiny_base_dir), store)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def assert_same_images(pngs: list[bytes], engine: Engine, request: GenerationRequest) -> None:
    """Triton's PNGs are the engine's, up to one quantization level (its batches differ in composition)."""
    expected = [to_png(image) for image in engine.generate(request)]
    assert len(pngs) == len(expected)
    for got, want in zip(pngs, expected):
        assert np.abs(pixels(got) - pixels(want)).max() <= 1


def test_generate_with_a_concept(server, engine, concept_a):
    url, _ = server
    request = GenerationRequest("photo of a <new1> dog", "blurry", (concept_a,), num_images=2,
                                num_inference_steps=STEPS, seed=5)
    pngs = generate_via_triton(url, MODEL_NAME, request, timeout_s=120)
    assert [pixels(p).shape for p in pngs] == [(64, 64, 3)] * 2
    assert_same_images(pngs, engine, request)


def test_a_new_concept_is_live_while_requests_are_in_flight_without_a_reload(server, engine, store, concept_a,
                                                                           tiny_base_dir):
    url, log = server
    client = triton.InferenceServerClient(url)
    before = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"][0]
    busy = [GenerationRequest("photo of a <new1> dog", concept_digests=(concept_a,) if i % 2 else (),
                              num_inference_steps=10, seed=i) for i in range(6)]
    concept_b = random_concept(load_base(tiny_base_dir), 22, "<new1>")
    with ThreadPoolExecutor(max_workers=8) as pool:
        in_flight = [pool.submit(generate_via_triton, url, MODEL_NAME, r, 120) for r in busy]
        # Publish: put a concept the server has never seen into the store, and use it at once.
        concept_b = store.put_concept(concept_b)
        assert not all(f.done() for f in in_flight)
        fresh = [GenerationRequest("a <new1> on the beach", concept_digests=(concept_b,), num_inference_steps=STEPS,
                                   seed=s) for s in (1, 2)]
        new = [pool.submit(generate_via_triton, url, MODEL_NAME, r, 120) for r in fresh]
        results = [f.result() for f in in_flight + new]  # raises if any request failed
    assert all(len(pngs) == 1 for pngs in results)
    for request, pngs in zip(fresh, results[-2:]):
        assert_same_images(pngs, engine, request)
    # No reload: one load in the server's life, still version 1 and READY, and the statistics
    # (which a reload would restart) count every request of this test as a success.
    after = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"][0]
    success = [int(s["inference_stats"]["success"].get("count", 0)) for s in (before, after)]
    assert success[1] - success[0] == len(busy) + len(fresh)
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1  # requests shared executions
    assert log.read_text().count("successfully loaded 'stable_diffusion'") == 1
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL_NAME, "version": "1", "state": "READY"}]


def stream_one(url: str, request: GenerationRequest, parameters: dict):
    """One request on a gRPC stream (the shipped model is decoupled): (result, error)."""
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL_NAME, stream_inputs(request), parameters=parameters)
        return answers.get(timeout=120)
    finally:
        client.stop_stream()


def test_bad_parameters_come_back_naming_the_field(server, concept_a):
    url, _ = server
    for params, field in [({"num_images": 99}, "num_images"), ({"scheduler": "pndm"}, "scheduler"),
                          ({"height": 30}, "height"), ({"colour": "red"}, "colour")]:
        _, error = stream_one(url, GenerationRequest("a dog"), params)
        assert error is not None, params  # a stream reports the model's error in its message
        mapped = error_from_text(error.message())
        assert isinstance(mapped, InvalidArgument) and mapped.field == field, error.message()
    with pytest.raises(InvalidArgument) as long_prompt:
        generate_via_triton(url, MODEL_NAME, GenerationRequest("dog " * 90, num_inference_steps=1), 60)
    assert long_prompt.value.field == "prompt" and "90 tokens" in str(long_prompt.value)
    # The front only sends digests the registry lists: one missing from the store is data loss.
    with pytest.raises(CorruptArtifact, match="missing from the store"):
        generate_via_triton(url, MODEL_NAME, GenerationRequest("a dog", concept_digests=("cd" * 32,)), 60)


def test_deadline_and_unavailable(server):
    url, _ = server
    request = GenerationRequest("a dog", num_inference_steps=50)
    with pytest.raises(DeadlineExceeded):
        generate_via_triton(url, MODEL_NAME, request, timeout_s=0.01)
    with pytest.raises(Unavailable):
        generate_via_triton(f"127.0.0.1:{free_port()}", MODEL_NAME, request, timeout_s=10)
    with pytest.raises(Unavailable):
        generate_via_triton(url, "no_such_model", request, timeout_s=10)


def stream_inputs(request: GenerationRequest) -> list:
    inputs = []
    for name, text in (("PROMPT", request.prompt), ("NEGATIVE_PROMPT", request.negative_prompt)):
        tensor = triton.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def test_decoupled_step_batching_answers_a_late_short_request_before_a_running_long_one(
        server, store, engine, concept_a):
    # The shipped repository: decoupled, "step" batching.
    long = GenerationRequest("a <new1> dog", concept_digests=(concept_a,), num_inference_steps=150, seed=1)
    short = GenerationRequest("photo of a <new1> dog", "blurry", (concept_a,), num_inference_steps=STEPS, seed=2)
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(server[0])
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL_NAME, stream_inputs(long), request_id="long",
                                  parameters=long.to_parameters())
        time.sleep(1.0)  # the long request is in the loop by now (150 steps take several seconds)
        client.async_stream_infer(MODEL_NAME, stream_inputs(short), request_id="short",
                                  parameters=short.to_parameters())
        client.async_stream_infer(MODEL_NAME, stream_inputs(short), request_id="bad",
                                  parameters={**short.to_parameters(), "num_images": 99})
        got = [answers.get(timeout=300) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and isinstance(error_from_text(errors[0].message()), InvalidArgument)
    done = [result for result, error in got if error is None]
    assert [r.get_response().id for r in done] == ["short", "long"]  # the short one joined and left the loop
    for request, result in zip((short, long), done):
        assert_same_images([bytes(p) for p in result.as_numpy("IMAGES").reshape(-1)], engine, request)


def test_request_level_batching_stays_available_as_the_fallback(tiny_base_dir, store, engine, concept_a, tmp_path):
    """`batching` "request" without the decoupled policy: the same client (a stream) gets the same images."""
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / MODEL_NAME / "config.pbtxt"
    text = config.read_text().replace("model_transaction_policy { decoupled: true }", "")
    config.write_text(text.replace('{ key: "batching", value: { string_value: "step" } }',
                                   '{ key: "batching", value: { string_value: "request" } }'))
    request = GenerationRequest("photo of a <new1> dog", concept_digests=(concept_a,), num_inference_steps=STEPS,
                                seed=3)
    ports = [free_port() for _ in range(3)]
    with start_triton(repository, base_model=str(tiny_base_dir), store_url=store.url, grpc_port=ports[0],
                      http_port=ports[1], metrics_port=ports[2], host="127.0.0.1") as server:
        assert_same_images(generate_via_triton(server.grpc_url, MODEL_NAME, request, 120), engine, request)
