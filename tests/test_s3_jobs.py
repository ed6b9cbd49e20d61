"""Training with no filesystem shared between the service and the trainer: work_dir and store on S3 only.

An S3 server (moto, in this process) holds the artifact store and the job directories; the training
subprocess reaches it through the same AWS_* environment (AWS_ENDPOINT_URL), copies its job directory
to local scratch and uploads its progress, checkpoint and result back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from concepts.jobdir import JobDir, JobMirror, relocate
from tests.trainer_helpers import job_dict, pattern_images, trainer_client, training_request

pytestmark = pytest.mark.s3
from tests.conftest import BUCKET


def test_job_dir_reads_appended_progress_from_an_offset_and_relocates_specs(s3, tmp_path):
    remote = JobDir(f"s3://{BUCKET}/unit/job1")
    local = JobDir(tmp_path / "job1")
    for d in (remote, local):
        d.write_text("progress.jsonl", '{"a": 1}\n')
        d.append_text("progress.jsonl", '{"b": 2}\n')
        assert d.read_bytes("progress.jsonl", 9) == b'{"b": 2}\n'
        assert d.read_bytes("progress.jsonl", 18) == b""
        assert d.exists("progress.jsonl") and not d.exists("result.json")
        with pytest.raises(FileNotFoundError):
            d.read_bytes("result.json")
    assert local.url_of("spec.json") == str(tmp_path / "job1" / "spec.json")
    assert remote.url_of("spec.json") == f"s3://{BUCKET}/unit/job1/spec.json"
    concept = {"images": [remote.url_of("concept0/000.png"), "/elsewhere.png"],
               "class_images": [{"path": remote.url_of("class0/000.png")}]}
    spec = {"work_dir": remote.url, "concepts": [concept]}
    moved = relocate(spec, remote.url, "/scratch/job1")
    assert moved["work_dir"] == "/scratch/job1"
    assert moved["concepts"][0]["images"] == ["/scratch/job1/concept0/000.png", "/elsewhere.png"]
    assert moved["concepts"][0]["class_images"][0]["path"] == "/scratch/job1/class0/000.png"
    remote.remove()
    assert not remote.exists("progress.jsonl")


def test_mirror_copies_down_uploads_outputs_and_deletes_removed_ones(s3):
    remote = JobDir(f"s3://{BUCKET}/unit/job2")
    remote.write_text("spec.json", "{}")
    remote.write_text("progress.jsonl", '{"event": "state"}\n')
    mirror = JobMirror.open(remote, markers={"checkpoint/step": lambda d: b"7" if (d / "checkpoint").exists()
                                             else None}, interval_s=60)
    assert (mirror.local / "spec.json").read_text() == "{}"
    with open(mirror.local / "progress.jsonl", "a") as f:
        f.write('{"event": "progress", "step": 1}\n')
    (mirror.local / "checkpoint").mkdir()
    (mirror.local / "checkpoint" / "state.pt").write_bytes(b"state")
    mirror.sync()
    assert remote.read_text("progress.jsonl").splitlines()[-1] == '{"event": "progress", "step": 1}'
    assert remote.read_text("checkpoint/step") == "7" and remote.read_bytes("checkpoint/state.pt") == b"state"
    (mirror.local / "checkpoint" / "state.pt").unlink()
    (mirror.local / "checkpoint").rmdir()
    (mirror.local / "result.json").write_text('{"digest": "x"}')
    local = mirror.local
    mirror.close()
    assert not remote.exists("checkpoint/state.pt") and not remote.exists("checkpoint/step")
    assert json.loads(remote.read_text("result.json")) == {"digest": "x"}
    assert not local.exists()


def s3_job(tmp_path: Path, base_dir: Path, name: str, **spec: object) -> JobDir:
    """A job directory on S3 as the service leaves it: two images and a spec naming them by URL."""
    job = JobDir(f"s3://{BUCKET}/check/{name}")
    for i, path in enumerate(pattern_images(tmp_path / name, count=2)):
        job.write_bytes(f"concept0/{i:03d}.png", Path(path).read_bytes())
    images = [job.url_of(f"concept0/{i:03d}.png") for i in range(2)]
    data = job_dict(base_dir, tmp_path, images, store_url=f"s3://{BUCKET}/store", work_dir=job.url)
    job.write_text("spec.json", json.dumps({**data, **spec}))
    return job


def test_check_spec_accepts_a_valid_spec_on_s3_and_leaves_no_trace(s3, tmp_path, tiny_base_dir):
    from services.trainer.launchers import check_spec

    job = s3_job(tmp_path, tiny_base_dir, "good")
    before = job.files()
    assert check_spec.main([job.url_of("spec.json")]) == 0
    assert job.files() == before  # nothing uploaded
    assert not list(Path(os.environ["CUSTOMDIFF_SCRATCH_DIR"]).glob("good.*"))  # the local copy is gone


@pytest.mark.parametrize("spec, corrupt, needle", [
    pytest.param({"surprise": 1}, None, "surprise: unknown key(s)", id="unknown-key"),
    pytest.param({"hyperparameters": {"resolution": 100}}, None,
                 "hyperparameters.resolution: must be a multiple", id="bad-field"),
    pytest.param({}, "concept0/001.png", "concepts[0].images[1]: ", id="image-on-s3-not-an-image"),
    pytest.param({}, "spec.json", "spec: cannot read job spec", id="spec-not-json"),
])
def test_check_spec_rejects_a_bad_spec_on_s3_naming_the_field(s3, tmp_path, tiny_base_dir, capsys, spec,
                                                               corrupt, needle):
    from services.trainer.launchers import check_spec
    from services.trainer.launchers.job_manifest import EXIT_BAD_SPEC

    job = s3_job(tmp_path, tiny_base_dir, "bad", **spec)
    if corrupt:
        job.write_bytes(corrupt, b"{not a png")
    assert check_spec.main([job.url_of("spec.json")]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert err.startswith(f"invalid job spec {job.url_of('spec.json')}: ") and needle in err, err
    job.remove()


@pytest.fixture
def s3_stack(s3, tmp_path, tiny_base_dir, monkeypatch):
    """A trainer service whose store and job directories are on S3 only; yields its settings and a client."""
    from services.app import start_stack
    from services.common.settings import Settings

    monkeypatch.chdir(tmp_path)  # a relative "s3:/..." directory made by mistake would land here
    settings = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", store_url=f"s3://{BUCKET}/store",
                        work_dir=f"s3://{BUCKET}/jobs", api_keys="key-a=tenant-a", trainer_port=0,
                        base_model=str(tiny_base_dir))
    stack = start_stack(settings, components=("trainer",))
    client = trainer_client(stack)
    yield settings, client
    client.close()
    stack.stop(0)


def watch(client, name: str) -> list:
    """Every event of the job until it ends."""
    from customdiffusion.v1 import trainer_service_pb2 as tpb

    return list(client.trainer_stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=name),
                                                     metadata=client.metadata, timeout=300))


def test_training_job_with_s3_only_succeeds_and_streams_progress(s3_stack):
    from customdiffusion.v1 import resources_pb2
    from concepts.store import ArtifactStore

    settings, client = s3_stack
    job = client.trainer_stub.CreateTrainingJob(training_request(6, 3, "s3-test"),
                                                metadata=client.metadata).training_job
    events = watch(client, job.name)
    final = events[-1].training_job
    assert final.state == resources_pb2.JOB_STATE_SUCCEEDED, final.error_message
    steps = [e.training_job.progress.step for e in events if e.training_job.progress.step]
    assert steps == sorted(steps) and steps[-1] == 6, steps  # the watcher saw progress up to the total
    assert len(set(steps)) >= 2, steps  # streamed, not only the end
    assert final.concept.name == "stripes" and len(final.concept.digest) == 64
    assert ArtifactStore(settings.store_url).get_concept(final.concept.digest).tokens
    job_dir = JobDir(f"{settings.work_dir}/{job.name.removeprefix('trainingJobs/')}")
    assert json.loads(job_dir.read_text("result.json"))["digest"] == final.concept.digest
    lines = [json.loads(line) for line in job_dir.read_text("progress.jsonl").splitlines()]
    assert [e["step"] for e in lines if e["event"] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert not job_dir.exists("checkpoint/state.pt")  # removed once the artifact was stored
    # Nothing shared: no local directory was made for the work dir or the store.
    assert not any(Path(p).exists() for p in ("s3:", settings.work_dir, settings.store_url))


def test_a_killed_training_process_resumes_from_its_checkpoint_on_s3(s3_stack):
    import signal
    import time

    from customdiffusion.v1 import resources_pb2
    from services.trainer.launchers.local import state_dir
    from trainer.checkpoint import checkpoint_step

    settings, client = s3_stack
    job = client.trainer_stub.CreateTrainingJob(training_request(200, 5, "s3-resume", num_class_images=1),
                                                metadata=client.metadata).training_job
    job_id = job.name.removeprefix("trainingJobs/")
    work_dir = f"{settings.work_dir}/{job_id}"
    deadline = time.monotonic() + 120
    while (checkpoint_step(work_dir) or 0) < 5:  # the uploaded checkpoint's marker
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.1)
    pid = int((state_dir(job_id, work_dir) / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    events = watch(client, job.name)
    final = events[-1].training_job
    assert final.state == resources_pb2.JOB_STATE_SUCCEEDED, final.error_message
    assert JobDir(work_dir).read_text("resumes") == "1"
    lines = JobDir(work_dir).read_text("progress.jsonl")
    assert "resumed from the checkpoint at step" in lines
