"""A trainer service stopped mid-job and started again loses neither the job nor its concept."""

import os
import signal
import time
from pathlib import Path

import pytest

from customdiff_client import Client
from customdiffusion.v1 import resources_pb2
from customdiffusion.v1 import trainer_service_pb2 as tpb
from services.app import start_stack
from services.common.registry import Registry
from services.common.settings import Settings
from tests.trainer_helpers import trainer_client, training_request
from services.common.processes import alive


def _request(steps: int, checkpointing_steps: int = 5):
    return training_request(steps, checkpointing_steps, "restart-test")


@pytest.fixture()
def settings(tmp_path, tiny_base_dir):
    return Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=str(tmp_path / "store"),
                    work_dir=str(tmp_path / "jobs"), api_keys="key-a=tenant-a", trainer_port=0,
                    base_model=str(tiny_base_dir))


def _wait_running(client: Client, name: str) -> None:
    for event in client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=name), metadata=client.metadata,
                                                      timeout=300):
        if event.training_job.progress.step >= 1:
            return
    raise AssertionError("the job never reported progress")


def _start_long_job(settings, checkpointing_steps: int = 5):
    """A trainer service with a 2000-step job that has reported progress; returns (stack, client, job, pid)."""
    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    job = client.trainer_stub.CreateTrainingJob(_request(2000, checkpointing_steps), metadata=client.metadata)
    job = job.training_job
    _wait_running(client, job.name)
    row = Registry(settings.database_url).get_job(job.name.removeprefix("trainingJobs/"))
    return stack, client, job, int((Path(row.work_dir) / "pid").read_text())


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout_s} s"
        time.sleep(0.1)


def test_restart_mid_job_reattaches_and_registers_the_concept(settings):
    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    job = client.trainer_stub.CreateTrainingJob(_request(steps=60), metadata=client.metadata).training_job
    _wait_running(client, job.name)
    client.close()
    stack.stop(0)  # the service goes away; the training process (its own session) runs on

    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    again = client.trainer_stub.CreateTrainingJob(_request(steps=60), metadata=client.metadata).training_job
    assert again.name == job.name  # same request_id after the restart: still one job
    events = list(client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name),
                                                       metadata=client.metadata, timeout=300))
    final = events[-1].training_job
    assert final.state == resources_pb2.JOB_STATE_SUCCEEDED, final.error_message
    assert final.concept.name == "stripes" and final.concept.version == 1 and len(final.concept.digest) == 64
    assert [c.name for c in client.concepts()] == ["stripes"]
    client.close()
    stack.stop(0)


def test_job_that_died_before_a_checkpoint_while_the_service_was_down_is_failed_with_a_reason(settings):
    # Nothing to resume from (a job that died with a checkpoint resumes: tests/test_faults_resume.py).
    stack, client, job, pid = _start_long_job(settings, checkpointing_steps=1000)
    client.close()
    stack.stop(0)
    os.killpg(pid, signal.SIGKILL)
    _wait_gone(pid, 30)

    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    final = list(client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name),
                                                      metadata=client.metadata, timeout=60))[-1].training_job
    assert final.state == resources_pb2.JOB_STATE_FAILED
    assert "ended without a result" in final.error_message, final.error_message
    assert settings.work_dir not in final.error_message  # no server paths in what users see
    client.close()
    stack.stop(0)


def test_cancel_stops_the_training_process(settings):
    stack, client, job, pid = _start_long_job(settings)
    cancelled = client.trainer_stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name),
                                                      metadata=client.metadata).training_job
    assert cancelled.state == resources_pb2.JOB_STATE_CANCELLED
    _wait_gone(pid, 30)  # the training process does not outlive its cancellation
    final = client.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name),
                                               metadata=client.metadata).training_job
    assert final.state == resources_pb2.JOB_STATE_CANCELLED and not final.concept.digest
    client.close()
    stack.stop(0)
