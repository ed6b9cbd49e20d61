"""Two replicas of the trainer and merger services on one PostgreSQL and one S3 (moto): replica 1 is
SIGKILLed mid-training and mid-merge; replica 2 adopts every job it held once their leases expire
(services/common/leases.py), finishes them and registers each concept exactly once.

The replicas are `customdiff serve --only trainer --only merger` processes, the job directories and the
store are on S3 only, and training runs in local processes (their own sessions: they outlive replica 1,
as a Kubernetes Job outlives its launcher's pod).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from concepts.base import load_base
from concepts.store import ArtifactStore
from customdiff.local import start_serve
from customdiff_client import Client
from customdiffusion.v1 import merger_service_pb2 as mpb
from customdiffusion.v1 import resources_pb2
from services.common.registry import TERMINAL_STATES, Registry
from tests.conftest import BUCKET, random_concept
from tests.trainer_helpers import training_request

pytestmark = [pytest.mark.replicas, pytest.mark.postgres, pytest.mark.s3]
LEASE_S = 3.0
WAIT_S = 240


def _replica(tmp_path, name: str, settings: dict):
    proc, ports = start_serve(tmp_path / name, "key-a=tenant-a", only=("trainer", "merger"), replica_id=name,
                              **settings)
    client = Client(f"127.0.0.1:{ports['trainer']}", f"127.0.0.1:{ports['merger']}", "127.0.0.1:1",
                    api_key="key-a")
    return proc, client


def _until(what: str, check, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def test_a_sigkilled_replica_s_jobs_are_adopted_finished_and_registered_once(s3, pg_url, tiny_base_dir, tmp_path):
    settings = dict(database_url=pg_url, store_url=f"s3://{BUCKET}/replicas/store",
                    work_dir=f"s3://{BUCKET}/replicas/jobs", base_model=str(tiny_base_dir), job_lease_s=LEASE_S)
    registry, store = Registry(pg_url), ArtifactStore(settings["store_url"])
    registry.migrate()
    base = load_base(tiny_base_dir)
    for i, word in enumerate(["dog", "cat"]):
        concept = random_concept(base, seed=20 + i, class_word=word)
        registry.add_concept("tenant-a", word, store.put_concept(concept), list(concept.tokens), [word], 1,
                             base.fingerprint, {})
    (r1, one), (r2, two) = _replica(tmp_path, "r1", settings), _replica(tmp_path, "r2", settings)
    try:
        # Through replica 1: two training jobs (one runs, one waits in its launcher's queue); once the first
        # reports progress, four merges (one runs on its worker, three wait).
        trainings = [one.trainer_stub.CreateTrainingJob(training_request(steps, 10, f"train-{i}"),
                                                        metadata=one.metadata).training_job
                     for i, steps in enumerate([60, 6])]
        first = trainings[0].name.split("/")[1]
        # Replica 2 streams the first training job's events all along: it sees replica 1's progress too.
        seen: list = []
        watcher = threading.Thread(target=lambda: seen.extend(two.watch_training_job(trainings[0].name)), daemon=True)
        watcher.start()
        _until("replica 1's training to make progress", lambda: registry.get_job(first).progress.get("step", 0) >= 2)
        merges = [one.merger_stub.MergeConcepts(mpb.MergeConceptsRequest(
            concepts=[resources_pb2.ConceptRef(name="dog"), resources_pb2.ConceptRef(name="cat")],
            concept_name=f"pets{i}", request_id=f"merge-{i}"), metadata=one.metadata).merger_job for i in range(4)]
        ids = {j.name.split("/")[1]: j for j in trainings + merges}
        merge_ids = [j.name.split("/")[1] for j in merges]
        _until("a merge to run on replica 1", lambda: any(registry.get_job(i).state == "running" for i in merge_ids))
        os.kill(r1.pid, signal.SIGKILL)
        r1.wait(30)
        held = {i: registry.get_job(i) for i in ids}
        assert {r.owner for r in held.values()} == {"r1"}
        assert any(r.kind == "merge" and r.state == "running" for r in held.values())  # it died mid-merge
        assert held[first].state == "running" and held[first].progress["step"] < 60  # and mid-training

        finals = {i: _until(f"job {i} to end", lambda i=i: (row := registry.get_job(i)).state in TERMINAL_STATES
                            and row) for i in ids}
        assert {i: r.state for i, r in finals.items()} == dict.fromkeys(ids, "succeeded"), \
            {i: r.error_message for i, r in finals.items()}
        assert {r.owner for r in finals.values()} == {"r2"}
        for job_id in ids:  # each job says who took it over
            lines = [e.log_line for e in registry.events_after(job_id, 0)]
            assert "replica r2 took the job over from replica r1, whose lease expired" in lines, lines
        # Exactly once: one concept version per job, each the result of its own job.
        concepts = registry.list_concepts("tenant-a")
        assert sorted((c.name, c.version) for c in concepts) == sorted(
            [("cat", 1), ("dog", 1), ("stripes", 1), ("stripes", 2)] + [(f"pets{i}", 1) for i in range(4)])
        assert sorted(r.concept_id for r in finals.values()) == sorted(
            c.id for c in concepts if c.name not in ("dog", "cat"))
        for c in concepts:
            if c.name not in ("dog", "cat"):
                assert store.get_concept(c.digest).tokens  # the artifact is in the store, whole
        # Replica 2's watcher streamed the job from replica 1's progress to the end replica 2 registered.
        watcher.join(WAIT_S)
        steps = [e.training_job.progress.step for e in seen if e.training_job.progress.step]
        assert seen[-1].training_job.state == resources_pb2.JOB_STATE_SUCCEEDED
        assert steps == sorted(steps) and steps[-1] == 60 and len(set(steps)) >= 3, steps
        assert two.get_training_job(trainings[1].name).concept.version in (1, 2)
    finally:
        for proc in (r1, r2):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        one.close()
        two.close()
        registry.engine.dispose()


def test_a_cancel_through_another_replica_stops_the_owner_s_local_process(s3, pg_url, tiny_base_dir, tmp_path):
    from services.app import start_stack
    from services.common.processes import alive
    from services.common.settings import Settings
    from services.trainer.launchers.local import state_dir
    from tests.trainer_helpers import trainer_client

    stacks = [start_stack(Settings(database_url=pg_url, store_url=f"s3://{BUCKET}/cancel/store",
                                   work_dir=f"s3://{BUCKET}/cancel/jobs", api_keys="key-a=tenant-a", trainer_port=0,
                                   replica_id=name, job_lease_s=1.0), components=("trainer",),
                          base_model=str(tiny_base_dir)) for name in ("r1", "r2")]
    one, two = (trainer_client(stack) for stack in stacks)
    try:
        job = one.trainer_stub.CreateTrainingJob(training_request(2000, 500, "cancel-me"),
                                                 metadata=one.metadata).training_job
        job_id = job.name.split("/")[1]
        registry = stacks[0].registry
        _until("the job to make progress", lambda: registry.get_job(job_id).progress.get("step", 0) >= 1)
        pid = int((state_dir(job_id, registry.get_job(job_id).work_dir) / "pid").read_text())
        # Replica 2's launcher has no such process; replica 1 stops it at its next lease round.
        assert two.cancel_training_job(job.name).state == resources_pb2.JOB_STATE_CANCELLED
        _until("replica 1 to stop the cancelled job's process", lambda: not alive(pid), timeout_s=30)
        assert registry.get_job(job_id).state == "cancelled"
        assert [c.name for c in one.concepts()] == []
    finally:
        one.close()
        two.close()
        for stack in stacks:
            stack.stop(0)
