"""deploy/prometheus and deploy/grafana against real tools: promtool checks the scrape config, the
alert rules (and their unit tests in alerts_test.yml) and every dashboard query; then a real
Prometheus server scrapes a running daemon and workers and the metrics are checked through its
HTTP API while traffic flows: lag builds while the workers are stopped and drains after they
restart, inference latency is recorded per execution provider, and the end-to-end latency
histogram counts exactly the results published.

Prometheus and promtool come from Debian's ``prometheus`` package (``apt-get install -y
prometheus``; scripts/test installs it when missing); the tests skip, saying so, without them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from streamd.config import Settings
from streamd.kafka import ensure_topics
from streamd.services import free_port, stop, wait_port

from .support import Procs, TopicReader, camera_frames, frame_message, make_topology, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamd.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_INSTALL = "install Debian's prometheus package (apt-get install -y prometheus; scripts/test does)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not found: {_INSTALL}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus not found: {_INSTALL}")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def dashboard_queries(*, rate_interval: str = "1m", topology: str = ".*") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query with Grafana's variables filled in."""
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$topology", topology)
            assert "$" not in expr, f"panel {p['title']!r}: a variable the tests do not know: {expr}"
            out.append((p["title"], expr))
    return out


# -- promtool -----------------------------------------------------------------------------------------
@needs_promtool
def test_promtool_accepts_the_scrape_config() -> None:
    r = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    r = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alert_rules_fire_on_their_unit_test_histories() -> None:
    r = promtool("test", "rules", "alerts_test.yml", cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    shipped = {rule["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
               for rule in g["rules"]}
    assert shipped <= tested, f"alerts without a unit test in alerts_test.yml: {sorted(shipped - tested)}"


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": expr}
                                                         for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr + "\n" + "\n".join(f"{i}: {t}: {e}" for i, (t, e)
                                                                       in enumerate(queries))


# -- a real Prometheus scraping real streamd processes ------------------------------------------------
class Prometheus:
    """A Prometheus server with the shipped config, its targets pointed at local processes."""

    def __init__(self, tmp: Path, targets: dict[str, int]) -> None:
        assert PROMETHEUS
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
        jobs = []
        for job in config["scrape_configs"]:
            component = next((r.get("replacement") for r in job.get("relabel_configs", [])
                              if r.get("target_label") == "component"), None)
            if component in targets:  # the same job and labels, a local target instead of DNS
                job.pop("dns_sd_configs", None)
                job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[component]}"]}]
                jobs.append(job)
        assert {j["job_name"] for j in jobs} == {"streamd-daemon", "streamd-worker-cpu", "streamd-worker-gpu"}
        config["scrape_configs"] = jobs
        self.port = free_port()
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_port("127.0.0.1", self.port, timeout=60, proc=self.proc, what="prometheus")
            wait_for(lambda: self._get("/-/ready")[0] == 200, timeout=60, what="prometheus ready")
        except BaseException:  # no teardown runs for a half-built fixture: do not leak the server
            self.proc.kill()
            self.proc.wait(10)
            raise

    def _get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as r:
                body = r.read()
                return r.status, json.loads(body) if body[:1] == b"{" else body
        except urllib.error.HTTPError as e:  # e.g. 503 "Service Unavailable" in plain text while starting
            body = e.read()
            return e.code, json.loads(body) if body[:1] == b"{" else body
        except OSError:
            return 0, None

    def query(self, expr: str) -> list[dict]:
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200 and body["status"] == "success", f"{expr}: {status} {body}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series (None when it yields none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait(self, expr: str, cond: Callable[[float], bool], *, timeout: float, what: str) -> float:
        def check() -> list[float]:
            v = self.value(expr)
            return [v] if v is not None and cond(v) else []  # a list: 0.0 is a value too

        try:
            return float(wait_for(check, timeout=timeout, what=what, interval=0.5)[0])
        except AssertionError as e:
            raise AssertionError(f"{e}: {expr} is {self.value(expr)}") from None

    def alerts(self) -> list[dict]:
        status, body = self._get("/api/v1/alerts")
        assert status == 200
        return body["data"]["alerts"]

    def close(self) -> None:
        stop(self.proc, timeout=15)


@dataclass
class Stack:
    prom: Prometheus
    procs: Procs
    bootstrap: str
    topology: dict
    path: Path
    ports: dict[str, int]

    @property
    def name(self) -> str:
        return str(self.topology["name"])

    @property
    def source(self) -> str:
        return str(self.topology["sources"][0]["topic"])

    def results(self) -> TopicReader:
        sink = self.topology["sinks"]["results"]
        return TopicReader(self.bootstrap, sink["topic"], sink["partitions"])

    def start_worker(self, queue: str) -> None:
        extra = ["--concurrency", "1"]
        self.procs.start(f"worker-{queue}", "worker", str(self.path), "--queues", queue, *extra,
                         env={"STREAMD_METRICS_PORT": str(self.ports[f"worker-{queue}"])})

    def up(self, component: str) -> float | None:
        return self.prom.value(f'up{{component="{component}"}}')


@pytest.fixture
def stack_factory(tmp_path: Path, procs: Procs, kafka_bootstrap: str) -> Iterator[Callable[..., Stack]]:
    started: list[Stack] = []

    def start(max_in_flight: int = 256) -> Stack:
        def edit(t: dict) -> None:
            t["sources"][0]["max_in_flight"] = max_in_flight

        path, topo = make_topology(tmp_path, edit=edit)
        ensure_topics(Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap}),
                      {s["topic"]: s["partitions"] for s in topo["sources"]}
                      | {s["topic"]: s["partitions"] for s in topo["sinks"].values()})
        ports = {c: free_port() for c in ("ingest", "worker-cpu", "worker-gpu")}
        prom = Prometheus(tmp_path, ports)
        stack = Stack(prom, procs, kafka_bootstrap, topo, path, ports)
        started.append(stack)
        procs.env["STREAMD_FRAME_TTL_S"] = "600"  # the lag test stops the workers for a while
        stack.start_worker("gpu")
        stack.start_worker("cpu")
        procs.start("daemon", "run", str(path), env={"STREAMD_METRICS_PORT": str(ports["ingest"])})
        for component in ports:
            prom.wait(f'up{{component="{component}"}}', lambda v: v == 1, timeout=120,
                      what=f"prometheus scraping {component}")
        return stack

    yield start
    for s in started:
        s.prom.close()
        if s.prom.proc.returncode not in (0, None):
            print(s.prom.log.read_text(errors="replace")[-3000:])


def produce_one_by_one(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """One record per produce request (tansu reports the high watermark right only then)."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
    for key, value in items:
        p.produce(topic, key=key, value=value)
        assert p.flush(30) == 0


def frames(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    return [(src.encode(), frame_message(src, seq, img))
            for src, seq, img, _ in camera_frames(n, cameras=3, defect_every=5, seed=seed)]


@needs_prometheus
def test_prometheus_sees_inference_by_provider_and_one_latency_sample_per_result(
        stack_factory: Callable[..., Stack]) -> None:
    s = stack_factory()
    good = frames(24, seed=3)
    produce_one_by_one(s.bootstrap, s.source, [*good[:12], (b"line1-cam00", b"\xc1 not msgpack"), *good[12:]])
    results = s.results()
    try:
        results.until(lambda ms: len(ms) >= 24, timeout=240, what="24 results")
        topo = f'topology="{s.name}"'
        # (c) one end-to-end sample per published result; the dead-lettered input has none.
        s.prom.wait(f"sum(streamd_end_to_end_latency_seconds_count{{{topo}}})", lambda v: v == 24, timeout=60,
                    what="24 end-to-end latency samples")
        assert len(results.poll()) == 24
        assert s.prom.value(f'sum(streamd_events_published_total{{{topo}, kind="result"}})') == 24
        # the daemon is scraped on its own schedule: its count may lag the workers' by a scrape
        s.prom.wait(f"sum(streamd_frames_ingested_total{{{topo}}})", lambda v: v == 24, timeout=30,
                    what="24 frames ingested")
        s.prom.wait(f'sum(streamd_dead_letters_total{{{topo}, reason="undecodable", stage="ingest"}})',
                    lambda v: v == 1, timeout=30, what="the dead letter")
        assert s.prom.value(f'streamd_end_to_end_latency_seconds_bucket{{{topo}, le="+Inf"}}') == 24
        # (b) inference latency and batch size of the model, by execution provider, from the gpu worker.
        series = s.prom.query('streamd_inference_duration_seconds_count{provider="cpu"}')
        assert [x["metric"]["model"] for x in series] == ["surface-ae"], series
        assert series[0]["metric"]["component"] == "worker-gpu"
        assert float(series[0]["value"][1]) >= 1
        assert s.prom.query('streamd_inference_duration_seconds_bucket{provider="cpu", le="+Inf"}')
        batched = s.prom.value('sum(streamd_inference_batch_size_sum{model="surface-ae"})')
        assert batched == 24, "every good frame went through the model once"
        # every Node reports its duration; each worker is scraped on its own schedule, so wait for the last one
        every_node = {"decode", "preprocess", "autoencoder", "ae_score", "quality", "combine", "publish"}

        def nodes_seen() -> set[str]:
            return {x["metric"]["node"] for x in s.prom.query(f"streamd_node_duration_seconds_count{{{topo}}}")}

        wait_for(lambda: every_node <= nodes_seen(), timeout=30, what=f"node durations of {sorted(every_node)}")
        # The daemon's gauges (refreshed every 5 s).
        s.prom.wait(f'sum(streamd_frames_in_flight{{{topo}}})', lambda v: v == 0, timeout=60,
                    what="nothing left in flight")
        s.prom.wait(f"sum(streamd_kafka_consumer_lag{{topic=\"{s.source}\"}})", lambda v: v == 0, timeout=60,
                    what="no lag once all is processed")

        # No dead panel: every dashboard query is accepted, and those of metrics this traffic
        # produced return data.
        # (rate() needs two scrapes of a series: the last ones may be just a second old.)
        quiet = ("streamd_frames_dropped_total", "streamd_frames_expired_total", "streamd_task_retries_total",
                 "streamd_stages_in_process_total",  # each worker here serves one queue
                 "streamd_compute_slot_wait_seconds_total")  # and runs no more processes than compute slots
        queries = dashboard_queries(rate_interval="5m", topology=s.name)

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries
                    if not any(q in expr for q in quiet) and not s.prom.query(expr)]

        try:
            wait_for(lambda: not empty(), timeout=30, what="data in every dashboard panel")
        except AssertionError:
            print("scrapes:", s.prom.query("count_over_time(up[10m])"), s.prom.query("min_over_time(up[10m])"))
            raise AssertionError("dashboard queries without data:\n" + "\n".join(empty())) from None
    except AssertionError:
        print(s.procs.logs())
        raise
    finally:
        results.close()


@needs_prometheus
def test_consumer_lag_builds_while_workers_are_stopped_and_drains_after_restart(
        stack_factory: Callable[..., Stack]) -> None:
    max_in_flight = 8
    s = stack_factory(max_in_flight=max_in_flight)
    lag = f'sum(streamd_kafka_consumer_lag{{topic="{s.source}"}})'
    results = s.results()
    try:
        warm = frames(6, seed=5)
        produce_one_by_one(s.bootstrap, s.source, warm)
        results.until(lambda ms: len(ms) >= 6, timeout=240, what="6 warm-up results")
        s.prom.wait(lag, lambda v: v == 0, timeout=60, what="no lag after the warm-up")

        s.procs.stop("worker-cpu")
        s.procs.stop("worker-gpu")
        for c in ("worker-cpu", "worker-gpu"):
            s.prom.wait(f'up{{component="{c}"}}', lambda v: v == 0, timeout=30, what=f"{c} seen down")
        wait_for(lambda: {a["labels"].get("component") for a in s.prom.alerts()
                          if a["labels"]["alertname"] == "StreamdWorkerDown"} >= {"worker-cpu", "worker-gpu"},
                 timeout=30, what="StreamdWorkerDown pending for both workers")

        n = 40
        produce_one_by_one(s.bootstrap, s.source, frames(n, seed=6))
        # The daemon blocks at max_in_flight: the rest stays in Kafka, uncommitted.
        high = s.prom.wait(lag, lambda v: v >= n - max_in_flight, timeout=90, what="lag building up")
        assert high <= n
        s.prom.wait(f'sum(streamd_frames_in_flight{{topic="{s.source}"}})', lambda v: v == max_in_flight,
                    timeout=30, what="the daemon blocked at max_in_flight")
        s.prom.wait(f'sum(streamd_queue_depth{{queue=~"streamd.{s.name}.(cpu|gpu)"}})',
                    lambda v: v >= 1, timeout=30, what="tasks waiting in the broker")
        assert len(results.poll()) == 6, "nothing is processed while the workers are down"

        s.start_worker("gpu")
        s.start_worker("cpu")
        results.until(lambda ms: len(ms) >= 6 + n, timeout=240, what=f"{6 + n} results after the restart")
        s.prom.wait(lag, lambda v: v == 0, timeout=60, what="lag drained after the restart")
        for c in ("worker-cpu", "worker-gpu"):
            s.prom.wait(f'up{{component="{c}"}}', lambda v: v == 1, timeout=30, what=f"{c} seen up again")
        # The TSDB holds the whole episode: it rose, then came back to 0.
        peak = s.prom.value(f"max_over_time({lag}[10m:1s])")
        assert peak is not None and peak >= n - max_in_flight
        # The restarted cpu worker counts from 0: exactly the frames processed since the restart.
        s.prom.wait(f'sum(streamd_end_to_end_latency_seconds_count{{topology="{s.name}"}})', lambda v: v == n,
                    timeout=60, what="the restarted cpu worker's latency samples")
    except AssertionError:
        print(s.procs.logs())
        raise
    finally:
        results.close()
