"""Service configuration: one YAML file (the Helm chart's ConfigMap) plus CUSTOMDIFF_* environment overrides.

`Settings.load()` is called only in a `main()`; everything below receives a `Settings`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from concepts.config import from_dict
from concepts.errors import InvalidArgument
from services.common.limits import RpcLimits

LAUNCHERS = ("local", "kubernetes")
LOG_FORMATS = ("text", "json")
# A DNS-1123 subdomain: how LocalQueues and PriorityClasses are named.
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class KubernetesSettings:
    """How the Kubernetes launcher builds training Jobs (see docs/deploy.md)."""

    namespace: str = "default"
    image: str = "customdiff-trainer:latest"
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "customdiff-trainer"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    # Per-pod resources besides GPUs, e.g. {"requests": {"cpu": "8", "memory": "64Gi"}}.
    resources: dict[str, Any] = field(default_factory=dict)
    # PVC holding the artifact store and job work directories, mounted at `store_mount_path`. Empty: no
    # store volume; the work directories and the store are object-store URLs (credentials: env_from_secrets).
    store_pvc: str = "customdiff-store"
    store_mount_path: str = "/var/lib/customdiff"
    base_model_pvc: str = ""
    base_model_mount_path: str = "/models/base"
    shm_size: str = "16Gi"
    backoff_limit: int = 2
    active_deadline_seconds: int = 6 * 3600
    ttl_seconds_after_finished: int = 24 * 3600
    rendezvous_port: int = 29500
    # Jobs carry it as `app.kubernetes.io/instance`; a launcher watches only its own instance's Jobs.
    instance: str = "customdiff"
    image_pull_secrets: list[str] = field(default_factory=list)
    # Secrets whose keys become environment variables of training pods (e.g. object-store credentials).
    env_from_secrets: list[str] = field(default_factory=list)
    run_as_user: int = 1000
    # Server-side watch timeout; also how often pending jobs' pods are checked for reasons to report.
    watch_timeout_seconds: int = 60
    request_timeout_seconds: float = 30.0
    # Attempts after the first for transient API errors (429, 5xx, connection errors).
    api_retries: int = 5
    # Kueue LocalQueue (in `namespace`) the Jobs are submitted to: they are created suspended with the
    # label kueue.x-k8s.io/queue-name and start when Kueue admits (unsuspends) them. Empty: no Kueue.
    queue_name: str = ""
    # PriorityClass of training pods (empty: the cluster default); Kueue orders and preempts by it too.
    priority_class_name: str = ""
    # Per-tenant PriorityClass, tenant -> class name, overriding `priority_class_name` ("": the cluster default).
    tenant_priority_classes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backoff_limit < 0:
            raise InvalidArgument("kubernetes.backoff_limit", f"must be >= 0, got {self.backoff_limit}")
        if self.active_deadline_seconds <= 0:
            raise InvalidArgument("kubernetes.active_deadline_seconds", "must be > 0")
        for name in ("namespace", "image", "shm_size", "instance"):
            if not getattr(self, name):
                raise InvalidArgument(f"kubernetes.{name}", "must not be empty")
        if self.store_pvc and not self.store_mount_path:
            raise InvalidArgument("kubernetes.store_mount_path", "must not be empty when store_pvc is set")
        if self.ttl_seconds_after_finished < 0:
            raise InvalidArgument("kubernetes.ttl_seconds_after_finished",
                                  f"must be >= 0, got {self.ttl_seconds_after_finished}")
        if not 0 < self.rendezvous_port < 65536:
            raise InvalidArgument("kubernetes.rendezvous_port", f"must be a TCP port, got {self.rendezvous_port}")
        if self.watch_timeout_seconds <= 0 or self.request_timeout_seconds <= 0:
            raise InvalidArgument("kubernetes.watch_timeout_seconds",
                                  f"watch and request timeouts must be > 0, got {self.watch_timeout_seconds} "
                                  f"and {self.request_timeout_seconds}")
        if self.api_retries < 0:
            raise InvalidArgument("kubernetes.api_retries", f"must be >= 0, got {self.api_retries}")
        if self.queue_name and not (len(self.queue_name) <= 63 and _DNS_NAME.match(self.queue_name)):
            raise InvalidArgument("kubernetes.queue_name", "must be a LocalQueue name of at most 63 lower-case "
                                  f"letters, digits, '-' and '.', got {self.queue_name!r}")
        classes = {"kubernetes.priority_class_name": self.priority_class_name,
                   **{f"kubernetes.tenant_priority_classes.{t}": c for t, c in self.tenant_priority_classes.items()}}
        for name, value in classes.items():
            if not isinstance(value, str) or value and not (len(value) <= 253 and _DNS_NAME.match(value)):
                raise InvalidArgument(name, f"must be a PriorityClass name (a DNS subdomain) or empty, got {value!r}")

    def priority_class_for(self, tenant: str) -> str:
        """The PriorityClass of `tenant`'s training pods: its own entry, else the default ("" = none)."""
        return self.tenant_priority_classes.get(tenant, self.priority_class_name)


@dataclass(frozen=True)
class QuotaLimits:
    """What one tenant may use; 0 means unlimited."""

    # Generate calls of the tenant in flight at once, per inference replica.
    concurrent_generations: int = 8
    # Training jobs of the tenant queued or running at once.
    training_jobs: int = 4
    # GPUs one training job may ask for: gpus_per_node x nodes.
    gpus_per_job: int = 8
    # Bytes of the store the tenant owns: training images it sent plus its concept artifacts.
    stored_bytes: int = 10 * 1024**3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"quotas.{f.name}", f"must be an integer >= 0 (0 = unlimited), got {value!r}")


@dataclass(frozen=True)
class Quotas:
    """Every tenant's quotas: `default`, with per-tenant overrides of some keys in `tenants`."""

    default: QuotaLimits = field(default_factory=QuotaLimits)
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tenant in self.tenants:
            self.for_tenant(tenant)  # unknown keys and bad values fail at load time, not on first use

    def for_tenant(self, tenant: str) -> QuotaLimits:
        overrides = self.tenants.get(tenant) or {}
        return from_dict(QuotaLimits, {**dataclasses.asdict(self.default), **overrides}, f"quotas.tenants.{tenant}")


@dataclass(frozen=True)
class ServerSettings:
    """What every gRPC server needs (`build_server`)."""

    host: str
    api_keys_file: str
    api_keys: str
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    max_message_bytes: int
    rpc_limits: RpcLimits


@dataclass(frozen=True)
class TrainerSettings:
    """What the TrainerService and its training jobs need."""

    work_dir: str
    launcher: str
    max_concurrent_jobs: int
    max_images_per_concept: int
    max_image_bytes: int
    max_image_pixels: int
    image_decode_workers: int
    otlp_endpoint: str
    replica_id: str
    job_lease_s: float


@dataclass(frozen=True)
class InferenceSettings:
    """What the InferenceService front needs."""

    triton_url: str
    triton_model: str


@dataclass(frozen=True)
class Settings:
    """The one config file of `customdiff serve` (the chart's ConfigMap); each consumer gets its own
    small section of it: `server()`, `trainer()`, `inference()`, `kubernetes`, `quotas`."""

    host: str = "127.0.0.1"
    trainer_port: int = 50051
    merger_port: int = 50052
    inference_port: int = 50053
    # SQLAlchemy URL of the registry; SQLite for one replica, PostgreSQL in a cluster.
    database_url: str = "sqlite:///customdiff-data/registry.db"
    # Artifact store: a directory or any fsspec URL (s3://...).
    store_url: str = "customdiff-data/store"
    # Working directory for job specs, inputs and logs.
    work_dir: str = "customdiff-data/jobs"
    # diffusers Stable Diffusion directory; empty builds the tiny base under work_dir.
    base_model: str = ""
    # API keys: a YAML/JSON file mapping key -> tenant, and/or "key=tenant,key=tenant".
    api_keys_file: str = ""
    api_keys: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # mTLS: clients must present a certificate signed by this CA (PEM); needs tls_cert_file and tls_key_file.
    tls_client_ca_file: str = ""
    # Triton gRPC endpoint the InferenceService calls.
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "stable_diffusion"
    launcher: str = "local"
    max_concurrent_jobs: int = 1
    # This replica's name in job leases (services/common/leases.py); empty: the host name (a pod's name).
    replica_id: str = ""
    # Seconds a replica's lease on its jobs lasts without renewal (renewed every third of it): how soon
    # another replica adopts the jobs of one that died.
    job_lease_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_images_per_concept: int = 64
    max_image_bytes: int = 16 * 1024 * 1024
    # Largest training image in pixels (width x height), checked from the header before decoding.
    max_image_pixels: int = 4096 * 4096
    # Threads that decode uploaded images, per trainer replica: decoding never runs on RPC threads.
    image_decode_workers: int = 2
    # In-flight RPCs per kind on each server (see services/common/limits.py).
    rpc_limits: RpcLimits = field(default_factory=RpcLimits)
    quotas: Quotas = field(default_factory=Quotas)
    # On SIGTERM: seconds in-flight Generates may take to finish before they are cancelled.
    shutdown_grace_s: float = 25.0
    # HTTP port of the process's Prometheus /metrics (every service of the process); 0: none.
    metrics_port: int = 0
    # How often the registry's gauges (jobs by state, concepts and stored bytes per tenant) are recounted.
    metrics_refresh_s: float = 15.0
    # OTLP gRPC endpoint spans are exported to (e.g. "otel-collector:4317"); empty: tracing off.
    otlp_endpoint: str = ""
    # Log lines as JSON objects ("json") or as text ("text").
    log_format: str = "text"
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise InvalidArgument("launcher", f"must be one of {LAUNCHERS}, got {self.launcher!r}")
        for name in ("trainer_port", "merger_port", "inference_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise InvalidArgument(name, f"must be a TCP port (0-65535), got {port}")
        if self.max_concurrent_jobs < 1:
            raise InvalidArgument("max_concurrent_jobs", f"must be >= 1, got {self.max_concurrent_jobs}")
        if self.max_image_pixels < 64 * 64:
            raise InvalidArgument("max_image_pixels", f"must be >= 4096 (64x64), got {self.max_image_pixels}")
        if not 1 <= self.image_decode_workers <= 64:
            raise InvalidArgument("image_decode_workers", f"must be in 1..64, got {self.image_decode_workers}")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise InvalidArgument("shutdown_grace_s", f"must be in 0..3600 seconds, got {self.shutdown_grace_s}")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument("log_format", f"must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if not 1 <= self.job_lease_s <= 3600:
            raise InvalidArgument("job_lease_s", f"must be in 1..3600 seconds, got {self.job_lease_s}")
        if not 0.1 <= self.metrics_refresh_s <= 3600:
            raise InvalidArgument("metrics_refresh_s", f"must be in 0.1..3600 seconds, got {self.metrics_refresh_s}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidArgument("tls_cert_file", "TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidArgument("tls_client_ca_file", "mTLS needs the server's own tls_cert_file and tls_key_file")

    def server(self) -> ServerSettings:
        return _section(ServerSettings, self)

    def trainer(self) -> TrainerSettings:
        return _section(TrainerSettings, self)

    def inference(self) -> InferenceSettings:
        return _section(InferenceSettings, self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        return from_dict(cls, data)

    @classmethod
    def load(cls, config_file: str | None = None, environ: dict[str, str] | None = None) -> "Settings":
        """YAML file (``--config`` or $CUSTOMDIFF_CONFIG), then CUSTOMDIFF_<KEY> overrides of top-level keys.

        Environment values are parsed as JSON when they parse (numbers, objects), else taken as strings.
        """
        env = os.environ if environ is None else environ
        path = config_file or env.get("CUSTOMDIFF_CONFIG", "")
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {} if path else {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CUSTOMDIFF_{f.name.upper()}")
            if raw is not None:
                try:
                    data[f.name] = json.loads(raw) if f.type not in ("str",) else raw
                except ValueError:
                    data[f.name] = raw
        return cls.from_dict(data)


def _section(cls, settings: Settings):
    """The fields of `settings` that `cls` declares, as a `cls`."""
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})
