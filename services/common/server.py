"""gRPC server bootstrap shared by the three services: interceptors, health, reflection, TLS, limits."""

from __future__ import annotations

import os
import signal
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from concepts.errors import InvalidArgument
from services.common.interceptors import AuthInterceptor, ErrorInterceptor
from services.common.limits import ConcurrencyLimitInterceptor
from services.common.metrics import MetricsInterceptor
from services.common.settings import ServerSettings
from concepts.tracing import server_interceptor

LIVENESS = "liveness"


@dataclass(frozen=True)
class Service:
    """One servicer to mount: the generated `add_*_to_server` function and the full service name."""

    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any
    name: str


def load_api_keys(settings: ServerSettings) -> dict[str, str]:
    """API key -> tenant, from `api_keys_file` (YAML/JSON mapping, e.g. a mounted Secret) and `api_keys`."""
    keys: dict[str, str] = {}
    if settings.api_keys_file:
        data = yaml.safe_load(Path(settings.api_keys_file).read_text()) or {}
        if not isinstance(data, dict):
            raise InvalidArgument("api_keys_file", f"{settings.api_keys_file} must map API keys to tenant names")
        keys.update({str(k): str(v) for k, v in data.items()})
    for pair in filter(None, (p.strip() for p in settings.api_keys.split(","))):
        key, sep, tenant = pair.partition("=")
        if not sep or not key or not tenant:
            raise InvalidArgument("api_keys", f"expected 'key=tenant,...', got {pair!r}")
        keys[key] = tenant
    if not keys:
        raise InvalidArgument("api_keys", "no API keys configured: set api_keys_file or api_keys (key=tenant)")
    return keys


def build_server(settings: ServerSettings, services: list[Service], port: int
                 ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not started) server on `settings.host:port`; port 0 picks a free one.

    Returns:
        The server, the bound port, and its health servicer (every service SERVING).
    """
    limits = [("grpc.max_receive_message_length", settings.max_message_bytes),
              ("grpc.max_send_message_length", settings.max_message_bytes)]
    # Each kind of RPC has its own bound and the pool holds them all plus a reserve: health checks
    # always find a thread (services/common/limits.py). Past the pool, health checks would queue.
    workers = settings.rpc_limits.workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        # Tracing first (its span covers everything), then metrics (refusals by auth or a bound count too).
        interceptors=[server_interceptor(), MetricsInterceptor(), AuthInterceptor(load_api_keys(settings)),
                      ConcurrencyLimitInterceptor(settings.rpc_limits), ErrorInterceptor()],
        options=limits,
        maximum_concurrent_rpcs=2 * workers,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, server)
        health_servicer.set(service.name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # The process is alive and answering: SERVING until shutdown, even while a dependency (Triton) is
    # down and "" says NOT_SERVING. Kubernetes' liveness probe asks for it; readiness asks for "".
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([s.name for s in services] + [reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{port}"
    if settings.tls_cert_file:
        client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
        credentials = grpc.ssl_server_credentials(  # with a client CA: mTLS, a client certificate is required
            [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    return server, bound, health_servicer


class StopSignals:
    """SIGTERM or SIGINT, caught from the moment this is made; `wait()` blocks until one has come.

    Make it before anything announces readiness: a signal that arrives in between would otherwise kill
    the process with the default action, skipping the drain. The handler does nothing but let Python
    write to a wakeup pipe that `wait()` reads: a handler that set a `threading.Event` could deadlock on
    the event's lock when the signal lands while the main thread holds it inside `Event.wait()`.
    """

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)

    def wait(self) -> None:
        os.read(self._read, 1)
