"""Training jobs behind the TrainerService: validate, store inputs, record, launch, follow, register.

Thread model: RPC threads call `create`/`cancel`; the launcher calls `_on_launch_event` from its own
threads; one follower thread tails every running job's `progress.jsonl` into the registry; the lease
thread (`JobLeases`) adopts jobs. Only the replica that holds a job's lease follows it, handles its
launcher events and resumes it; any replica answers RPCs about it.

A training process that dies without a result and without reporting an error of its own (a signal,
the OOM killer, the host or the service going down with it) is resumed from the checkpoint in its
work directory, at most MAX_RESUMES times per job (counted in `<work_dir>/resumes`); the trainer
continues bit-exactly from the checkpoint's step. Launchers that rerun dead processes themselves
(Kubernetes: the Job's backoffLimit) are left to do so.

`work_dir` may be an object store URL (``s3://bucket/jobs``) when the service and the trainers share
no filesystem: a job's inputs are then prepared in a local staging directory, checked there, and
uploaded to ``<work_dir>/<job id>/``; everything the service reads back goes through `JobDir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from concepts.errors import InvalidArgument, NotFound, Unavailable
from concepts.jobdir import JobDir, relocate
from concepts.store import ArtifactStore
from concepts.tracing import OTLP_ENV, TRACEPARENT_ENV, current_traceparent, trace_id_of
from services.common.leases import JobLeases, replica_id
from services.common.logs import job_context
from services.common.metrics import LAUNCHER_ERRORS, TRAINING_LOSS, TRAINING_STEPS_PER_S
from services.common.quotas import TenantQuotas
from services.common.registry import TERMINAL_STATES, Registry
from services.common.settings import TrainerSettings
from services.trainer.launcher import JobLauncher, LaunchEvent, LaunchRequest, LaunchState, reported_its_end

log = logging.getLogger(__name__)
KIND = "training"
FOLLOW_INTERVAL_S = 0.5
MAX_RESUMES = 3
RESUMES_FILE = "resumes"


@dataclass(frozen=True)
class ImageBlob:
    """One training image: its bytes, where it came from (for error messages), and its sha256 (hashed once)."""

    data: bytes
    field: str
    caption: str = ""
    digest: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.data).hexdigest())


@dataclass(frozen=True)
class TrainingRequest:
    """A validated CreateTrainingJob request, transport-free.

    Args:
        spec: the job spec dict (trainer/spec.py) without file paths; `concepts[i].images` and
            `concepts[i].class_images` are filled in from `images` and `class_images` here.
        images: per concept, its training images.
        class_images: per concept, its regularization images (may be empty).
    """

    concept_name: str
    request_id: str
    spec: dict[str, Any]
    images: list[list[ImageBlob]]
    class_images: list[list[ImageBlob]]
    gpus_per_node: int
    nodes: int
    request_json: dict[str, Any]


class TrainingJobs:
    def __init__(self, settings: TrainerSettings, registry: Registry, store: ArtifactStore, launcher: JobLauncher,
                 base_model: str, quotas: TenantQuotas) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.launcher = launcher
        self.base_model = base_model
        self.quotas = quotas
        # Decoding uploads costs CPU and memory per pixel: a few at a time, never on the RPC threads.
        self._decoder = ThreadPoolExecutor(settings.image_decode_workers, thread_name_prefix="image-decode")
        self._admit = threading.Lock()  # quota check and job record, one request at a time per replica
        self.work_root = JobDir(settings.work_dir)
        if self.work_root.local is not None:
            self.work_root.local.mkdir(parents=True, exist_ok=True)
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.leases = JobLeases(registry, (KIND,), replica_id(settings.replica_id), settings.job_lease_s,
                                adopt=self._adopt, lost=self._lost)
        launcher.watch(self._on_launch_event)
        self._follower = threading.Thread(target=self._follow, daemon=True, name="progress-follower")
        self._follower.start()

    def create(self, tenant: str, request: TrainingRequest) -> tuple[Any, bool]:
        """Validate everything, then record and launch; the same request_id returns the first job."""
        from trainer.spec import JobSpec

        if request.request_id:
            existing = self.registry.job_by_request_id(tenant, KIND, request.request_id)
            if existing is not None:
                return existing, False
        blobs = {b.digest: b.data for group in request.images + request.class_images for b in group}
        # 1. Quotas before anything is written.
        self.quotas.check_training_jobs(tenant)
        self.quotas.check_storage(tenant, sum(len(d) for k, d in blobs.items() if not self.registry.owns_blob(tenant, k)))
        # 2. Write the images where the job will read them and validate the whole spec (decoding every
        #    image in the bounded pool), before anything durable is recorded; on failure the directory goes.
        job_id = uuid.uuid4().hex
        work = self.work_root.child(job_id)
        # A local job directory is its own staging directory; a remote one is staged in a private one.
        stage = work.local or Path(tempfile.mkdtemp(prefix="customdiff-stage-")) / job_id
        try:
            spec_dict = self._materialize(request, stage)
            spec_dict["provenance"] = {"kind": "training", "job": f"trainingJobs/{job_id}"}
            spec = JobSpec.from_dict(spec_dict)
            self._decoder.submit(_check_inputs, spec).result()
            # 3. Record the job (idempotent on request_id); a concurrent twin may have won.
            with self._admit:
                self.quotas.check_training_jobs(tenant)
                row, created = self.registry.create_job(tenant, KIND, request.request_id, request.concept_name,
                                                        request.request_json, job_id=job_id,
                                                        work_dir=work.url, owner=self.leases.owner,
                                                        lease_s=self.leases.lease_s)
            if created:
                work.upload(stage)  # nothing to do for a local job directory
        except BaseException:
            shutil.rmtree(stage if work.local else stage.parent, ignore_errors=True)
            raise
        if not work.local:
            shutil.rmtree(stage.parent, ignore_errors=True)
        if not created:
            work.remove()
            return row, False
        # 4. Keep the inputs (the tenant owns them from now on), write the spec, launch.
        for data in blobs.values():
            self.store.put(data)
        self.registry.own_blobs(tenant, {digest: len(data) for digest, data in blobs.items()})
        # The training process continues this RPC's trace (a resumed one too: the env is in launch.json).
        env = {name: value for name, value in ((TRACEPARENT_ENV, current_traceparent()),
                                               (OTLP_ENV, self.settings.otlp_endpoint)) if value}
        launch = LaunchRequest(row.id, request.concept_name, work.url_of("spec.json"), work.url,
                               request.gpus_per_node, request.nodes, env, tenant=tenant)
        # launch.json before spec.json: `recover` relaunches a job whose spec.json exists
        work.write_text("launch.json", json.dumps({"gpus_per_node": launch.gpus_per_node,
                                                   "nodes": launch.nodes, "env": env}))
        work.write_text("spec.json", json.dumps(self._spec_for(spec, stage, work), indent=2))
        try:
            self.launcher.launch(launch)
        except Exception:
            LAUNCHER_ERRORS.labels("launch").inc()
            raise
        return row, True

    def _spec_for(self, spec, stage: Path, work: JobDir) -> dict[str, Any]:
        """The checked spec as the trainer reads it: its paths in the job directory rather than the stage."""
        data = relocate(spec.to_dict(), str(stage), work.url)
        # The default cache, next to the jobs: the same string for a local job directory.
        if data["class_image_cache_dir"] == str(stage.parent / "class-images"):
            data["class_image_cache_dir"] = self.work_root.url_of("class-images")
        return data

    def _materialize(self, request: TrainingRequest, work: Path) -> dict[str, Any]:
        spec = json.loads(json.dumps(request.spec))
        spec.update(base_model=self.base_model, store_url=self.store.url, work_dir=str(work))
        for i, concept in enumerate(spec["concepts"]):
            concept["images"] = [_write_image(b, work / f"concept{i}" / f"{j:03d}") for j, b in
                                 enumerate(request.images[i])]
            concept["class_images"] = [{"path": _write_image(b, work / f"class{i}" / f"{j:03d}"),
                                        "caption": b.caption} for j, b in enumerate(request.class_images[i])]
        return spec

    def cancel(self, tenant: str, job_id: str):
        row = self.registry.get_job(job_id, tenant, KIND)
        if row.state in TERMINAL_STATES:
            return row
        self.launcher.cancel(job_id)
        return self.registry.update_job(job_id, state="cancelled", log_line="cancelled by the user")

    def recover(self) -> None:
        """Adopt this replica's jobs from before a restart, then keep its leases and adopt the jobs of
        replicas that die (`JobLeases`)."""
        self.leases.start()

    def _adopt(self, row) -> None:
        """Take a job over (after a restart, or from a dead replica): reattach it if it runs, launch it
        if it never started, record how it ended if it ended meanwhile."""
        if not row.work_dir or not JobDir(row.work_dir).exists("spec.json"):
            self.registry.update_job(row.id, state="failed",
                                     error_message="the service stopped before the job's inputs were saved")
            return
        state, message = self.launcher.reattach(row.id, row.work_dir)
        if state is LaunchState.PENDING:
            self.launcher.launch(self._launch_request(row))
        elif state.terminal:  # a FAILED process with a checkpoint is resumed there
            self._on_launch_event(LaunchEvent(row.id, state, message))
        log.info("adopted job %s: %s", row.id, state.value)

    def _lost(self, job_id: str) -> None:
        """A job this replica ran is no longer its own: stop its process if it was cancelled (maybe through
        another replica, whose launcher cannot reach a process of this one)."""
        if self.registry.get_job(job_id).state == "cancelled":
            self.launcher.cancel(job_id)

    def close(self) -> None:
        self._stop.set()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.leases.close()
        self.launcher.close()

    @staticmethod
    def _launch_request(row) -> LaunchRequest:
        work = JobDir(row.work_dir)
        resources = json.loads(work.read_text("launch.json"))
        return LaunchRequest(row.id, row.concept_name, work.url_of("spec.json"), row.work_dir,
                             resources["gpus_per_node"], resources["nodes"], resources.get("env", {}),
                             tenant=row.tenant)

    def _resume(self, row, reason: str) -> str | None:
        """Relaunch a job whose training process died, from its checkpoint.

        Returns None when the job was relaunched, else the message to fail it with: `reason` as is when
        there is nothing to resume, with the count added when the job has used up its resumes.
        """
        from trainer.checkpoint import checkpoint_step

        if self.launcher.retries_itself or row.state in TERMINAL_STATES or not row.work_dir:
            return reason
        work = JobDir(row.work_dir)
        if reported_its_end(row.work_dir):  # the trainer gave up and said why: it would again
            return reason
        step = checkpoint_step(row.work_dir)
        if step is None:
            return reason
        done = _read_resumes(work)
        if done >= MAX_RESUMES:
            log.warning("job %s died again after %d resumes; failing it (work dir %s)", row.id, done,
                        work.url)
            return (f"{reason} (the process died {done + 1} times; it was resumed from its checkpoint "
                    f"{done} times, the most allowed, last from step {step})")
        work.write_text(RESUMES_FILE, str(done + 1))
        line = (f"resumed from the checkpoint at step {step} (resume {done + 1} of at most {MAX_RESUMES}): "
                f"{reason}")
        log.warning("job %s: %s (work dir %s)", row.id, line, work.url)
        self.registry.update_job(row.id, log_line=line)
        try:
            self.launcher.launch(self._launch_request(row))
        except Exception:  # noqa: BLE001 - the job must end with a reason, not hang in "running"
            LAUNCHER_ERRORS.labels("relaunch").inc()
            log.exception("job %s: relaunch from its checkpoint failed", row.id)
            return f"{reason}; resuming it from its checkpoint failed (the service log has why)"
        return None

    def _on_launch_event(self, event: LaunchEvent) -> None:
        try:
            row = self.registry.get_job(event.job_id)
        except NotFound:
            return
        if not self.leases.owns(row):  # another replica runs it (a Kubernetes launcher sees every Job)
            return
        with job_context(row.id, self._trace_id(row)):
            self._on_event(row, event)
        if event.state.terminal:
            for gauge in (TRAINING_LOSS, TRAINING_STEPS_PER_S):
                try:
                    gauge.remove(row.id)
                except KeyError:  # it never reported progress
                    pass

    @staticmethod
    def _trace_id(row) -> str:
        """The trace id of the CreateTrainingJob that started the job (from its launch.json), or ""."""
        try:
            env = json.loads(JobDir(row.work_dir).read_text("launch.json")).get("env", {})
        except (OSError, ValueError):
            return ""
        return trace_id_of(env.get(TRACEPARENT_ENV, ""))

    def _on_event(self, row, event: LaunchEvent) -> None:
        log.info("job %s: launcher reports %s%s", row.id, event.state.value, f": {event.message}" if event.message else "")
        self._tail(row)  # progress lines first, then the state change
        if event.state is LaunchState.PENDING:  # e.g. "ImagePullBackOff", "Unschedulable: 0/4 nodes..."
            self.registry.update_job(row.id, log_line=event.message)
        elif event.state is LaunchState.RUNNING:
            self.registry.update_job(row.id, state="running")
        elif event.state is LaunchState.SUCCEEDED:
            self._register_result(row)
        elif event.state is LaunchState.FAILED:
            message = self._resume(row, event.message)
            if message is not None:
                self.registry.update_job(row.id, state="failed", error_message=message, log_line=message)
        elif event.state is LaunchState.CANCELLED:
            self.registry.update_job(row.id, state="cancelled", log_line=event.message)

    def _register_result(self, row) -> None:
        result = json.loads(JobDir(row.work_dir).read_text("result.json"))
        concept = self.store.get_concept(result["digest"])  # verifies the artifact before it is registered
        self.registry.complete_job(row.id, {
            "digest": result["digest"], "tokens": list(concept.tokens), "class_words": list(concept.class_words),
            "size_bytes": len(self.store.get(result["digest"])), "base_fingerprint": concept.base_fingerprint,
            "provenance": dict(concept.provenance, job=f"trainingJobs/{row.id}")})

    def _follow(self) -> None:
        while not self._stop.wait(FOLLOW_INTERVAL_S):
            for row in self.registry.unfinished_jobs(KIND):
                if row.state == "running" and self.leases.owns(row):
                    self._tail(row)

    def _tail(self, row) -> None:
        """Append new progress lines of the job to the registry (each becomes a Watch event)."""
        if not row.work_dir:
            return
        with self._lock:
            offset = self._offsets.get(row.id, int(row.progress.get("_offset", 0)))
            try:
                chunk = JobDir(row.work_dir).read_bytes("progress.jsonl", offset)
            except FileNotFoundError:
                return
            complete = chunk[: chunk.rfind(b"\n") + 1]  # never half a line
            if not complete:
                return
            self._offsets[row.id] = offset + len(complete)
            progress = dict(row.progress)
            for line in complete.decode(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "progress":
                    progress.update({k: event[k] for k in ("step", "total_steps", "loss", "lr", "images_per_s",
                                                           "eta_s") if k in event})
                    if isinstance(event.get("loss"), (int, float)):
                        TRAINING_LOSS.labels(row.id).set(event["loss"])
                    if isinstance(event.get("steps_per_s"), (int, float)):
                        TRAINING_STEPS_PER_S.labels(row.id).set(event["steps_per_s"])
                progress["_offset"] = offset + len(complete)
                self.registry.update_job(row.id, progress=progress, log_line=line)


def _check_inputs(spec) -> None:
    """The trainer's `check_inputs`; a problem with the server's own configuration is not the caller's."""
    from trainer.spec import check_inputs

    try:
        check_inputs(spec)
    except InvalidArgument as e:
        if e.field.split(".")[0] in ("base_model", "store_url", "work_dir"):
            log.error("the trainer's configuration is broken: %s", e)
            raise Unavailable("the training service is misconfigured; operators: see the server log") from e
        raise


def _read_resumes(work: JobDir) -> int:
    """How often the job was resumed; an unreadable counter counts as used up (better failed than looping)."""
    try:
        return int(work.read_text(RESUMES_FILE))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return MAX_RESUMES


def _write_image(blob: ImageBlob, stem: Path) -> str:
    """Write an uploaded image (its header already checked) as a file the trainer reads."""
    with Image.open(io.BytesIO(blob.data), formats=("PNG", "JPEG")) as img:
        fmt = img.format
    path = stem.with_suffix(".png" if fmt == "PNG" else ".jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob.data)
    return str(path)

