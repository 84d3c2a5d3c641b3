"""The deployment artefacts are valid, agree with each other and with the service.

Everything here runs offline: ``kubectl kustomize`` (or a small renderer below when
kubectl is absent) renders ``deploy/k8s``; ``kubernetes-validate`` holds the Kubernetes
JSON schemas; the CRDs (ServiceMonitor, PrometheusRule, KEDA) are checked against the
schemas written below for the fields this project uses; ``promtool`` checks and
unit-tests the alert rules and parses every dashboard query; ``hadolint`` lints the
Dockerfile, which cannot be built here (no Docker engine), so its shape is checked too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client import CollectorRegistry

from jasper_consumer import __version__
from jasper_consumer.config import parse_settings
from jasper_consumer.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "jasper-consumer.json"
DOCKERFILE = DEPLOY / "Dockerfile"

#: The oldest Kubernetes minor this base supports, and the newest the schemas know.
K8S_VERSIONS = ("1.28", latest_version().rsplit(".", 1)[0])
PLACEHOLDER = "REPLACE_ME"
EXAMPLE_AMQP_URL = "amqp://jasper:secret@rabbitmq:5672/"


# -- tools ---------------------------------------------------------------------------------


def _tool(name: str, env: str) -> str:
    """A tool from $ENV, PATH, .tools/bin (``make`` puts promtool there) or the venv."""
    candidates = [os.environ.get(env), shutil.which(name), REPO / ".tools" / "bin" / name,
                  Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} not found ({env}, PATH, .tools/bin, venv): `make test` installs it")


def _run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


# -- rendering the kustomize base ------------------------------------------------------------


def render_base(directory: Path) -> list[dict[str, Any]]:
    """A small kustomize for this base when kubectl is absent: resources, labels,
    configMapGenerator (files, no hash suffix) and images (newName/newTag)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        docs += [d for d in yaml.safe_load_all((directory / resource).read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})
    for entry in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    images = {i["name"]: i for i in kustomization.get("images", [])}
    for doc in docs:
        for container in _containers(doc):
            image = images.get(container["image"].split(":")[0])
            if image:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != "Deployment":
        return []
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


@cache
def _rendered() -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return tuple(render_base(K8S))
    result = _run(kubectl, "kustomize", K8S)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture
def rendered() -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered()))


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _examples() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]


def _secret_keys() -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
            for s in _examples()}


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]
    return pod


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _pod(docs)["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _config_text(docs: list[dict[str, Any]]) -> str:
    text: str = _one(docs, "ConfigMap")["data"]["config.yaml"]
    return text


def _settings(docs: list[dict[str, Any]]):
    return parse_settings(yaml.safe_load(_config_text(docs)), {"AMQP_URL": EXAMPLE_AMQP_URL})


# -- schemas of the custom resources, for the fields this base uses -------------------------

_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP,
                        "annotations": _STR_MAP}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STR_MAP,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
        "properties": {"key": _STR, "operator": _STR, "values": {"type": "array",
                                                                   "items": _STR}}}}}}
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                        r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                        "properties": {
    "action": _STR, "regex": _STR, "replacement": _STR, "separator": _STR,
    "sourceLabels": {"type": "array", "items": _STR}, "targetLabel": _STR,
    "modulus": {"type": "integer"}}}}


def _crd(spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": _STR, "kind": _STR, "metadata": _META, "spec": spec}}


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd({
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR, "jobLabel": _STR,
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"any": {"type": "boolean"},
                                                 "matchNames": {"type": "array",
                                                                "items": _STR}}},
            "targetLabels": {"type": "array", "items": _STR},
            "podTargetLabels": {"type": "array", "items": _STR},
            "sampleLimit": {"type": "integer", "minimum": 0},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": _STR, "targetPort": {"type": ["string", "integer"]},
                    "path": {"type": "string", "pattern": "^/"},
                    "scheme": {"enum": ["http", "https"]},
                    "interval": _DURATION, "scrapeTimeout": _DURATION,
                    "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                    "relabelings": _RELABEL, "metricRelabelings": _RELABEL}}}}}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd({
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {
                "name": _STR, "interval": _DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {"alert": _STR, "record": _STR,
                                   "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                   "keep_firing_for": _DURATION, "labels": _STR_MAP,
                                   "annotations": _STR_MAP}}}}}}}}),
    ("keda.sh/v1alpha1", "ScaledObject"): _crd({
        "type": "object", "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"],
                               "additionalProperties": False,
                               "properties": {"name": {"type": "string", "minLength": 1},
                                              "kind": _STR, "apiVersion": _STR,
                                              "envSourceContainerName": _STR}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"name": _STR, "behavior": {
                        "type": "object", "additionalProperties": False, "properties": {
                            direction: {"type": "object", "additionalProperties": False,
                                        "properties": {
                                            "stabilizationWindowSeconds": {
                                                "type": "integer", "minimum": 0,
                                                "maximum": 3600},
                                            "selectPolicy": _STR,
                                            "policies": {"type": "array"}}}
                            for direction in ("scaleUp", "scaleDown")}}}}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "minLength": 1}, "name": _STR,
                    "metadata": _STR_MAP, "metricType": _STR,
                    "useCachedMetrics": {"type": "boolean"},
                    "authenticationRef": {
                        "type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": _STR, "kind": {
                            "enum": ["TriggerAuthentication",
                                     "ClusterTriggerAuthentication"]}}}}}}}}),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd({
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {
            "secretTargetRef": {"type": "array", "items": {
                "type": "object", "required": ["parameter", "name", "key"],
                "additionalProperties": False,
                "properties": {"parameter": _STR, "name": _STR, "key": _STR}}},
            "env": {"type": "array", "items": {
                "type": "object", "required": ["parameter", "name"],
                "additionalProperties": False,
                "properties": {"parameter": _STR, "name": _STR, "containerName": _STR}}}}}),
}


def _validate(doc: dict[str, Any], version: str) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


# -- the Kubernetes base ---------------------------------------------------------------------


def test_base_renders_every_kind_the_service_needs(rendered):
    """The base renders the Deployment, config, Service, monitoring, PDB and KEDA objects."""
    kinds = sorted(d["kind"] for d in rendered)

    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Service", "Deployment",
                            "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication",
                            "PrometheusRule", "ServiceMonitor"])
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "patriot"
               for d in rendered)


def test_fallback_renderer_agrees_with_kustomize(rendered):
    """Without kubectl the small renderer yields the same objects (names without hash)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl absent: the fallback renderer is what the other tests use")
    ours = render_base(K8S)

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])

    assert sorted(map(key, ours)) == sorted(map(key, rendered))
    assert _container(ours)["image"] == _container(rendered)["image"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_their_schemas(rendered, version):
    """Every rendered object, and the Secret example, is valid for the Kubernetes version."""
    for doc in [*rendered, *_examples()]:
        try:
            _validate(doc, version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            where = "/".join(map(str, exc.absolute_path))
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} at {where}: {exc.message}")


def test_crd_schemas_reject_a_misspelt_field(rendered):
    """The hand-written CRD schemas are strict: an unknown field is an error."""
    monitor = _one(rendered, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"

    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        _validate(monitor, K8S_VERSIONS[0])


def test_config_map_holds_a_valid_config(rendered):
    """The ConfigMap's config.yaml passes the service's own validation."""
    settings = _settings(rendered)

    assert settings.amqp_url.get_secret_value() == EXAMPLE_AMQP_URL
    assert len(settings.communicator_types) >= 1
    assert all(ct.api_key is None and ct.api_key_file is not None
               for ct in settings.communicator_types), "API keys come from mounted files"


def test_config_takes_its_environment_from_the_pod(rendered):
    """Each ${VAR} of the config is set by the container, from the example Secret."""
    container = _container(rendered)
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _config_text(rendered)))
    env = {e["name"]: e for e in container.get("env", [])}

    assert wanted <= set(env), f"not set by the container: {wanted - set(env)}"
    secrets = _secret_keys()
    for name in wanted:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets.get(ref["name"], set()), (name, ref)


def test_api_key_files_are_keys_of_the_mounted_secret(rendered):
    """Each api_key_file lies in the mounted Secret and names one of its keys."""
    settings = _settings(rendered)
    pod = _pod(rendered)["spec"]
    mounts = {m["name"]: m for m in _container(rendered)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = _secret_keys()

    for ct in settings.communicator_types:
        path = PurePosixPath(str(ct.api_key_file))
        mount = next((m for m in mounts.values() if PurePosixPath(m["mountPath"]) ==
                      path.parent), None)
        assert mount is not None, f"{ct.name}: nothing mounted at {path.parent}"
        assert "subPath" not in mount, "a subPath mount never sees a rotated secret"
        secret = volumes[mount["name"]]["secret"]["secretName"]
        assert path.name in secrets[secret], f"{ct.name}: {path.name} not a key of {secret}"


def test_secret_example_holds_only_placeholders():
    """The Secret example carries placeholders, never something that looks like a key."""
    for secret in _examples():
        assert "data" not in secret, "use stringData with placeholders"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key}"


def test_kustomize_base_does_not_ship_the_secret_example():
    """Applying the base never overwrites real Secrets with placeholders."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())

    assert "secret.example.yaml" not in kustomization.get("resources", [])
    assert "secretGenerator" not in kustomization


def test_deployment_probes_use_healthz_and_readyz(rendered):
    """Liveness (and startup) on /healthz, readiness on /readyz, at the config's http_port."""
    container = _container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http_port = _settings(rendered).http_port

    def probe(name: str) -> tuple[str, int]:
        get = container[name]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", http_port)
    assert probe("startupProbe") == ("/healthz", http_port)
    assert probe("readinessProbe") == ("/readyz", http_port)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


def test_termination_grace_outlasts_prestop_and_drain(rendered):
    """terminationGracePeriodSeconds > preStop sleep + shutdown_grace_seconds + a margin."""
    pod = _pod(rendered)["spec"]
    command = _container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    prestop_s = float(command[1])
    drain_s = _settings(rendered).shutdown_grace_seconds

    assert pod["terminationGracePeriodSeconds"] >= prestop_s + drain_s + 10


def _restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Pod Security Standards, profile "restricted" (plus a read-only root filesystem)."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext", {})
    problems = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is set")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']}: {kinds - allowed_volumes}")
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod seccompProfile is not RuntimeDefault")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
    return problems


def test_pod_meets_the_restricted_security_profile(rendered):
    """The pod passes the "restricted" Pod Security Standard with a read-only root."""
    assert _restricted_violations(_pod(rendered)) == []


def test_restricted_check_catches_a_privileged_container(rendered):
    """The security check itself fails a container that may escalate privileges."""
    pod = _pod(rendered)
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True

    assert _restricted_violations(pod) == ["jasper-consumer: allowPrivilegeEscalation is not false"]


def test_tmp_is_a_writable_emptydir(rendered):
    """/tmp is an emptyDir (memory, size-limited): the only writable path."""
    volumes = {v["name"]: v for v in _pod(rendered)["spec"]["volumes"]}
    tmp = next(m for m in _container(rendered)["volumeMounts"] if m["mountPath"] == "/tmp")

    assert "emptyDir" in volumes[tmp["name"]]
    assert volumes[tmp["name"]]["emptyDir"].get("sizeLimit")
    assert not tmp.get("readOnly")


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_resources_have_requests_within_limits(rendered):
    """CPU and memory have requests and limits, and each request fits its limit."""
    resources = _container(rendered)["resources"]

    for kind in ("cpu", "memory"):
        assert _quantity(resources["requests"][kind]) <= _quantity(resources["limits"][kind])


def test_command_reads_the_mounted_config(rendered):
    """The container runs `jasper-consumer run --config` on the file the ConfigMap mounts."""
    container = _container(rendered)
    command = container["command"]
    config = PurePosixPath(command[command.index("--config") + 1])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(rendered)["spec"]["volumes"]}
    config_map = _one(rendered, "ConfigMap")["metadata"]["name"]

    assert command[:2] == ["jasper-consumer", "run"]
    mount = next(m for m in mounts.values() if PurePosixPath(m["mountPath"]) == config.parent)
    assert volumes[mount["name"]]["configMap"]["name"] == config_map
    assert config.name in _one(rendered, "ConfigMap")["data"]


def test_service_monitor_and_budget_select_the_pods(rendered):
    """Service → pods, ServiceMonitor → Service port, PDB → pods, all by labels."""
    pod_labels = _pod(rendered)["metadata"]["labels"]
    container_ports = {p["name"] for p in _container(rendered)["ports"]}
    service = _one(rendered, "Service")
    monitor = _one(rendered, "ServiceMonitor")
    budget = _one(rendered, "PodDisruptionBudget")
    deployment = _one(rendered, "Deployment")

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= \
        {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _pod(rendered)["spec"]["serviceAccountName"] == \
        _one(rendered, "ServiceAccount")["metadata"]["name"]


def test_keda_scales_the_deployment_on_the_events_queue(rendered):
    """The ScaledObject targets the Deployment and watches <queue_prefix>.events."""
    scaled = _one(rendered, "ScaledObject")
    auth = _one(rendered, "TriggerAuthentication")
    deployment = _one(rendered, "Deployment")
    budget = _one(rendered, "PodDisruptionBudget")
    (trigger,) = scaled["spec"]["triggers"]

    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == f"{_settings(rendered).queue_prefix}.events"
    assert trigger["metadata"]["mode"] in ("QueueLength", "MessageRate")
    assert float(trigger["metadata"]["value"]) > 0
    assert "host" not in trigger["metadata"], "the broker URL holds a password: use the Secret"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets = _secret_keys()
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert scaled["spec"]["minReplicaCount"] >= 2, "a second replica takes over the work queues"
    assert budget["spec"]["minAvailable"] < scaled["spec"]["minReplicaCount"]


def test_prometheus_rule_carries_the_alerts(rendered):
    """deploy/k8s/prometheusrule.yaml holds exactly the groups of alerts.yaml."""
    rule = _one(rendered, "PrometheusRule")

    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], \
        "copy the groups of deploy/prometheus/alerts.yaml into deploy/k8s/prometheusrule.yaml"


# -- the image -------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _args(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for instruction, rest in stage if instruction == word]


def test_dockerfile_is_multi_stage_and_slim():
    """A build stage, then a final stage on a slim base that copies only the venv."""
    stages = _stages()
    arg_values = dict(re.findall(r"ARG (\w+)=(\S+)", DOCKERFILE.read_text()))
    final = stages[-1]
    base = _args(final, "FROM")[0].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: arg_values[m.group(1)], base)

    assert len(stages) >= 2
    assert "slim" in base or "distroless" in base, base
    copies = _args(final, "COPY")
    assert copies, "the final stage copies the build stage's output"
    assert all(c.startswith("--from=") for c in copies), copies


def test_final_image_has_no_compiler_and_no_package_install():
    """No compiler or build tool is installed, and nothing is pip-installed, in the final stage."""
    runs = " ".join(_args(_stages()[-1], "RUN"))

    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|cc|python3?-dev)\b", runs)
    assert "apt-get install" not in runs
    assert "pip install" not in runs


def test_final_image_runs_as_a_non_root_user():
    """The last USER is a numeric non-zero uid (so runAsNonRoot can verify it)."""
    user = _args(_stages()[-1], "USER")[-1]
    uid = user.split(":")[0]

    assert uid.isdigit(), user
    assert int(uid) != 0, user


def test_image_runs_the_service_with_a_config_and_a_healthcheck(rendered):
    """CMD is `jasper-consumer run --config <the Deployment's path>`; HEALTHCHECK hits /healthz."""
    final = _stages()[-1]
    cmd = json.loads(_args(final, "CMD")[-1])
    healthcheck = _args(final, "HEALTHCHECK")[-1]
    exposed = {int(p.split("/")[0]) for e in _args(final, "EXPOSE") for p in e.split()}

    assert cmd == _container(rendered)["command"]
    assert cmd[:3] == ["jasper-consumer", "run", "--config"]
    assert "/healthz" in healthcheck
    assert str(_settings(rendered).http_port) in healthcheck
    assert exposed == {_settings(rendered).http_port}
    user = next(i for i, (word, _) in enumerate(final) if word == "USER")
    assert user < next(i for i, (word, _) in enumerate(final) if word == "CMD")


def test_image_and_deployment_agree_on_the_user(rendered):
    """The Deployment's runAsUser is the image's USER."""
    uid = int(_args(_stages()[-1], "USER")[-1].split(":")[0])

    assert _pod(rendered)["spec"]["securityContext"]["runAsUser"] == uid


def test_dockerfile_passes_hadolint():
    """hadolint finds nothing at warning level or above."""
    hadolint = _tool("hadolint", "HADOLINT")
    result = _run(hadolint, "--no-color", "--failure-threshold", "warning", DOCKERFILE)

    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**/`` any depth; ``*``, ``?``, ``[…]`` in a name."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent
    directory matches everything below it."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        if any(_glob_regex(pattern).match(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    """Every file the Dockerfile copies is in the context; venv, git, tests, caches are not."""
    patterns = _dockerignore()
    sources = []
    for stage in _stages():
        for rest in _args(stage, "COPY"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if not rest.startswith("--from="):
                sources += words[:-1]
    files = [str(p.relative_to(REPO)) for s in sources for p in
             ([REPO / s] if (REPO / s).is_file() else (REPO / s).rglob("*.py"))]

    assert files
    assert not [f for f in files if _ignored(f, patterns)]
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py",
                     "jasper_consumer/__pycache__/app.cpython-311.pyc", "deploy/Dockerfile",
                     ".tools/bin/promtool", "config/local.yaml", "jasper_consumer/app.pyc"):
        assert _ignored(unwanted, patterns), unwanted


# -- alerts ----------------------------------------------------------------------------------

REQUIRED_ALERTS = {
    "JasperBacklogGrowing", "JasperQueueWithoutConsumer", "JasperFailureRatioHigh",
    "JasperCommunicatorTypeDown", "JasperDeadLettersPresent", "JasperRateLimited",
    "JasperNoSuccessWhileEventsWait",
}


def _alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules():
    """`promtool check rules` accepts alerts.yaml."""
    result = _run(_tool("promtool", "PROMTOOL"), "check", "rules", ALERTS)

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    """`promtool test rules` passes: each alert fires where it should and not elsewhere."""
    result = _run(_tool("promtool", "PROMTOOL"), "test", "rules", ALERT_TESTS)

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing():
    """Each alert has a promtool case in which it fires."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
             if case.get("exp_alerts")}

    assert {a["alert"] for a in _alerts()} <= fired


def test_alerts_cover_the_issue_and_tell_what_to_do():
    """The required alerts exist, each with a severity, a summary and a description."""
    alerts = _alerts()
    names = [a["alert"] for a in alerts]

    assert set(names) >= REQUIRED_ALERTS
    assert len(names) == len(set(names))
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert alert["annotations"]["summary"]
        assert alert["annotations"]["description"]


def test_alert_queue_names_follow_the_config(rendered):
    """The queue regexes in the alerts use the config's queue_prefix."""
    prefix = _settings(rendered).queue_prefix + "."
    queues = [q.replace("\\\\.", ".")
              for q in re.findall(r'queue=~?"([^"]+)"', ALERTS.read_text())]

    assert queues
    assert all(q.startswith(prefix) for q in queues), queues


# -- dashboard -------------------------------------------------------------------------------

REQUIRED_DASHBOARD_METRICS = {
    "jasper_commands_total", "jasper_api_errors_total",
    "jasper_api_request_duration_seconds_bucket", "rabbitmq_queue_messages_ready",
    "jasper_inflight_commands", "jasper_retries_total", "jasper_delayed_total",
    "jasper_dead_lettered_total", "jasper_communicator_up",
}
_GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]


def _substitute(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        return variables[match.group(1) or match.group(2)]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def _dashboard_variables() -> dict[str, str]:
    variables = dict(_GRAFANA_VARS)
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "textbox":
            variables[var["name"]] = var["query"]
        elif var["type"] == "query":
            variables[var["name"]] = var.get("allValue", ".*")
        else:
            variables[var["name"]] = var["name"]
    return variables


def test_dashboard_is_well_formed():
    """Unique uid and panel ids, panels on the 24-column grid without overlap, datasource."""
    dashboard = _dashboard()
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    cells: set[tuple[int, int]] = set()

    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy)
                for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_uses_only_defined_variables():
    """Every $variable in a query is a dashboard variable or a Grafana built-in."""
    variables = _dashboard_variables()

    for expr in _dashboard_exprs():
        _substitute(expr, variables)  # KeyError names an undefined variable


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses every dashboard query (as recording rules, variables filled in)."""
    variables = _dashboard_variables()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _substitute(expr, variables)}
        for i, expr in enumerate(_dashboard_exprs())]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))

    result = _run(_tool("promtool", "PROMTOOL"), "check", "rules", path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_operators_watch():
    """Rate, errors, duration per type; backlog, in-flight; retries, delays, dead letters; up."""
    assert metric_names("\n".join(_dashboard_exprs())) >= REQUIRED_DASHBOARD_METRICS


# -- metric names shared by the artefacts and the service ------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "unless",
                 "and", "or", "bool", "offset"}


def metric_names(text: str, prefixes: tuple[str, ...] = ("jasper_", "rabbitmq_")) -> set[str]:
    """The metric names (sample names) that PromQL ``text`` refers to."""
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", text)) - _PROMQL_WORDS
    return {w for w in words if w.startswith(prefixes)}


def artefact_metric_names() -> set[str]:
    """Every service metric (``jasper_…``) named by the dashboard or the alert rules."""
    text = "\n".join(_dashboard_exprs()) + "\n" + "\n".join(a["expr"] for a in _alerts())
    return metric_names(text, ("jasper_",))


def defined_sample_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry's metrics can export, labelled children or not."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created", ""), "info": ("_info",)}
    return {family.name + s for family in registry.collect()
            for s in suffixes.get(family.type, ("",))}


ALLOWED_LABELS = {"event_code", "communicator_type", "command", "outcome", "code", "reason",
                  "stage", "result", "queue", "role", "version", "le"}


def test_artefacts_name_only_metrics_the_service_defines():
    """Each jasper_ metric in the dashboard and the alerts is defined in metrics.py."""
    defined = defined_sample_names(Metrics(CollectorRegistry()).registry)

    assert artefact_metric_names() - defined == set()


def test_metric_labels_come_from_closed_sets():
    """No metric has a label that could carry an ICCID, a client id or a secret."""
    metrics = Metrics(CollectorRegistry())
    labels = {name for metric in vars(metrics).values()
              for name in getattr(metric, "_labelnames", ())}

    assert labels <= ALLOWED_LABELS


def test_prepare_creates_every_series_of_the_configuration(rendered):
    """After prepare(), the per-type series exist at 0, so rate() sees the first event."""
    metrics = Metrics(CollectorRegistry())
    settings = _settings(rendered)
    metrics.prepare(settings)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.registry.collect() for s in family.samples}
    first = settings.communicator_types[0].name

    key = ("jasper_commands_total", (("command", "activate"), ("communicator_type", first),
                                     ("outcome", "failed")))
    assert samples[key] == 0
    assert samples[("jasper_queue_info", (("communicator_type", first), ("queue",
                    f"{settings.queue_prefix}.work.{settings.communicator_types[0].slug}"),
                    ("role", "work")))] == 1
    assert samples[("jasper_build_info", (("version", __version__),))] == 1

