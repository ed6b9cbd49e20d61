"""Resumable checkpoints in ``<work_dir>/checkpoint/``: trained parameters, optimizer and scaler state.

The training randomness is a pure function of (seed, step), so restoring these tensors is all a
resumed job needs to end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from concepts.errors import FailedPrecondition

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
#: In a remote job directory (concepts/jobdir.py), the step of the uploaded checkpoint, so that the
#: service need not download the state to decide whether a dead job can be resumed.
STEP_MARKER = f"{CHECKPOINT_DIR}/step"


def checkpoint_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(work_dir: str | Path, step: int, job_key: str, params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Write the state after `step` optimizer steps; atomic (temporary file, then rename)."""
    path = checkpoint_path(work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "job_key": job_key,
        "params": {name: p.detach().cpu() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
    }
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(work_dir: str | Path, job_key: str, params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """Restore the state if a checkpoint exists; return the step to continue from (0 without one).

    Raises:
        FailedPrecondition: the checkpoint belongs to another job (other spec, base or process count).
    """
    path = checkpoint_path(work_dir)
    if not path.exists():
        return 0
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state["job_key"] != job_key or set(state["params"]) != set(params):
        raise FailedPrecondition(
            f"{CHECKPOINT_DIR}/{STATE_FILE} in the job's work directory was written by a different job (spec, "
            "base model or number of processes differ); remove it to start over"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def checkpoint_step(work_dir: str | Path) -> int | None:
    """The step of the checkpoint in `work_dir`, or None when there is none (or it cannot be read).

    Memory-maps the file, so only the few bytes of the step are read, however large the state is:
    the service calls this to decide whether a dead training process can be resumed. A remote job
    directory is asked for its `STEP_MARKER` instead.
    """
    from concepts.jobdir import JobDir

    remote = JobDir(work_dir)
    if remote.local is None:
        try:
            return int(remote.read_text(STEP_MARKER))
        except (OSError, ValueError):
            return None
    path = checkpoint_path(work_dir)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # noqa: BLE001 - truncated or foreign file: nothing to resume from
        return None


def step_marker(work_dir: str | Path) -> bytes | None:
    """The `STEP_MARKER` content for the checkpoint in a local `work_dir`, or None without one."""
    step = checkpoint_step(work_dir)
    return None if step is None else str(step).encode()


def remove_checkpoint(work_dir: str | Path) -> None:
    shutil.rmtree(Path(work_dir) / CHECKPOINT_DIR, ignore_errors=True)
