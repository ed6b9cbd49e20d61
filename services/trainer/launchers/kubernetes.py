"""Training as Kubernetes Jobs: create, watch (resourceVersion + bookmarks, relist on 410 Gone), cancel.

The official client is injected (`BatchV1Api` and `CoreV1Api` over one `ApiClient`); `make_api_client`
decides once between in-cluster and kubeconfig credentials. Manifests come from `job_manifest`, states
from the pure `job_state`. Thread model: RPC threads call launch/cancel/reattach; one watch thread
delivers events; `_lock` guards `_jobs` and `_cancelled`, and listeners run outside it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from concepts.errors import (
    AlreadyExists,
    CustomDiffError,
    FailedPrecondition,
    NotFound,
)
from services.common.metrics import LAUNCHER_ERRORS
from services.common.settings import KubernetesSettings
from services.trainer.launcher import LaunchEvent, LaunchRequest, LaunchState, outcome_from_work_dir
from services.trainer.launchers.job_manifest import (
    LABEL_JOB_ID,
    build_job,
    build_service,
    instance_selector,
    job_selector,
)
from services.trainer.launchers.job_state import job_state, job_suspended, pod_problems
from services.trainer.launchers.k8s_calls import backoff, call_with_retries

log = logging.getLogger(__name__)

# Every API call this launcher makes, as RBAC (apiGroup, resource) -> verbs. The Helm chart's trainer
# Role grants exactly these; tests check both directions against the requests a fake API server saw.
RBAC_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("batch", "jobs"): frozenset({"create", "list", "watch", "delete"}),
    ("", "services"): frozenset({"create"}),
    ("", "pods"): frozenset({"list"}),
}
GONE = 410


def make_api_client() -> client.ApiClient:
    """In a pod, the service account's credentials; elsewhere the current kubeconfig context.

    Raises:
        FailedPrecondition: neither is available.
    """
    from kubernetes import config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except config.ConfigException as e:
        raise FailedPrecondition(f"launcher is 'kubernetes' but no cluster credentials were found: {e}") from e
    return client.ApiClient(configuration)


@dataclass
class _Tracked:
    """What the launcher knows about one job; mutable, guarded by the launcher's lock."""

    name: str
    work_dir: str
    created: bool = False
    # The last event delivered, and the Job's own part of its message (without the pods' problems).
    last: tuple[LaunchState, str] | None = None
    job_message: str = ""
    # Suspended (waiting for Kueue): it has no pods whose problems would be worth a pod list.
    suspended: bool = False


class KubernetesJobLauncher:
    """A `JobLauncher` that runs each training job as a Kubernetes Job in `settings.namespace`."""

    # The Job's backoffLimit reruns a failed pod, which resumes from the checkpoint in the job's work
    # directory (on the store volume or an object store); once the Job has failed, the service does not
    # resume it again.
    retries_itself = True

    def __init__(self, batch: client.BatchV1Api, core: client.CoreV1Api, settings: KubernetesSettings,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._batch = batch
        self._core = core
        self._settings = settings
        self._sleep = sleep
        self._timeout = (min(10.0, settings.request_timeout_seconds), settings.request_timeout_seconds)
        self._jobs: dict[str, _Tracked] = {}
        self._cancelled: set[str] = set()
        self._listeners: list[Callable[[LaunchEvent], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: KubernetesSettings) -> KubernetesJobLauncher:
        """The launcher of `customdiff serve`: credentials from `make_api_client`."""
        api = make_api_client()
        return cls(client.BatchV1Api(api), client.CoreV1Api(api), settings)

    def launch(self, request: LaunchRequest) -> None:
        """Create the Job (and for several nodes its headless Service); a Job that exists is kept.

        Raises:
            Unavailable: the API server stayed unreachable or overloaded through every retry.
            PermissionDenied: the service account may not create Jobs or Services.
            FailedPrecondition: the API server rejected the manifest (check the kubernetes settings).
        """
        job = build_job(request, self._settings)
        name = job["metadata"]["name"]
        with self._lock:
            self._jobs.setdefault(request.job_id, _Tracked(name, request.work_dir))
        try:
            uid = self._create_job(job, request.job_id)
            with self._lock:
                self._jobs[request.job_id].created = True
            if request.nodes > 1:
                self._create_service(build_service(request, self._settings, uid))
        except CustomDiffError:
            with self._lock:  # the caller records the failure; the watch must not report this job
                self._jobs.pop(request.job_id, None)
            raise
        log.info("launched job %s as Job %s/%s", request.job_id, self._settings.namespace, name)

    def cancel(self, job_id: str) -> None:
        """Delete the job's Job with foreground propagation: its pods stop, the owned Service goes too."""
        with self._lock:
            self._cancelled.add(job_id)
            tracked = self._jobs.get(job_id)
        names = [tracked.name] if tracked else [j["metadata"]["name"] for j in self._list_jobs(job_id)]
        for name in names:
            self._delete_job(name)

    def watch(self, on_event: Callable[[LaunchEvent], None]) -> None:
        with self._lock:
            self._listeners.append(on_event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="k8s-job-watch")
                self._thread.start()

    def reattach(self, job_id: str, work_dir: str) -> tuple[LaunchState, str]:
        """Find the job's Job again and follow it; a Job that is gone is judged by its work directory.

        Returns the current state without delivering it as an event (the caller records it), so a
        finished job is not reported twice. PENDING for a Job that never got created tells the caller
        to launch it again; launching a Job that does exist is harmless.
        """
        jobs = self._list_jobs(job_id)
        if not jobs:
            return outcome_from_work_dir(work_dir)
        job = jobs[0]
        state, message = job_state(job)
        with self._lock:
            self._jobs[job_id] = _Tracked(job["metadata"]["name"], work_dir, created=True,
                                          last=(state, message), suspended=job_suspended(job))
        return state, message

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + self._settings.request_timeout_seconds
        # Watch.stop cuts the stream's socket only once its request is under way, so stop whichever
        # watch is current until the thread has noticed `_stop`.
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            watcher = self._watcher
            if watcher is not None:
                watcher.stop()
            self._thread.join(timeout=0.05)

    # --- API calls -------------------------------------------------------------------------------

    def _create_job(self, job: dict[str, Any], job_id: str) -> str:
        """Create the Job and return its uid; on 409 (a retried or repeated launch) adopt the existing one."""
        name = job["metadata"]["name"]
        try:
            created = self._call(f"create Job {name}", self._batch.create_namespaced_job,
                                 self._settings.namespace, job)
            return created.metadata.uid
        except AlreadyExists:
            existing = self._list_jobs(job_id)
            if not existing:
                raise
            return existing[0]["metadata"]["uid"]

    def _create_service(self, service: dict[str, Any]) -> None:
        name = service["metadata"]["name"]
        try:
            self._call(f"create Service {name}", self._core.create_namespaced_service, self._settings.namespace,
                       service)
        except AlreadyExists:
            pass  # a retried launch: the Service is already there
        except CustomDiffError:
            self._delete_job(name)  # its pods would wait for a rendezvous host that never resolves
            raise

    def _delete_job(self, name: str) -> None:
        try:
            self._call(f"delete Job {name}", self._batch.delete_namespaced_job, name, self._settings.namespace,
                       propagation_policy="Foreground")
        except NotFound:
            pass  # already gone: deleted, or removed by ttlSecondsAfterFinished

    def _list_jobs(self, job_id: str) -> list[dict[str, Any]]:
        selector = job_selector(self._settings.instance, job_id)
        return self._list("list Jobs", self._batch.list_namespaced_job, selector).get("items") or []

    def _pod_problems(self, job_id: str) -> str:
        selector = job_selector(self._settings.instance, job_id)
        return pod_problems(self._list("list Pods", self._core.list_namespaced_pod, selector).get("items") or [])

    def _list(self, what: str, fn: Callable[..., Any], selector: str) -> dict[str, Any]:
        """The list as the API sent it (camelCase dicts): the pure state functions read exactly that."""
        response = self._call(what, fn, self._settings.namespace, label_selector=selector, _preload_content=False)
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call_with_retries(f"{what} in namespace {self._settings.namespace}", fn, *args,
                                 retries=self._settings.api_retries, sleep=self._sleep,
                                 _request_timeout=self._timeout, **kwargs)

    # --- watch thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        """List, then watch from the list's resourceVersion; relist only when the server says 410 Gone."""
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._stream(version)
                self._check_pending()
                failures = 0
            except ApiException as e:
                if e.status == GONE:  # raised while iterating the stream: our version was compacted away
                    log.info("watching Jobs: resourceVersion expired (410 Gone); relisting")
                    version = None
                    continue
                failures += 1
                LAUNCHER_ERRORS.labels("watch").inc()
                log.warning("watching Jobs failed (HTTP %s: %s); retrying", e.status, e.reason)
            except (urllib3.exceptions.HTTPError, CustomDiffError) as e:
                if self._stop.is_set():
                    break  # close() cut the stream
                failures += 1
                LAUNCHER_ERRORS.labels("watch").inc()
                log.warning("watching Jobs failed (%s); retrying", e)
            except Exception:  # e.g. an object the client cannot parse: the watch thread must live on
                failures += 1
                LAUNCHER_ERRORS.labels("watch").inc()
                log.exception("watching Jobs failed; relisting")
                version = None
            self._stop.wait(backoff(failures - 1) if failures else 0)

    def _relist(self) -> str:
        # Only Jobs created before the list was asked for can be missing from it because they were deleted.
        with self._lock:
            expected = {job_id: t for job_id, t in self._jobs.items() if t.created}
        listed = self._list("list Jobs", self._batch.list_namespaced_job, instance_selector(self._settings.instance))
        for job in listed.get("items") or []:
            expected.pop(job["metadata"].get("labels", {}).get(LABEL_JOB_ID), None)
            self._on_job(job)
        for job_id, tracked in expected.items():  # deleted while we were not watching
            with self._lock:
                cancelled = job_id in self._cancelled
            if not cancelled and outcome_from_work_dir(tracked.work_dir)[0] is LaunchState.SUCCEEDED:
                self._emit(job_id, LaunchState.SUCCEEDED, f"Job {tracked.name} finished and was removed")
            else:
                self._on_job({"metadata": {"name": tracked.name, "labels": {LABEL_JOB_ID: job_id}}}, deleted=True)
        return listed["metadata"]["resourceVersion"]

    def _stream(self, version: str) -> str:
        """Follow Job events from `version` until the server ends the watch; returns the last version seen."""
        watcher = watch.Watch()
        self._watcher = watcher
        timeout = self._settings.watch_timeout_seconds
        events = watcher.stream(self._batch.list_namespaced_job, self._settings.namespace,
                                label_selector=instance_selector(self._settings.instance),
                                resource_version=version, allow_watch_bookmarks=True, timeout_seconds=timeout,
                                _request_timeout=(self._timeout[0], timeout + self._timeout[1]))
        for event in events:
            obj = event["raw_object"]
            version = obj.get("metadata", {}).get("resourceVersion") or version
            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                self._on_job(obj, deleted=event["type"] == "DELETED")
            if self._stop.is_set():
                watcher.stop()
        return version

    def _check_pending(self) -> None:
        """Pods stuck in image pulls or scheduling do not change their Job: look at them now and then."""
        with self._lock:
            pending = [(job_id, t.job_message) for job_id, t in self._jobs.items()
                       if t.created and not t.suspended and t.last and t.last[0] is LaunchState.PENDING]
        for job_id, message in pending:
            problems = self._pod_problems(job_id)
            if problems:
                self._emit(job_id, LaunchState.PENDING, f"{message}; {problems}")

    def _on_job(self, job: dict[str, Any], deleted: bool = False) -> None:
        job_id = job["metadata"].get("labels", {}).get(LABEL_JOB_ID, "")
        with self._lock:
            tracked = self._jobs.get(job_id)
            if tracked is None:
                return  # not launched or reattached by this service
            cancel_requested = job_id in self._cancelled
            state, message = job_state(job, deleted=deleted, cancel_requested=cancel_requested)
            tracked.job_message = message
            suspended = tracked.suspended = job_suspended(job)
        waiting = state is LaunchState.PENDING and not suspended  # a suspended Job has no pods to blame
        if (state is LaunchState.FAILED or waiting) and not deleted:
            problems = self._pod_problems(job_id)
            message = f"{message}; {problems}" if problems else message
        self._emit(job_id, state, message)

    def _emit(self, job_id: str, state: LaunchState, message: str) -> None:
        """Deliver a state change once; after a terminal state nothing more is reported for the job."""
        with self._lock:
            tracked = self._jobs.get(job_id)
            if tracked is None or (tracked.last and tracked.last[0].terminal) or tracked.last == (state, message):
                return
            tracked.last = (state, message)
            listeners = list(self._listeners)
        event = LaunchEvent(job_id, state, message)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not kill the watch thread
                log.exception("launch event listener failed for %s", event)
