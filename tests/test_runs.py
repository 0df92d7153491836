"""streamd.runs against a real Redis: claim check, in-flight set, shedding, joins, outputs, TTLs.

Needs Redis at STREAMD_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); skipped when none is reachable.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import redis

from streamd.keys import Keys
from streamd.nodes.base import Origin, RunContext
from streamd.runs import Batch, RunStore, batch_id_for, member, parse_member, run_id_for
from streamd.values import pack_value

REDIS_URL = os.environ.get("STREAMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TOPIC = "cameras.frames"
TTL_S = 60.0


@pytest.fixture
def topology(client: redis.Redis) -> Iterator[str]:
    """A unique topology name; all its keys are deleted afterwards."""
    name = f"test-runs-{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(client.scan_iter(match=f"streamd:{name}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def store(client: redis.Redis, topology: str) -> RunStore:
    return RunStore(client, topology, TTL_S)


def make_run(topology: str, offset: int, *, partition: int = 0, source: str | None = "line1-cam01",
             topic: str = TOPIC) -> RunContext:
    origin = Origin(topic, partition, offset)
    return RunContext(topology=topology, run_id=run_id_for(topology, origin), origin=origin, kind="frame",
                      source=source, seq=offset, ts=1795618807.0 + offset)


# -- ids and members ----------------------------------------------------------------------------


def test_run_ids_are_deterministic():
    o = Origin(TOPIC, 1, 42)
    assert run_id_for("t", o) == run_id_for("t", Origin(TOPIC, 1, 42))
    assert run_id_for("t", o) != run_id_for("t", Origin(TOPIC, 1, 43))
    assert run_id_for("t", o) != run_id_for("u", o)
    assert len(run_id_for("t", o)) == 24


def test_member_round_trip():
    run = make_run("t", 7, partition=2, source="cam|with|bars")
    rid, origin, source = parse_member(TOPIC, member(run))
    assert (rid, origin, source) == (run.run_id, Origin(TOPIC, 2, 7), "cam|with|bars")
    no_source = make_run("t", 8, source=None)
    assert parse_member(TOPIC, member(no_source).encode())[2] is None


def test_batch_message_round_trip():
    runs = [make_run("t", i) for i in range(3)]
    batch = Batch.of(runs)
    assert batch.batch_id == batch_id_for(r.run_id for r in runs)
    again = Batch.from_message(batch.message())
    assert again == batch
    fewer = batch.only({runs[0].run_id, runs[2].run_id})
    assert fewer.batch_id == batch.batch_id
    assert [r.run_id for r in fewer.runs] == [runs[0].run_id, runs[2].run_id]



def test_batch_message_is_compact_json():
    """Topics once, a list per run: 32 frames fit under RabbitMQ's 4 KB queue-index threshold."""
    runs = [make_run("surface-inspection", 100_000 + i, partition=i % 4, topic=TOPIC if i % 5 else "line2.frames")
            for i in range(32)]
    runs[3] = replace(runs[3], meta={"lot": "A-17"}, source=None, seq=None, ts=None)
    batch = Batch.of(runs)
    text = json.dumps(batch.message())
    assert len(text) < 4096, len(text)
    assert Batch.from_message(json.loads(text)) == batch
    assert Batch.from_message(json.loads(json.dumps(Batch(batch.batch_id, ()).message()))).runs == ()


def test_batch_message_of_an_older_daemon_is_read():
    """A task queued before an upgrade carries a map per run; the worker still reads it."""
    runs = [make_run("t", i) for i in range(2)]
    older = {"batch_id": "b1", "runs": [r.as_dict() for r in runs]}
    assert Batch.from_message(json.loads(json.dumps(older))) == Batch("b1", tuple(runs))

# -- admit / frames / finish -----------------------------------------------------------------------


def test_admit_frames_finish(store, topology):
    runs = [make_run(topology, i) for i in range(3)]
    payloads = [f"payload-{i}".encode() * (i + 1) for i in range(3)]
    store.admit(list(zip(runs, payloads, strict=True)))
    assert store.in_flight(TOPIC) == 3
    assert store.frames([r.run_id for r in runs]) == payloads
    assert store.frames([runs[1].run_id, "unknown"]) == [payloads[1], None]
    assert store.frames([]) == []
    assert store.store_size() == (3, sum(len(p) for p in payloads))

    store.finish(runs[:2])
    assert store.in_flight(TOPIC) == 1
    assert store.frames([r.run_id for r in runs]) == [None, None, payloads[2]]
    assert store.store_size() == (1, len(payloads[2]))
    store.finish([])  # nothing to do
    store.finish(runs[2:])
    assert store.in_flight(TOPIC) == 0
    assert store.store_size() == (0, 0)


def test_admit_is_idempotent(store, topology):
    run = make_run(topology, 1)
    store.admit([(run, b"x")])
    store.admit([(run, b"x")])  # the daemon re-reads a message after a crash
    assert store.in_flight(TOPIC) == 1


def test_in_flight_is_per_topic(store, topology):
    store.admit([(make_run(topology, 1), b"a"), (make_run(topology, 1, topic="other.topic"), b"b")])
    assert store.in_flight(TOPIC) == 1
    assert store.in_flight("other.topic") == 1
    assert store.in_flight("nothing") == 0


def test_admit_and_finish_across_topics(client, store, topology):
    runs = [make_run(topology, i, topic=TOPIC if i % 2 else "other.topic") for i in range(6)]
    store.admit([(r, b"p%d" % i) for i, r in enumerate(runs)])
    assert (store.in_flight(TOPIC), store.in_flight("other.topic")) == (3, 3)
    store.finish(runs[:4])
    assert (store.in_flight(TOPIC), store.in_flight("other.topic")) == (1, 1)
    assert store.settled([r.run_id for r in runs]) == {r.run_id for r in runs[:4]}
    ttl = client.pttl(Keys(topology).ended(runs[0].run_id))
    assert 115_000 < ttl <= 120_000  # the ended marker outlives the payload (2 x TTL)


def test_admit_keeps_the_arrival_order(client, store, topology):
    runs = [make_run(topology, i) for i in range(5)]
    store.admit([(r, b"x") for r in runs])
    assert [parse_member(TOPIC, m)[0] for m in client.zrange(Keys(topology).inflight(TOPIC), 0, -1)] == \
        [r.run_id for r in runs]
    assert [o.offset for _, o, _ in store.pop_oldest(TOPIC, 2)] == [0, 1]


def test_a_batch_larger_than_one_script_call_takes(client, store, topology):
    """ZADD/HSET/ZREM/DEL are sent in chunks inside the scripts: Lua limits one call's arguments."""
    runs = [make_run(topology, i) for i in range(5000)]
    store.admit([(r, b"x") for r in runs])
    assert store.in_flight(TOPIC) == 5000
    assert store.store_size() == (5000, 5000)
    store.finish(runs)
    assert store.in_flight(TOPIC) == 0
    assert store.store_size() == (0, 0)
    assert store.frames([runs[0].run_id, runs[-1].run_id]) == [None, None]


def test_scripts_survive_a_script_cache_flush(client, store, topology):
    """After a Redis restart (or SCRIPT FLUSH) the scripts are loaded again by themselves."""
    run, other = make_run(topology, 1), make_run(topology, 2)
    store.admit([(run, b"x")])
    client.script_flush()
    store.admit([(other, b"y")])
    client.script_flush()
    store.finish([run, other])
    assert store.in_flight(TOPIC) == 0


def test_topologies_do_not_share_keys(client, store, topology):
    other = RunStore(client, f"{topology}-other", TTL_S)
    try:
        run = make_run(topology, 1)
        store.admit([(run, b"mine")])
        assert other.in_flight(TOPIC) == 0
        assert other.frames([run.run_id]) == [None]
    finally:
        keys = list(client.scan_iter(match=f"streamd:{topology}-other:*"))
        if keys:
            client.delete(*keys)


# -- shedding: pop_oldest / dropped -----------------------------------------------------------------


def age(client: redis.Redis, topology: str, run: RunContext, seconds: float) -> None:
    """Pretend a run was admitted ``seconds`` ago."""
    client.zadd(Keys(topology).inflight(run.origin.topic), {member(run): time.time() - seconds}, xx=True)


def test_pop_oldest_returns_origins_and_tombstones(client, store, topology):
    old, middle, new = (make_run(topology, i, partition=i % 2) for i in (10, 11, 12))
    store.admit([(old, b"o"), (middle, b"m"), (new, b"n")])
    age(client, topology, old, 30)
    age(client, topology, middle, 20)

    popped = store.pop_oldest(TOPIC, 2)
    assert popped == [
        (old.run_id, Origin(TOPIC, 0, 10), "line1-cam01"),
        (middle.run_id, Origin(TOPIC, 1, 11), "line1-cam01"),
    ]
    assert store.in_flight(TOPIC) == 1
    assert store.frames([old.run_id, middle.run_id, new.run_id]) == [None, None, b"n"]
    assert store.dropped([old.run_id, middle.run_id, new.run_id]) == {old.run_id, middle.run_id}
    assert store.store_size() == (1, 1)


def test_pop_oldest_on_empty_and_dropped_of_nothing(store):
    assert store.pop_oldest(TOPIC, 5) == []
    assert store.dropped([]) == set()
    assert store.dropped(["never-seen"]) == set()


def test_pop_oldest_keeps_a_missing_source(store, topology):
    run = make_run(topology, 3, source=None)
    store.admit([(run, b"x")])
    assert store.pop_oldest(TOPIC, 1) == [(run.run_id, run.origin, None)]


# -- prune ----------------------------------------------------------------------------------------------


def test_prune_forgets_only_stale_entries(client, store, topology):
    stale, fresh = make_run(topology, 1), make_run(topology, 2)
    store.admit([(stale, b"s" * 10), (fresh, b"f" * 3)])
    age(client, topology, stale, 120)
    assert store.prune(TOPIC, 3600) == []
    assert store.prune(TOPIC, 60) == [stale.run_id]
    assert store.in_flight(TOPIC) == 1
    assert store.store_size() == (1, 3)
    assert store.prune(TOPIC, 60) == []


# -- outputs and joins --------------------------------------------------------------------------------


def test_put_outputs_and_outputs(store, topology):
    batch = Batch.of([make_run(topology, i) for i in range(2)])
    r0, r1 = (r.run_id for r in batch.runs)
    tensor = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    put(store, batch.batch_id, "decode", {r0: {"tensor": tensor, "orig_size": [2, 3]}, r1: 7})
    put(store, batch.batch_id, "quality", {r0: "ok"})
    decode, quality, missing = store.outputs(batch.batch_id, ["decode", "quality", "autoencoder"])
    np.testing.assert_array_equal(decode[r0]["tensor"], tensor)
    assert decode[r0]["orig_size"] == [2, 3]
    assert decode[r1] == 7
    assert quality == {r0: "ok"}
    assert missing is None


def put(store: RunStore, batch_id: str, node: str, outputs: dict) -> None:
    assert store.put_outputs_and_join(batch_id, node, {node: pack_value(outputs)}, [], redelivered=False) == []


def join(store: RunStore, batch_id: str, child: str, parent: str, n_parents: int, *, redelivered: bool) -> bool:
    """``parent`` stores (empty) outputs and records itself with the join ``child``: ready?"""
    (ready,) = store.put_outputs_and_join(batch_id, parent, {parent: pack_value({})}, [(child, n_parents)],
                                          redelivered=redelivered)
    return ready


def test_outputs_and_joins_in_one_call(store):
    # a stage that exports two Nodes (fan-out fusion) stores each under its own key
    ready = store.put_outputs_and_join("b0", "decode", {"preprocess": pack_value({"r": 1}),
                                                        "quality": pack_value({"r": "ok"})},
                                       [("autoencoder", 1), ("combine", 2)], redelivered=False)
    assert ready == [True, False]
    assert store.outputs("b0", ["quality", "preprocess", "decode"]) == [{"r": "ok"}, {"r": 1}, None]
    assert store.put_outputs_and_join("b0", "autoencoder", {"autoencoder": pack_value({})}, [("combine", 2)],
                                      redelivered=False) == [True]


def test_a_stage_without_exports_only_joins(store):
    assert store.put_outputs_and_join("b9", "s", {}, [("j", 2)], redelivered=False) == [False]
    assert store.put_outputs_and_join("b9", "t", {}, [("j", 2)], redelivered=False) == [True]


def test_join_ready_exactly_one_parent_sees_true(store):
    first = join(store, "b1", "combine", "ae_score", 2, redelivered=False)
    second = join(store, "b1", "combine", "quality", 2, redelivered=False)
    assert (first, second) == (False, True)


def test_join_ready_three_parents(store):
    seen = [join(store, "b3", "j", p, 3, redelivered=False) for p in ("a", "b", "c")]
    assert seen == [False, False, True]


def test_join_ready_single_parent_is_always_ready(store):
    assert join(store, "b", "s", "p", 1, redelivered=False)
    assert join(store, "b", "s", "p", 1, redelivered=False)


def test_join_ready_redelivered_parent_sees_true_once_complete(store):
    assert not join(store, "b2", "combine", "ae_score", 2, redelivered=False)
    assert join(store, "b2", "combine", "quality", 2, redelivered=False)
    # ae_score's worker died after recording itself but before acking: the task comes back
    assert join(store, "b2", "combine", "ae_score", 2, redelivered=True)


def test_join_ready_redelivered_before_complete_is_false(store):
    assert not join(store, "b4", "combine", "ae_score", 2, redelivered=False)
    assert not join(store, "b4", "combine", "ae_score", 2, redelivered=True)


def test_join_ready_rerun_parent_is_not_double_counted(store):
    assert not join(store, "b5", "combine", "ae_score", 2, redelivered=False)
    assert not join(store, "b5", "combine", "ae_score", 2, redelivered=False)
    assert join(store, "b5", "combine", "quality", 2, redelivered=False)
    # and a plain re-run after completion does not dispatch the join again
    assert not join(store, "b5", "combine", "quality", 2, redelivered=False)


def test_join_is_per_batch_and_stage(store):
    assert not join(store, "bx", "combine", "a", 2, redelivered=False)
    assert not join(store, "by", "combine", "b", 2, redelivered=False)
    assert not join(store, "bx", "other", "b", 2, redelivered=False)


def test_sinks_done(store):
    assert store.sinks_done("b", "only", 1)
    assert not store.sinks_done("b6", "s1", 2)
    assert not store.sinks_done("b6", "s1", 2)
    assert store.sinks_done("b6", "s2", 2)


def test_forget_batch(client, store, topology):
    put(store, "b7", "decode", {"r": 1})
    join(store, "b7", "combine", "a", 2, redelivered=False)
    store.sinks_done("b7", "s1", 2)
    store.finish([], forget=("b7", ["decode", "combine"], ["decode", "a"]))
    assert store.outputs("b7", ["decode"]) == [None]
    assert list(client.scan_iter(match=f"streamd:{topology}:*b7*")) == []


# -- TTLs ----------------------------------------------------------------------------------------------------


def test_ttl_on_data_keys(client, topology):
    store = RunStore(client, topology, 30.0)
    keys = Keys(topology)
    run = make_run(topology, 1)
    store.admit([(run, b"x")])
    put(store, "b8", "decode", {run.run_id: 1})
    join(store, "b8", "combine", "a", 2, redelivered=False)
    store.sinks_done("b8", "s1", 2)
    for key in (keys.frame(run.run_id), keys.output("b8", "decode"), keys.join("b8", "combine"), keys.done("b8")):
        ttl = client.pttl(key)
        assert 25_000 < ttl <= 30_000, (key, ttl)


def test_ttl_on_tombstones_outlives_payloads(client, topology):
    store = RunStore(client, topology, 30.0)
    run = make_run(topology, 1)
    store.admit([(run, b"x")])
    store.pop_oldest(TOPIC, 1)
    ttl = client.pttl(Keys(topology).dropped(run.run_id))
    assert 55_000 < ttl <= 60_000


def test_keys_are_prefixed_with_the_topology(client, store, topology):
    run = make_run(topology, 1)
    store.admit([(run, b"x")])
    put(store, "b9", "decode", {run.run_id: 1})
    found = {k.decode() for k in client.scan_iter(match=f"streamd:{topology}:*")}
    assert found == {
        f"streamd:{topology}:frame:{run.run_id}",
        f"streamd:{topology}:inflight:{TOPIC}",
        f"streamd:{topology}:bytes",
        f"streamd:{topology}:out:b9:decode",
    }
