"""The one interface every training launcher implements (local subprocess, Kubernetes Job)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from concepts.jobdir import JobDir


class LaunchState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (LaunchState.SUCCEEDED, LaunchState.FAILED, LaunchState.CANCELLED)


@dataclass(frozen=True)
class LaunchRequest:
    """What a launcher needs to run `python -m trainer --spec <spec_path>`.

    Args:
        job_id: registry id of the job (unique, lower-case hex); labels and names derive from it.
        concept_id: tenant-scoped concept name, for labels.
        spec_path: path of the job spec JSON as seen by the training process, or its URL when the job
            directory is on an object store (`concepts.jobdir`).
        work_dir: job directory as seen by the training process (progress lines, logs, output): a path,
            or a URL such as ``s3://bucket/jobs/<job id>``.
        gpus_per_node: GPUs per node; 0 runs on CPU.
        nodes: number of nodes (more than 1: torchrun rendezvous across pods).
        env: more environment of the training process: the trace it continues (TRACEPARENT) and where
            its spans go (CUSTOMDIFF_OTLP_ENDPOINT).
        tenant: the tenant the job belongs to; the Kubernetes launcher picks its pods' PriorityClass by it.
    """

    job_id: str
    concept_id: str
    spec_path: str
    work_dir: str
    gpus_per_node: int = 0
    nodes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    tenant: str = ""


@dataclass(frozen=True)
class LaunchEvent:
    """A state change of a launched job; `message` carries the failure reason in the user's words."""

    job_id: str
    state: LaunchState
    message: str = ""


class JobLauncher(Protocol):
    """Starts, observes and stops training processes. Implementations are thread-safe."""

    #: True when the launcher itself reruns a training process that died (a Kubernetes Job's
    #: `backoffLimit`), so FAILED is final; False when the service should resume the job from its
    #: checkpoint (`TrainingJobs`, at most `MAX_RESUMES` times).
    retries_itself: bool

    def launch(self, request: LaunchRequest) -> None:
        """Start the job; return once it is submitted (not finished)."""

    def cancel(self, job_id: str) -> None:
        """Stop the job for real; a job that is already gone is not an error."""

    def watch(self, on_event: Callable[[LaunchEvent], None]) -> None:
        """Deliver every state change of every job to `on_event` from a background thread until `close`."""

    def reattach(self, job_id: str, work_dir: str) -> tuple[LaunchState, str]:
        """After a service restart: resume observing the job if it still runs, else return its final state.

        Returns (state, reason). The state is not also delivered as an event, so a finished job is
        recorded once; PENDING means the job never started and should be launched again.
        """

    def close(self) -> None:
        """Stop watching; running jobs are left running."""


def outcome_from_work_dir(work_dir: str) -> tuple[LaunchState, str]:
    """Judge a job whose process or Job is gone by what the trainer left in its work directory.

    `result.json` means it succeeded; progress lines without a result mean it failed (with the
    trainer's own last error line as the reason when it wrote one); no trace means it never started.
    """
    work = JobDir(work_dir)
    if work.exists("result.json"):
        return LaunchState.SUCCEEDED, ""
    if not work.exists("progress.jsonl"):
        return LaunchState.PENDING, ""
    return LaunchState.FAILED, last_error(work_dir) or "the training process ended without a result; see its log"


def _progress_lines(work: str | Path) -> list[str]:
    """The lines of the job directory's progress.jsonl (local path or URL); none when it has none."""
    try:
        return JobDir(work).read_text("progress.jsonl").splitlines()
    except FileNotFoundError:
        return []


def reported_its_end(work: str | Path) -> bool:
    """Whether the trainer's last progress line says how it ended: its own error, or a requested stop.

    A process that died without one (a signal, the OOM killer, a host crash) may be resumed; one that
    reported an error (bad input, a checkpoint of another job, a bug) would end the same way again.
    """
    for line in reversed(_progress_lines(work)):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by the death itself
        return isinstance(event, dict) and (event.get("event") == "error" or event.get("state") == "stopped")
    return False


def last_error(work: str | Path) -> str:
    """The message of the trainer's last ``{"event": "error"}`` progress line, or ""."""
    message = ""
    for line in _progress_lines(work):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "error":
            message = str(event.get("message", ""))
    return message
