"""Merge and compression jobs behind the MergerService, run in process on a worker thread.

Jobs are recorded, leased to this replica (`JobLeases`), before they run. A restarted replica re-runs
its jobs that had not finished, and a live replica re-runs those of a replica that died: both
operations are deterministic, so a re-run gives the same artifact and digest, and the registry
registers it once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from concepts.artifact import Concept
from concepts.base import BaseModel, load_base
from concepts.store import ArtifactStore
from concepts.tracing import attached
from services.common.leases import JobLeases, replica_id
from services.common.logs import job_context
from services.common.metrics import COMPRESS_SECONDS, MERGE_DRIFT, MERGE_RESIDUAL, MERGE_SECONDS
from services.common.registry import Registry

log = logging.getLogger(__name__)
tracer = trace.get_tracer("customdiff.merger")
KINDS = ("merge", "compress")


@dataclass(frozen=True)
class MergeRequest:
    """Inputs are (name, version) pairs already resolved to the tenant's registry rows' ids."""

    concept_name: str
    request_id: str
    input_ids: list[int]
    ridge: float | None = None
    captions: list[str] | None = None
    context_captions: int = 0


@dataclass(frozen=True)
class CompressRequest:
    concept_name: str
    request_id: str
    input_ids: list[int]  # exactly one
    target: dict[str, Any] = field(default_factory=dict)  # exactly one of rank / fraction / energy
    dtype: str = "fp16"


class MergerJobs:
    def __init__(self, registry: Registry, store: ArtifactStore, base_model: str, workers: int = 1,
                 owner: str = "", lease_s: float = 30.0) -> None:
        self.registry = registry
        self.store = store
        self.base_model = base_model
        self._base: BaseModel | None = None
        self._base_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merger")
        self.leases = JobLeases(registry, KINDS, replica_id(owner), lease_s, adopt=self._adopt)

    def submit(self, tenant: str, kind: str, request: MergeRequest | CompressRequest, request_json: dict[str, Any]):
        """Record the job (idempotent on request_id) and queue it; return (row, created)."""
        row, created = self.registry.create_job(tenant, kind, request.request_id, request.concept_name,
                                                dict(request_json, _domain=asdict(request)),
                                                owner=self.leases.owner, lease_s=self.leases.lease_s)
        if created:  # the job's span continues this RPC's trace
            self._pool.submit(self._run, row.id, otel_context.get_current())
        return row, created

    def recover(self) -> None:
        """Re-run this replica's jobs from before a restart, then keep its leases and re-run the jobs of
        replicas that die."""
        self.leases.start()

    def _adopt(self, row) -> None:
        self._pool.submit(self._run, row.id)  # (JobLeases logs the adoption)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.leases.close()

    def base(self) -> BaseModel:
        with self._base_lock:
            if self._base is None:
                self._base = load_base(self.base_model)
            return self._base

    def _metric_base(self, concept: Concept) -> BaseModel | None:
        """The base to compress `concept` in the metric of its features: this service's base for a merge
        of it (docs/merge.md, compression), else None (plain SVD; another base's features are not here)."""
        from merger.run import compresses_by_features

        if not compresses_by_features(concept):
            return None
        base = self.base()
        return base if concept.base_fingerprint == base.fingerprint else None

    def _run(self, job_id: str, context: otel_context.Context | None = None) -> None:
        with job_context(job_id), attached(context), tracer.start_as_current_span("merger.job") as span:
            span.set_attribute("customdiff.job_id", job_id)
            self._execute(job_id)

    def _execute(self, job_id: str) -> None:
        import torch

        from merger.run import compress_concept, merge_concepts

        row = self.registry.update_job(job_id, state="running")
        domain = row.request["_domain"]
        try:
            inputs = [self.registry.get_concept_by_id(i) for i in domain["input_ids"]]
            concepts = [self.store.get_registered_concept(r.digest) for r in inputs]
            started = time.perf_counter()
            if row.kind == "merge":
                result, report = merge_concepts(self.base(), concepts, captions=domain.get("captions"),
                                                ridge=domain.get("ridge"),
                                                context_captions=domain.get("context_captions", 0),
                                                parents=[r.digest for r in inputs])
                MERGE_SECONDS.observe(time.perf_counter() - started)
                MERGE_RESIDUAL.set(report.summary.get("residual", 0.0))
                MERGE_DRIFT.set(report.summary.get("drift", 0.0))
            else:
                dtype = {"fp16": torch.float16, "fp32": torch.float32}[domain["dtype"]]
                result, report = compress_concept(concepts[0], dtype=dtype, **domain["target"],
                                                  base=self._metric_base(concepts[0]))
                COMPRESS_SECONDS.observe(time.perf_counter() - started)
            digest = self.store.put_concept(result)
            provenance = dict(result.provenance, job=f"mergerJobs/{job_id}", parents=[r.digest for r in inputs])
            self.registry.update_job(job_id, report=report.to_dict())
            self.registry.complete_job(job_id, {
                "digest": digest, "tokens": list(result.tokens), "class_words": list(result.class_words),
                "size_bytes": len(self.store.get(digest)), "base_fingerprint": result.base_fingerprint,
                "provenance": provenance})
        except Exception as e:  # noqa: BLE001 - every failure is recorded on the job, in words
            log.exception("%s job %s failed", row.kind, job_id)
            self.registry.update_job(job_id, state="failed", error_message=str(e), log_line=str(e))
