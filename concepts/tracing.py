"""OpenTelemetry tracing: one provider per process, exporting spans over OTLP/gRPC; off without an endpoint.

Without `configure_tracing` the API's no-op tracer is used, so instrumented code costs next to
nothing. A trace crosses processes as W3C trace context (`traceparent`): in gRPC metadata (the grpc
instrumentation's interceptors inject and extract it), as a Triton request parameter (the inference
front to the stable_diffusion model), and in a training job's launch.json (the service to the
training process). docs/operations.md, "Traces", follows one request through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
TRACEPARENT = "traceparent"
# The environment variable a training process finds its parent trace in (launch.json keeps it).
TRACEPARENT_ENV = "TRACEPARENT"
# The environment variable that names the OTLP endpoint for processes without a config file: the
# Triton model and training processes.
OTLP_ENV = "CUSTOMDIFF_OTLP_ENDPOINT"
_PROPAGATOR = TraceContextTextMapPropagator()


def configure_tracing(service_name: str, otlp_endpoint: str) -> Callable[[], None] | None:
    """Install this process's tracer provider: spans batched to `otlp_endpoint` (``host:port``, plaintext
    gRPC, e.g. an OpenTelemetry Collector). Returns what flushes and stops it; None when the endpoint
    is empty (tracing stays off)."""
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("tracing: %s exports spans to %s", service_name, otlp_endpoint)
    return provider.shutdown


def server_interceptor():
    """The grpc instrumentation's server interceptor: a SERVER span per RPC, parented by the caller's
    `traceparent` metadata."""
    from opentelemetry.instrumentation.grpc import server_interceptor as otel_server_interceptor

    return otel_server_interceptor()


def current_traceparent() -> str:
    """The current span's W3C ``traceparent`` header value, or "" outside a (sampled) span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def context_from(traceparent: str) -> otel_context.Context | None:
    """The context a ``traceparent`` value continues; None for "" or a malformed value."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def current_trace_id() -> str:
    """The current trace's id as 32 hex digits, or "" outside a span."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a ``traceparent`` value; "" for "" or a malformed value."""
    context = context_from(traceparent)
    return format(trace.get_current_span(context).get_span_context().trace_id, "032x") if context else ""


def continued(traceparent: str, name: str):
    """A span `name` continuing the trace of `traceparent` (a new trace when it is ""), current in the block."""
    return trace.get_tracer("customdiff").start_as_current_span(name, context=context_from(traceparent))


@contextlib.contextmanager
def attached(context: otel_context.Context | None) -> Iterator[None]:
    """Make `context` current for the block (spans started inside hang under it); None changes nothing.
    For work handed to another thread: capture `opentelemetry.context.get_current()` where it is handed."""
    if context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)
