"""Prometheus metrics of the services, served over HTTP on `metrics_port` (docs/operations.md lists them).

The gRPC server metrics use the names of go-grpc-prometheus / py-grpc-prometheus, so existing
dashboards work. Metrics are module-level, as prometheus-client expects: every server of a process
(`customdiff serve` runs up to three) records into one registry, told apart by `grpc_service`.
The registry's gauges (jobs by state, concepts and stored bytes per tenant) are recounted from the
database every `metrics_refresh_s` by `RegistryGauges`, not per scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.interceptors import wrap_behaviour

log = logging.getLogger(__name__)

# Seconds: from a health check (~1 ms) to a training job (hours).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
_RPC = ("grpc_type", "grpc_service", "grpc_method")

RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC)
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                      (*_RPC, "grpc_code"))
RPC_SECONDS = Histogram("grpc_server_handling_seconds", "Time from an RPC's start to its status (streams: "
                        "until the stream ends).", _RPC, buckets=RPC_BUCKETS)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight_rpcs", "RPCs being served now.", _RPC)

JOBS = Gauge("customdiff_jobs", "Jobs in the registry by kind and state (recounted every metrics_refresh_s).",
             ("kind", "state"))
JOB_SECONDS = Histogram("customdiff_job_duration_seconds", "Job wall time from creation to its terminal state.",
                        ("kind", "outcome"), buckets=JOB_BUCKETS)
TRAINING_STEPS_PER_S = Gauge("customdiff_training_steps_per_second", "Optimizer steps per second of a running "
                             "training job (from its progress).", ("job_id",))
TRAINING_LOSS = Gauge("customdiff_training_loss", "Last reported loss of a running training job.", ("job_id",))
LAUNCHER_ERRORS = Counter("customdiff_launcher_errors_total", "Training launches or relaunches that failed, "
                          "by reason.", ("reason",))
MERGE_SECONDS = Histogram("customdiff_merge_seconds", "Wall time of a merge (constrained least squares).",
                          buckets=RPC_BUCKETS)
COMPRESS_SECONDS = Histogram("customdiff_compress_seconds", "Wall time of a compression (truncated SVD).",
                             buckets=RPC_BUCKETS)
MERGE_RESIDUAL = Gauge("customdiff_merge_residual", "Constraint residual of the last merge (relative).")
MERGE_DRIFT = Gauge("customdiff_merge_drift", "Drift of the last merge from the base on unrelated prompts "
                    "(relative).")
TRITON_SECONDS = Histogram("customdiff_triton_request_seconds", "Generate calls from the inference front to "
                           "Triton, by outcome (ok or the domain error's reason).", ("outcome",), buckets=RPC_BUCKETS)
DEADLINE_EXCEEDED = Counter("customdiff_generate_deadline_exceeded_total", "Generate calls that ran out of "
                            "their deadline, by where: before Triton, or in Triton.", ("where",))
QUOTA_REJECTIONS = Counter("customdiff_quota_rejections_total", "Requests refused by a tenant quota.", ("quota",))
CONCEPTS = Gauge("customdiff_concepts", "Registered concept versions per tenant.", ("tenant",))
STORED_BYTES = Gauge("customdiff_stored_bytes", "Store bytes a tenant owns (training images and concept "
                     "artifacts), as quotas count them.", ("tenant",))


def serve_metrics(host: str, port: int) -> Callable[[], None]:
    """Serve /metrics on `host:port` in a daemon thread; returns what stops it."""
    server, thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC (authenticated or not) by method and final status code, and times it.

    Outermost but for tracing, so a call refused by auth or a concurrency bound is counted too.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        kind = ("unary" if not handler.request_streaming and not handler.response_streaming else
                "server_stream" if not handler.request_streaming else
                "client_stream" if not handler.response_streaming else "bidi_stream")
        labels = (kind, service, method)

        def around(behaviour, streaming):
            def begin():
                RPC_STARTED.labels(*labels).inc()
                RPC_IN_FLIGHT.labels(*labels).inc()
                return time.perf_counter()

            def end(context, started: float, failed: BaseException | None) -> None:
                code = context.code()
                if code is None or code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.CANCELLED if isinstance(failed, GeneratorExit) else \
                        grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
                RPC_HANDLED.labels(*labels, code.name).inc()
                RPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)
                RPC_IN_FLIGHT.labels(*labels).dec()

            def unary(request, context):
                started, failed = begin(), None
                try:
                    return behaviour(request, context)
                except BaseException as e:
                    failed = e
                    raise
                finally:
                    end(context, started, failed)

            def stream(request, context):
                started, failed = begin(), None
                try:
                    yield from behaviour(request, context)
                except BaseException as e:
                    failed = e
                    raise
                finally:
                    end(context, started, failed)

            return stream if streaming else unary

        return wrap_behaviour(handler, around)


class RegistryGauges:
    """Recounts `customdiff_jobs`, `customdiff_concepts` and `customdiff_stored_bytes` from the registry
    every `interval_s` in a daemon thread (one query each, whatever the number of scrapes)."""

    def __init__(self, registry, interval_s: float) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-registry", daemon=True)
        self._seen: dict[str, set[tuple[str, ...]]] = {}

    def start(self) -> RegistryGauges:
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def refresh(self) -> None:
        counts = self.registry.metric_counts()
        for name, gauge, values in (("jobs", JOBS, counts.jobs), ("concepts", CONCEPTS, counts.concepts),
                                    ("stored_bytes", STORED_BYTES, counts.stored_bytes)):
            # Label sets that went away (a tenant deleted everything) drop to 0 rather than vanish.
            seen = self._seen.setdefault(name, set())
            for labels in seen - set(values):
                gauge.labels(*labels).set(0)
            for labels, value in values.items():
                gauge.labels(*labels).set(value)
            seen.update(values)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the refresh thread
                log.warning("could not recount the registry's metrics", exc_info=True)

