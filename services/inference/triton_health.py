"""The inference service's health follows Triton: NOT_SERVING while no replica has the model ready, SERVING
again once one has.

A daemon thread asks every Triton replica (`is_server_ready` and `is_model_ready`, each with a short
client timeout) every `interval_s` until one answers ready, and sets the gRPC health status of the
given service names on a change, so load balancers and readiness probes stop sending Generate calls
while Triton is down or restarting.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from grpc_health.v1 import health, health_pb2

from services.inference.triton_client import new_client
from services.inference.triton_endpoints import TritonEndpoints

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TritonHealth:
    """Sets `names` on `health_servicer` from the readiness of Triton's replicas at `url` until `stop()`."""

    def __init__(self, url: str, model: str, health_servicer: health.HealthServicer, names: list[str],
                 interval_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.url = url
        self.model = model
        self.health_servicer = health_servicer
        self.names = list(names)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.serving: bool | None = None  # unknown until the first check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-health", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def ready(self, client) -> bool:
        """Whether Triton answers and has the model loaded, within `timeout_s` per question."""
        try:
            return bool(client.is_server_ready(client_timeout=self.timeout_s)
                        and client.is_model_ready(self.model, client_timeout=self.timeout_s))
        except Exception as e:  # noqa: BLE001 - any failure to answer means not ready
            log.debug("Triton at %s not ready: %s", self.url, e)
            return False

    def _run(self) -> None:
        endpoints, clients = TritonEndpoints(self.url), {}
        try:
            while True:
                serving = False
                for address in endpoints.addresses():
                    if address not in clients:
                        clients[address] = new_client(address)
                    if self.ready(clients[address]):
                        serving = True
                        break
                if serving != self.serving:
                    self._set(serving)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            for client in clients.values():
                client.close()

    def _set(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in self.names:
            self.health_servicer.set(name, status)
        self.serving = serving
        (log.info if serving else log.warning)(
            "Triton model %s at %s %s: inference health %s", self.model, self.url,
            "is ready" if serving else "is not ready", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
