"""The Helm chart: lint, render, validate every manifest, and hold it to the code it configures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
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
DASHBOARD = ROOT / "deploy" / "grafana" / "customdiff.json"
SERVICES = ("trainer", "merger", "inference")


def helm_binary() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.fail("helm not found in .tools/bin or on PATH: run `make install`")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def render(values: Path | list[Path] | None = None, *sets: str) -> list[dict]:
    args = ["template", "cd", str(CHART), "--namespace", NS]
    for path in [values] if isinstance(values, Path) else values or []:
        args += ["-f", str(path)]
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


def test_external_database_url_comes_from_a_secret_and_lets_every_component_scale_out():
    replicas = [f"{c}.replicas=3" for c in COMPONENTS]
    docs = render(None, "database.url=postgresql+psycopg://u:p@db:5432/cd", *replicas)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert "database_url" not in find(docs, "ConfigMap")[0]["data"]["config.yaml"]
    [secret] = find(docs, "Secret")
    assert secret["stringData"]["database-url"] == "postgresql+psycopg://u:p@db:5432/cd"
    deployments = {component(d): d["spec"] for d in find(docs, "Deployment")}
    assert {name: spec["replicas"] for name, spec in deployments.items()} == {c: 3 for c in COMPONENTS}
    for name in SERVICES:  # trainer and merger replicas share their jobs through leases: pods may overlap
        assert deployments[name]["strategy"]["type"] == "RollingUpdate", name
        [container] = deployments[name]["template"]["spec"]["containers"]
        assert {"name": "CUSTOMDIFF_DATABASE_URL", "valueFrom": {"secretKeyRef": {
            "name": "cd-customdiff-secrets", "key": "database-url"}}} in container["env"]
    assert {component(d): d["spec"]["strategy"]["type"] for d in find(render(), "Deployment")
            if component(d) in SERVICES} == {c: "Recreate" for c in SERVICES}  # one SQLite writer at a time
    # SQLite allows one replica of each service; Triton keeps no registry.
    output = helm_fails(*replicas)
    for name in SERVICES:
        assert (f"- {name}.replicas: SQLite (database.url empty) allows 1 replica, got 3; "
                "set database.url to a PostgreSQL URL") in output
    assert "triton.replicas" not in output


NO_PVC = ("database.url=postgresql+psycopg://u:p@db:5432/cd", "store.url=s3://ml/customdiff",
          "store.workDirUrl=s3://ml/customdiff-jobs", "store.envFromSecret=customdiff-s3",
          "persistence.enabled=false", "baseModel.existingClaim=sd-base")


def test_without_persistence_no_pod_mounts_a_data_volume_and_jobs_live_on_the_object_store():
    lint = helm("lint", "--strict", str(CHART), *(arg for item in NO_PVC for arg in ("--set", item)))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(None, *NO_PVC)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert not find(docs, "PersistentVolumeClaim")
    base_claim = {"name": "base-model", "persistentVolumeClaim": {"claimName": "sd-base", "readOnly": True}}
    for name, (_, spec, container) in pods(docs).items():
        # The read-only base model is the only claim left (ReadOnlyMany will do).
        assert [v for v in spec["volumes"] if "persistentVolumeClaim" in v] == [base_claim], name
        assert "data" not in {m["name"] for m in container["volumeMounts"]}, name
        # Every pod reads the store, Triton included.
        assert container["envFrom"] == [{"secretRef": {"name": "customdiff-s3"}}], name
    settings = settings_of(docs)
    assert (settings.work_dir, settings.store_url, settings.kubernetes.store_pvc) == (
        "s3://ml/customdiff-jobs", "s3://ml/customdiff", "")
    work = f"{settings.work_dir}/x"
    job = build_job(LaunchRequest("9" * 32, "alice/dog", f"{work}/spec.json", work, gpus_per_node=8, nodes=2),
                    settings.kubernetes)
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert [v for v in pod["volumes"] if "persistentVolumeClaim" in v] == [base_claim]
    assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "customdiff-s3"}}]


def test_without_persistence_sqlite_local_paths_and_the_tiny_base_are_refused():
    output = helm_fails("persistence.enabled=false", "store.url=/data/store")
    assert ("- persistence.enabled: false leaves SQLite no volume; set database.url (or "
            "database.existingSecret) to a PostgreSQL URL") in output
    assert ("- persistence.enabled: false needs store.url to be an object-store URL such as "
            's3://bucket/customdiff, got "/data/store"') in output
    assert ("- persistence.enabled: false needs store.workDirUrl, an object-store URL for job directories "
            "such as s3://bucket/customdiff-jobs") in output
    output = helm_fails("store.workDirUrl=s3://ml/jobs")
    assert ("- store.workDirUrl: training pods must mount the base model; set baseModel.existingClaim (the "
            "tiny test base is built beside local job directories only)") in output
    assert "store.workDirUrl: Does not match pattern" in helm_fails("store.workDirUrl=/var/jobs", schema=True)
    assert "persistence.enabled: Invalid type" in helm_fails("persistence.enabled=no", schema=True)


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


# --- Observability: metrics ports, ServiceMonitors, tracing, logs, Triton autoscaling, the dashboard ---

# kubernetes-validate knows no CRDs: the fields of monitoring.coreos.com/v1 ServiceMonitor the chart
# renders, as the Prometheus Operator's CRD types them (the interval pattern is the CRD's Duration).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "labels"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                    "maxLength": 63},
                           "labels": _LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _LABELS,
                        "matchExpressions": {"type": "array", "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["key", "operator"],
                            "properties": {"key": {"type": "string"},
                                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                           "values": {"type": "array", "items": {"type": "string"}}},
                        }},
                    },
                },
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["port"],
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": _DURATION},
                    },
                }},
            },
        },
    },
}

# Every metric the services and the Triton model export (docs/operations.md); the dashboard may use no other.
DOCUMENTED_METRICS = frozenset({
    # gRPC servers (trainer, merger, inference); histograms are named without _bucket/_sum/_count.
    "grpc_server_handled_total", "grpc_server_started_total", "grpc_server_handling_seconds",
    "grpc_server_in_flight_rpcs",
    # Jobs, training, quotas, the inference front.
    "customdiff_jobs", "customdiff_job_duration_seconds", "customdiff_training_loss",
    "customdiff_training_steps_per_second", "customdiff_launcher_errors_total",
    "customdiff_quota_rejections_total", "customdiff_generate_deadline_exceeded_total",
    "customdiff_triton_request_seconds",
    # The Triton model: concept cache, batches, queueing, generation.
    "customdiff_concept_cache_hits_total", "customdiff_concept_cache_misses_total",
    "customdiff_concept_cache_evictions_total", "customdiff_concept_cache_bytes",
    "customdiff_concept_load_seconds", "customdiff_concept_merge_seconds", "customdiff_batch_images",
    "customdiff_batch_concepts",
    "customdiff_queue_seconds", "customdiff_generation_seconds",
    # Merger and registry.
    "customdiff_merge_seconds", "customdiff_compress_seconds", "customdiff_merge_residual",
    "customdiff_merge_drift", "customdiff_stored_bytes", "customdiff_concepts",
})
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right"}


def validate_manifest(doc: dict) -> None:
    """Strict Kubernetes validation; ServiceMonitors, a CRD kubernetes-validate lacks, against the schema above."""
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector matches `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def ports(docs: list[dict], kind: str) -> dict[str, dict[str, int]]:
    """Component -> port name -> port number, of each Service (port) or Deployment's container (containerPort)."""
    if kind == "Service":
        return {component(d): {p["name"]: p["port"] for p in d["spec"]["ports"]} for d in find(docs, kind)}
    return {component(d): {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])} for d in find(docs, kind)}


def test_service_monitors_select_the_chart_services_by_ports_they_have():
    assert not find(render(), "ServiceMonitor")
    docs = render(None, "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=kps",
                  "metrics.serviceMonitor.interval=15s")
    monitors = {m["metadata"]["name"]: m for m in find(docs, "ServiceMonitor")}
    assert sorted(monitors) == ["cd-customdiff-services", "cd-customdiff-triton"]
    expected = {"cd-customdiff-services": set(SERVICES), "cd-customdiff-triton": {"triton"}}
    for name, monitor in monitors.items():
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
        assert monitor["metadata"]["labels"]["release"] == "kps"
        selector = monitor["spec"]["selector"]
        selected = [s for s in find(docs, "Service") if selects(selector, s["metadata"]["labels"])]
        assert {component(s) for s in selected} == expected[name]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["interval"] == "15s" and endpoint["path"] == "/metrics"
            for service in selected:  # the port name exists on every Service the monitor picks
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]
    # Without the services' endpoint only Triton's (port 8002, Triton's own and the model's metrics) is left.
    docs = render(None, "metrics.serviceMonitor.enabled=true", "metrics.enabled=false")
    assert [m["metadata"]["name"] for m in find(docs, "ServiceMonitor")] == ["cd-customdiff-triton"]


@pytest.mark.parametrize("values", VALUE_FILES)
def test_observability_manifests_validate_strictly(values):
    docs = render(values, "metrics.serviceMonitor.enabled=true", "triton.autoscaling.enabled=true",
                  "tracing.otlpEndpoint=otel-collector.observability:4317")
    for doc in docs:
        validate_manifest(doc)
    assert len(find(docs, "ServiceMonitor")) == 2
    assert {component(h) for h in find(docs, "HorizontalPodAutoscaler")} == ({"inference", "triton"} if values
                                                                             else {"triton"})
    with pytest.raises(jsonschema.ValidationError):  # the hand-written schema does reject a broken monitor
        validate_manifest({**find(docs, "ServiceMonitor")[0], "spec": {"endpoints": [{"port": "metrics"}]}})


def test_metrics_port_reaches_the_config_the_containers_the_services_and_the_network_policy():
    docs = render()
    assert settings_of(docs).metrics_port == 9090
    assert "\nmetrics_port: 9090\n" in find(docs, "ConfigMap")[0]["data"]["config.yaml"]
    containers, services = ports(docs, "Deployment"), ports(docs, "Service")
    for name in SERVICES:
        assert containers[name]["metrics"] == services[name]["metrics"] == 9090
    assert containers["triton"]["metrics"] == services["triton"]["metrics"] == 8002
    [triton] = find(docs, "Deployment", "cd-customdiff-triton")
    assert "--metrics-port=8002" in triton["spec"]["template"]["spec"]["containers"][0]["args"]
    [policy] = [p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-services")]
    assert {"ports": [{"port": 9090, "protocol": "TCP"}]} in policy["spec"]["ingress"]  # scrapers, from anywhere

    docs = render(None, "metrics.enabled=false", "metrics.port=9999")
    assert settings_of(docs).metrics_port == 0
    containers, services = ports(docs, "Deployment"), ports(docs, "Service")
    for name in SERVICES:
        assert "metrics" not in containers[name] and "metrics" not in services[name]
    assert services["triton"]["metrics"] == 8002  # Triton serves its metrics whatever metrics.enabled says
    [policy] = [p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-services")]
    assert 9999 not in {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}

    clash = helm("template", "cd", str(CHART), "--set", "metrics.port=50053")
    assert clash.returncode != 0
    assert "- metrics.port: 50053 is also inference.port; give /metrics its own port" in clash.stderr


def test_tracing_endpoint_and_log_format_reach_the_config_and_triton():
    def triton_env(docs: list[dict]) -> dict[str, str]:
        [triton] = find(docs, "Deployment", "cd-customdiff-triton")
        return {e["name"]: e.get("value") for e in triton["spec"]["template"]["spec"]["containers"][0]["env"]}

    docs = render()
    settings = settings_of(docs)
    assert (settings.otlp_endpoint, settings.log_format) == ("", "json")
    assert "CUSTOMDIFF_OTLP_ENDPOINT" not in triton_env(docs)

    docs = render(None, "tracing.otlpEndpoint=x:4317", "logFormat=text")
    settings = settings_of(docs)
    assert (settings.otlp_endpoint, settings.log_format) == ("x:4317", "text")
    assert triton_env(docs)["CUSTOMDIFF_OTLP_ENDPOINT"] == "x:4317"

    for command in (("template", "cd", str(CHART)), ("lint", "--strict", str(CHART))):
        bad = helm(*command, "--set", "logFormat=yaml")
        assert bad.returncode != 0
        assert 'logFormat must be one of the following: "json", "text"' in bad.stdout + bad.stderr


def test_triton_autoscaler_targets_the_triton_deployment_with_a_pods_metric():
    assert not find(render(), "HorizontalPodAutoscaler")
    docs = render(None, "fullnameOverride=gen", "triton.autoscaling.enabled=true",
                  "triton.autoscaling.maxReplicas=6", "triton.autoscaling.targetAverageValue=500m")
    [hpa] = find(docs, "HorizontalPodAutoscaler")
    [triton] = [d for d in find(docs, "Deployment") if component(d) == "triton"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": triton["metadata"]["name"]}
    assert triton["metadata"]["name"] == "gen-triton"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    target = {"type": "AverageValue", "averageValue": "500m"}
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "customdiff_queue_seconds"},
                                                               "target": target}}]
    assert "replicas" not in triton["spec"]  # the autoscaler owns it; a rollout must not reset it
    kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)

    bad = helm("template", "cd", str(CHART), "--set", "triton.autoscaling.enabled=true",
               "--set", "triton.autoscaling.minReplicas=5")
    assert bad.returncode != 0 and "- triton.autoscaling: minReplicas 5 is above maxReplicas 4" in bad.stderr


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names inside {...} or by/without/on/ignoring(...), strings, ranges or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return {name for name, call in re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", expr)
            if not call and name not in PROMQL_KEYWORDS}


def _documented(name: str) -> str | None:
    """The documented metric `name` is, or a histogram series of (_bucket, _sum, _count); else None."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name if name in DOCUMENTED_METRICS else base if base in DOCUMENTED_METRICS else None


def test_grafana_dashboard_queries_only_documented_metrics_through_its_datasource():
    assert _metric_names('histogram_quantile(0.95, sum by (le, pod) (rate(a_bucket{x=~"$v", y!="z"}[5m]))) '
                         '/ ignoring(pod) b + on() vector(1)') == {"a_bucket", "b"}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", [])) if p["type"] != "row"]
    assert len({p["id"] for p in panels}) == len(panels) > 20
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        exprs = [target.get("expr", "") for target in panel["targets"]]
        assert exprs and all(e.strip() for e in exprs), panel["title"]
        for expr in exprs:
            names = _metric_names(expr)
            assert names, expr
            assert {n for n in names if not _documented(n)} == set(), f"{panel['title']}: {expr}"
            used |= {_documented(n) for n in names}
            assert set(re.findall(r"\$(\w+)", expr)) <= set(variables), expr
    query = variables["namespace"]["query"]["query"]
    used |= {_documented(n) for n in re.findall(r"label_values\((\w+)", query)}
    assert used == DOCUMENTED_METRICS  # and every documented metric has its place on the dashboard


# --- Backend ergonomics: pod options of every component, gRPC from outside, mTLS, the ONNX repository ---

COMPONENTS = (*SERVICES, "triton")
PROTO = ROOT / "proto" / "customdiffusion" / "v1"
SELECTOR_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
POD_OPTIONS = ("podAnnotations", "podLabels", "extraEnv", "extraEnvFrom", "extraVolumes", "extraVolumeMounts",
               "runtimeClassName", "priorityClassName", "topologySpreadConstraints")
NEW_VALUES = (*(f"{c}.{o}" for c in COMPONENTS for o in POD_OPTIONS), "tls.clientCaSecret", "tls.clientCaKey",
              "triton.modelRepository", "triton.onnxRepositoryPath", "ingress.enabled", "ingress.className",
              "ingress.annotations", "ingress.hosts", "ingress.tlsSecret", "gatewayApi.enabled",
              "gatewayApi.parentRefs", "gatewayApi.hostnames")

# kubernetes-validate knows no Gateway API: the fields of gateway.networking.k8s.io/v1 GRPCRoute the chart
# renders, typed and patterned as the Gateway API v1.3 CRD types them (its CEL rules as JSON Schema).
_DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
GRPC_ROUTE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "GRPCRoute"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["parentRefs", "rules"],
            "properties": {
                "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "group": {"type": "string", "maxLength": 253, "pattern": f"^$|{_DNS_SUBDOMAIN}"},
                        "kind": {"type": "string", "maxLength": 63, "pattern": "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
                        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "sectionName": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
                        "port": _PORT,
                    },
                }},
                "hostnames": {"type": "array", "maxItems": 16, "items": {
                    "type": "string", "minLength": 1, "maxLength": 253,
                    "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}},
                "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matches", "backendRefs"],
                    "properties": {
                        "matches": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["method"],
                            "properties": {"method": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["service"],
                                "properties": {
                                    "type": {"enum": ["Exact", "RegularExpression"]},
                                    "service": {"type": "string", "maxLength": 1024,
                                                "pattern": r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$"},
                                    "method": {"type": "string", "maxLength": 1024,
                                               "pattern": "^[A-Za-z_][A-Za-z_0-9]*$"},
                                },
                            }},
                        }},
                        "backendRefs": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "port"],  # a Service backend must name its port
                            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 253},
                                           "port": _PORT,
                                           "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                        }},
                    },
                }},
            },
        },
    },
}
_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "GRPCRoute": GRPC_ROUTE_SCHEMA}


def validate_any(doc: dict) -> None:
    """validate_manifest, and GRPCRoutes (a CRD kubernetes-validate lacks) against GRPC_ROUTE_SCHEMA."""
    if doc["kind"] in _SCHEMAS:
        jsonschema.validate(doc, _SCHEMAS[doc["kind"]])
    else:
        validate_manifest(doc)


def pod_options(component: str) -> dict:
    """Every pod option, with values that tell the components apart."""
    return {
        "podAnnotations": {"example.com/owner": f"{component}-team"},
        "podLabels": {"example.com/team": component},
        "extraEnv": [{"name": "EXTRA_COMPONENT", "value": component},
                     {"name": "EXTRA_TOKEN", "valueFrom": {"secretKeyRef": {"name": "extra", "key": component}}}],
        "extraEnvFrom": [{"configMapRef": {"name": f"{component}-env"}},
                         {"secretRef": {"name": "shared-env", "optional": True}, "prefix": "SHARED_"}],
        "extraVolumes": [{"name": "extra-files", "configMap": {"name": f"{component}-files"}}],
        "extraVolumeMounts": [{"name": "extra-files", "mountPath": "/etc/extra", "readOnly": True}],
        "runtimeClassName": "nvidia" if component == "triton" else "gvisor",
        "priorityClassName": f"{component}-priority",
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
            {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
             "labelSelector": {"matchLabels": {"example.com/team": component}},
             "matchLabelKeys": ["pod-template-hash"]}],
    }


# Every value the backend-ergonomics change added, set (tests check it against values.yaml's defaults).
EVERY_NEW_VALUE = {
    **{component: pod_options(component) for component in SERVICES},
    "triton": {**pod_options("triton"), "modelRepository": "onnx", "onnxRepositoryPath": "exports/sd15-onnx"},
    "baseModel": {"existingClaim": "sd-base-models", "path": "stable-diffusion-v1-5"},
    "tls": {"existingSecret": "customdiff-tls", "clientCaSecret": "customdiff-client-ca",
            "clientCaKey": "clients.pem"},
    "ingress": {"enabled": True, "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPCS"},
                "hosts": ["customdiff.example.com", "gen.example.com"], "tlsSecret": "customdiff-public-tls"},
    "gatewayApi": {"enabled": True, "hostnames": ["customdiff.example.com"],
                   "parentRefs": [{"name": "shared", "namespace": "gateway", "sectionName": "grpc"}]},
}


@pytest.fixture
def every_new_value(tmp_path: Path) -> Path:
    path = tmp_path / "every-new-value.yaml"
    path.write_text(yaml.safe_dump(EVERY_NEW_VALUE))
    return path


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def pods(docs: list[dict]) -> dict[str, tuple[dict, dict, dict]]:
    """Component -> (pod template metadata, pod spec, main container) of each Deployment."""
    out = {}
    for deployment in find(docs, "Deployment"):
        name, template = component(deployment), deployment["spec"]["template"]
        [container] = [c for c in template["spec"]["containers"] if c["name"] == name]
        out[name] = (template["metadata"], template["spec"], container)
    return out


def helm_fails(*sets: str, schema: bool = False) -> str:
    """helm template refuses `sets`, and so does helm lint --strict where the schema does (lint only logs a
    template's `fail`); the output of both."""
    args = [a for s in sets for a in ("--set", s)]
    template, lint = helm("template", "cd", str(CHART), *args), helm("lint", "--strict", str(CHART), *args)
    assert template.returncode != 0, sets
    assert lint.returncode != 0 or not schema, sets
    return template.stderr + lint.stdout + lint.stderr


@pytest.mark.parametrize("values", VALUE_FILES)
def test_every_new_value_renders_and_every_manifest_validates_strictly(every_new_value, values):
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted in NEW_VALUES:  # the file sets every new value, none to its default
        assert _lookup(EVERY_NEW_VALUE, dotted) != _lookup(defaults, dotted), dotted
    files = [values, every_new_value] if values else [every_new_value]
    lint = helm("lint", "--strict", str(CHART), *(arg for f in files for arg in ("-f", str(f))))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(files)
    for doc in docs:
        validate_any(doc)
    assert len(find(docs, "Ingress")) == len(find(docs, "GRPCRoute")) == 1
    assert sorted(pods(docs)) == sorted(COMPONENTS)
    [route] = find(docs, "GRPCRoute")
    with pytest.raises(jsonschema.ValidationError):  # the hand-written schema does reject a broken route
        validate_any({**route, "spec": {**route["spec"], "rules": [{"backendRefs": [{"name": "x"}]}]}})


def test_pod_options_reach_each_component_pod_spec(every_new_value):
    docs = render(every_new_value)
    for name, (metadata, spec, container) in pods(docs).items():
        expected = pod_options(name)
        assert metadata["annotations"].items() >= expected["podAnnotations"].items()
        assert metadata["labels"]["example.com/team"] == name
        env = container["env"]
        assert env[-2:] == expected["extraEnv"]  # after the chart's, so a same-named one wins
        assert "HOME" in {e["name"] for e in env[:-2]}
        assert container["envFrom"] == expected["extraEnvFrom"]
        assert spec["volumes"][-1] == expected["extraVolumes"][0]
        assert {v["name"] for v in spec["volumes"][:-1]} >= {"data", "tmp"}  # the chart's are still there
        assert container["volumeMounts"][-1] == expected["extraVolumeMounts"][0]
        assert (spec["runtimeClassName"], spec["priorityClassName"]) == (
            expected["runtimeClassName"], expected["priorityClassName"])
        zone, host = spec["topologySpreadConstraints"]
        # Without a labelSelector a constraint counts this component's pods, as the Deployment selects them.
        deployment = next(d for d in find(docs, "Deployment") if component(d) == name)
        assert zone == {**expected["topologySpreadConstraints"][0],
                        "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}
        assert host == expected["topologySpreadConstraints"][1]  # an explicit labelSelector is kept
    # store.envFromSecret stays first in envFrom, extraEnvFrom after it.
    docs = render(every_new_value, "store.envFromSecret=customdiff-s3")
    for name, (_, _, container) in pods(docs).items():
        assert container["envFrom"] == [{"secretRef": {"name": "customdiff-s3"}}, *pod_options(name)["extraEnvFrom"]]


def test_new_values_are_accepted_and_misspelled_or_misshapen_ones_rejected_by_the_schema():
    docs = render(None, "trainer.extraEnv[0].name=X", "trainer.extraEnv[0].value=1x",
                  "triton.runtimeClassName=nvidia")
    assert {"name": "X", "value": "1x"} in pods(docs)["trainer"][2]["env"]
    assert pods(docs)["triton"][1]["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pods(render())["triton"][1]
    for sets, message in (
        (["trainer.extraEnvv[0].name=X"], "trainer: Additional property extraEnvv is not allowed"),
        (["triton.runtimeClasName=nvidia"], "triton: Additional property runtimeClasName is not allowed"),
        (["ingress.hostz={a.example.com}"], "ingress: Additional property hostz is not allowed"),
        (["merger.extraEnv[0].value=x"], "merger.extraEnv.0: name is required"),
        (["merger.extraEnv[0].name=X", "merger.extraEnv[0].valu=x"],
         "merger.extraEnv.0: Additional property valu is not allowed"),
        (["inference.extraVolumeMounts[0].name=x"], "inference.extraVolumeMounts.0: mountPath is required"),
        (["triton.topologySpreadConstraints[0].maxSkew=1"], "topologySpreadConstraints.0: topologyKey is required"),
        (["trainer.runtimeClassName=Not_A_Name"], "trainer.runtimeClassName: Does not match pattern"),
        (["triton.modelRepository=tensorrt"], 'triton.modelRepository must be one of the following: "torch", "onnx"'),
        (["trainer.extraEnv[0].name=X", "trainer.extraEnv[0].value=1"],  # --set makes 1 a number: --set-string
         "trainer.extraEnv.0.value: Invalid type. Expected: string, given: integer"),
    ):
        assert message in helm_fails(*sets, schema=True), sets


def test_pod_labels_cannot_change_what_the_chart_selects():
    docs = render(None, *(f"{c}.podLabels.team=ml" for c in COMPONENTS))
    services = {component(s): s for s in find(docs, "Service")}
    for name, (metadata, _, _) in pods(docs).items():
        deployment = next(d for d in find(docs, "Deployment") if component(d) == name)
        assert metadata["labels"]["team"] == "ml"
        assert selects(deployment["spec"]["selector"], metadata["labels"])
        assert selects({"matchLabels": services[name]["spec"]["selector"]}, metadata["labels"])
    for key in SELECTOR_KEYS:
        escaped = key.replace(".", r"\.")
        output = helm_fails(*(f"{c}.podLabels.{escaped}=other" for c in COMPONENTS))
        for name in COMPONENTS:
            assert f"- {name}.podLabels: {key} is one of the chart's selector labels; pick another key" in output
    # Nor may an extra volume take a name the chart's pods use.
    output = helm_fails("merger.extraVolumes[0].name=tmp", "merger.extraVolumes[0].emptyDir.medium=Memory")
    assert "- merger.extraVolumes: the chart names a volume tmp already; rename yours" in output


def test_model_repository_onnx_serves_the_exported_repository_on_the_base_model_claim():
    def triton_args(*sets: str) -> list[str]:
        [container] = [c for c in pods(render(None, *sets))["triton"][1]["containers"] if c["name"] == "triton"]
        if "baseModel.existingClaim=sd-base-models" in sets:  # the claim the repository is read from
            assert {"name": "base-model", "mountPath": "/models/base", "readOnly": True} in container["volumeMounts"]
        return container["args"]

    # torch (default): the repository Dockerfile.triton copies into the image, with its GPU config.
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.triton").read_text()
    [image_repository] = re.findall(r"^COPY deploy/triton/model_repository (\S+)$", dockerfile, flags=re.MULTILINE)
    assert triton_args()[:2] == [f"--model-repository={image_repository}", "--model-config-name=gpu"]
    # onnx: deploy/triton/model_repository_onnx as exported onto the base model claim (docs/deploy.md step 9).
    assert (ROOT / "deploy" / "triton" / "model_repository_onnx" / "stable_diffusion" / "config.pbtxt").exists()
    args = triton_args("triton.modelRepository=onnx", "baseModel.existingClaim=sd-base-models")
    assert args[0] == "--model-repository=/models/base/repository-onnx"
    assert not [a for a in args if a.startswith("--model-config-name")]  # gpu.pbtxt is the torch model's
    args = triton_args("triton.modelRepository=onnx", "baseModel.existingClaim=sd", "baseModel.mountPath=/m",
                       "triton.onnxRepositoryPath=exports/onnx/")
    assert args[0] == "--model-repository=/m/exports/onnx"
    output = helm_fails("triton.modelRepository=onnx")
    assert ("- triton.modelRepository: onnx reads the exported repository from baseModel.existingClaim; "
            "set it") in output
    assert "triton.onnxRepositoryPath: Does not match pattern" in helm_fails(
        "triton.modelRepository=onnx", "baseModel.existingClaim=sd", "triton.onnxRepositoryPath=/abs", schema=True)


def test_triton_compose_reaches_the_model_and_onnx_refuses_merge():
    def triton_env(*sets: str) -> dict[str, str]:
        [container] = [c for c in pods(render(None, *sets))["triton"][1]["containers"] if c["name"] == "triton"]
        return {e["name"]: e.get("value") for e in container["env"]}

    assert "CUSTOMDIFF_COMPOSE" not in triton_env()  # config.pbtxt's compose ("sum")
    assert triton_env("triton.compose=merge")["CUSTOMDIFF_COMPOSE"] == "merge"
    assert "- triton.compose: merge runs the torch text encoder" in helm_fails(
        "triton.modelRepository=onnx", "baseModel.existingClaim=sd", "triton.compose=merge")
    assert "triton.compose" in helm_fails("triton.compose=average", schema=True)


def test_mtls_mounts_the_client_ca_renders_tls_client_ca_file_and_keeps_probes_on_tcp():
    docs = render(None, "tls.existingSecret=customdiff-tls", "tls.clientCaSecret=customdiff-client-ca")
    settings = settings_of(docs)  # Settings accepts it: the CA comes with the services' own key pair
    assert settings.tls_client_ca_file == "/etc/customdiff/client-ca/ca.crt"
    assert settings.tls_cert_file == "/etc/customdiff/tls/tls.crt"
    ports = {"trainer": settings.trainer_port, "merger": settings.merger_port, "inference": settings.inference_port}
    for name, (_, spec, container) in pods(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        if name == "triton":  # Triton serves only the inference service, not clients
            assert "client-ca" not in volumes
            continue
        assert volumes["client-ca"] == {"name": "client-ca", "secret": {
            "secretName": "customdiff-client-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
        assert mounts["/etc/customdiff/client-ca"] == "client-ca"
        # The kubelet's probes present no client certificate: TCP connects, not gRPC health checks.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["tcpSocket"] == {"port": ports[name]}
            assert "grpc" not in container[probe]
    docs = render(None, "tls.existingSecret=t", "tls.clientCaSecret=ca", "tls.clientCaKey=clients.pem")
    assert settings_of(docs).tls_client_ca_file == "/etc/customdiff/client-ca/clients.pem"
    assert "tls_client_ca_file" not in find(render(None, "tls.existingSecret=t"), "ConfigMap")[0]["data"]["config.yaml"]
    assert ("- tls.clientCaSecret: mTLS needs the services' own key pair; set tls.existingSecret too"
            in helm_fails("tls.clientCaSecret=ca"))


def _proto_services() -> set[str]:
    """Every gRPC service the protos define, as package.Service."""
    found = set()
    for proto in PROTO.glob("*.proto"):
        text = proto.read_text()
        [package] = re.findall(r"^package ([\w.]+);", text, flags=re.MULTILINE)
        found |= {f"{package}.{s}" for s in re.findall(r"^service (\w+) \{", text, flags=re.MULTILINE)}
    return found


def test_ingress_and_grpc_route_send_each_grpc_service_to_a_service_grpc_port():
    assert not find(render(), "Ingress") and not find(render(), "GRPCRoute")
    docs = render(None, "ingress.enabled=true", "ingress.hosts={a.example.com,b.example.com}",
                  "ingress.tlsSecret=public-tls", "ingress.className=nginx", "gatewayApi.enabled=true",
                  "gatewayApi.parentRefs[0].name=shared", "gatewayApi.parentRefs[0].namespace=gateway")
    grpc_ports = {s["metadata"]["name"]: next(p["port"] for p in s["spec"]["ports"] if p["name"] == "grpc")
                  for s in find(docs, "Service")}
    expected = {f"customdiffusion.v1.{s}Service": f"cd-customdiff-{s.lower()}" for s in ("Trainer", "Merger",
                                                                                           "Inference")}
    expected["customdiffusion.v1.ConceptService"] = "cd-customdiff-inference"  # on every server
    assert set(expected) == _proto_services()

    [ingress] = find(docs, "Ingress")
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "public-tls", "hosts": ["a.example.com", "b.example.com"]}]
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == ["a.example.com", "b.example.com"]
    for rule in ingress["spec"]["rules"]:
        routed = {}
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix"
            backend = path["backend"]["service"]
            assert backend["port"]["number"] == grpc_ports[backend["name"]]
            routed[path["path"].removeprefix("/")] = backend["name"]
        assert routed == expected

    [route] = find(docs, "GRPCRoute")
    jsonschema.validate(route, GRPC_ROUTE_SCHEMA)
    assert route["spec"]["parentRefs"] == [{"name": "shared", "namespace": "gateway"}]
    routed = {}
    for rule in route["spec"]["rules"]:
        [match], [backend] = rule["matches"], rule["backendRefs"]
        assert match["method"]["type"] == "Exact" and backend["port"] == grpc_ports[backend["name"]]
        routed[match["method"]["service"]] = backend["name"]
    assert routed == expected

    # No hosts: one rule for any host. Ports follow the values.
    [ingress] = find(render(None, "ingress.enabled=true", "trainer.port=6000"), "Ingress")
    [rule] = ingress["spec"]["rules"]
    assert "host" not in rule and "tls" not in ingress["spec"]
    assert rule["http"]["paths"][0]["backend"]["service"]["port"]["number"] == 6000
    # Combinations that cannot work.
    assert ("- gatewayApi.enabled: needs gatewayApi.parentRefs, the Gateway the GRPCRoute attaches to"
            in helm_fails("gatewayApi.enabled=true"))
    assert "set nginx.ingress.kubernetes.io/backend-protocol to GRPCS" in helm_fails(
        "ingress.enabled=true", "tls.existingSecret=t")
    docs = render(None, "ingress.enabled=true", "tls.existingSecret=t",
                  r"ingress.annotations.nginx\.ingress\.kubernetes\.io/backend-protocol=GRPCS")
    [ingress] = find(docs, "Ingress")
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/backend-protocol": "GRPCS"}


def test_the_triton_service_is_headless_and_the_inference_config_names_it():
    docs = render()
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-triton")]
    assert service["spec"]["clusterIP"] == "None"
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["triton_url"] == f"{service['metadata']['name']}:8001"


def test_kueue_queue_and_tenant_priority_classes_reach_the_config_and_the_jobs():
    docs = render(None, "trainer.jobs.kueue.queueName=gpu-training", "trainer.jobs.priorityClassName=training",
                  "trainer.jobs.tenantPriorityClasses.acme=training-high")
    kube = settings_of(docs).kubernetes
    assert (kube.queue_name, kube.priority_class_name, kube.tenant_priority_classes) == (
        "gpu-training", "training", {"acme": "training-high"})
    for tenant, priority_class in (("acme", "training-high"), ("bob", "training")):
        request = LaunchRequest("9" * 32, "alice/dog", f"{kube.store_mount_path}/x/spec.json",
                                f"{kube.store_mount_path}/x", gpus_per_node=8, nodes=2, tenant=tenant)
        job = build_job(request, kube)
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
        assert job["spec"]["suspend"] is True
        assert job["spec"]["template"]["spec"]["priorityClassName"] == priority_class
    defaults = settings_of(render()).kubernetes
    assert (defaults.queue_name, defaults.priority_class_name, defaults.tenant_priority_classes) == ("", "", {})
    for sets, message in (
        (["trainer.jobs.kueue.queueName=GPU_Queue"], "trainer.jobs.kueue.queueName: Does not match pattern"),
        (["trainer.jobs.kueue.queue=gpu"], "trainer.jobs.kueue: Additional property queue is not allowed"),
        (["trainer.jobs.tenantPriorityClasses.acme=High"],
         "trainer.jobs.tenantPriorityClasses.acme: Does not match pattern"),
    ):
        assert message in helm_fails(*sets, schema=True), sets
