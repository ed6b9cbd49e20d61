"""Composition at request time: a request's several concepts served as their closed-form merge.

With the engine's ``compose="merge"``, a request naming two or more concepts, all at weight 1, is
served with their merge (`merger.run.merge_concepts`: the closed-form solve, its caption features from
the base's own text encoder) instead of the sum of their deltas. The merge is made on the set's first
request and kept here, so from then on the set costs what one concept costs. A set is keyed by its
sorted digests and merged in that order: the same concepts named in any order are one merge.

Concurrency: one lock guards the LRU map, the merges in flight and the counters. The first thread to
miss a set merges it outside the lock; threads asking for the same set meanwhile wait for that merge
(a set is merged once), and requests for other sets are not held up. A failed merge is not kept: its
error goes to the threads waiting for it, and the set's next request tries again. Entries handed out
stay valid after eviction (eviction only drops this cache's reference).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from concepts.artifact import Concept
from concepts.base import BaseModel
from concepts.errors import InvalidArgument
from concepts.tracing import current_trace_id
from engine.cache import concept_to
from engine.telemetry import EngineObserver, tracer
from merger.run import merge_concepts

log = logging.getLogger(__name__)

COMPOSE = ("sum", "merge")


@dataclass
class ComposeStats:
    """Counters since the cache was made; `nbytes` is what the kept merges hold now."""

    merges: int = 0  # merges made (and kept, unless over the budget)
    hits: int = 0  # lookups served by a kept merge
    waits: int = 0  # lookups that waited for another thread's merge of the same set
    failures: int = 0
    evictions: int = 0
    nbytes: int = 0


def read_captions(path: str) -> list[str] | None:
    """The regularization captions in the file at `path`, one per line; None for "" (the shipped set).

    Raises:
        InvalidArgument: the file cannot be read, or holds no caption.
    """
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument("compose_captions_file", f"cannot read {path!r}: {type(e).__name__}") from None
    return check_captions([line for line in text.splitlines() if line.strip()], "compose_captions_file")


def check_captions(captions: Sequence[str] | None, field: str = "compose_captions") -> list[str] | None:
    """`captions` stripped, empty lines dropped; None stays None (the shipped set).

    Raises:
        InvalidArgument: no caption is left.
    """
    if captions is None:
        return None
    kept = [c.strip() for c in captions if c.strip()]
    if not kept:
        raise InvalidArgument(field, "needs at least one non-empty regularization caption")
    return kept


class MergedConcepts:
    """Merged concepts by sorted digests, least recently used evicted first, under a byte budget.

    Args:
        base: the engine's base; merges use its text encoder and K/V weights, and are kept on its
            UNet's device in its dtype.
        captions: regularization captions of the merges; None uses the shipped set.
        context_captions: per token, how many regularization captions naming its class word also
            constrain it (`merge_concepts`).
        budget_bytes: most bytes the kept merges hold; a merge larger than it is served, not kept.
        observer: told how long each merge took.

    Raises:
        InvalidArgument: an empty caption set, a negative `context_captions` or `budget_bytes`.
    """

    def __init__(self, base: BaseModel, captions: Sequence[str] | None = None, context_captions: int = 0,
                 budget_bytes: int = 256 << 20, observer: EngineObserver | None = None) -> None:
        if context_captions < 0:
            raise InvalidArgument("compose_context_captions", f"must be >= 0, got {context_captions}")
        if budget_bytes < 0:
            raise InvalidArgument("compose_cache_bytes", f"must be >= 0, got {budget_bytes}")
        self.base = base
        self.captions = check_captions(captions)
        self.context_captions = context_captions
        self.budget = budget_bytes
        self.observer = observer or EngineObserver()
        self.stats = ComposeStats()
        self._merged: OrderedDict[tuple[str, ...], Concept] = OrderedDict()
        self._pending: dict[tuple[str, ...], Future] = {}
        self._lock = threading.Lock()

    def get(self, digests: Sequence[str], concepts: Sequence[Concept]) -> Concept:
        """The merge of `concepts` (validated, with these distinct `digests`), made on the set's first use.

        Raises:
            BaseMismatch, InvalidArgument: from `merge_concepts` (to every thread waiting for the merge).
        """
        order = sorted(range(len(digests)), key=lambda i: digests[i])
        key = tuple(digests[i] for i in order)
        with self._lock:
            merged = self._merged.get(key)
            if merged is not None:
                self._merged.move_to_end(key)
                self.stats.hits += 1
                return merged
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = Future()
                owner = True
            else:
                self.stats.waits += 1
                owner = False
        if not owner:
            return pending.result()
        try:
            merged = self.merge(key, [concepts[i] for i in order])
        except BaseException as e:
            with self._lock:
                del self._pending[key]
                self.stats.failures += 1
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            self.stats.merges += 1
            self._keep(key, merged)
        pending.set_result(merged)
        return merged

    def merge(self, digests: tuple[str, ...], concepts: list[Concept]) -> Concept:
        """`merge_concepts` of `concepts` (float32 on the CPU, as the merger reads them from the store), on
        the base's device in its dtype; timed, logged with the request's trace id, and a span."""
        unet = self.base.unet
        started = time.perf_counter()
        inputs = [concept_to(c, "cpu", torch.float32) for c in concepts]
        with tracer.start_as_current_span("engine.concept_merge", attributes={"concept.digests": list(digests)}):
            merged, report = merge_concepts(self.base, inputs, captions=self.captions,
                                            context_captions=self.context_captions, parents=list(digests))
            merged = concept_to(merged, unet.device, unet.dtype)
        seconds = time.perf_counter() - started
        self.observer.concepts_merged(seconds)
        log.info("merged concepts %s in %.2f s (residual %.3g, drift %.3g; trace %s)", ",".join(digests),
                 seconds, report.summary["residual"], report.summary["drift"], current_trace_id() or "-")
        return merged

    def _keep(self, key: tuple[str, ...], merged: Concept) -> None:
        """Keep `merged` as the most recently used, evicting to the budget. Holds the lock."""
        if merged.nbytes > self.budget:
            log.warning("merge of %s (%d bytes) exceeds compose_cache_bytes (%d); serving it unkept",
                        ",".join(key), merged.nbytes, self.budget)
            return
        self._merged[key] = merged
        self.stats.nbytes += merged.nbytes
        while self.stats.nbytes > self.budget:
            _, old = self._merged.popitem(last=False)
            self.stats.nbytes -= old.nbytes
            self.stats.evictions += 1

    def cached(self) -> list[tuple[str, ...]]:
        """The kept sets' sorted digests, least recently used first."""
        with self._lock:
            return list(self._merged)
