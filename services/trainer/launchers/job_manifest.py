"""Pure builders of a training Job (and, across nodes, its headless Service) as Kubernetes API dicts.

G GPUs on one node: a `batch/v1` Job with one pod running `torchrun --standalone --nproc_per_node=G`.
N nodes: an Indexed Job (one pod per completion index) plus a headless Service that gives pod 0 a
stable DNS name, `<job>-0.<job>`, for torchrun's c10d rendezvous. With a Kueue queue configured the
Job is created suspended and labelled with the queue; Kueue starts it by unsuspending it, and the
Service (not a Kueue workload) is created at once either way. A job directory on an object store
(``s3://...``) needs no shared volume: the pods copy it to an emptyDir scratch volume and mirror their
outputs back (`concepts.jobdir.JobMirror`), so the store PVC is then optional. Nothing here talks to
a cluster.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from concepts.errors import FailedPrecondition, InvalidArgument
from concepts.jobdir import SCRATCH_ENV, is_remote
from services.common.settings import KubernetesSettings
from services.trainer.launcher import LaunchRequest

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_ID = "customdiff.io/job-id"
LABEL_CONCEPT = "customdiff.io/concept"
# Kueue's batch/v1 Job integration manages exactly the Jobs with this label (on the Job, not its pods).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
APP = "customdiff"
COMPONENT = "training-job"
CONTAINER = "trainer"
CHECK_CONTAINER = "check-spec"
# `python -m services.trainer.launchers.check_spec` exits with this when the spec is invalid; the Job's
# podFailurePolicy then fails the Job at once instead of retrying a spec that can never work.
EXIT_BAD_SPEC = 2
GPU_RESOURCE = "nvidia.com/gpu"
# The emptyDir a pod copies a remote job directory to (and runs in).
SCRATCH_DIR = "/scratch"
# Indexed pods are named `<job>-<index>` and their hostname must fit a 63-character DNS label.
MAX_NAME_LEN = 52
_JOB_ID = re.compile(r"^[a-z0-9]{1,32}$")
_COMPLETION_INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def label_value(text: str) -> str:
    """`text` as a valid label value: at most 63 of [A-Za-z0-9_.-], starting and ending alphanumeric."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def job_name(job_id: str, concept_id: str) -> str:
    """`cd-<concept slug>-<job_id>`, at most MAX_NAME_LEN characters; the job id keeps it unique.

    Raises:
        InvalidArgument: `job_id` is not 1-32 lower-case alphanumerics.
    """
    if not _JOB_ID.match(job_id):
        raise InvalidArgument("job_id", f"must be 1-32 lower-case letters or digits, got {job_id!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", concept_id.lower()).strip("-")
    room = MAX_NAME_LEN - len("cd-") - len(job_id) - 1
    slug = slug[:room].rstrip("-")
    return f"cd-{slug}-{job_id}" if slug else f"cd-{job_id}"


def instance_selector(instance: str) -> str:
    """Label selector of every training Job (and pod) of one launcher instance."""
    return f"{LABEL_NAME}={APP},{LABEL_COMPONENT}={COMPONENT},{LABEL_INSTANCE}={label_value(instance)}"


def job_selector(instance: str, job_id: str) -> str:
    """Label selector of one job's Job object and pods."""
    return f"{instance_selector(instance)},{LABEL_JOB_ID}={job_id}"


def job_labels(request: LaunchRequest, settings: KubernetesSettings) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        LABEL_INSTANCE: label_value(settings.instance),
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: "customdiff-trainer",
        LABEL_JOB_ID: request.job_id,
        LABEL_CONCEPT: label_value(request.concept_id),
    }


def torchrun_command(request: LaunchRequest, settings: KubernetesSettings, name: str) -> list[str]:
    """The trainer's command line; a CPU-only job runs one process."""
    nproc = max(request.gpus_per_node, 1)
    trainer = ["-m", "trainer", "--spec", request.spec_path]
    if request.nodes == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *trainer]
    # Kubernetes expands $(JOB_COMPLETION_INDEX) from the container's env (set in build_job).
    return ["torchrun", f"--nnodes={request.nodes}", f"--nproc_per_node={nproc}",
            "--node_rank=$(JOB_COMPLETION_INDEX)", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={name}-0.{name}:{settings.rendezvous_port}", f"--rdzv_id={request.job_id}",
            *trainer]


def build_job(request: LaunchRequest, settings: KubernetesSettings) -> dict[str, Any]:
    """The `batch/v1` Job running `request` (Indexed, one pod per node, when `request.nodes` > 1).

    Raises:
        InvalidArgument: `nodes` < 1, `gpus_per_node` < 0, or a bad `job_id`.
        FailedPrecondition: a local work directory without the store PVC that would hold it.
    """
    if not settings.store_pvc and not is_remote(request.work_dir):
        raise FailedPrecondition(f"job directory {request.work_dir} is a local path, but training pods "
                                 "mount no store volume (kubernetes.store_pvc is empty); use an object-store "
                                 "work_dir")
    if request.nodes < 1:
        raise InvalidArgument("nodes", f"must be >= 1, got {request.nodes}")
    if request.gpus_per_node < 0:
        raise InvalidArgument("gpus_per_node", f"must be >= 0, got {request.gpus_per_node}")
    name = job_name(request.job_id, request.concept_id)
    labels = job_labels(request, settings)
    pod = _pod_spec(request, settings, name)
    spec: dict[str, Any] = {
        "backoffLimit": settings.backoff_limit,
        "activeDeadlineSeconds": settings.active_deadline_seconds,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "podFailurePolicy": {"rules": [
            # Preemption, eviction and node drains mark the pod DisruptionTarget: retry without counting.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CHECK_CONTAINER, "operator": "In",
                                                  "values": [EXIT_BAD_SPEC]}},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if request.nodes > 1:
        spec.update(completionMode="Indexed", completions=request.nodes, parallelism=request.nodes)
        pod["subdomain"] = name  # pod hostnames `<job>-<i>` resolve under the headless Service
    metadata_labels = dict(labels)
    if settings.queue_name:
        # Kueue admits a Job by setting suspend to false; created running, it would start before admission.
        metadata_labels[LABEL_KUEUE_QUEUE] = settings.queue_name
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": settings.namespace, "labels": metadata_labels}, "spec": spec}


def build_service(request: LaunchRequest, settings: KubernetesSettings, job_uid: str) -> dict[str, Any]:
    """Headless Service for the rendezvous of a multi-node job, owned by its Job.

    The owner reference lets the garbage collector delete the Service with the Job, whether the
    Job is cancelled or removed by `ttlSecondsAfterFinished`.
    """
    name = job_name(request.job_id, request.concept_id)
    labels = job_labels(request, settings)
    port = settings.rendezvous_port
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                          "uid": job_uid}]},
        "spec": {
            "clusterIP": "None",
            # Rendezvous starts before any pod is Ready; their DNS records must exist already.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_INSTANCE: labels[LABEL_INSTANCE], LABEL_JOB_ID: request.job_id},
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _pod_spec(request: LaunchRequest, settings: KubernetesSettings, name: str) -> dict[str, Any]:
    remote = is_remote(request.work_dir)
    mounts, volumes = _storage(settings, scratch=remote)
    uid = settings.run_as_user
    base_env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "HF_HUB_OFFLINE", "value": "1"}]  # the base model comes from a volume, never a hub
    if remote:  # the check and the trainer copy the job directory there
        base_env.append({"name": SCRATCH_ENV, "value": SCRATCH_DIR})
    env = [*base_env, {"name": "CUSTOMDIFF_JOB_ID", "value": request.job_id},
           *({"name": k, "value": v} for k, v in sorted(request.env.items()))]
    if request.nodes > 1:
        env.append({"name": "JOB_COMPLETION_INDEX",
                    "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX_ANNOTATION}}})
    common = {
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "workingDir": SCRATCH_DIR if remote else request.work_dir,
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # A crash's last log lines become the termination message the launcher reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.env_from_secrets:
        common["envFrom"] = [{"secretRef": {"name": secret}} for secret in settings.env_from_secrets]
    check = {"name": CHECK_CONTAINER, **common, "env": base_env,
             "command": ["python", "-m", "services.trainer.launchers.check_spec", request.spec_path],
             "resources": _resources(settings.resources, gpus=0)}
    trainer = {"name": CONTAINER, **common, "env": env,
               "command": torchrun_command(request, settings, name),
               "resources": _resources(settings.resources, gpus=request.gpus_per_node)}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,  # training never talks to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [check],
        "containers": [trainer],
        "volumes": volumes,
    }
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = copy.deepcopy(settings.tolerations)
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in settings.image_pull_secrets]
    priority_class = settings.priority_class_for(request.tenant)
    if priority_class:  # Kueue takes the workload's priority from it too (no WorkloadPriorityClass label)
        pod["priorityClassName"] = priority_class
    return pod


def _storage(settings: KubernetesSettings,
             scratch: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volume mounts and volumes: the store PVC (unless none is set), /dev/shm, the scratch emptyDir when
    `scratch`, the optional read-only base model PVC."""
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    # DataLoader workers and NCCL exchange tensors through /dev/shm; the 64Mi default is too small.
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}]
    if settings.store_pvc:
        mounts.insert(0, {"name": "store", "mountPath": settings.store_mount_path})
        volumes.insert(0, {"name": "store", "persistentVolumeClaim": {"claimName": settings.store_pvc}})
    if scratch:
        mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})
        volumes.append({"name": "scratch", "emptyDir": {}})
    if settings.base_model_pvc:
        mounts.append({"name": "base-model", "mountPath": settings.base_model_mount_path, "readOnly": True})
        volumes.append({"name": "base-model",
                        "persistentVolumeClaim": {"claimName": settings.base_model_pvc, "readOnly": True}})
    return mounts, volumes


def _resources(configured: dict[str, Any], gpus: int) -> dict[str, Any]:
    """Configured requests/limits plus `nvidia.com/gpu: gpus` (extended resources are set as limits)."""
    resources = copy.deepcopy(configured)
    for section in ("requests", "limits"):
        resources.get(section, {}).pop(GPU_RESOURCE, None)
    if gpus > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    return {k: v for k, v in resources.items() if v}
