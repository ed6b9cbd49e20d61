"""Runs `python -m trainer --spec` (or torchrun for several GPUs) as local subprocesses, a few at a time.

Processes start in their own session so they outlive a restart of the service; `reattach` finds them
again through the pid file in the job's work directory. Logs stay in `<work_dir>/train.log`. A job
directory on an object store cannot be a process's cwd: such a job's pid file and log are kept in
`<temp dir>/customdiff-launcher/<job id>/` instead (`state_dir`). A
process that dies is reported FAILED; `TrainingJobs` then resumes it from its checkpoint. Unless
OMP_NUM_THREADS is set, each job gets an equal share of the CPU cores as its thread count: jobs that
each take every core oversubscribe the machine, and OpenMP's spinning then slows all of them many times
over (two 500-step jobs on 2 cores: 3.3 s per step each, against 0.07 s alone).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from concepts.jobdir import JobDir
from services.common.processes import alive, describe_exit
from services.trainer.launcher import LaunchEvent, LaunchRequest, LaunchState, last_error, outcome_from_work_dir

log = logging.getLogger(__name__)
KILL_GRACE_S = 10.0


class LocalProcessLauncher:
    """A `JobLauncher` on this machine with at most `max_concurrent` jobs running at once."""

    retries_itself = False  # a dead process stays dead: the service resumes it from its checkpoint

    def __init__(self, max_concurrent: int = 1, python: str = sys.executable) -> None:
        self._python = python
        self._slots = max_concurrent
        self._queue: deque[LaunchRequest] = deque()
        self._running: dict[str, subprocess.Popen | int] = {}  # Popen, or a pid found by reattach
        self._cancelled: set[str] = set()
        self._listeners: list[Callable[[LaunchEvent], None]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def launch(self, request: LaunchRequest) -> None:
        with self._lock:
            if request.job_id in self._cancelled:  # cancelled while its resume was on the way
                log.info("not launching job %s: it was cancelled", request.job_id)
                return
            self._queue.append(request)
        self._dispatch()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            queued = [r for r in self._queue if r.job_id == job_id]
            for r in queued:
                self._queue.remove(r)
            proc = self._running.get(job_id)
            self._cancelled.add(job_id)
        if queued:
            self._emit(LaunchEvent(job_id, LaunchState.CANCELLED, "cancelled before it started"))
        if proc is not None:  # off the caller's thread: termination may wait KILL_GRACE_S
            pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
            threading.Thread(target=_terminate, args=(pid,), daemon=True, name=f"cancel-{job_id[:8]}").start()

    def watch(self, on_event: Callable[[LaunchEvent], None]) -> None:
        self._listeners.append(on_event)

    def reattach(self, job_id: str, work_dir: str) -> tuple[LaunchState, str]:
        local = state_dir(job_id, work_dir)
        pid_file = local / "pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        if pid is not None and alive(pid) and _runs_in(pid, str(local)):  # not a reused pid after a reboot
            with self._lock:
                self._running[job_id] = pid
            threading.Thread(target=self._poll_pid, args=(job_id, pid, work_dir), daemon=True,
                             name=f"reattach-{job_id[:8]}").start()
            return LaunchState.RUNNING, ""
        if pid is None:  # never started: run it now
            return LaunchState.PENDING, ""
        state, message = outcome_from_work_dir(work_dir)
        if state is LaunchState.PENDING:  # started, but gone before it wrote anything
            return LaunchState.FAILED, ("the training process ended before it reported progress; "
                                        "see the job's train.log")
        return state, message

    def close(self) -> None:
        self._closed.set()

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if not self._queue or len(self._running) >= self._slots or self._closed.is_set():
                    return
                request = self._queue.popleft()
                proc = self._start(request)
                self._running[request.job_id] = proc
            self._emit(LaunchEvent(request.job_id, LaunchState.RUNNING))
            threading.Thread(target=self._wait, args=(request, proc), daemon=True,
                             name=f"job-{request.job_id[:8]}").start()

    def _start(self, request: LaunchRequest) -> subprocess.Popen:
        work = state_dir(request.job_id, request.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        if request.gpus_per_node > 1:
            cmd = [self._python, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={request.gpus_per_node}", "-m", "trainer", "--spec", request.spec_path]
        else:
            cmd = [self._python, "-m", "trainer", "--spec", request.spec_path]
        env = dict(os.environ, **request.env, CUSTOMDIFF_JOB_ID=request.job_id)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self._slots)))
        with open(work / "train.log", "ab") as logfile:
            proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=work, env=env, start_new_session=True)
        (work / "pid").write_text(str(proc.pid))
        log.info("started job %s as pid %d: %s", request.job_id, proc.pid, " ".join(cmd))
        return proc

    def _wait(self, request: LaunchRequest, proc: subprocess.Popen) -> None:
        code = proc.wait()
        self._finish(request.job_id, request.work_dir, code)

    def _poll_pid(self, job_id: str, pid: int, work: str) -> None:
        while alive(pid) and not self._closed.is_set():
            time.sleep(0.5)
        self._finish(job_id, work, exit_code=None)

    def _finish(self, job_id: str, work: str, exit_code: int | None) -> None:
        if self._closed.is_set():  # a closed launcher reports nothing; a restarted service reattaches
            return
        with self._lock:
            self._running.pop(job_id, None)
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        if cancelled:
            self._emit(LaunchEvent(job_id, LaunchState.CANCELLED, "cancelled by the user"))
        else:
            state, message = _final_state(work, exit_code)
            if state is LaunchState.FAILED:
                log.warning("job %s failed (%s); its log is %s", job_id, message,
                            state_dir(job_id, work) / "train.log")
            self._emit(LaunchEvent(job_id, state, message))
        self._dispatch()

    def _emit(self, event: LaunchEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not kill the launcher thread
                log.exception("launch event listener failed for %s", event)


def state_dir(job_id: str, work_dir: str) -> Path:
    """Where the job runs (its cwd) and keeps its pid file and train.log: its job directory when that is
    local, else a directory of its own under the temp dir."""
    local = JobDir(work_dir).local
    return local if local is not None else Path(tempfile.gettempdir()) / "customdiff-launcher" / job_id


def _final_state(work: str, exit_code: int | None) -> tuple[LaunchState, str]:
    """SUCCEEDED when the trainer wrote its result; else FAILED with the trainer's own error line if any."""
    if exit_code in (0, None):
        state, message = outcome_from_work_dir(work)
        if state is not LaunchState.PENDING:
            return state, message
    reason = f"the training process {describe_exit(exit_code)}; see the job's train.log"
    return LaunchState.FAILED, last_error(work) or reason


def _runs_in(pid: int, work_dir: str) -> bool:
    """Whether `pid` runs in `work_dir`, as every process `_start` makes does; True if /proc cannot tell."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return not Path("/proc/self/cwd").exists()  # no /proc here; else the process is gone
    except PermissionError:
        return False  # another user's process; the service can always look at the ones it started
    except OSError:
        return True  # cannot tell
    return os.path.realpath(cwd) == os.path.realpath(work_dir)


def _terminate(pid: int) -> None:
    """SIGTERM the job's process group, SIGKILL after a grace period."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
