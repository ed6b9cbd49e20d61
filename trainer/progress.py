"""Progress as JSON lines in ``<work_dir>/progress.jsonl``, the trainer's only channel to the service.

Events (one JSON object per line, docs/job-spec.md):
  {"event": "state", "state": "training", "message": "..."}
  {"event": "progress", "step", "total_steps", "loss", "lr", "images_per_s", "steps_per_s", "eta_s"}
  {"event": "done", "digest": "<sha256>"}
  {"event": "error", "message": "<what the user must fix>"}
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"


class ProgressLog:
    """Appends events to the progress file, optionally echoes them on stdout and hands them to a listener.

    Only rank 0 logs (`enabled`); errors are logged by every rank, since the failing one may not be 0.
    Each event is one `write` of one line on a file opened for appending, so lines from several
    processes do not interleave.
    """

    def __init__(self, work_dir: str | Path, enabled: bool = True, echo: bool = False,
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(work_dir) / PROGRESS_FILE
        self.enabled = enabled
        self.echo = echo
        self.listener = listener

    def emit(self, event: dict[str, Any], force: bool = False) -> None:
        if not (self.enabled or force):
            return
        line = json.dumps(event, sort_keys=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
        if self.echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        if self.listener is not None:
            self.listener(event)

    def state(self, state: str, message: str = "") -> None:
        self.emit({"event": "state", "state": state, "message": message})

    def progress(self, step: int, total_steps: int, loss: float, lr: float, images_per_s: float,
                 steps_per_s: float, eta_s: float) -> None:
        self.emit({"event": "progress", "step": step, "total_steps": total_steps, "loss": round(loss, 6),
                   "lr": lr, "images_per_s": round(images_per_s, 3), "steps_per_s": round(steps_per_s, 4),
                   "eta_s": round(eta_s, 1)})

    def done(self, digest: str) -> None:
        self.emit({"event": "done", "digest": digest})

    def error(self, message: str) -> None:
        self.emit({"event": "error", "message": message}, force=True)


class StepTimer:
    """Images per second and time left, averaged over the steps of this run (a resumed run starts over)."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.start = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def rates(self, remaining_steps: int) -> tuple[float, float, float]:
        """(images per second, steps per second, estimated seconds left)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_step = elapsed / max(self.steps, 1)
        return self.images_per_step * self.steps / elapsed, self.steps / elapsed, per_step * remaining_steps


def write_result(work_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically: a reader sees the whole file or none."""
    path = Path(work_dir) / RESULT_FILE
    tmp = path.with_name(f".{RESULT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_result(work_dir: str | Path) -> dict[str, Any] | None:
    path = Path(work_dir) / RESULT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())
