"""Faults with a real tritonserver under its supervisor and the services on real gRPC.

Triton SIGKILLed: calls fail UNAVAILABLE during the outage, health says NOT_SERVING (liveness stays
SERVING), and both come back by themselves; nothing of a killed server (or of a killed supervisor) is
left running or on disk. A concept whose artifact was deleted or corrupted is DATA_LOSS. SIGTERM drains:
in-flight Generates finish, new calls are refused. (Training resumed after a crash: test_faults_resume.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from concepts.errors import Unavailable
from concepts.store import ArtifactStore
from customdiff.local import free_port
from customdiffusion.v1 import inference_service_pb2 as pb
from customdiffusion.v1 import inference_service_pb2_grpc
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1.merger_service_pb2_grpc import MergerServiceStub
from services.app import start_stack
from services.common.settings import Settings
from services.inference.triton_server import TritonLaunch, overrides_of
from services.common.processes import alive
from services.inference.triton_state import STATE_PREFIX, SHM_DIR, StateDir, shm_prefix, triton_processes
from services.inference.triton_supervisor import TritonSupervisor
from tests.conftest import random_concept

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
METADATA = (("authorization", "Bearer key-f"),)
RECOVERY_S = 30.0


def leftovers(pids) -> list[int]:
    return [p for p in pids if alive(p)]


def group_of(pid: int) -> dict[int, str]:
    """The Triton processes (server and stubs) in `pid`'s process group, from /proc."""
    group = {}
    for p, cmdline in triton_processes().items():
        try:
            if os.getpgid(p) == pid:
                group[p] = cmdline
        except ProcessLookupError:
            pass
    return group


@pytest.fixture()
def served(tmp_path, tiny_base_dir):
    """A supervised tritonserver on the tiny base and the inference service in front of it."""
    launch = TritonLaunch(overrides=overrides_of(str(tiny_base_dir), str(tmp_path / "store")), host="127.0.0.1",
                          grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          ready_timeout_s=120)
    supervisor = TritonSupervisor(launch, state_root=tmp_path).start()
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                        work_dir=str(tmp_path / "jobs"), api_keys="key-f=tenant-f", inference_port=0,
                        base_model=str(tiny_base_dir), triton_url=launch.grpc_url)
    stack = start_stack(settings, ("inference", "merger"))
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports['inference']}")
    try:
        yield supervisor, channel, stack
    finally:
        channel.close()
        stack.stop(0)
        assert supervisor.stop() == 0
    assert not (tmp_path / f"{STATE_PREFIX}{launch.grpc_port}").exists()
    assert not list(SHM_DIR.glob(f"{shm_prefix(launch.grpc_port)}*"))


def health(channel, service: str = SERVICE) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def generate(channel, steps: int = 20) -> grpc.StatusCode:
    """One Generate call: OK or the error's code (its message must not leak Triton's address)."""
    request = pb.GenerateRequest(prompt="a dog", num_inference_steps=steps, seed=1, height=64, width=64)
    try:
        inference_service_pb2_grpc.InferenceServiceStub(channel).Generate(request, metadata=METADATA, timeout=20)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert "127.0.0.1" not in e.details() and "Triton" not in e.details(), e.details()
        return e.code()


def wait_for(condition, timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return False


def clients(channel, stop: threading.Event, calls: list) -> list[threading.Thread]:
    """Three clients calling Generate back to back until `stop`; each call as (start, end, code)."""
    def loop():
        while not stop.is_set():
            start = time.monotonic()
            code = generate(channel)
            calls.append((start, time.monotonic(), code))
            if code != grpc.StatusCode.OK:
                time.sleep(0.2)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    return threads


def test_sigkilled_triton_is_restarted_and_the_service_recovers_alone(served):
    supervisor, channel, _ = served
    assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, 10)
    assert generate(channel) == grpc.StatusCode.OK
    stop, calls = threading.Event(), []
    threads = clients(channel, stop, calls)
    time.sleep(1.0)
    victim = supervisor.server.process.pid
    group = group_of(victim)
    assert any("triton_python_backend_stub" in c for c in group.values())  # the stub is in the server's group
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    assert health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING  # no pod restart for this
    assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, RECOVERY_S)
    serving_again = time.monotonic() - killed
    stop.set()
    for t in threads:
        t.join(30)
    assert wait_for(lambda: generate(channel, steps=4) == grpc.StatusCode.OK, RECOVERY_S - serving_again, 0.5)
    print(f"\ntritonserver SIGKILLed: inference health SERVING again after {serving_again:.1f} s, "
          f"Generate OK after {time.monotonic() - killed:.1f} s ({supervisor.restarts} restart)")
    assert supervisor.restarts == 1 and supervisor.server.process.pid != victim
    failures = [code for start, end, code in calls if code != grpc.StatusCode.OK]
    in_flight = [code for start, end, code in calls if start < killed < end]
    assert in_flight and set(in_flight) == {grpc.StatusCode.UNAVAILABLE}, in_flight
    assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, failures  # never INTERNAL
    assert not leftovers(group), f"left running from the killed server: {group}"


def test_a_sigkilled_supervisor_leaves_no_process_and_no_directory(tmp_path, tiny_base_dir):
    """`customdiff triton` SIGKILLed: its server gets the parent-death signal and takes its stub down;
    the next start on the port would kill anything left; a clean stop then leaves nothing behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "customdiff", "triton", "--base", str(tiny_base_dir), "--store",
               str(tmp_path / "store"), "--grpc-port", str(port), "--http-port", str(free_port()),
               "--metrics-port", str(free_port()), "--host", "127.0.0.1"]
    env = dict(os.environ, TMPDIR=str(tmp))  # its state directory goes under tmp

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        line = process.stdout.readline()
        assert line, f"customdiff triton exited with {process.wait()}"
        assert json.loads(line)["grpc_port"] == port
        return process

    first = start()
    started = {p: c for p, c in triton_processes().items() if str(tmp) in c}
    assert sorted(os.path.basename(c.split()[0]) for c in started.values()) == [
        "triton_python_backend_stub", "tritonserver"]
    first.kill()
    first.wait()
    assert wait_for(lambda: not leftovers(started), 30, 0.2), f"still running: {leftovers(started)}"
    second = start()
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    assert not [c for c in triton_processes().values() if str(tmp) in c]
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("customdiff-triton")]
    assert not list(SHM_DIR.glob(f"{shm_prefix(port)}*"))


def test_the_next_owner_kills_what_a_dead_one_left_and_a_live_one_keeps_its_port(tmp_path):
    """An orphaned stub (one that ignores SIGTERM, from a SIGKILLed serve) dies when its port is taken
    again, its shared memory and old temporary directories go; a second owner of a live one's port is refused."""
    port = free_port()
    state = StateDir.acquire(port, tmp_path)
    fake_stub = state.backends / "python" / "triton_python_backend_stub"  # named as Triton names it
    orphan = subprocess.Popen(["bash", "-c", f"exec -a {fake_stub} sleep 600"], start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    assert wait_for(lambda: orphan.pid in triton_processes(), 5)
    region = SHM_DIR / f"{shm_prefix(port)}region"
    region.write_bytes(b"\0" * 16)
    with pytest.raises(Unavailable, match="another process"):
        StateDir.acquire(port, tmp_path)
    old, young = tmp_path / "customdiff-triton-abc123", tmp_path / "customdiff-triton-def456"  # earlier versions'
    for legacy in (old, young):
        (legacy / "backends").mkdir(parents=True)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    state._lock.close()  # as if its owner was SIGKILLed: the kernel drops the lock
    again = StateDir.acquire(port, tmp_path)
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert not region.exists()
    assert not old.exists() and young.exists()  # a young one may belong to a server starting right now
    again.release()
    assert not Path(tmp_path / f"{STATE_PREFIX}{port}").exists()


def test_a_concept_whose_artifact_was_deleted_or_corrupted_is_data_loss(served, tiny_base, tmp_path):
    supervisor, channel, stack = served
    store = ArtifactStore(str(tmp_path / "store"))  # the fixture's store
    for name, seed in (("deleted", 1), ("corrupt", 2)):
        digest = store.put_concept(random_concept(tiny_base, seed=seed, token=f"<{name}>"))
        stack.registry.add_concept("tenant-f", name, digest, [f"<{name}>"], ["dog"], 1, tiny_base.fingerprint, {})
        path = Path(store.path(digest))
        path.unlink() if name == "deleted" else path.write_bytes(path.read_bytes()[:-9] + b"corrupted")
        request = pb.GenerateRequest(prompt=f"a <{name}> dog", concepts=[resources_pb2.ConceptRef(name=name)],
                                     num_inference_steps=2, height=64, width=64)
        with pytest.raises(grpc.RpcError) as e:
            inference_service_pb2_grpc.InferenceServiceStub(channel).Generate(request, metadata=METADATA, timeout=60)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
        if name == "deleted":  # checked before a merge job is queued (a corrupt one fails its job)
            merge = mpb.MergeConceptsRequest(concepts=[resources_pb2.ConceptRef(name=name)] * 2)
            with grpc.insecure_channel(f"127.0.0.1:{stack.ports['merger']}") as merger, \
                    pytest.raises(grpc.RpcError) as e:
                MergerServiceStub(merger).MergeConcepts(merge, metadata=METADATA, timeout=10)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
    # still listed: the registry is not rewritten behind the user's back
    assert [r.name for r in stack.registry.list_concepts("tenant-f")] == ["corrupt", "deleted"]


def test_sigterm_drain_lets_in_flight_generates_finish_and_refuses_new_ones(served):
    supervisor, channel, stack = served
    assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, 10)
    results = []
    slow = [threading.Thread(target=lambda: results.append(generate(channel, steps=60))) for _ in range(2)]
    for t in slow:
        t.start()
    time.sleep(0.5)  # both are in Triton now
    stopper = threading.Thread(target=stack.stop, args=(30.0,))
    stopper.start()

    def refused() -> bool:  # a new call on a new connection while the two drain
        with grpc.insecure_channel(f"127.0.0.1:{stack.ports['inference']}") as fresh:
            try:
                health(fresh)
                return False
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE

    assert wait_for(refused, 5)
    assert all(t.is_alive() for t in slow)  # still generating when new calls are already refused
    for t in slow:
        t.join(60)
    stopper.join(60)
    assert results == [grpc.StatusCode.OK, grpc.StatusCode.OK]
