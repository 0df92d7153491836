"""The daemon's hand-off: validate input messages, claim-check them in Redis, dispatch their runs.

:class:`Ingestor` has no Kafka consumer of its own (the faust agents in
:mod:`streamd.daemon` feed it), so it is tested directly. :meth:`Ingestor.handle`
returns only when every message of the batch is either handed off (payload in
Redis and root stages dispatched to the broker) or dead-lettered (acknowledged
by Kafka). The root stage tasks are confirmed by the broker when it returns,
or, with the daemon's confirm pipeline, it returns their tickets and the
caller waits for those confirms. The caller acknowledges the Kafka offsets
after that, and never before: a crash in between re-reads the messages, and
their deterministic run ids make the replay overwrite, not add.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import tp
from .dag import Plan
from .deadletters import DeadLetter, DeadLetterSink
from .exceptions import ProtocolError
from .nodes.base import Origin, RunContext
from .runs import Batch, RunStore, run_id_for
from .topology import SourceSpec, Topology

__all__ = ["InMessage", "Ingestor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Ingestor:
    def __init__(self, *, topology: Topology, plan: Plan, store: RunStore, dispatch: Any,
                 dead_letters: DeadLetterSink, metrics: Any = None) -> None:
        self.topology = topology
        self.plan = plan
        self.store = store
        self.dispatch = dispatch
        self.dead_letters = dead_letters
        self.metrics = metrics
        self._sample_counter: dict[str, int] = {}

    # -- capacity (backpressure) -----------------------------------------------------
    def room(self, topic: str) -> int:
        """How many more runs this topic may put in flight now."""
        spec = self.topology.source(topic)
        return spec.max_in_flight - self.store.in_flight(topic)

    # -- the hand-off ----------------------------------------------------------------
    def _decode(self, spec: SourceSpec, m: InMessage) -> RunContext:
        msg = tp.decode(m.value, kinds=(spec.kind,), max_bytes=spec.max_message_bytes)
        source = msg["source"]
        if spec.allowed_sources and source not in spec.allowed_sources:
            raise ProtocolError(
                f"source {source!r} is not in the allowed_sources of topic {spec.topic!r}; "
                "add it to the topology if this device is expected",
                reason="unknown_source", field="source",
            )
        origin = Origin(m.topic, m.partition, m.offset)
        meta = msg.get("meta")
        return RunContext(
            topology=self.topology.name, run_id=run_id_for(self.topology.name, origin), origin=origin,
            kind=spec.kind, source=source, seq=int(msg["seq"]), ts=float(msg["ts"]),
            meta=meta if isinstance(meta, dict) else {},
        )

    def handle(self, messages: Sequence[InMessage]) -> list[Any]:
        """Hand a batch off; return what dispatching its root stages returned (tickets to wait for, with the
        daemon's confirm pipeline; nothing when dispatching waits for the broker itself)."""
        letters: list[DeadLetter] = []
        tickets: list[Any] = []
        admitted: list[tuple[RunContext, bytes]] = []
        for m in messages:
            spec = self.topology.source(m.topic)
            try:
                run = self._decode(spec, m)
            except ProtocolError as exc:
                letters.append(DeadLetter(Origin(m.topic, m.partition, m.offset), exc.reason, str(exc), "ingest",
                                          _source_hint(m)))
                continue
            assert m.value is not None
            admitted.append((run, m.value))
        admitted, shed = self._overload(admitted)
        letters += shed
        if admitted:
            self.store.admit(admitted)
            batch = Batch.of([run for run, _ in admitted])
            for stage in self.plan.roots():
                ticket = self.dispatch(stage, batch)
                if ticket is not None:
                    tickets.append(ticket)
        self.dead_letters.publish(letters)
        if self.metrics is not None:
            for topic, n in Counter(run.origin.topic for run, _ in admitted).items():
                self.metrics.frames_ingested.labels(self.topology.name, topic).inc(n)
        return tickets

    def _overload(self, admitted: list[tuple[RunContext, bytes]]) -> tuple[list[tuple[RunContext, bytes]],
                                                                             list[DeadLetter]]:
        """Apply each source's overload policy; ``block`` is applied by the caller before handle()."""
        letters: list[DeadLetter] = []
        kept: list[tuple[RunContext, bytes]] = []
        by_topic: dict[str, list[tuple[RunContext, bytes]]] = {}
        for item in admitted:
            by_topic.setdefault(item[0].origin.topic, []).append(item)
        for topic, items in by_topic.items():
            spec = self.topology.source(topic)
            if spec.overload == "block":
                kept += items
                continue
            room = self.room(topic)
            if spec.overload == "sample" and room < len(items):
                sampled = []
                for item in items:
                    n = self._sample_counter.get(topic, 0)
                    self._sample_counter[topic] = n + 1
                    if n % spec.sample_every == 0:
                        sampled.append(item)
                    else:
                        letters.append(self._dropped(item[0], f"sampled 1 in {spec.sample_every} while "
                                                     f"{spec.max_in_flight} runs are in flight"))
                items = sampled
            if len(items) > spec.max_in_flight:  # more new runs than the limit: shed the oldest new ones
                for run, _ in items[: len(items) - spec.max_in_flight]:
                    letters.append(self._dropped(run, "newer frames arrived before it could be admitted"))
                items = items[len(items) - spec.max_in_flight:]
            over = len(items) - max(0, self.room(topic))
            if over > 0:
                if spec.overload == "drop_oldest":
                    for _, origin, source in self.store.pop_oldest(topic, over):
                        letters.append(DeadLetter(origin, "dropped", "oldest frame in flight shed for a newer one "
                                                  f"(overload: drop_oldest, max_in_flight {spec.max_in_flight})",
                                                  "ingest", source))
                else:  # sample, still over: shed the oldest of this batch
                    for run, _ in items[:over]:
                        letters.append(self._dropped(run, f"over max_in_flight {spec.max_in_flight} after sampling"))
                    items = items[over:]
            kept += items
        if self.metrics is not None:
            for d in letters:
                reason = self.topology.source(d.origin.topic).overload  # drop_oldest or sample
                self.metrics.frames_dropped.labels(self.topology.name, d.origin.topic, reason).inc()
        return kept, letters

    def _dropped(self, run: RunContext, why: str) -> DeadLetter:
        return DeadLetter(run.origin, "dropped", why, "ingest", run.source)


def _source_hint(m: InMessage) -> str | None:
    """The source id of a message we could not decode: the Kafka key, when it is text."""
    if not m.key:
        return None
    try:
        return m.key.decode("utf-8")[:200]
    except UnicodeDecodeError:
        return None
