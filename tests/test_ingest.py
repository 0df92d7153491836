"""streamd.ingest: validation, claim check, dispatch and overload policies, against a real Redis.

The Celery broker and Kafka are replaced by recorders (dispatch calls, dead letters).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from streamd import synth, tp
from streamd.config import Settings
from streamd.dag import plan
from streamd.deadletters import DeadLetter
from streamd.ingest import Ingestor, InMessage
from streamd.metrics import Metrics
from streamd.runs import RunStore
from streamd.topology import Topology, load

from .support import frame_message, make_topology


class Letters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def publish(self, letters: Any) -> None:
        self.letters += list(letters)


class Harness:
    def __init__(self, client: redis.Redis, tmp: Path, **source: Any) -> None:
        path, _ = make_topology(tmp, edit=lambda t: t["sources"][0].update(source))
        self.topology: Topology = load(path, settings=Settings())
        nodes = self.topology.build_nodes(self.topology.node_env(Settings()))
        self.plan = plan(self.topology, {n for n, node in nodes.items() if node.is_sink})
        self.store = RunStore(client, self.topology.name, 60)
        self.dispatched: list[tuple[str, list[int]]] = []
        self.dlq = Letters()
        self.metrics = Metrics(CollectorRegistry())
        self.ingestor = Ingestor(topology=self.topology, plan=self.plan, store=self.store,
                                 dispatch=lambda stage, batch: self.dispatched.append(
                                     (stage.id, [r.origin.offset for r in batch.runs])),
                                 dead_letters=self.dlq, metrics=self.metrics)
        self.topic = self.topology.sources[0].topic
        self.rng = np.random.default_rng(1)
        self.offset = 0

    def frame(self, source: str = "cam1", **kw: Any) -> InMessage:
        img, _ = synth.camera_frame(self.rng, size=(32, 32))
        self.offset += 1
        return InMessage(self.topic, 0, self.offset, source.encode(), frame_message(source, self.offset, img, **kw))

    def raw(self, value: bytes | None, key: bytes | None = b"cam1") -> InMessage:
        self.offset += 1
        return InMessage(self.topic, 0, self.offset, key, value)

    def reasons(self) -> list[tuple[int, str]]:
        return [(d.origin.offset, d.reason) for d in self.dlq.letters]

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make(client: redis.Redis, tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def factory(**source: Any) -> Harness:
        h = Harness(client, tmp_path / uuid.uuid4().hex[:6], **source)
        made.append(h)
        return h

    (tmp_path).mkdir(exist_ok=True)
    yield lambda **kw: (lambda h: h)(factory(**kw))
    for h in made:
        keys = list(client.scan_iter(f"streamd:{h.topology.name}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orig = Harness.__init__

    def init(self: Harness, client: redis.Redis, tmp: Path, **source: Any) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        orig(self, client, tmp, **source)

    monkeypatch.setattr(Harness, "__init__", init)


def test_valid_frames_are_stored_and_dispatched_once_per_root_stage(make: Any) -> None:
    h = make()
    msgs = [h.frame() for _ in range(3)]
    h.ingestor.handle(msgs)
    assert h.dispatched == [("decode", [1, 2, 3])]
    assert h.store.in_flight(h.topic) == 3
    assert all(h.store.frames([run_id]) for run_id in _run_ids(h))
    assert h.dlq.letters == []
    assert h.counter("streamd_frames_ingested_total", topology=h.topology.name, topic=h.topic) == 3


def _run_ids(h: Harness) -> list[str]:
    return [m.decode().split("|")[0] for m in h.store.r.zrange(h.store.keys.inflight(h.topic), 0, -1)]


def test_bad_messages_are_dead_lettered_with_reason_and_the_rest_handed_off(make: Any) -> None:
    h = make(max_message_bytes=20_000, allowed_sources=["cam1"])
    good = h.frame()
    msgs = [
        good,
        h.raw(b"\xc1 not msgpack"),
        h.raw(tp.pack({"tp": 2, "kind": "frame"})),
        h.raw(tp.pack({"tp": 1, "kind": "reading", "source": "s", "seq": 1, "ts": 1.0, "rate_hz": 1.0,
                       "unit": "g", "values": b"\0\0\0\0"})),
        h.raw(b"x" * 30_000),
        h.frame(source="cam9"),
        h.raw(None),
    ]
    h.ingestor.handle(msgs)
    assert h.reasons() == [(2, "undecodable"), (3, "unsupported_version"), (4, "unsupported_kind"),
                           (5, "oversized_frame"), (6, "unknown_source"), (7, "undecodable")]
    assert all(d.stage == "ingest" for d in h.dlq.letters)
    assert h.dlq.letters[0].source == "cam1"  # from the Kafka key
    assert h.dispatched == [("decode", [1])]


def test_drop_oldest_sheds_the_oldest_in_flight_runs(make: Any) -> None:
    h = make(max_in_flight=4, overload="drop_oldest")
    h.ingestor.handle([h.frame() for _ in range(4)])
    h.ingestor.handle([h.frame() for _ in range(3)])
    assert h.reasons() == [(1, "dropped"), (2, "dropped"), (3, "dropped")]
    assert h.store.in_flight(h.topic) == 4
    shed = h.store.dropped([r for r in _all_run_ids(h)])
    assert len(shed) == 3
    assert h.counter("streamd_frames_dropped_total", topology=h.topology.name, topic=h.topic,
                     reason="drop_oldest") == 3


def _all_run_ids(h: Harness) -> list[str]:
    from streamd.nodes.base import Origin
    from streamd.runs import run_id_for

    return [run_id_for(h.topology.name, Origin(h.topic, 0, o)) for o in range(1, h.offset + 1)]


def test_drop_oldest_with_more_new_runs_than_the_limit_keeps_the_newest(make: Any) -> None:
    h = make(max_in_flight=2, overload="drop_oldest")
    h.ingestor.handle([h.frame() for _ in range(5)])
    assert h.reasons() == [(1, "dropped"), (2, "dropped"), (3, "dropped")]
    assert h.dispatched == [("decode", [4, 5])]


def test_sample_keeps_one_in_n_while_over_the_limit(make: Any) -> None:
    h = make(max_in_flight=4, overload="sample", sample_every=3)
    h.ingestor.handle([h.frame() for _ in range(2)])  # room for these
    h.ingestor.handle([h.frame() for _ in range(6)])  # over: keep 1 in 3, then only what fits
    kept = h.dispatched[-1][1]
    dropped = [o for o, r in h.reasons() if r == "dropped"]
    assert sorted(kept + dropped) == list(range(3, 9))
    assert len(kept) <= 2 and h.store.in_flight(h.topic) <= 4
    assert h.counter("streamd_frames_dropped_total", topology=h.topology.name, topic=h.topic,
                     reason="sample") == len(dropped)


def test_block_policy_never_sheds_and_reports_room(make: Any) -> None:
    h = make(max_in_flight=3, overload="block")
    assert h.ingestor.room(h.topic) == 3
    h.ingestor.handle([h.frame() for _ in range(3)])
    assert h.ingestor.room(h.topic) == 0
    h.ingestor.handle([h.frame() for _ in range(2)])  # the daemon waits for room before handle()
    assert h.dlq.letters == [] and h.store.in_flight(h.topic) == 5
