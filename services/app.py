"""Assembles the servers of one process from `Settings`: what `customdiff serve` and the tests start."""

from __future__ import annotations

import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health

from concepts.store import ArtifactStore
from services.common.concept_interop import LazyBase
from services.common.concept_servicer import concept_service
from services.common.metrics import RegistryGauges, serve_metrics
from services.common.quotas import TenantQuotas
from services.common.registry import Registry
from services.common.server import build_server
from services.common.settings import Settings

log = logging.getLogger(__name__)
COMPONENTS = ("trainer", "merger", "inference")


@dataclass
class Stack:
    """Running servers and what to close when they stop."""

    registry: Registry
    ports: dict[str, int] = field(default_factory=dict)
    servers: list[tuple[grpc.Server, health.HealthServicer]] = field(default_factory=list)
    closers: ExitStack = field(default_factory=ExitStack)

    def stop(self, grace_s: float = 5.0) -> None:
        """Drain: health NOT_SERVING, new RPCs refused, Watch streams ended (UNAVAILABLE: watch again
        elsewhere), in-flight unary calls such as Generate given `grace_s` to finish; then close."""
        for server, health_servicer in self.servers:
            health_servicer.enter_graceful_shutdown()
        self.registry.release_watchers()
        for event in [server.stop(grace_s) for server, _ in self.servers]:
            event.wait()
        self.closers.close()


def resolve_base_model(settings: Settings) -> str:
    """The configured base, or the tiny base built once next to the work directory (in the temp directory
    when the work directory is on an object store: local trainers read it from there)."""
    if settings.base_model:
        return settings.base_model
    from concepts.jobdir import is_remote
    from concepts.tiny import create_tiny_base

    local = Path(tempfile.gettempdir()) / "customdiff" if is_remote(settings.work_dir) else Path(settings.work_dir).parent
    tiny = local / "tiny-base"
    if not (tiny / "model_index.json").exists():
        log.info("no base_model configured: building the tiny base in %s", tiny)
        create_tiny_base(tiny)
    return str(tiny)


def make_launcher(settings: Settings):
    """The trainer's launcher: Kubernetes Jobs (`settings.kubernetes`), or local processes."""
    if settings.launcher == "kubernetes":
        from services.trainer.launchers.kubernetes import KubernetesJobLauncher

        return KubernetesJobLauncher.from_settings(settings.kubernetes)
    from services.trainer.launchers.local import LocalProcessLauncher

    return LocalProcessLauncher(settings.max_concurrent_jobs)


def start_stack(settings: Settings, components: tuple[str, ...] = COMPONENTS, base_model: str | None = None) -> Stack:
    """Start the gRPC servers of `components` (each with ConceptService, health and reflection)."""
    # transformers and diffusers resolve their lazy attributes unsafely when threads import them at
    # once ("cannot import name 'CLIPTokenizer'"); resolve what jobs use here, before any RPC thread.
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    registry = Registry(settings.database_url)
    registry.migrate()
    store = ArtifactStore(settings.store_url)
    base = base_model or resolve_base_model(settings)
    stack = Stack(registry)
    if settings.metrics_port:
        stack.closers.callback(serve_metrics(settings.host, settings.metrics_port))
        stack.closers.callback(RegistryGauges(registry, settings.metrics_refresh_s).start().stop)
        stack.ports["metrics"] = settings.metrics_port
    quotas = TenantQuotas(settings.quotas, registry)
    concepts = concept_service(registry, store, quotas, LazyBase(base))  # loads the base on a first import/export
    for component in components:
        if component == "trainer":
            from services.trainer.jobs import TrainingJobs
            from services.trainer.servicer import trainer_service

            jobs = TrainingJobs(settings.trainer(), registry, store, make_launcher(settings), base, quotas)
            stack.closers.callback(jobs.close)
            jobs.recover()
            service, port = trainer_service(settings.trainer(), registry, store, jobs, quotas), settings.trainer_port
        elif component == "merger":
            from services.merger.jobs import MergerJobs
            from services.merger.servicer import merger_service

            merger_jobs = MergerJobs(registry, store, base, owner=settings.replica_id, lease_s=settings.job_lease_s)
            stack.closers.callback(merger_jobs.close)
            merger_jobs.recover()
            service, port = merger_service(registry, merger_jobs, quotas), settings.merger_port
        elif component == "inference":
            from services.inference.servicer import inference_service

            service, port = inference_service(settings.inference(), registry, quotas), settings.inference_port
        else:
            raise ValueError(f"unknown component {component!r}; known: {COMPONENTS}")
        server, bound, health_servicer = build_server(settings.server(), [service, concepts], port)
        if component == "inference":
            from services.inference.triton_health import TritonHealth

            # NOT_SERVING (service and server) while Triton's model is not ready.
            watch = TritonHealth(settings.triton_url, settings.triton_model, health_servicer, [service.name, ""])
            stack.closers.callback(watch.start().stop)
        server.start()
        stack.servers.append((server, health_servicer))
        stack.ports[component] = bound
        log.info("%s listening on %s:%d", component, settings.host, bound)
    return stack
