"""Capacity model past one machine: 1,000,000 tenants' concepts served by N Triton replicas.

    python benchmarks/capacity.py [--quick] [--requests 150000] [--zipf 0.8 1.0 1.2] [--replicas 4 16 64 256]
                                  [--qps 10 100 1000] [--p95-target 3.0] [--epsilon 0.25] [--concept-mb 7.5]
                                  [--device-gib 1] [--host-gib 4] [--step-ms 15 4.5] [--seed 0]

For each Zipf exponent, replica count and routing (round robin, what the inference front does today;
consistent hashing of the concept with bounded loads), a stream of requests drawn from the Zipf
popularity runs through N copies of the engine's own `ConceptCache` (capacity_fleet.py), one per
replica, at the shipped byte budgets and real SD-1.5 concept sizes. The caches start in the state a
routed warm-up stream leaves (`Fleet.warm`: an LRU holds the last concepts it was asked for), then the
measured stream (the same for every configuration of an exponent) runs through them. Time is not
simulated: under independent requests an LRU's hit rates do not depend on the request rate, so the
sample's rates scale to a day at any QPS (store bytes per hour = miss rate x QPS x 3600 x bytes).
What a request waits for its concept (nothing on a device hit; a host-to-device copy on a host hit;
the store read, verify, parse and copy on a miss; plus a device-to-host copy per concept its insert
demotes) is added per request from the inputs; GPUs needed come from an assumed step-time model.
`StepLoop.submit` resolves concepts in the caller's thread: a miss delays its own request, not the batch.

Inputs are `Inputs`' fields: measured (here or in RESULTS.md / docs/merge.md) or assumed, as commented;
docs/capacity.md has the method, the provenance and the results. Progress and a markdown table go to
stderr; the last line on stdout is the JSON (keys: docs/capacity.md). --quick (a few seconds, for the
test): 20,000 requests, Zipf 1.0, 4 and 16 replicas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from concepts.artifact import Concept, LinearDelta, concept_from_bytes, concept_to_bytes, digest_of

sys.path.insert(0, str(Path(__file__).parent))
from capacity_fleet import ROUTINGS, BoundedLoads, Fleet, Ring, RoundRobin, draw, zipf_cdf  # noqa: E402
from merge import HIDDEN, sd15_layers  # noqa: E402

TOP60_RANK = 74  # mean rank of a top-60% compressed SD-1.5 concept (docs/merge.md, benchmarks/merge.py)


@dataclass(frozen=True)
class Inputs:
    """The model's inputs; `ASSUMED` names those no measurement backs yet."""

    concepts: int = 1_000_000  # tenants' concepts, one each
    # Measured: a top-60% compressed SD-1.5 concept file, fp16 factors (docs/merge.md: 7.5 MB, mean rank 74;
    # 76.7 MB dense fp32 before compression). The GPU engine's cache holds it in fp16 too: same bytes.
    concept_bytes: int = 7_500_000
    device_cache_bytes: int = 1 << 30  # shipped: config.pbtxt cache_bytes (the chart's triton.cacheBytes 0)
    host_cache_bytes: int = 4 << 30  # shipped: config.pbtxt host_cache_bytes (Triton pod limit: 32 Gi)
    max_batch_images: int = 16  # shipped: config.pbtxt max_batch_images, step-level batching
    steps: int = 25
    # Assumed, SD-1.5 512x512 fp16 with guidance (2 UNet rows an image) on an H100-class GPU, torch + SDPA:
    # 1 image ~19.5 ms a step (fal-ai/stable-diffusion-benchmarks: A100 80G, diffusers SDPA, 31 it/s, i.e.
    # 32 ms; H100 ~1.6x), +4.5 ms an image once compute-bound (~2 ms of UNet a 64x64 row). Measured only
    # on the CPU tiny base: 9 ms + 3.3 ms a running request (RESULTS.md, step-level batching).
    step_ms_fixed: float = 15.0
    step_ms_per_image: float = 4.5
    # Assumed, an in-region S3-class GET: lognormal time to first byte (median, sigma: p99 ~4x median),
    # then one stream's bandwidth.
    store_first_byte_ms: float = 30.0
    store_first_byte_sigma: float = 0.6
    store_mb_per_s: float = 100.0
    # Measured here at start (sha256 verify + safetensors parse of a real-size concept, this CPU); the
    # tiny concepts of RESULTS.md (cold_swap_ms 0.4-0.6) are too small to give a per-MB figure.
    decode_ms_per_mb: float = 0.0
    # Assumed: `concept_to` copies from pageable host memory over PCIe Gen5 x16, one copy per tensor (~65).
    pcie_gb_per_s: float = 12.0
    copy_fixed_ms: float = 0.5
    p95_target_s: float = 3.0  # assumed product target for a 25-step 512x512 image
    epsilon: float = 0.25  # bounded loads: no replica above (1 + epsilon) x the mean in flight
    vnodes: int = 160  # ring points per replica (ketama's default)
    in_flight_per_replica: int = 8  # assumed mean running requests a replica (half of max_batch_images)


ASSUMED = ("step_ms_fixed", "step_ms_per_image", "store_first_byte_ms", "store_first_byte_sigma",
           "store_mb_per_s", "pcie_gb_per_s", "copy_fixed_ms", "p95_target_s", "in_flight_per_replica")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_decode_ms_per_mb(rank: int, repeats: int) -> float:
    """Verify (sha256) and parse a rank-`rank` fp16 SD-1.5 concept: ms per MB, the fastest of `repeats`."""
    g = torch.Generator().manual_seed(0)
    deltas = {name: LinearDelta(up=torch.randn(out, rank, generator=g).half(),
                                down=torch.randn(rank, HIDDEN, generator=g).half())
              for name, out in sd15_layers().items()}
    concept = Concept(deltas=deltas, tokens=("<new1>",), embeddings=torch.randn(1, HIDDEN).half(),
                      base_fingerprint="capacity-model")
    data = concept_to_bytes(concept)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        digest_of(data)
        concept_from_bytes(data)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / (len(data) / 1e6)


def added_ms(served: np.ndarray, demoted: np.ndarray, inputs: Inputs, rng: np.random.Generator) -> np.ndarray:
    """Milliseconds each request waits for its concept, by where it was served (0 device, 1 host, 2 store)."""
    mb = inputs.concept_bytes / 1e6
    copy = inputs.copy_fixed_ms + inputs.concept_bytes / (inputs.pcie_gb_per_s * 1e9) * 1000
    median, sigma = math.log(inputs.store_first_byte_ms), inputs.store_first_byte_sigma
    first_byte = rng.lognormal(median, sigma, len(served))
    store = first_byte + 1000 * mb / inputs.store_mb_per_s + inputs.decode_ms_per_mb * mb + copy
    return np.where(served == 1, copy, 0.0) + np.where(served == 2, store, 0.0) + demoted * copy


def che_hit(p: np.ndarray, capacity: int) -> float:
    """LRU hit rate under independent requests (Che's approximation: sum(1 - e^(-p T)) = capacity)."""
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < capacity:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(-np.expm1(-p * mid)) < capacity else (lo, mid)
    return float(np.sum(p * -np.expm1(-p * lo)))


def poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q."""
    k, term = 0, math.exp(-mean)
    total = term
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


def gpu_rps(inputs: Inputs, extra_s: float) -> float:
    """Most requests/s (1 image each) one GPU serves with its p95 latency within the target.

    Step-level batching: the n running requests obey Little's law, n = rate x steps x step(n), and their
    count is Poisson (M/G/inf); the p95 request runs at the p95 count n95, taking (steps + 1) x step(n95)
    (one step waiting for admission) plus `extra_s`, the p95 of what misses add (a sum of p95s: an upper
    bound). n95 must fit max_batch_images, else requests queue.
    """
    fixed, per_image = inputs.step_ms_fixed / 1000, inputs.step_ms_per_image / 1000

    def meets(rate: float) -> bool:
        busy = rate * inputs.steps * per_image
        mean = rate * inputs.steps * fixed / (1 - busy) if busy < 1 else math.inf
        if mean > 4 * inputs.max_batch_images:
            return False
        n95 = max(poisson_quantile(mean, 0.95), 1)
        latency = (inputs.steps + 1) * (fixed + per_image * n95) + extra_s
        return n95 <= inputs.max_batch_images and latency <= inputs.p95_target_s

    lo, hi = 0.0, 1 / (inputs.steps * per_image)
    for _ in range(50):
        lo, hi = ((lo + hi) / 2, hi) if meets((lo + hi) / 2) else (lo, (lo + hi) / 2)
    return lo


def gpus_needed(qps: float, profiles: dict[int, tuple[float, float]]) -> int | None:
    """Fewest GPUs serving `qps` at the p95 target; None if no fleet does.

    Args:
        profiles: simulated replica count -> (requests/s one GPU serves, load imbalance); a fleet of G
            uses the profile of the largest simulated count <= G (cautious for consistent hashing, whose
            hit rate grows with replicas), the smallest one below them all.
    """
    for g in range(1, 100_000):
        n = max((r for r in profiles if r <= g), default=min(profiles))
        rps, imbalance = profiles[n]
        if g * rps / imbalance >= qps:
            return g
    return None


def simulate(inputs: Inputs, routing: str, replicas: int, cdf: np.ndarray, stream: np.ndarray,
             qps: list[float], seed: int) -> dict:
    """One configuration: the fleet warmed up, then driven by `stream`."""
    rng = np.random.default_rng([seed, replicas, ROUTINGS.index(routing)])
    fleet = Fleet(replicas, inputs.concept_bytes, inputs.device_cache_bytes, inputs.host_cache_bytes)
    ring = Ring(replicas, inputs.vnodes) if routing == "consistent_hash" else None
    router = BoundedLoads(ring, replicas, inputs.epsilon, replicas * inputs.in_flight_per_replica) if ring \
        else RoundRobin(replicas)
    # 1. Caches in the state a warm-up stream leaves, then the measured stream, routed on.
    warm = fleet.warm(cdf, router, rng)
    routes = router.route(stream)
    served, demoted = fleet.serve(stream, routes)
    # 2. Rates per tier, added latency, load balance, store traffic and GPUs.
    rate = np.bincount(served, minlength=3) / len(served)
    ms = added_ms(served, demoted, inputs, rng)
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    imbalance = float(np.bincount(routes, minlength=replicas).max() * replicas / len(routes))
    per_gpu = gpu_rps(inputs, p95 / 1000)
    result = {"routing": routing, "replicas": replicas, "requests": len(served), "warm_up_requests": warm,
              "hit_rate": {"gpu": float(rate[0]), "cpu": float(rate[1]), "miss": float(rate[2])},
              "added_ms": {"p50": p50, "p95": p95, "p99": p99}, "imbalance": imbalance,
              "store_gb_per_hour": {f"{q:g}": rate[2] * q * 3600 * inputs.concept_bytes / 1e9 for q in qps},
              "gpu_rps": per_gpu, "fleet_rps": replicas * per_gpu / imbalance}
    if ring:  # plain consistent hashing: each replica takes its partition's whole mass
        home = ring.home(np.arange(inputs.concepts))
        mass = np.bincount(home, weights=np.diff(cdf, prepend=0.0), minlength=replicas)
        result["unbounded_imbalance"] = float(mass.max() * replicas)
    return result


def compare(configs: list[dict], qps: list[float]) -> list[dict]:
    """Per Zipf exponent and QPS: GPUs, misses and store traffic of both routings, and which wins."""
    rows = []
    for zipf in sorted({c["zipf"] for c in configs}):
        by_routing = {r: {c["replicas"]: c for c in configs if c["zipf"] == zipf and c["routing"] == r}
                      for r in ROUTINGS}
        for q in qps:
            row: dict = {"zipf": zipf, "qps": q}
            for routing, fleets in by_routing.items():
                gpus = gpus_needed(q, {n: (c["gpu_rps"], c["imbalance"]) for n, c in fleets.items()})
                profile = fleets[max((n for n in fleets if n <= (gpus or 0)), default=min(fleets))]
                row[routing] = {"gpus": gpus, "profile_replicas": profile["replicas"],
                                "miss": profile["hit_rate"]["miss"],
                                "added_p99_ms": profile["added_ms"]["p99"],
                                "store_gb_per_hour": profile["store_gb_per_hour"][f"{q:g}"]}
            rr, ch = row["round_robin"], row["consistent_hash"]
            wins = ch["gpus"] is not None and (rr["gpus"] is None or ch["gpus"] <= rr["gpus"]) \
                and ch["miss"] <= rr["miss"]
            row["winner"] = "consistent_hash" if wins else "round_robin"
            rows.append(row)
    return rows


def markdown(configs: list[dict], rows: list[dict], qps: list[float]) -> str:
    """The two tables docs/capacity.md shows."""
    q = f"{qps[len(qps) // 2]:g}"
    lines = ["| zipf | routing | replicas | GPU hit | CPU hit | miss | added p50 / p95 / p99 ms | imbalance "
             f"(plain hashing) | store GB/h at {q} req/s | req/s per GPU |", "| --- " * 10 + "|"]
    for c in configs:
        plain = f" ({c['unbounded_imbalance']:.2f})" if "unbounded_imbalance" in c else ""
        hit, ms = c["hit_rate"], c["added_ms"]
        lines.append(f"| {c['zipf']} | {c['routing']} | {c['replicas']} | {hit['gpu']:.3f} | "
                     f"{hit['cpu']:.3f} | {hit['miss']:.3f} | {ms['p50']:.1f} / {ms['p95']:.1f} / "
                     f"{ms['p99']:.1f} | {c['imbalance']:.2f}{plain} | {c['store_gb_per_hour'][q]:,.0f} | "
                     f"{c['gpu_rps']:.2f} |")
    lines += ["", "| zipf | req/s | GPUs RR / CH | miss RR / CH | store GB/h RR / CH | added p99 ms RR / CH "
              "| winner |", "| --- " * 7 + "|"]
    for r in rows:
        rr, ch = r["round_robin"], r["consistent_hash"]
        lines.append(f"| {r['zipf']} | {r['qps']:g} | {rr['gpus']} / {ch['gpus']} | {rr['miss']:.3f} / "
                     f"{ch['miss']:.3f} | {rr['store_gb_per_hour']:,.0f} / {ch['store_gb_per_hour']:,.0f} | "
                     f"{rr['added_p99_ms']:.0f} / {ch['added_p99_ms']:.0f} | {r['winner']} |")
    return "\n".join(lines)


def rounded(value: object) -> object:
    """`value` with every float rounded to 4 decimals, for the JSON line."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: Zipf 1.0, 4 and 16 replicas")
    parser.add_argument("--requests", type=int, help="measured requests per configuration (default 150000)")
    parser.add_argument("--zipf", type=float, nargs="+", help="Zipf exponents (default 0.8 1.0 1.2)")
    parser.add_argument("--replicas", type=int, nargs="+", help="replica counts (default 4 16 64 256)")
    parser.add_argument("--qps", type=float, nargs="+", default=[10, 100, 1000],
                        help="request rates to size fleets for")
    parser.add_argument("--p95-target", type=float, default=Inputs.p95_target_s, help="seconds")
    parser.add_argument("--concept-mb", type=float, default=Inputs.concept_bytes / 1e6, help="artifact MB")
    parser.add_argument("--device-gib", type=float, default=Inputs.device_cache_bytes / 2**30)
    parser.add_argument("--host-gib", type=float, default=Inputs.host_cache_bytes / 2**30)
    parser.add_argument("--step-ms", type=float, nargs=2, metavar=("FIXED", "PER_IMAGE"),
                        default=[Inputs.step_ms_fixed, Inputs.step_ms_per_image], help="UNet step model, ms")
    parser.add_argument("--epsilon", type=float, default=Inputs.epsilon, help="bounded-load slack")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    zipfs = args.zipf or ([1.0] if args.quick else [0.8, 1.0, 1.2])
    replica_counts = args.replicas or ([4, 16] if args.quick else [4, 16, 64, 256])
    requests = args.requests or (20_000 if args.quick else 150_000)
    inputs = Inputs(concept_bytes=int(args.concept_mb * 1e6), device_cache_bytes=int(args.device_gib * 2**30),
                    host_cache_bytes=int(args.host_gib * 2**30), step_ms_fixed=args.step_ms[0],
                    step_ms_per_image=args.step_ms[1], p95_target_s=args.p95_target, epsilon=args.epsilon)
    log(f"verify + parse of a rank-{TOP60_RANK} SD-1.5 concept on this CPU")
    inputs = replace(inputs, decode_ms_per_mb=measure_decode_ms_per_mb(TOP60_RANK, 1 if args.quick else 5))
    device_slots = inputs.device_cache_bytes // inputs.concept_bytes
    slots = device_slots + inputs.host_cache_bytes // inputs.concept_bytes
    log(f"{inputs.decode_ms_per_mb:.2f} ms/MB; {device_slots} + {slots - device_slots} concepts a replica")
    configs = []
    for zipf in zipfs:
        cdf = zipf_cdf(inputs.concepts, zipf)
        stream = draw(cdf, requests, np.random.default_rng([args.seed, int(zipf * 1000)]))
        p = np.diff(cdf, prepend=0.0)
        che = {"gpu": che_hit(p, device_slots), "cpu": che_hit(p, slots) - che_hit(p, device_slots)}
        for replicas in replica_counts:
            for routing in ROUTINGS:
                start = time.perf_counter()
                config = {"zipf": zipf,
                          **simulate(inputs, routing, replicas, cdf, stream, args.qps, args.seed)}
                if routing == "round_robin":  # every replica sees the whole popularity: Che applies as is
                    config["che_hit_rate"] = che
                configs.append(config)
                log(f"zipf {zipf} {routing} x{replicas}: miss {config['hit_rate']['miss']:.3f}, "
                    f"p99 +{config['added_ms']['p99']:.0f} ms ({time.perf_counter() - start:.1f} s)")
    rows = compare(configs, args.qps)
    log(markdown(configs, rows, args.qps))
    result = {"inputs": asdict(inputs), "assumed": list(ASSUMED),
              "concepts_per_replica": {"gpu": device_slots, "cpu": slots - device_slots}, "configs": configs,
              "comparison": rows, "quick": args.quick, "seconds": time.perf_counter() - started,
              "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(rounded(result)))


if __name__ == "__main__":
    main()
