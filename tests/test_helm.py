"""The Helm chart: lint, render, validate every manifest, and hold it to the code it configures."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.common.settings import QuotaLimits, Settings
from services.trainer.launcher import LaunchRequest
from services.trainer.launchers.job_manifest import build_job, build_service
from services.trainer.launchers.kubernetes import RBAC_RULES

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "customdiff"
MULTINODE = CHART / "ci" / "multinode-values.yaml"
BAD_VALUES = ROOT / "tests" / "data" / "helm-bad-values.yaml"
KUBE_VERSION = "1.30"
NS = "ml"
VALUE_FILES = [pytest.param(None, id="defaults"), pytest.param(MULTINODE, id="multinode")]


def helm_binary() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.fail("helm not found in .tools/bin or on PATH: run `make install`")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def render(values: Path | None = None, *sets: str) -> list[dict]:
    args = ["template", "cd", str(CHART), "--namespace", NS]
    args += ["-f", str(values)] if values else []
    for item in sets:
        args += ["--set", item]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def settings_of(docs: list[dict]) -> Settings:
    [config_map] = find(docs, "ConfigMap")
    return Settings.from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))


@pytest.mark.parametrize("values", VALUE_FILES)
def test_lint_strict_passes(values):
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_FILES)
def test_every_rendered_manifest_validates_strictly(values):
    docs = render(values)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    expected = {"ConfigMap": 1, "Deployment": 4, "NetworkPolicy": 3, "PersistentVolumeClaim": 1,
                "PodDisruptionBudget": 4, "Role": 1, "RoleBinding": 1, "Service": 4, "ServiceAccount": 2}
    expected.update({"HorizontalPodAutoscaler": 1} if values else {"Secret": 1})
    assert kinds == sorted(k for k, n in expected.items() for _ in range(n))


@pytest.mark.parametrize("values", VALUE_FILES)
def test_launcher_jobs_from_the_chart_config_validate_and_fit_the_chart(values):
    docs = render(values)
    settings = settings_of(docs)
    request = LaunchRequest("9" * 32, "alice/dog", f"{settings.work_dir}/x/spec.json", f"{settings.work_dir}/x",
                            gpus_per_node=8, nodes=4)
    job, service = build_job(request, settings.kubernetes), build_service(request, settings.kubernetes, "uid")
    for manifest in (job, service):
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
    pod = job["spec"]["template"]
    assert job["metadata"]["namespace"] == NS
    assert find(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])
    [store] = [v for v in pod["spec"]["volumes"] if v["name"] == "store"]
    assert find(docs, "PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])
    [training_policy] = [p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-training")]
    assert training_policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    if values:  # the multinode file's secrets, GPU node pool and base model reach the training pods
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert {"name": "base-model", "persistentVolumeClaim": {"claimName": "sd-base-models", "readOnly": True}} \
            in pod["spec"]["volumes"]
        assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "customdiff-s3"}}]


def test_trainer_role_grants_exactly_what_the_launcher_calls():
    docs = render()
    [role], [binding] = find(docs, "Role"), find(docs, "RoleBinding")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {(g, r, v) for (g, r), verbs in RBAC_RULES.items() for v in verbs}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    [subject] = binding["subjects"]
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in find(docs, "Deployment")}
    assert deployments["cd-customdiff-trainer"]["serviceAccountName"] == subject["name"]
    assert deployments["cd-customdiff-trainer"]["automountServiceAccountToken"] is True
    for name in ("cd-customdiff-merger", "cd-customdiff-inference", "cd-customdiff-triton"):
        assert deployments[name]["serviceAccountName"] != subject["name"]
        assert deployments[name]["automountServiceAccountToken"] is False


def test_services_serve_the_config_with_grpc_probes_and_triton_gets_a_gpu():
    docs = render()
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in find(docs, "Deployment")}
    for component, port in (("trainer", 50051), ("merger", 50052), ("inference", 50053)):
        [container] = deployments[f"cd-customdiff-{component}"]["containers"]
        assert container["command"] + container["args"] == [
            "customdiff", "serve", "--config", "/etc/customdiff/config.yaml", "--only", component]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            expected = {"port": port, "service": "liveness"} if probe == "livenessProbe" else {"port": port}
            assert container[probe]["grpc"] == expected
    [triton] = deployments["cd-customdiff-triton"]["containers"]
    assert triton["args"][0] == "--model-repository=/opt/customdiff/model_repository"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in triton["env"]}
    assert (env["CUSTOMDIFF_BASE_MODEL"], env["CUSTOMDIFF_STORE_URL"]) == (
        "/var/lib/customdiff/tiny-base", "/var/lib/customdiff/store")
    assert deployments["cd-customdiff-triton"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert settings_of(docs).triton_url == "cd-customdiff-triton:8001"


def test_tls_switches_probes_to_tcp_and_config_to_the_mounted_key_pair():
    docs = render(None, "tls.existingSecret=customdiff-tls")
    [trainer] = find(docs, "Deployment", "cd-customdiff-trainer")
    [container] = trainer["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": 50051} and "grpc" not in container["readinessProbe"]
    settings = settings_of(docs)
    assert (settings.tls_cert_file, settings.tls_key_file) == ("/etc/customdiff/tls/tls.crt",
                                                               "/etc/customdiff/tls/tls.key")


def test_config_changes_roll_the_pods():
    def checksum(*sets: str) -> str:
        [trainer] = find(render(None, *sets), "Deployment", "cd-customdiff-trainer")
        return trainer["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum() != checksum("config.maxImageBytes=1000")


def test_external_database_url_comes_from_a_secret_not_the_config_map():
    docs = render(None, "database.url=postgresql+psycopg://u:p@db:5432/cd", "inference.replicas=3")
    assert "database_url" not in find(docs, "ConfigMap")[0]["data"]["config.yaml"]
    [secret] = find(docs, "Secret")
    assert secret["stringData"]["database-url"] == "postgresql+psycopg://u:p@db:5432/cd"
    [inference] = find(docs, "Deployment", "cd-customdiff-inference")
    assert inference["spec"]["replicas"] == 3 and inference["spec"]["strategy"]["type"] == "RollingUpdate"
    [container] = inference["spec"]["template"]["spec"]["containers"]
    assert {"name": "CUSTOMDIFF_DATABASE_URL", "valueFrom": {"secretKeyRef": {
        "name": "cd-customdiff-secrets", "key": "database-url"}}} in container["env"]


def test_a_values_file_that_breaks_the_schema_is_rejected_by_lint():
    result = helm("lint", "--strict", str(CHART), "-f", str(BAD_VALUES))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Additional property replicaCount is not allowed" in output
    assert 'trainer.launcher must be one of the following: "kubernetes", "local"' in output
    assert "inference.autoscaling.enabled: Invalid type. Expected: boolean, given: string" in output


def test_validate_values_reports_every_broken_rule_at_once():
    result = helm("template", "cd", str(CHART), "--set", "inference.autoscaling.enabled=true",
                  "--set", "baseModel.init.enabled=true", "--set", "apiKeys.keys.k1=alice",
                  "--set", "apiKeys.existingSecret=keys")
    assert result.returncode != 0
    assert ("- inference.autoscaling.enabled: SQLite (database.url empty) allows 1 replica; "
            "set database.url to a PostgreSQL URL") in result.stderr
    assert "- apiKeys: set keys or existingSecret, not both" in result.stderr
    assert "- baseModel.init.enabled: needs baseModel.existingClaim, the claim the init step fills" in result.stderr
    assert "- baseModel.init.enabled: needs baseModel.init.image and baseModel.init.command" in result.stderr


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths |= _leaves(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return paths


def test_every_value_is_documented_in_values_yaml_and_the_readme():
    text = (CHART / "values.yaml").read_text()
    params = re.findall(r"^\s*## @param (\S+) (.+)$", text, flags=re.MULTILINE)
    documented = [name for name, _ in params]
    leaves = _leaves(yaml.safe_load(text))
    covered = {leaf for leaf in leaves if any(leaf == d or leaf.startswith(f"{d}.") for d in documented)}
    assert leaves == covered, f"values without a ## @param line: {sorted(leaves - covered)}"
    assert not [d for d in documented if d not in leaves and not any(l.startswith(f"{d}.") for l in leaves)]
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| `(.*?)` \|$", readme, flags=re.MULTILINE)
    assert [(name, description) for name, description, _ in rows] == params


def test_quotas_limits_and_shutdown_reach_the_config_and_the_pods():
    docs = render(None, "config.quotas.tenants.acme.storedBytes=0", "config.quotas.tenants.acme.trainingJobs=9",
                  "config.shutdownGraceSeconds=40", "config.rpcLimits.streams=256")
    settings = settings_of(docs)
    assert settings.quotas.for_tenant("acme") == QuotaLimits(stored_bytes=0, training_jobs=9)
    assert settings.quotas.for_tenant("other") == QuotaLimits()
    assert settings.shutdown_grace_s == 40 and settings.rpc_limits.streams == 256
    for deployment in find(docs, "Deployment"):
        if deployment["metadata"]["name"].endswith("triton"):
            continue
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 5 + 40 + 5  # preStop + grace + margin
        [container] = pod["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        assert {container[p]["timeoutSeconds"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {2}
    bad = helm("template", "cd", str(CHART), "--set", "config.quotas.tenants.acme.storedBytes=-1")
    assert bad.returncode != 0 and "storedBytes" in bad.stderr
