"""End to end against real services: tansu (Kafka protocol), Redis, RabbitMQ, and streamd processes
(`streamd run` and one `streamd worker` per queue) as subprocesses."""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from streamd import tp
from streamd.config import Settings
from streamd.daemon import use_uvloop
from streamd.kafka import ensure_topics

from .support import Procs, TopicReader, camera_frames, frame_message, make_topology, produce, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Pipeline:
    bootstrap: str
    topology: dict
    path: Path
    procs: Procs

    @property
    def source(self) -> str:
        return self.topology["sources"][0]["topic"]

    def sink(self, name: str) -> str:
        return self.topology["sinks"][name]["topic"]

    def reader(self, sink: str) -> TopicReader:
        return TopicReader(self.bootstrap, self.sink(sink), self.topology["sinks"][sink]["partitions"])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str,
             broker_url: str) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("e2e")
    path, topo = make_topology(tmp)
    env = {"STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap, "STREAMD_REDIS_URL": redis_url,
           "STREAMD_BROKER_URL": broker_url, "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "STREAMD_METRICS_PORT": "0", "STREAMD_ONNX_THREADS": "1"}
    settings = Settings.from_env(env)
    ensure_topics(settings, {s["topic"]: s["partitions"] for s in topo["sources"]}
                  | {s["topic"]: s["partitions"] for s in topo["sinks"].values()})
    procs = Procs(tmp, env)
    procs.start("worker-gpu", "worker", str(path), "--queues", "gpu")
    procs.start("worker-cpu", "worker", str(path), "--queues", "cpu", "--concurrency", "2")
    procs.start("daemon", "run", str(path))
    try:
        yield Pipeline(kafka_bootstrap, topo, path, procs)
    finally:
        procs.stop_all()
        if os.environ.get("STREAMD_TEST_SHOW_LOGS"):
            print(procs.logs())


def test_frames_from_three_cameras_yield_one_result_each_and_anomalies_for_defects(pipeline: Pipeline) -> None:
    frames = list(camera_frames(300, cameras=3, defect_every=10))
    offsets = produce(pipeline.bootstrap, pipeline.source,
                      [(src.encode(), frame_message(src, seq, img)) for src, seq, img, _ in frames])
    sent = {(p, o): (src, seq, defect) for (p, o), (src, seq, _, defect) in zip(offsets, frames, strict=True)}
    assert sum(1 for f in frames if f[3]) == 30

    results = pipeline.reader("results")
    try:
        got = results.until(lambda ms: len(ms) >= 300, timeout=240, what="300 results")
    except AssertionError:
        print(pipeline.procs.logs())
        raise
    assert len(got) == 300
    assert len({r["event_id"] for r in got}) == 300
    by_origin = {(r["origin"]["partition"], r["origin"]["offset"]): r for r in got}
    assert set(by_origin) == set(sent)
    for where, r in by_origin.items():
        src, seq, defect = sent[where]
        assert r["kind"] == "result" and r["origin"]["topic"] == pipeline.source
        assert (r["source"], r["seq"]) == (src, seq)
        assert r["event_id"] == tp.event_id(pipeline.source, where[0], where[1], "publish")
        assert r["anomaly"] == (defect is not None), (where, defect, r["score"], r["threshold"])
        assert r["model"]["name"] == "surface-ae"
        assert r["_kafka"]["key"] == src.encode()
        if defect:
            assert r["regions"], r

    anomalies = pipeline.reader("anomalies")
    flagged = anomalies.until(lambda ms: len(ms) >= 30, timeout=60, what="30 anomaly events")
    assert {(a["origin"]["partition"], a["origin"]["offset"]) for a in flagged} == \
        {w for w, (_, _, d) in sent.items() if d}
    assert all(a["kind"] == "anomaly" for a in flagged)


def test_malformed_input_is_dead_lettered_and_neighbours_processed(pipeline: Pipeline) -> None:
    good = list(camera_frames(6, cameras=1, defect_every=1000, seed=5))
    corrupt = {"tp": 1, "kind": "frame", "source": "line1-cam00", "seq": 999, "ts": 1.0, "codec": "jpeg",
               "data": b"\xff\xd8\xff\xe0 this is not a jpeg"}
    missing = {"tp": 1, "kind": "frame", "source": "line1-cam00", "ts": 1.0, "codec": "png", "data": b"x"}
    wrong_version = {"tp": 2, "kind": "frame", "source": "line1-cam00", "seq": 1, "ts": 1.0, "codec": "png",
                     "data": b"x"}
    items = [
        (b"line1-cam00", frame_message(*good[0][:3])),
        (b"line1-cam00", b"\xc1\xc1 definitely not msgpack"),
        (b"line1-cam00", frame_message(*good[1][:3])),
        (b"line1-cam00", tp.pack(wrong_version)),
        (b"line1-cam00", frame_message(*good[2][:3])),
        (b"line1-cam00", tp.pack(corrupt)),
        (b"line1-cam00", frame_message(*good[3][:3])),
        (b"line1-cam00", tp.pack(missing)),
        (b"line1-cam00", frame_message(*good[4][:3])),
    ]
    offsets = produce(pipeline.bootstrap, pipeline.source, items)
    expected_bad = {offsets[1]: ("undecodable", "ingest"), offsets[3]: ("unsupported_version", "ingest"),
                    offsets[5]: ("bad_image", "decode"), offsets[7]: ("schema_violation", "ingest")}
    expected_good = {offsets[i] for i in (0, 2, 4, 6, 8)}

    dlq = pipeline.reader("dead_letter")
    results = pipeline.reader("results")

    def letters() -> dict:
        return {(d["origin"]["partition"], d["origin"]["offset"]): d for d in dlq.poll()
                if d["origin"]["topic"] == pipeline.source}

    wait_for(lambda: set(expected_bad) <= set(letters()), timeout=120, what="4 dead letters")
    found = letters()
    for where, (reason, stage) in expected_bad.items():
        d = found[where]
        assert d["kind"] == "error" and d["reason"] == reason and d["stage"] == stage, d
        assert d["detail"]
    assert "seq" in found[offsets[7]]["detail"]
    wait_for(lambda: expected_good <= {(r["origin"]["partition"], r["origin"]["offset"]) for r in results.poll()},
             timeout=120, what="the good frames around the bad ones")


def test_a_source_at_its_bound_does_not_hold_up_another(tmp_path: Path, procs: Procs, kafka_bootstrap: str,
                                                        redis_url: str) -> None:
    """Each source topic has its own hand-off thread: one waiting for room (here held at its max_in_flight
    by a run that never ends) does not delay the frames of another."""
    import redis

    from streamd.keys import Keys
    from streamd.runs import member

    from .support import topics_of

    def two_sources(data: dict) -> None:
        first = data["sources"][0]
        data["sources"].append(dict(first, topic=first["topic"] + ".free"))
        first["max_in_flight"] = 1

    path, topo = make_topology(tmp_path, edit=two_sources)
    held, free = topo["sources"][0]["topic"], topo["sources"][1]["topic"]
    ensure_topics(Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap}), topics_of(topo))
    stuck = SimpleNamespace(run_id="stuck", origin=SimpleNamespace(partition=0, offset=0), source="cam-stuck")
    client = redis.Redis.from_url(redis_url)
    client.zadd(Keys(topo["name"]).inflight(held), {member(stuck): time.time()})  # type: ignore[arg-type]
    procs.start("worker", "worker", str(path), "--queues", "cpu,gpu")
    procs.start("daemon", "run", str(path))
    frames = list(camera_frames(20, cameras=2, defect_every=50))
    produce(kafka_bootstrap, held, [(src.encode(), frame_message(src, seq, img)) for src, seq, img, _ in frames[:4]])
    sent = produce(kafka_bootstrap, free, [(src.encode(), frame_message(src, seq, img))
                                           for src, seq, img, _ in frames[4:]])
    results = TopicReader(kafka_bootstrap, topo["sinks"]["results"]["topic"], topo["sinks"]["results"]["partitions"])
    try:
        got = results.until(lambda ms: len([m for m in ms if m["origin"]["topic"] == free]) >= len(sent),
                            timeout=120, what=f"the {len(sent)} results of the free source")
        assert not [m for m in got if m["origin"]["topic"] == held]  # the held source waits for room
    except AssertionError:
        print(procs.logs())
        raise
    finally:
        results.close()
        client.delete(Keys(topo["name"]).inflight(held))


def test_each_source_topic_hands_off_on_its_own_thread(tmp_path: Path, redis_url: str, broker_url: str) -> None:
    """A source waiting for room occupies its own hand-off thread, never another source's."""
    import threading

    from prometheus_client import CollectorRegistry

    from streamd.daemon import Daemon
    from streamd.metrics import Metrics
    from streamd.topology import load

    def two_sources(data: dict) -> None:
        data["sources"].append(dict(data["sources"][0], topic=data["sources"][0]["topic"] + ".b"))

    path, topo = make_topology(tmp_path, edit=two_sources)
    settings = Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": "127.0.0.1:9", "STREAMD_REDIS_URL": redis_url,
                                  "STREAMD_BROKER_URL": broker_url})
    daemon = Daemon(load(path, settings=settings), settings, Metrics(CollectorRegistry()))
    first, second = (s["topic"] for s in topo["sources"])
    gate = threading.Event()
    try:
        daemon.pools[first].submit(gate.wait, 30)  # as a hand-off waiting for room would
        assert daemon.pools[second].submit(lambda: "handed off").result(timeout=10) == "handed off"
    finally:
        gate.set()
        daemon.dispatcher.close()
        daemon.publisher.close()


@dataclass
class HandOff:
    """A Daemon on the real Redis and RabbitMQ (its queues declared), not consuming: its hand-off is driven
    directly, with events that ack themselves into ``acked``."""
    daemon: Any
    topology: dict
    img: Any

    @property
    def source(self) -> str:
        return str(self.topology["sources"][0]["topic"])

    def event(self, offset: int) -> Any:
        e = SimpleNamespace(message=SimpleNamespace(topic=self.source, partition=0, offset=offset), key=b"cam1",
                            value=frame_message("cam1", offset, self.img), acked=False)
        e.ack = lambda: setattr(e, "acked", True)
        return e

    def stage_tasks(self) -> list[Any]:
        """Take the stage tasks out of the root stage's queue."""
        from kombu import Connection

        tasks = []
        with Connection(self.daemon.settings.broker_url) as conn:
            while (m := conn.default_channel.basic_get(self.daemon.topology.celery_queue("cpu"), no_ack=True)):
                tasks.append(m)
        return tasks


@pytest.fixture
def hand_off(tmp_path: Path, redis_url: str, broker_url: str, request: pytest.FixtureRequest) -> Iterator[HandOff]:
    """``@pytest.mark.parametrize("hand_off", [edit], indirect=True)`` edits the topology first."""
    import redis
    from prometheus_client import CollectorRegistry

    from streamd.daemon import Daemon
    from streamd.metrics import Metrics
    from streamd.topology import load

    path, topo = make_topology(tmp_path, edit=getattr(request, "param", None))
    settings = Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": "127.0.0.1:9", "STREAMD_REDIS_URL": redis_url,
                                  "STREAMD_BROKER_URL": broker_url})
    daemon = Daemon(load(path, settings=settings), settings, Metrics(CollectorRegistry()))
    with daemon.celery.connection_for_write() as conn:
        for q in daemon.celery.conf.task_queues:
            q(conn.default_channel).declare()
    try:
        yield HandOff(daemon, topo, next(iter(camera_frames(1, 1, 10)))[2])
    finally:
        if daemon.confirms is not None:
            daemon.confirms.close()
        daemon.dispatcher.close()
        daemon.publisher.close()
        with daemon.celery.connection_for_write() as conn:
            for q in daemon.celery.conf.task_queues:
                q(conn.default_channel).delete()
        r = redis.Redis.from_url(redis_url)
        for key in r.scan_iter(f"streamd:{daemon.topology.name}:*"):
            r.delete(key)


def test_a_hand_off_is_acked_once_rabbitmq_confirmed_it_and_done_again_if_not(hand_off: HandOff) -> None:
    """The hand-off returns before RabbitMQ's confirm; its events are acked only once the confirm came. A
    confirm that cannot come (the connection was lost) hands the events off again."""
    import threading

    from streamd.exceptions import NotConfirmed

    daemon = hand_off.daemon
    assert daemon.confirms is not None  # on RabbitMQ, by default
    events = [hand_off.event(0), hand_off.event(1)]
    gate, waits = threading.Event(), []
    real_wait = daemon.confirms.wait

    def wait(ticket: Any, timeout: float) -> None:
        waits.append(ticket)
        if len(waits) == 1:  # the first hand-off's confirm: held, then lost
            gate.wait(10)
            raise NotConfirmed("the connection to RabbitMQ was lost (in this test)")
        real_wait(ticket, timeout)

    daemon.confirms.wait = wait  # type: ignore[method-assign]

    async def scenario() -> None:
        assert await daemon._handoff_now(hand_off.source, events, True) == 2
        for _ in range(500):  # until the wait for the confirm has begun (the gate holds it)
            if waits:
                break
            await asyncio.sleep(0.01)
        assert waits and not any(e.acked for e in events)  # handed off, not confirmed
        gate.set()
        for _ in range(500):
            if all(e.acked for e in events) and not daemon._confirming:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert all(e.acked for e in events)
    assert len(waits) == 2  # handed off a second time, and that one confirmed
    assert len(hand_off.stage_tasks()) == 2  # one stage task per hand-off (a worker skips runs already settled)


def _max_in_flight_8(data: dict) -> None:
    data["sources"][0]["max_in_flight"] = 8


@pytest.mark.parametrize("hand_off", [_max_in_flight_8], indirect=True)
def test_a_batch_at_the_bound_waits_for_room_for_all_its_runs_then_takes_what_fits(
        hand_off: HandOff, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under block, a batch waits for room for all its runs instead of handing off the part that fits now:
    room comes a task's runs at a time, and a batch cut in two would cut every batch behind it. After
    FULL_ROOM_WAIT_S it takes what fits, so runs that never end cannot hold a topic up for long."""
    import concurrent.futures
    import json

    import redis

    from streamd import daemon as daemon_module
    from streamd.keys import Keys
    from streamd.runs import member

    daemon, source = hand_off.daemon, hand_off.source
    client = redis.Redis.from_url(daemon.settings.redis_url)
    inflight = Keys(daemon.topology.name).inflight(source)
    held = [member(SimpleNamespace(run_id=f"held{i}", origin=SimpleNamespace(partition=1, offset=i),
                                   source="cam-held")) for i in range(6)]  # type: ignore[arg-type]
    client.zadd(inflight, {m: time.time() for m in held})  # 6 of 8 in flight: room for 2
    looks: list[int] = []
    room = daemon.ingestor.room

    def look(topic: str) -> int:  # the real reading, remembered
        looks.append(room(topic))
        return looks[-1]

    daemon.ingestor.room = look  # type: ignore[method-assign]

    def msgs(first: int, n: int) -> list[Any]:
        from streamd.ingest import InMessage

        return [InMessage(source, 0, o, b"cam1", hand_off.event(o).value) for o in range(first, first + n)]

    def sizes() -> list[int]:
        return [len(json.loads(t.body)[0][2]["runs"]) for t in hand_off.stage_tasks()]  # args: topology, stage, batch

    monkeypatch.setattr(daemon_module, "FULL_ROOM_WAIT_S", 60.0)
    monkeypatch.setattr(daemon_module, "ROOM_WAIT_S", 60.0)  # one trip to the thread must not end the wait either
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(daemon._handoff_sync, source, msgs(0, 4), True)
        wait_for(lambda: len(looks) >= 3, timeout=10, what="the hand-off looking for room again")
        assert not done.done() and looks[-1] == 2  # room for 2 of the 4: it waits
        client.zrem(inflight, *held[:2])  # a task's runs ended: room for 4
        n, _ = done.result(timeout=10)
    assert n == 4 and sizes() == [4]  # the batch went whole, as one task

    monkeypatch.setattr(daemon_module, "FULL_ROOM_WAIT_S", 0.05)
    monkeypatch.setattr(daemon_module, "ROOM_WAIT_S", 0.5)
    client.zrem(inflight, *held[2:4])  # 2 held and the 4 runs in flight: room for 2
    n, _ = daemon._handoff_sync(source, msgs(4, 4), True)
    assert n == 2 and sizes() == [2]  # the room never came: what fits went


def test_assignment_is_gauged_per_source_topic(tmp_path: Path, redis_url: str, broker_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from faust.types import TP
    from prometheus_client import CollectorRegistry

    from streamd.daemon import Daemon
    from streamd.metrics import Metrics
    from streamd.topology import load

    path, topo = make_topology(tmp_path)
    settings = Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": "127.0.0.1:9", "STREAMD_REDIS_URL": redis_url,
                                  "STREAMD_BROKER_URL": broker_url})
    registry = CollectorRegistry()
    daemon = Daemon(load(path, settings=settings), settings, Metrics(registry))
    topic = topo["sources"][0]["topic"]
    frozen: list[str] = []
    monkeypatch.setattr("streamd.daemon.freeze_heap", frozen.append)  # not this test process's heap
    try:
        daemon.assigned({TP(topic, 0), TP(topic, 2), TP("someone.else", 1)})
        assert registry.get_sample_value("streamd_kafka_assigned_partitions", {"topic": topic}) == 2
        daemon.assigned(set())  # a rebalance took them all away
        assert registry.get_sample_value("streamd_kafka_assigned_partitions", {"topic": topic}) == 0
        assert frozen == ["daemon consuming"]  # once consuming, faust's consumer is frozen too; not again
        off = Daemon(load(path, settings=settings), replace(settings, gc_freeze=False), Metrics(CollectorRegistry()))
        off.assigned({TP(topic, 0)})
        off.dispatcher.close()
        off.publisher.close()
        assert frozen == ["daemon consuming"]  # STREAMD_GC_FREEZE=0
    finally:
        daemon.dispatcher.close()
        daemon.publisher.close()


# -- the event loop (no services needed) -------------------------------------------------------


@pytest.fixture
def policy() -> Iterator[None]:
    before = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(before)


def test_loops_made_after_use_uvloop_are_uvloop_loops(policy):
    assert use_uvloop() is True
    loop = asyncio.new_event_loop()  # as faust's consumer thread makes its own
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


def test_without_uvloop_the_policy_is_left_alone(policy, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    before = asyncio.get_event_loop_policy()
    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with caplog.at_level("INFO", logger="streamd.daemon"):
        assert use_uvloop() is False
    assert asyncio.get_event_loop_policy() is before
    assert "uvloop is not installed" in caplog.text


# -- the batch window (no services needed) ---------------------------------------------------------


def _batches(idle: bool, fetch_wait: Any = None, arrived_ago: float = 0.0) -> list[list[str]]:
    """Two events 20 ms apart through the flusher with a 500 ms window; the hand-offs it makes.

    The first event reaches the flusher ``arrived_ago`` seconds after it arrived (it waited out a hand-off)."""
    from streamd.daemon import Daemon
    from streamd.faust_transport import FetchWait

    daemon = Daemon.__new__(Daemon)  # only the flusher's own state: no services
    daemon._idle = {"in": idle}
    daemon.fetch_wait = fetch_wait or FetchWait(["in"], short_ms=10, backlog_ms=100)
    handed: list[list[str]] = []
    asked: list[str] = []

    async def handoff(topic: str, events: list[str]) -> None:
        handed.append(events)

    async def backlog(topic: str) -> int:
        asked.append(topic)
        return 0

    daemon._handoff = handoff  # type: ignore[method-assign]
    daemon._backlog = backlog  # type: ignore[method-assign]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        flusher = asyncio.ensure_future(daemon._flusher("in", queue, 32, 0.5, 0.5))
        await queue.put((loop.time() - arrived_ago, "a"))
        await asyncio.sleep(0.02)
        await queue.put((loop.time(), "b"))
        for _ in range(200):
            if sum(map(len, handed)) == 2:
                break
            await asyncio.sleep(0.01)
        flusher.cancel()

    asyncio.run(scenario())
    if idle:
        assert not asked  # no broker round trip for a batch that does not wait
    return handed


def test_a_batch_waits_its_window_while_runs_are_in_flight():
    assert _batches(idle=False) == [["a", "b"]]


def test_with_nothing_in_flight_a_batch_goes_without_waiting_its_window():
    assert _batches(idle=True) == [["a"], ["b"]]


def test_the_window_counts_from_the_first_events_arrival():
    """An event that waited a whole window already (behind the previous hand-off) goes at once; the next
    one gets a window of its own."""
    assert _batches(idle=False, arrived_ago=0.6) == [["a"], ["b"]]


def test_the_fetch_wait_drops_back_once_the_stream_runs_dry():
    """Backlogged (as the hand-off sets it at the bound), the daemon fetches with the long wait; when the
    flusher finds nothing queued, it has caught up and the short wait is back."""
    from streamd.faust_transport import FetchWait

    wait = FetchWait(["in"], short_ms=10, backlog_ms=100)
    wait.backlogged("in", True)
    assert wait.current_ms == 100
    _batches(idle=True, fetch_wait=wait)
    assert wait.current_ms == 10
