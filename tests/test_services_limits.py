"""Production limits: health answers under many open streams, per-kind RPC bounds, per-tenant quotas
(RESOURCE_EXHAUSTED with a QuotaFailure, nothing written), and a drain that ends Watch streams."""

import io
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from concepts.store import ArtifactStore
from customdiff_client import CallError, Client
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.app import start_stack
from services.common.limits import RpcLimits
from services.common.registry import Registry
from services.common.settings import QuotaLimits, Quotas, Settings

CAT = resources_pb2.ConceptRef(name="cat")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40 + seed).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def black_hole():
    """A Triton endpoint that speaks gRPC but never answers an inference: a Generate waits out its deadline."""
    def never_answer(requests, context):
        while context.is_active():
            time.sleep(0.05)
        yield from ()

    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(never_answer)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _stack(tmp_path, base, **overrides):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                        work_dir=str(tmp_path / "jobs"), api_keys="key-a=tenant-a,key-b=tenant-b", trainer_port=0,
                        merger_port=0, inference_port=0, base_model=str(base), **overrides)
    stack = start_stack(settings)
    target = lambda c: f"127.0.0.1:{stack.ports[c]}"  # noqa: E731
    clients = {t: Client(target("trainer"), target("merger"), target("inference"), api_key=f"key-{t}") for t in "ab"}
    return settings, stack, clients, Registry(settings.database_url)


def _health(target: str, timeout: float = 1.0) -> tuple[int, float]:
    with grpc.insecure_channel(target) as channel:
        start = time.perf_counter()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        return status, time.perf_counter() - start


def _open_watches(client: Client, job_id: str, n: int) -> list:
    streams = [client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=f"trainingJobs/{job_id}"),
                                                    metadata=client.metadata, timeout=60) for _ in range(n)]
    for stream in streams:
        next(stream)  # the current state: the stream is open and holds a server thread
    return streams


def test_health_and_gets_answer_while_64_watch_streams_are_open(tmp_path, tiny_base_dir):
    _, stack, clients, registry = _stack(tmp_path, tiny_base_dir, triton_url="127.0.0.1:1")
    try:
        job, _ = registry.create_job("tenant-a", "training", "", "cat", {})  # queued forever: streams stay open
        streams = _open_watches(clients["a"], job.id, 64)
        target = f"127.0.0.1:{stack.ports['trainer']}"
        checks = [_health(target) for _ in range(20)]
        assert {status for status, _ in checks} == {health_pb2.HealthCheckResponse.SERVING}
        assert max(took for _, took in checks) < 0.1, checks
        got = clients["a"].trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=f"trainingJobs/{job.id}"),
                                                       metadata=clients["a"].metadata, timeout=1)
        assert got.training_job.state == resources_pb2.JOB_STATE_QUEUED
        for stream in streams:
            stream.cancel()
    finally:
        stack.stop(0)


def test_streams_over_their_bound_are_resource_exhausted_and_health_still_answers(tmp_path, tiny_base_dir):
    _, stack, clients, registry = _stack(tmp_path, tiny_base_dir, triton_url="127.0.0.1:1",
                                         rpc_limits=RpcLimits(streams=4, generations=2, calls=4))
    try:
        job, _ = registry.create_job("tenant-a", "training", "", "cat", {})
        streams = _open_watches(clients["a"], job.id, 4)
        with pytest.raises(grpc.RpcError) as e:
            _open_watches(clients["a"], job.id, 1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 4 concurrent streams (WatchTrainingJob)" in e.value.details()
        assert _health(f"127.0.0.1:{stack.ports['trainer']}")[0] == health_pb2.HealthCheckResponse.SERVING
        streams[0].cancel()
        deadline = time.monotonic() + 10
        while True:  # the cancelled stream's slot comes back
            try:
                _open_watches(clients["a"], job.id, 1)[0].cancel()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "a cancelled stream never gave its slot back"
                time.sleep(0.1)
        for stream in streams[1:]:
            stream.cancel()
    finally:
        stack.stop(0)


def _quota_violation(error: grpc.RpcError) -> str:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    failure = error_details_pb2.QuotaFailure()
    details = [d for d in rpc_status.from_call(error).details if d.Is(failure.DESCRIPTOR)]
    assert len(details) == 1, error.details()
    details[0].Unpack(failure)
    (violation,) = failure.violations
    return f"{violation.subject} {violation.description.split(':')[0]}"


def _nothing_new(settings: Settings, registry: Registry, jobs_before: int) -> None:
    assert len(registry.list_jobs("tenant-a", "training")) == jobs_before
    assert len(registry.list_jobs("tenant-a", "merge")) == len(registry.list_jobs("tenant-a", "compress")) == 0
    assert len(list((Path(settings.store_url) / "sha256").iterdir())) <= 1  # the test's own concept
    assert list(Path(settings.work_dir).iterdir()) == []
    assert registry.stored_bytes("tenant-a") in (0, 1500)  # only the concept registered by the test


def test_each_quota_is_resource_exhausted_with_quota_failure_and_writes_nothing(tmp_path, tiny_base_dir):
    quotas = Quotas(default=QuotaLimits(training_jobs=1, gpus_per_job=2, stored_bytes=2000),
                    tenants={"tenant-b": {"training_jobs": 0}})
    settings, stack, clients, registry = _stack(tmp_path, tiny_base_dir, triton_url="127.0.0.1:1", quotas=quotas,
                                                launcher="local")
    a = clients["a"]
    request = lambda images, **kw: tpb.CreateTrainingJobRequest(  # noqa: E731
        concepts=[tpb.ConceptSpec(name="dog", class_prompt="dog", images=[tpb.ImageInput(data=d) for d in images])],
        hyperparameters=tpb.Hyperparameters(resolution=64, max_train_steps=2, effective_batch_size=2), **kw)
    try:
        # gpus_per_job: 4 GPUs x 1 node > 2
        with pytest.raises(grpc.RpcError) as e:
            a.trainer_stub.CreateTrainingJob(request([_png(0)], resources=tpb.ComputeResources(gpus_per_node=4)),
                                             metadata=a.metadata)
        assert _quota_violation(e.value) == "tenant:tenant-a gpus_per_job"
        # stored_bytes: more image bytes than 2000
        big = [_png(i) for i in range(3)]
        assert sum(map(len, big)) > 2000
        with pytest.raises(grpc.RpcError) as e:
            a.trainer_stub.CreateTrainingJob(request(big), metadata=a.metadata)
        assert _quota_violation(e.value) == "tenant:tenant-a stored_bytes"
        _nothing_new(settings, registry, 0)
        # training_jobs: one queued job already
        registry.create_job("tenant-a", "training", "", "cat", {})
        with pytest.raises(grpc.RpcError) as e:
            a.trainer_stub.CreateTrainingJob(request([_png(0)]), metadata=a.metadata)
        assert _quota_violation(e.value) == "tenant:tenant-a training_jobs"
        _nothing_new(settings, registry, 1)
        # stored_bytes for merge and compress: a registered concept as large as the quota
        artifact = ArtifactStore(settings.store_url).put(b"x" * 1500)
        registry.add_concept("tenant-a", "cat", artifact, ["<new1>"], ["cat"], 1500, "fp", {})
        for call in (lambda: a.merger_stub.MergeConcepts(mpb.MergeConceptsRequest(concepts=[CAT, CAT]),
                                                         metadata=a.metadata),
                     lambda: a.merger_stub.CompressConcept(mpb.CompressConceptRequest(concept=CAT, rank=1),
                                                           metadata=a.metadata)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert _quota_violation(e.value) == "tenant:tenant-a stored_bytes"
        _nothing_new(settings, registry, 1)
        # a per-tenant override: tenant-b's training_jobs is 0, unlimited; its request is judged on its content
        registry.create_job("tenant-b", "training", "", "cat", {})
        with pytest.raises(grpc.RpcError) as e:
            clients["b"].trainer_stub.CreateTrainingJob(request([_png(0)], concept_name="Bad Name"),
                                                        metadata=clients["b"].metadata)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stack.stop(0)


def test_concurrent_generations_quota_per_tenant(tmp_path, tiny_base_dir, black_hole):
    quotas = Quotas(default=QuotaLimits(concurrent_generations=1))
    _, stack, clients, _ = _stack(tmp_path, tiny_base_dir, triton_url=black_hole, quotas=quotas)
    try:
        slow = threading.Thread(target=lambda: pytest.raises(grpc.RpcError, clients["a"].generate, "a dog",
                                                              timeout=4))
        slow.start()
        time.sleep(1.0)  # A's first generation now waits on Triton
        with pytest.raises(CallError) as e:  # the client unpacks the QuotaFailure
            clients["a"].generate("a dog", timeout=4)
        assert e.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "QUOTA_EXCEEDED"
        assert [(v.subject, v.description.split(":")[0]) for v in e.value.quota_violations] == [
            ("tenant:tenant-a", "concurrent_generations")]
        with pytest.raises(grpc.RpcError) as e:  # B has its own slots: it waits on Triton too
            clients["b"].generate("a dog", timeout=1.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        slow.join()
    finally:
        stack.stop(0)


def test_drain_ends_watch_streams_at_once_and_refuses_new_calls(tmp_path, tiny_base_dir):
    _, stack, clients, registry = _stack(tmp_path, tiny_base_dir, triton_url="127.0.0.1:1")
    job, _ = registry.create_job("tenant-a", "training", "", "cat", {})
    streams = _open_watches(clients["a"], job.id, 3)
    target = f"127.0.0.1:{stack.ports['trainer']}"
    start = time.monotonic()
    stopper = threading.Thread(target=stack.stop, args=(30.0,))
    stopper.start()
    for stream in streams:
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down; watch the job again" in e.value.details()
    stopper.join(10)
    assert not stopper.is_alive() and time.monotonic() - start < 10  # not the whole 30 s grace
    with pytest.raises(grpc.RpcError) as e:
        _health(target)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
