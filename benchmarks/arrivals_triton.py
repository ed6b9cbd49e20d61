"""Open-loop Poisson arrivals through a real tritonserver: step-level batching (shipped) against request-level.

    python benchmarks/arrivals_triton.py [--load 0.7] [--duration 30] [--base DIR]

The same arrivals as `serving.py --arrivals poisson` (a 50/50 mix of 20- and 50-step requests, one of 8
rank-4 concepts each, 64x64, guidance 7.5), sent by `generate_via_triton` at their arrival times on the
wall clock to a tritonserver on loopback: first the repository as shipped (decoupled, `batching`
"step"), then a copy set to request-level batching (not decoupled, Triton's dynamic batcher). Capacity
is measured on the request-level server: N requests of the mix sent at once, back to back, the faster
of two rounds. Wall-clock times on a shared machine: read them with the load average. Progress goes to
stderr; the last line on stdout is the JSON (p50_s, p95_s, throughput_rps per mode, p95_ratio,
throughput_ratio, offered_load).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from concepts.base import load_base
from concepts.store import ArtifactStore
from concepts.tiny import create_tiny_base
from customdiff.local import free_port
from engine.request import GenerationRequest
from services.inference.triton_client import generate_via_triton
from services.inference.triton_protocol import MODEL_NAME
from services.inference.triton_server import DEFAULT_REPOSITORY, start_triton

sys.path.insert(0, str(Path(__file__).parent))
from serving import N, compressed_concept, log, mixed_arrivals  # noqa: E402

MAX_IN_FLIGHT = 256


def request_level_repository(directory: Path) -> Path:
    """A copy of the shipped repository set to request-level batching (not decoupled)."""
    shutil.copytree(DEFAULT_REPOSITORY, directory, ignore=shutil.ignore_patterns("__pycache__"))
    config = directory / MODEL_NAME / "config.pbtxt"
    text = config.read_text().replace("model_transaction_policy { decoupled: true }", "")
    config.write_text(text.replace('{ key: "batching", value: { string_value: "step" } }',
                                   '{ key: "batching", value: { string_value: "request" } }'))
    return directory


def send_all(url: str, requests: list[GenerationRequest]) -> float:
    """Send the requests at once; the wall seconds until the last answer."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(lambda r: generate_via_triton(url, MODEL_NAME, r, 600), requests))
    return time.perf_counter() - start


def replay(url: str, arrivals: list[tuple[float, GenerationRequest]]) -> dict:
    """Send each request at its arrival time (open loop); latency and throughput of the answers."""
    start = time.perf_counter()

    def one(arrival: tuple[float, GenerationRequest]) -> tuple[float, float]:
        at, request = arrival
        time.sleep(max(0.0, start + at - time.perf_counter()))
        generate_via_triton(url, MODEL_NAME, request, 600)
        return at, time.perf_counter() - start

    with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
        done = list(pool.map(one, arrivals))
    q = statistics.quantiles([end - at for at, end in done], n=100)
    span = max(end for _, end in done) - arrivals[0][0]
    return {"p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "throughput_rps": round(len(done) / span, 3)}


def serve(repository: Path, base_dir: Path, store: ArtifactStore):
    return start_triton(repository, base_model=str(base_dir), store_url=store.url, grpc_port=free_port(),
                        http_port=free_port(), metrics_port=free_port(), host="127.0.0.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of capacity")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--base", help="diffusers SD directory (default: the tiny base, built here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="customdiff-arrivals-") as tmp_name:
        tmp = Path(tmp_name)
        base_dir = Path(args.base) if args.base else create_tiny_base(tmp / "base")
        store = ArtifactStore(str(tmp / "store"))
        base = load_base(base_dir)
        digests = [store.put_concept(compressed_concept(base, i, f"<c{i}>")) for i in range(N)]
        full = [r for _, r in mixed_arrivals(digests, 1000.0, 1.0)[:N]]
        result: dict = {}
        log("request-level server: capacity, then the arrivals")
        with serve(request_level_repository(tmp / "request-level"), base_dir, store) as server:
            send_all(server.grpc_url, full)  # warm: every concept cached
            capacity = N / min(send_all(server.grpc_url, full) for _ in range(2))
            arrivals = mixed_arrivals(digests, args.load * capacity, args.duration)
            log(f"capacity {capacity:.2f} rps; offered {args.load * capacity:.2f} rps, {len(arrivals)} requests")
            result["request"] = replay(server.grpc_url, arrivals)
        log(f"request: {result['request']}; step-level server (shipped)")
        with serve(DEFAULT_REPOSITORY, base_dir, store) as server:
            send_all(server.grpc_url, full)
            result["step"] = replay(server.grpc_url, arrivals)
        log(f"step: {result['step']}")
    result.update(capacity_rps=round(capacity, 3), offered_load=args.load, requests=len(arrivals),
                  p95_ratio=round(result["step"]["p95_s"] / result["request"]["p95_s"], 3),
                  throughput_ratio=round(result["step"]["throughput_rps"] / result["request"]["throughput_rps"], 3),
                  clock="wall seconds")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
