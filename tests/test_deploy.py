"""The deployment artefacts in deploy/, checked offline on every test run.

- Every Kubernetes manifest (deploy/kubernetes/, examples included) validates against the API schemas
  that the kubernetes-validate package bundles, strictly (an unknown or misspelt field fails), for the
  oldest and the newest Kubernetes version we support. The Prometheus Operator's CRDs (ServiceMonitor,
  PrometheusRule) are not in those schemas and are checked structurally; the PrometheusRule's groups
  must equal deploy/prometheus/rules.yml.
- kustomization.yaml lists exactly the manifests beside it (examples/ is not applied).
- The manifests agree with each other and with the gateway: ports, names, selectors, probes, the
  security context, the config in the ConfigMap (parsed by the gateway's own parser) and the
  shutdown timings (terminationGracePeriodSeconds > preStop + drain_delay_s + grace_s); the Redis of
  the state store: hardened and persisted, its Service and password the ones in the gateway's
  REDIS_URL, the NetworkPolicy pair, and (when redis-server is installed) its manifest arguments run
  by a real redis-server that the gateway's store then counts in.
- promtool checks and unit-tests the alerting rules, and checks every dashboard query's syntax. These
  tests skip when promtool is not on PATH; .ci/run installs Debian's `prometheus` package, which ships it.
- The Grafana dashboard is well formed, and every metric name used by the dashboard and the rules
  (and each label they select on) is one the gateway exports.
- deploy/Dockerfile installs what CI installs (`make install`'s extras minus `test`) on the Python
  version the project targets, runs as the Deployment's user, and starts the gateway without a shell.
  The image is not built here: CI has no Docker engine (nor hadolint).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prometheus_client.metrics import MetricWrapperBase

from gateway.adapters import ADAPTERS, unavailable_kinds
from gateway.config import Config, parse_config
from gateway.metering import Metrics
from gateway.policy.shared import scope_warnings
from gateway.store import StoreConfig, open_store
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

BUNDLED = kubernetes_validate.utils.all_versions()
KUBERNETES_VERSIONS = (max("1.30.0", BUNDLED[0], key=Version), BUNDLED[-1])
"""The oldest Kubernetes version the manifests are meant for (or the oldest the package still bundles),
and the newest it knows."""
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}
"""Labels Prometheus adds to every series it scrapes through a ServiceMonitor, beside the gateway's own.
`endpoint` is both: honorLabels keeps the gateway's."""


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def applied() -> dict[tuple[str, str], dict[str, Any]]:
    """The resources `kubectl apply -k deploy/kubernetes` creates, by (kind, name)."""
    out = {}
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        for doc in documents(K8S / name):
            out[doc["kind"], doc["metadata"]["name"]] = doc
    return out


def one(kind: str, resources: dict[tuple[str, str], dict[str, Any]] | None = None,
        component: str = "gateway") -> dict[str, Any]:
    """The one `kind` of `component` (the label app.kubernetes.io/component: gateway, or state for Redis;
    a resource without the label counts as the gateway's)."""
    found = [doc for (k, _), doc in (resources or applied()).items() if k == kind
             and (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "gateway") == component]
    assert len(found) == 1, f"expected one {kind} of {component}, found {len(found)}"
    return found[0]


def gateway_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "gateway")


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def config_of(configmap: dict[str, Any], secret: dict[str, Any], container: dict[str, Any] | None = None) -> Config:
    """The ConfigMap's gateway.yaml as the gateway parses it, with the Secret's values in the environment
    (and the container's own `env`, when given, as the kubelet builds it)."""
    environ = container_environ(container, secret) if container else dict(secret["stringData"])
    return parse_config(configmap["data"]["gateway.yaml"], source="configmap", kinds=ADAPTERS.keys(), environ=environ)


def gateway_config(resources: dict[tuple[str, str], dict[str, Any]]) -> Config:
    """The config the gateway pods of the kustomization run with."""
    container = gateway_container(one("Deployment", resources)["spec"]["template"]["spec"])
    return config_of(one("ConfigMap", resources), one("Secret", resources), container)


def container_environ(container: dict[str, Any], secret: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet gives `container`: `envFrom` the Secret first, then `env` in order,
    each value's $(NAME) expanded from what is defined before it (an undefined one stays as written,
    as the kubelet leaves it). Only literal values and this Secret's keys: enough for the manifests here."""
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["secretRef"]["name"] == secret["metadata"]["name"]
        environ.update(secret["stringData"])
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], var
            environ[var["name"]] = secret["stringData"][ref["key"]]
        else:
            environ[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                          lambda m: environ.get(m.group(1), m.group(0)), var["value"])
    return environ


# Kubernetes schemas ---------------------------------------------------------------------------------

SCHEMA_CASES = [(path, doc, version) for path, doc in all_documents()
                if (doc["apiVersion"], doc["kind"]) not in CRDS for version in KUBERNETES_VERSIONS]


@pytest.mark.parametrize(("path", "doc", "version"), SCHEMA_CASES, ids=[
    f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}@{v}" for p, d, v in SCHEMA_CASES])
def test_manifest_validates_against_the_kubernetes_schema(path: Path, doc: dict[str, Any], version: str) -> None:
    problem = None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problem = f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    if problem:
        pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']}: {problem}", pytrace=False)


def test_servicemonitor_structure() -> None:
    monitor = one("ServiceMonitor")
    service = one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor must select the Service"
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                                 "metricRelabelings", "honorLabels"}
        assert endpoint["port"] == "metrics" and endpoint["port"] in service_ports
        own_labels = set().union(*exported_metrics().values())
        if own_labels & TARGET_LABELS:  # the gateway's `endpoint`: kept only with honorLabels
            assert endpoint.get("honorLabels") is True, f"labels {own_labels & TARGET_LABELS} would be renamed"
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_prometheusrule_structure_and_groups_equal_rules_yml() -> None:
    rule = one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert rule["metadata"]["name"]
    groups = rule["spec"]["groups"]
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str) and r["expr"].strip()
    assert groups == yaml.safe_load(RULES.read_text())["groups"], \
        "deploy/kubernetes/prometheusrule.yaml spec.groups and deploy/prometheus/rules.yml differ: edit both"


def test_alerts_cover_errors_latency_backends_reloads_and_the_state_store() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    exprs = {name: r["expr"] for name, r in rules.items()}
    assert any("gateway_requests_total" in e and '"5.."' in e and "0.05" in e for e in exprs.values())
    assert any("gateway_speech_first_byte_seconds_bucket" in e for e in exprs.values())
    assert any("gateway_request_duration_seconds_bucket" in e for e in exprs.values())
    assert any("gateway_backend_up" in e and "== 0" in e for e in exprs.values())
    assert any('gateway_config_reload_total{result="failure"}' in e for e in exprs.values())
    assert any("gateway_state_errors_total" in e for e in exprs.values()), "the state store failing"
    assert any('gateway_state_fallbacks_total{action="refused"}' in e for e in exprs.values()), \
        "requests refused because a feature fails closed"
    assert any("gateway_ratelimit_rejections_total" in e and ":budget/" in e for e in exprs.values())
    # resilience (issue 13): an ejected backend, its queue timing out or full, failovers and retries
    assert "gateway_backend_ejected" in exprs["AudioGatewayBackendEjected"]
    assert 'gateway_backend_queue_wait_seconds_count{outcome="timeout"}' in exprs["AudioGatewayBackendQueueTimeouts"]
    assert "gateway_backend_queue_full_total" in exprs["AudioGatewayBackendQueueFull"]
    retries = exprs["AudioGatewayRetriesHigh"]
    assert "gateway_backend_retries_total" in retries and "gateway_requests_total" in retries and "0.1" in retries
    for name in ("AudioGatewayBackendEjected", "AudioGatewayBackendQueueTimeouts", "AudioGatewayBackendQueueFull",
                 "AudioGatewayRetriesHigh"):
        assert rules[name]["labels"]["severity"] == "warning" and rules[name].get("for"), name
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == set(rules), f"alerts without a promtool unit test: {set(rules) - tested}"


# Kustomization --------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    top_level = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == top_level, "every manifest in deploy/kubernetes/ (examples/ aside) must be listed"
    assert not any(name.startswith("examples/") for name in listed)
    images = {i["name"] for i in kustomization.get("images", [])}
    image = gateway_container(one("Deployment")["spec"]["template"]["spec"])["image"]
    assert image.rsplit(":", 1)[0] in images, "kustomization `images` must name the gateway's image"


# The manifests against each other and the gateway ---------------------------------------------------

def assert_hardened(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The restricted Pod Security Standard (namespace.yaml enforces it) and then some."""
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in container, probe


def test_workload_security_context() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert_hardened(pod, gateway_container(pod))
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()


def test_deployment_probes_ports_and_volumes() -> None:
    resources = applied()
    pod = one("Deployment", resources)["spec"]["template"]["spec"]
    container = gateway_container(pod)
    assert ports(container) == {"http": 8080, "metrics": 9464}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]
    config_mount = mounts["/etc/gateway"]
    assert "subPath" not in config_mount, "a subPath mount never sees ConfigMap updates, so nothing reloads"
    assert ("ConfigMap", volumes[config_mount["name"]]["configMap"]["name"]) in resources
    for source in container["envFrom"]:
        assert ("Secret", source["secretRef"]["name"]) in resources
    assert ("ServiceAccount", pod["serviceAccountName"]) in resources


def test_configmap_is_a_valid_gateway_config_matching_the_pod() -> None:
    resources = applied()
    config = gateway_config(resources)
    assert not unavailable_kinds(config), "the image installs the embedded extra"
    container = gateway_container(one("Deployment", resources)["spec"]["template"]["spec"])
    assert config.server.host == "0.0.0.0" and config.server.port == ports(container)["http"]
    assert config.metrics.enabled and config.metrics.port == ports(container)["metrics"]
    assert (config.metrics.host or config.server.host) == "0.0.0.0"
    assert config.server.spool_dir in (None, "/tmp")
    assert config.ledger.sink == "stdout", "in Kubernetes the usage ledger goes to the log pipeline"
    assert any(k.name == "web-app" for k in config.keys), "the recommended sha256 form is shown"
    assert any(k.name == "batch-jobs" for k in config.keys), "the key-from-Secret form is shown"
    speaches = config.backends["speaches"]
    assert speaches.kind == "openai" and ".svc.cluster.local:8000/" in (speaches.url or "") + "/"
    for model in config.models.values():
        kinds = [config.backends[r.backend].kind for r in model.routes]
        assert kinds[0] == "openai" and kinds[-1] in ("espeak", "pocketsphinx"), model.name


def prestop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    match = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", " ".join(hook["exec"]["command"]))
    assert match, f"cannot tell how long the preStop hook takes: {hook}"
    return float(match.group(1))


def test_termination_grace_covers_the_gateway_drain() -> None:
    resources = applied()
    pod = one("Deployment", resources)["spec"]["template"]["spec"]
    config = gateway_config(resources)
    needed = prestop_seconds(gateway_container(pod)) + config.server.drain_delay_s + config.server.grace_s
    assert pod["terminationGracePeriodSeconds"] > needed
    assert config.server.drain_delay_s > 0 or prestop_seconds(gateway_container(pod)) > 0, \
        "something must delay the shutdown while endpoints are removed"


def test_sidecar_example_is_coherent() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(K8S / "examples" / "sidecar.yaml")}
    configmap, deployment = one("ConfigMap", docs, "gateway-sidecar"), one("Deployment", docs, "gateway-sidecar")
    config = config_of(configmap, one("Secret"))
    assert config.backends["speaches"].url == "http://127.0.0.1:8000/v1"
    pod = deployment["spec"]["template"]["spec"]
    gateway = gateway_container(pod)
    engine = next(c for c in pod["containers"] if c["name"] != "gateway")
    assert ports(engine) == {"engine": 8000}
    assert ports(gateway) == {"http": config.server.port, "metrics": config.metrics.port}
    assert pod["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    drain = config.server.drain_delay_s + config.server.grace_s
    assert prestop_seconds(engine) >= drain, "the engine must outlive the gateway's drain"
    assert pod["terminationGracePeriodSeconds"] > max(prestop_seconds(engine), drain)


def test_service_ingress_and_autoscaling_point_at_the_gateway() -> None:
    resources = applied()
    deployment = one("Deployment", resources)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    container_ports = ports(gateway_container(deployment["spec"]["template"]["spec"]))
    service = one("Service", resources)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == {"http", "metrics"}
    for port in service_ports.values():
        assert port["targetPort"] in container_ports
    ingress = one("Ingress", resources)
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {(p["path"], p["pathType"]) for p in paths} == {("/v1/audio", "Prefix"), ("/v1/models", "Prefix")}
    for p in paths:
        assert p["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "26m"
    config = gateway_config(resources)
    longest_backend_silence = max(b.timeouts.read for b in config.backends.values())
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > longest_backend_silence
    hpa = one("HorizontalPodAutoscaler", resources)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one("PodDisruptionBudget", resources)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert hpa["spec"]["minReplicas"] > pdb["spec"].get("maxUnavailable", 0)


def test_networkpolicy_admits_only_the_ingress_controller_and_prometheus() -> None:
    resources = applied()
    deployment = one("Deployment", resources)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = one("NetworkPolicy", resources)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    admitted = {}
    for rule in policy["spec"]["ingress"]:
        namespaces = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in rule["from"]}
        for port in rule["ports"]:
            admitted[port["port"]] = namespaces
    container_ports = ports(gateway_container(deployment["spec"]["template"]["spec"]))
    assert admitted == {container_ports["http"]: {"ingress-nginx"}, container_ports["metrics"]: {"monitoring"}}
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (8000, "TCP"), (6379, "TCP")} <= egress_ports


# The state store: Redis ---------------------------------------------------------------------------

def redis_parts(resources: dict[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Redis Deployment's pod spec and its one container."""
    pod = one("Deployment", resources, "state")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def redis_flags(container: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """redis-server's `--name value` arguments, $(NAME) expanded as the kubelet does."""
    assert container["command"] == ["redis-server"]
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: environ[m.group(1)], a) for a in container["args"]]
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip((a[2:] for a in args[::2]), args[1::2], strict=True))


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "kb": 1 / 1024, "mb": 1, "gb": 1024}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def test_redis_is_hardened_and_persists_to_its_volume() -> None:
    resources = applied()
    deployment = one("Deployment", resources, "state")
    pod, container = redis_parts(resources)
    assert_hardened(pod, container)
    assert deployment["spec"]["replicas"] == 1, "one Redis: the limits are exact because every pod counts in it"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "a ReadWriteOnce volume attaches to one pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    flags = redis_flags(container, container_environ(container, one("Secret", resources)))
    assert flags["appendonly"] == "yes" and flags["appendfsync"] in ("everysec", "always"), \
        "budgets are spent money: Redis must not forget them on restart"
    assert flags["maxmemory-policy"] == "noeviction", "an evicted budget key would reset a tenant's spending"
    assert mebibytes(flags["maxmemory"]) < mebibytes(container["resources"]["limits"]["memory"]) * 0.75, \
        "room under the memory limit for the AOF rewrite's fork"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[flags["dir"]])
    claim = one("PersistentVolumeClaim", resources, "state")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert ports(container) == {"redis": int(flags["port"])}
    assert container["readinessProbe"]["exec"]["command"][-1].count("redis-cli") == 1
    names = {var["name"] for var in container["env"]}
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= names, "the probe's redis-cli must authenticate"


def test_the_gateway_reaches_redis_through_its_environment() -> None:
    resources = applied()
    deployment = one("Deployment", resources)
    container = gateway_container(deployment["spec"]["template"]["spec"])
    secret = one("Secret", resources)
    environ = container_environ(container, secret)
    text = one("ConfigMap", resources)["data"]["gateway.yaml"]
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):  # no default: must be set in the pod
        assert name in environ, f"configmap.yaml uses ${{{name}}}, which the gateway Deployment does not set"
    assert not any("$(" in value for value in environ.values()), "a $(NAME) the kubelet cannot expand"
    config = gateway_config(resources)
    store = config.policy.state.store
    assert store.backend == "redis"
    url = urlsplit(store.url)
    service = one("Service", resources, "state")
    service_port = next(p for p in service["spec"]["ports"] if p["name"] == "redis")
    assert (url.scheme, url.hostname, url.port) == ("redis", service["metadata"]["name"], service_port["port"])
    _, redis = redis_parts(resources)
    assert service_port["targetPort"] in ports(redis)
    assert service["spec"]["selector"].items() <= one("Deployment", resources, "state")["spec"]["template"][
        "metadata"]["labels"].items()
    gateway_pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= gateway_pod_labels.items()
    assert not one("Service", resources)["spec"]["selector"].items() <= one(
        "Deployment", resources, "state")["spec"]["template"]["metadata"]["labels"].items()
    password = redis_flags(redis, container_environ(redis, secret))["requirepass"]
    assert url.password == password and quote(password, safe="") == password, "one URL-safe password, both sides"
    assert "REDIS_PASSWORD" not in text and password not in json.dumps(deployment), "the password stays in the Secret"
    active = dataclasses.replace(config.policy, active=True)  # as soon as any limit or budget is configured
    assert scope_warnings(active, 1, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == []


def test_networkpolicies_pair_the_gateway_and_redis() -> None:
    resources = applied()
    gateway_labels = one("Deployment", resources)["spec"]["template"]["metadata"]["labels"]
    redis_labels = one("Deployment", resources, "state")["spec"]["template"]["metadata"]["labels"]
    redis_port = ports(redis_parts(resources)[1])["redis"]
    egress = [rule for rule in one("NetworkPolicy", resources)["spec"]["egress"]
              if any("podSelector" in peer and peer["podSelector"]["matchLabels"].items() <= redis_labels.items()
                     and "namespaceSelector" not in peer for peer in rule["to"])]
    assert [rule["ports"] for rule in egress] == [[{"port": redis_port, "protocol": "TCP"}]], \
        "the gateway pods may reach Redis, on its port only"
    policy = one("NetworkPolicy", resources, "state")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == [], "Redis initiates no connection"
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": redis_port, "protocol": "TCP"}]
    assert [set(peer) for peer in rule["from"]] == [{"podSelector"}], "same namespace, gateway pods only"
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not rule["from"][0]["podSelector"]["matchLabels"].items() <= redis_labels.items()


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="redis-server/redis-cli not on PATH (Debian: apt-get install redis-server; .ci/run does)")
def test_redis_runs_with_the_manifest_flags_and_the_gateway_url_authenticates(tmp_path: Path) -> None:
    """redis-server started with the manifest's own arguments (on a free loopback port, in a temp dir):
    they parse, the readiness probe says ready (and not without the password), and the gateway's store,
    on the gateway's REDIS_URL, counts in it and persists to the append-only file."""
    resources = applied()
    secret = one("Secret", resources)
    _, redis = redis_parts(resources)
    environ = container_environ(redis, secret)
    flags = redis_flags(redis, environ) | {"port": str(free_port()), "dir": str(tmp_path), "bind": "127.0.0.1"}
    argv = [shutil.which("redis-server") or ""] + [x for k, v in flags.items() for x in (f"--{k}", v)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = [re.sub(r"-p \d+", f"-p {flags['port']}", part) for part in redis["readinessProbe"]["exec"]["command"]]
    try:
        for _ in range(250):
            ready = subprocess.run(probe, env={"PATH": os.environ["PATH"], **environ}, check=False,
                                   capture_output=True, timeout=5).returncode == 0
            if ready or server.poll() is not None:
                break
            time.sleep(0.02)
        assert ready and server.poll() is None, "redis-server refused the manifest's arguments or never got ready"
        unauthenticated = subprocess.run(probe, env={"PATH": os.environ["PATH"]}, check=False, timeout=5)
        assert unauthenticated.returncode != 0, "the probe must not pass on a NOAUTH error"
        url = urlsplit(gateway_config(resources).policy.state.store.url)
        local = url._replace(netloc=f":{url.password}@127.0.0.1:{flags['port']}").geturl()

        async def count_twice() -> list[float]:
            store = open_store(StoreConfig(backend="redis", url=local, key_prefix="deploy-test"))
            try:
                return [(await store.hit("k", 1, 2, 60)).remaining for _ in range(2)]
            finally:
                await store.close()

        assert asyncio.run(count_twice()) == [1, 0]
        assert (tmp_path / "appendonlydir").is_dir() or (tmp_path / "appendonly.aof").is_file()
    finally:
        server.terminate()
        server.wait(10)


# Metric names ---------------------------------------------------------------------------------------

def exported_metrics() -> dict[str, set[str]]:
    """Every series name the gateway exports, with the labels it carries."""
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        family = metric.describe()[0]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        labels = set(metric._labelnames)
        for suffix in suffixes:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in metrics.view.collect():  # the gauges computed at scrape time (gateway.metering.ProcessView)
        out[family.name] = set(family._labelnames)
    return out


def rule_texts() -> list[str]:
    """Each rule's expression, and its annotations with the names of histograms as families
    (`gateway_upstream_duration_seconds` in prose) replaced by a series name."""
    texts = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for r in group["rules"]:
            texts.append(r["expr"])
            texts.extend(re.sub(r"\b(gateway_[a-z0-9_]+_seconds)\b", r"\1_count", text)
                         for text in (r.get("annotations") or {}).values())
    return texts


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[dict[str, Any]]:
    return [t for p in dashboard()["panels"] for t in p.get("targets", [])]


def dashboard_texts() -> list[str]:
    texts = [t["expr"] for t in dashboard_targets()]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            texts.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return texts


def test_the_gateway_exports_the_metrics_the_deploy_files_rely_on() -> None:
    exported = exported_metrics()
    for name in ("gateway_requests_total", "gateway_backend_up", "gateway_config_reload_total", "gateway_config_info",
                 "gateway_speech_first_byte_seconds_bucket", "gateway_in_flight_requests",
                 "gateway_state_errors_total", "gateway_state_fallbacks_total", "gateway_ratelimit_rejections_total",
                 "gateway_ratelimit_shadow_rejections_total", "gateway_state_operation_seconds_bucket",
                 "gateway_budget_remaining", "gateway_backend_ejected", "gateway_backend_in_flight",
                 "gateway_backend_queue_depth", "gateway_backend_queue_wait_seconds_bucket",
                 "gateway_backend_queue_wait_seconds_count", "gateway_backend_queue_full_total",
                 "gateway_backend_retries_total"):
        assert name in exported


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_and_selected_label_is_exported(source: str) -> None:
    exported = exported_metrics()
    texts = rule_texts() if source == "rules" else dashboard_texts()
    used = set()
    for text in texts:
        for name in re.findall(r"\bgateway_[a-z0-9_]+", text):
            used.add(name)
            assert name in exported, f"{source}: {name} is not a metric the gateway exports"
        for name, matchers in re.findall(r"\b(gateway_[a-z0-9_]+)\{([^}]*)\}", text):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[name] | TARGET_LABELS, f"{source}: {name} has no label {label}"
    assert used, f"{source}: no gateway metric found"


# promtool -------------------------------------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian's `prometheus` package ships it; .ci/run installs it)")
    return path


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    run(promtool(), "check", "rules", str(RULES))


def test_promtool_unit_tests_the_alerts() -> None:
    run(promtool(), "test", "rules", str(RULES_TEST))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query as a recording rule, with Grafana's variables filled in, so promtool parses it."""
    substitutions = {"$__rate_interval": "5m", "$__range": "1d", "$tenant": ".*", "$model": ".*"}
    rules = []
    for i, target in enumerate(dashboard_targets()):
        expr = target["expr"]
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {target['expr']}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run(promtool(), "check", "rules", str(path))


# Grafana --------------------------------------------------------------------------------------------

def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and 36 <= board["schemaVersion"] <= 41
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"tenant", "model"} <= set(variables)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        x, y, w, h = (panel["gridPos"][k] for k in "xywh")
        for cell in ((i, j) for i in range(x, x + w) for j in range(y, y + h)):
            assert cell not in cells, f"panels {cells[cell]!r} and {panel['title']!r} overlap"
            cells[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]
    tops = [p["gridPos"]["y"] for p in panels if p["type"] == "row"]
    assert tops == sorted(tops), "rows are listed top to bottom"


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = " ".join(t["expr"] for t in dashboard_targets())
    for needle in ("sum by (code) (rate(gateway_requests_total", 'code=~"5.."',
                   "gateway_request_duration_seconds_bucket", "gateway_speech_first_byte_seconds_bucket",
                   "sum by (tenant, model) (increase(gateway_billable_characters",
                   "sum by (tenant, model) (increase(gateway_billable_audio_seconds_total",
                   "sum by (tenant) (increase(gateway_cost_usd_total", "gateway_in_flight_requests",
                   "sum by (backend, reason) (rate(gateway_upstream_errors_total", "gateway_backend_up",
                   "gateway_config_reload_total",
                   "sum by (tenant, limit) (rate(gateway_ratelimit_rejections_total",
                   "sum by (tenant, limit) (rate(gateway_ratelimit_shadow_rejections_total",
                   "histogram_quantile(0.99, sum by (op, le) (rate(gateway_state_operation_seconds_bucket",
                   "gateway_state_errors_total", "gateway_state_fallbacks_total", "gateway_budget_remaining",
                   # Backends: resilience (issue 13)
                   "sum by (backend) (gateway_backend_in_flight)", "sum by (backend) (gateway_backend_queue_depth)",
                   "histogram_quantile(0.5, sum by (backend, outcome, le) (rate(gateway_backend_queue_wait_seconds",
                   "histogram_quantile(0.95, sum by (backend, outcome, le) (rate(gateway_backend_queue_wait_seconds",
                   "max by (backend) (gateway_backend_ejected)", "gateway_backend_queue_full_total",
                   'gateway_backend_queue_wait_seconds_count{outcome="timeout"}',
                   "sum by (backend, reason) (rate(gateway_backend_retries_total"):
        assert needle in exprs, needle
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert "Backends: resilience" in rows
    exported = exported_metrics()
    for target in dashboard_targets():
        for name in re.findall(r"gateway_[a-z0-9_]+", target["expr"]):
            if "tenant" in exported[name]:
                assert 'tenant=~"$tenant"' in target["expr"], f"not filtered by the tenant variable: {target['expr']}"


# Dockerfile -----------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            result.append([])
        if result:
            result[-1].append((instruction, args))
    return result


def arg_default(name: str) -> str:
    for instruction, args in dockerfile_instructions():
        if instruction == "ARG" and args.partition("=")[0] == name:
            return args.partition("=")[2]
    raise AssertionError(f"no ARG {name} in the Dockerfile")


def dockerfile_user() -> int:
    users = [args for instruction, args in stages()[-1] if instruction == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid, so runAsNonRoot can verify it"
    return int(uid)


def test_dockerfile_installs_the_extras_ci_installs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_extras = re.search(r"pip install .*-e '\.\[([^\]]*)\]'", makefile)
    assert make_extras, "Makefile: cannot find the `pip install -e '.[...]'` line"
    ci_extras = set(make_extras.group(1).split(","))
    image_extras = {e for e in arg_default("EXTRAS").split(",") if e}
    assert image_extras == ci_extras - {"test"}
    assert "embedded" in image_extras, "the default flavour runs config/gateway.yaml's engines"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert image_extras <= set(pyproject["project"]["optional-dependencies"])
    runs = " ".join(args for instruction, args in stages()[0] if instruction == "RUN")
    assert "pip wheel" in runs and "[${EXTRAS}] @ file://" in runs, "a wheel of the project, installed with EXTRAS"
    assert " -e " not in runs, "the image installs the wheel, not an editable checkout"


def test_the_slim_flavour_has_no_engine() -> None:
    """`--build-arg EXTRAS=fast` (the slim image, as the Dockerfile documents it) installs no engine package."""
    assert re.search(r"^#\s+docker build .*--build-arg EXTRAS=fast .*-slim", DOCKERFILE.read_text(), re.MULTILINE)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    engines = {re.split(r"[<>=\[ ;]", spec)[0] for name in ("embedded", "embedded-lite") for spec in extras[name]}
    assert engines and not engines & {re.split(r"[<>=\[ ;]", spec)[0] for spec in extras["fast"]}


def test_dockerfile_python_is_the_one_the_project_targets() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = arg_default("PYTHON_VERSION")
    assert re.fullmatch(r"3\.\d+", version)
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(f"{version}.0")
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + version.replace(".", "")
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert len(froms) == 2 and all(f.startswith("python:${PYTHON_VERSION}-slim") for f in froms), froms


def test_dockerfile_runtime_stage() -> None:
    runtime = stages()[-1]
    by = {}
    for instruction, args in runtime:
        by.setdefault(instruction, []).append(args)
    assert json.loads(by["ENTRYPOINT"][-1]) == ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
    assert json.loads(by["CMD"][-1]) == ["--host", "0.0.0.0"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "gateway" in pyproject["project"]["scripts"]
    assert set(" ".join(by["EXPOSE"]).split()) == {"8080", "9464"}
    assert "PYTHONUNBUFFERED=1" in " ".join(by["ENV"])
    healthcheck = by["HEALTHCHECK"][-1]
    assert "/healthz" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    assert any(a.split()[-1] == "/etc/gateway/gateway.yaml" and "config/gateway.yaml" in a for a in by["COPY"])
    runs = " ".join(by.get("RUN", []))
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"the runtime stage carries no build tools ({tool})"
    assert dockerfile_user() == one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(parts[i], pattern.removeprefix("**/"))
               for i, prefix in enumerate(prefixes) for pattern in patterns)


def test_build_context_has_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "keep the ignore file simple: no exceptions"
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and "--from=" not in args:
            sources.extend(args.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for heavy in (".venv", ".git", "tests", ".venv/lib/python3.11/site-packages"):
        assert ignored(heavy, patterns), f"{heavy} should stay out of the build context"
