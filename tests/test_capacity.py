"""benchmarks/capacity.py --quick: the engine's ConceptCache over simulated fleets; the model's invariants."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("capacity_fleet", ROOT / "benchmarks" / "capacity_fleet.py")
fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet)

TOP = {"inputs", "assumed", "concepts_per_replica", "configs", "comparison", "quick", "seconds",
       "load_avg_1m"}
CONFIG = {"zipf", "routing", "replicas", "requests", "warm_up_requests", "hit_rate", "added_ms", "imbalance",
          "store_gb_per_hour", "gpu_rps", "fleet_rps"}
ROUTE = {"gpus", "profile_replicas", "miss", "added_p99_ms", "store_gb_per_hour"}


@pytest.fixture(scope="module")
def report():
    run = subprocess.run([sys.executable, "benchmarks/capacity.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| zipf | routing |" in run.stderr  # the table docs/capacity.md shows
    return json.loads(run.stdout.strip().splitlines()[-1])


def by_key(report, zipf=1.0):
    return {(c["routing"], c["replicas"]): c for c in report["configs"] if c["zipf"] == zipf}


def test_json_has_the_documented_keys(report):
    assert set(report) == TOP and report["quick"] is True
    assert set(report["assumed"]) <= set(report["inputs"]) and report["inputs"]["decode_ms_per_mb"] > 0
    assert set(by_key(report)) == {(r, n) for r in ("round_robin", "consistent_hash") for n in (4, 16)}
    for config in report["configs"]:
        assert CONFIG <= set(config)
        assert set(config["added_ms"]) == {"p50", "p95", "p99"}
        assert set(config["store_gb_per_hour"]) == {"10", "100", "1000"}
        assert ("che_hit_rate" in config) == (config["routing"] == "round_robin")
        assert ("unbounded_imbalance" in config) == (config["routing"] == "consistent_hash")
    for row in report["comparison"]:
        assert row["winner"] in ("round_robin", "consistent_hash")
        assert set(row["round_robin"]) == ROUTE == set(row["consistent_hash"])


def test_hit_rates_per_tier_sum_to_one_and_match_che(report):
    for config in report["configs"]:
        assert sum(config["hit_rate"].values()) == pytest.approx(1, abs=1e-3)
        assert all(0 <= r <= 1 for r in config["hit_rate"].values())
        ms = config["added_ms"]
        assert 0 <= ms["p50"] <= ms["p95"] <= ms["p99"]
        if config["routing"] == "round_robin":  # the simulated LRU agrees with the analytic approximation
            for tier in ("gpu", "cpu"):
                assert config["hit_rate"][tier] == pytest.approx(config["che_hit_rate"][tier], abs=0.02)
            assert config["imbalance"] == 1


def test_consistent_hashing_hits_at_least_as_often_at_the_same_cache_size(report):
    miss = {key: c["hit_rate"]["miss"] for key, c in by_key(report).items()}
    for n in (4, 16):
        assert miss["consistent_hash", n] <= miss["round_robin", n]
    # Round robin's hit rate does not grow with replicas; hashing's does (its caches partition the concepts).
    assert miss["consistent_hash", 16] < miss["consistent_hash", 4]
    assert miss["round_robin", 16] == pytest.approx(miss["round_robin", 4], abs=0.02)


def test_more_qps_never_needs_fewer_gpus(report):
    rows = sorted(report["comparison"], key=lambda r: r["qps"])
    for routing in ("round_robin", "consistent_hash"):
        gpus = [r[routing]["gpus"] for r in rows]
        assert all(g is not None for g in gpus) and gpus == sorted(gpus) and gpus[0] < gpus[-1]
        fleets = sorted((c for c in report["configs"] if c["routing"] == routing),
                        key=lambda c: c["replicas"])
        assert all(a["fleet_rps"] <= b["fleet_rps"] for a, b in pairwise(fleets))


def test_lru_states_are_what_the_engine_cache_holds():
    replicas, concept_bytes = 3, 1000
    fleet_ = fleet.Fleet(replicas, concept_bytes, device_bytes=3 * concept_bytes,
                         host_bytes=5 * concept_bytes)
    stream = fleet.draw(fleet.zipf_cdf(40, 0.8), 600, np.random.default_rng(0))
    routes = fleet.RoundRobin(replicas).route(stream)
    served, _ = fleet_.serve(stream, routes)
    assert set(served.tolist()) == {0, 1, 2}
    for cache, state in zip(fleet_.caches, fleet.lru_states(stream, routes, replicas, fleet_.capacity)):
        device, host = cache.cached()  # least recently used first
        assert device[::-1] + host[::-1] == [fleet.digest(c) for c in state]


def test_bounded_loads_cap_every_replica():
    replicas, epsilon, window = 8, 0.25, 64
    ring = fleet.Ring(replicas, vnodes=160)
    stream = fleet.draw(fleet.zipf_cdf(10_000, 1.2), 20_000, np.random.default_rng(0))  # the top one: ~20%
    routes = fleet.BoundedLoads(ring, replicas, epsilon, window).route(stream)
    cap = int(np.ceil((1 + epsilon) * window / replicas))
    in_flight = [np.bincount(routes[i - window:i], minlength=replicas).max()
                 for i in range(window, len(routes))]
    assert max(in_flight) <= cap
    home_share = np.bincount(ring.home(stream), minlength=replicas).max() / len(stream)
    assert home_share > cap / window  # plain hashing would overload the hot concept's replica
