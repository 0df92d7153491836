"""deploy/k8s: each overlay renders, validates, and scales and probes what streamd serves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
#: The oldest Kubernetes release the manifests target; they are validated against it and the newest
#: release whose schemas kubernetes-validate bundles.
K8S_MIN_VERSION = "1.30.0"
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}

Obj = dict[str, Any]


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def containers(deployment: Obj) -> list[Obj]:
    return deployment["spec"]["template"]["spec"]["containers"]


def env_of(objs: list[Obj], container: Obj) -> dict[str, str | None]:
    """A container's environment: envFrom ConfigMaps first, then env (None: from a Secret)."""
    maps = by_kind(objs, "ConfigMap")
    env: dict[str, str | None] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]]["data"])
    for e in container.get("env") or []:
        env[e["name"]] = e.get("value")
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_core_objects_validate(rendered, overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    objs = rendered[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} | CRD_KINDS <= kinds
    for o in objs:
        if o["kind"] in CRD_KINDS:
            continue  # not in kubernetes-validate's schemas: checked field by field below
        try:
            for version in (K8S_MIN_VERSION, kv.latest_version()):
                kv.validate(o, version, strict=True)
        except Exception as exc:  # kubernetes-validate raises its own or jsonschema's ValidationError
            pytest.fail(f"{overlay}: {o['kind']}/{o['metadata']['name']} is invalid: {exc}")
    assert all(o["metadata"].get("namespace") == "streamd" for o in objs if o["kind"] != "Namespace")


def test_secret_example_validates_and_is_marked(secret_example) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(secret_example, kv.latest_version(), strict=True)
    text = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE ONLY" in text
    data = secret_example["stringData"]
    for key in ("broker-url", "redis-url", "kafka-sasl-username", "kafka-sasl-password"):
        assert "CHANGE-ME" in data[key], f"{key}: placeholder values only"
    # It is not part of any kustomization, so `kubectl apply -k` never overwrites the real Secret.
    for k in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(k.read_text()).get("resources") or []
        assert not any("secret" in r for r in listed), f"{k.relative_to(ROOT)} must not apply the example Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_the_secret(rendered, secret_example, overlay: str) -> None:
    objs = rendered[overlay]
    name = secret_example["metadata"]["name"]
    keys = set(secret_example["stringData"])
    assert not by_kind(objs, "Secret"), "credentials are not shipped in the kustomization"
    for dep in by_kind(objs, "Deployment").values():
        for c in containers(dep):
            refs = {
                e["name"]: e["valueFrom"]["secretKeyRef"]
                for e in c.get("env") or []
                if "secretKeyRef" in (e.get("valueFrom") or {})
            }
            assert {"STREAMD_BROKER_URL", "STREAMD_REDIS_URL"} <= set(refs), dep["metadata"]["name"]
            for var, ref in refs.items():
                assert ref["name"] == name
                assert ref["key"] in keys, f"{var}: key {ref['key']!r} is missing from secret.example.yaml"
            plain = env_of(objs, c)
            for var in ("STREAMD_BROKER_URL", "STREAMD_REDIS_URL", "STREAMD_KAFKA_SASL_PASSWORD"):
                assert plain.get(var) is None, f"{var} must come from the Secret, not plain text"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probe_drain_and_limit(rendered, overlay: str, default_metrics_port, default_drain_s) -> None:
    objs = rendered[overlay]
    deployments = by_kind(objs, "Deployment")
    assert set(deployments) >= {"streamd-ingest", "streamd-worker-cpu", "streamd-worker-gpu"}
    for name, dep in deployments.items():
        assert "replicas" not in dep["spec"], f"{name}: the ScaledObject owns replicas"
        pod = dep["spec"]["template"]["spec"]
        for c in pod["containers"]:
            env = env_of(objs, c)
            port = int(env.get("STREAMD_METRICS_PORT") or default_metrics_port)
            drain = float(env.get("STREAMD_DRAIN_TIMEOUT_S") or default_drain_s)
            assert pod["terminationGracePeriodSeconds"] >= drain + 10, (
                f"{name}: terminationGracePeriodSeconds must exceed STREAMD_DRAIN_TIMEOUT_S={drain}"
            )
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert named.get("metrics") == port, f"{name}: container port 'metrics' must be {port}"
            for probe, path in (
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
                ("startupProbe", "/healthz"),
            ):
                get = c[probe]["httpGet"]
                assert get["path"] == path, f"{name}: {probe}"
                assert named.get(get["port"], get["port"]) == port, f"{name}: {probe} port"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: resources.{kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        topo = volumes[mounts["/etc/streamd"]]["configMap"]["name"]
        assert "topology.yaml" in by_kind(objs, "ConfigMap")[topo]["data"]


def test_gpu_overlay_requests_a_gpu_and_the_cpu_overlay_none(rendered) -> None:
    for overlay in OVERLAYS:
        for name, dep in by_kind(rendered[overlay], "Deployment").items():
            pod = dep["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            if overlay == "gpu" and name == "streamd-worker-gpu":
                assert int(gpus) == 1
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
                assert c["image"].endswith("-gpu"), c["image"]
                assert (env_of(rendered[overlay], c)["STREAMD_ONNX_PROVIDERS"] or "").startswith("cuda")
            else:
                assert gpus is None, f"{overlay}: {name} must not request a GPU"
                assert not c["image"].endswith("-gpu"), f"{overlay}: {name} runs the CPU image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_podmonitor_use_the_metrics_port(rendered, overlay: str, default_metrics_port) -> None:
    objs = rendered[overlay]
    deployments = by_kind(objs, "Deployment")
    for name, svc in by_kind(objs, "Service").items():
        (port,) = svc["spec"]["ports"]
        assert port["port"] == default_metrics_port and port["targetPort"] == "metrics"
        selected = [
            d
            for d in deployments.values()
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"Service {name} selects no Deployment"
    for name, pm in by_kind(objs, "PodMonitor").items():
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        selector = pm["spec"]["selector"]["matchLabels"]
        scraped = [
            d for d in deployments.values() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(scraped) == len(deployments), f"PodMonitor {name} must select every streamd pod"
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert ep["path"] == "/metrics"
            for d in scraped:
                assert ep["port"] in {p["name"] for c in containers(d) for p in c["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budgets_cover_every_deployment(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    pdbs = by_kind(objs, "PodDisruptionBudget")
    for name, dep in by_kind(objs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}: expected one PodDisruptionBudget"
        assert "maxUnavailable" in covering[0]["spec"], "maxUnavailable, so a single replica can still be drained"


def _check_scaled_object(so: Obj, objs: list[Obj]) -> None:
    """The fields KEDA requires, and references that resolve."""
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]["name"]
    assert target in by_kind(objs, "Deployment"), f"{so['metadata']['name']}: no Deployment {target}"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "a ScaledObject needs triggers"
    auths = by_kind(objs, "TriggerAuthentication")
    for t in spec["triggers"]:
        assert t["type"] and isinstance(t["metadata"], dict)
        assert all(isinstance(v, str) for v in t["metadata"].values()), "trigger metadata values are strings"
        if "authenticationRef" in t:
            assert t["authenticationRef"]["name"] in auths


def _check_trigger_auth(ta: Obj, secret: Obj) -> None:
    assert ta["apiVersion"] == "keda.sh/v1alpha1"
    refs = ta["spec"]["secretTargetRef"]
    assert refs
    for ref in refs:
        assert ref["parameter"] and ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], f"{ta['metadata']['name']}: {ref['key']} not in the example"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects(rendered, secret_example, overlay: str) -> None:
    objs = rendered[overlay]
    for so in by_kind(objs, "ScaledObject").values():
        _check_scaled_object(so, objs)
    for ta in by_kind(objs, "TriggerAuthentication").values():
        _check_trigger_auth(ta, secret_example)
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in by_kind(objs, "ScaledObject").values()}
    assert scaled == set(by_kind(objs, "Deployment")), "every Deployment is autoscaled by KEDA"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_scales_on_lag_up_to_the_partition_count(rendered, topology, overlay: str) -> None:
    objs = rendered[overlay]
    so = by_kind(objs, "ScaledObject")["streamd-ingest"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == topology.group_id
    assert meta["topic"] in topology.source_partitions
    assert int(so["spec"]["maxReplicaCount"]) <= topology.source_partitions[meta["topic"]], (
        "more ingest replicas than partitions would sit idle"
    )
    assert meta.get("allowIdleConsumers", "false") == "false"
    # The bootstrap servers are read from the pod's own environment.
    (c,) = containers(by_kind(objs, "Deployment")["streamd-ingest"])
    assert env_of(objs, c).get(meta["bootstrapServersFromEnv"])
    (c,) = containers(by_kind(objs, "Deployment")[so["spec"]["scaleTargetRef"]["name"]])
    assert c["args"][0] == "run"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_scale_on_their_queue(rendered, topology, overlay: str) -> None:
    objs = rendered[overlay]
    deployments = by_kind(objs, "Deployment")
    served = {}
    for so in by_kind(objs, "ScaledObject").values():
        (c,) = containers(deployments[so["spec"]["scaleTargetRef"]["name"]])
        if c["args"][0] != "worker":
            continue
        queues = c["args"][c["args"].index("--queues") + 1].split(",")
        assert len(queues) == 1, "one Deployment per queue, so each scales on its own queue"
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["queueName"] == topology.celery_queue(queues[0])
        served[queues[0]] = so["metadata"]["name"]
    assert topology.queues <= set(served), f"no autoscaled worker for queues {sorted(topology.queues - set(served))}"


def test_topology_configmap_is_the_topology_file() -> None:
    src = ROOT / "topologies" / "surface-inspection.yaml"
    if not src.exists():
        pytest.skip("topologies/surface-inspection.yaml does not exist yet")
    copy = K8S / "base" / "topology.yaml"
    assert copy.read_bytes() == src.read_bytes(), (
        "deploy/k8s/base/topology.yaml differs from topologies/surface-inspection.yaml; run\n"
        "  cp topologies/surface-inspection.yaml deploy/k8s/base/topology.yaml"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_sasl_component_renders(render, secret_example, overlay: str) -> None:
    """components/kafka-sasl composes with each overlay and points KEDA at the Secret."""
    with tempfile.TemporaryDirectory() as tmp:
        here = Path(tmp)
        rel = Path(os.path.relpath(K8S, here))  # kustomize refuses absolute paths
        (here / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [str(rel / "overlays" / overlay)],
                    "components": [str(rel / "components" / "kafka-sasl")],
                }
            )
        )
        objs = render(here)
    so = by_kind(objs, "ScaledObject")["streamd-ingest"]
    assert so["spec"]["triggers"][0]["authenticationRef"]["name"] == "streamd-kafka"
    _check_scaled_object(so, objs)
    ta = by_kind(objs, "TriggerAuthentication")["streamd-kafka"]
    assert ta["metadata"]["namespace"] == "streamd"
    _check_trigger_auth(ta, secret_example)
    assert {r["parameter"] for r in ta["spec"]["secretTargetRef"]} >= {"sasl", "username", "password"}
