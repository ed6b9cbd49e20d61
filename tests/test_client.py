"""customdiff_client against servicers on loopback that fail on cue: retries, request ids, deadlines, errors."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from concepts.errors import InvalidArgument
from customdiff_client import CallError, Client, Retry
from customdiffusion.v1 import concept_service_pb2 as cpb
from customdiffusion.v1 import concept_service_pb2_grpc, resources_pb2, trainer_service_pb2_grpc
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.common.interceptors import ErrorInterceptor


class Flaky(concept_service_pb2_grpc.ConceptServiceServicer, trainer_service_pb2_grpc.TrainerServiceServicer):
    """UNAVAILABLE for the first `failures` calls of each method, then an answer; records what it saw."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, list] = {}
        self.lock = threading.Lock()

    def _seen(self, method: str, request, context) -> None:
        with self.lock:
            calls = self.calls.setdefault(method, [])
            calls.append((request, dict(context.invocation_metadata())))
            failing = len(calls) <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica restarting")

    def GetConcept(self, request, context):
        self._seen("GetConcept", request, context)
        return cpb.GetConceptResponse(concept=resources_pb2.Concept(name=request.concept.name, version=3))

    def DeleteConcept(self, request, context):
        self._seen("DeleteConcept", request, context)
        return cpb.DeleteConceptResponse()

    def ListConcepts(self, request, context):
        self._seen("ListConcepts", request, context)
        if request.page_size <= 0:
            raise InvalidArgument("page_size", "must be positive, got 0")
        time.sleep(2.0)
        return cpb.ListConceptsResponse()

    def CreateTrainingJob(self, request, context):
        self._seen("CreateTrainingJob", request, context)
        return tpb.CreateTrainingJobResponse(training_job=tpb.TrainingJob(name="trainingJobs/1",
                                                                          request_id=request.request_id))


@pytest.fixture
def serve():
    servers = []

    def start(failures: int) -> tuple[Flaky, Client]:
        servicer = Flaky(failures)
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[ErrorInterceptor()])
        concept_service_pb2_grpc.add_ConceptServiceServicer_to_server(servicer, server)
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
        return servicer, Client.for_server(address, api_key="k", retry=Retry(attempts=4, initial_s=0.01, max_s=0.05))

    yield start
    for server in servers:
        server.stop(0)


def test_reads_are_retried_on_unavailable_until_they_succeed(serve):
    servicer, client = serve(failures=3)
    assert client.get_concept("dog").version == 3
    assert len(servicer.calls["GetConcept"]) == 4
    assert all(metadata["authorization"] == "Bearer k" for _, metadata in servicer.calls["GetConcept"])


def test_retries_stop_after_the_attempts_and_raise_the_last_status(serve):
    servicer, client = serve(failures=10)
    with pytest.raises(CallError) as error:
        client.get_concept("dog")
    assert error.value.status == grpc.StatusCode.UNAVAILABLE and len(servicer.calls["GetConcept"]) == 4


def test_a_create_is_retried_with_one_request_id_and_a_delete_is_not_retried(serve):
    servicer, client = serve(failures=2)
    job = client.create_training_job([tpb.ConceptSpec(name="dog", class_prompt="dog")])
    ids = {request.request_id for request, _ in servicer.calls["CreateTrainingJob"]}
    assert len(servicer.calls["CreateTrainingJob"]) == 3 and len(ids) == 1 and job.request_id in ids
    assert len(job.request_id) == 32
    with pytest.raises(CallError) as error:
        client.delete_concept("dog")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and len(servicer.calls["DeleteConcept"]) == 1


def test_a_deadline_ends_the_call_and_bad_input_carries_the_field(serve):
    servicer, client = serve(failures=0)
    started = time.monotonic()
    with pytest.raises(CallError) as slow:
        client.concepts(timeout=0.5)
    assert slow.value.status == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1.5
    with pytest.raises(CallError) as bad:
        client._unary(client.concept_stub.ListConcepts, cpb.ListConceptsRequest(page_size=0), 5)
    assert bad.value.status == grpc.StatusCode.INVALID_ARGUMENT and bad.value.reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in bad.value.field_violations] == [("page_size", "must be positive, got 0")]
    assert len(bad.value.request_id) == 16 and bad.value.request_id in bad.value.message
    assert isinstance(bad.value, grpc.RpcError) and bad.value.details() == bad.value.message
