"""LRU cache of decoded concepts by digest, under a byte budget: device memory first, then host memory.

A concept is read from the `ArtifactStore` on its first request and is live from then on: nothing is
reloaded and no other request waits for it (hot swap). Concurrency: one lock guards the two LRU maps
and the counters; store reads, decoding and validation run outside it, so a cold concept never
stalls requests for warm ones. Two threads missing the same digest at once both load it and the
second insert is dropped: wasted work, never a wrong result, since equal digests mean equal bytes.
Entries handed out stay valid after eviction (eviction only drops the cache's reference).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from concepts.artifact import Concept, LinearDelta, check_digest
from concepts.store import ArtifactStore
from engine.telemetry import EngineObserver, tracer

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters since the cache was made; bytes are what the entries hold now."""

    hits: int = 0
    host_hits: int = 0
    loads: int = 0
    evictions: int = 0
    device_bytes: int = 0
    host_bytes: int = 0


def concept_to(concept: Concept, device: torch.device | str, dtype: torch.dtype) -> Concept:
    """The same concept with every tensor on `device` in `dtype`."""
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    deltas = {name: LinearDelta(dense=move(d.dense), up=move(d.up), down=move(d.down))
              for name, d in concept.deltas.items()}
    return dataclasses.replace(concept, deltas=deltas, embeddings=move(concept.embeddings),
                               embeddings_2=move(concept.embeddings_2))


class ConceptCache:
    """Decoded, validated concepts by digest, least recently used evicted first.

    Args:
        store: where artifacts are read from on a miss.
        validate: called as ``validate(digest, concept)`` on every newly read concept; raises a
            domain error (e.g. `BaseMismatch`) to refuse it. Refused concepts are not cached.
        device: where the engine computes; entries there are ready to use.
        dtype: the engine's dtype; entries are converted once, on load.
        device_bytes: budget of the device tier.
        host_bytes: budget of the host tier that device evictions move to (0: none, as the engine
            sets it on the CPU, where both tiers would be the same memory).
        observer: told of hits, misses and evictions per tier, the tiers' bytes and load times.
    """

    def __init__(self, store: ArtifactStore, validate: Callable[[str, Concept], None],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 device_bytes: int = 1 << 30, host_bytes: int = 0, observer: EngineObserver | None = None) -> None:
        self.store = store
        self.validate = validate
        self.device = torch.device(device)
        self.dtype = dtype
        self.device_budget = device_bytes
        self.host_budget = host_bytes
        self._device: OrderedDict[str, Concept] = OrderedDict()
        self._host: OrderedDict[str, Concept] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self.observer = observer or EngineObserver()

    def get(self, digest: str) -> Concept:
        """The concept with this digest, on the engine's device in its dtype.

        Raises:
            InvalidArgument: `digest` is not a sha256 hex digest.
            NotFound: no artifact with this digest in the store.
            CorruptArtifact: the stored bytes do not match the digest or do not parse.
            BaseMismatch / other domain errors: raised by `validate`.
        """
        digest = check_digest(digest)
        with self._lock:
            hit = digest in self._device
            if hit:
                self._device.move_to_end(digest)
                self.stats.hits += 1
                concept = self._device[digest]
            else:
                demoted = self._host.pop(digest, None)
                if demoted is not None:
                    self.stats.host_hits += 1
                    self.stats.host_bytes -= demoted.nbytes
        if hit:
            self.observer.cache_hit("device")
            return concept
        self.observer.cache_miss("device")
        if self.host_budget:
            (self.observer.cache_miss if demoted is None else self.observer.cache_hit)("host")
        if demoted is None:
            started = time.perf_counter()
            with tracer.start_as_current_span("engine.concept_load", attributes={"concept.digest": digest}):
                concept = self.store.get_registered_concept(digest)
                self.validate(digest, concept)
                concept = concept_to(concept, self.device, self.dtype)
            self.observer.concept_loaded(time.perf_counter() - started)
        else:
            concept = concept_to(demoted, self.device, self.dtype)
        # Loaded (or promoted) before anything is evicted: a failing load leaves the cache as it was.
        return self._insert(digest, concept, loaded=demoted is None)

    def _insert(self, digest: str, concept: Concept, loaded: bool) -> Concept:
        size = concept.nbytes
        if size > self.device_budget:
            log.warning("concept %s (%d bytes) exceeds the cache budget (%d bytes); serving it uncached",
                        digest, size, self.device_budget)
            return concept
        evicted: list[str] = []  # tiers, reported once the lock is released
        with self._lock:
            if loaded:
                self.stats.loads += 1
            if digest in self._device:  # another thread loaded it meanwhile
                return self._device[digest]
            self._device[digest] = concept
            self.stats.device_bytes += size
            while self.stats.device_bytes > self.device_budget:
                old_digest, old = self._device.popitem(last=False)
                self.stats.device_bytes -= old.nbytes
                evicted.append("device")
                self._demote(old_digest, old, evicted)
            sizes = {"device": self.stats.device_bytes, "host": self.stats.host_bytes}
        for tier in evicted:
            self.observer.cache_eviction(tier)
        for tier, nbytes in sizes.items():
            self.observer.cache_bytes(tier, nbytes)
        return concept

    def _demote(self, digest: str, concept: Concept, evicted: list[str]) -> None:
        """Move a device eviction to the host tier, evicting from there as needed. Holds the lock."""
        if concept.nbytes > self.host_budget:
            self.stats.evictions += 1
            return
        self._host[digest] = concept_to(concept, "cpu", self.dtype)
        self.stats.host_bytes += concept.nbytes
        while self.stats.host_bytes > self.host_budget:
            _, old = self._host.popitem(last=False)
            self.stats.host_bytes -= old.nbytes
            self.stats.evictions += 1
            evicted.append("host")

    def cached(self) -> tuple[list[str], list[str]]:
        """Digests in the device tier and in the host tier, least recently used first."""
        with self._lock:
            return list(self._device), list(self._host)
