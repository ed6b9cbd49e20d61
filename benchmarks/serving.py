"""Serving benchmark: what concepts cost the multi-concept engine, directly and through Triton.

    python benchmarks/serving.py [--steps 10] [--rounds 10] [--no-triton] [--wall-clock] [--base DIR]

Builds the tiny base (or uses --base) and a store of compressed (low-rank) concepts in a temporary
directory, then measures (the fastest of --rounds interleaved rounds, warm unless said otherwise):

  overhead_single  8 requests all with one concept / 8 base-model requests           (goal <= 1.05)
  overhead_mixed   8 requests with 8 different concepts / 8 base-model requests      (goal <= 1.10)
  cold_swap_ms     first request for a never-seen concept minus a warm one           (goal: read + 20 ms)
                   (one-step requests, the median of --rounds pairs: the load does not depend on steps)
  batching_gain    8 base-model requests one at a time / the same 8 in one batch
  vs_diffusers     the diffusers way for 8 concepts (install weights and embeddings, generate, next)
                   / ours for the same 8 requests                               (goal >= 0.9 x gain)
  concepts_per_gb  compressed concepts the cache holds per GB
  onnx_vs_torch    the 8 mixed-concept requests on the torch engine / on the engine with the UNet
                   exported by `customdiff export-onnx` in onnxruntime (> 1: onnxruntime is faster)

The top-level keys are the engine's; "via_triton" repeats them through a real tritonserver, with
the 8 requests sent concurrently (Triton's dynamic batcher groups them), on the CPU only: the
shipped config.pbtxt has a KIND_CPU instance group. On the CPU, time is CPU seconds with one
thread (this process's, plus the tritonserver process tree's through Triton) unless --wall-clock:
on a shared machine that is what other tenants' load disturbs least. Progress goes to stderr;
the last line on stdout is the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from concepts.apply import add_tokens
from concepts.artifact import Concept, LinearDelta, concept_from_bytes
from concepts.base import BaseModel, kv_layers, load_base
from concepts.store import ArtifactStore
from concepts.tiny import create_tiny_base
from engine.engine import Engine
from engine.request import GenerationRequest

N = 8
RANK = 4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def fastest(variants: dict[str, Callable[[], object]], rounds: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Fastest seconds of each variant over `rounds` rounds that run every variant once, interleaved.

    On a shared machine the minimum over interleaved rounds is what load from others disturbs least.
    """
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], seconds(fn, clock))
    return best


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its descendants (tritonserver and its stubs)."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        proc = Path(f"/proc/{todo.pop()}")
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in (proc / "task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
    return total


def compressed_concept(base: BaseModel, seed: int, token: str) -> Concept:
    """A rank-4 concept on every K/V layer, as the merger's compression writes them (float16 factors)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {name: LinearDelta(up=(0.05 * torch.randn(layer.weight.shape[0], RANK, generator=g)).half(),
                                down=torch.randn(RANK, layer.weight.shape[1], generator=g).half())
              for name, layer in kv_layers(base.unet).items()}
    hidden = base.text_encoder.config.hidden_size
    return Concept(deltas=deltas, tokens=(token,), embeddings=torch.randn(1, hidden, generator=g).half(),
                   base_fingerprint=base.fingerprint, provenance={"kind": "benchmark", "seed": seed})


def make_requests(digests: list[str | None], steps: int) -> list[GenerationRequest]:
    """One request per entry: with that concept (its token in the prompt), or a base-model request."""
    return [GenerationRequest(f"photo of a {f'<c{i}>' if d else 'ktn'} dog", concept_digests=(d,) if d else (),
                              num_inference_steps=steps, seed=i) for i, d in enumerate(digests)]


def diffusers_way(base_dir: Path, concepts: list[Concept], steps: int) -> Callable[[], None]:
    """Serving one request per concept with one pipeline: install the concept, generate, next (warmed up)."""
    from diffusers import StableDiffusionPipeline

    base = load_base(base_dir)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    layers = kv_layers(base.unet)
    original = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    installed: set[str] = set()

    def serve_all() -> None:
        for i, concept in enumerate(concepts):
            with torch.no_grad():
                for name, layer in layers.items():  # swap: back to the base, then this concept's deltas
                    layer.weight.copy_(original[name] + concept.deltas[name].to_dense())
                new = [t for t in concept.tokens if t not in installed]
                if new:
                    add_tokens(base.tokenizer, base.text_encoder, tuple(new), concept.embeddings[:len(new)].float())
                    installed.update(new)
            pipe(f"photo of a <c{i}> dog", num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                 output_type="np")

    serve_all()  # warm-up; also installs the tokens once, as a long-running diffusers server would
    return serve_all


def measure(serve_batch: Callable[[list[GenerationRequest]], object],
            serve_one: Callable[[GenerationRequest], object], store: ArtifactStore, base: BaseModel,
            digests: list[str], steps: int, rounds: int, diffusers: Callable[[], None],
            clock: Callable[[], float]) -> dict[str, float]:
    """The benchmark's numbers for one way of serving (the engine, or Triton); `diffusers` serves `digests`."""
    base_reqs = make_requests([None] * N, steps)
    single_reqs = [GenerationRequest(r.prompt.replace("ktn", "<c0>"), concept_digests=(digests[0],),
                                     num_inference_steps=steps, seed=r.seed) for r in base_reqs]
    mixed_reqs = make_requests(digests, steps)
    serve_batch(mixed_reqs)  # warm: every concept cached
    t = fastest({"base": lambda: serve_batch(base_reqs), "single": lambda: serve_batch(single_reqs),
                 "mixed": lambda: serve_batch(mixed_reqs), "one_by_one": lambda: [serve_one(r) for r in base_reqs],
                 "diffusers": diffusers}, rounds, clock)
    def read_artifact(digest: str) -> Concept:
        return concept_from_bytes(store.get(digest))

    swap, read = [], []
    for k in range(rounds):
        fresh = store.put_concept(compressed_concept(base, 1000 * steps + k, "<c0>"))
        request = GenerationRequest("photo of a <c0> dog", concept_digests=(fresh,), num_inference_steps=1)
        cold = seconds(functools.partial(serve_one, request), clock)  # reads, decodes and caches the concept
        swap.append(cold - seconds(functools.partial(serve_one, request), clock))
        read.append(seconds(functools.partial(read_artifact, fresh), clock))
    return {"overhead_single": t["single"] / t["base"], "overhead_mixed": t["mixed"] / t["base"],
            "cold_swap_ms": 1000 * statistics.median(swap), "artifact_read_ms": 1000 * min(read),
            "batching_gain": t["one_by_one"] / t["base"], "vs_diffusers": t["diffusers"] / t["mixed"]}


def via_triton(base_dir: Path, store: ArtifactStore, base: BaseModel, digests: list[str], steps: int,
               rounds: int, diffusers: Callable[[], None], cpu_clock: bool) -> dict[str, float]:
    """`measure` through a tritonserver on loopback; a batch is its requests sent concurrently.

    With `cpu_clock`, time is the CPU seconds of this process and of the server's process tree.
    """
    import socket

    from services.inference.triton_client import generate_via_triton
    from services.inference.triton_protocol import MODEL_NAME
    from services.inference.triton_server import start_triton

    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    log("starting tritonserver")
    with start_triton(base_model=str(base_dir), store_url=store.url, grpc_port=ports[0], http_port=ports[1],
                      metrics_port=ports[2], host="127.0.0.1") as server, ThreadPoolExecutor(N) as pool:
        def call(request: GenerationRequest) -> list[bytes]:
            return generate_via_triton(server.grpc_url, MODEL_NAME, request, 600)

        pid = server.process.pid
        clock = (lambda: time.process_time() + process_tree_cpu_seconds(pid)) if cpu_clock else time.perf_counter
        return measure(lambda requests: list(pool.map(call, requests)), call, store, base, digests, steps, rounds,
                       diffusers, clock)


def onnx_vs_torch(engine: Engine, base_dir: Path, store_url: str, digests: list[str], steps: int, rounds: int,
                  device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    """`engine`'s time for the mixed-concept requests / its time with the exported UNet in onnxruntime."""
    from engine.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(base_dir, tmp)
        onnx_engine = Engine.from_paths(base_dir, store_url, device=device, unet_backend="onnxruntime",
                                        unet_onnx=tmp)
        requests = make_requests(digests, steps)
        onnx_engine.generate_batch(requests)  # warm
        t = fastest({"torch": lambda: engine.generate_batch(requests),
                     "onnx": lambda: onnx_engine.generate_batch(requests)}, rounds, clock)
    return t["torch"] / t["onnx"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="diffusers SD directory (default: the tiny base, built here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the fastest counts")
    parser.add_argument("--no-triton", action="store_true", help="measure the engine only")
    parser.add_argument("--wall-clock", action="store_true", help="on the CPU, time with the wall clock and all "
                        "threads instead of CPU seconds of one thread (for an unshared machine)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu_clock = device == "cpu" and not args.wall_clock
    if cpu_clock:  # one thread everywhere (Triton's stub inherits the variable): no spinning OpenMP workers
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    clock = time.process_time if cpu_clock else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(args.base) if args.base else create_tiny_base(Path(tmp) / "base")
        store = ArtifactStore(str(Path(tmp) / "store"))
        base = load_base(base_dir)
        concepts = [compressed_concept(base, i, f"<c{i}>") for i in range(N)]
        digests = [store.put_concept(c) for c in concepts]
        log("the diffusers way: warm-up")
        diffusers = diffusers_way(base_dir, concepts, args.steps)
        log(f"engine on {device}, {args.steps} steps, {args.rounds} rounds")
        engine = Engine.from_paths(base_dir, store.url, device=device)
        result = measure(engine.generate_batch, engine.generate, store, base, digests, args.steps, args.rounds,
                         diffusers, clock)
        result["concepts_per_gb"] = int(1e9 // engine.cache.get(digests[0]).nbytes)
        log("the engine with the exported UNet in onnxruntime")
        result["onnx_vs_torch"] = onnx_vs_torch(engine, base_dir, store.url, digests, args.steps, args.rounds, device,
                                                clock)
        if not args.no_triton and device == "cpu":
            via = via_triton(base_dir, store, base, digests, args.steps, args.rounds, diffusers, cpu_clock)
            result["via_triton"] = {k: round(v, 3) for k, v in via.items() if k != "artifact_read_ms"}
        result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        result["steps"] = args.steps
        result["clock"] = "cpu seconds, 1 thread" if cpu_clock else "wall seconds"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
