"""The Kubernetes launcher, driven through the official client against a fake API server on loopback."""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
from kubernetes import client

from concepts.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from services.common.settings import KubernetesSettings, Settings
from services.trainer.launcher import LaunchRequest, LaunchState
from services.trainer.launchers.job_manifest import (
    CHECK_CONTAINER,
    EXIT_BAD_SPEC,
    MAX_NAME_LEN,
    build_job,
    job_labels,
    job_name,
)
from services.trainer.launchers.kubernetes import RBAC_RULES, KubernetesJobLauncher
from tests.fake_kube_api import Events, FakeKubeApi

KUBE_VERSION = "1.30"
NS = "training"
SETTINGS = KubernetesSettings(
    namespace=NS, image="registry.example.com/customdiff-trainer:0.1.0", base_model_pvc="sd-base",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    resources={"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
    image_pull_secrets=["regcred"], env_from_secrets=["store-credentials"], shm_size="32Gi",
    watch_timeout_seconds=2, request_timeout_seconds=5, api_retries=3)
ONE_NODE = LaunchRequest("0a" * 16, "alice/My Dog", "/var/lib/customdiff/jobs/0a/spec.json",
                         "/var/lib/customdiff/jobs/0a", gpus_per_node=4, nodes=1)
THREE_NODES = LaunchRequest("0b" * 16, "bob/cat+dog", "/var/lib/customdiff/jobs/0b/spec.json",
                            "/var/lib/customdiff/jobs/0b", gpus_per_node=8, nodes=3)


@pytest.fixture()
def fake():
    api = FakeKubeApi()
    yield api
    api.close()


@pytest.fixture()
def make_launcher(fake):
    made: list[KubernetesJobLauncher] = []

    def make(settings: KubernetesSettings = SETTINGS, host: str | None = None):
        sleeps: list[float] = []
        configuration = client.Configuration()
        configuration.host = host or fake.url
        api = client.ApiClient(configuration)
        launcher = KubernetesJobLauncher(client.BatchV1Api(api), client.CoreV1Api(api), settings,
                                         sleep=sleeps.append)
        made.append(launcher)
        return launcher, sleeps

    yield make
    for launcher in made:
        launcher.close()


def sent(fake: FakeKubeApi, resource: str) -> list[dict]:
    return [r.body for r in fake.requests if r.method == "POST" and r.resource == resource]


def pod(request: LaunchRequest, suffix: str, status: dict) -> dict:
    name = job_name(request.job_id, request.concept_id)
    labels = {**job_labels(request, SETTINGS), "batch.kubernetes.io/job-name": name}
    return {"metadata": {"name": f"{name}-{suffix}", "labels": labels},
            "spec": {"containers": [{"name": "trainer", "image": SETTINGS.image}]}, "status": status}


def test_one_node_job_has_the_designed_spec_and_validates(fake, make_launcher):
    launcher, _ = make_launcher()
    launcher.launch(ONE_NODE)

    [job] = sent(fake, "jobs")
    assert sent(fake, "services") == []
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    name = job["metadata"]["name"]
    assert name == f"cd-alice-my-dog-{ONE_NODE.job_id}" and len(name) <= MAX_NAME_LEN
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/name": "customdiff", "app.kubernetes.io/instance": "customdiff",
        "app.kubernetes.io/component": "training-job", "app.kubernetes.io/managed-by": "customdiff-trainer",
        "customdiff.io/job-id": ONE_NODE.job_id, "customdiff.io/concept": "alice-My-Dog"}
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (2, 21600, 86400)
    assert "completionMode" not in spec
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "check-spec", "operator": "In",
                                              "values": [EXIT_BAD_SPEC]}}]
    pod_spec = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["serviceAccountName"] == "customdiff-trainer"
    assert pod_spec["securityContext"]["runAsNonRoot"] is True and pod_spec["securityContext"]["runAsUser"] == 1000
    assert pod_spec["nodeSelector"] == SETTINGS.node_selector and pod_spec["tolerations"] == SETTINGS.tolerations
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["volumes"] == [
        {"name": "store", "persistentVolumeClaim": {"claimName": "customdiff-store"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
        {"name": "base-model", "persistentVolumeClaim": {"claimName": "sd-base", "readOnly": True}}]
    [trainer] = pod_spec["containers"]
    assert trainer["command"] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "trainer", "--spec",
                                  ONE_NODE.spec_path]
    assert trainer["image"] == SETTINGS.image and trainer["workingDir"] == ONE_NODE.work_dir
    assert trainer["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                                    "limits": {"memory": "64Gi", "nvidia.com/gpu": "4"}}
    assert {m["mountPath"] for m in trainer["volumeMounts"]} == {"/var/lib/customdiff", "/dev/shm", "/models/base"}
    assert trainer["envFrom"] == [{"secretRef": {"name": "store-credentials"}}]
    [check] = pod_spec["initContainers"]
    assert check["command"] == ["python", "-m", "services.trainer.launchers.check_spec", ONE_NODE.spec_path]
    assert "nvidia.com/gpu" not in check["resources"].get("limits", {})


@pytest.mark.parametrize("request_", [ONE_NODE, THREE_NODES], ids=["one-node", "three-nodes"])
def test_a_retried_pod_resumes_from_the_checkpoint_of_the_pod_that_died(request_):
    """backoffLimit reruns a dead trainer in a new pod; it resumes only if it sees `<work_dir>/checkpoint/`."""
    spec = build_job(request_, SETTINGS)["spec"]
    pod_spec = spec["template"]["spec"]
    assert spec["backoffLimit"] >= 1 and pod_spec["restartPolicy"] == "Never"  # each retry is a new pod
    # Only an invalid spec (check-spec exits 2) fails the Job at once; a trainer that dies is retried.
    assert [r["onExitCodes"]["containerName"] for r in spec["podFailurePolicy"]["rules"]
            if r["action"] == "FailJob"] == [CHECK_CONTAINER]
    [trainer] = pod_spec["containers"]
    assert trainer["workingDir"] == request_.work_dir
    # The deepest mount holding the work dir is the writable store PVC, shared by every pod and retry.
    holding = [m for m in trainer["volumeMounts"] if PurePosixPath(request_.work_dir).is_relative_to(m["mountPath"])]
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert volume == {"name": "store", "persistentVolumeClaim": {"claimName": SETTINGS.store_pvc}}
    assert not mount.get("readOnly")
    assert KubernetesJobLauncher.retries_itself  # so the service does not resume the job a second time


@pytest.mark.parametrize("nodes", [1, 3], ids=["one-node", "three-nodes"])
def test_a_job_directory_on_s3_needs_no_pvc_and_is_copied_to_an_empty_dir(fake, make_launcher, nodes):
    settings = dataclasses.replace(SETTINGS, store_pvc="", base_model_pvc="")
    request = LaunchRequest("0d" * 16, "carol/dog", "s3://bucket/jobs/0d/spec.json", "s3://bucket/jobs/0d",
                            gpus_per_node=2, nodes=nodes)
    launcher, _ = make_launcher(settings)
    launcher.launch(request)

    [job] = sent(fake, "jobs")
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
                                   {"name": "scratch", "emptyDir": {}}]
    [check], [trainer] = pod_spec["initContainers"], pod_spec["containers"]
    for container in (check, trainer):  # both copy the job directory down, with the store's credentials
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"},
                                             {"name": "scratch", "mountPath": "/scratch"}]
        assert {"name": "CUSTOMDIFF_SCRATCH_DIR", "value": "/scratch"} in container["env"]
        assert container["envFrom"] == [{"secretRef": {"name": "store-credentials"}}]
        assert container["workingDir"] == "/scratch"  # a URL is no directory to start in
    assert check["command"] == ["python", "-m", "services.trainer.launchers.check_spec", request.spec_path]
    assert trainer["command"][-3:] == ["trainer", "--spec", "s3://bucket/jobs/0d/spec.json"]
    # Without the store volume a local job directory would be invisible to the pods: refused up front.
    with pytest.raises(FailedPrecondition, match="kubernetes.store_pvc is empty"):
        build_job(ONE_NODE, settings)


def test_multi_node_indexed_job_and_headless_service_validate(fake, make_launcher):
    launcher, _ = make_launcher()
    launcher.launch(THREE_NODES)

    [job], [service] = sent(fake, "jobs"), sent(fake, "services")
    for manifest in (job, service):
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
    name = job["metadata"]["name"]
    spec, pod_spec = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert pod_spec["subdomain"] == name == service["metadata"]["name"]
    [trainer] = pod_spec["containers"]
    assert trainer["command"] == [
        "torchrun", "--nnodes=3", "--nproc_per_node=8", "--node_rank=$(JOB_COMPLETION_INDEX)",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={name}-0.{name}:29500", f"--rdzv_id={THREE_NODES.job_id}",
        "-m", "trainer", "--spec", THREE_NODES.spec_path]
    assert {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}} in trainer["env"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]
    [created_job] = fake.objects("jobs")
    assert service["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                       "uid": created_job["metadata"]["uid"]}]


def container(name: str, state: dict, **more) -> dict:
    """A container status with the fields the API server always sets."""
    return {"name": name, "image": SETTINGS.image, "imageID": "", "ready": False, "restartCount": 0,
            "state": state, **more}


FAILED = {"type": "Failed", "status": "True"}
RUNNING_STATUS = {"active": 1, "ready": 1}
OOM_POD = {"phase": "Failed", "containerStatuses": [container("trainer", {"terminated": {
    "exitCode": 137, "reason": "OOMKilled"}})]}
PULL_POD = {"phase": "Pending", "containerStatuses": [container("trainer", {"waiting": {
    "reason": "ImagePullBackOff",
    "message": 'Back-off pulling image "registry.example.com/customdiff-trainer:0.1.0"'}})]}
UNSCHEDULABLE_POD = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                         "reason": "Unschedulable",
                                                         "message": "0/4 nodes are available: 4 Insufficient "
                                                                    "nvidia.com/gpu."}]}
BAD_SPEC_POD = {"phase": "Failed", "initContainerStatuses": [container("check-spec", {"terminated": {
    "exitCode": 2, "reason": "Error",
    "message": "Traceback skipped\ninvalid job spec /x/spec.json: concepts[0].images: needs at least one image"}})]}


@pytest.mark.parametrize("steps, states, needles", [
    pytest.param([("status", RUNNING_STATUS),
                  ("status", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})],
                 ["pending", "running", "succeeded"], ["completed"], id="running-then-succeeded"),
    pytest.param([("status", RUNNING_STATUS), ("pod", OOM_POD),
                  ("status", {"failed": 3, "conditions": [{**FAILED, "reason": "BackoffLimitExceeded",
                                                           "message": "Job has reached the specified backoff limit"}]})],
                 ["pending", "running", "failed"], ["BackoffLimitExceeded", "OOMKilled (exit code 137)"], id="oomkilled"),
    pytest.param([("pod", PULL_POD), ("status", {"active": 1, "ready": 0})],
                 ["pending", "pending"], ["ImagePullBackOff", "Back-off pulling image"], id="image-pull-backoff"),
    pytest.param([("pod", UNSCHEDULABLE_POD), ("status", {"active": 1, "ready": 0})],
                 ["pending", "pending"], ["Unschedulable", "Insufficient nvidia.com/gpu"], id="unschedulable"),
    pytest.param([("status", RUNNING_STATUS),
                  ("status", {"conditions": [{**FAILED, "reason": "DeadlineExceeded",
                                              "message": "Job was active longer than specified deadline"}]})],
                 ["pending", "running", "failed"], ["DeadlineExceeded", "activeDeadlineSeconds"], id="deadline"),
    pytest.param([("pod", BAD_SPEC_POD),
                  ("status", {"failed": 1, "conditions": [{**FAILED, "reason": "PodFailurePolicy", "message":
                                                           "Container check-spec failed with exit code 2"}]})],
                 ["pending", "failed"], ["exit code 2", "concepts[0].images: needs at least one image"], id="bad-spec"),
    pytest.param([("status", RUNNING_STATUS), ("delete", None)],
                 ["pending", "running", "failed"], ["deleted before it finished, not by customdiff"],
                 id="deleted-by-someone-else"),
])
def test_watch_reports_each_state_change_with_reasons(fake, make_launcher, steps, states, needles):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(ONE_NODE)
    name = job_name(ONE_NODE.job_id, ONE_NODE.concept_id)
    events.wait_for(lambda e: e.state is LaunchState.PENDING)
    for kind, value in steps:
        if kind == "pod":
            fake.add_pod(NS, pod(ONE_NODE, "x1", value))
        elif kind == "status":
            fake.set_job_status(NS, name, value)
        else:
            fake.delete_now("jobs", NS, name)

    events.wait_for(lambda e: len(events.items) == len(states) and all(n in e.message for n in needles))
    assert [e.state.value for e in events.items] == states
    assert {e.job_id for e in events.items} == {ONE_NODE.job_id}


def test_pods_stuck_without_a_job_change_are_reported_after_the_watch_cycle(fake, make_launcher):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(ONE_NODE)
    fake.set_job_status(NS, job_name(ONE_NODE.job_id, ONE_NODE.concept_id), {"active": 1, "ready": 0})
    events.wait_for(lambda e: e.message == "1 of 1 pods starting")
    fake.add_pod(NS, pod(ONE_NODE, "x1", PULL_POD))  # changes a Pod, not the Job
    fake.end_watches()
    event = events.wait_for(lambda e: "ImagePullBackOff" in e.message)
    assert event.state is LaunchState.PENDING and event.message.startswith("1 of 1 pods starting; pod cd-")


def test_410_gone_during_the_watch_relists_and_continues(fake, make_launcher):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(ONE_NODE)
    events.wait_for(lambda e: e.state is LaunchState.PENDING)
    seen = len(fake.requests)

    expired_at = fake.expire()  # the open stream gets ERROR 410; versions up to here are Gone
    fake.set_job_status(NS, job_name(ONE_NODE.job_id, ONE_NODE.concept_id), RUNNING_STATUS)

    events.wait_for(lambda e: e.state is LaunchState.RUNNING)  # seen only through the relist
    relist = next(r for r in fake.requests[seen:] if r.verb == "list" and r.resource == "jobs")
    resumed = fake.wait_for_requests(lambda r: r.verb == "watch" and int(r.query["resourceVersion"]) > expired_at)
    assert relist.query["labelSelector"].startswith("app.kubernetes.io/name=customdiff")
    assert resumed[0].query["allowWatchBookmarks"] == "true"
    assert resumed[0].query["timeoutSeconds"] == str(SETTINGS.watch_timeout_seconds)


def test_watch_resumes_from_the_last_bookmark(fake, make_launcher):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(ONE_NODE)
    events.wait_for(lambda e: e.state is LaunchState.PENDING)
    fake.wait_for_requests(lambda r: r.verb == "watch")
    version = fake.bookmark()
    # The bookmark is delivered before the stream ends; the next watch starts from it, without a relist.
    fake.end_watches()
    [resumed] = fake.wait_for_requests(lambda r: r.verb == "watch" and r.query.get("resourceVersion") == version)
    lists = [r for r in fake.requests if r.verb == "list" and r.resource == "jobs"]
    assert len(lists) == 1 and resumed.query["allowWatchBookmarks"] == "true"


def test_cancel_deletes_the_job_in_the_foreground_and_its_service_goes_with_it(fake, make_launcher):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(THREE_NODES)
    events.wait_for(lambda e: e.state is LaunchState.PENDING)
    launcher.cancel(THREE_NODES.job_id)

    [delete] = [r for r in fake.requests if r.method == "DELETE"]
    assert (delete.resource, delete.name) == ("jobs", job_name(THREE_NODES.job_id, THREE_NODES.concept_id))
    assert delete.query["propagationPolicy"] == "Foreground"
    assert fake.objects("jobs") == [] and fake.objects("services") == []
    event = events.wait_for(lambda e: e.state is LaunchState.CANCELLED)
    assert "cancelled by the user" in event.message
    assert [e.state for e in events.items][-1] is LaunchState.CANCELLED


def test_cancel_of_a_job_already_gone_is_not_an_error(fake, make_launcher):
    launcher, _ = make_launcher()
    launcher.launch(ONE_NODE)
    fake.delete_now("jobs", NS, job_name(ONE_NODE.job_id, ONE_NODE.concept_id))
    launcher.cancel(ONE_NODE.job_id)
    assert [(r.method, r.status) for r in fake.requests if r.method == "DELETE"] == [("DELETE", 404)]


@pytest.mark.parametrize("status, headers, times, sleeps, error", [
    (503, {"Retry-After": "3"}, 2, [3.0, 3.0], None),
    (429, {"Retry-After": "1"}, 1, [1.0], None),
    (500, {}, 2, [0.5, 1.0], None),
    (503, {}, 4, [0.5, 1.0, 2.0], Unavailable),  # api_retries=3: four attempts, then give up
    (403, {}, 1, [], PermissionDenied),
    (422, {}, 1, [], FailedPrecondition),
])
def test_only_transient_api_errors_are_retried_honouring_retry_after(fake, make_launcher, status, headers, times,
                                                                     sleeps, error):
    launcher, slept = make_launcher()
    fake.fail("POST", "jobs", status, times=times, headers=headers)
    if error:
        with pytest.raises(error, match=f"create Job cd-alice-my-dog-{ONE_NODE.job_id} in namespace training: "
                                        f"HTTP {status}"):
            launcher.launch(ONE_NODE)
    else:
        launcher.launch(ONE_NODE)
        assert len(fake.objects("jobs")) == 1
    assert slept == sleeps
    assert len(sent(fake, "jobs")) == len(sleeps) + 1


def test_a_service_that_cannot_be_created_takes_its_job_back(fake, make_launcher):
    launcher, _ = make_launcher()
    fake.fail("POST", "services", 403)
    with pytest.raises(PermissionDenied, match="create Service cd-bob-cat-dog-0b.* HTTP 403.*Role allow it"):
        launcher.launch(THREE_NODES)
    assert [(r.method, r.resource, r.status) for r in fake.requests if r.method != "GET"] == [
        ("POST", "jobs", 201), ("POST", "services", 403), ("DELETE", "jobs", 200)]
    assert fake.objects("jobs") == []


def test_unreachable_api_server_is_unavailable_after_retries(make_launcher):
    launcher, slept = make_launcher(host="http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(Unavailable, match="create Job"):
        launcher.launch(ONE_NODE)
    assert slept == [0.5, 1.0, 2.0]


def test_a_repeated_launch_adopts_the_existing_job(fake, make_launcher):
    launcher, _ = make_launcher()
    launcher.launch(THREE_NODES)
    launcher.launch(THREE_NODES)
    assert [r.status for r in fake.requests if r.method == "POST"] == [201, 201, 409, 409]
    assert len(fake.objects("jobs")) == 1 and len(fake.objects("services")) == 1


def test_reattach_follows_a_job_launched_before_a_restart(fake, make_launcher):
    before, _ = make_launcher()
    before.launch(ONE_NODE)
    before.close()
    name = job_name(ONE_NODE.job_id, ONE_NODE.concept_id)
    fake.set_job_status(NS, name, RUNNING_STATUS)

    after, _ = make_launcher()
    events = Events()
    after.watch(events)
    assert after.reattach(ONE_NODE.job_id, ONE_NODE.work_dir)[0] is LaunchState.RUNNING
    fake.set_job_status(NS, name, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    events.wait_for(lambda e: e.state is LaunchState.SUCCEEDED)
    assert [e.state for e in events.items] == [LaunchState.SUCCEEDED]  # RUNNING was returned, not re-sent


@pytest.mark.parametrize("result, state, message", [
    (True, LaunchState.SUCCEEDED, "finished and was removed"),  # removed by ttlSecondsAfterFinished
    (False, LaunchState.FAILED, "was deleted before it finished, not by customdiff"),
])
def test_a_job_that_vanished_while_unwatched_is_judged_on_relist(fake, make_launcher, tmp_path, result, state,
                                                                 message):
    request = LaunchRequest(ONE_NODE.job_id, ONE_NODE.concept_id, ONE_NODE.spec_path, str(tmp_path), 1, 1)
    before, _ = make_launcher()
    before.launch(request)
    fake.set_job_status(NS, job_name(request.job_id, request.concept_id), RUNNING_STATUS)
    after, _ = make_launcher()
    assert after.reattach(request.job_id, str(tmp_path))[0] is LaunchState.RUNNING
    fake.delete_now("jobs", NS, job_name(request.job_id, request.concept_id))
    if result:
        (tmp_path / "result.json").write_text("{}")
    events = Events()
    after.watch(events)
    event = events.wait_for(lambda e: e.state.terminal)
    assert event.state is state and message in event.message


@pytest.mark.parametrize("files, state", [
    ({"result.json": "{}", "progress.jsonl": ""}, LaunchState.SUCCEEDED),
    ({"progress.jsonl": '{"event": "error", "message": "CUDA error"}\n'}, LaunchState.FAILED),
    ({}, LaunchState.PENDING),  # never created: the caller launches it again
])
def test_reattach_without_a_job_judges_by_the_work_dir(make_launcher, tmp_path, files, state):
    launcher, _ = make_launcher()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert launcher.reattach("0c" * 16, str(tmp_path))[0] is state


def test_rbac_rules_are_exactly_the_calls_the_launcher_makes(fake, make_launcher, tmp_path):
    launcher, _ = make_launcher()
    events = Events()
    launcher.watch(events)
    launcher.launch(THREE_NODES)
    events.wait_for(lambda e: e.state is LaunchState.PENDING)  # list, watch and pod listing happened
    launcher.reattach(ONE_NODE.job_id, str(tmp_path))
    launcher.cancel(THREE_NODES.job_id)
    events.wait_for(lambda e: e.state is LaunchState.CANCELLED)
    granted = {(group, resource, verb) for (group, resource), verbs in RBAC_RULES.items() for verb in verbs}
    assert fake.verbs() == granted


# --- Kueue and per-tenant priority -------------------------------------------------------------

QUEUE = "gpu-training"
KUEUE_SETTINGS = dataclasses.replace(SETTINGS, queue_name=QUEUE, priority_class_name="training",
                                     tenant_priority_classes={"acme": "training-high", "trial": ""})
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SUSPENDED = {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                             "message": "Job suspended"}]}


@pytest.mark.parametrize("request_", [ONE_NODE, THREE_NODES], ids=["one-node", "three-nodes"])
def test_kueue_jobs_are_created_suspended_with_the_queue_label_and_validate(fake, make_launcher, request_):
    launcher, _ = make_launcher(KUEUE_SETTINGS)
    launcher.launch(request_)

    [job] = sent(fake, "jobs")
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][KUEUE_LABEL] == QUEUE
    # Kueue manages the Job, not its pods: the pod template (and the Service's selector) stay as they were.
    assert job["spec"]["template"]["metadata"]["labels"] == job_labels(request_, KUEUE_SETTINGS)
    if request_.nodes > 1:  # the headless Service exists before admission, so rendezvous DNS is ready
        [service] = sent(fake, "services")
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)
        assert KUEUE_LABEL not in service["metadata"]["labels"]
        assert service["metadata"]["ownerReferences"][0]["uid"] == fake.objects("jobs")[0]["metadata"]["uid"]
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 3
    without = build_job(request_, SETTINGS)
    assert "suspend" not in without["spec"] and KUEUE_LABEL not in without["metadata"]["labels"]


def test_a_kueue_job_is_pending_until_admitted_then_runs_and_succeeds(fake, make_launcher):
    launcher, _ = make_launcher(KUEUE_SETTINGS)
    events = Events()
    launcher.watch(events)
    launcher.launch(THREE_NODES)
    name = job_name(THREE_NODES.job_id, THREE_NODES.concept_id)
    waiting = f"Job {name} is waiting for Kueue to admit it in queue {QUEUE}"
    events.wait_for(lambda e: e.message == waiting)
    fake.set_job_status(NS, name, SUSPENDED)  # the Job controller marks it; nothing new to report
    earlier = fake.wait_for_requests(lambda r: r.verb == "watch")
    fake.end_watches()  # a full watch cycle: the pods of a suspended Job are not looked for
    fake.wait_for_requests(lambda r: r.verb == "watch" and all(r is not w for w in earlier))
    admitted_at = len(fake.requests)

    kueue = client.BatchV1Api(client.ApiClient(client.Configuration(host=fake.url)))
    kueue.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # Kueue admits the workload
    events.wait_for(lambda e: e.message == "waiting for pods to be created")
    fake.set_job_status(NS, name, {"active": 3, "ready": 3, "conditions": [
        {"type": "Suspended", "status": "False", "reason": "JobResumed", "message": "Job resumed"}]})
    events.wait_for(lambda e: e.state is LaunchState.RUNNING)
    fake.set_job_status(NS, name, {"succeeded": 3, "conditions": [{"type": "Complete", "status": "True"}]})
    events.wait_for(lambda e: e.state is LaunchState.SUCCEEDED)

    assert [(e.state, e.message) for e in events.items] == [
        (LaunchState.PENDING, waiting), (LaunchState.PENDING, "waiting for pods to be created"),
        (LaunchState.RUNNING, "3 of 3 pods running"), (LaunchState.SUCCEEDED, f"Job {name} completed")]
    assert not [r for r in fake.requests[:admitted_at] if r.resource == "pods"]
    [patch] = [r for r in fake.requests if r.method == "PATCH"]
    launcher_calls = fake.verbs() - {("batch", "jobs", "patch")}  # the patch was Kueue's, not the launcher's
    assert patch.status == 200 and launcher_calls <= {(g, r, v) for (g, r), vs in RBAC_RULES.items() for v in vs}


def test_training_pods_get_their_tenants_priority_class(fake, make_launcher):
    launcher, _ = make_launcher(KUEUE_SETTINGS)
    for i, tenant in enumerate(("acme", "bob", "trial", "")):
        launcher.launch(dataclasses.replace(ONE_NODE, job_id=f"{i:032x}", tenant=tenant))

    jobs = sent(fake, "jobs")
    for job in jobs:
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    classes = [j["spec"]["template"]["spec"].get("priorityClassName") for j in jobs]
    assert classes == ["training-high", "training", None, "training"]  # "trial" opts out of the default
    assert "priorityClassName" not in build_job(ONE_NODE, SETTINGS)["spec"]["template"]["spec"]


@pytest.mark.parametrize("kubernetes, field", [
    ({"queue_name": "GPU_Queue"}, "kubernetes.queue_name"),
    ({"queue_name": "q" * 64}, "kubernetes.queue_name"),
    ({"priority_class_name": "High Priority"}, "kubernetes.priority_class_name"),
    ({"tenant_priority_classes": {"acme": "-high"}}, "kubernetes.tenant_priority_classes.acme"),
])
def test_kueue_queue_and_priority_class_names_are_checked_at_load(kubernetes, field):
    with pytest.raises(InvalidArgument) as raised:
        Settings.from_dict({"kubernetes": kubernetes})
    assert raised.value.field == field


def test_the_store_pvc_is_optional_but_when_set_needs_a_mount_path():
    settings = Settings.from_dict({"kubernetes": {"store_pvc": "", "store_mount_path": ""}})
    assert settings.kubernetes.store_pvc == ""
    with pytest.raises(InvalidArgument) as raised:
        Settings.from_dict({"kubernetes": {"store_mount_path": ""}})
    assert raised.value.field == "kubernetes.store_mount_path"
