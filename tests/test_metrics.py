"""streamd.metrics: the metric set, its naming conventions, and that the shipped dashboard and
alert rules only use metrics (and labels) that streamd really exports."""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from streamd import metrics as metrics_mod
from streamd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamd.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOC = ROOT / "docs" / "observability.md"

#: Labels that Prometheus attaches to every scraped series (prometheus.yml and the k8s PodMonitor).
TARGET_LABELS = {"job", "instance", "component"}
#: PromQL words that look like identifiers but are not metric names.
_NAME = re.compile(r"\bstreamd_[A-Za-z0-9_:]*")


# -- the metric set -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    """One metric as Prometheus sees it: its type, the series names it exposes, its labels."""

    attr: str
    name: str
    kind: str
    labels: tuple[str, ...]

    @property
    def series(self) -> set[str]:
        if self.kind == "counter":
            return {f"{self.name}_total", f"{self.name}_created"}
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count", f"{self.name}_created"}
        return {self.name}


def exported(m: Metrics) -> dict[str, Exported]:
    out = {}
    for attr, obj in vars(m).items():
        if isinstance(obj, MetricWrapperBase):
            kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[type(obj)]
            out[obj._name] = Exported(attr, obj._name, kind, tuple(obj._labelnames))
    return out


@pytest.fixture(scope="module")
def metric_set() -> dict[str, Exported]:
    return exported(Metrics(CollectorRegistry()))


@pytest.fixture(scope="module")
def series_index(metric_set: dict[str, Exported]) -> dict[str, Exported]:
    """Every series name streamd exposes -> its metric."""
    return {s: e for e in metric_set.values() for s in e.series}


def test_metrics_build_twice_on_fresh_registries_without_touching_the_default_one() -> None:
    before = set(REGISTRY._names_to_collectors)
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    assert set(REGISTRY._names_to_collectors) == before, "Metrics(registry) must not register on the default one"
    a.frames_ingested.labels("t", "cams").inc(2)
    assert a.registry.get_sample_value("streamd_frames_ingested_total", {"topology": "t", "topic": "cams"}) == 2
    assert b.registry.get_sample_value("streamd_frames_ingested_total", {"topology": "t", "topic": "cams"}) is None


def test_building_twice_on_one_registry_is_refused_loudly() -> None:
    r = CollectorRegistry()
    Metrics(r)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(r)


def test_the_design_minimum_is_there(metric_set: dict[str, Exported]) -> None:
    """DESIGN.md, Metrics: lag per topic/partition, queue depth per queue, per-node duration, inference
    latency by model and provider, end-to-end latency, ingested, dropped by reason, expired,
    dead-lettered, published, in flight, frame-store memory."""
    want = {
        "streamd_kafka_consumer_lag": ("gauge", {"topic", "partition"}),
        "streamd_queue_depth": ("gauge", {"queue"}),
        "streamd_node_duration_seconds": ("histogram", {"node"}),
        "streamd_inference_duration_seconds": ("histogram", {"model", "provider"}),
        "streamd_end_to_end_latency_seconds": ("histogram", set()),
        "streamd_frames_ingested": ("counter", set()),
        "streamd_frames_dropped": ("counter", {"reason"}),
        "streamd_frames_expired": ("counter", set()),
        "streamd_dead_letters": ("counter", {"reason"}),
        "streamd_events_published": ("counter", {"kind"}),
        "streamd_frames_in_flight": ("gauge", set()),
        "streamd_frame_store_bytes": ("gauge", set()),
    }
    for name, (kind, labels) in want.items():
        assert name in metric_set, f"{name} is missing"
        assert metric_set[name].kind == kind, name
        assert labels <= set(metric_set[name].labels), (name, metric_set[name].labels)


def _declarations() -> Iterator[tuple[str, str, int]]:
    """(class, declared name, line) of every metric constructed in streamd/metrics.py."""
    tree = ast.parse(inspect.getsource(metrics_mod))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"):
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"metrics.py:{node.lineno}: metric names are string literals (greppable)"
            yield node.func.id, first.value, node.lineno


def test_names_follow_the_conventions(metric_set: dict[str, Exported]) -> None:
    decls = list(_declarations())
    assert len(decls) == len(metric_set), "every metric is an attribute of Metrics"
    for cls, name, line in decls:
        where = f"metrics.py:{line} {name}"
        assert re.fullmatch(r"streamd_[a-z][a-z0-9_]*[a-z0-9]", name), f"{where}: prefix streamd_, snake_case"
        assert cls in ("Counter", "Gauge", "Histogram"), f"{where}: use counters, gauges and histograms"
        if cls == "Counter":
            assert name.endswith("_total"), f"{where}: counters end in _total"
        else:
            assert not name.endswith("_total"), f"{where}: only counters end in _total"
        if cls == "Histogram" and re.search(r"duration|latency|time", name):
            assert name.endswith("_seconds"), f"{where}: latencies are histograms in seconds"
        assert not re.search(r"_(ms|millis|milliseconds|us|micros|kb|mb|kib|mib|percent)(_|$)", name), \
            f"{where}: base units (seconds, bytes, ratios)"
    for e in metric_set.values():
        for label in e.labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label) and label not in TARGET_LABELS | {"le"}, (e.name, label)


def test_every_metric_has_help_text() -> None:
    text = Metrics(CollectorRegistry()).registry.collect()
    for family in text:
        assert len(family.documentation) > 15, f"{family.name}: say what it counts, in which unit"


def test_latency_histograms_cover_milliseconds_to_a_minute() -> None:
    m = Metrics(CollectorRegistry())
    for h in (m.node_duration, m.end_to_end_latency):
        assert h._upper_bounds[0] <= 0.001 and h._upper_bounds[-2] >= 30, h._name
    assert m.inference_duration._upper_bounds[0] <= 0.0005


# -- the dashboard and the alert rules use only what exists --------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(d: dict) -> Iterator[dict]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(d: dict) -> Iterator[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query, template variables included."""
    for p in panels(d):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p["title"], t["expr"], t.get("legendFormat", "")
    for v in d["templating"]["list"]:
        q = v.get("query")
        if v.get("type") == "query":
            text = q["query"] if isinstance(q, dict) else q
            yield f"variable ${v['name']}", text, ""


def alert_rules() -> Iterator[dict]:
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        yield from group["rules"]


def _labels_in(expr: str) -> set[str]:
    """Label names an expression groups or matches by: by/without/on/ignoring lists and {matchers}."""
    found: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        found |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", expr):
        found |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return found


def check_expr(expr: str, where: str, series_index: dict[str, Exported], extra_labels: frozenset[str] = frozenset()
               ) -> set[str]:
    """Assert that every streamd_* name in ``expr`` is a series streamd exposes, and every label used
    belongs to one of them; return the metric names used."""
    names = set(_NAME.findall(expr))
    unknown = sorted(n for n in names if n not in series_index)
    assert not unknown, (
        f"{where}: {unknown} not exported by streamd (known series: {sorted(series_index)}); "
        "counters are queried as <name>_total, histograms as <name>_bucket/_sum/_count"
    )
    allowed = set(TARGET_LABELS) | set(extra_labels)
    for n in names:
        allowed |= set(series_index[n].labels)
        if n.endswith("_bucket"):
            allowed.add("le")
    if names:
        bad = _labels_in(expr) - allowed
        assert not bad, f"{where}: label(s) {sorted(bad)} do not exist on {sorted(names)}"
    return {series_index[n].name for n in names}


def test_every_dashboard_query_uses_exported_metrics_and_labels(series_index: dict[str, Exported]) -> None:
    exprs = list(dashboard_exprs(dashboard()))
    assert len(exprs) > 15
    for title, expr, legend in exprs:
        where = f"dashboard panel {title!r}: {expr}"
        used = check_expr(expr, where, series_index)
        if used:
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            assert legend_labels <= _labels_in(expr) | TARGET_LABELS, f"{where}: legend {legend!r}"
        elif "up{" not in expr:
            pytest.fail(f"{where}: a panel query without a streamd metric")


def test_every_alert_uses_exported_metrics_and_labels(series_index: dict[str, Exported]) -> None:
    rules = list(alert_rules())
    assert rules
    for rule in rules:
        where = f"alert {rule['alert']}: {rule['expr']}"
        used = check_expr(rule["expr"], where, series_index)
        assert used or "up{" in rule["expr"], f"{where}: uses no streamd metric"
        templated = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        known = _labels_in(rule["expr"]) | set(rule.get("labels", {})) | TARGET_LABELS
        assert templated <= known, f"alert {rule['alert']}: annotations use {sorted(templated - known)}"


def test_a_misspelt_metric_or_label_would_be_caught(series_index: dict[str, Exported]) -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("rate(streamd_frames_ingested[5m])", "x", series_index)  # a counter without _total
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("streamd_end_to_end_latency_seconds > 1", "x", series_index)  # a histogram, bare
    with pytest.raises(AssertionError, match="label"):
        check_expr('sum by (provider) (rate(streamd_node_duration_seconds_count{node="x"}[5m]))', "x",
                   series_index)


def test_every_metric_has_a_dashboard_panel(metric_set: dict[str, Exported],
                                            series_index: dict[str, Exported]) -> None:
    shown = {series_index[n].name for _, expr, _ in dashboard_exprs(dashboard()) for n in _NAME.findall(expr)}
    assert set(metric_set) - shown == set(), "metrics nobody can see on the dashboard"


def test_every_metric_is_documented(metric_set: dict[str, Exported]) -> None:
    doc = DOC.read_text(encoding="utf-8")
    for e in metric_set.values():
        exposed = f"{e.name}_total" if e.kind == "counter" else e.name
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{exposed}`")), None)
        assert row, f"docs/observability.md: no table row for `{exposed}`"
        assert e.kind in row, f"docs/observability.md: the row of {exposed} should say it is a {e.kind}"
        for label in e.labels:
            assert f"`{label}`" in row, f"docs/observability.md: the row of {exposed} misses label `{label}`"
    documented = set(re.findall(r"^\| `(streamd_\w+)`", doc, flags=re.M))
    known = {f"{e.name}_total" if e.kind == "counter" else e.name for e in metric_set.values()}
    assert documented <= known, f"documented but not exported: {sorted(documented - known)}"


# -- the dashboard's own structure --------------------------------------------------------------------
def test_dashboard_queries_go_through_the_datasource_variable() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"panel {p['title']!r}: say what it shows"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dashboard()):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = "\n".join(e for _, e, _ in dashboard_exprs(dashboard()))
    for needle in (
        "rate(streamd_frames_ingested_total",
        "sum by (kind) (rate(streamd_events_published_total",
        "max by (topic, partition) (streamd_kafka_consumer_lag)",
        "streamd_queue_depth",
        "histogram_quantile(0.99, sum by (node, le) (rate(streamd_node_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (model, provider, le) (rate(streamd_inference_duration_seconds_bucket",
        "streamd_inference_batch_size",
        "histogram_quantile(0.95, sum by (topology, le) (rate(streamd_end_to_end_latency_seconds_bucket",
        "sum by (topology, topic, reason) (rate(streamd_frames_dropped_total",
        "streamd_frames_expired_total",
        "sum by (reason, stage) (rate(streamd_dead_letters_total",
        "streamd_frames_in_flight",
        "streamd_frame_store_keys",
        "streamd_frame_store_bytes",
        "streamd_task_retries_total",
        "sum by (stage, outcome) (rate(streamd_stages_in_process_total",
    ):
        assert needle in exprs, needle


def test_every_alert_says_what_to_do() -> None:
    names = set()
    for rule in alert_rules():
        assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, f"{rule['alert']}: say what to do"
    assert {"StreamdConsumerLagGrowing", "StreamdQueueBacklog", "StreamdDeadLetters", "StreamdEndToEndLatencyHigh",
            "StreamdWorkerDown", "StreamdFramesDropped", "StreamdFramesExpired"} <= names
    doc = DOC.read_text(encoding="utf-8")
    for name in names:
        assert f"`{name}`" in doc, f"docs/observability.md does not explain alert {name}"
