"""Fault injection against real services and processes: every input ends as a result or a dead letter.

Covers issue 5: a soak with SIGKILLed workers and daemon, each failure class's
dead letter, expiry, back-pressure (block, drop_oldest) and bounded SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from streamd import synth, tp
from streamd.config import Settings
from streamd.daemon import consumer_lag
from streamd.kafka import ensure_topics
from streamd.runs import RunStore
from streamd.services import free_port
from streamd.topology import load

from .support import Procs, TopicReader, frame_message, make_topology, produce, topics_of, wait_for

pytestmark = pytest.mark.integration

Outcomes = dict[tuple[int, int], list[dict]]


def _setup(tmp_path: Path, kafka_bootstrap: str, edit: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
    path, topo = make_topology(tmp_path, edit=edit)
    ensure_topics(Settings(kafka_bootstrap=kafka_bootstrap), topics_of(topo))
    return path, topo


def _outcomes(readers: list[TopicReader], source_topic: str) -> Outcomes:
    """Every result / dead letter read so far, by input (partition, offset)."""
    out: Outcomes = {}
    for r in readers:
        for m in r.poll():
            if m["kind"] in ("result", "error") and m["origin"]["topic"] == source_topic:
                out.setdefault((m["origin"]["partition"], m["origin"]["offset"]), []).append(m)
    return out


def _readers(bootstrap: str, topo: dict) -> list[TopicReader]:
    return [TopicReader(bootstrap, topo["sinks"][s]["topic"], topo["sinks"][s]["partitions"])
            for s in ("results", "dead_letter")]


def _counter(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _small_frames(n: int, cameras: int = 4, seed: int = 3) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        img, _ = synth.camera_frame(rng, size=(64, 64), channels=1)
        src = f"cam{i % cameras}"
        items.append((src.encode(), frame_message(src, i // cameras, img, codec="raw")))
    return items


def test_soak_with_killed_workers_and_daemon_loses_nothing(tmp_path: Path, procs: Procs, kafka_bootstrap: str) -> None:
    total = 5000
    path, topo = _setup(tmp_path, kafka_bootstrap)
    source = topo["sources"][0]["topic"]
    procs.start_pipeline(path)
    items = _small_frames(total)
    offsets: list[tuple[int, int]] = []
    done_producing = threading.Event()

    def feed() -> None:
        for i in range(0, total, 250):
            offsets.extend(produce(kafka_bootstrap, source, items[i:i + 250]))
            time.sleep(0.25)  # a steady line rate rather than one burst
        done_producing.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    readers = _readers(kafka_bootstrap, topo)
    kills = Counter()

    def after(n: int) -> None:
        wait_for(lambda: len(_outcomes(readers, source)) >= n, timeout=300, what=f"{n} inputs processed")

    try:
        for threshold, victim in ((600, "worker-cpu"), (1400, "worker-gpu"), (2200, "daemon"),
                                  (3000, "worker-cpu"), (3800, "worker-gpu")):
            after(threshold)
            procs.kill(victim)
            kills[victim] += 1
            if victim == "daemon":
                procs.start("daemon", "run", str(path))
            else:
                queue = victim.split("-")[1]
                extra = ["--concurrency", "2"] if queue == "cpu" else []
                procs.start(victim, "worker", str(path), "--queues", queue, *extra)
        done_producing.wait(300)
        assert len(offsets) == total
        final = wait_for(lambda: (o := _outcomes(readers, source)) and len(o) >= total and o,
                         timeout=400, what=f"an outcome for each of {total} inputs")
    except AssertionError:
        print(procs.logs())
        raise
    assert set(final) == set(offsets)
    results = [m for ms in final.values() for m in ms if m["kind"] == "result"]
    letters = [m for ms in final.values() for m in ms if m["kind"] == "error"]
    dup = sum(c - 1 for c in Counter(m["event_id"] for m in results).values() if c > 1)
    print(f"\nsoak: {total} inputs, kills {dict(kills)}: {len(results)} result records "
          f"({len({m['event_id'] for m in results})} distinct, {dup} duplicates), "
          f"{len(letters)} dead letters {dict(Counter(m['reason'] for m in letters))}")
    assert all(m["reason"] != "dropped" for m in letters)
    assert len({m["event_id"] for m in results}) + len({(m["origin"]["partition"], m["origin"]["offset"])
                                                         for m in letters}) >= total


def test_each_failure_class_is_dead_lettered_and_neighbours_processed(tmp_path: Path, procs: Procs,
                                                                      kafka_bootstrap: str) -> None:
    def edit(t: dict) -> None:
        t["sources"][0]["max_message_bytes"] = 2_000_000
        nodes = t["nodes"]
        nodes["tamper"] = {"type": "tests.faulty:Tamper", "queue": "cpu", "parents": ["preprocess"], "retries": 1}
        nodes["autoencoder"]["parents"] = ["tamper"]

    path, topo = _setup(tmp_path, kafka_bootstrap, edit)
    source = topo["sources"][0]["topic"]
    procs.start_pipeline(path)
    rng = np.random.default_rng(9)

    def good(i: int, **kw: object) -> bytes:
        img, _ = synth.camera_frame(rng, size=(96, 96), channels=3)
        return frame_message("cam-x", i, img, **kw)  # type: ignore[arg-type]

    big = np.zeros((1000, 1000, 3), dtype=np.uint8)  # 3 MB raw: over max_message_bytes
    gif = tp.pack({"tp": 1, "kind": "frame", "source": "cam-x", "seq": 3, "ts": time.time(), "codec": "gif",
                   "data": b"GIF89a..."})
    cases = [
        (None, good(0)),
        ("oversized_frame", frame_message("cam-x", 1, big, codec="raw")),
        (None, good(2)),
        ("unsupported_codec", gif),
        (None, good(4)),
        ("model_input_mismatch", good(5, meta={"wrong_shape": True})),
        (None, good(6)),
        ("node_failed", good(7, meta={"explode": True})),
        (None, good(8)),
        ("publish_failed", good(9, meta={"blob": "x" * 1_100_000})),  # result over the producer's 1 MB limit
        (None, good(10)),
        ("node_failed", good(11, meta={"unstorable": True})),  # a Node output that cannot cross stages
        (None, good(12)),
    ]
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_000_000})
    where: list[tuple[int, int]] = []
    for _, value in cases:
        p.produce(source, key=b"cam-x", value=value,
                  on_delivery=lambda err, msg: where.append((msg.partition(), msg.offset())))
        p.flush(30)
    assert len(where) == len(cases)
    readers = _readers(kafka_bootstrap, topo)
    try:
        final = wait_for(lambda: (o := _outcomes(readers, source)) and set(where) <= set(o) and o,
                         timeout=180, what="an outcome for every case")
    except AssertionError:
        print(procs.logs())
        raise
    for (reason, _), w in zip(cases, where, strict=True):
        kinds = {m["kind"] for m in final[w]}
        if reason is None:
            assert kinds == {"result"}, final[w]
        else:
            assert kinds == {"error"}, (reason, final[w])
            letter = final[w][0]
            assert letter["reason"] == reason and letter["detail"], letter
            assert letter["origin"] == {"topic": source, "partition": w[0], "offset": w[1]}


def test_expired_frames_are_dead_lettered(tmp_path: Path, procs: Procs, kafka_bootstrap: str, redis_url: str) -> None:
    path, topo = _setup(tmp_path, kafka_bootstrap)
    source = topo["sources"][0]["topic"]
    env = {"STREAMD_FRAME_TTL_S": "2"}
    procs.start_pipeline(path, workers=False, env=env)
    offsets = produce(kafka_bootstrap, source, _small_frames(5))
    store = RunStore(redis.Redis.from_url(redis_url), topo["name"], 2)
    wait_for(lambda: store.in_flight(source) == 5, timeout=60, what="5 frames handed off")
    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: not list(r.scan_iter(f"streamd:{topo['name']}:frame:*")), timeout=30,
             what="the payloads to expire from Redis")
    procs.start_workers(path, env=env)
    readers = _readers(kafka_bootstrap, topo)
    final = wait_for(lambda: (o := _outcomes(readers, source)) and set(offsets) <= set(o) and o,
                     timeout=120, what="dead letters for the expired frames")
    for w in offsets:
        assert [m["reason"] for m in final[w]] == ["frame_expired"], final[w]


def _produce_one_by_one(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    # one record per batch, so that the broker's high watermark (and so the lag) is exact on tansu too
    out = []
    for item in items:
        out += produce(bootstrap, topic, [item])
    return out


def _blocked_pipeline(tmp_path: Path, procs: Procs, kafka_bootstrap: str, policy: str,
                      metrics_port: int) -> tuple[Path, dict, str]:
    def edit(t: dict) -> None:
        t["sources"][0].update(max_in_flight=8, overload=policy)
        t["batch"] = {"max_size": 4, "max_wait_ms": 5}

    path, topo = _setup(tmp_path, kafka_bootstrap, edit)
    procs.start("daemon", "run", str(path), env={"STREAMD_METRICS_PORT": str(metrics_port)})
    return path, topo, topo["sources"][0]["topic"]


def test_block_policy_bounds_in_flight_and_grows_lag(tmp_path: Path, procs: Procs, kafka_bootstrap: str,
                                                      redis_url: str) -> None:
    path, topo, source = _blocked_pipeline(tmp_path, procs, kafka_bootstrap, "block", free_port())
    offsets = _produce_one_by_one(kafka_bootstrap, source, _small_frames(40))
    store = RunStore(redis.Redis.from_url(redis_url), topo["name"], 60)
    seen: list[int] = []
    wait_for(lambda: seen.append(store.in_flight(source)) or seen[-1] == 8, timeout=60, what="8 runs in flight")
    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    topology = load(path, settings=settings)
    wait_for(lambda: sum(consumer_lag(settings, topology.group_id, topology).values()) >= 40 - 8 - 8,
             timeout=60, what="consumer lag to build up")
    for _ in range(20):
        seen.append(store.in_flight(source))
    assert max(seen) <= 8
    procs.start_workers(path)
    readers = _readers(kafka_bootstrap, topo)
    final = wait_for(lambda: (o := _outcomes(readers, source)) and set(offsets) <= set(o) and o,
                     timeout=180, what="all 40 frames processed once the workers run")
    assert all({m["kind"] for m in final[w]} == {"result"} for w in offsets)
    wait_for(lambda: sum(consumer_lag(settings, topology.group_id, topology).values()) == 0, timeout=60,
             what="lag back to 0")


def test_drop_oldest_policy_counts_every_drop_as_a_dead_letter(tmp_path: Path, procs: Procs,
                                                                kafka_bootstrap: str, redis_url: str) -> None:
    port = free_port()
    path, topo, source = _blocked_pipeline(tmp_path, procs, kafka_bootstrap, "drop_oldest", port)
    offsets = produce(kafka_bootstrap, source, _small_frames(40))
    store = RunStore(redis.Redis.from_url(redis_url), topo["name"], 60)
    readers = _readers(kafka_bootstrap, topo)
    dropped = wait_for(lambda: [w for w, ms in _outcomes(readers, source).items()
                                if any(m["reason"] == "dropped" for m in ms if m["kind"] == "error")]
                       if len(_outcomes(readers, source)) >= 32 else None, timeout=60, what="32 dropped frames")
    assert store.in_flight(source) <= 8
    procs.start_workers(path)
    final = wait_for(lambda: (o := _outcomes(readers, source)) and set(offsets) <= set(o) and o,
                     timeout=180, what="an outcome for each of the 40 frames")
    letters = [w for w in offsets if final[w][0]["kind"] == "error"]
    assert all(len(final[w]) == 1 for w in offsets), "each frame has exactly one outcome"
    assert len(letters) == len(dropped) == 32
    assert _counter(port, "streamd_frames_dropped_total", reason="drop_oldest") == len(letters)


def test_sigterm_under_load_exits_within_the_drain_bound(tmp_path: Path, procs: Procs, kafka_bootstrap: str) -> None:
    path, topo = _setup(tmp_path, kafka_bootstrap)
    source = topo["sources"][0]["topic"]
    bound = 5.0
    procs.start_pipeline(path, env={"STREAMD_DRAIN_TIMEOUT_S": str(bound)})
    readers = _readers(kafka_bootstrap, topo)
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            try:
                produce(kafka_bootstrap, source, _small_frames(50, seed=i))
            except AssertionError:  # the broker went away at teardown
                return
            i += 1

    threading.Thread(target=feed, daemon=True).start()
    wait_for(lambda: len(_outcomes(readers, source)) >= 100, timeout=120, what="the pipeline under load")
    t0 = time.monotonic()
    for name in ("daemon", "worker-cpu", "worker-gpu"):
        os.kill(procs.procs[name].pid, signal.SIGTERM)
    for name in ("daemon", "worker-cpu", "worker-gpu"):
        procs.procs[name].wait(timeout=bound + 10)
        took = time.monotonic() - t0
        assert took <= bound + 5, f"{name} took {took:.1f} s to exit after SIGTERM"
    stop.set()
