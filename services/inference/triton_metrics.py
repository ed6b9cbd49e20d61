"""The engine's metric events as Triton custom metrics (`pb_utils.MetricFamily`), served on Triton's :8002.

Triton keeps one family per name across the model's instances and adds each instance's samples with
the same labels together (counters, histograms); the cache's bytes are per instance. Importable
anywhere; `triton_python_backend_utils` is imported on construction, inside Triton's Python backend.
"""

from __future__ import annotations

from engine.telemetry import TIERS, EngineObserver

SECONDS_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
COUNT_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


class TritonMetrics(EngineObserver):
    """Counters, gauges and histograms of one model instance, labeled with the model's name."""

    def __init__(self, model: str, instance: str) -> None:
        import triton_python_backend_utils as pb_utils

        kinds = pb_utils.MetricFamily
        # One family per name (each made once per process), one metric per label set.
        families = {name: kinds(name=name, description=description, kind=kind) for name, kind, description in (
            ("customdiff_concept_cache_hits_total", kinds.COUNTER, "Concept lookups found in the cache tier."),
            ("customdiff_concept_cache_misses_total", kinds.COUNTER, "Concept lookups not found in the cache tier."),
            ("customdiff_concept_cache_evictions_total", kinds.COUNTER, "Concepts evicted from the cache tier."),
            ("customdiff_concept_cache_bytes", kinds.GAUGE, "Bytes the cache tier holds, per model instance."),
            ("customdiff_concept_load_seconds", kinds.HISTOGRAM,
             "Reading, validating and converting a concept on a cache miss."),
            ("customdiff_concept_merge_seconds", kinds.HISTOGRAM,
             "Merging a request's concepts on the set's first use (compose merge)."),
            ("customdiff_batch_images", kinds.HISTOGRAM, "Images in one UNet call."),
            ("customdiff_batch_concepts", kinds.HISTOGRAM, "Distinct concepts among the requests of one UNet call."),
            ("customdiff_queue_seconds", kinds.HISTOGRAM, "Time a request waited for the step loop to admit it."),
            ("customdiff_generation_seconds", kinds.HISTOGRAM, "Time from a request reaching the engine to its images."),
        )}
        self._families = families  # kept alive as long as their metrics (Triton's rule)

        def metric(name: str, buckets: list[float] | None = None, **labels: str):
            keyword = {"buckets": buckets} if buckets is not None else {}
            return families[name].Metric(labels={"model": model, **labels}, **keyword)

        self._hits = {t: metric("customdiff_concept_cache_hits_total", tier=t) for t in TIERS}
        self._misses = {t: metric("customdiff_concept_cache_misses_total", tier=t) for t in TIERS}
        self._evictions = {t: metric("customdiff_concept_cache_evictions_total", tier=t) for t in TIERS}
        self._bytes = {t: metric("customdiff_concept_cache_bytes", tier=t, model_instance=instance) for t in TIERS}
        self._load = metric("customdiff_concept_load_seconds", SECONDS_BUCKETS)
        self._merge = metric("customdiff_concept_merge_seconds", SECONDS_BUCKETS)
        self._images = metric("customdiff_batch_images", COUNT_BUCKETS)
        self._concepts = metric("customdiff_batch_concepts", [0.0, *COUNT_BUCKETS])
        self._queue = metric("customdiff_queue_seconds", SECONDS_BUCKETS)
        self._generation = metric("customdiff_generation_seconds", SECONDS_BUCKETS)

    def cache_hit(self, tier: str) -> None:
        self._hits[tier].increment(1)

    def cache_miss(self, tier: str) -> None:
        self._misses[tier].increment(1)

    def cache_eviction(self, tier: str) -> None:
        self._evictions[tier].increment(1)

    def cache_bytes(self, tier: str, nbytes: int) -> None:
        self._bytes[tier].set(nbytes)

    def concept_loaded(self, seconds: float) -> None:
        self._load.observe(seconds)

    def concepts_merged(self, seconds: float) -> None:
        self._merge.observe(seconds)

    def batch(self, images: int, concepts: int) -> None:
        self._images.observe(images)
        self._concepts.observe(concepts)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def generated(self, seconds: float) -> None:
        self._generation.observe(seconds)
