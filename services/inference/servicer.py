"""InferenceService: transport only. Authenticated caller, tenant-scoped concept lookup, Triton under the deadline."""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

from concepts.errors import CustomDiffError, DeadlineExceeded, InvalidArgument, quote
from customdiffusion.v1 import inference_service_pb2 as pb
from customdiffusion.v1 import inference_service_pb2_grpc
from engine.request import MAX_CONCEPT_WEIGHT, GenerationRequest
from services.common.concept_servicer import check_ref
from services.common.interceptors import current_tenant
from services.common.metrics import DEADLINE_EXCEEDED, TRITON_SECONDS
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.server import Service
from services.common.settings import InferenceSettings
from services.inference.triton_client import generate_on_replicas
from services.inference.triton_endpoints import TritonEndpoints

# The proto enum's values by their names: SCHEDULER_DDIM -> "ddim", SCHEDULER_UNSPECIFIED -> "" (the base's).
SCHEDULERS = {value.number: "" if value.name == "SCHEDULER_UNSPECIFIED" else value.name.removeprefix("SCHEDULER_").lower()
              for value in pb.Scheduler.DESCRIPTOR.values}
DEFAULT_TIMEOUT_S = 300.0
# A call without a deadline reads as None or as centuries left (gRPC's infinite deadline): the default applies.
NO_DEADLINE_S = 365 * 24 * 3600.0


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, settings: InferenceSettings, registry: Registry, quotas: TenantQuotas) -> None:
        self.settings = settings
        self.registry = registry
        self.quotas = quotas
        self.triton = TritonEndpoints(settings.triton_url)

    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        # 1. Validate every field before any lookup (GenerationRequest names the field on error).
        refs = [check_ref(c, f"concepts[{i}]", weighted=True) for i, c in enumerate(request.concepts)]
        weights = tuple(concept_weight(c, f"concepts[{i}].weight") for i, c in enumerate(request.concepts))
        seed = request.seed if request.HasField("seed") else secrets.randbelow(2**31)
        generation = GenerationRequest(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            concept_digests=(),
            num_images=request.num_images or 1,
            num_inference_steps=request.num_inference_steps or 50,
            guidance_scale=request.guidance_scale if request.guidance_scale else 7.5,
            seed=seed,
            height=request.height,
            width=request.width,
            scheduler=SCHEDULERS.get(request.scheduler, f"unknown({request.scheduler})"),
        )
        # 2. The caller's concepts only: another tenant's concept is NOT_FOUND, never PERMISSION_DENIED.
        tenant = current_tenant()
        digests = tuple(self.registry.get_concept(tenant, r.name, r.version).digest for r in refs)
        generation = dataclasses.replace(generation, concept_digests=digests, concept_weights=weights)
        # 3. Triton, within what is left of the caller's deadline.
        remaining = context.time_remaining()
        timeout = DEFAULT_TIMEOUT_S if remaining is None or remaining > NO_DEADLINE_S else remaining - 0.05
        if timeout <= 0:
            DEADLINE_EXCEEDED.labels("before_triton").inc()
            raise DeadlineExceeded("the request's deadline passed before generation could start")
        with self.quotas.generation(tenant):
            pngs = self._triton(generation, timeout)
        return pb.GenerateResponse(
            images=[pb.GeneratedImage(png=png, seed=seed + i) for i, png in enumerate(pngs)],
            concept_digests=list(digests),
        )


    def _triton(self, generation: GenerationRequest, timeout: float) -> list[bytes]:
        """`generate_on_replicas`, timed by outcome ("ok" or the error's reason) in customdiff_triton_request_seconds."""
        started, outcome = time.perf_counter(), "ok"
        try:
            return generate_on_replicas(self.triton, self.settings.triton_model, generation, timeout)
        except CustomDiffError as e:
            outcome = e.reason
            if isinstance(e, DeadlineExceeded):
                DEADLINE_EXCEEDED.labels("triton").inc()
            raise
        finally:
            TRITON_SECONDS.labels(outcome).observe(time.perf_counter() - started)


def concept_weight(ref, field: str) -> float:
    """A ConceptRef's `weight`: 1.0 when unset, else finite within [0, MAX_CONCEPT_WEIGHT]."""
    if not ref.HasField("weight"):
        return 1.0
    if not (math.isfinite(ref.weight) and 0.0 <= ref.weight <= MAX_CONCEPT_WEIGHT):
        raise InvalidArgument(field, f"must be within [0, {MAX_CONCEPT_WEIGHT:g}] (unset is 1), "
                                     f"got {quote(ref.weight)}")
    return ref.weight


def inference_service(settings: InferenceSettings, registry: Registry, quotas: TenantQuotas) -> Service:
    return Service(inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
                   InferenceServicer(settings, registry, quotas),
                   pb.DESCRIPTOR.services_by_name["InferenceService"].full_name)
