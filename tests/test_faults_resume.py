"""A training process that dies keeps its work: the job resumes from its checkpoint (MAX_RESUMES at most)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from concepts.store import ArtifactStore
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.app import start_stack
from services.common.quotas import TenantQuotas
from services.common.registry import TERMINAL_STATES, Registry
from services.common.settings import Settings
from tests.trainer_helpers import trainer_client, training_request
from services.trainer.jobs import MAX_RESUMES, RESUMES_FILE, TrainingJobs
from services.trainer.launchers.local import LocalProcessLauncher
from trainer.checkpoint import checkpoint_path, checkpoint_step

STEPS = 30
CHECKPOINTING_STEPS = 5
THREADS = "1"  # the killed job, its resumption and the uninterrupted run compute with the same thread count


def _request():
    return training_request(STEPS, CHECKPOINTING_STEPS, "resume-test", num_class_images=1)


@pytest.fixture()
def settings(tmp_path, tiny_base_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", THREADS)
    return Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                    work_dir=str(tmp_path / "jobs"), api_keys="key-a=tenant-a", trainer_port=0,
                    base_model=str(tiny_base_dir))


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return value


def _last_step(work: Path) -> int:
    path = work / "progress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines), default=0)


def _uninterrupted_digest(spec_path: Path, root: Path) -> str:
    """The same spec (same provenance, seed and store) run start to end by the trainer in a fresh work dir."""
    spec = json.loads(spec_path.read_text())
    spec["work_dir"] = str(root / "uninterrupted")
    path = root / "uninterrupted.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    done = subprocess.run([sys.executable, "-m", "trainer", "--spec", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((root / "uninterrupted" / "result.json").read_text())["digest"]


def test_a_job_killed_with_the_service_resumes_from_its_checkpoint_to_the_same_artifact(settings, tmp_path):
    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    job = client.trainer_stub.CreateTrainingJob(_request(), metadata=client.metadata).training_job
    row = Registry(settings.database_url).get_job(job.name.removeprefix("trainingJobs/"))
    work = Path(row.work_dir)
    # Killed with a checkpoint on disk and steps done past it: work the resumption must redo exactly.
    _wait_for(lambda: (checkpoint_step(work) or 0) >= CHECKPOINTING_STEPS
              and _last_step(work) > checkpoint_step(work), 240, "a checkpoint")
    pid = int((work / "pid").read_text())
    os.killpg(pid, signal.SIGSTOP)  # frozen here, however long stopping the service takes
    client.close()
    stack.stop(0)  # the launcher is closed first: it never sees the process end, as if it died too
    os.killpg(pid, signal.SIGKILL)
    step = checkpoint_step(work)
    assert step is not None and step % CHECKPOINTING_STEPS == 0 and step < STEPS
    assert "result.json" not in os.listdir(work)

    started = time.monotonic()
    stack = start_stack(settings, components=("trainer",))  # recovers the job: relaunched from its checkpoint
    recovered_s = time.monotonic() - started
    client = trainer_client(stack)
    events = list(client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name),
                                                       metadata=client.metadata, timeout=300))
    resumed_s = time.monotonic() - started
    final = events[-1].training_job
    assert final.state == resources_pb2.JOB_STATE_SUCCEEDED, final.error_message
    # The service's line is recorded while it recovers, before this late watcher connects; the
    # trainer's own line follows in the stream.
    recorded = [e.log_line for e in Registry(settings.database_url).events_after(row.id, 0)]
    assert f"resumed from the checkpoint at step {step} (resume 1 of at most {MAX_RESUMES}): the training " \
           "process ended without a result; see its log" in recorded
    assert not any(str(tmp_path) in line for line in recorded if not line.startswith("{"))  # no server paths
    trainer_line = f'"message": "resumed from the checkpoint at step {step}; steps {step + 1} to {STEPS} of'
    assert any(trainer_line in e.log_line for e in events)
    assert (work / RESUMES_FILE).read_text() == "1" and not checkpoint_path(work).exists()
    client.close()
    stack.stop(0)
    print(f"\nkilled at checkpoint step {step}; service up and job relaunched in {recovered_s:.1f} s, "
          f"job succeeded {resumed_s:.1f} s after the restart")

    started = time.monotonic()
    assert final.concept.digest == _uninterrupted_digest(work / "spec.json", tmp_path)
    print(f"uninterrupted run of the same spec: {time.monotonic() - started:.1f} s, same digest")


# --- the resume policy, with a stand-in trainer ---------------------------------------------------------


def _fake_python(tmp_path: Path, script: str) -> str:
    """Stands in for the interpreter of `python -m trainer`: runs `script` in the job's work directory."""
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\nimport json, os, signal\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


DIES = """open('starts', 'a').write('x')
open('progress.jsonl', 'a').write(json.dumps({"event": "progress", "step": 7}) + "\\n")
os.kill(os.getpid(), signal.SIGKILL)"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture()
def make_jobs(tmp_path):
    """TrainingJobs over a local launcher of a fake trainer, recovering one job a 'previous service' left."""
    made: list[TrainingJobs] = []

    def make(script: str, progress: list[dict], checkpoint_step: int | None):
        settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db",
                            store_url=str(tmp_path / "store"), work_dir=str(tmp_path / "jobs"))
        registry = Registry(settings.database_url)
        registry.migrate()
        work = tmp_path / "jobs" / "0f"
        work.mkdir(parents=True)
        row, _ = registry.create_job("tenant-a", "training", "", "dies", {}, job_id="0f" * 16,
                                     work_dir=str(work))
        registry.update_job(row.id, state="running")
        (work / "launch.json").write_text(json.dumps({"gpus_per_node": 0, "nodes": 1}))
        (work / "spec.json").write_text("{}")
        (work / "pid").write_text(str(_dead_pid()))
        (work / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in progress))
        if checkpoint_step is not None:
            checkpoint_path(work).parent.mkdir()
            torch.save({"step": checkpoint_step, "job_key": "k", "params": {}}, checkpoint_path(work))
        jobs = TrainingJobs(settings.trainer(), registry, ArtifactStore(settings.store_url),
                            LocalProcessLauncher(python=_fake_python(tmp_path, script)), "unused",
                            TenantQuotas(settings.quotas, registry))
        made.append(jobs)
        jobs.recover()
        final = _wait_for(lambda: (r := registry.get_job(row.id)).state in TERMINAL_STATES and r, 60,
                          "the job's end")
        lines = [e.log_line for e in registry.events_after(row.id, 0)]
        starts = (work / "starts").read_text() if (work / "starts").exists() else ""
        return final, lines, len(starts)

    yield make
    for jobs in made:
        jobs.close()


def test_a_job_that_keeps_dying_fails_after_the_allowed_resumes(make_jobs, tmp_path):
    final, lines, starts = make_jobs(DIES, [{"event": "progress", "step": 7}], checkpoint_step=5)
    assert starts == MAX_RESUMES  # died with the service, then each of its resumptions was killed
    resumed = [line for line in lines if "resumed from the checkpoint at step 5" in line]
    assert len(resumed) == MAX_RESUMES and f"(resume {MAX_RESUMES} of at most {MAX_RESUMES})" in resumed[-1]
    assert resumed[-1].endswith(": the training process was killed by SIGKILL; see the job's train.log")
    assert final.state == "failed"
    assert final.error_message == ("the training process was killed by SIGKILL; see the job's train.log "
                                   f"(the process died {MAX_RESUMES + 1} times; it was resumed from its "
                                   f"checkpoint {MAX_RESUMES} times, the most allowed, last from step 5)")
    assert str(tmp_path) not in final.error_message


@pytest.mark.parametrize(("progress", "checkpoint", "message"), [
    pytest.param([{"event": "progress", "step": 3}], None, "the training process ended without a result",
                 id="no-checkpoint"),
    pytest.param([{"event": "progress", "step": 7}, {"event": "error", "message": "spec: bad"}], 5,
                 "spec: bad", id="the-trainer-reported-its-error"),
    pytest.param([{"event": "progress", "step": 5}, {"event": "state", "state": "stopped", "message": "at 5"}], 5,
                 "the training process ended without a result", id="stopped-as-its-spec-asked"),
])
def test_no_resume_without_a_checkpoint_or_after_an_end_the_trainer_reported(make_jobs, progress,
                                                                             checkpoint, message):
    final, lines, starts = make_jobs(DIES, progress, checkpoint_step=checkpoint)
    assert starts == 0 and final.state == "failed" and final.error_message.startswith(message)
    assert not any("resumed" in line for line in lines)
