"""The vibration-monitoring topology end to end against real services and streamd processes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from streamd import synth, tp
from streamd.config import Settings
from streamd.kafka import ensure_topics

from .support import Procs, TopicReader, make_topology, produce, topics_of

pytestmark = pytest.mark.integration


def reading(source: str, seq: int, values: np.ndarray, rate_hz: float = 5000.0) -> bytes:
    return tp.pack({"tp": 1, "kind": "reading", "source": source, "seq": seq, "ts": time.time(),
                    "rate_hz": rate_hz, "unit": "g", "values": values.astype("<f4").tobytes()})


def test_readings_yield_results_and_faults_yield_anomalies(tmp_path: Path, procs: Procs, kafka_bootstrap: str) -> None:
    path, topo = make_topology(tmp_path, "vibration-monitoring.yaml")
    ensure_topics(Settings(kafka_bootstrap=kafka_bootstrap), topics_of(topo))
    procs.start_pipeline(path)
    rng = np.random.default_rng(41)
    items, truth = [], []
    for i in range(150):
        fault = synth.SENSOR_FAULTS[(i // 10) % 3] if i % 10 == 0 else None
        src = f"pump{i % 3}-bearing1"
        items.append((src.encode(), reading(src, i // 3, synth.sensor_window(rng, fault=fault))))
        truth.append(fault)
    short = (b"pump0-bearing1", reading("pump0-bearing1", 999, np.zeros(100, dtype=np.float32)))
    offsets = produce(kafka_bootstrap, topo["sources"][0]["topic"], [*items, short])
    results = TopicReader(kafka_bootstrap, topo["sinks"]["results"]["topic"], 3)
    dlq = TopicReader(kafka_bootstrap, topo["sinks"]["dead_letter"]["topic"], 1)
    try:
        got = results.until(lambda ms: len(ms) >= 150, timeout=180, what="150 results")
    except AssertionError:
        print(procs.logs())
        raise
    by_origin = {(r["origin"]["partition"], r["origin"]["offset"]): r for r in got}
    assert len(got) == len(by_origin) == 150
    for where, fault in zip(offsets, truth, strict=False):
        r = by_origin[where]
        assert r["anomaly"] == (fault is not None), (where, fault, r["score"], r["threshold"])
        assert r["model"]["name"] == "vibration-gauss"
    letters = dlq.until(lambda ms: any(m["origin"]["offset"] == offsets[-1][1] and
                                       m["origin"]["partition"] == offsets[-1][0] for m in ms),
                        timeout=60, what="the dead letter of the short reading")
    letter = next(m for m in letters if (m["origin"]["partition"], m["origin"]["offset"]) == offsets[-1])
    assert letter["reason"] == "bad_values" and letter["stage"] == "features"
