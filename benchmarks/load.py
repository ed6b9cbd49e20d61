"""Load and health under load, on loopback: N Generate clients over mixed concepts plus M open Watch streams.

    python benchmarks/load.py [--clients 16] [--streams 64] [--seconds 60] [--steps 2] [--base DIR]

Starts `customdiff serve` (real tritonserver, the three gRPC services) on the tiny base (or --base) in a
temporary directory, with 8 compressed concepts spread over 4 tenants. Then, for --seconds:
  - --clients threads each send Generate calls back to back (64x64, --steps steps), each with one of its
    tenant's concepts or none, round robin;
  - --streams WatchTrainingJob streams stay open on queued jobs that never run;
  - every second a probe calls grpc.health.v1 Check on each of the three servers with a 1 s deadline.
Bounded in count and time; talks to 127.0.0.1 only. Progress goes to stderr; the last line on stdout is
the JSON: clients, streams, requests, errors_by_code, p50_s, p95_s, p99_s, health_checks,
health_failures, health_p99_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from concepts.base import load_base
from concepts.store import ArtifactStore
from concepts.tiny import create_tiny_base
from customdiff_client import Client
from customdiff.local import start_serve
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.common.registry import Registry

sys.path.insert(0, str(Path(__file__).parent))
from serving import compressed_concept  # noqa: E402

TENANTS = 4
CONCEPTS = 8
MAX_REQUESTS = 100_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prepare(tmp: Path, base_dir: Path) -> tuple[str, str]:
    """Registry and store with CONCEPTS concepts over TENANTS tenants; returns (database_url, store_url)."""
    data = tmp / "data"
    url, store = f"sqlite:///{data}/registry.db", ArtifactStore(str(data / "store"))
    registry = Registry(url)
    registry.migrate()
    base = load_base(base_dir)
    for i in range(CONCEPTS):
        concept = compressed_concept(base, i, f"<c{i}>")
        digest = store.put_concept(concept)
        registry.add_concept(f"tenant-{i % TENANTS}", f"c{i}", digest, [f"<c{i}>"], ["dog"],
                             len(store.get(digest)), base.fingerprint, {"kind": "benchmark"})
    return url, store.url


def generate_loop(client: Client, tenant: int, steps: int, stop: threading.Event, latencies: list[float],
                  errors: Counter, lock: threading.Lock) -> None:
    names = [f"c{i}" for i in range(tenant, CONCEPTS, TENANTS)] + [None]
    i = 0
    while not stop.is_set() and i < MAX_REQUESTS:
        name = names[i % len(names)]
        prompt = f"photo of a <c{name[1:]}> dog" if name else "photo of a dog"
        start = time.perf_counter()
        try:
            client.generate(prompt, concepts=[name] if name else [], num_inference_steps=steps, height=64, width=64,
                            seed=i, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - start)
        except grpc.RpcError as e:
            with lock:
                errors[e.code().name] += 1
        i += 1


def probe_loop(targets: list[str], stop: threading.Event, took: list[float], failures: Counter) -> None:
    channels = [grpc.insecure_channel(t) for t in targets]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    while not stop.wait(1.0):
        for stub in stubs:
            start = time.perf_counter()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    failures[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
            except grpc.RpcError as e:
                failures[e.code().name] += 1
            took.append(time.perf_counter() - start)
    for c in channels:
        c.close()


def open_streams(client: Client, registry: Registry, n: int) -> list:
    """n Watch streams on queued jobs nobody runs (created after serve started, so recovery leaves them)."""
    streams = []
    for i in range(n):
        job, _ = registry.create_job("tenant-0", "training", f"load-{i}", "idle", {})
        stream = client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=f"trainingJobs/{job.id}"),
                                                      metadata=client.metadata, timeout=3600)
        next(stream)
        streams.append(stream)
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--base", help="diffusers SD directory (default: the tiny base, built here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="customdiff-load-") as tmp_name:
        tmp = Path(tmp_name)
        base_dir = Path(args.base) if args.base else create_tiny_base(tmp / "base")
        database_url, store_url = prepare(tmp, base_dir)
        keys = ",".join(f"key-{t}=tenant-{t}" for t in range(TENANTS))
        log("starting customdiff serve (tritonserver and the three services)")
        proc, ports = start_serve(tmp, api_keys=keys, base_model=str(base_dir), database_url=database_url,
                                  store_url=store_url)
        targets = [f"127.0.0.1:{ports[c]}" for c in ("trainer", "merger", "inference")]
        clients = [Client(*targets, api_key=f"key-{t}") for t in range(TENANTS)]
        try:
            streams = open_streams(clients[0], Registry(database_url), args.streams)
            log(f"{len(streams)} watch streams open; {args.clients} clients for {args.seconds:.0f} s")
            stop, lock = threading.Event(), threading.Lock()
            latencies, errors, took, failures = [], Counter(), [], Counter()
            threads = [threading.Thread(target=generate_loop, args=(clients[i % TENANTS], i % TENANTS, args.steps,
                                                                    stop, latencies, errors, lock))
                       for i in range(args.clients)]
            threads.append(threading.Thread(target=probe_loop, args=(targets, stop, took, failures)))
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join(180)
            open_at_end = sum(1 for s in streams if s.is_active())
            for s in streams:
                s.cancel()
        finally:
            for c in clients:
                c.close()
            proc.terminate()
            proc.wait(120)
    result = {"clients": args.clients, "streams": args.streams, "streams_open_at_end": open_at_end,
              "seconds": args.seconds, "requests": len(latencies) + sum(errors.values()),
              "errors_by_code": dict(errors), "p50_s": round(statistics.median(latencies), 3) if latencies else 0.0,
              "p95_s": round(percentile(latencies, 0.95), 3), "p99_s": round(percentile(latencies, 0.99), 3),
              "health_checks": len(took), "health_failures": sum(failures.values()),
              "health_failures_by_kind": dict(failures), "health_p99_s": round(percentile(took, 0.99), 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
