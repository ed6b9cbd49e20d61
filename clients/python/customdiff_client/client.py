"""The Python client of the three services: API key, TLS or mTLS, deadlines, retries, typed errors, jobs
followed to their end.

Retries: a call that is safe to repeat is retried on UNAVAILABLE (a replica restarting, a connection
reset) with exponential backoff and jitter, within its deadline: reads (Get, List, Watch), Generate
(no side effects), and creations, which always carry a `request_id` (the client makes one when the
caller gives none), so a retried create returns the first job instead of starting a second. Every
other failure raises `CallError` with the server's details at once.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from customdiff_client.errors import CallError, JobFailed
from customdiffusion.v1 import (concept_service_pb2, concept_service_pb2_grpc, inference_service_pb2,
                                inference_service_pb2_grpc, merger_service_pb2, merger_service_pb2_grpc,
                                resources_pb2, trainer_service_pb2, trainer_service_pb2_grpc)

TERMINAL = (resources_pb2.JOB_STATE_SUCCEEDED, resources_pb2.JOB_STATE_FAILED, resources_pb2.JOB_STATE_CANCELLED)
MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT_S = 60.0
GENERATE_TIMEOUT_S = 300.0
CHUNK_BYTES = 512 * 1024  # uploads and imports go in messages of this size


def concept_ref(concept: str | tuple[str, float]) -> resources_pb2.ConceptRef:
    """The latest version of a concept: a name (weight unset, i.e. 1) or a ``(name, weight)`` pair."""
    if isinstance(concept, str):
        return resources_pb2.ConceptRef(name=concept)
    name, weight = concept
    return resources_pb2.ConceptRef(name=name, weight=weight)


@dataclass(frozen=True)
class TLS:
    """TLS for the channels; with a certificate chain and key, mTLS (the server's `tls_client_ca_file`).

    Args:
        root_certificates: PEM CA the server's certificate must chain to (None: the system's roots).
        certificate_chain, private_key: PEM client certificate and key, for mTLS.
        server_name: the name to check the server's certificate against, when it differs from the host.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str = ""

    @classmethod
    def from_files(cls, ca: str = "", cert: str = "", key: str = "", server_name: str = "") -> TLS:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(cert), read(key), server_name)


@dataclass(frozen=True)
class Retry:
    """Backoff for calls that are safe to repeat: `attempts` in all, waits from `initial_s` doubling to `max_s`."""

    attempts: int = 5
    initial_s: float = 0.25
    max_s: float = 5.0


class _TraceContext(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """With opentelemetry-api installed, adds the current trace context (`traceparent`) to every call, so
    the servers' spans join the caller's trace; the caller's own entries stay as they are (repeated keys too)."""

    def __init__(self) -> None:
        try:
            from opentelemetry.propagate import inject
        except ImportError:  # the [tracing] extra is not installed
            inject = None
        self._inject = inject

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        carrier: dict[str, str] = {}
        if self._inject is not None:
            self._inject(carrier)
        if not carrier:
            return details
        metadata = (*(details.metadata or ()), *carrier.items())
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


@dataclass
class Client:
    """Channels to the trainer, merger and inference servers of one deployment.

    Args:
        trainer, merger, inference: ``host:port`` of each server (one address for all three behind
            an Ingress or Gateway: `Client.for_server`).
        api_key: sent as ``authorization: Bearer <api_key>`` on every call.
        tls: TLS or mTLS settings; None is plaintext (loopback, a service mesh).
        retry: backoff for calls that are safe to repeat (module doc).
    """

    trainer: str
    merger: str
    inference: str
    api_key: str
    tls: TLS | None = None
    retry: Retry = field(default_factory=Retry)

    def __post_init__(self) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        trace_context = _TraceContext()
        channels = {}
        for target in {self.trainer, self.merger, self.inference}:
            if self.tls is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(self.tls.root_certificates, self.tls.private_key,
                                                           self.tls.certificate_chain)
                channel = grpc.secure_channel(target, credentials, options=options)
            channels[target] = grpc.intercept_channel(channel, trace_context)
        self._channels = list(channels.values())
        self.trainer_stub = trainer_service_pb2_grpc.TrainerServiceStub(channels[self.trainer])
        self.merger_stub = merger_service_pb2_grpc.MergerServiceStub(channels[self.merger])
        self.inference_stub = inference_service_pb2_grpc.InferenceServiceStub(channels[self.inference])
        self.concept_stub = concept_service_pb2_grpc.ConceptServiceStub(channels[self.inference])
        # Every call of this client sends it; pass it along on calls made on the stubs directly.
        self.metadata = (("authorization", f"Bearer {self.api_key}"),)

    @classmethod
    def for_server(cls, address: str, api_key: str, tls: TLS | None = None, retry: Retry | None = None) -> Client:
        """All three services at one address (an Ingress or Gateway route per service)."""
        return cls(address, address, address, api_key, tls, retry or Retry())

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # Training ------------------------------------------------------------------------------------

    def create_training_job(self, concepts: list[trainer_service_pb2.ConceptSpec], concept_name: str = "",
                            hyperparameters: trainer_service_pb2.Hyperparameters | None = None,
                            request_id: str = "", timeout: float = CALL_TIMEOUT_S) -> trainer_service_pb2.TrainingJob:
        """Start a training job (idempotent on `request_id`, which is made here when not given)."""
        request = trainer_service_pb2.CreateTrainingJobRequest(
            concepts=concepts, concept_name=concept_name, hyperparameters=hyperparameters,
            request_id=request_id or uuid.uuid4().hex)
        return self._unary(self.trainer_stub.CreateTrainingJob, request, timeout, retry=True).training_job

    def train(self, concepts: list[trainer_service_pb2.ConceptSpec], concept_name: str = "",
              hyperparameters: trainer_service_pb2.Hyperparameters | None = None, request_id: str = "",
              on_event: Callable[[trainer_service_pb2.WatchTrainingJobResponse], None] | None = None,
              ) -> trainer_service_pb2.TrainingJob:
        """Create a training job and follow it to its end; raise `JobFailed` unless it succeeds."""
        job = self.create_training_job(concepts, concept_name, hyperparameters, request_id)
        return _follow(self.watch_training_job(job.name), lambda e: e.training_job, on_event)

    def get_training_job(self, name: str, timeout: float = CALL_TIMEOUT_S) -> trainer_service_pb2.TrainingJob:
        request = trainer_service_pb2.GetTrainingJobRequest(name=name)
        return self._unary(self.trainer_stub.GetTrainingJob, request, timeout, retry=True).training_job

    def list_training_jobs(self, timeout: float = CALL_TIMEOUT_S) -> list[trainer_service_pb2.TrainingJob]:
        """Every training job of the caller's tenant (all pages)."""
        return self._pages(lambda token: self._unary(
            self.trainer_stub.ListTrainingJobs, trainer_service_pb2.ListTrainingJobsRequest(
                page_size=100, page_token=token), timeout, retry=True), "training_jobs")

    def cancel_training_job(self, name: str, timeout: float = CALL_TIMEOUT_S) -> trainer_service_pb2.TrainingJob:
        request = trainer_service_pb2.CancelTrainingJobRequest(name=name)
        return self._unary(self.trainer_stub.CancelTrainingJob, request, timeout, retry=True).training_job

    def watch_training_job(self, name: str) -> Iterator[trainer_service_pb2.WatchTrainingJobResponse]:
        """The job's events until it ends; re-opened (from its current state) if a replica goes away."""
        return self._stream(self.trainer_stub.WatchTrainingJob, trainer_service_pb2.WatchTrainingJobRequest(name=name),
                            lambda e: e.training_job.state in TERMINAL)

    # Merging and compression ---------------------------------------------------------------------

    def merge(self, names: Iterable[str | tuple[str, int]], concept_name: str = "", context_captions: int = 0,
              regularization_captions: Iterable[str] = (), request_id: str = "") -> merger_service_pb2.MergerJob:
        """Merge concepts (names, or (name, version) pairs) and follow the job to its end."""
        refs = [resources_pb2.ConceptRef(name=n) if isinstance(n, str) else resources_pb2.ConceptRef(name=n[0], version=n[1])
                for n in names]
        request = merger_service_pb2.MergeConceptsRequest(
            concepts=refs, concept_name=concept_name, context_captions=context_captions,
            regularization_captions=list(regularization_captions), request_id=request_id or uuid.uuid4().hex)
        job = self._unary(self.merger_stub.MergeConcepts, request, CALL_TIMEOUT_S, retry=True).merger_job
        return self._follow_merger(job)

    def compress(self, name: str, fraction: float | None = None, rank: int | None = None,
                 concept_name: str = "", request_id: str = "") -> merger_service_pb2.MergerJob:
        """Compress the latest version of `name` (top `fraction` of singular values, or `rank`); follow it."""
        request = merger_service_pb2.CompressConceptRequest(concept=resources_pb2.ConceptRef(name=name),
                                                           concept_name=concept_name,
                                                           request_id=request_id or uuid.uuid4().hex)
        if rank is not None:
            request.rank = rank
        else:
            request.fraction = fraction if fraction is not None else 0.6
        job = self._unary(self.merger_stub.CompressConcept, request, CALL_TIMEOUT_S, retry=True).merger_job
        return self._follow_merger(job)

    def get_merger_job(self, name: str, timeout: float = CALL_TIMEOUT_S) -> merger_service_pb2.MergerJob:
        request = merger_service_pb2.GetMergerJobRequest(name=name)
        return self._unary(self.merger_stub.GetMergerJob, request, timeout, retry=True).merger_job

    def list_merger_jobs(self, timeout: float = CALL_TIMEOUT_S) -> list[merger_service_pb2.MergerJob]:
        return self._pages(lambda token: self._unary(
            self.merger_stub.ListMergerJobs, merger_service_pb2.ListMergerJobsRequest(
                page_size=100, page_token=token), timeout, retry=True), "merger_jobs")

    def watch_merger_job(self, name: str) -> Iterator[merger_service_pb2.WatchMergerJobResponse]:
        return self._stream(self.merger_stub.WatchMergerJob, merger_service_pb2.WatchMergerJobRequest(name=name),
                            lambda e: e.merger_job.state in TERMINAL)

    # Generation and concepts ---------------------------------------------------------------------

    def generate(self, prompt: str, concepts: Iterable[str | tuple[str, float]] = (),
                 timeout: float | None = GENERATE_TIMEOUT_S, **fields) -> inference_service_pb2.GenerateResponse:
        """Generate with the latest version of each named concept; `fields` are GenerateRequest fields.

        Args:
            concepts: names, each at weight 1, or ``(name, weight)`` pairs scaling that concept's
                K/V deltas (0..2), e.g. ``["dog", ("chair", 0.5)]``.
        """
        request = inference_service_pb2.GenerateRequest(
            prompt=prompt, concepts=[concept_ref(c) for c in concepts], **fields)
        return self._unary(self.inference_stub.Generate, request, timeout, retry=True)

    def concepts(self, name: str = "", timeout: float = CALL_TIMEOUT_S) -> list[resources_pb2.Concept]:
        """The tenant's concepts (every version), or the versions of `name` (all pages)."""
        return self._pages(lambda token: self._unary(
            self.concept_stub.ListConcepts, concept_service_pb2.ListConceptsRequest(
                name=name, page_size=500, page_token=token), timeout, retry=True), "concepts")

    def get_concept(self, name: str, version: int = 0, timeout: float = CALL_TIMEOUT_S) -> resources_pb2.Concept:
        request = concept_service_pb2.GetConceptRequest(concept=resources_pb2.ConceptRef(name=name, version=version))
        return self._unary(self.concept_stub.GetConcept, request, timeout, retry=True).concept

    def delete_concept(self, name: str, version: int = 0, timeout: float = CALL_TIMEOUT_S) -> list[resources_pb2.Concept]:
        """Delete one version, or every version (0); returns what was deleted."""
        request = concept_service_pb2.DeleteConceptRequest(concept=resources_pb2.ConceptRef(name=name, version=version))
        return list(self._unary(self.concept_stub.DeleteConcept, request, timeout).deleted)

    def upload_images(self, images: Iterable[bytes], timeout: float = CALL_TIMEOUT_S,
                      ) -> list[trainer_service_pb2.UploadedImage]:
        """Upload training images (PNG or JPEG bytes); name them in a ConceptSpec as
        ``ImageInput(uri=uploaded.uri)``. Safe to repeat: the same bytes give the same reference."""
        images = list(images)

        def messages() -> Iterator[trainer_service_pb2.UploadImagesRequest]:
            for data in images:
                for _, last, chunk in _chunks(data):
                    yield trainer_service_pb2.UploadImagesRequest(data=chunk, end_of_image=last)

        return list(self._unary(self.trainer_stub.UploadImages, messages, timeout, retry=True).images)

    def export_concept(self, name: str, version: int = 0, timeout: float = CALL_TIMEOUT_S) -> dict[str, bytes]:
        """The concept's version (0: latest) in diffusers' format: file name -> bytes."""
        request = concept_service_pb2.ExportConceptRequest(concept=resources_pb2.ConceptRef(name=name, version=version))
        files: dict[str, bytearray] = {}
        current = None
        try:
            for message in self.concept_stub.ExportConcept(request, timeout=timeout, metadata=self.metadata):
                if message.file_name:
                    current = files.setdefault(message.file_name, bytearray())
                current.extend(message.data)
        except grpc.RpcError as e:
            raise CallError.from_rpc_error(e) from None
        return {file: bytes(data) for file, data in files.items()}

    def import_concept(self, concept_name: str, files: dict[str, bytes], format: str = "",
                       request_id: str = "", timeout: float = CALL_TIMEOUT_S) -> resources_pb2.Concept:
        """Register a diffusers ("diffusers") or original-repository ("original") checkpoint, given as
        file name -> bytes, as the next version of `concept_name` (idempotent on `request_id`)."""
        formats = {"": concept_service_pb2.CHECKPOINT_FORMAT_UNSPECIFIED,
                   "diffusers": concept_service_pb2.CHECKPOINT_FORMAT_DIFFUSERS,
                   "original": concept_service_pb2.CHECKPOINT_FORMAT_ORIGINAL}
        header = concept_service_pb2.ImportConceptHeader(concept_name=concept_name, format=formats[format],
                                                         request_id=request_id or uuid.uuid4().hex)

        def messages() -> Iterator[concept_service_pb2.ImportConceptRequest]:
            yield concept_service_pb2.ImportConceptRequest(header=header)
            for file_name, data in files.items():
                for first, _, chunk in _chunks(data):
                    yield concept_service_pb2.ImportConceptRequest(file_name=file_name if first else "", data=chunk)

        return self._unary(self.concept_stub.ImportConcept, messages, timeout, retry=True).concept

    # Plumbing ------------------------------------------------------------------------------------

    def _unary(self, method, request, timeout: float | None, retry: bool = False):
        """One call; retried on UNAVAILABLE within `timeout` when `retry`; failures raise `CallError`.
        A client-streaming call takes a function making its messages (called again for a retry)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self.retry.attempts if retry else 1):
            try:
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                return method(request() if callable(request) else request, timeout=left, metadata=self.metadata)
            except grpc.RpcError as e:
                if not self._should_retry(e, attempt, retry, deadline):
                    raise CallError.from_rpc_error(e) from None
        raise AssertionError("unreachable")

    def _stream(self, method, request, last: Callable[[object], bool]) -> Iterator:
        """A server stream, re-opened on UNAVAILABLE until an event satisfies `last`."""
        attempt = 0
        while True:
            try:
                for event in method(request, metadata=self.metadata):
                    attempt = 0
                    yield event
                    if last(event):
                        return
                return
            except grpc.RpcError as e:
                if not self._should_retry(e, attempt, True, None):
                    raise CallError.from_rpc_error(e) from None
                attempt += 1

    def _should_retry(self, error: grpc.RpcError, attempt: int, retry: bool, deadline: float | None) -> bool:
        """UNAVAILABLE on a repeatable call with attempts and time left: wait the backoff, then True."""
        if not retry or error.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 >= self.retry.attempts:
            return False
        wait = min(self.retry.max_s, self.retry.initial_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return False
        time.sleep(wait)
        return True

    def _pages(self, call: Callable[[str], object], items: str) -> list:
        out, token = [], ""
        while True:
            page = call(token)
            out += list(getattr(page, items))
            token = page.next_page_token
            if not token:
                return out

    def _follow_merger(self, job: merger_service_pb2.MergerJob) -> merger_service_pb2.MergerJob:
        return _follow(self.watch_merger_job(job.name), lambda e: e.merger_job, None)


def _chunks(data: bytes) -> Iterator[tuple[bool, bool, bytes]]:
    """`data` in messages of at most CHUNK_BYTES: (first, last, chunk); empty data is one empty chunk."""
    starts = range(0, max(len(data), 1), CHUNK_BYTES)
    for start in starts:
        yield start == 0, start == starts[-1], data[start: start + CHUNK_BYTES]


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
