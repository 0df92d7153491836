"""Topologies: load a YAML file, check it, and build its Nodes.

A topology names its sources (Kafka topics and the kind of TP message they
carry), its sinks (results, anomalies and dead-letter topics) and its Nodes
(type, params, queue, parents). :func:`load` checks everything before
anything runs: known Node types, valid params, parents that exist, no cycle,
every Node reaching a sink. Errors name the Node and the YAML path, e.g.
``topologies/x.yaml: at nodes.score.parents[1]: unknown parent 'detectr'``.
The file format is described in ``docs/topologies.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Settings
from .exceptions import TopologyError
from .nodes.base import Node, NodeEnv, resolve

__all__ = ["SourceSpec", "SinkSpec", "NodeSpec", "Topology", "load", "parse"]

OVERLOAD_POLICIES = ("block", "drop_oldest", "sample")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_QUEUE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class SourceSpec:
    topic: str
    kind: str
    partitions: int = 3
    max_in_flight: int = 64
    overload: str = "block"
    sample_every: int = 2
    max_message_bytes: int = 16 * 1024 * 1024
    allowed_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class SinkSpec:
    name: str
    topic: str
    partitions: int = 3


@dataclass(frozen=True)
class NodeSpec:
    id: str
    type: str
    queue: str = "cpu"
    parents: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 2
    fuse: bool = True


@dataclass
class Topology:
    name: str
    sources: tuple[SourceSpec, ...]
    sinks: dict[str, SinkSpec]
    nodes: dict[str, NodeSpec]
    description: str = ""
    fusion: bool = True
    batch_max: int = 16
    batch_wait_ms: float = 5.0
    batch_busy_wait_ms: float = 40.0
    file: str = ""
    base_dir: Path = field(default_factory=Path.cwd)
    order: tuple[str, ...] = ()

    # -- graph queries -----------------------------------------------------------
    def children(self, node_id: str) -> list[str]:
        return [n for n in self.order if node_id in self.nodes[n].parents]

    def roots(self) -> list[str]:
        return [n for n in self.order if not self.nodes[n].parents]

    def queues(self) -> list[str]:
        return sorted({n.queue for n in self.nodes.values()})

    def celery_queue(self, queue: str) -> str:
        """The broker queue name for a logical queue: ``streamd.<topology>.<queue>``."""
        return f"streamd.{self.name}.{queue}"

    def shedding_topics(self) -> frozenset[str]:
        """Source topics whose overload policy sheds runs already in flight (``drop_oldest``)."""
        return frozenset(s.topic for s in self.sources if s.overload == "drop_oldest")

    def source(self, topic: str) -> SourceSpec:
        for s in self.sources:
            if s.topic == topic:
                return s
        raise KeyError(topic)

    @property
    def group_id(self) -> str:
        return f"streamd-{self.name}"

    def all_topics(self) -> dict[str, int]:
        """Every topic this topology reads or writes, with its partition count."""
        topics = {s.topic: s.partitions for s in self.sources}
        for sink in self.sinks.values():
            topics.setdefault(sink.topic, sink.partitions)
        return topics

    def build_nodes(self, env: NodeEnv) -> dict[str, Node]:
        """Instantiate every Node (cheap: models load in ``setup``)."""
        built: dict[str, Node] = {}
        for node_id in self.order:
            spec = self.nodes[node_id]
            cls = resolve(spec.type, path=f"nodes.{node_id}.type")
            built[node_id] = cls(node_id, spec.params, env)
        return built

    def node_env(self, settings: Settings) -> NodeEnv:
        return NodeEnv(settings=settings, topology_name=self.name, base_dir=self.base_dir, sinks=self.sinks)


# -- parsing ---------------------------------------------------------------------


class _Reader:
    """Typed access to a YAML mapping that reports the YAML path on errors."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> TopologyError:
        return TopologyError(message, path=path, file=self.file)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a mapping, got {type(value).__name__}")
        return value

    def get(self, m: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in m or m[key] is None:
            if default is ...:
                raise self.fail(where, "is required")
            return default
        value = m[key]
        bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        if not isinstance(value, kind) or bad_bool:
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(where, f"must be {want}, got {value!r}")
        return value

    def positive(self, m: Mapping[str, Any], key: str, path: str, default: int) -> int:
        value = self.get(m, key, path, int, default)
        if value < 1:
            raise self.fail(f"{path}.{key}", f"must be at least 1, got {value}")
        return int(value)

    def unknown_keys(self, m: Mapping[str, Any], allowed: set[str], path: str) -> None:
        extra = sorted(set(m) - allowed)
        if extra:
            raise self.fail(
                f"{path}.{extra[0]}" if path else extra[0],
                f"unknown key {extra[0]!r}; allowed here: {', '.join(sorted(allowed))}",
            )


def _parse_sources(r: _Reader, raw: Any) -> tuple[SourceSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise r.fail("sources", "must be a non-empty list of {topic, kind}")
    out = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"sources[{i}]"
        m = r.mapping(item, path)
        r.unknown_keys(
            m,
            {"topic", "kind", "partitions", "max_in_flight", "overload", "sample_every", "max_message_bytes",
             "allowed_sources"},
            path,
        )
        topic = r.get(m, "topic", path, str)
        if not _TOPIC.match(topic):
            raise r.fail(f"{path}.topic", f"{topic!r} is not a valid Kafka topic name")
        if topic in seen:
            raise r.fail(f"{path}.topic", f"topic {topic!r} is listed twice")
        seen.add(topic)
        kind = r.get(m, "kind", path, str)
        if kind not in ("frame", "reading"):
            raise r.fail(f"{path}.kind", f"must be 'frame' or 'reading', got {kind!r}")
        overload = r.get(m, "overload", path, str, "block")
        if overload not in OVERLOAD_POLICIES:
            raise r.fail(f"{path}.overload", f"must be one of {', '.join(OVERLOAD_POLICIES)}, got {overload!r}")
        allowed = r.get(m, "allowed_sources", path, list, [])
        out.append(
            SourceSpec(
                topic=topic,
                kind=kind,
                partitions=r.positive(m, "partitions", path, 3),
                max_in_flight=r.positive(m, "max_in_flight", path, 64),
                overload=overload,
                sample_every=r.positive(m, "sample_every", path, 2),
                max_message_bytes=r.positive(m, "max_message_bytes", path, 16 * 1024 * 1024),
                allowed_sources=tuple(str(a) for a in allowed),
            )
        )
    return tuple(out)


def _parse_sinks(r: _Reader, raw: Any) -> dict[str, SinkSpec]:
    m = r.mapping(raw, "sinks")
    r.unknown_keys(m, {"results", "anomalies", "dead_letter"}, "sinks")
    sinks = {}
    for name in ("results", "anomalies", "dead_letter"):
        if name not in m:
            if name == "anomalies":
                continue
            raise r.fail(f"sinks.{name}", "is required: give it {topic: ..., partitions: ...}")
        path = f"sinks.{name}"
        sm = r.mapping(m[name], path)
        r.unknown_keys(sm, {"topic", "partitions"}, path)
        topic = r.get(sm, "topic", path, str)
        if not _TOPIC.match(topic):
            raise r.fail(f"{path}.topic", f"{topic!r} is not a valid Kafka topic name")
        sinks[name] = SinkSpec(name, topic, r.positive(sm, "partitions", path, 3))
    return sinks


def _parse_nodes(r: _Reader, raw: Any) -> dict[str, NodeSpec]:
    m = r.mapping(raw, "nodes")
    if not m:
        raise r.fail("nodes", "must name at least one Node")
    nodes = {}
    for node_id, item in m.items():
        path = f"nodes.{node_id}"
        if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
            raise r.fail(path, f"Node id {node_id!r} must be letters, digits, '_', '-' or '.'")
        nm = r.mapping(item, path)
        r.unknown_keys(nm, {"type", "queue", "parents", "params", "retries", "fuse"}, path)
        queue = r.get(nm, "queue", path, str, "cpu")
        if not _QUEUE.match(queue):
            raise r.fail(f"{path}.queue", f"queue {queue!r} must be lower-case letters, digits, '_' or '-'")
        parents = r.get(nm, "parents", path, list, [])
        for j, p in enumerate(parents):
            if not isinstance(p, str):
                raise r.fail(f"{path}.parents[{j}]", f"must be a Node id, got {p!r}")
        if len(set(parents)) != len(parents):
            raise r.fail(f"{path}.parents", "lists a parent twice")
        retries = r.get(nm, "retries", path, int, 2)
        if retries < 0:
            raise r.fail(f"{path}.retries", "must be 0 or more")
        nodes[node_id] = NodeSpec(
            id=node_id,
            type=r.get(nm, "type", path, str),
            queue=queue,
            parents=tuple(parents),
            params=dict(r.mapping(nm.get("params") or {}, f"{path}.params")),
            retries=retries,
            fuse=r.get(nm, "fuse", path, bool, True),
        )
    return nodes


def _check_graph(r: _Reader, nodes: dict[str, NodeSpec]) -> tuple[str, ...]:
    for node_id, spec in nodes.items():
        for j, p in enumerate(spec.parents):
            if p == node_id:
                raise r.fail(f"nodes.{node_id}.parents[{j}]", f"Node {node_id!r} cannot be its own parent")
            if p not in nodes:
                raise r.fail(
                    f"nodes.{node_id}.parents[{j}]", f"unknown parent {p!r}; Nodes are: {', '.join(nodes)}"
                )
    # Kahn's algorithm, keeping YAML order among ready Nodes.
    indeg = {n: len(s.parents) for n, s in nodes.items()}
    order: list[str] = []
    ready = [n for n in nodes if indeg[n] == 0]
    if not ready:
        raise r.fail("nodes", "no root Node: at least one Node must have no parents (it reads the source topics)")
    while ready:
        n = ready.pop(0)
        order.append(n)
        for c, s in nodes.items():
            if n in s.parents:
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
    if len(order) != len(nodes):
        left = {n for n in nodes if n not in order}
        # drop Nodes that are merely downstream of the cycle: those with no child left
        while True:
            leaves = {n for n in left if not any(n in nodes[c].parents for c in left)}
            if not leaves:
                break
            left -= leaves
        cyclic = [n for n in nodes if n in left]
        raise r.fail(f"nodes.{cyclic[0]}.parents", f"the Nodes {', '.join(cyclic)} form a cycle; a topology is a DAG")
    return tuple(order)


def parse(data: Any, *, file: str = "", base_dir: Path | None = None, settings: Settings | None = None) -> Topology:
    """Check a topology given as parsed YAML; see :func:`load`."""
    r = _Reader(file)
    m = r.mapping(data, "")
    r.unknown_keys(m, {"name", "description", "version", "sources", "sinks", "nodes", "fusion", "batch"}, "")
    name = r.get(m, "name", "", str)
    if not _NAME.match(name):
        raise r.fail("name", f"{name!r} must be lower-case letters, digits, '_' or '-' (it names queues and keys)")
    batch = r.mapping(m.get("batch") or {}, "batch")
    r.unknown_keys(batch, {"max_size", "max_wait_ms", "busy_wait_ms"}, "batch")
    wait = r.get(batch, "max_wait_ms", "batch", (int, float), 5.0)
    if wait < 0:
        raise r.fail("batch.max_wait_ms", "must be 0 or more")
    busy_wait = r.get(batch, "busy_wait_ms", "batch", (int, float), max(40.0, wait))
    if busy_wait < wait:
        raise r.fail("batch.busy_wait_ms", f"must be at least max_wait_ms ({wait})")
    nodes = _parse_nodes(r, m.get("nodes"))
    topo = Topology(
        name=name,
        description=r.get(m, "description", "", str, ""),
        sources=_parse_sources(r, m.get("sources")),
        sinks=_parse_sinks(r, m.get("sinks")),
        nodes=nodes,
        fusion=r.get(m, "fusion", "", bool, True),
        batch_max=r.positive(batch, "max_size", "batch", 16),
        batch_wait_ms=float(wait),
        batch_busy_wait_ms=float(busy_wait),
        file=file,
        base_dir=base_dir or Path.cwd(),
        order=_check_graph(r, nodes),
    )
    # Node types and params: build every Node once (cheap) to run its checks.
    env = topo.node_env(settings or Settings.from_env())
    try:
        built = topo.build_nodes(env)
    except TopologyError as exc:
        if file and not exc.file:
            raise exc.in_file(file) from None
        raise
    sinks = {n for n, node in built.items() if node.is_sink}
    if not sinks:
        raise r.fail("nodes", "no sink Node (e.g. type kafka.sink): results would never be published")
    reaches = set(sinks)
    for n in reversed(topo.order):
        if any(c in reaches for c in topo.children(n)):
            reaches.add(n)
    for n in topo.order:
        if n not in reaches:
            raise r.fail(f"nodes.{n}", f"Node {n!r} reaches no sink: its output would be lost")
    return topo


def load(path: str | Path, *, settings: Settings | None = None) -> Topology:
    """Read and check a topology YAML file; raise :class:`TopologyError` naming the YAML path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"cannot read topology file: {exc.strerror}", file=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"not valid YAML: {exc}", file=str(p)) from None
    return parse(data, file=str(p), base_dir=p.resolve().parent, settings=settings)
