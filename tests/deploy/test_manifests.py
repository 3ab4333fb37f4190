"""The kustomize overlays: they build, every object is schema-valid, and they agree with the server's
real ports, health service names, settings and drain timing."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.crd_schemas import CUSTOM_RESOURCES
from tests.deploy.tools import ADAPTER_VALUES, DEPLOY, INSTALL, OVERLAYS, Builder, config_from_env, find, one, yaml

# Oldest Kubernetes the manifests target (native gRPC probes are GA from 1.27) and the newest schema
# kubernetes-validate ships: a field must exist in both.
K8S_VERSIONS = ("1.27.0", "latest")


def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "rosetta")


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def server_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The ROSETTA_* environment of the server container: its ConfigMap, then explicit env entries."""
    c = container(objects)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return {k: v for k, v in env.items() if k.startswith("ROSETTA_")}


# ---- build ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_overlay_builds_and_every_kustomize_agrees(overlay: str, builders: list[Builder]) -> None:
    outputs = {b.name: b.build(OVERLAYS[overlay]) for b in builders}
    kinds = {o["kind"] for o in next(iter(outputs.values()))}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor", "PrometheusRule"} <= kinds
    first = next(iter(outputs.values()))
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    for name, objects in outputs.items():
        assert sorted(objects, key=key) == sorted(first, key=key), f"{name} builds {overlay} differently"


def test_base_alone_builds(builders: list[Builder]) -> None:
    objects = builders[0].build(DEPLOY / "k8s" / "base")
    assert one(objects, "Deployment", "rosetta")


# ---- schema validation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv() -> Any:
    return pytest.importorskip("kubernetes_validate", reason=f"install it with: {INSTALL['kubernetes-validate']}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_passes_strict_schema_validation(overlay: str, version: str, overlays: Any, kv: Any) -> None:
    import jsonschema

    version = kv.latest_version() if version == "latest" else version
    for obj in overlays[overlay]:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {version})"
        crd = CUSTOM_RESOURCES.get((obj["apiVersion"], obj["kind"]))
        if crd is None:  # a built-in kind: the full OpenAPI schema, unknown fields rejected
            try:
                kv.validate(obj, version, strict=True)
            except kv.SchemaNotFoundError:
                pytest.fail(f"{where}: no schema; a new custom resource needs a schema in crd_schemas.py")
            except kv.ValidationError as err:
                pytest.fail(f"{where}: {err.message} at {'/'.join(map(str, err.path))}")
            continue
        # A custom resource: ObjectMeta against the built-in schema, spec against crd_schemas.py.
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
        try:
            kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, version, strict=True)
            jsonschema.validate(obj["spec"], crd)
        except (kv.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{where}: {err.message} at {'/'.join(map(str, err.path))}")


def test_strict_validation_rejects_an_unknown_field(overlays: Any, kv: Any) -> None:
    """The validator really is strict: a misspelt field in a Deployment is an error, not a no-op."""
    import jsonschema

    broken = copy.deepcopy(deployment(overlays["cpu"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.27.0", strict=True)
    monitor = copy.deepcopy(one(overlays["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor["spec"], CUSTOM_RESOURCES[("monitoring.coreos.com/v1", "ServiceMonitor")])


# ---- agreement with the server ----------------------------------------------------------------------


HEALTHCHECK = "/opt/rosetta/healthcheck.py"  # where the Dockerfiles COPY deploy/docker/healthcheck.py


def probe_service(probe: dict[str, Any]) -> str:
    """The grpc.health.v1 service a probe asks for: a native gRPC probe's `service`, or the argument of the
    image's healthcheck.py in an exec probe (the TLS form: the kubelet's gRPC probe has no TLS)."""
    if "exec" in probe:
        command = probe["exec"]["command"]
        assert command[:2] == ["python", HEALTHCHECK] and len(command) == 3, command
        return str(command[2])
    return str(probe["grpc"].get("service", ""))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_ask_the_server_port_for_its_health_services(
        overlay: str, overlays: Any, server_defaults: Any, health_services: tuple[str, ...]) -> None:
    objects = overlays[overlay]
    config = config_from_env(server_env(objects))
    assert config.port == server_defaults.port == 50051  # the port clients, probes and Services agree on
    c = container(objects)
    translator = [s for s in health_services if s]
    assert len(translator) == 1, health_services
    # Plaintext: the kubelet's native gRPC probe. TLS: healthcheck.py, which dials ROSETTA_PORT over TLS.
    handler = "exec" if config.tls else "grpc"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {handler}, f"{kind} must be {handler}"
        if handler == "grpc":
            assert probe["grpc"]["port"] == config.port, kind
        assert probe_service(probe) in health_services, kind
    # Ready (in the endpoints) and started only once the Translator itself is SERVING (models warmed up).
    assert probe_service(c["readinessProbe"]) == translator[0]
    assert probe_service(c["startupProbe"]) == translator[0]


def test_tls_overlay_mounts_the_secret_where_the_settings_point(overlays: Any) -> None:
    objects = overlays["cpu-tls"]
    config = config_from_env(server_env(objects))
    assert config.tls and Path(config.tls_cert_file).name == "tls.crt" and Path(config.tls_key_file).name == "tls.key"
    c = container(objects)
    pod = deployment(objects)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    folder = str(Path(config.tls_cert_file).parent)
    assert folder in mounts and mounts[folder].get("readOnly") is True
    assert str(Path(config.tls_key_file).parent) == folder
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[folder]["name"])
    assert volume["secret"]["secretName"]  # a kubernetes.io/tls Secret: tls.crt, tls.key (+ ca.crt)
    assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, "the private key must not be world-readable"
    # The probes verify the server's certificate against a name in it (healthcheck.py's setting).
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("HEALTHCHECK_TLS_SERVER_NAME")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["timeoutSeconds"] >= 5, f"{kind}: an exec probe starts a Python process"
    for dockerfile in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        assert f"COPY deploy/docker/healthcheck.py {HEALTHCHECK}\n" in dockerfile.read_text(), dockerfile.name


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_container_and_service_ports_match_server_config(overlay: str, overlays: Any, server_defaults: Any) -> None:
    objects = overlays[overlay]
    config = config_from_env(server_env(objects))
    assert (config.port, config.metrics_port) == (server_defaults.port, server_defaults.metrics_port)
    assert config.host == "0.0.0.0", "the server must listen on the pod IP, not loopback"
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}

    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "rosetta")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (config.port, "grpc"), "metrics": (config.metrics_port, "metrics")}
    headless = one(objects, "Service", "rosetta-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "warming/draining pods must not be in DNS"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in headless["spec"]["ports"]} == {
        "grpc": (config.port, "grpc")}
    for svc in (service, headless):
        selector = svc["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"{svc['metadata']['name']} selects no server pod"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_settings_come_from_a_configmap_of_real_server_fields(overlay: str, overlays: Any) -> None:
    objects = overlays[overlay]
    c = container(objects)
    refs = [s["configMapRef"]["name"] for s in c.get("envFrom", [])]
    assert len(refs) == 1 and one(objects, "ConfigMap", refs[0]), "settings come from the generated ConfigMap"
    env = server_env(objects)
    assert env, "no ROSETTA_* settings"
    config = config_from_env(env)  # every key a ServerConfig field, every value valid for it
    assert config.model_repository == "/opt/rosetta/model_repository"  # where the Dockerfiles put the models
    # Service links would inject ROSETTA_PORT=tcp://10.x.y.z:50051 for the Service named `rosetta`,
    # a value `rosetta serve` cannot parse as a port.
    assert deployment(objects)["spec"]["template"]["spec"].get("enableServiceLinks") is False


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_termination_grace_outlasts_the_server_drain(overlay: str, overlays: Any) -> None:
    objects = overlays[overlay]
    config = config_from_env(server_env(objects))
    pod = deployment(objects)["spec"]["template"]["spec"]
    drain = config.drain_delay_s + config.drain_grace_s
    margin = 5  # interpreter exit, metrics listener shutdown, kubelet/runtime latency
    assert pod["terminationGracePeriodSeconds"] >= drain + margin, (
        f"terminationGracePeriodSeconds={pod['terminationGracePeriodSeconds']} must exceed "
        f"drain_delay_s + drain_grace_s = {drain} by {margin}s, or SIGKILL cuts the drain short")
    # The liveness probe must not kill a draining pod: NOT_SERVING for the whole drain stays under its budget.
    live = container(objects)["livenessProbe"]
    if probe_service(live):
        assert live["periodSeconds"] * live["failureThreshold"] > drain


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pod_runs_non_root_read_only_without_privilege_escalation(overlay: str, overlays: Any) -> None:
    pod = deployment(overlays[overlay])["spec"]["template"]["spec"]
    c = container(overlays[overlay])
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = pod["securityContext"]["runAsUser"]
    assert uid != 0
    for dockerfile in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        user = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)[-1]
        assert user.split(":")[0] == str(uid), f"{dockerfile.name} runs as {user}, the pod as {uid}"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged", False) is False
    assert pod.get("automountServiceAccountToken") is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be writable on a read-only root filesystem"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_requests_and_limits_are_set(overlay: str, overlays: Any) -> None:
    resources = container(overlays[overlay])["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part]), f"{part} needs cpu and memory"
    assert resources["requests"]["memory"] == resources["limits"]["memory"], "memory: request == limit"


def test_cpu_overlay_sizes_onnx_runtime_threads_to_its_cpus(overlays: Any) -> None:
    objects = overlays["cpu"]
    config = config_from_env(server_env(objects))
    limits = container(objects)["resources"]["limits"]
    assert config.provider == "cpu"
    assert "nvidia.com/gpu" not in limits
    # The measured layout (benchmarks/README.md): one batch per CPU, one ONNX Runtime thread each.
    assert config.intra_op_threads == 1
    assert config.workers * config.intra_op_threads == int(limits["cpu"]), "workers x threads = the CPU limit"
    assert "rosetta-cpu" in container(objects)["image"]


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes(overlays: Any) -> None:
    objects = overlays["gpu"]
    config = config_from_env(server_env(objects))
    pod = deployment(objects)["spec"]["template"]["spec"]
    resources = container(objects)["resources"]
    assert config.provider == "cuda"
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
        resources["limits"]["nvidia.com/gpu"]
    assert pod["nodeSelector"], "GPU pods need a node selector"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), "GPU nodes are usually tainted"
    assert "rosetta-gpu" in container(objects)["image"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_images_are_set_by_the_overlay(overlay: str, overlays: Any) -> None:
    image = container(overlays[overlay])["image"]
    assert "/" in image and ":" in image.rsplit("/", 1)[-1], f"{image}: the placeholder was not replaced"


# ---- scaling and availability -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_hpa_and_pdb_target_the_deployment(overlay: str, overlays: Any) -> None:
    objects = overlays[overlay]
    dep = deployment(objects)
    hpa = one(objects, "HorizontalPodAutoscaler", "rosetta")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rosetta"}
    pdb = one(objects, "PodDisruptionBudget", "rosetta")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # A voluntary disruption (node drain) never takes the last serving pod.
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_cpu_overlay_scales_on_cpu(overlays: Any) -> None:
    metrics = one(overlays["cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]


def test_gpu_overlay_scales_on_a_metric_served_by_prometheus_adapter(overlays: Any) -> None:
    metrics = one(overlays["gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"]
    name = metrics[0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {r["name"]["as"]: r for r in rules}
    assert name in exposed, f"HPA metric {name} is not exposed by deploy/prometheus-adapter ({sorted(exposed)})"
    rule = exposed[name]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a Pods metric needs pod and namespace"
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])


# ---- monitoring objects -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_service_monitor_scrapes_the_metrics_port_of_each_pod_once(
        overlay: str, overlays: Any, server_defaults: Any) -> None:
    objects = overlays[overlay]
    monitor = one(objects, "ServiceMonitor", "rosetta")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert selected, "the ServiceMonitor selects no Service"
    for endpoint in monitor["spec"]["endpoints"]:
        exposing = [s for s in selected if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])]
        assert len(exposing) == 1, f"port {endpoint['port']} must be on exactly one selected Service"
        port = next(p for p in exposing[0]["spec"]["ports"] if p["name"] == endpoint["port"])
        container_ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
        assert container_ports[port["targetPort"]] == server_defaults.metrics_port
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_grafana_dashboard_configmap_is_the_dashboard_file(overlays: Any) -> None:
    cm = one(overlays["cpu"], "ConfigMap", "rosetta-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["rosetta-dashboard.json"] == (DEPLOY / "grafana" / "rosetta-dashboard.json").read_text()


def test_kustomizations_list_every_manifest_in_their_folder() -> None:
    """A manifest dropped next to a kustomization but not listed in it would silently never be applied."""
    for kustomization in sorted(DEPLOY.rglob("kustomization.yaml")):
        spec = yaml.safe_load(kustomization.read_text())
        listed = set(spec.get("resources", [])) | {p["path"] for p in spec.get("patches", []) if "path" in p}
        for gen in spec.get("configMapGenerator", []):
            listed |= set(gen.get("envs", [])) | set(gen.get("files", []))
        here = {p.name for p in kustomization.parent.iterdir()
                if p.suffix in (".yaml", ".yml", ".env", ".json") and p.name != "kustomization.yaml"}
        promtool_files = {"rules.yml", "rules_test.yml"}  # rules.yml reaches kustomize through render.py
        unused = here - {Path(x).name for x in listed} - promtool_files
        assert not unused, f"{kustomization.relative_to(DEPLOY)} does not use {sorted(unused)}"
