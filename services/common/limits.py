"""Bounded concurrency per kind of RPC, so that no kind can take the server's thread pool.

The sync gRPC server runs every RPC on one thread pool. Long Watch streams or slow Generate calls
that fill it would starve health checks, and Kubernetes would then restart a healthy pod. Here each
kind of RPC has its own bound; a call over it is RESOURCE_EXHAUSTED at once (never queued), and the
pool is sized to hold every bound plus a reserve, so health checks always find a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from concepts.errors import InvalidArgument
from services.common.interceptors import OPEN_SERVICES, wrap_enter_leave

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GENERATE = "/customdiffusion.v1.InferenceService/Generate"
# Threads kept for health checks (and reflection) beyond every bound.
RESERVE = 16


@dataclass(frozen=True)
class RpcLimits:
    """In-flight RPCs one server replica accepts, per kind (see docs/operations.md)."""

    # Server-streaming calls: WatchTrainingJob, WatchMergerJob, health Watch, reflection.
    streams: int = 128
    # InferenceService.Generate (each waits on Triton for seconds).
    generations: int = 32
    # Every other unary call.
    calls: int = 64

    def __post_init__(self) -> None:
        for name in ("streams", "generations", "calls"):
            if not 1 <= getattr(self, name) <= 10_000:
                raise InvalidArgument(f"rpc_limits.{name}", f"must be in 1..10000, got {getattr(self, name)}")

    @property
    def workers(self) -> int:
        """Threads the server's pool needs so that every bound fits with the reserve left over."""
        return self.streams + self.generations + self.calls + RESERVE


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """RESOURCE_EXHAUSTED for a call whose kind is at its bound; health checks are never limited."""

    def __init__(self, limits: RpcLimits) -> None:
        self._limits = {"streams": limits.streams, "generations": limits.generations, "calls": limits.calls}
        self._in_flight = dict.fromkeys(self._limits, 0)
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method == HEALTH_CHECK:
            return handler
        if handler.unary_stream or handler.stream_stream:
            kind = "streams"
        else:
            kind = "generations" if method == GENERATE else "calls"
        if method.startswith(OPEN_SERVICES) and kind != "streams":
            return handler

        return wrap_enter_leave(handler, lambda context: self._enter(kind, method, context),
                                lambda _: self._leave(kind))

    def _enter(self, kind: str, method: str, context) -> None:
        with self._lock:
            full = self._in_flight[kind] >= self._limits[kind]
            if not full:
                self._in_flight[kind] += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this server is at its limit of {self._limits[kind]} concurrent {kind} "
                          f"({method.rsplit('/', 1)[-1]}); retry with backoff or on another replica")

    def _leave(self, kind: str) -> None:
        with self._lock:
            self._in_flight[kind] -= 1
