"""Metrics, traces and logs of the whole stack (`customdiff serve` with a real tritonserver), from outside:
/metrics scraped over HTTP, spans received by a real OTLP endpoint the test runs, JSON log lines parsed."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from concepts.errors import InvalidArgument
from customdiff_client import Client
from customdiff.local import free_port, start_serve
from customdiffusion.v1 import inference_service_pb2 as ipb
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.common.logs import JsonFormatter, job_context
from services.common.metrics import CONCEPTS, STORED_BYTES, RegistryGauges
from services.common.registry import Registry
from services.common.settings import Settings
from tests.trainer_helpers import stripes_png

TENANT = "obs"
INFERENCE = "customdiffusion.v1.InferenceService"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint: keeps every span it is sent as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({"name": span.name, "service": service, "trace_id": span.trace_id.hex(),
                                           "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex()})
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.2)
        raise AssertionError(f"spans never matched; got {[(s['service'], s['name']) for s in spans]}")


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    receiver = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_base_dir, receiver):
    directory = tmp_path_factory.mktemp("observability")
    proc, ports = start_serve(directory, api_keys=f"key-obs={TENANT}", base_model=str(tiny_base_dir),
                              metrics_port=free_port(), metrics_refresh_s=0.2, otlp_endpoint=receiver[1],
                              log_format="json")
    client = Client(*(f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")), api_key="key-obs")
    yield client, ports, directory / "serve.log"
    client.close()
    proc.terminate()
    assert proc.wait(timeout=120) == 0


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:port/metrics: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def bucket(samples: dict, name: str, le: float) -> float:
    """A histogram's cumulative count at upper bound `le` (Triton writes le="4", prometheus-client "4.0")."""
    return sum(v for (n, ls), v in samples.items() if n == f"{name}_bucket" and float(dict(ls)["le"]) == le)


def train(client: Client, name: str) -> tpb.TrainingJob:
    concept = tpb.ConceptSpec(name=name, class_prompt="dog", num_class_images=1,
                              images=[tpb.ImageInput(data=stripes_png(s)) for s in (0, 3)])
    return client.train([concept], hyperparameters=tpb.Hyperparameters(resolution=64, max_train_steps=12,
                                                                         effective_batch_size=2))


def generate_request(name: str, version: int = 0, steps: int = 4) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(prompt="photo of a <new1> dog", seed=1, num_inference_steps=steps,
                               concepts=[resources_pb2.ConceptRef(name=name, version=version)])


def test_metrics_move_by_what_the_calls_did(stack):
    client, ports, _ = stack
    before = scrape(ports["metrics"])
    # 1. A training, with the job-state gauges sampled while it runs.
    seen: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            samples = scrape(ports["metrics"])
            seen.append({state: value(samples, "customdiff_jobs", kind="training", state=state)
                         for state in ("queued", "running", "succeeded")})

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        job = train(client, "stripes")
        time.sleep(0.6)  # three refreshes of the registry's gauges
    finally:
        stop.set()
        sampler.join()
    assert job.state == resources_pb2.JOB_STATE_SUCCEEDED
    assert any(s["running"] == 1 for s in seen), seen
    assert seen[-1] == {"queued": 0, "running": 0, "succeeded": 1}
    # 2. Generates: an unknown concept (NOT_FOUND), no API key (UNAUTHENTICATED), the concept twice.
    stub = client.inference_stub
    with pytest.raises(grpc.RpcError) as missing:
        stub.Generate(generate_request("nope"), metadata=client.metadata)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as anonymous:
        stub.Generate(generate_request("stripes"))
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    triton_before = scrape(ports["triton_metrics"])
    stub.Generate(generate_request("stripes"), metadata=client.metadata)
    triton_once = scrape(ports["triton_metrics"])
    stub.Generate(generate_request("stripes"), metadata=client.metadata)
    triton_twice = scrape(ports["triton_metrics"])
    # 3. Two versions of the concept at once: one mixed UNet batch on the step loop.
    client.compress("stripes", fraction=0.5)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda v: stub.Generate(generate_request("stripes", v, steps=20), metadata=client.metadata),
                      (1, 2)))
    after, triton_after = scrape(ports["metrics"]), scrape(ports["triton_metrics"])

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    generate = dict(grpc_service=INFERENCE, grpc_method="Generate")
    assert moved("grpc_server_handled_total", **generate, grpc_code="OK") == 4
    assert moved("grpc_server_handled_total", **generate, grpc_code="NOT_FOUND") == 1
    assert moved("grpc_server_handled_total", **generate, grpc_code="UNAUTHENTICATED") == 1
    assert moved("grpc_server_started_total", **generate) == 6
    assert moved("grpc_server_handling_seconds_count", **generate) == 6
    assert value(after, "grpc_server_in_flight_rpcs", **generate) == 0
    assert moved("grpc_server_handled_total", grpc_method="CreateTrainingJob", grpc_code="OK") == 1
    assert moved("customdiff_job_duration_seconds_count", kind="training", outcome="succeeded") == 1
    assert moved("customdiff_compress_seconds_count") == 1
    assert moved("customdiff_triton_request_seconds_count", outcome="ok") == 4
    assert value(after, "customdiff_concepts", tenant=TENANT) == 2
    assert value(after, "customdiff_stored_bytes", tenant=TENANT) > 0
    # Triton's :8002: the first request for the concept misses the cache and loads it, the second hits.
    hits = lambda samples: value(samples, "customdiff_concept_cache_hits_total", tier="device")  # noqa: E731
    misses = lambda samples: value(samples, "customdiff_concept_cache_misses_total", tier="device")  # noqa: E731
    assert (misses(triton_once) - misses(triton_before), hits(triton_once) - hits(triton_before)) == (1, 0)
    assert (misses(triton_twice) - misses(triton_once), hits(triton_twice) - hits(triton_once)) == (0, 1)
    assert value(triton_once, "customdiff_concept_load_seconds_count") \
        - value(triton_before, "customdiff_concept_load_seconds_count") == 1
    assert value(triton_after, "customdiff_concept_cache_bytes", tier="device") > 0
    # The mixed batch: some UNet call held two images of requests for two distinct concepts.
    assert bucket(triton_after, "customdiff_batch_concepts", 2) - bucket(triton_after, "customdiff_batch_concepts", 1) > 0
    assert bucket(triton_after, "customdiff_batch_images", 2) - bucket(triton_after, "customdiff_batch_images", 1) > 0
    assert value(triton_after, "customdiff_generation_seconds_count") >= 4


def test_one_trace_from_the_client_to_the_engine_inside_triton(stack, receiver):
    client, _, _ = stack
    spans_of, _ = receiver
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("client generate") as root:
        client.inference_stub.Generate(generate_request("stripes"), metadata=client.metadata)
    trace_id = format(root.get_span_context().trace_id, "032x")
    (client_span,) = exporter.get_finished_spans()
    root_id = format(client_span.context.span_id, "016x")

    def chain_up(spans: list[dict]) -> tuple[list[tuple[str, str]], str]:
        """From this trace's engine.denoise span up to the first parent not received: (service, name)s, that id."""
        ours = {s["span_id"]: s for s in spans if s["trace_id"] == trace_id}
        span = next((s for s in ours.values() if s["name"] == "engine.denoise"), None)
        chain, parent = [], ""
        while span is not None:
            chain.append((span["service"], span["name"]))
            parent = span["parent"]
            span = ours.get(parent)
        return chain, parent

    # Each process exports in its own batches: wait until the chain reaches the client's span.
    received = spans_of.wait_for(lambda spans: chain_up(spans)[1] == root_id)
    chain, _ = chain_up(received)
    ours = [s for s in received if s["trace_id"] == trace_id]
    assert chain == [("customdiff-triton", "engine.denoise"), ("customdiff-triton", "stable_diffusion"),
                     ("customdiff", "triton.generate"), ("customdiff", f"/{INFERENCE}/Generate")]
    names = {s["name"] for s in ours if s["service"] == "customdiff-triton"}
    assert {"engine.tokenize", "engine.queue", "engine.kv", "engine.denoise", "engine.decode"} <= names


def test_a_training_job_continues_the_trace_of_the_call_that_created_it(stack, receiver):
    client, _, log = stack
    spans_of, _ = receiver
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("client train") as root:
        job = train(client, "traced")
    trace_id = format(root.get_span_context().trace_id, "032x")

    def training_and_parent(spans: list[dict]) -> list[dict]:
        training = [s for s in spans if s["trace_id"] == trace_id and s["name"] == "training"]
        return training + [s for s in spans if training and s["span_id"] == training[0]["parent"]]

    (training, create) = training_and_parent(spans_of.wait_for(lambda spans: len(training_and_parent(spans)) == 2))
    assert training["service"] == "customdiff-trainer"
    assert create["name"] == "/customdiffusion.v1.TrainerService/CreateTrainingJob"
    # The service's log lines about the job carry its id and that trace id.
    job_id = job.name.rsplit("/", 1)[-1]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("job_id") == job_id and line.get("trace_id") == trace_id for line in lines)


def test_json_log_lines_carry_the_request_id_the_response_metadata_returned(stack):
    client, _, log = stack
    with pytest.raises(grpc.RpcError) as missing:
        client.inference_stub.Generate(generate_request("nope"), metadata=client.metadata)
    request_id = dict(missing.value.initial_metadata())["x-request-id"]
    assert request_id in missing.value.details()
    response, call = client.inference_stub.Generate.with_call(generate_request("stripes"), metadata=client.metadata)
    assert len(dict(call.initial_metadata())["x-request-id"]) == 16
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == request_id]
        if mine:
            break
        time.sleep(0.1)
    assert mine, "no log line with the request id"
    line = mine[0]
    assert line["tenant"] == TENANT and line["level"] == "info" and line["service"] == "customdiff"
    assert set(line) >= {"ts", "level", "service", "logger", "message", "tenant", "request_id", "trace_id"}
    assert len(line["trace_id"]) == 32


@pytest.mark.parametrize("field, value", [("log_format", "yaml"), ("metrics_port", 70000),
                                          ("metrics_refresh_s", 0.0)])
def test_bad_observability_settings_are_refused_by_name(field, value):
    with pytest.raises(InvalidArgument) as error:
        Settings.from_dict({field: value})
    assert error.value.field == field


def test_a_json_line_carries_the_job_and_the_trace_it_is_about():
    record = logging.LogRecord("services.trainer.jobs", logging.WARNING, __file__, 1, "job %s died", ("j1",), None)
    formatter = JsonFormatter("customdiff-trainer")
    with job_context("j1", trace_id="ab" * 16):
        line = json.loads(formatter.format(record))
        with TracerProvider().get_tracer("test").start_as_current_span("rpc") as span:
            inside = json.loads(formatter.format(record))
    assert line == {"ts": line["ts"], "level": "warning", "service": "customdiff-trainer",
                    "logger": "services.trainer.jobs", "message": "job j1 died", "job_id": "j1", "trace_id": "ab" * 16}
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")  # a current span wins
    assert "job_id" not in json.loads(formatter.format(record))


def test_registry_gauges_drop_to_zero_when_a_tenant_deletes_everything(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/registry.db")
    registry.migrate()
    registry.add_concept("gone", "c", "a" * 64, ["<new1>"], ["dog"], 1000, "f" * 64, {})
    gauges = RegistryGauges(registry, interval_s=60)
    gauges.refresh()
    assert CONCEPTS.labels("gone")._value.get() == 1 and STORED_BYTES.labels("gone")._value.get() == 1000
    registry.delete_concepts("gone", "c")
    gauges.refresh()
    assert CONCEPTS.labels("gone")._value.get() == 0 and STORED_BYTES.labels("gone")._value.get() == 0
