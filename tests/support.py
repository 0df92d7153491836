"""Helpers for tests that run streamd against real services and processes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from PIL import Image

from streamd import synth, tp
from streamd.services import stop

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = REPO / "topologies"


def wait_for(cond: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_topology(tmp: Path, base: str = "surface-inspection.yaml", *, edit: Callable[[dict], None] | None = None,
                  suffix: str | None = None) -> tuple[Path, dict]:
    """A copy of a shipped topology with a unique name and unique topics (a broker may be shared)."""
    data = yaml.safe_load((TOPOLOGIES / base).read_text())
    tag = suffix or uuid.uuid4().hex[:8]
    data["name"] = f"{data['name']}-{tag}"
    for s in data["sources"]:
        s["topic"] = f"{s['topic']}.{tag}"
    for sink in data["sinks"].values():
        sink["topic"] = f"{sink['topic']}.{tag}"
    for node in data["nodes"].values():
        if "model" in node.get("params", {}):
            node["params"]["model"] = str(REPO / node["params"]["model"])
    if edit:
        edit(data)
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def frame_message(source: str, seq: int, img: np.ndarray, *, ts: float | None = None, codec: str = "jpeg",
                  meta: dict | None = None) -> bytes:
    msg: dict[str, Any] = {"tp": 1, "kind": "frame", "source": source, "seq": seq,
                           "ts": time.time() if ts is None else ts, "codec": codec}
    if codec == "raw":
        msg.update(shape=list(img.shape), dtype="uint8", data=img.tobytes())
    else:
        msg["data"] = jpeg(img)
    if meta:
        msg["meta"] = meta
    return tp.pack(msg)


def camera_frames(n: int, cameras: int, defect_every: int, seed: int = 11) -> Iterable[tuple[str, int, np.ndarray,
                                                                                              str | None]]:
    """(source, seq, image, defect kind or None): frame i is defective when i % defect_every == 0."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        defect = synth.DEFECT_KINDS[(i // defect_every) % len(synth.DEFECT_KINDS)] if i % defect_every == 0 else None
        # sizes and channel counts vary independently of the defect kind
        size = ((128, 128), (240, 320), (96, 160))[(i // 7) % 3]
        img, _ = synth.camera_frame(rng, defect=defect, size=size, channels=1 if (i // 10 + i) % 2 else 3)
        yield f"line1-cam{i % cameras:02d}", i // cameras, img, defect


def producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})


def produce(bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes]]) -> list[tuple[int, int]]:
    """Produce (key, value) pairs in order; return each one's (partition, offset)."""
    p = producer(bootstrap)
    where: list[tuple[int, int] | None] = []

    def cb(i: int) -> Callable[[Any, Any], None]:
        def done(err: Any, msg: Any) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())
        return done

    for i, (key, value) in enumerate(items):
        where.append(None)
        p.produce(topic, key=key, value=value, on_delivery=cb(i))
        p.poll(0)
    assert p.flush(30) == 0
    return [w for w in where if w is not None]


class TopicReader:
    """Reads whole topics from the beginning (assigned partitions, no consumer group state)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"),
                           "enable.auto.commit": False, "auto.offset.reset": "earliest",
                           "session.timeout.ms": 6000})
        self.c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.messages: list[dict] = []

    def poll(self) -> list[dict]:
        for m in self.c.consume(500, timeout=0.2):
            if m.error():
                continue
            d = tp.decode_any(m.value())
            d["_kafka"] = {"partition": m.partition(), "offset": m.offset(), "key": m.key()}
            self.messages.append(d)
        return self.messages

    def until(self, cond: Callable[[list[dict]], bool], *, timeout: float, what: str) -> list[dict]:
        return wait_for(lambda: cond(self.poll()) and self.messages, timeout=timeout, what=what)

    def close(self) -> None:
        self.c.close()


def topics_of(topo: dict) -> dict[str, int]:
    return {s["topic"]: s["partitions"] for s in topo["sources"]} | {
        s["topic"]: s["partitions"] for s in topo["sinks"].values()}


class Procs:
    """streamd subprocesses of one test, with their logs; all are stopped at teardown."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([sys.executable, "-m", "streamd", *args], env={**os.environ, **self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"===== {n} =====\n{self.log(n)[-6000:]}" for n in self.procs)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, 9)
        proc.wait(10)

    def stop(self, name: str, timeout: float = 20.0) -> int | None:
        return stop(self.procs[name], timeout=timeout)

    def start_pipeline(self, path: Path, *, daemon: bool = True, workers: bool = True,
                       env: dict[str, str] | None = None) -> None:
        """One worker per queue (cpu with two processes) and the daemon."""
        if workers:
            self.start_workers(path, env=env)
        if daemon:
            self.start("daemon", "run", str(path), env=env)

    def start_workers(self, path: Path, *, env: dict[str, str] | None = None) -> None:
        self.start("worker-gpu", "worker", str(path), "--queues", "gpu", env=env)
        self.start("worker-cpu", "worker", str(path), "--queues", "cpu", "--concurrency", "2", env=env)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                    proc.wait(15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, 9)
                    except ProcessLookupError:
                        pass
                    proc.wait(5)
