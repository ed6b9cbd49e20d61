"""The one interface every training launcher implements (local subprocess, Kubernetes Job)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Protocol


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
        spec_path: path of the job spec JSON as seen by the training process.
        work_dir: job directory as seen by the training process (progress lines, logs, output).
        gpus_per_node: GPUs per node; 0 runs on CPU.
        nodes: number of nodes (more than 1: torchrun rendezvous across pods).
    """

    job_id: str
    concept_id: str
    spec_path: str
    work_dir: str
    gpus_per_node: int = 0
    nodes: int = 1


@dataclass(frozen=True)
class LaunchEvent:
    """A state change of a launched job; `message` carries the failure reason in the user's words."""

    job_id: str
    state: LaunchState
    message: str = ""


class JobLauncher(Protocol):
    """Starts, observes and stops training processes. Implementations are thread-safe."""

    def launch(self, request: LaunchRequest) -> None:
        """Start the job; return once it is submitted (not finished)."""

    def cancel(self, job_id: str) -> None:
        """Stop the job for real; a job that is already gone is not an error."""

    def watch(self, on_event: Callable[[LaunchEvent], None]) -> None:
        """Deliver every state change of every job to `on_event` from a background thread until `close`."""

    def reattach(self, job_id: str, work_dir: str) -> LaunchState:
        """After a service restart: resume observing the job if it still runs, else report its final state."""

    def close(self) -> None:
        """Stop watching; running jobs are left running."""
