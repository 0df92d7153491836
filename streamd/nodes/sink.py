"""The Kafka sink: publishes one TP ``result`` per run and an ``anomaly`` for each anomalous one.

Its parent gives a verdict (see :mod:`streamd.nodes.scoring`). Records are
keyed by the source id and sent with an idempotent producer; the Node returns
only when Kafka acknowledged every record of the batch, so a worker that dies
before that leaves the task unacknowledged and it is run again (at-least-once:
the ``event_id`` lets consumers drop the duplicate).

params: ``results`` and ``anomalies`` name sinks of the topology (defaults
"results" and "anomalies"; ``anomalies: null`` publishes no anomaly events).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..exceptions import BadInput, PublishError, TopologyError
from ..tp import encode_result
from .base import Node, NodeEnv, RunContext, register

__all__ = ["KafkaSink"]


@register("kafka.sink")
class KafkaSink(Node):
    is_sink = True

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        results = self.param("results", "results", kind=str)
        anomalies = self.param("anomalies", "anomalies", kind=(str, type(None)))
        if results not in env.sinks:
            raise TopologyError(f"sink {results!r} is not declared under sinks:",
                                path=f"nodes.{node_id}.params.results")
        if anomalies is not None and anomalies not in env.sinks:
            if "anomalies" in self.params:
                raise TopologyError(f"sink {anomalies!r} is not declared under sinks:",
                                    path=f"nodes.{node_id}.params.anomalies")
            anomalies = None
        self.results_topic = env.sinks[results].topic
        self.anomalies_topic = env.sinks[anomalies].topic if anomalies else None

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        return self.process_batch([run], [inputs])[0]

    def process_batch(self, runs: Sequence[RunContext], inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
        records = []
        kinds: list[str] = []
        now = time.time()
        for run, inp in zip(runs, inputs, strict=True):
            if len(inp) != 1:
                raise BadInput(f"expects one parent verdict, got {len(inp)}", node=self.node_id)
            v = next(iter(inp.values()))
            if not isinstance(v, Mapping) or "anomaly" not in v:
                raise BadInput("parent output is not a verdict (anomaly, score, threshold, label...)",
                               node=self.node_id)
            fields = dict(
                topology=run.topology, node=self.node_id, source=run.source or "unknown", seq=run.seq or 0,
                ts=run.ts if run.ts is not None else now, detected_at=now, anomaly=bool(v["anomaly"]),
                score=float(v["score"]), threshold=float(v["threshold"]), label=str(v["label"]),
                model=v["model"], regions=v.get("regions", []), origin=run.origin.as_dict(), meta=run.meta,
            )
            key = (run.source or "").encode()
            _, value = encode_result(kind="result", **fields)
            records.append((self.results_topic, key, value))
            kinds.append("result")
            if fields["anomaly"] and self.anomalies_topic:
                _, value = encode_result(kind="anomaly", **fields)
                records.append((self.anomalies_topic, key, value))
                kinds.append("anomaly")
        if self.env.publisher is None:
            raise PublishError(f"node {self.node_id!r}: no Kafka publisher configured in this process")
        self.env.publisher.publish(records)
        m = self.env.metrics
        if m is not None:
            published = time.time()
            for kind, n in Counter(kinds).items():
                m.events_published.labels(self.env.topology_name, kind).inc(n)
            latency = m.end_to_end_latency.labels(self.env.topology_name)  # looked up once per batch, not per run
            for run in runs:
                if run.ts is not None:
                    latency.observe(max(0.0, published - run.ts))
        return [None] * len(runs)
