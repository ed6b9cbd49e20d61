"""What the engine reports while it serves: metric events to an `EngineObserver`, spans to OpenTelemetry.

The engine knows no metrics backend: a server passes an observer (the Triton model's turns the events
into Triton metrics on :8002, `services/inference/triton_metrics.py`). Spans use the OpenTelemetry
API only, a no-op until the process installs a tracer provider. A request's spans hang under the
context it was submitted with (its caller's trace), whichever thread runs its stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace

tracer = trace.get_tracer("customdiff.engine")
TIERS = ("device", "host")


class EngineObserver:
    """Receives the engine's metric events; this base records nothing."""

    def cache_hit(self, tier: str) -> None:
        """A concept was found in `tier` ("device" or "host")."""

    def cache_miss(self, tier: str) -> None:
        """A concept was not in `tier`: the next tier, or the store, is asked."""

    def cache_eviction(self, tier: str) -> None:
        """A concept left `tier` (from "device" to the host tier or out; from "host" out)."""

    def cache_bytes(self, tier: str, nbytes: int) -> None:
        """What `tier` holds now."""

    def concept_loaded(self, seconds: float) -> None:
        """A concept was read from the store, validated and converted in `seconds`."""

    def concepts_merged(self, seconds: float) -> None:
        """A request's concepts were merged into one (`compose.py`, on the set's first use) in `seconds`."""

    def batch(self, images: int, concepts: int) -> None:
        """One UNet call ran over `images` images of requests using `concepts` distinct concepts."""

    def queued(self, seconds: float) -> None:
        """A request waited `seconds` before the step loop admitted it."""

    def generated(self, seconds: float) -> None:
        """A request's images were done `seconds` after it reached the engine."""


@contextlib.contextmanager
def spans(name: str, contexts: Sequence[otel_context.Context | None]) -> Iterator[None]:
    """One span `name` per context (one per request of a batch), open for the block. A None context
    parents its span on the current one."""
    opened = [tracer.start_span(name, context=context) for context in contexts]
    try:
        yield
    finally:
        for span in opened:
            span.end()
