"""The Kubernetes manifests (deploy/): rendered with `kubectl kustomize`, validated offline against the
Kubernetes schemas that kubernetes-validate bundles (strict: an unknown field is an error), and checked
for the invariants their comments promise. kubectl is needed only to render; without it the rendering
tests skip and the base's files, which are exactly what it renders, are checked as they are."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stylize_service.server.config import DEFAULT_GRACE_SECONDS, ServerConfig, build_parser, load_config
from stylize_service.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "k8s"
QUEUE_DEPTH = ROOT / "deploy" / "queue-depth"
GPU = ROOT / "deploy" / "gpu"
FLEET = ROOT / "deploy" / "fleet"
PROMETHEUS = ROOT / "deploy" / "prometheus"

# The oldest Kubernetes the manifests are for: the preStop `sleep` action is on by default from 1.30
# (native gRPC probes from 1.27). They are validated against it and against the newest schemas bundled.
MIN_KUBERNETES = "1.30.0"
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, kubernetes_validate.latest_version()})
# After the grace, drain() waits up to this long for the cancelled jobs to stop (server/app.py).
DRAIN_CANCEL_WAIT_S = 10
# The lowest CPU use of a busy replica, in % of its request, that deploy/measure_replica.py measured.
BUSY_REPLICA_CPU_PERCENT = 56
# The issue's metric names that the queue-depth autoscaling adds up.
QUEUE_METRICS = ("stylize_queue_depth", "stylize_jobs_running")

Obj = dict[str, Any]


def load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubectl_kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            f"kubectl is not installed, so `kubectl kustomize {path.relative_to(ROOT)}` was not rendered; "
            "install kubectl to run this test"
        )
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def base_files() -> list[Obj]:
    kustomization = load_documents(BASE / "kustomization.yaml")[0]
    extra = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not extra, f"the base must list plain resources only (so its files are what is applied): {extra}"
    return [doc for name in kustomization["resources"] for doc in load_documents(BASE / name)]


def key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[key(o) for o in matches]}"
    return matches[0]


_SUFFIXES = {
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
}


def quantity(value: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("2", "500m", "8Gi") as an exact number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    if match is None or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a resource quantity this test understands: {value!r}")
    return Fraction(match.group(1)) * _SUFFIXES[match.group(2)]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return base_files()


@pytest.fixture(scope="module")
def pod(base: list[Obj]) -> Obj:
    return find(base, "Deployment")["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod: Obj) -> Obj:
    containers = pod["spec"]["containers"]
    assert len(containers) == 1, "one container per pod: the server"
    return containers[0]


def port_named(container: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, f"the container has no port named {name!r}: {ports}"
    return int(ports[name])


def resolved_env(container: Obj) -> dict[str, str]:
    """The container's variables as the kubelet sets them (resourceFieldRef: ceil(resource / divisor))."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("resourceFieldRef")
        assert ref is not None, f"{var['name']}: this test resolves only resourceFieldRef, got {var}"
        kind, resource = ref["resource"].split(".")
        amount = quantity(container["resources"][kind][resource]) / quantity(ref.get("divisor", "1"))
        env[var["name"]] = str(math.ceil(amount))
    return env


@pytest.fixture(scope="module")
def server_config(container: Obj) -> ServerConfig:
    """The server's settings from the Deployment's environment, parsed by the server's own loader."""
    return load_config([], environ=resolved_env(container))


# Rendering and schema validation


def test_base_renders_to_exactly_its_files(base: list[Obj]) -> None:
    rendered = kubectl_kustomize(BASE)
    canonical = sorted(json.dumps(o, sort_keys=True) for o in rendered)
    assert canonical == sorted(json.dumps(o, sort_keys=True) for o in base)
    assert {key(o) for o in rendered} == {
        ("Deployment", "stylize"),
        ("Service", "stylize-headless"),
        ("Service", "stylize"),
        ("PodDisruptionBudget", "stylize"),
        ("HorizontalPodAutoscaler", "stylize"),
    }


def validation_errors(objects: list[Obj], version: str) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            errors.append(f"{key(obj)} at {path or '(top)'}: {err.message}")
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_base_validates_strictly(base: list[Obj], version: str) -> None:
    assert validation_errors(base, version) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_queue_depth_overlay_validates_strictly(version: str) -> None:
    assert validation_errors(kubectl_kustomize(QUEUE_DEPTH), version) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_gpu_overlay_validates_strictly(version: str) -> None:
    assert validation_errors(kubectl_kustomize(GPU), version) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_fleet_overlay_validates_strictly(version: str) -> None:
    assert validation_errors(kubectl_kustomize(FLEET), version) == []


def test_strict_validation_rejects_unknown_and_mistyped_fields(base: list[Obj]) -> None:
    deployment = find(base, "Deployment")
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in e for e in validation_errors([misspelt], MIN_KUBERNETES))

    mistyped = copy.deepcopy(deployment)
    mistyped["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "600"
    assert validation_errors([mistyped], MIN_KUBERNETES)


# The Deployment


def test_probes_are_native_grpc_on_the_serving_port(container: Obj, server_config: ServerConfig) -> None:
    grpc_port = port_named(container, "grpc")
    assert grpc_port == server_config.port == 50051
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name)
        assert probe is not None, f"no {name}"
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
        assert handlers == {"grpc"}, f"{name} must be a native gRPC probe, has {handlers}"
        assert probe["grpc"]["port"] == grpc_port, f"{name} asks port {probe['grpc']['port']}"
        # The server reports the whole server under "" (and stylize.v1.StyleTransfer likewise).
        assert probe["grpc"].get("service", "") in ("", "stylize.v1.StyleTransfer")


def test_runs_as_the_images_user_with_a_read_only_root(pod: Obj, container: Obj) -> None:
    dockerfile_user = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_user, "the Dockerfile sets no numeric USER"
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == int(dockerfile_user[-1]) != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The server writes no file but the job store's (see ORT_DISABLE_TELEMETRY), on a volume of its own.
    mounts = container.get("volumeMounts", [])
    assert [m["mountPath"] for m in mounts] == ["/var/lib/stylize"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STYLIZE_STATE_DIR"] == "/var/lib/stylize"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[0]["name"]]
    assert resolved_env(container)["ORT_DISABLE_TELEMETRY"] == "1"


def test_settings_are_ones_the_server_reads(container: Obj, server_config: ServerConfig) -> None:
    known = set(re.findall(r"\[env:\s+(STYLIZE_[A-Z_]+)\]", build_parser().format_help()))
    assert "STYLIZE_GRACE_SECONDS" in known  # the pattern still finds the server's settings
    unknown = {n for n in resolved_env(container) if n.startswith("STYLIZE_")} - known
    assert not unknown, f"stylize-server reads no such variable: {sorted(unknown)}"
    # One job per replica, with as many ONNX Runtime threads as the CPU limit has cores.
    assert server_config.concurrency == 1
    assert server_config.intra_op_threads == math.ceil(quantity(container["resources"]["limits"]["cpu"]))


def test_service_links_are_off(pod: Obj) -> None:
    # The Service `stylize` would otherwise put STYLIZE_PORT=tcp://IP:50051 into the environment, which
    # the server would read as its port and refuse.
    assert pod["spec"]["enableServiceLinks"] is False


def test_termination_grace_outlasts_the_drain(pod: Obj, container: Obj, server_config: ServerConfig) -> None:
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # server_config.grace_seconds is STYLIZE_GRACE_SECONDS where the Deployment sets it, else config.py's
    # default; either way the pod must outlast it.
    assert grace > server_config.grace_seconds >= DEFAULT_GRACE_SECONDS
    assert grace >= pre_stop + server_config.grace_seconds + DRAIN_CANCEL_WAIT_S, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain grace "
        f"{server_config.grace_seconds:g} + {DRAIN_CANCEL_WAIT_S} s for cancelled jobs to stop"
    )


def test_requests_are_within_limits(container: Obj) -> None:
    resources = container["resources"]
    for name in ("cpu", "memory"):
        request, limit = resources["requests"][name], resources["limits"][name]
        assert quantity(request) <= quantity(limit), f"{name}: request {request} > limit {limit}"
    # One single-scale job's peak at 1024 px measured 7.1 GB (scripts/benchmark_multiscale.py under
    # /usr/bin/time -v); the limit must hold it.
    assert quantity(resources["limits"]["memory"]) >= quantity("7.1G")


def test_prometheus_scrapes_the_metrics_port(pod: Obj, container: Obj, server_config: ServerConfig) -> None:
    annotations = pod["metadata"]["annotations"]
    metrics_port = port_named(container, "metrics")
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port == 9464
    assert annotations["prometheus.io/path"] == "/metrics"
    assert server_config.metrics_port == metrics_port  # as the server reads its environment


# Services, disruption budget, autoscaler


def selects_pods(selector: dict[str, str], pod: Obj) -> bool:
    return bool(selector) and selector.items() <= pod["metadata"]["labels"].items()


def test_services_select_the_pods_on_the_grpc_port(base: list[Obj], pod: Obj, container: Obj) -> None:
    headless = find(base, "Service", "stylize-headless")["spec"]
    cluster_ip = find(base, "Service", "stylize")["spec"]
    assert headless["clusterIP"] == "None", "client-side balancing needs every pod's address in DNS"
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP" and cluster_ip.get("clusterIP") != "None"
    for spec in (headless, cluster_ip):
        assert selects_pods(spec["selector"], pod)
        (port,) = spec["ports"]
        assert port["port"] == 50051
        assert port["targetPort"] in ("grpc", port_named(container, "grpc"))
    assert selects_pods(find(base, "Deployment")["spec"]["selector"]["matchLabels"], pod)


def test_disruption_budget_covers_the_pods_and_allows_evictions(base: list[Obj], pod: Obj) -> None:
    budget = find(base, "PodDisruptionBudget")["spec"]
    assert selects_pods(budget["selector"]["matchLabels"], pod)
    min_replicas = find(base, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in budget:
        assert 1 <= int(budget["maxUnavailable"]) < min_replicas
    else:
        assert int(budget["minAvailable"]) < min_replicas, "a drain could never evict a replica"


def test_autoscaler_targets_the_deployment_on_cpu(base: list[Obj]) -> None:
    hpa = find(base, "HorizontalPodAutoscaler")
    deployment = find(base, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    # Clearly below a busy replica's utilization (56-73% measured, deploy/measure_replica.py), or an all-busy fleet would
    # not grow: the autoscaler leaves ratios within its 10% tolerance of 1 alone.
    assert 0 < metric["resource"]["target"]["averageUtilization"] * 1.1 < BUSY_REPLICA_CPU_PERCENT


def test_queue_depth_path_is_consistent() -> None:
    """The overlay's metric is the one the adapter rules serve, made of the server's queue metrics, from
    series that the scrape config labels with namespace and pod."""
    hpa = find(kubectl_kustomize(QUEUE_DEPTH), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = load_documents(PROMETHEUS / "adapter-rules.yaml")[0]["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    exported = {family.name for family in ServerMetrics().registry.collect()}
    for name in QUEUE_METRICS:
        assert name in rule["metricsQuery"] and name in exported
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    (job,) = load_documents(PROMETHEUS / "scrape-config.yaml")[0]["scrape_configs"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets
    kept_port = next(
        r["regex"]
        for r in job["relabel_configs"]
        if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    )
    port_named(find(base_files(), "Deployment")["spec"]["template"]["spec"]["containers"][0], kept_port)


def test_measure_replica_help() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "measure_replica.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--max-size" in result.stdout


# The GPU overlay


def test_gpu_overlay_asks_for_one_gpu_and_requires_cuda(base: list[Obj]) -> None:
    rendered = kubectl_kustomize(GPU)
    deployment = find(rendered, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    # The image that `docker build --build-arg STYLIZE_EXTRAS=gpu -t stylize:gpu .` makes (docs/gpu.md).
    assert container["image"] == "stylize:gpu"
    resources = container["resources"]
    assert quantity(resources["limits"]["nvidia.com/gpu"]) == 1
    assert (
        resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
        == (resources["limits"]["nvidia.com/gpu"])
    ), "an extended resource's request must equal its limit"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    # The server reads the setting and insists on CUDA (the check that a GPU answers is at start).
    config = load_config([], environ=resolved_env(container))
    assert config.provider == "cuda"
    assert config.concurrency == 1, "one job per replica, so one GPU per replica"


def test_gpu_overlay_changes_nothing_else(base: list[Obj]) -> None:
    rendered = kubectl_kustomize(GPU)
    assert sorted(json.dumps(o, sort_keys=True) for o in rendered if o["kind"] != "Deployment") == sorted(
        json.dumps(o, sort_keys=True) for o in base if o["kind"] != "Deployment"
    )
    gpu = copy.deepcopy(find(rendered, "Deployment"))
    pod_spec = gpu["spec"]["template"]["spec"]
    del pod_spec["tolerations"]
    (container,) = pod_spec["containers"]
    container["image"] = find(base, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    container["env"] = [v for v in container["env"] if v["name"] != "STYLIZE_PROVIDER"]
    for kind in ("requests", "limits"):
        del container["resources"][kind]["nvidia.com/gpu"]
    assert json.dumps(gpu, sort_keys=True) == json.dumps(find(base, "Deployment"), sort_keys=True)


# The fleet overlay


def test_fleet_overlay_keeps_the_jobs_in_redis_from_a_secret(base: list[Obj]) -> None:
    rendered = kubectl_kustomize(FLEET)
    (container,) = find(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {var["name"]: var for var in container["env"]}
    assert len(env) == len(container["env"]), "each variable once"
    ref = env["STYLIZE_STORE_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("stylize-store", "url")
    # What the server makes of the rest, with the URL the kustomization's comment says to put there.
    plain = {name: var for name, var in env.items() if name != "STYLIZE_STORE_URL"}
    config = load_config(
        [],
        environ={
            **resolved_env({**container, "env": list(plain.values())}),
            "STYLIZE_STORE_URL": "redis://:PASSWORD@stylize-redis:6379/0",
        },
    )
    assert config.store_url is not None and config.lease_seconds == 30
    # Redis: a StatefulSet with a volume, its password from the same Secret, behind the Service in the URL.
    redis = find(rendered, "StatefulSet", "stylize-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert {m["name"] for m in redis_container["volumeMounts"]} == {claim["metadata"]["name"]}
    password = next(v for v in redis_container["env"] if v["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "stylize-store", "key": "password"}
    assert "noeviction" in redis_container["args"] and "$(REDIS_PASSWORD)" in redis_container["args"]
    service = find(rendered, "Service", "stylize-redis")
    assert service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    # No Secret in the repository: its password is the operator's.
    assert not [o for o in rendered if o["kind"] == "Secret"]
    # Everything of the base but the Deployment and the autoscaler is the base's.
    changed = {"Deployment", "HorizontalPodAutoscaler"}
    assert sorted(json.dumps(o, sort_keys=True) for o in base if o["kind"] not in changed) == sorted(
        json.dumps(o, sort_keys=True)
        for o in rendered
        if o["kind"] not in changed and o["metadata"]["name"] != "stylize-redis"
    )


def test_fleet_overlay_scales_on_the_fleets_queue() -> None:
    hpa = find(kubectl_kustomize(FLEET), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    (rule,) = load_documents(PROMETHEUS / "adapter-rules-fleet.yaml")[0]["rules"]["external"]
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    exported = {family.name for family in ServerMetrics().registry.collect()}
    for name in QUEUE_METRICS:
        assert name in rule["metricsQuery"] and name in exported
    # Every replica exports the fleet's one queue: counted once, not once per replica.
    assert "max by (namespace) (stylize_queue_depth" in rule["metricsQuery"]
