"""Composition at request time (`engine/compose.py`): with compose="merge" a request's several concepts
are served as their closed-form merge, made once per set and kept; one concept, and weighted requests,
as with "sum"."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from concepts.base import load_base
from concepts.errors import BaseMismatch, InvalidArgument
from engine.compose import MergedConcepts, read_captions
from engine.engine import Engine
from engine.request import GenerationRequest
from merger.run import merge_concepts
from services.inference.triton_protocol import ModelSettings
from tests.conftest import random_concept

STEPS = 3
PROMPT = "photo of a <new1> dog next to a <new2> cat and a <new3> car"
CAPTIONS = ["a dog on the grass", "a cat on a sofa", "a red car in the street", "a photo of a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def d(store, tiny_base_dir) -> dict[str, str]:
    base = load_base(tiny_base_dir)
    return {
        "a": store.put_concept(random_concept(base, 41, "<new1>", scale=0.1, class_word="dog")),
        "b": store.put_concept(random_concept(base, 42, "<new2>", rank=2, scale=0.1, class_word="cat")),
        "c": store.put_concept(random_concept(base, 43, "<new3>", rank=3, scale=0.1, class_word="car")),
    }


@pytest.fixture(scope="module")
def merging(tiny_base_dir, store) -> Iterator[Engine]:
    engine = Engine(load_base(tiny_base_dir), store, compose="merge")  # the shipped captions
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def summing(tiny_base_dir, store) -> Engine:
    return Engine(load_base(tiny_base_dir), store)


def request(*digests: str, **fields) -> GenerationRequest:
    return GenerationRequest(PROMPT, negative_prompt="blurry", concept_digests=digests,
                             num_inference_steps=STEPS, seed=fields.pop("seed", 5), **fields)


def max_diff(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


def test_merge_serves_what_the_stored_merge_of_the_concepts_serves(merging, summing, store, d, tiny_base_dir):
    parents = sorted([d["a"], d["b"]])
    inputs = [store.get_concept(x) for x in parents]
    merged, _ = merge_concepts(load_base(tiny_base_dir), inputs, parents=parents)
    stored = store.put_concept(merged)
    ours = merging.generate(request(d["b"], d["a"]))  # either order: one set, merged in digest order
    assert max_diff(ours, summing.generate(request(stored))) <= 1e-5
    assert max_diff(merging.generate(request(d["a"], d["b"])), ours) == 0.0
    # ... and it is not the naive sum of the deltas.
    assert max_diff(ours, summing.generate(request(d["a"], d["b"]))) > 1e-3


def test_a_set_is_merged_on_its_first_request_only(merging, d):
    before = dataclasses.replace(merging.merged.stats)
    first = merging.generate(request(d["a"], d["c"]))
    again = merging.generate(request(d["c"], d["a"], seed=9))
    stats = merging.merged.stats
    assert (stats.merges - before.merges, stats.hits - before.hits, stats.failures) == (1, 1, 0)
    assert tuple(sorted([d["a"], d["c"]])) in merging.merged.cached()
    assert max_diff(first, again) > 1e-3  # another seed, same kept merge


def test_the_step_loop_serves_the_kept_merge(merging, d):
    one = request(d["c"], d["a"], seed=11)
    alone = merging.generate(one)
    before = dataclasses.replace(merging.merged.stats)
    assert max_diff(merging.submit(one).result(60), alone) <= 1e-5
    assert (merging.merged.stats.merges, merging.merged.stats.hits) == (before.merges, before.hits + 1)


def test_one_concept_and_weighted_requests_are_served_as_with_sum(merging, summing, d):
    before = dataclasses.replace(merging.merged.stats)
    for one in (request(d["a"]), request(d["b"], guidance_scale=1.0)):
        assert max_diff(merging.generate(one), summing.generate(one)) == 0.0
    # Any weight other than 1: the weighted sum (a merge has no per-concept weight).
    weighted = request(d["a"], d["b"], concept_weights=(0.5, 1.0))
    assert max_diff(merging.generate(weighted), summing.generate(weighted)) == 0.0
    after = merging.merged.stats
    assert (after.merges, after.hits, after.waits) == (before.merges, before.hits, before.waits)


def test_concurrent_requests_for_one_set_merge_it_once(merging, d):
    before = dataclasses.replace(merging.merged.stats)
    barrier, images = threading.Barrier(4), [None] * 4

    def generate(i: int) -> None:
        barrier.wait()
        images[i] = merging.generate(request(d["b"], d["c"]) if i % 2 else request(d["c"], d["b"]))

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stats = merging.merged.stats
    assert stats.merges - before.merges == 1 and stats.failures == before.failures
    assert (stats.hits - before.hits) + (stats.waits - before.waits) == 3
    assert all(max_diff(images[0], other) == 0.0 for other in images[1:])


class GatedMerges(MergedConcepts):
    """Merges that wait for `release`, then fail with `error` if it is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started, self.release, self.error = threading.Event(), threading.Event(), None

    def merge(self, digests, concepts):
        self.started.set()
        assert self.release.wait(30)
        if self.error is not None:
            raise self.error
        return super().merge(digests, concepts)


def run_waiting(merges: GatedMerges, digests: tuple[str, ...], concepts, waiters: int) -> list:
    """`waiters` + 1 threads ask for one set while the first one's merge is held; what each got."""
    out: list = [None] * (waiters + 1)

    def get(i: int) -> None:
        try:
            out[i] = merges.get(digests, concepts)
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            out[i] = e

    waits = merges.stats.waits
    threads = [threading.Thread(target=get, args=(0,))]
    threads[0].start()
    assert merges.started.wait(30)
    threads += [threading.Thread(target=get, args=(i,)) for i in range(1, waiters + 1)]
    for t in threads[1:]:
        t.start()
    deadline, target = time.monotonic() + 30, waits + waiters
    while merges.stats.waits < target and time.monotonic() < deadline:
        time.sleep(0.01)
    merges.release.set()
    for t in threads:
        t.join(60)
    return out


def test_waiters_get_the_one_merge_or_its_error_and_a_failure_is_not_kept(merging, d):
    digests = (d["a"], d["b"])
    concepts = [merging.cache.get(x) for x in digests]
    merges = GatedMerges(merging.base, CAPTIONS)
    merges.error = BaseMismatch("concepts[1]", expected="x", actual="y")
    failed = run_waiting(merges, digests, concepts, waiters=3)
    assert all(e is merges.error for e in failed) and merges.stats.waits == 3
    assert (merges.stats.merges, merges.stats.failures, merges.cached()) == (0, 1, [])
    merges.started.clear()
    merges.release.clear()
    merges.error = None
    served = run_waiting(merges, digests, concepts, waiters=2)
    assert all(m is served[0] for m in served) and (merges.stats.merges, merges.stats.waits) == (1, 5)
    assert served[0].provenance["parents"] == sorted(digests)  # merged in digest order, whatever the order asked
    assert set(served[0].tokens) == {"<new1>", "<new2>"} and served[0].provenance["captions"] == len(CAPTIONS)


def test_kept_merges_stay_within_the_budget_least_recently_used_first(merging, d):
    concepts = {k: merging.cache.get(v) for k, v in d.items()}
    one = MergedConcepts(merging.base, CAPTIONS).merge((d["a"], d["b"]), [concepts["a"], concepts["b"]])
    size = one.nbytes
    merges = MergedConcepts(merging.base, CAPTIONS, budget_bytes=size * 3 // 2)  # room for one
    for pair in ("ab", "bc", "ab", "ab"):
        merges.get([d[k] for k in pair], [concepts[k] for k in pair])
    assert merges.cached() == [tuple(sorted([d["a"], d["b"]]))]
    stats = merges.stats
    assert (stats.merges, stats.hits, stats.evictions, stats.nbytes) == (3, 1, 2, size)
    unkept = MergedConcepts(merging.base, CAPTIONS, budget_bytes=size - 1)  # served, never kept
    for _ in range(2):
        unkept.get([d["a"], d["b"]], [concepts["a"], concepts["b"]])
    assert (unkept.stats.merges, unkept.stats.hits, unkept.cached()) == (2, 0, [])


def test_a_failing_merge_is_the_requests_domain_error(tiny_base_dir, store, d, other_base_dir):
    engine = Engine(load_base(tiny_base_dir), store, compose="merge", compose_captions=CAPTIONS)
    other = store.put_concept(random_concept(load_base(other_base_dir), 44, "<new3>"))
    (result,) = engine.generate_batch([request(d["a"], other)])
    assert isinstance(result, BaseMismatch)  # FAILED_PRECONDITION, as with "sum"
    engine.merged = GatedMerges(engine.base, CAPTIONS)
    engine.merged.release.set()
    engine.merged.error = InvalidArgument("regularization_captions", "needs at least one non-empty caption")
    ok, failed = engine.generate_batch([request(d["a"]), request(d["a"], d["b"])])
    assert isinstance(ok, list) and failed is engine.merged.error


def test_options_reach_the_merge_and_are_checked(tiny_base_dir, store, d, tmp_path):
    base = load_base(tiny_base_dir)
    engine = Engine(base, store, compose="merge", compose_captions=CAPTIONS[:3], compose_context_captions=1)
    merged = engine.merged.get((d["a"], d["b"]), [engine.cache.get(d["a"]), engine.cache.get(d["b"])])
    assert {k: merged.provenance[k] for k in ("captions", "context_captions")} == {"captions": 3,
                                                                                   "context_captions": 1}
    for options, field in (({"compose": "average"}, "compose"),
                           ({"compose_captions": [" "]}, "compose_captions"),
                           ({"compose_context_captions": -1}, "compose_context_captions"),
                           ({"compose_cache_bytes": -1}, "compose_cache_bytes")):
        with pytest.raises(InvalidArgument) as e:
            Engine(base, store, **{"compose": "merge", **options})
        assert e.value.field == field
    (tmp_path / "captions.txt").write_text("a dog\n\n  a cat  \n")
    assert read_captions(str(tmp_path / "captions.txt")) == ["a dog", "a cat"] and read_captions("") is None
    with pytest.raises(InvalidArgument, match="compose_captions_file"):
        read_captions(str(tmp_path / "missing.txt"))


def test_triton_model_settings_carry_the_compose_options():
    parameters = {"base_model": {"string_value": "/b"}, "store_url": {"string_value": "/s"},
                  "compose_context_captions": {"string_value": "2"},
                  "compose_cache_bytes": {"string_value": "1024"}}
    settings = ModelSettings.from_config(parameters, {"CUSTOMDIFF_COMPOSE": "merge"})
    assert (settings.compose, settings.compose_context_captions, settings.compose_cache_bytes,
            settings.compose_captions_file) == ("merge", 2, 1024, "")
    with pytest.raises(InvalidArgument, match="compose_context_captions"):
        ModelSettings.from_config({**parameters, "compose_context_captions": {"string_value": "-1"}}, {})
