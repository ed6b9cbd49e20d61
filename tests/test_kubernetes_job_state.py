"""Pure parts of the Kubernetes launcher: the Job state machine, pod failure reasons, names, check_spec."""

from __future__ import annotations

import json
import re

import pytest

from concepts.errors import InvalidArgument
from services.trainer.launcher import LaunchState
from services.trainer.launchers import check_spec
from services.trainer.launchers.job_manifest import EXIT_BAD_SPEC, MAX_NAME_LEN, job_name, label_value
from services.trainer.launchers.job_state import job_state, pod_problems

RUNNING_STATUS = {"active": 1, "ready": 1}
KUEUE = {"kueue.x-k8s.io/queue-name": "gpu-training"}
SUSPENDED = {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                             "message": "Job suspended"}]}


def container(name: str, state: dict, **more) -> dict:
    """A container status with the fields the API server always sets."""
    return {"name": name, "image": "trainer:1", "imageID": "", "ready": False, "restartCount": 0,
            "state": state, **more}


@pytest.mark.parametrize("job, kwargs, state, needle", [
    ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, {"deleted": True},
     LaunchState.SUCCEEDED, "completed"),  # removed by ttlSecondsAfterFinished: keeps its outcome
    ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, {"cancel_requested": True, "deleted": True},
     LaunchState.CANCELLED, "cancelled by the user"),
    ({"metadata": {"name": "j", "deletionTimestamp": "2025-01-01T00:00:00Z"}, "status": RUNNING_STATUS},
     {"cancel_requested": True}, LaunchState.CANCELLED, "cancelled by the user"),
    ({"status": {"active": 1, "ready": 1}}, {"cancel_requested": True}, LaunchState.RUNNING, "1 of 1 pods running"),
    ({"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]}}, {},
     LaunchState.FAILED, "BackoffLimitExceeded"),
    ({"status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}}, {},
     LaunchState.SUCCEEDED, "completed"),
    ({"status": {"conditions": [{"type": "Failed", "status": "False"}], "active": 1, "ready": 0}}, {},
     LaunchState.PENDING, "1 of 1 pods starting"),
    ({"status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]}}, {},
     LaunchState.PENDING, "suspended (JobSuspended)"),
    ({"spec": {"parallelism": 2}, "status": {"active": 2}}, {}, LaunchState.RUNNING, "2 of 2 pods running"),
    # Kueue: created suspended (no condition yet), then marked Suspended by the Job controller.
    ({"metadata": {"name": "j", "labels": KUEUE}, "spec": {"suspend": True}}, {},
     LaunchState.PENDING, "Job j is waiting for Kueue to admit it in queue gpu-training"),
    ({"metadata": {"name": "j", "labels": KUEUE}, "spec": {"suspend": True}, "status": SUSPENDED}, {},
     LaunchState.PENDING, "Job j is waiting for Kueue to admit it in queue gpu-training"),
    # Admitted: the spec says run, the Suspended condition has not caught up yet.
    ({"metadata": {"name": "j", "labels": KUEUE}, "spec": {"suspend": False}, "status": SUSPENDED}, {},
     LaunchState.PENDING, "waiting for pods to be created"),
    ({"metadata": {"name": "j", "labels": KUEUE}, "spec": {"suspend": False, "parallelism": 3},
      "status": {"active": 3, "ready": 3}}, {}, LaunchState.RUNNING, "3 of 3 pods running"),
    ({"metadata": {"name": "j", "labels": KUEUE}, "spec": {"suspend": True}}, {"cancel_requested": True,
                                                                               "deleted": True},
     LaunchState.CANCELLED, "cancelled by the user"),
    ({"spec": {"suspend": True}}, {}, LaunchState.PENDING, "Job j is suspended (no reason given)"),
    ({}, {}, LaunchState.PENDING, "waiting for pods"),
])
def test_job_state_is_a_pure_function_of_the_job(job, kwargs, state, needle):
    job = {"metadata": {"name": "j"}, **job}
    got, message = job_state(job, **kwargs)
    assert got is state and needle in message


def test_pod_problems_lists_each_problem_once_with_the_message_tail():
    long_message = "\n".join(f"line {i}" for i in range(300)) + "\nValueError: bad learning_rate"
    pods = [{"metadata": {"name": "p1"}, "status": {"reason": "Evicted", "message": "node ran out of memory"}},
            {"metadata": {"name": "p0"}, "status": {"containerStatuses": [container(
                "trainer", {"running": {}}, lastState={"terminated": {"exitCode": 1, "message": long_message}})]}},
            {"metadata": {"name": "p2"}, "status": {"containerStatuses": [container(
                "trainer", {"waiting": {"reason": "ContainerCreating"}})]}}]
    text = pod_problems(pods)
    assert text.startswith("pod p0: container trainer terminated: Error (exit code 1): ...")
    assert text.index("ValueError: bad learning_rate") < text.index("pod p1: Evicted: node ran out of memory")
    assert "p2" not in text and len(text) < 800


@pytest.mark.parametrize("concept", ["a" * 200, "Ünïcode / spaces", "", "--"])
def test_job_names_fit_dns_labels_and_keep_the_job_id(concept):
    name = job_name("f" * 32, concept)
    assert len(name) <= MAX_NAME_LEN and name.endswith("f" * 32)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", label_value(concept))
    assert len(label_value(concept)) <= 63


def test_job_id_must_be_lowercase_alphanumeric():
    with pytest.raises(InvalidArgument, match="job_id: must be 1-32 lower-case letters or digits, got 'Job_1'"):
        job_name("Job_1", "dog")


@pytest.mark.parametrize("content, needle", [
    (None, "No such file"),
    ("{not json", "Expecting property name"),
    (json.dumps({"concepts": [], "surprise": 1}), "surprise"),
])
def test_check_spec_exits_with_the_bad_spec_code(tmp_path, capsys, content, needle):
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    assert check_spec.main([str(path)]) == EXIT_BAD_SPEC
    assert needle in capsys.readouterr().err
