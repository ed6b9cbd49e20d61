"""The concept cache: LRU by digest under a byte budget, device tier then host tier, load before evict."""

from __future__ import annotations

import threading

import pytest
import torch

from concepts.artifact import Concept, LinearDelta
from concepts.errors import BaseMismatch, CorruptArtifact
from concepts.store import ArtifactStore
from engine.cache import ConceptCache


def small_concept(seed: int) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(deltas={"blocks.0.attn2.to_k": LinearDelta(up=torch.randn(8, 2, generator=g),
                                                              down=torch.randn(2, 4, generator=g))},
                   tokens=("<new1>",), embeddings=torch.randn(1, 4, generator=g), base_fingerprint="f" * 32)


SIZE = small_concept(0).nbytes  # 8*2 + 2*4 + 4 floats = 112 bytes


@pytest.fixture()
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture()
def digests(store) -> list[str]:
    return [store.put_concept(small_concept(i)) for i in range(4)]


def test_first_use_loads_then_hits(store, digests):
    seen = []
    cache = ConceptCache(store, lambda d, c: seen.append(d), device_bytes=10 * SIZE)
    first = cache.get(digests[0])
    assert torch.equal(first.deltas["blocks.0.attn2.to_k"].up, small_concept(0).deltas["blocks.0.attn2.to_k"].up)
    assert cache.get("sha256:" + digests[0].upper()) is first  # digests are normalized
    assert seen == [digests[0]]
    assert (cache.stats.loads, cache.stats.hits, cache.stats.device_bytes) == (1, 1, SIZE)


def test_least_recently_used_goes_first_within_the_budget(store, digests):
    cache = ConceptCache(store, lambda d, c: None, device_bytes=2 * SIZE)
    cache.get(digests[0])
    cache.get(digests[1])
    cache.get(digests[0])  # 1 is now the least recently used
    cache.get(digests[2])
    assert cache.cached() == ([digests[0], digests[2]], [])
    assert (cache.stats.loads, cache.stats.evictions, cache.stats.device_bytes) == (3, 1, 2 * SIZE)


def test_device_evictions_move_to_the_host_tier_and_come_back_without_a_store_read(store, digests):
    cache = ConceptCache(store, lambda d, c: None, device_bytes=SIZE, host_bytes=2 * SIZE)
    for d in digests[:3]:
        cache.get(d)
    assert cache.cached() == ([digests[2]], [digests[0], digests[1]])
    store.delete(digests[0])  # a host hit must not read the store
    cache.get(digests[0])
    assert cache.cached() == ([digests[0]], [digests[1], digests[2]])
    assert (cache.stats.loads, cache.stats.host_hits, cache.stats.evictions) == (3, 1, 0)
    cache.get(digests[3])  # the host tier is full: its least recently used entry goes
    assert cache.cached() == ([digests[3]], [digests[2], digests[0]])
    assert cache.stats.evictions == 1


def test_a_failing_load_evicts_nothing(store, digests):
    def refuse_3(digest, concept):
        if digest == digests[3]:
            raise BaseMismatch("concept", "a" * 32, "f" * 32)

    cache = ConceptCache(store, refuse_3, device_bytes=2 * SIZE)
    cache.get(digests[0])
    cache.get(digests[1])
    with pytest.raises(CorruptArtifact):  # the cache loads registered digests only: missing is data loss
        cache.get("0" * 64)
    with pytest.raises(BaseMismatch):
        cache.get(digests[3])
    assert cache.cached() == ([digests[0], digests[1]], [])
    assert cache.stats.evictions == 0


def test_a_concept_over_the_budget_is_served_uncached(store, digests):
    cache = ConceptCache(store, lambda d, c: None, device_bytes=SIZE - 1)
    assert cache.get(digests[0]).tokens == ("<new1>",)
    assert cache.cached() == ([], [])


def test_concurrent_misses_of_one_digest_leave_one_entry(store, digests):
    cache = ConceptCache(store, lambda d, c: None, device_bytes=10 * SIZE)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(digests[0]))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(torch.equal(r.embeddings, results[0].embeddings) for r in results)
    assert cache.get(digests[0]) in results  # the entry kept is one that was handed out
    assert cache.cached() == ([digests[0]], []) and cache.stats.device_bytes == SIZE
