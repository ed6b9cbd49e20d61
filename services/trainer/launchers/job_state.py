"""Pure functions from Kubernetes Job and Pod objects (API dicts) to a launch state and a user's message."""

from __future__ import annotations

from typing import Any

from services.trainer.launcher import LaunchState
from services.trainer.launchers.job_manifest import LABEL_KUEUE_QUEUE

# Conditions that end a Job. Since Kubernetes 1.31 the controller first sets SuccessCriteriaMet or
# FailureTarget and adds Complete or Failed once the pods are gone; either one decides the outcome.
_SUCCEEDED = ("Complete", "SuccessCriteriaMet")
_FAILED = ("Failed", "FailureTarget")
# Waiting reasons that keep a pod from ever running until someone fixes the image, secret or config.
WAITING_PROBLEMS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "CrashLoopBackOff", "RunContainerError",
})
_HINTS = {
    "BackoffLimitExceeded": "the trainer failed on every allowed attempt",
    "DeadlineExceeded": "training ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failed in a way that is not retried (an invalid job spec exits 2)",
}
MAX_DETAIL_CHARS = 600


def job_state(job: dict[str, Any], deleted: bool = False,
              cancel_requested: bool = False) -> tuple[LaunchState, str]:
    """Where a Job is in its life, from its `status` and metadata.

    Args:
        job: the Job as the API returns it (camelCase dict).
        deleted: the watch reported the Job DELETED.
        cancel_requested: the user cancelled the job; whatever ends it from now on is a cancellation.

    Returns:
        The launch state and a message for the user: the controller's reason when the Job ended,
        what the pods are doing otherwise. Finished beats deleted: a Job removed by
        `ttlSecondsAfterFinished` keeps the outcome it had; a Job deleted by anyone but the
        launcher before it finished has FAILED.
    """
    name = job.get("metadata", {}).get("name", "?")
    status = job.get("status") or {}
    true = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    finished = any(kind in true for kind in _SUCCEEDED + _FAILED)
    going = deleted or bool(job.get("metadata", {}).get("deletionTimestamp"))
    if cancel_requested and (finished or going):
        return LaunchState.CANCELLED, f"cancelled by the user; Job {name} deleted"
    for kind in _SUCCEEDED:
        if kind in true:
            return LaunchState.SUCCEEDED, f"Job {name} completed"
    for kind in _FAILED:
        if kind in true:
            return LaunchState.FAILED, _failure_message(name, true[kind])
    if going:
        return LaunchState.FAILED, f"Job {name} was deleted before it finished, not by customdiff"
    if job_suspended(job):
        queue = (job.get("metadata", {}).get("labels") or {}).get(LABEL_KUEUE_QUEUE)
        if queue:  # queued, or preempted and queued again: Kueue unsuspends it on admission
            return LaunchState.PENDING, f"Job {name} is waiting for Kueue to admit it in queue {queue}"
        return LaunchState.PENDING, f"Job {name} is suspended ({_reason_text(true.get('Suspended', {}))})"
    parallelism = (job.get("spec") or {}).get("parallelism", 1)
    ready, active = status.get("ready"), status.get("active") or 0
    # `ready` is absent only on servers older than 1.24; there an active pod counts as running.
    if (ready or 0) > 0 or (ready is None and active > 0):
        return LaunchState.RUNNING, f"{ready if ready is not None else active} of {parallelism} pods running"
    if active > 0:
        return LaunchState.PENDING, f"{active} of {parallelism} pods starting"
    return LaunchState.PENDING, "waiting for pods to be created"


def job_suspended(job: dict[str, Any]) -> bool:
    """Whether the Job is suspended: `spec.suspend` when the Job has it, else its Suspended condition.

    The spec decides because the condition lags: a Job that Kueue just admitted (suspend set to false)
    still shows Suspended=True until the Job controller creates its pods, and one created suspended has
    no condition yet.
    """
    spec = job.get("spec") or {}
    if "suspend" in spec:
        return bool(spec["suspend"])
    return any(c.get("type") == "Suspended" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def pod_problems(pods: list[dict[str, Any]]) -> str:
    """Why a job's pods are not running or failed, one clause per problem ("" when none).

    Reports unschedulable pods, containers stuck waiting (image pull, bad config), containers that
    terminated with a non-zero exit code (OOMKilled, a traceback's last lines) and evictions.
    """
    found: list[str] = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        name = pod.get("metadata", {}).get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                found.append(f"pod {name}: {_reason_text(cond)}")
        if status.get("reason"):  # pod-level: Evicted, DeadlineExceeded, ...
            found.append(f"pod {name}: {_reason_text(status)}")
        statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in statuses:
            clause = _container_problem(container)
            if clause:
                found.append(f"pod {name}: container {container.get('name', '?')} {clause}")
    return "; ".join(dict.fromkeys(found))  # the same clause from several pods once, order kept


def _container_problem(container: dict[str, Any]) -> str:
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in WAITING_PROBLEMS:
        return f"is waiting: {_reason_text(waiting)}"
    for terminated in (state.get("terminated"), (container.get("lastState") or {}).get("terminated")):
        if terminated and terminated.get("exitCode", 0) != 0:
            code = terminated["exitCode"]
            text = f"terminated: {terminated.get('reason') or 'Error'} (exit code {code})"
            message = _tail(terminated.get("message", ""))
            return f"{text}: {message}" if message else text
    return ""


def _failure_message(name: str, condition: dict[str, Any]) -> str:
    hint = _HINTS.get(condition.get("reason", ""))
    text = f"Job {name} failed: {_reason_text(condition)}"
    return f"{text} ({hint})" if hint else text


def _reason_text(obj: dict[str, Any]) -> str:
    reason, message = obj.get("reason") or "", _tail(obj.get("message") or "")
    return f"{reason}: {message}" if reason and message else reason or message or "no reason given"


def _tail(text: str) -> str:
    """The end of a (possibly multi-line) message: tracebacks put the error on their last line."""
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= MAX_DETAIL_CHARS else "..." + text[-MAX_DETAIL_CHARS:]
