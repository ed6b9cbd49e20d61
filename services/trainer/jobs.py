"""Training jobs behind the TrainerService: validate, store inputs, record, launch, follow, register.

Thread model: RPC threads call `create`/`cancel`; the launcher calls `_on_launch_event` from its own
threads; one follower thread tails every running job's `progress.jsonl` into the registry.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from concepts.errors import InvalidArgument, NotFound
from concepts.store import ArtifactStore
from services.common.registry import TERMINAL_STATES, Registry
from services.common.settings import Settings
from services.trainer.launcher import JobLauncher, LaunchEvent, LaunchRequest, LaunchState

log = logging.getLogger(__name__)
KIND = "training"
FOLLOW_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ImageBlob:
    """One training image: its bytes and where it came from (for error messages)."""

    data: bytes
    field: str
    caption: str = ""


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
    def __init__(self, settings: Settings, registry: Registry, store: ArtifactStore, launcher: JobLauncher,
                 base_model: str) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.launcher = launcher
        self.base_model = base_model
        self.work_root = Path(settings.work_dir)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        launcher.watch(self._on_launch_event)
        self._follower = threading.Thread(target=self._follow, daemon=True, name="progress-follower")
        self._follower.start()

    def create(self, tenant: str, request: TrainingRequest) -> tuple[Any, bool]:
        """Validate everything, then record and launch; the same request_id returns the first job."""
        from trainer.spec import JobSpec, check_inputs

        if request.request_id:
            existing = self.registry.job_by_request_id(tenant, KIND, request.request_id)
            if existing is not None:
                return existing, False
        # 1. Write the images where the job will read them and validate the whole spec, before anything
        #    durable is recorded; on any failure the directory goes away again.
        job_id = uuid.uuid4().hex
        work = self.work_root / job_id
        try:
            spec_dict = self._materialize(request, work)
            spec_dict["provenance"] = {"kind": "training", "job": f"trainingJobs/{job_id}"}
            spec = JobSpec.from_dict(spec_dict)
            check_inputs(spec)
            # 2. Record the job (idempotent on request_id); a concurrent twin may have won.
            row, created = self.registry.create_job(tenant, KIND, request.request_id, request.concept_name,
                                                    request.request_json, job_id=job_id, work_dir=str(work))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if not created:
            shutil.rmtree(work, ignore_errors=True)
            return row, False
        # 3. Keep the inputs, write the spec, launch.
        for blobs in request.images + request.class_images:
            for blob in blobs:
                self.store.put(blob.data)
        spec_path = work / "spec.json"
        launch = LaunchRequest(row.id, request.concept_name, str(spec_path), str(work), request.gpus_per_node,
                               request.nodes)
        # launch.json before spec.json: `recover` relaunches a job whose spec.json exists
        (work / "launch.json").write_text(json.dumps({"gpus_per_node": launch.gpus_per_node, "nodes": launch.nodes}))
        spec_path.write_text(json.dumps(spec.to_dict(), indent=2))
        self.launcher.launch(launch)
        return row, True

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
        """After a restart: reattach running jobs, relaunch queued ones, record what ended meanwhile."""
        for row in self.registry.unfinished_jobs(KIND):
            spec_path = Path(row.work_dir) / "spec.json"
            if not row.work_dir or not spec_path.exists():
                self.registry.update_job(row.id, state="failed",
                                         error_message="the service stopped before the job's inputs were saved")
                continue
            state, message = self.launcher.reattach(row.id, row.work_dir)
            if state is LaunchState.PENDING:
                resources = json.loads((Path(row.work_dir) / "launch.json").read_text())
                self.launcher.launch(LaunchRequest(row.id, row.concept_name, str(spec_path), row.work_dir,
                                                   resources["gpus_per_node"], resources["nodes"]))
            elif state.terminal:
                self._on_launch_event(LaunchEvent(row.id, state, message))
            log.info("recovered job %s: %s", row.id, state.value)

    def close(self) -> None:
        self._stop.set()
        self.launcher.close()

    def _on_launch_event(self, event: LaunchEvent) -> None:
        try:
            row = self.registry.get_job(event.job_id)
        except NotFound:
            return
        self._tail(row)  # progress lines first, then the state change
        if event.state is LaunchState.PENDING:  # e.g. "ImagePullBackOff", "Unschedulable: 0/4 nodes..."
            self.registry.update_job(row.id, log_line=event.message)
        elif event.state is LaunchState.RUNNING:
            self.registry.update_job(row.id, state="running")
        elif event.state is LaunchState.SUCCEEDED:
            self._register_result(row)
        elif event.state is LaunchState.FAILED:
            self.registry.update_job(row.id, state="failed", error_message=event.message, log_line=event.message)
        elif event.state is LaunchState.CANCELLED:
            self.registry.update_job(row.id, state="cancelled", log_line=event.message)

    def _register_result(self, row) -> None:
        result = json.loads((Path(row.work_dir) / "result.json").read_text())
        concept = self.store.get_concept(result["digest"])  # verifies the artifact before it is registered
        self.registry.complete_job(row.id, {
            "digest": result["digest"], "tokens": list(concept.tokens), "class_words": list(concept.class_words),
            "size_bytes": len(self.store.get(result["digest"])), "base_fingerprint": concept.base_fingerprint,
            "provenance": dict(concept.provenance, job=f"trainingJobs/{row.id}")})

    def _follow(self) -> None:
        while not self._stop.wait(FOLLOW_INTERVAL_S):
            for row in self.registry.unfinished_jobs(KIND):
                if row.state == "running":
                    self._tail(row)

    def _tail(self, row) -> None:
        """Append new progress lines of the job to the registry (each becomes a Watch event)."""
        path = Path(row.work_dir or "/nonexistent") / "progress.jsonl"
        if not path.exists():
            return
        with self._lock:
            offset = self._offsets.get(row.id, int(row.progress.get("_offset", 0)))
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
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
                progress["_offset"] = offset + len(complete)
                self.registry.update_job(row.id, progress=progress, log_line=line)


def _write_image(blob: ImageBlob, stem: Path) -> str:
    """Decode-check an uploaded image and write it as a file the trainer reads."""
    try:
        with Image.open(io.BytesIO(blob.data)) as img:
            fmt = img.format
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InvalidArgument(blob.field, f"not a readable PNG or JPEG image ({len(blob.data)} bytes): {e}") from e
    if fmt not in ("PNG", "JPEG"):
        raise InvalidArgument(blob.field, f"must be PNG or JPEG, got {fmt}")
    path = stem.with_suffix(".png" if fmt == "PNG" else ".jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob.data)
    return str(path)

