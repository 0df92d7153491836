"""streamd.http: /metrics, /healthz, /readyz on a free port, and the multiprocess aggregation of a
prefork worker (run in a subprocess, so this process's prometheus_client state stays untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamd.http import Health, serve
from streamd.metrics import Metrics
from streamd.services import free_port

from .support import REPO, wait_for


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


class Endpoint:
    def __init__(self, port: int, metrics: Metrics, health: Health) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.metrics = metrics
        self.health = health

    def get(self, path: str) -> tuple[int, str, str]:
        return get(self.base + path)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    metrics = Metrics(CollectorRegistry())
    health = Health()
    port = free_port()
    server = serve(port, metrics.registry, health, host="127.0.0.1")
    assert server is not None
    try:
        yield Endpoint(port, metrics, health)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_serves_the_registry_in_the_exposition_format(endpoint: Endpoint) -> None:
    m = endpoint.metrics
    m.frames_ingested.labels("surface", "cams").inc(3)
    m.kafka_consumer_lag.labels("cams", "2").set(41)
    m.end_to_end_latency.labels("surface").observe(0.3)
    status, ctype, body = endpoint.get("/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")  # the Prometheus text format
    got = samples(body)
    assert got[("streamd_frames_ingested_total", (("topic", "cams"), ("topology", "surface")))] == 3
    assert got[("streamd_kafka_consumer_lag", (("partition", "2"), ("topic", "cams")))] == 41
    assert got[("streamd_end_to_end_latency_seconds_count", (("topology", "surface"),))] == 1
    assert got[("streamd_end_to_end_latency_seconds_bucket", (("le", "0.5"), ("topology", "surface")))] == 1
    # Metrics without children are still described, so dashboards know them before the first event.
    assert "# TYPE streamd_frames_dropped_total counter" in body
    assert "# HELP streamd_inference_duration_seconds " in body
    # A query string does not change the answer (Prometheus may add one).
    assert endpoint.get("/metrics?name[]=x")[0] == 200


def test_healthz_is_200_while_alive(endpoint: Endpoint) -> None:
    status, ctype, body = endpoint.get("/healthz")
    assert status == 200 and ctype == "application/json"
    d = json.loads(body)
    assert d["status"] == "alive" and d["uptime_s"] >= 0


def test_healthz_is_503_when_the_loop_stopped_beating(endpoint: Endpoint) -> None:
    endpoint.health.stale_after_s = 30
    assert endpoint.get("/healthz")[0] == 200
    endpoint.health.beat -= 60
    status, _, body = endpoint.get("/healthz")
    assert status == 503 and json.loads(body)["status"] == "stalled"
    assert json.loads(body)["last_beat_s"] >= 60


def test_readyz_names_each_failing_dependency_until_all_answered(endpoint: Endpoint) -> None:
    h = endpoint.health
    status, ctype, body = endpoint.get("/readyz")
    assert (status, ctype) == (503, "application/json")
    d = json.loads(body)
    assert d["ready"] is False
    assert set(d["dependencies"]) == {"kafka", "redis", "broker"}
    assert all(v == "not checked yet" for v in d["dependencies"].values())

    h.set("kafka", True, "ok")

    def refused() -> None:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    assert h.check("redis", refused) is False
    assert h.check("broker", lambda: None) is True
    status, _, body = endpoint.get("/readyz")
    d = json.loads(body)
    assert status == 503 and d["ready"] is False
    assert d["dependencies"] == {"kafka": "ok", "redis": "ConnectionRefusedError: [Errno 111] Connection refused",
                                 "broker": "ok"}

    assert h.check("redis", lambda: True) is True
    status, _, body = endpoint.get("/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "dependencies": {"kafka": "ok", "redis": "ok", "broker": "ok"}}

    h.set("kafka", False, "KafkaException: broker down")
    status, _, body = endpoint.get("/readyz")
    assert status == 503 and json.loads(body)["dependencies"]["kafka"] == "KafkaException: broker down"


def test_readyz_redacts_secrets_in_dependency_errors(endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMD_KAFKA_SASL_PASSWORD", "sasl-s3cret-pw")
    h = endpoint.health
    h.set("broker", False, "OperationalError: amqp://streamd:hunter2@rabbitmq:5672// refused the connection")
    h.set("redis", False, "ConnectionError: rediss://default:r3dis-pass@cache:6380/0 timed out")

    def auth_fails() -> None:
        raise RuntimeError("SASL authentication failed for user plant with password sasl-s3cret-pw")

    h.check("kafka", auth_fails)
    status, _, body = endpoint.get("/readyz")
    assert status == 503
    for secret in ("hunter2", "r3dis-pass", "sasl-s3cret-pw"):
        assert secret not in body
    deps = json.loads(body)["dependencies"]
    assert deps["broker"].startswith("OperationalError: amqp://streamd:***@rabbitmq:5672//")
    assert "rediss://default:***@cache:6380/0" in deps["redis"]
    assert "password ***" in deps["kafka"]


def test_unknown_path_is_404_and_says_what_exists(endpoint: Endpoint) -> None:
    status, ctype, body = endpoint.get("/nope")
    assert (status, ctype) == (404, "application/json")
    assert "/metrics" in body and "/readyz" in body


def test_port_zero_serves_nothing() -> None:
    assert serve(0, CollectorRegistry(), Health()) is None


# -- prefork workers: the parent's /metrics adds up its children --------------------------------------
_WORKER = textwrap.dedent("""
    import multiprocessing, os, sys

    from streamd.config import Settings
    from streamd.topology import load
    from streamd.workermetrics import worker_metrics

    port = int(sys.argv[1])
    settings = Settings.from_env({"STREAMD_METRICS_PORT": str(port),
                                  "STREAMD_REDIS_URL": "redis://:pw-in-url@127.0.0.1:1/0",
                                  "STREAMD_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
                                  "STREAMD_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    topology = load(sys.argv[2], settings=settings)
    metrics = worker_metrics(topology, settings, ["cpu"])   # as `streamd worker` does, before the fork

    def child(n):  # a prefork pool process: what the Nodes and the executor record
        metrics.frames_ingested.labels("t", "cams").inc(n)
        metrics.end_to_end_latency.labels("t").observe(0.2 * n)
        metrics.inference_duration.labels("surface-ae", "cpu").observe(0.004)
        metrics.frames_in_flight.labels("t", "cams").set(100 + n)

    ctx = multiprocessing.get_context("fork")
    pids = []
    for n in (2, 3):
        p = ctx.Process(target=child, args=(n,))
        p.start()
        p.join()
        assert p.exitcode == 0
        pids.append(p.pid)
    print("dir", os.environ["PROMETHEUS_MULTIPROC_DIR"], flush=True)
    print("ready", flush=True)
    sys.stdin.readline()                     # the test reads /metrics now
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pids[0])  # what the worker_process_shutdown hook does
    print("marked", flush=True)
    sys.stdin.readline()
""")


def test_prefork_children_are_added_up_by_the_parents_metrics_endpoint(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    errors = tmp_path / "stderr.log"
    with open(errors, "w") as err:  # a file, not a pipe: librdkafka keeps complaining there
        proc = subprocess.Popen([sys.executable, str(script), str(port),
                                 str(REPO / "topologies" / "surface-inspection.yaml")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert proc.stdin and proc.stdout
    try:
        first = proc.stdout.readline()
        assert first.startswith("dir "), first + errors.read_text()
        mpdir = Path(first.split(" ", 1)[1].strip())
        assert proc.stdout.readline().strip() == "ready"
        status, _, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        got = samples(body)
        assert got[("streamd_frames_ingested_total", (("topic", "cams"), ("topology", "t")))] == 5
        assert got[("streamd_end_to_end_latency_seconds_count", (("topology", "t"),))] == 2
        assert got[("streamd_end_to_end_latency_seconds_sum", (("topology", "t"),))] == pytest.approx(1.0)
        assert got[("streamd_inference_duration_seconds_count", (("model", "surface-ae"), ("provider", "cpu")))] == 2
        in_flight = {dict(k[1])["pid"]: v for k, v in got.items() if k[0] == "streamd_frames_in_flight"}
        assert sorted(in_flight.values()) == [102, 103], in_flight  # liveall gauges: one series per process

        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "marked"
        got = samples(get(f"http://127.0.0.1:{port}/metrics")[2])
        in_flight = {dict(k[1])["pid"]: v for k, v in got.items() if k[0] == "streamd_frames_in_flight"}
        assert sorted(in_flight.values()) == [103], "a dead process's live gauges go away"
        assert got[("streamd_frames_ingested_total", (("topic", "cams"), ("topology", "t")))] == 5, \
            "a dead process's counts stay"

        # The parent checks its dependencies for /readyz; none is reachable here, and the URL's
        # password never shows.
        def not_ready() -> dict | None:
            status, _, body = get(f"http://127.0.0.1:{port}/readyz")
            d = json.loads(body)
            return d if status == 503 and d["dependencies"]["redis"] != "not checked yet" else None

        d = wait_for(not_ready, timeout=30, what="the worker's first readiness check")
        assert "pw-in-url" not in json.dumps(d)
        assert d["dependencies"]["redis"].startswith("ConnectionError")

        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0, errors.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()
    # Without PROMETHEUS_MULTIPROC_DIR the worker made a private one and removed it at exit.
    assert mpdir.name.startswith("streamd-metrics-") and not mpdir.exists()
