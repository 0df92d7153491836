"""deploy/compose: the files are accepted by docker-compose and wired as documented."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"

STREAMD_SERVICES = {"ingest": None, "worker-cpu": "cpu", "worker-gpu": "gpu"}


def _seconds(value: str | int) -> float:
    """Compose durations: 45s, 1m30s, 500ms, or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_files(files: list[str], compose_cmd: list[str]) -> None:
    cmd = compose_cmd
    args = [a for f in files for a in ("-f", str(COMPOSE_DIR / f))]
    # Interpolated variables must have defaults: run with none of them set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMD_", "RABBITMQ_", "GRAFANA_", "COMPOSE_"))}
    out = subprocess.run([*cmd, *args, "config"], capture_output=True, text=True, timeout=120, env=env, cwd=COMPOSE_DIR)
    assert out.returncode == 0, out.stderr
    assert "is not set" not in out.stderr, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(STREAMD_SERVICES) <= set(resolved["services"])


def test_streamd_services_run_the_right_command(compose, default_drain_s) -> None:
    services = compose["services"]
    assert services["ingest"]["command"] == ["run", "/etc/streamd/topology.yaml"]
    for name, queue in STREAMD_SERVICES.items():
        svc = services[name]
        if queue:
            assert svc["command"] == ["worker", "/etc/streamd/topology.yaml", "--queues", queue]
        # The topology file is mounted where the command reads it.
        assert any(v.endswith(":/etc/streamd/topology.yaml:ro") for v in svc["volumes"]), name
        host = svc["volumes"][0].split(":")[0]
        assert (COMPOSE_DIR / host).resolve() == ROOT / "topologies" / "surface-inspection.yaml"
        assert svc["build"]["context"] == "../.."
        drain = float(svc["environment"].get("STREAMD_DRAIN_TIMEOUT_S", default_drain_s))
        grace = _seconds(svc["stop_grace_period"])
        assert grace >= drain + 10, f"{name}: stop_grace_period {grace}s must exceed the drain bound {drain}s"
        # Start only after the topics exist and Redis and RabbitMQ answer.
        deps = svc["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == deps["rabbitmq"]["condition"] == "service_healthy"


def test_workers_serve_each_queue_of_the_topology(compose, topology) -> None:
    served = {q for q in STREAMD_SERVICES.values() if q}
    assert topology.queues <= served, f"no compose worker for queues {sorted(topology.queues - served)}"


def test_kafka_init_creates_the_topology_topics(compose, topology) -> None:
    spec = compose["services"]["kafka-init"]["environment"]["KAFKA_TOPICS"]
    created = {t: int(p) for t, p in (item.split(":") for item in spec.split())}
    assert created == topology.topics, (
        f"KAFKA_TOPICS in deploy/compose/compose.yaml must create the topology's topics with its partition "
        f"counts: {topology.topics}"
    )


def test_kafka_is_one_kraft_node(compose) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert compose["services"]["ingest"]["environment"]["STREAMD_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_rabbitmq_consumer_timeout_is_set(compose) -> None:
    mounts = compose["services"]["rabbitmq"]["volumes"]
    conf = [m for m in mounts if "/etc/rabbitmq/conf.d/" in m]
    assert conf, "rabbitmq.conf must be mounted into /etc/rabbitmq/conf.d/"
    text = (COMPOSE_DIR / conf[0].split(":")[0]).read_text()
    match = re.search(r"^consumer_timeout\s*=\s*(\d+)\s*$", text, flags=re.MULTILINE)
    assert match, "consumer_timeout must be set in deploy/compose/rabbitmq.conf"
    assert int(match[1]) >= 3600 * 1000, "consumer_timeout below 1 h: long inferences with acks_late would be cut"
    # The broker URL's credentials are the ones RabbitMQ is started with.
    env = compose["services"]["rabbitmq"]["environment"]
    url = compose["services"]["ingest"]["environment"]["STREAMD_BROKER_URL"]
    assert url.startswith(f"amqp://{env['RABBITMQ_DEFAULT_USER']}:{env['RABBITMQ_DEFAULT_PASS']}@rabbitmq:5672/")


def test_gpu_override_uses_the_gpu_image_and_reserves_a_gpu(compose_gpu) -> None:
    svc = compose_gpu["services"]["worker-gpu"]
    assert svc["build"] == {"context": "../..", "target": "gpu"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc["environment"]["STREAMD_ONNX_PROVIDERS"].split(",")[0] in ("cuda", "tensorrt")
    assert set(compose_gpu["services"]) == {"worker-gpu"}, "the override only changes the gpu worker"


def test_prometheus_and_grafana_mount_the_shipped_config(compose) -> None:
    prom = compose["services"]["prometheus"]
    assert "../prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    graf = compose["services"]["grafana"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in graf["volumes"]
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in graf["volumes"]


def _prometheus_config() -> dict:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    if not path.exists():
        pytest.skip("deploy/prometheus/prometheus.yml does not exist yet")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_prometheus_scrapes_the_compose_services_on_the_metrics_port(compose, default_metrics_port) -> None:
    config = _prometheus_config()
    targets: list[tuple[str, int | None]] = []
    for job in config.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for t in sc.get("targets") or []:
                host, _, port = t.rpartition(":")
                targets.append((host, int(port)) if host else (t, None))
        for sd in job.get("dns_sd_configs") or []:
            targets.extend((n, sd.get("port")) for n in sd.get("names") or [])
    streamd_targets = [(h, p) for h, p in targets if h in STREAMD_SERVICES]
    assert {h for h, _ in streamd_targets} == set(STREAMD_SERVICES), (
        f"prometheus.yml should scrape the compose services {sorted(STREAMD_SERVICES)}; found targets {targets}"
    )
    for host, port in streamd_targets:
        expected = int(compose["services"][host]["environment"].get("STREAMD_METRICS_PORT", default_metrics_port))
        assert port == expected, f"{host}: scraped on {port}, serves metrics on {expected}"


def test_prometheus_rule_files_resolve_inside_the_mount() -> None:
    config = _prometheus_config()
    rules = config.get("rule_files") or []
    assert rules, "prometheus.yml should load deploy/prometheus/alerts.yml"
    for rule in rules:
        path = Path(rule)
        local = DEPLOY / "prometheus" / (path.relative_to("/etc/prometheus") if path.is_absolute() else path)
        assert list(local.parent.glob(local.name)), f"rule_files entry {rule!r} matches no file in deploy/prometheus/"


def test_grafana_provisioning_matches_the_mounts() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    if not prov.exists():
        pytest.skip("deploy/grafana/provisioning does not exist yet")
    for f in sorted((prov / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(f.read_text()).get("providers") or []:
            path = (provider.get("options") or {}).get("path", "")
            assert path.startswith("/var/lib/grafana/dashboards"), (
                f"{f.relative_to(ROOT)}: provider path {path!r}; compose mounts the dashboards at "
                "/var/lib/grafana/dashboards"
            )
    for f in sorted((prov / "datasources").glob("*.y*ml")):
        for ds in yaml.safe_load(f.read_text()).get("datasources") or []:
            if ds.get("type") == "prometheus":
                assert ds.get("url", "").startswith("http://prometheus:9090"), (
                    f"{f.relative_to(ROOT)}: the compose Prometheus is http://prometheus:9090"
                )
