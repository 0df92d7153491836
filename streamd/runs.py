"""Runs in Redis: the claim check, stage outputs, fan-in joins and completion.

One input message is one *run*; runs travel between stages in *batches*
(one Celery message carries up to ``batch.max_size`` runs). Redis holds the
data: the raw input under ``frame:<run_id>`` and the outputs that a later stage
reads under ``out:<batch_id>:<node>`` (a map run_id -> output, one per Node a
stage exports), all with the frame TTL.
The Celery message holds only ids and the small run context.

Joins: a stage with several parent stages runs when the last parent adds
itself to ``join:<batch_id>:<stage>`` (a Redis set, so a parent that is run
twice after a crash is counted once). ``inflight:<topic>`` (a sorted set by
ingest time) holds the runs handed off but not finished: the backpressure
limit and the in-flight gauge read it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import redis_scripts
from .keys import Keys
from .nodes.base import Origin, RunContext
from .values import unpack_value

__all__ = ["Batch", "RunStore", "run_id_for", "batch_id_for", "member", "parse_member"]

#: The form of a batch in a stage task (:meth:`Batch.message`); a message without it is the older map per run.
MESSAGE_VERSION = 2


def run_id_for(topology: str, origin: Origin) -> str:
    """Deterministic: the same input message always gets the same run id."""
    text = f"{topology}\x1f{origin.topic}\x1f{origin.partition}\x1f{origin.offset}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def member(run: RunContext) -> str:
    """In-flight set member: enough to dead-letter the run without reading anything else."""
    return f"{run.run_id}|{run.origin.partition}|{run.origin.offset}|{run.source or ''}"


def parse_member(topic: str, value: bytes | str) -> tuple[str, Origin, str | None]:
    text = value.decode() if isinstance(value, bytes) else value
    run_id, partition, offset, source = text.split("|", 3)
    return run_id, Origin(topic, int(partition), int(offset)), source or None


def batch_id_for(run_ids: Iterable[str]) -> str:
    return hashlib.sha256("\x1f".join(run_ids).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Batch:
    """Runs that travel together through the stages."""

    batch_id: str
    runs: tuple[RunContext, ...]

    @classmethod
    def of(cls, runs: Sequence[RunContext]) -> Batch:
        return cls(batch_id_for(r.run_id for r in runs), tuple(runs))

    def message(self) -> dict[str, Any]:
        """The batch as a stage task carries it (JSON): a list per run, the topology and topics once.

        Half the size of a map per run: 3.4 against 8.2 KB for 32 frames, so a task fits under
        RabbitMQ's 4 KB threshold for keeping a message in its queue index, and JSON costs the daemon
        and the worker half as much (docs/performance.md, sixth round)."""
        topics: dict[str, int] = {}
        runs = [[r.run_id, topics.setdefault(r.origin.topic, len(topics)), r.origin.partition, r.origin.offset,
                 r.kind, r.source, r.seq, r.ts, dict(r.meta) or None] for r in self.runs]
        return {"v": MESSAGE_VERSION, "batch_id": self.batch_id,
                "topology": self.runs[0].topology if self.runs else "", "topics": list(topics), "runs": runs}

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> Batch:
        """Also reads the map-per-run form that streamd sent before the compact one (a task queued by an
        older daemon during an upgrade)."""
        if msg.get("v") != MESSAGE_VERSION:
            return cls(str(msg["batch_id"]), tuple(RunContext.from_dict(r) for r in msg["runs"]))
        topology, topics = str(msg["topology"]), msg["topics"]
        return cls(str(msg["batch_id"]), tuple(
            RunContext(topology=topology, run_id=run_id, origin=Origin(topics[t], int(partition), int(offset)),
                       kind=kind, source=source, seq=seq, ts=ts, meta=meta or {})
            for run_id, t, partition, offset, kind, source, seq, ts, meta in msg["runs"]))

    def only(self, run_ids: set[str]) -> Batch:
        """The same batch (same id, so joins still meet) with fewer runs."""
        return Batch(self.batch_id, tuple(r for r in self.runs if r.run_id in run_ids))


class RunStore:
    def __init__(self, client: redis.Redis, topology: str, ttl_s: float) -> None:
        self.r = client
        self.keys = Keys(topology)
        self.ttl_ms = int(ttl_s * 1000)
        self._admit = client.register_script(redis_scripts.ADMIT)
        self._finish = client.register_script(redis_scripts.FINISH)

    # -- ingest side ---------------------------------------------------------------
    def admit(self, items: Sequence[tuple[RunContext, bytes]]) -> None:
        """Store payloads (claim check) and mark the runs in flight: one command (:data:`redis_scripts.ADMIT`)."""
        if not items:
            return
        now = time.time()
        keys: list[str] = [self.keys.bytes()]
        args: list[bytes | str | int] = [self.ttl_ms]
        for i, (run, raw) in enumerate(items):
            keys += (self.keys.frame(run.run_id), self.keys.inflight(run.origin.topic))
            # a microsecond apart, so "oldest" keeps the arrival order within a batch
            args += (raw, member(run), repr(now + i * 1e-6), run.run_id)
        self._admit(keys=keys, args=args)

    def in_flight(self, topic: str) -> int:
        return int(self.r.zcard(self.keys.inflight(topic)))

    def prune(self, topic: str, older_than_s: float) -> list[str]:
        """Forget in-flight entries older than ``older_than_s`` (their payload has expired)."""
        key = self.keys.inflight(topic)
        cutoff = time.time() - older_than_s
        stale = list(self.r.zrangebyscore(key, "-inf", cutoff))
        if stale:
            pipe = self.r.pipeline(transaction=False)
            pipe.zrem(key, *stale)
            pipe.hdel(self.keys.bytes(), *[parse_member(topic, m)[0] for m in stale])
            pipe.execute()
        return [parse_member(topic, m)[0] for m in stale]

    def pop_oldest(self, topic: str, n: int) -> list[tuple[str, Origin, str | None]]:
        """Take the ``n`` oldest in-flight runs of a topic out, tombstone them and free their payload.

        Returns (run_id, origin, source) of each, for its dead letter."""
        popped = [parse_member(topic, m) for m, _ in self.r.zpopmin(self.keys.inflight(topic), n)]
        ids = [p[0] for p in popped]
        if ids:
            pipe = self.r.pipeline(transaction=False)
            for rid in ids:
                pipe.set(self.keys.dropped(rid), b"1", px=self.ttl_ms * 2)
                pipe.delete(self.keys.frame(rid))
            pipe.hdel(self.keys.bytes(), *ids)
            pipe.execute()
        return popped

    def store_size(self) -> tuple[int, int]:
        """(payload keys, payload bytes) held for this topology."""
        values = self.r.hvals(self.keys.bytes())
        return len(values), sum(int(v) for v in values)

    # -- worker side ---------------------------------------------------------------
    def frames(self, run_ids: Sequence[str]) -> list[bytes | None]:
        if not run_ids:
            return []
        return list(self.r.mget([self.keys.frame(r) for r in run_ids]))

    def dropped(self, run_ids: Sequence[str]) -> set[str]:
        """Which of these runs were shed by the overload policy (already dead-lettered as dropped)."""
        return self._marked(run_ids, self.keys.dropped)

    def settled(self, run_ids: Sequence[str]) -> set[str]:
        """Which of these runs already have their outcome: shed, or ended with a result or dead letter.

        A task redelivered after its runs ended (the worker died between the
        sink and the acknowledgement) finds their data gone; these runs are
        skipped rather than reported as expired."""
        return self._marked(run_ids, self.keys.dropped) | self._marked(run_ids, self.keys.ended)

    def _marked(self, run_ids: Sequence[str], key: Callable[[str], str]) -> set[str]:
        if not run_ids:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for rid in run_ids:
            pipe.exists(key(rid))
        return {rid for rid, hit in zip(run_ids, pipe.execute(), strict=True) if hit}

    def put_outputs_and_join(self, batch_id: str, stage: str, packed: Mapping[str, bytes],
                             children: Sequence[tuple[str, int]], *, redelivered: bool) -> list[bool]:
        """Store a stage's packed outputs (by Node) and record it with each child join, in one round trip.

        ``children`` are (child stage, number of its parent stages); returns, per
        child, whether this call makes it ready to dispatch. A child with one
        parent stage is always ready. For a join, exactly one parent sees True in
        normal running: the one whose record completes the set (a Redis set, so a
        parent run twice is counted once). A redelivered parent (its worker died
        mid-task) also sees True once the join is complete, so a crash between
        recording and dispatching cannot strand the runs; that may run the join
        twice, which at-least-once allows. One MULTI/EXEC: the outputs are in
        Redis before any parent can see the join complete.
        """
        pipe = self.r.pipeline(transaction=True)
        for node, value in packed.items():
            pipe.set(self.keys.output(batch_id, node), value, px=self.ttl_ms)
        joins = [(child, n) for child, n in children if n > 1]
        for child, _ in joins:
            key = self.keys.join(batch_id, child)
            pipe.sadd(key, stage)
            pipe.scard(key)
            pipe.pexpire(key, self.ttl_ms)
        replies = pipe.execute()[len(packed):]
        ready = {child: bool(replies[3 * i + 1] >= n and (replies[3 * i] or redelivered))
                 for i, (child, n) in enumerate(joins)}
        return [ready.get(child, True) for child, _ in children]

    def outputs(self, batch_id: str, nodes: Sequence[str]) -> list[dict[str, Any] | None]:
        """The stored outputs of these Nodes for a batch (None where there are none)."""
        raw = self.r.mget([self.keys.output(batch_id, n) for n in nodes])
        return [None if v is None else unpack_value(v) for v in raw]

    def finish(self, runs: Sequence[RunContext], *,
               forget: tuple[str, Iterable[str], Iterable[str]] | None = None) -> None:
        """Runs that ended (published or dead-lettered): free their payload and in-flight slot.

        ``forget`` = (batch id, stage ids, exported Node ids) also drops that
        batch's join sets, stored outputs and sink set, in the same round trip
        (the batch is done). One command (:data:`redis_scripts.FINISH`)."""
        if not runs and forget is None:
            return
        keys: list[str] = [self.keys.bytes()]
        args: list[str | int] = [self.ttl_ms * 2]
        for run in runs:
            keys += (self.keys.ended(run.run_id), self.keys.frame(run.run_id), self.keys.inflight(run.origin.topic))
            args += (member(run), run.run_id)
        if forget is not None:
            keys += self._batch_keys(*forget)
        self._finish(keys=keys, args=args)

    def sinks_done(self, batch_id: str, sink_stage: str, n_sinks: int) -> bool:
        if n_sinks <= 1:
            return True
        key = self.keys.done(batch_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(key, sink_stage)
        pipe.scard(key)
        pipe.pexpire(key, self.ttl_ms)
        _, count, _ = pipe.execute()
        return bool(count >= n_sinks)

    def _batch_keys(self, batch_id: str, stages: Iterable[str], nodes: Iterable[str]) -> list[str]:
        keys = [self.keys.join(batch_id, s) for s in stages] + [self.keys.output(batch_id, n) for n in nodes]
        keys.append(self.keys.done(batch_id))
        return keys
