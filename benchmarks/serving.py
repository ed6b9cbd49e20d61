"""Serving benchmark: what concepts cost the multi-concept engine, directly and through Triton.

    python benchmarks/serving.py [--steps 10] [--rounds 10] [--no-triton] [--wall-clock] [--base DIR]
    python benchmarks/serving.py --arrivals poisson [--rate R | --load 0.7] [--duration 20] [--seeds 1]
                                 [--step-budget 8] [--base DIR]
    python benchmarks/serving.py --telemetry [--steps 10] [--rounds 10] [--base DIR]

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

--arrivals poisson: open-loop Poisson arrivals (a 50/50 mix of 20- and 50-step requests over the 8
concepts) served with request-level batching (the engine's `generate_batch` on up to 8 queued requests
when it is free, as Triton's dynamic batcher hands them to `execute`; all answered at its end) and with
step-level batching (`engine/loop.py`, 8 images at most), at the same offered load: --rate, or --load
times the capacity measured first (back-to-back full request-level batches of 8). To be insensitive to
other tenants of a shared machine, time is virtual: the clock advances by the CPU seconds (one thread)
each batch, step, admission and decode took, and arrivals are scheduled on that clock. The JSON has
p50_s, p95_s and throughput_rps per mode, p95_ratio and throughput_ratio (step / request).

--telemetry: what metrics, tracing and JSON logs cost. Two whole stacks (`customdiff serve`: the three
services and a tritonserver each) on one registry and store: one with a /metrics port, spans exported
over OTLP to a receiver this process runs, and JSON logs; one with all of them off. Rounds of 8
concurrent Generate calls over the 8 concepts alternate between them, in pairs (on then off, off then
on); a round's cost is the CPU seconds of its stack's process tree (or the wall clock with
--wall-clock). The JSON has overhead_ratio (the median over pairs of on / off, the goal is <= 1.02),
fastest_ratio (fastest on / fastest off), and the spans the receiver got.
"""

from __future__ import annotations

import argparse
import functools
import random
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
from engine.loop import StepLoop
from engine.request import GenerationRequest

N = 8
RANK = 4
MIX_STEPS = (20, 50)  # --arrivals: each request's steps, drawn 50/50


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


def diffusers_way(base_dir: Path, concepts: list[Concept], steps: int, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """Serving one request per concept with one pipeline: install the concept, generate, next (warmed up)."""
    from diffusers import StableDiffusionPipeline

    base = load_base(base_dir, dtype=dtype, device=device)
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
                    layer.weight.copy_(original[name] + concept.deltas[name].to_dense().to(device, dtype))
                new = [t for t in concept.tokens if t not in installed]
                if new:
                    add_tokens(base.tokenizer, base.text_encoder, tuple(new),
                               concept.embeddings[:len(new)].to(device, dtype))
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


def mixed_arrivals(digests: list[str], rate: float, duration: float, seed: int = 0,
                   steps: tuple[int, ...] = MIX_STEPS) -> list[tuple[float, GenerationRequest]]:
    """Poisson arrival times over `duration` seconds at `rate`: one concept each, its steps one of `steps`."""
    rng, now, out = random.Random(seed), 0.0, []
    while True:
        now += rng.expovariate(rate)
        if now >= duration:
            return out
        i = len(out)
        out.append((now, GenerationRequest(f"photo of a <c{i % N}> dog", concept_digests=(digests[i % N],),
                                           num_inference_steps=rng.choice(steps), seed=i)))


def serve_request_level(engine: Engine, arrivals: list[tuple[float, GenerationRequest]],
                        clock: Callable[[], float]) -> list[tuple[float, float]]:
    """(arrival, completion) virtual times when each free moment takes up to N queued requests as one batch."""
    now, i, queue, done = 0.0, 0, [], []
    while i < len(arrivals) or queue:
        if not queue and arrivals[i][0] > now:
            now = arrivals[i][0]  # idle until the next arrival
        while i < len(arrivals) and arrivals[i][0] <= now:
            queue.append(arrivals[i])
            i += 1
        batch, queue = queue[:N], queue[N:]
        now += seconds(lambda: engine.generate_batch([r for _, r in batch]), clock)
        done += [(arrived, now) for arrived, _ in batch]
    return done


def serve_step_level(engine: Engine, arrivals: list[tuple[float, GenerationRequest]],
                     clock: Callable[[], float], budget: int = N) -> list[tuple[float, float]]:
    """(arrival, completion) virtual times through the step-level loop, stepped here, `budget` images at most."""
    loop = StepLoop(engine, budget)
    now, i, pending, done = 0.0, 0, [], []
    while i < len(arrivals) or pending:
        if not pending and arrivals[i][0] > now:
            now = arrivals[i][0]
        while i < len(arrivals) and arrivals[i][0] <= now:
            arrived, request = arrivals[i]
            start = clock()
            pending.append((arrived, loop.submit(request)))
            now += clock() - start
            i += 1
        now += seconds(loop.step, clock)
        done += [(arrived, now) for arrived, future in pending if future.done()]
        pending = [(arrived, future) for arrived, future in pending if not future.done()]
    return done


def poisson(engine: Engine, digests: list[str], rate: float | None, load: float, duration: float,
            clock: Callable[[], float], step_budget: int = N, seeds: int = 1,
            steps: tuple[int, ...] = MIX_STEPS) -> dict:
    """The --arrivals poisson benchmark: capacity first, then both batching modes at the same arrivals.

    `clock` advances the virtual time: this thread's CPU seconds on the CPU, else the wall clock. With
    `seeds` > 1, as many independent arrival sequences run through each mode and their latencies are
    pooled (a p95 of ~100 requests moves by 30% between sequences).
    """
    full = [r for _, r in mixed_arrivals(digests, 1000.0, 1.0, 0, steps)[:N]]  # a full batch of the mix
    engine.generate_batch(full)  # warm: every concept cached
    capacity = N / min(seconds(lambda: engine.generate_batch(full), clock) for _ in range(2))
    rate = rate or load * capacity
    sequences = [mixed_arrivals(digests, rate, duration, seed, steps) for seed in range(seeds)]
    requests = sum(len(a) for a in sequences)
    log(f"capacity {capacity:.2f} rps; offered {rate:.2f} rps ({rate / capacity:.0%}), {requests} requests")
    result = {"capacity_rps": capacity, "rate_rps": rate, "offered_load": rate / capacity, "requests": requests,
              "seeds": seeds}
    step = functools.partial(serve_step_level, budget=step_budget)
    for mode, serve in (("request", serve_request_level), ("step", step)):
        latencies, served, span = [], 0, 0.0
        for arrivals in sequences:
            done = serve(engine, arrivals, clock)
            latencies += [end - arrived for arrived, end in done]
            served += len(done)
            span += max(end for _, end in done) - arrivals[0][0]
        q = statistics.quantiles(latencies, n=100)
        result[mode] = {"p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "throughput_rps": round(served / span, 3)}
        log(f"{mode}: {result[mode]}")
    result["p95_ratio"] = result["step"]["p95_s"] / result["request"]["p95_s"]
    result["throughput_ratio"] = result["step"]["throughput_rps"] / result["request"]["throughput_rps"]
    return result


def telemetry_overhead(tmp: Path, base_dir: Path, store: ArtifactStore, base: BaseModel, digests: list[str],
                       steps: int, rounds: int, cpu_clock: bool) -> dict[str, float]:
    """The same Generate calls through a stack with metrics, tracing and JSON logs and one without (module doc)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from customdiff_client import Client
    from customdiff.local import free_port, start_serve
    from services.common.registry import Registry

    spans = [0]

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            spans[0] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), receiver)
    otlp = f"127.0.0.1:{receiver.add_insecure_port('127.0.0.1:0')}"
    receiver.start()
    database = f"sqlite:///{tmp}/registry.db"
    registry = Registry(database)
    registry.migrate()
    for i, digest in enumerate(digests):
        registry.add_concept("bench", f"c{i}", digest, [f"<c{i}>"], ["dog"], len(store.get(digest)), base.fingerprint, {})
    common = dict(api_keys="key-bench=bench", base_model=str(base_dir), database_url=database, store_url=store.url)
    stacks, clients = {}, {}
    try:
        for mode, extra in (("on", dict(metrics_port=free_port(), otlp_endpoint=otlp, log_format="json")), ("off", {})):
            log(f"starting the stack with telemetry {mode}")
            stacks[mode], ports = start_serve(tmp / mode, **common, **extra)
            clients[mode] = Client(*(f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")),
                                   api_key="key-bench")
        pool = ThreadPoolExecutor(N)

        def round_of(mode: str) -> Callable[[], None]:
            def run() -> None:
                list(pool.map(lambda i: clients[mode].generate(f"photo of a <c{i}> dog", [f"c{i}"], seed=i,
                                                               num_inference_steps=steps), range(N)))
            return run

        for mode in stacks:  # warm: every concept cached, every code path run once
            round_of(mode)()
        costs: dict[str, list[float]] = {mode: [] for mode in stacks}
        for i in range(rounds):  # pairs of rounds, in alternating order: neither mode always goes first
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                clock = (lambda pid=stacks[mode].pid: process_tree_cpu_seconds(pid)) if cpu_clock else time.perf_counter
                costs[mode].append(seconds(round_of(mode), clock))
        pool.shutdown()
    finally:
        for client in clients.values():
            client.close()
        for proc in stacks.values():
            proc.terminate()
            proc.wait(timeout=120)
        receiver.stop(0)
    return {"overhead_ratio": statistics.median(on / off for on, off in zip(costs["on"], costs["off"])),
            "fastest_ratio": min(costs["on"]) / min(costs["off"]),
            "round_s_off": statistics.median(costs["off"]), "spans_received": float(spans[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="diffusers SD directory (default: the tiny base, built here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the fastest counts")
    parser.add_argument("--no-triton", action="store_true", help="measure the engine only")
    parser.add_argument("--wall-clock", action="store_true", help="on the CPU, time with the wall clock and all "
                        "threads instead of CPU seconds of one thread (for an unshared machine)")
    parser.add_argument("--arrivals", choices=("poisson",), help="open-loop arrivals: batching modes compared")
    parser.add_argument("--rate", type=float, help="arrivals per (CPU) second (default: --load x capacity)")
    parser.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of capacity")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (virtual) of arrivals")
    parser.add_argument("--step-budget", type=int, default=N, help="--arrivals: the step loop's max_batch_images")
    parser.add_argument("--seeds", type=int, default=1, help="--arrivals: independent arrival sequences, pooled")
    parser.add_argument("--telemetry", action="store_true", help="metrics, tracing and JSON logs on / off")
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
        if args.telemetry:
            result = telemetry_overhead(Path(tmp), base_dir, store, base, digests, args.steps, args.rounds, cpu_clock)
            result.update(steps=args.steps, rounds=args.rounds, clock="cpu seconds of the stack's process tree"
                          if cpu_clock else "wall seconds", load_avg=round(os.getloadavg()[0], 2))
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
            return
        if args.arrivals:
            engine = Engine.from_paths(base_dir, store.url, device=device)
            result = poisson(engine, digests, args.rate, args.load, args.duration,
                             time.thread_time if cpu_clock else time.perf_counter, args.step_budget, args.seeds)
            result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                          clock="virtual: cpu seconds, 1 thread" if cpu_clock else "wall seconds",
                          load_avg=round(os.getloadavg()[0], 2))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
            return
        log("the diffusers way: warm-up")
        diffusers = diffusers_way(base_dir, concepts, args.steps, device)
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
