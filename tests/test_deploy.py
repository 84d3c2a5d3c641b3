"""The Kubernetes manifests and the image are valid, agree with each other and with the service.

Everything here runs offline. ``kubectl kustomize`` renders every combination of
``deploy/k8s``: the base alone, the base with the monitoring component, and the two
example overlays. Core kinds are validated with ``kubernetes-validate --strict``, the
Prometheus Operator kinds against the real CRD schemas copied into ``tests/crd-schemas``.
``hadolint`` lints the Dockerfile, which cannot be built here (no Docker engine), so its
shape is checked too. The alert rules and the dashboard are checked in test_mixin.py, the
image's lock file in test_lock.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from jasper_consumer import __version__
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.tools import mixin

from . import test_mixin
from .external import REPO, run, tool

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
MONITORING = K8S / "components" / "monitoring"
NETWORK_POLICY = K8S / "components" / "network-policy"
OVERLAYS = K8S / "overlays"
DOCKERFILE = DEPLOY / "Dockerfile"
CRD_SCHEMAS = REPO / "tests" / "crd-schemas"
SECRET_EXAMPLE = OVERLAYS / "production" / "secrets.example.yaml"

#: The oldest Kubernetes minor these manifests support, and the newest the schemas know.
#: 1.28: unhealthyPodEvictionPolicy of the PodDisruptionBudget is on by default (beta, 1.27).
K8S_VERSIONS = ("1.28", latest_version().rsplit(".", 1)[0])
PLACEHOLDER = "REPLACE_ME"
EXAMPLE_AMQP_URL = "amqp://jasper:secret@rabbitmq:5672/"
CORE_KINDS = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget"}

#: Every combination a cluster may apply: name -> (resources, components) of a kustomization.
#: Overlays are kustomizations of their own; the others are written to a temporary directory.
COMBINATIONS: dict[str, tuple[list[Path], list[Path]]] = {
    "base": ([BASE], []),
    "base+monitoring": ([BASE], [MONITORING]),
    "base+network-policy": ([BASE], [NETWORK_POLICY]),
    "overlays/production": ([OVERLAYS / "production"], []),
    "overlays/staging": ([OVERLAYS / "staging"], []),
}
WITH_MONITORING = ("base+monitoring", "overlays/production", "overlays/staging")


# -- rendering ---------------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl absent: install kubectl >= 1.27 (kustomize v5) to render deploy/k8s")
    return kubectl


@cache
def _render(name: str, workdir: Path) -> tuple[dict[str, Any], ...]:
    resources, components = COMBINATIONS[name]
    if not components and len(resources) == 1:
        directory = resources[0]
    else:  # kustomize takes only relative paths
        directory = workdir / name.replace("/", "_").replace("+", "_")
        directory.mkdir(parents=True, exist_ok=True)
        rel = [os.path.relpath(p, directory) for p in (*resources, *components)]
        (directory / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": rel[: len(resources)], "components": rel[len(resources):]}))
    result = run(_kubectl(), "kustomize", directory)
    assert result.returncode == 0, f"{name}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture(scope="session")
def render(tmp_path_factory: pytest.TempPathFactory):
    """``render(name)``: a deep copy of the objects that combination renders to."""
    workdir = tmp_path_factory.mktemp("kustomize")
    return lambda name: copy.deepcopy(list(_render(name, workdir)))


@pytest.fixture
def rendered(render) -> list[dict[str, Any]]:
    """The base alone: what `kubectl apply -k deploy/k8s/base` creates."""
    docs: list[dict[str, Any]] = render("base")
    return docs


def _all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _all(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _examples() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if d]


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


def _config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap holding the service's config.yaml."""
    (config_map,) = [d for d in _all(docs, "ConfigMap") if "config.yaml" in d.get("data", {})]
    return config_map


def _config_text(docs: list[dict[str, Any]]) -> str:
    text: str = _config_map(docs)["data"]["config.yaml"]
    return text


def _settings(docs: list[dict[str, Any]]) -> Settings:
    return parse_settings(yaml.safe_load(_config_text(docs)), {"AMQP_URL": EXAMPLE_AMQP_URL})


# -- schemas -----------------------------------------------------------------------------------


@cache
def _crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    group, _, version = api_version.rpartition("/")
    if group != "monitoring.coreos.com":
        return None
    schema: dict[str, Any] = json.loads(
        (CRD_SCHEMAS / f"{kind.lower()}_{version}.json").read_text())
    return schema


def _validate(doc: dict[str, Any], version: str) -> None:
    schema = _crd_schema(doc["apiVersion"], doc["kind"])
    if schema is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    jsonschema.Draft7Validator(schema).validate(doc)
    # The CRD schemas say only `metadata: object`: check it as the ObjectMeta it is.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": doc["metadata"]}, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", COMBINATIONS)
def test_every_combination_matches_its_schemas(render, name, version):
    """Each combination renders, and every object is valid for the Kubernetes version."""
    for doc in [*render(name), *_examples()]:
        try:
            _validate(doc, version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            where = "/".join(map(str, exc.absolute_path))
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} at {where}: "
                        f"{exc.message}")


def test_crd_schemas_reject_a_misspelt_field(render):
    """The CRD schemas are strict: an unknown field of a ServiceMonitor is an error."""
    monitor = _one(render("base+monitoring"), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"

    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        _validate(monitor, K8S_VERSIONS[0])


def test_crd_schema_metadata_is_checked_as_object_meta(render):
    """A misspelt metadata field of a custom resource is an error too."""
    rule = _one(render("base+monitoring"), "PrometheusRule")
    rule["metadata"]["lables"] = {"a": "b"}

    with pytest.raises(kubernetes_validate.ValidationError, match="lables"):
        _validate(rule, K8S_VERSIONS[0])


def test_crd_schemas_are_the_documented_copies():
    """Each schema file is listed, with its sha256, in tests/crd-schemas/README.md."""
    readme = (CRD_SCHEMAS / "README.md").read_text()
    files = sorted(CRD_SCHEMAS.glob("*.json"))

    assert files
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"`{path.name}`" in readme, path.name
        assert digest in readme, f"{path.name}: {digest}"


# -- what each combination holds ---------------------------------------------------------------


def test_base_holds_the_core_objects_only(render):
    """The base applies on any cluster: no custom resource, only core kinds."""
    docs = render("base")

    assert sorted(d["kind"] for d in docs) == sorted(CORE_KINDS)
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "patriot" for d in docs)


def test_monitoring_component_adds_monitor_rules_and_dashboard(render):
    """The monitoring component adds a ServiceMonitor, a PrometheusRule and a dashboard."""
    kinds = sorted(d["kind"] for d in render("base+monitoring"))

    assert kinds == sorted([*CORE_KINDS, "ConfigMap", "ServiceMonitor", "PrometheusRule"])


def test_no_autoscaler_is_shipped(render):
    """No KEDA object or HPA: with single active consumers, replicas add no throughput."""
    kinds = {d["kind"] for name in COMBINATIONS for d in render(name)}

    assert not kinds & {"ScaledObject", "ScaledJob", "TriggerAuthentication",
                        "HorizontalPodAutoscaler"}
    assert not (K8S / "components" / "keda").exists()


def test_two_replicas_and_a_budget_that_never_blocks_a_drain(rendered):
    """Two replicas (active and standby); the PDB lets one go and evicts unready pods."""
    deployment = _one(rendered, "Deployment")
    budget = _one(rendered, "PodDisruptionBudget")["spec"]

    assert deployment["spec"]["replicas"] == 2
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert budget.get("maxUnavailable", 0) >= 1 or \
        budget["minAvailable"] < deployment["spec"]["replicas"]
    assert budget["selector"]["matchLabels"].items() <= _pod(rendered)["metadata"]["labels"].items()


@pytest.mark.parametrize("name", COMBINATIONS)
def test_config_map_holds_a_valid_config(render, name):
    """The ConfigMap's config.yaml passes the service's own validation, keys from files."""
    settings = _settings(render(name))

    assert settings.amqp_urls == [EXAMPLE_AMQP_URL]
    assert len(settings.communicator_types) >= 1
    assert all(ct.api_key is None and ct.api_key_file is not None
               for ct in settings.communicator_types), "API keys come from mounted files"


@pytest.mark.parametrize("name", COMBINATIONS)
def test_config_takes_its_environment_from_the_pod(render, name):
    """Each ${VAR} of the config is set by the container, from the example Secret."""
    docs = render(name)
    container = _container(docs)
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _config_text(docs)))
    env = {e["name"]: e for e in container.get("env", [])}

    assert wanted <= set(env), f"not set by the container: {wanted - set(env)}"
    secrets = _secret_keys()
    for var in wanted:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets.get(ref["name"], set()), (var, ref)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_api_key_files_are_keys_of_the_mounted_secret(render, name):
    """Each api_key_file lies in the mounted Secret (no subPath) and names one of its keys."""
    docs = render(name)
    mounts = {m["name"]: m for m in _container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(docs)["spec"]["volumes"]}
    secrets = _secret_keys()

    for ct in _settings(docs).communicator_types:
        path = PurePosixPath(str(ct.api_key_file))
        mount = next((m for m in mounts.values() if PurePosixPath(m["mountPath"]) ==
                      path.parent), None)
        assert mount is not None, f"{ct.name}: nothing mounted at {path.parent}"
        assert "subPath" not in mount, "a subPath mount never sees a rotated secret"
        secret = volumes[mount["name"]]["secret"]["secretName"]
        assert path.name in secrets[secret], f"{ct.name}: {path.name} not a key of {secret}"


def test_amqps_ca_file_is_mounted_in_production(render):
    """The example AMQP URL is amqps:// and its cafile lies in a volume of the pod."""
    docs = render("overlays/production")
    url = next(s["stringData"]["amqp-url"] for s in _examples()
               if s["metadata"]["name"] == "jasper-consumer-amqp")
    cafile = PurePosixPath(parse_qs(urlsplit(url).query)["cafile"][0])
    mount = next(m for m in _container(docs)["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == cafile.parent)
    volume = next(v for v in _pod(docs)["spec"]["volumes"] if v["name"] == mount["name"])

    assert url.startswith("amqps://")
    assert "configMap" in volume or "secret" in volume


def test_secret_example_holds_only_placeholders():
    """The Secret example carries placeholders, never something that looks like a key."""
    for secret in _examples():
        assert "data" not in secret, "use stringData with placeholders"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key}"


def test_no_kustomization_ships_secrets():
    """Applying any kustomization never overwrites real Secrets with placeholders."""
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        listed = [*kustomization.get("resources", []),
                  *(p.get("path", "") for p in kustomization.get("patches", []))]
        assert not any("secret" in entry for entry in listed), path
        assert "secretGenerator" not in kustomization, path


# -- the pod -----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", COMBINATIONS)
def test_termination_grace_outlasts_prestop_and_drain(render, name):
    """terminationGracePeriodSeconds > preStop sleep + shutdown_grace_seconds + a margin."""
    docs = render(name)
    command = _container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"

    assert _pod(docs)["spec"]["terminationGracePeriodSeconds"] >= \
        float(command[1]) + _settings(docs).shutdown_grace_seconds + 10


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


@pytest.mark.parametrize("name", COMBINATIONS)
def test_pod_meets_the_restricted_security_profile(render, name):
    """The pod passes the "restricted" Pod Security Standard with a read-only root."""
    assert _restricted_violations(_pod(render(name))) == []


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


@pytest.mark.parametrize("name", COMBINATIONS)
def test_command_reads_the_mounted_config(render, name):
    """The container runs `jasper-consumer run --config` on the file the ConfigMap mounts."""
    docs = render(name)
    container = _container(docs)
    command = container["command"]
    config = PurePosixPath(command[command.index("--config") + 1])
    volumes = {v["name"]: v for v in _pod(docs)["spec"]["volumes"]}
    config_map = _config_map(docs)

    assert command[:2] == ["jasper-consumer", "run"]
    mount = next(m for m in container["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == config.parent)
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config.name in config_map["data"]


@pytest.mark.parametrize("name", WITH_MONITORING)
def test_service_monitor_and_budget_select_the_pods(render, name):
    """Service -> pods, ServiceMonitor -> Service port, PDB -> pods, all by labels."""
    docs = render(name)
    pod_labels = _pod(docs)["metadata"]["labels"]
    container_ports = {p["name"] for p in _container(docs)["ports"]}
    service = _one(docs, "Service")
    monitor = _one(docs, "ServiceMonitor")
    budget = _one(docs, "PodDisruptionBudget")
    deployment = _one(docs, "Deployment")

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= \
        {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _pod(docs)["spec"]["serviceAccountName"] == \
        _one(docs, "ServiceAccount")["metadata"]["name"]


# -- monitoring --------------------------------------------------------------------------------


def _prometheus_job(docs: list[dict[str, Any]]) -> str:
    """The job label Prometheus Operator gives the pods' series: the value of the Service's
    label named by ``jobLabel``, else the Service's name."""
    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service")
    labels = service["metadata"]["labels"]
    job_label = monitor["spec"].get("jobLabel")
    job: str = labels[job_label] if job_label in labels else service["metadata"]["name"]
    return job


def _matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether PromQL matchers (``a="x", b=~"y"``) select a series with ``labels``."""
    for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', selector):
        actual = labels.get(name, "")
        value = value.encode().decode("unicode_escape")
        ok = {"=": actual == value, "!=": actual != value,
              "=~": re.fullmatch(value, actual) is not None,
              "!~": re.fullmatch(value, actual) is None}[op]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("name", WITH_MONITORING)
def test_rules_select_the_series_each_deployment_gets(render, name):
    """The rules' selector matches the labels a deployment's series get, namePrefix or not."""
    docs = render(name)
    labels = {"job": _prometheus_job(docs),
              "namespace": _one(docs, "Service")["metadata"].get("namespace", "default")}

    assert _matches(mixin.default_config().selector, labels), labels


def test_two_deployments_stay_apart(render):
    """Production and staging differ in (namespace, job), queue prefix and exchanges."""
    production, staging = render("overlays/production"), render("overlays/staging")

    def identity(docs: list[dict[str, Any]]) -> tuple[str, str]:
        return _one(docs, "Service")["metadata"]["namespace"], _prometheus_job(docs)

    assert identity(production) != identity(staging)
    assert identity(staging)[1] == "staging-jasper-consumer"
    prod, stage = _settings(production), _settings(staging)
    assert prod.queue_prefix != stage.queue_prefix
    assert (prod.events_exchange, prod.history_exchange) != \
        (stage.events_exchange, stage.history_exchange)


def test_one_copy_of_rules_and_dashboard_across_the_overlays(render):
    """The rules and the dashboard cover every deployment: the overlays ship them once."""
    docs = [d for name in ("overlays/production", "overlays/staging") for d in render(name)]

    assert len(_all(docs, "PrometheusRule")) == 1
    assert len([d for d in _all(docs, "ConfigMap")
                if "grafana_dashboard" in d["metadata"].get("labels", {})]) == 1
    assert len(_all(docs, "ServiceMonitor")) == 2


def _overlay_release(name: str) -> str:
    kustomization = yaml.safe_load((OVERLAYS / name / "kustomization.yaml").read_text())
    (release,) = [op["value"] for p in kustomization.get("patches", []) if "patch" in p
                  for op in (yaml.safe_load(p["patch"]) or [])
                  if isinstance(op, dict) and op.get("path") == "/metadata/labels/release"]
    value: str = release
    return value


def test_release_label_is_set_by_the_overlay(render):
    """ServiceMonitor and PrometheusRule carry the release label, and an overlay sets it."""
    default = mixin.RELEASE_LABEL["release"]
    release = _overlay_release("production")
    docs = render("overlays/production")

    assert release != default
    for doc in [*_all(render("base+monitoring"), "ServiceMonitor"),
                *_all(render("base+monitoring"), "PrometheusRule")]:
        assert doc["metadata"]["labels"]["release"] == default
    for doc in [*_all(docs, "ServiceMonitor"), *_all(docs, "PrometheusRule")]:
        assert doc["metadata"]["labels"]["release"] == release, doc["kind"]


def test_dashboard_config_map_is_the_sidecar_dashboard(render):
    """The dashboard ConfigMap has the sidecar's label and the sidecar form of the dashboard."""
    (config_map,) = [d for d in _all(render("base+monitoring"), "ConfigMap")
                     if "jasper-consumer.json" in d.get("data", {})]
    dashboard = json.loads(config_map["data"]["jasper-consumer.json"])

    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard == json.loads((REPO / mixin.DASHBOARD_SIDECAR).read_text())
    assert "__inputs" not in dashboard


def test_prometheus_rule_carries_the_rule_file(render):
    """The PrometheusRule holds exactly the groups of deploy/prometheus/alerts.yaml."""
    rule = _one(render("base+monitoring"), "PrometheusRule")

    assert rule["spec"]["groups"] == test_mixin.rule_groups()


def test_production_overlay_sets_namespace_image_and_config(render):
    """Every object of the production overlay is in its namespace, with its image and config."""
    docs = render("overlays/production")
    kustomization = yaml.safe_load((OVERLAYS / "production" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]

    assert {d["metadata"]["namespace"] for d in docs} == {kustomization["namespace"]}
    assert _container(docs)["image"] == \
        f"{image['newName']}:{image['newTag']}@{image['digest']}"
    assert _config_text(docs) == (OVERLAYS / "production" / "config.yaml").read_text()


@pytest.mark.parametrize("name", ["overlays/production", "overlays/staging"])
def test_the_overlays_pin_the_image_by_digest(render, name):
    """The image is name:tag@sha256:<64 hex digits>: the bytes, not whatever the tag names."""
    image = _container(render(name))["image"]

    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image


def test_replicas_spread_over_nodes_and_zones(rendered):
    """Two spread constraints, by host and by zone, select the pods; both are preferences,
    so a replacement can start while a zone is down."""
    pod = _pod(rendered)
    spread = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}

    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"]["matchLabels"].items() <= \
            pod["metadata"]["labels"].items()


# -- network policy ----------------------------------------------------------------------------


def _ports(rule: dict[str, Any]) -> set[tuple[str, int | str]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


@pytest.mark.parametrize("name", ["base+network-policy", "overlays/production",
                                  "overlays/staging"])
def test_network_policy_lets_in_prometheus_only_and_out_what_the_service_needs(render, name):
    """Ingress: the metrics port, from the monitoring namespace only. Egress: DNS (UDP and
    TCP), the AMQP URL's port, and each communicator type's Control Center port; nothing
    else."""
    docs = render(name)
    policy = _one(docs, "NetworkPolicy")["spec"]
    pod = _pod(docs)
    settings = _settings(docs)
    http_port = next(p for p in _container(docs)["ports"] if p["name"] == "http")

    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    assert _ports(ingress) <= {("TCP", "http"), ("TCP", http_port["containerPort"])}
    allowed = set().union(*(_ports(rule) for rule in policy["egress"]))
    amqp = [urlsplit(u) for u in [*settings.amqp_urls, *(
        s["stringData"]["amqp-url"] for s in _examples() if "amqp-url" in s["stringData"])]]
    jasper = [urlsplit(ct.server_address) for ct in settings.communicator_types]
    needed = {("UDP", 53), ("TCP", 53)}
    needed |= {("TCP", u.port or (5671 if u.scheme == "amqps" else 5672)) for u in amqp}
    needed |= {("TCP", u.port or (443 if u.scheme == "https" else 80)) for u in jasper}
    assert needed <= allowed
    assert allowed == needed | {("TCP", 5671), ("TCP", 5672)}, "nothing beyond these"


def artefact_metric_names() -> set[str]:
    """Every service metric (``jasper_…``) the alert rules and the dashboard name
    (tests/integration/test_operations.py checks that a running service exports them)."""
    return test_mixin.artefact_metric_names()


# -- the image ---------------------------------------------------------------------------------


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


def test_image_installs_the_locked_hashed_dependencies_only():
    """The image installs the hashed lock (wheels only), then the service offline, no deps."""
    build = _stages()[0]
    copied = [shlex.split(c)[0] for c in _args(build, "COPY")]
    runs = [shlex.split(r) for r in _args(build, "RUN")]
    pip_installs = [r for r in runs if r[1:3] == ["install", "--no-cache-dir"] or
                    ("pip" in r[0] and "install" in r)]

    assert "deploy/requirements.lock" in copied
    locked, own = pip_installs[0], pip_installs[1]
    assert {"--require-hashes", "--only-binary=:all:", "-r"} <= set(locked)
    assert locked[locked.index("-r") + 1] == "requirements.lock"
    assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(own)
    assert own[own.index("--no-index") + 1] == "."


def test_image_labels_name_version_and_source():
    """OCI labels carry pyproject's version and [project.urls] Source, and the revision."""
    runtime = _stages()[-1]
    args = dict(a.split("=", 1) for a in _args(runtime, "ARG"))
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"',
                             " ".join(_args(runtime, "LABEL"))))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert args["VERSION"] == project["version"] == __version__
    assert args["SOURCE_URL"] == project["urls"]["Source"]


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
    result = run(tool("hadolint", "HADOLINT"), "--no-color", "--failure-threshold", "warning",
                 DOCKERFILE)

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

    assert "deploy/requirements.lock" in files
    assert not [f for f in files if _ignored(f, patterns)]
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py",
                     "jasper_consumer/__pycache__/app.cpython-311.pyc", "deploy/Dockerfile",
                     ".tools/bin/promtool", "config/local.yaml", "jasper_consumer/app.pyc",
                     "deploy/k8s/overlays/production/secrets.example.yaml"):
        assert _ignored(unwanted, patterns), unwanted

