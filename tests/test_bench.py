"""Smoke test of the benchmark (benchmarks/bench.py): it runs end to end with tiny settings and prints
its figures. No timing is asserted: the figures depend on the machine and on what else runs on it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .support import REPO

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_bench_runs_both_systems_and_prints_the_figures(tmp_path: Path, kafka_bootstrap: str, redis_url: str,
                                                        broker_url: str) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--frames", "200", "--warmup", "40", "--drains", "2",
         "--load-seconds", "2", "--search-seconds", "2", "--search-steps", "2", "--kafka", kafka_bootstrap,
         "--redis-url", redis_url, "--broker-url", broker_url, "--out", str(out)],
        capture_output=True, text=True, timeout=540, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    text = proc.stdout
    assert re.search(r"^machine: .+, \d+ cores, [\d.]+ GiB RAM, Python 3\.\d+\.\d+, onnxruntime \d", text, re.M), text
    for system in ("inline", "streamd"):
        line = re.search(rf"^{system}\s+throughput\s+([\d.]+) frames/s.*sustains\s+([\d.]+) frames/s.*"
                         r"p50 ([\d.]+) ms, p95 ([\d.]+) ms, p99 ([\d.]+) ms", text, re.M)
        assert line, text
        assert float(line.group(1)) > 0
        # each system drained twice, on two starts, and the report says so
        assert re.search(rf"^{system}\s+throughput .*\(backlog drain, median of 2: \d+ \d+\)", text, re.M), text
    assert re.search(r"^ratio streamd/inline: throughput [\d.]+", text, re.M), text
    # every load point on a fresh start: the search's light point, its steps and the half-load point
    assert "each on a fresh start" in text, text
    for system in ("inline", "streamd"):
        log = proc.stderr + proc.stdout
        starts = len(re.findall(rf"\] {system}: started \(", log))
        assert starts >= 2 + 3, log[-6000:]  # two drains, then at least three load points
    # by default streamd runs as a host without a GPU runs it: one worker for both queues
    assert "streamd workers: one worker: streamd worker --queues cpu,gpu" in text, text
    assert re.search(r"streamd CPU ms per frame .*streamd worker pool [\d.]+", text), text
    assert "ratio streamd/inline" in (out / "report.txt").read_text()
    assert (out / "summary.json").exists()
