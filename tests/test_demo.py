"""`streamd demo` with a frame limit: anomalies are printed and everything it started is stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .support import REPO

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_demo_prints_anomalies_and_stops_what_it_started(redis_url: str, broker_url: str) -> None:
    env = {**os.environ, "STREAMD_METRICS_PORT": "0", "STREAMD_REDIS_URL": redis_url, "STREAMD_BROKER_URL": broker_url}
    out = subprocess.run(
        [sys.executable, "-m", "streamd", "demo", "--frames", "60", "--fps", "10", "--defect-rate", "0.2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    # the cameras start once the daemon has its partitions, not before (its first frames would wait in Kafka)
    assert re.search(r"^  ready after [\d.]+ s$", out.stdout, re.M), text
    assert "playing anyway" not in out.stdout, text
    anomalies = re.findall(r"^ANOMALY #(\d+) .* truth: (\w+)", out.stdout, re.M)
    assert anomalies, text
    assert [int(n) for n, _ in anomalies] == list(range(1, len(anomalies) + 1))  # a running count
    summary = re.search(r"^60 frames sent \((\d+) with defects\): 60 results, (\d+) anomalies", out.stdout, re.M)
    assert summary, text
    stopped = re.search(r"^stopped (\d+) processes: (.*)$", out.stdout, re.M)
    assert stopped, text
    pids = [int(p) for p in re.findall(r"pid (\d+)", stopped.group(2))]
    assert len(pids) == int(stopped.group(1)) >= 4  # broker, two workers, daemon
    assert not [p for p in pids if _alive(p)]
    assert "|FAIL|rdkafka" not in text  # no librdkafka noise from the broker the demo stops under its producer
