"""Merge and compression cost at Stable Diffusion 1.5 shapes, on this machine's CPU.

SD-1.5 has 16 cross-attention blocks (to_k and to_v each, input 768, outputs 320/640/1280); the deltas
here have a decaying singular spectrum (s_j = 0.05 exp(-j / 100)), and C_reg is 1000 captions x 77
tokens. Timings include computing R = C_reg^T C_reg (a merge does that unless the service cached it)
and, for compression, everything `merger.run.compress_concept` does. Prints one JSON line last:
merge_2_s, merge_10_s, compress_s, peak_mb (peak RSS of this process), bytes_full and
bytes_top60_fp16 (artifact file sizes, dense float32 and top-60% float16 factors).

Usage: python benchmarks/merge.py [--captions 1000] [--tokens 77] [--threads N]
On a shared machine, read the numbers with `load_avg_1m` and the `*_cpu_s` process times: LAPACK's
threads slow down sharply when the cores are oversubscribed, so `--threads 1` may then be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from concepts.artifact import Concept, LinearDelta, concept_to_bytes
from merger.merge import merge_closed_form, regularization_gram
from merger.run import compress_concept

HIDDEN = 768
OUTPUTS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3  # down, mid, up
ROWS_PER_CONCEPT = 6  # "<new1> dog" and "photo of a <new1> dog": <new1>, dog, end token each


def sd15_layers() -> dict[str, int]:
    """Module path -> output width of SD-1.5's 32 cross-attention K/V projections."""
    return {f"blocks.{i}.attn2.{kv}": out for i, out in enumerate(OUTPUTS) for kv in ("to_k", "to_v")}


def decaying_delta(out: int, g: torch.Generator) -> torch.Tensor:
    """[out, 768] float32 with singular values close to 0.05 * exp(-j / 100)."""
    n = min(out, HIDDEN)
    spectrum = 0.05 * torch.exp(-torch.arange(n, dtype=torch.float32) / 100)
    left = torch.randn(out, n, generator=g) / out**0.5
    right = torch.randn(n, HIDDEN, generator=g) / HIDDEN**0.5
    return (left * spectrum) @ right


def timed_merge(base: dict[str, torch.Tensor], n: int, c_reg: torch.Tensor,
                g: torch.Generator) -> tuple[float, dict[str, float]]:
    deltas = [{name: decaying_delta(w.shape[0], g) for name, w in base.items()} for _ in range(n)]
    targets = [torch.randn(ROWS_PER_CONCEPT, HIDDEN, generator=g) for _ in range(n)]
    start, cpu = time.perf_counter(), time.process_time()
    _, _, summary = merge_closed_form(base, deltas, targets, regularization_gram(c_reg))
    return time.perf_counter() - start, {**summary, "cpu_s": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    base = {name: 0.02 * torch.randn(out, HIDDEN, generator=g) for name, out in sd15_layers().items()}
    # CLIP features are anisotropic: a few wide directions, many narrow ones.
    c_reg = torch.randn(args.captions * args.tokens, HIDDEN, generator=g) * torch.logspace(0, -2, HIDDEN)

    merge_2_s, summary_2 = timed_merge(base, 2, c_reg, g)
    merge_10_s, summary_10 = timed_merge(base, 10, c_reg, g)

    concept = Concept(deltas={name: LinearDelta(dense=decaying_delta(w.shape[0], g)) for name, w in base.items()},
                      tokens=("<new1>",), embeddings=torch.randn(1, HIDDEN, generator=g),
                      base_fingerprint="0" * 32, class_words=("dog",))
    start, cpu = time.perf_counter(), time.process_time()
    compressed, report = compress_concept(concept, fraction=0.6, dtype=torch.float16)
    compress_s, compress_cpu_s = time.perf_counter() - start, time.process_time() - cpu

    print(json.dumps({
        "merge_2_s": round(merge_2_s, 3),
        "merge_10_s": round(merge_10_s, 3),
        "compress_s": round(compress_s, 3),
        "merge_2_cpu_s": round(summary_2["cpu_s"], 3),
        "merge_10_cpu_s": round(summary_10["cpu_s"], 3),
        "compress_cpu_s": round(compress_cpu_s, 3),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bytes_full": len(concept_to_bytes(concept)),
        "bytes_top60_fp16": len(concept_to_bytes(compressed)),
        "top60_rank_mean": report.summary["rank_mean"],
        "top60_relative_error": round(report.summary["relative_error"], 4),
        "merge_2_residual": summary_2["residual"],
        "merge_10_residual": summary_10["residual"],
        "merge_10_drift": round(summary_10["drift"], 5),
        "merge_10_naive_drift": round(summary_10["naive_drift"], 5),
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
