"""The fleet `capacity.py` simulates: N Triton replicas with the engine's own `ConceptCache`, behind a router.

Concepts are ranks of a Zipf popularity (0 is the most requested). Each replica's cache is the real
`engine.cache.ConceptCache`; only its store and its concepts are stand-ins: a stand-in concept's one
tensor is a zero-strided view, so `Concept.nbytes` (what the cache budgets by) is the real artifact
size while it holds 2 bytes. Single-threaded: one request at a time, in stream order.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from concepts.artifact import Concept, LinearDelta
from engine.cache import ConceptCache
from engine.telemetry import EngineObserver

ROUTINGS = ("round_robin", "consistent_hash")
SERVED_BY = {"device": 0, "host": 1}  # anything else came from the store: 2
STORE = 2


def zipf_cdf(concepts: int, exponent: float) -> np.ndarray:
    """Cumulative request probability of ranks 0..concepts-1 under Zipf(`exponent`)."""
    weights = np.arange(1, concepts + 1, dtype=np.float64) ** -exponent
    return np.cumsum(weights) / weights.sum()


def draw(cdf: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` i.i.d. concept ranks (int64) from the popularity `cdf`."""
    return np.minimum(np.searchsorted(cdf, rng.random(count)), len(cdf) - 1)


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: well-spread uint64 ring positions of integer keys."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Ring:
    """A consistent-hash ring: `vnodes` points per replica; a concept's home is the next point clockwise."""

    def __init__(self, replicas: int, vnodes: int) -> None:
        keys = np.arange(replicas * vnodes, dtype=np.int64)
        positions = mix64(keys + (1 << 40))  # salted apart from the concepts' keys
        order = np.argsort(positions)
        self.points = positions[order]
        self.owners: list[int] = (keys // vnodes)[order].tolist()

    def start(self, concepts: np.ndarray) -> np.ndarray:
        """Index of each concept's first ring point."""
        return np.searchsorted(self.points, mix64(concepts)) % len(self.points)

    def home(self, concepts: np.ndarray) -> np.ndarray:
        """Each concept's replica when every replica has room (plain consistent hashing)."""
        return np.asarray(self.owners)[self.start(concepts)]


class RoundRobin:
    """What the inference front does today (`triton_endpoints.py`): each request to the next replica."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.sent = 0

    def route(self, stream: np.ndarray) -> np.ndarray:
        """Replica of each request of `stream`, continuing from the last call."""
        routes = (self.sent + np.arange(len(stream))) % self.replicas
        self.sent += len(stream)
        return routes


class BoundedLoads:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

    A request goes to the first replica clockwise from its concept's point whose in-flight count is
    under ceil((1 + epsilon) x in_flight / replicas). In flight: the last `window` requests (Little's
    law with a constant service time). A hot concept thus spills to the next replicas on the ring.
    """

    def __init__(self, ring: Ring, replicas: int, epsilon: float, window: int) -> None:
        self.ring, self.replicas, self.epsilon, self.window = ring, replicas, epsilon, window
        self.load = [0] * replicas
        self.recent: deque[int] = deque()

    def route(self, stream: np.ndarray) -> np.ndarray:
        """Replica of each request of `stream`, continuing from the last call."""
        load, recent, owners = self.load, self.recent, self.ring.owners
        routes = np.empty(len(stream), dtype=np.int64)
        for i, point in enumerate(self.ring.start(stream).tolist()):
            if len(recent) == self.window:  # the oldest request in flight finishes as this one arrives
                load[recent.popleft()] -= 1
            cap = math.ceil((1 + self.epsilon) * (len(recent) + 1) / self.replicas)
            replica = owners[point]
            while load[replica] >= cap:  # ends: the mean load is below cap
                point = (point + 1) % len(owners)
                replica = owners[point]
            load[replica] += 1
            recent.append(replica)
            routes[i] = replica
        return routes


def lru_states(stream: np.ndarray, routes: np.ndarray, replicas: int, capacity: int) -> list[list[int]]:
    """What each replica's LRU of `capacity` entries holds after `stream` was routed by `routes`.

    An LRU holds the last `capacity` distinct concepts it was asked for, most recent first (the
    engine's two tiers are one LRU list: device entries, then host entries).
    """
    span = int(stream.max()) + 1
    keys, first = np.unique(routes[::-1] * span + stream[::-1], return_index=True)
    keys = keys[np.argsort(first)]  # (replica, concept) pairs, most recently asked first
    keys = keys[np.argsort(keys // span, kind="stable")]
    counts = np.bincount(keys // span, minlength=replicas)
    return [group[:capacity].tolist() for group in np.split(keys % span, np.cumsum(counts)[:-1])]


class Outcome(EngineObserver):
    """What one `ConceptCache.get` did: the tier that served it ("store" on a miss), device evictions."""

    def __init__(self) -> None:
        self.tier = "store"
        self.demoted = 0

    def cache_hit(self, tier: str) -> None:
        self.tier = tier

    def cache_eviction(self, tier: str) -> None:
        if tier == "device":
            self.demoted += 1


class StandInStore:
    """`ArtifactStore.get_registered_concept` for the cache: one real-size stand-in concept for any digest."""

    def __init__(self, nbytes: int) -> None:
        view = torch.zeros((), dtype=torch.float16).expand(1, nbytes // 2)  # nbytes of data, 2 bytes held
        self.concept = Concept(deltas={"attn2.to_k": LinearDelta(dense=view)}, tokens=("<c>",),
                               embeddings=torch.zeros((), dtype=torch.float16).expand(1, 0),
                               base_fingerprint="capacity-model")

    def get_registered_concept(self, digest: str) -> Concept:
        return self.concept


def digest(concept: int) -> str:
    """A valid sha256-shaped digest naming concept rank `concept`."""
    return f"{concept:064x}"


class Fleet:
    """`replicas` caches with the same byte budgets; `serve` drives them with a routed stream.

    Args:
        replicas: Triton replicas, one GPU and one model instance (one cache) each, as the chart runs them.
        concept_bytes: artifact size of every concept, as the cache counts it.
        device_bytes / host_bytes: the cache's two budgets (config.pbtxt `cache_bytes`, `host_cache_bytes`).
    """

    def __init__(self, replicas: int, concept_bytes: int, device_bytes: int, host_bytes: int) -> None:
        store = StandInStore(concept_bytes)
        self.outcome = Outcome()
        self.caches = [ConceptCache(store, lambda d, c: None, device="cpu", dtype=torch.float16,
                                    device_bytes=device_bytes, host_bytes=host_bytes, observer=self.outcome)
                       for _ in range(replicas)]
        self.capacity = device_bytes // concept_bytes + host_bytes // concept_bytes

    def warm(self, cdf: np.ndarray, router: RoundRobin | BoundedLoads, rng: np.random.Generator,
             max_rounds: int = 16) -> int:
        """Route a warm-up stream until every cache would be full, then load the state it leaves.

        The state comes from the stream (`lru_states`) and each cache is put in it by requesting its
        concepts oldest first: one `get` per entry instead of one per warm-up request.

        Returns:
            warm-up requests routed.
        """
        streams: list[np.ndarray] = []
        routes: list[np.ndarray] = []
        while len(streams) < max_rounds:
            streams.append(draw(cdf, len(self.caches) * self.capacity, rng))
            routes.append(router.route(streams[-1]))
            stream, routed = np.concatenate(streams), np.concatenate(routes)
            states = lru_states(stream, routed, len(self.caches), self.capacity)
            if min(len(state) for state in states) == self.capacity:
                break
        for cache, state in zip(self.caches, states):
            for concept in reversed(state):
                cache.get(digest(concept))
        return sum(len(s) for s in streams)

    def serve(self, stream: np.ndarray, routes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run every request through its replica's cache.

        Returns:
            per request, where it was served (0 device, 1 host, 2 store) and how many concepts its
            insert moved from the device tier to the host tier.
        """
        served = np.empty(len(stream), dtype=np.int8)
        demoted = np.zeros(len(stream), dtype=np.int16)
        outcome, caches = self.outcome, self.caches
        for i, (concept, replica) in enumerate(zip(stream.tolist(), routes.tolist())):
            outcome.tier, outcome.demoted = "store", 0
            caches[replica].get(digest(concept))
            served[i] = SERVED_BY.get(outcome.tier, STORE)
            demoted[i] = outcome.demoted
        return served, demoted
