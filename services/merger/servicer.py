"""MergerService: transport only. Validates, resolves the caller's concepts, submits `MergerJobs`."""

from __future__ import annotations

import math

from google.protobuf import json_format

from concepts.errors import InvalidArgument, quote
from customdiffusion.v1 import merger_service_pb2 as pb
from customdiffusion.v1 import merger_service_pb2_grpc
from services.common.concept_servicer import check_ref
from services.common.convert import (PROTO_TO_STATE, STATE_TO_PROTO, check_name, concept_to_proto,
                                     next_page_token, page, timestamp)
from services.common.interceptors import current_tenant
from services.common.jobs import watch_job
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.server import Service
from services.merger.jobs import CompressRequest, MergeRequest, MergerJobs

KINDS = {"merge": pb.MergerJob.KIND_MERGE, "compress": pb.MergerJob.KIND_COMPRESS}
DTYPES = {pb.FACTOR_DTYPE_UNSPECIFIED: "fp16", pb.FACTOR_DTYPE_FP16: "fp16", pb.FACTOR_DTYPE_FP32: "fp32"}
MAX_MERGE_INPUTS = 16
MAX_CAPTIONS = 10_000


class MergerServicer(merger_service_pb2_grpc.MergerServiceServicer):
    def __init__(self, registry: Registry, jobs: MergerJobs, quotas: TenantQuotas) -> None:
        self.registry = registry
        self.jobs = jobs
        self.quotas = quotas

    def MergeConcepts(self, request: pb.MergeConceptsRequest, context) -> pb.MergeConceptsResponse:
        tenant = current_tenant()
        if not 2 <= len(request.concepts) <= MAX_MERGE_INPUTS:
            raise InvalidArgument("concepts", f"merge 2 to {MAX_MERGE_INPUTS} concepts, got {len(request.concepts)}")
        refs = [check_ref(c, f"concepts[{i}]") for i, c in enumerate(request.concepts)]
        name = check_name(request.concept_name or "+".join(r.name for r in refs), "concept_name")
        if request.ridge < 0 or not math.isfinite(request.ridge):
            raise InvalidArgument("ridge", f"must be a finite number >= 0 (0 uses the default), got {request.ridge}")
        if not 0 <= request.context_captions <= MAX_CAPTIONS:
            raise InvalidArgument("context_captions", f"must be in 0..{MAX_CAPTIONS}, got {request.context_captions}")
        if len(request.regularization_captions) > MAX_CAPTIONS:
            raise InvalidArgument("regularization_captions", f"at most {MAX_CAPTIONS} captions")
        for i, caption in enumerate(request.regularization_captions):
            if not caption.strip():
                raise InvalidArgument(f"regularization_captions[{i}]", "must not be empty")
        _check_request_id(request.request_id)
        rows = [self._with_artifact(self.registry.get_concept(tenant, r.name, r.version)) for r in refs]
        self.quotas.check_storage(tenant, max(r.size_bytes for r in rows))  # the result is about one input's size
        domain = MergeRequest(name, request.request_id, [r.id for r in rows], request.ridge or None,
                              list(request.regularization_captions) or None, request.context_captions)
        row, _ = self.jobs.submit(tenant, "merge", domain, _summary(request))
        return pb.MergeConceptsResponse(merger_job=self._job(row))

    def CompressConcept(self, request: pb.CompressConceptRequest, context) -> pb.CompressConceptResponse:
        tenant = current_tenant()
        ref = check_ref(request.concept, "concept")
        which = request.WhichOneof("target")
        if which is None:
            raise InvalidArgument("target", "set one of rank, fraction or energy")
        value = getattr(request, which)
        if which == "rank" and value < 1:
            raise InvalidArgument("rank", f"must be >= 1, got {value}")
        if which != "rank" and not 0 < value <= 1:
            raise InvalidArgument(which, f"must be in (0, 1], got {value}")
        if request.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"unknown factor dtype {request.dtype}")
        name = check_name(request.concept_name or ref.name, "concept_name")
        _check_request_id(request.request_id)
        row = self._with_artifact(self.registry.get_concept(tenant, ref.name, ref.version))
        self.quotas.check_storage(tenant, row.size_bytes)  # at most the input's size
        domain = CompressRequest(name, request.request_id, [row.id], {which: value}, DTYPES[request.dtype])
        job, _ = self.jobs.submit(tenant, "compress", domain, _summary(request))
        return pb.CompressConceptResponse(merger_job=self._job(job))

    def GetMergerJob(self, request: pb.GetMergerJobRequest, context) -> pb.GetMergerJobResponse:
        return pb.GetMergerJobResponse(merger_job=self._job(self._get(request.name)))

    def ListMergerJobs(self, request: pb.ListMergerJobsRequest, context) -> pb.ListMergerJobsResponse:
        offset, limit = page(request.page_size, request.page_token)
        if request.state and request.state not in PROTO_TO_STATE:
            raise InvalidArgument("state", f"unknown job state {request.state}")
        state = PROTO_TO_STATE.get(request.state, "")
        rows = []
        for kind in KINDS:  # small per-tenant lists: merge both kinds, newest order by creation
            rows += self.registry.list_jobs(current_tenant(), kind, state, 0, offset + limit)
        rows = sorted(rows, key=lambda r: (r.created_at, r.id))[offset:offset + limit]
        return pb.ListMergerJobsResponse(merger_jobs=[self._job(r) for r in rows],
                                         next_page_token=next_page_token(offset, limit, len(rows)))

    def WatchMergerJob(self, request: pb.WatchMergerJobRequest, context):
        row = self._get(request.name)
        for snapshot, _ in watch_job(self.registry, row.id, current_tenant(), row.kind, context):
            yield pb.WatchMergerJobResponse(merger_job=self._job(snapshot))

    def _with_artifact(self, row):
        """The concept row, or DATA_LOSS when the store lost its artifact (checked before a job is queued)."""
        self.jobs.store.check_recorded(row.digest)
        return row

    def _get(self, name: str):
        job_id = name.removeprefix("mergerJobs/")
        if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
            raise InvalidArgument("name", f"expected mergerJobs/<32 hex characters>, got {quote(name)}")
        row = self.registry.get_job(job_id, current_tenant())
        if row.kind not in KINDS:
            raise InvalidArgument("name", f"{name} is not a merger job")
        return row

    def _job(self, row) -> pb.MergerJob:
        job = pb.MergerJob(name=f"mergerJobs/{row.id}", kind=KINDS[row.kind], state=STATE_TO_PROTO[row.state],
                           concept_name=row.concept_name, error_message=row.error_message,
                           create_time=timestamp(row.created_at), update_time=timestamp(row.updated_at),
                           request_id=row.request_id)
        for ref in row.request.get("inputs", []):
            job.inputs.add(name=ref.get("name", ""), version=int(ref.get("version", 0)))
        if row.report:
            json_format.ParseDict(row.report, job.report, ignore_unknown_fields=True)
        if row.concept_id is not None:
            job.concept.CopyFrom(concept_to_proto(self.registry.get_concept_by_id(row.concept_id)))
        return job


def _check_request_id(request_id: str) -> None:
    if len(request_id) > 128:
        raise InvalidArgument("request_id", f"at most 128 characters, got {len(request_id)}")


def _summary(request) -> dict:
    d = json_format.MessageToDict(request, preserving_proto_field_name=True)
    d["inputs"] = d.pop("concepts", None) or ([d.pop("concept")] if "concept" in d else [])
    d.pop("regularization_captions", None)
    return d


def merger_service(registry: Registry, jobs: MergerJobs, quotas: TenantQuotas) -> Service:
    return Service(merger_service_pb2_grpc.add_MergerServiceServicer_to_server, MergerServicer(registry, jobs, quotas),
                   pb.DESCRIPTOR.services_by_name["MergerService"].full_name)
