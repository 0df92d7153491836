"""Node fusion is an execution detail: the shipped topology gives the same records with it on and off.

Runs the surface-inspection DAG through StageExecutor with the real Nodes and
a real Redis; the Celery broker is replaced by an in-process queue of stage
tasks and Kafka by a recorder of the records the sink would publish.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from streamd import services, tp
from streamd.config import Settings
from streamd.dag import Stage, in_process, plan
from streamd.deadletters import DeadLetterSink
from streamd.executor import StageExecutor
from streamd.nodes.base import Origin, RunContext
from streamd.runs import Batch, RunStore, run_id_for
from streamd.topology import load

from .support import REPO, camera_frames, frame_message

REDIS_URL = os.environ.get("STREAMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []

    def publish(self, records: Any, timeout: float = 30.0) -> int:
        self.records += list(records)
        return len(records)


def _run(tmp: Path, fusion: bool, frames: list[tuple[str, int, Any, Any]], queues: tuple[str, ...] = ()
         ) -> tuple[list[dict], int]:
    """Records published and stage tasks run; ``queues``: those of the one worker that runs every task."""
    data = yaml.safe_load((REPO / "topologies" / "surface-inspection.yaml").read_text())
    data["name"] = f"fusion-{uuid.uuid4().hex[:8]}"
    data["fusion"] = fusion
    data["nodes"]["autoencoder"]["params"]["model"] = str(REPO / data["nodes"]["autoencoder"]["params"]["model"])
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = Settings(redis_url=REDIS_URL)
    topo = load(path, settings=settings)
    env = topo.node_env(settings)
    recorder = Recorder()
    env.publisher = recorder
    nodes = topo.build_nodes(env)
    p = plan(topo, {n for n, node in nodes.items() if node.is_sink})
    client = redis.Redis.from_url(REDIS_URL)
    store = RunStore(client, topo.name, 60)
    tasks: deque[tuple[Stage, Batch]] = deque()
    executor = StageExecutor(topology=topo.name, plan=p, nodes=nodes, store=store,
                             dead_letters=DeadLetterSink(topo.name, "dlq", recorder), dispatch=lambda s, b:
                             tasks.append((s, b)), in_process=in_process(p, topo, queues))
    runs = []
    items = []
    for offset, (src, seq, img, _) in enumerate(frames):
        origin = Origin("cameras.frames", 0, offset)
        run = RunContext(topology=topo.name, run_id=run_id_for(topo.name, origin), origin=origin, kind="frame",
                         source=src, seq=seq, ts=1_800_000_000.0 + offset)
        runs.append(run)
        items.append((run, frame_message(src, seq, img, ts=run.ts)))
    store.admit(items)
    batch = Batch.of(runs)
    for stage in p.roots():
        tasks.append((stage, batch))
    n_tasks = 0
    while tasks:
        stage, b = tasks.popleft()
        executor.run(stage.id, b, final_attempt=True)
        n_tasks += 1
    assert store.in_flight("cameras.frames") == 0
    client.delete(*client.keys(f"streamd:{topo.name}:*") or ["-"])
    decoded = []
    for _, _, value in recorder.records:
        d = tp.decode_any(value)
        d.pop("detected_at")
        d.pop("topology")
        decoded.append(d)
    return sorted(decoded, key=lambda d: (d["kind"], d["origin"]["offset"])), n_tasks


def test_fusion_on_and_off_publish_identical_records(tmp_path: Path) -> None:
    if not services.reachable(REDIS_URL, 6379):
        pytest.skip(f"no Redis at {REDIS_URL}: start redis-server or set STREAMD_TEST_REDIS_URL")
    frames = list(camera_frames(24, cameras=2, defect_every=4, seed=8))
    fused, fused_tasks = _run(tmp_path, True, frames)
    unfused, unfused_tasks = _run(tmp_path, False, frames)
    assert len([d for d in fused if d["kind"] == "result"]) == 24
    assert any(d["kind"] == "anomaly" for d in fused)
    assert fused == unfused
    # decode+preprocess+quality (cpu) and autoencoder+ae_score+combine+publish (gpu) fuse:
    # 2 stage tasks per batch instead of 7
    assert (fused_tasks, unfused_tasks) == (2, 7)


def test_one_worker_for_both_queues_runs_the_model_stage_in_process(tmp_path: Path) -> None:
    if not services.reachable(REDIS_URL, 6379):
        pytest.skip(f"no Redis at {REDIS_URL}: start redis-server or set STREAMD_TEST_REDIS_URL")
    frames = list(camera_frames(12, cameras=2, defect_every=3, seed=9))
    split, split_tasks = _run(tmp_path, True, frames)
    one, one_tasks = _run(tmp_path, True, frames, queues=("cpu", "gpu"))
    off, off_tasks = _run(tmp_path, False, frames, queues=("cpu", "gpu"))
    assert one == split == off
    assert any(d["kind"] == "anomaly" for d in one)
    # a worker that serves both queues runs the gpu stage right after the cpu one: one task per batch;
    # with fusion off, every Node is still a task of its own
    assert (split_tasks, one_tasks, off_tasks) == (2, 1, 7)
