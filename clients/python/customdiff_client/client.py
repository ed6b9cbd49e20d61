"""A small Python client for the three services: API key on every call, jobs followed to their end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from opentelemetry.propagate import inject

from customdiffusion.v1 import (concept_service_pb2, concept_service_pb2_grpc, inference_service_pb2,
                                inference_service_pb2_grpc, merger_service_pb2, merger_service_pb2_grpc,
                                resources_pb2, trainer_service_pb2, trainer_service_pb2_grpc)

TERMINAL = (resources_pb2.JOB_STATE_SUCCEEDED, resources_pb2.JOB_STATE_FAILED, resources_pb2.JOB_STATE_CANCELLED)
MAX_MESSAGE = 64 * 1024 * 1024


def concept_ref(concept: str | tuple[str, float]) -> resources_pb2.ConceptRef:
    """The latest version of a concept: a name (weight unset, i.e. 1) or a ``(name, weight)`` pair."""
    if isinstance(concept, str):
        return resources_pb2.ConceptRef(name=concept)
    name, weight = concept
    return resources_pb2.ConceptRef(name=name, weight=weight)


class _PropagatingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Appends the current trace context to every call's metadata, leaving the caller's entries as they
    are (the grpc instrumentation's client interceptor folds repeated keys into one)."""

    def _with_context(self, details):
        carrier: dict[str, str] = {}
        inject(carrier)
        if not carrier:
            return details
        metadata = (*(details.metadata or ()), *carrier.items())
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_context(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_context(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel` sending the current trace context (`traceparent` metadata) with every call, so the
    servers' spans join the caller's trace."""
    return grpc.intercept_channel(channel, _PropagatingInterceptor())


class JobFailed(RuntimeError):
    """A job ended in FAILED or CANCELLED; the message is the job's error message."""


@dataclass
class Client:
    """Channels to the trainer, merger and inference servers of one deployment.

    Args:
        trainer, merger, inference: ``host:port`` of each server.
        api_key: sent as ``authorization: Bearer <api_key>`` on every call.
    """

    trainer: str
    merger: str
    inference: str
    api_key: str

    def __post_init__(self) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        # Calls carry the current trace context (`traceparent` metadata): the servers' spans join the caller's trace.
        self._channels = [traced_channel(grpc.insecure_channel(t, options=options))
                          for t in (self.trainer, self.merger, self.inference)]
        self.trainer_stub = trainer_service_pb2_grpc.TrainerServiceStub(self._channels[0])
        self.merger_stub = merger_service_pb2_grpc.MergerServiceStub(self._channels[1])
        self.inference_stub = inference_service_pb2_grpc.InferenceServiceStub(self._channels[2])
        self.concept_stub = concept_service_pb2_grpc.ConceptServiceStub(self._channels[2])
        self.metadata = (("authorization", f"Bearer {self.api_key}"),)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def train(self, concepts: list[trainer_service_pb2.ConceptSpec], concept_name: str = "",
              hyperparameters: trainer_service_pb2.Hyperparameters | None = None, request_id: str = "",
              on_event: Callable[[trainer_service_pb2.WatchTrainingJobResponse], None] | None = None,
              ) -> trainer_service_pb2.TrainingJob:
        """Create a training job and follow it to its end; raise `JobFailed` unless it succeeds."""
        job = self.trainer_stub.CreateTrainingJob(trainer_service_pb2.CreateTrainingJobRequest(
            concepts=concepts, concept_name=concept_name, hyperparameters=hyperparameters, request_id=request_id),
            metadata=self.metadata).training_job
        stream = self.trainer_stub.WatchTrainingJob(trainer_service_pb2.WatchTrainingJobRequest(name=job.name),
                                                    metadata=self.metadata)
        return _follow(stream, lambda e: e.training_job, on_event)

    def merge(self, names: Iterable[str], concept_name: str = "", context_captions: int = 0,
              regularization_captions: Iterable[str] = ()) -> merger_service_pb2.MergerJob:
        job = self.merger_stub.MergeConcepts(merger_service_pb2.MergeConceptsRequest(
            concepts=[resources_pb2.ConceptRef(name=n) for n in names], concept_name=concept_name,
            context_captions=context_captions, regularization_captions=list(regularization_captions)),
            metadata=self.metadata).merger_job
        return self._follow_merger(job)

    def compress(self, name: str, fraction: float | None = None, rank: int | None = None,
                 concept_name: str = "") -> merger_service_pb2.MergerJob:
        request = merger_service_pb2.CompressConceptRequest(concept=resources_pb2.ConceptRef(name=name),
                                                           concept_name=concept_name)
        if rank is not None:
            request.rank = rank
        else:
            request.fraction = fraction if fraction is not None else 0.6
        job = self.merger_stub.CompressConcept(request, metadata=self.metadata).merger_job
        return self._follow_merger(job)

    def generate(self, prompt: str, concepts: Iterable[str | tuple[str, float]] = (),
                 timeout: float | None = 300, **fields) -> inference_service_pb2.GenerateResponse:
        """Generate with the latest version of each named concept; `fields` are GenerateRequest fields.

        Args:
            concepts: names, each at weight 1, or ``(name, weight)`` pairs scaling that concept's
                K/V deltas (0..2), e.g. ``["dog", ("chair", 0.5)]``.
        """
        request = inference_service_pb2.GenerateRequest(
            prompt=prompt, concepts=[concept_ref(c) for c in concepts], **fields)
        return self.inference_stub.Generate(request, metadata=self.metadata, timeout=timeout)

    def concepts(self) -> list[resources_pb2.Concept]:
        return list(self.concept_stub.ListConcepts(concept_service_pb2.ListConceptsRequest(page_size=500),
                                                   metadata=self.metadata).concepts)

    def _follow_merger(self, job: merger_service_pb2.MergerJob) -> merger_service_pb2.MergerJob:
        stream = self.merger_stub.WatchMergerJob(merger_service_pb2.WatchMergerJobRequest(name=job.name),
                                                 metadata=self.metadata)
        return _follow(stream, lambda e: e.merger_job, None)


def _follow(stream, job_of, on_event):
    job = None
    for event in stream:
        job = job_of(event)
        if on_event is not None:
            on_event(event)
        if job.state in TERMINAL:
            break
    if job is None or job.state != resources_pb2.JOB_STATE_SUCCEEDED:
        state = resources_pb2.JobState.Name(job.state) if job else "no events"
        raise JobFailed(f"{job.name if job else 'job'} ended {state}: {job.error_message if job else ''}")
    return job
