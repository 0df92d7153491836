"""`streamd demo`: anomalies are printed, and everything it started is stopped at its frame limit or on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from .support import REPO

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _env(redis_url: str, broker_url: str) -> dict[str, str]:
    return {**os.environ, "STREAMD_METRICS_PORT": "0", "STREAMD_REDIS_URL": redis_url, "STREAMD_BROKER_URL": broker_url}


def _assert_all_stopped(text: str) -> None:
    """The demo's last line names what it stopped: the broker, two workers and the daemon, all gone now."""
    stopped = re.search(r"^stopped (\d+) processes: (.*)$", text, re.M)
    assert stopped, text
    pids = [int(p) for p in re.findall(r"pid (\d+)", stopped.group(2))]
    assert len(pids) == int(stopped.group(1)) >= 4  # broker, two workers, daemon
    assert not [p for p in pids if _alive(p)]


def test_demo_prints_anomalies_and_stops_what_it_started(redis_url: str, broker_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamd", "demo", "--frames", "60", "--fps", "10", "--defect-rate", "0.2"],
        cwd=REPO, env=_env(redis_url, broker_url), capture_output=True, text=True, timeout=300,
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
    _assert_all_stopped(text)
    assert "|FAIL|rdkafka" not in text  # no librdkafka noise from the broker the demo stops under its producer


def test_sigterm_stops_the_demo_and_everything_it_started(redis_url: str, broker_url: str) -> None:
    """A supervisor, ``timeout`` or a closed terminal (SIGTERM, SIGHUP) stops the demo as Ctrl-C does: by
    default the signal would end the demo at once and leave its broker, workers and daemon running."""
    proc = subprocess.Popen([sys.executable, "-m", "streamd", "demo", "--fps", "10"], cwd=REPO,
                            env=_env(redis_url, broker_url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    first_anomaly = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ANOMALY #"):
                first_anomaly.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_anomaly.wait(120), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 128 + signal.SIGTERM, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    text = "".join(lines)
    assert "SIGTERM: stopping everything the demo started" in text, text
    _assert_all_stopped(text)
    assert "Traceback" not in text, text
