"""The inference front spreads Generate calls over every Triton replica (client-side round robin), and keeps
serving on the others when one is killed: two real tritonservers on loopback."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as triton

from customdiff.local import free_port
from customdiff_client import Client
from services.app import start_stack
from services.common.settings import Settings
from services.inference.triton_endpoints import TritonEndpoints
from services.inference.triton_protocol import MODEL_NAME
from services.inference.triton_server import start_triton

CALLS = 40
KILL_AFTER = 10


@pytest.fixture
def replicas(tiny_base_dir, store):
    # One after the other, from this thread: a tritonserver gets SIGTERM when the thread that started it ends.
    servers = [start_triton(base_model=str(tiny_base_dir), store_url=store.url, grpc_port=free_port(),
                            http_port=free_port(), metrics_port=free_port(), host="127.0.0.1") for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def front(replicas, tiny_base_dir, tmp_path):
    url = ",".join(server.grpc_url for server in replicas)
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                        work_dir=str(tmp_path / "jobs"), api_keys="key-f=fan", inference_port=0,
                        base_model=str(tiny_base_dir), triton_url=url)
    stack = start_stack(settings, components=("inference",))
    address = f"127.0.0.1:{stack.ports['inference']}"
    client = Client(address, address, address, api_key="key-f")
    yield client
    client.close()
    stack.stop(0)


def served(server) -> int:
    """Successful inferences of the model on one tritonserver so far."""
    client = triton.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["success"].get("count", 0))
    finally:
        client.close()


def generate_all(client: Client, on_done=None) -> list:
    def one(i: int):
        response = client.generate("a photo of a dog", seed=i, num_inference_steps=1, guidance_scale=1.0,
                                   height=64, width=64)
        if on_done is not None:
            on_done(i)
        return response

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(CALLS)))


def test_calls_are_split_over_both_replicas_and_survive_one_killed(replicas, front):
    before = [served(s) for s in replicas]
    assert all(len(r.images) == 1 for r in generate_all(front))
    split = [served(s) - b for s, b in zip(replicas, before)]
    assert sum(split) == CALLS and min(split) >= 12, split
    # Kill one replica (SIGKILL, its whole process group) after 10 calls; every call still succeeds.
    victim, survivor = replicas
    done = []

    def kill_after_some(i: int) -> None:
        done.append(i)
        if len(done) == KILL_AFTER:
            os.killpg(victim.process.pid, signal.SIGKILL)

    before = served(survivor)
    assert all(len(r.images) == 1 for r in generate_all(front, kill_after_some))
    assert victim.process.wait(timeout=30) != 0
    assert served(survivor) - before >= CALLS - KILL_AFTER - 4  # the rest (and those in flight on the victim) went there


def test_names_resolve_to_every_replica_and_again_after_a_failure():
    answers = {"triton": ["10.0.0.1:8001", "10.0.0.2:8001"]}
    endpoints = TritonEndpoints("triton:8001, extra:9000", resolve_every_s=60, down_for_s=60,
                                resolver=lambda host, port: answers.get(host, [f"10.9.9.9:{port}"]))
    assert endpoints.addresses() == ["10.0.0.1:8001", "10.0.0.2:8001", "10.9.9.9:9000"]
    starts = [endpoints.order()[0] for _ in range(6)]
    assert starts == ["10.0.0.1:8001", "10.0.0.2:8001", "10.9.9.9:9000"] * 2  # round robin
    answers["triton"] = ["10.0.0.2:8001", "10.0.0.3:8001"]  # a pod went, another came
    assert endpoints.addresses()[:2] == ["10.0.0.1:8001", "10.0.0.2:8001"]  # not yet: resolved a moment ago
    endpoints.failed("10.0.0.2:8001")
    order = endpoints.order()
    assert order[-1] == "10.0.0.2:8001" and set(order) == {"10.0.0.2:8001", "10.0.0.3:8001", "10.9.9.9:9000"}
