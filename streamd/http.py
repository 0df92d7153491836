"""The HTTP endpoints every streamd process serves on STREAMD_METRICS_PORT.

``/metrics``  Prometheus exposition (in a prefork worker: all child processes, via
              ``PROMETHEUS_MULTIPROC_DIR``)
``/healthz``  200 while the process is alive; with ``Health(stale_after_s=...)`` also only while
              its loop is turning (``health.beat`` refreshed within that many seconds), else 503
``/readyz``   200 when Kafka, Redis and the Celery broker answered the last check;
              503 with the name of each dependency that did not, and why
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import redact

__all__ = ["Health", "serve", "multiprocess_registry"]

log = logging.getLogger(__name__)


class Health:
    """Readiness of one process: the state of each dependency, set by periodic checks."""

    def __init__(self, dependencies: tuple[str, ...] = ("kafka", "redis", "broker"), *,
                 stale_after_s: float | None = None) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, tuple[bool, str]] = {d: (False, "not checked yet") for d in dependencies}
        self.started = time.time()
        self.beat = time.time()
        self.stale_after_s = stale_after_s

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """(alive, body of /healthz): not alive when the loop has not beaten for ``stale_after_s``."""
        now = time.time()
        since = now - self.beat
        ok = self.stale_after_s is None or since <= self.stale_after_s
        return ok, {"status": "alive" if ok else "stalled", "uptime_s": round(now - self.started, 1),
                    "last_beat_s": round(since, 1)}

    def set(self, dependency: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._state[dependency] = (ok, redact(detail))

    def check(self, dependency: str, probe: Callable[[], Any]) -> bool:
        try:
            probe()
        except Exception as exc:
            self.set(dependency, False, f"{type(exc).__name__}: {exc}")
            return False
        self.set(dependency, True, "ok")
        return True

    def ready(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            state = dict(self._state)
        return all(ok for ok, _ in state.values()), {d: ("ok" if ok else why) for d, (ok, why) in state.items()}


def multiprocess_registry() -> CollectorRegistry | None:
    """A registry that aggregates all processes' files, when multiprocess mode is on."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def serve(
    port: int, registry: CollectorRegistry, health: Health, *, host: str = "0.0.0.0"
) -> ThreadingHTTPServer | None:
    """Serve the endpoints in a daemon thread; port 0 disables them."""
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                reg = multiprocess_registry() or registry
                self._send(200, generate_latest(reg), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                alive, status = health.alive()
                self._send(200 if alive else 503, json.dumps(status).encode(), "application/json")
            elif path == "/readyz":
                ok, state = health.ready()
                body = json.dumps({"ready": ok, "dependencies": state}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "try /metrics, /healthz or /readyz"}', "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="streamd-http", daemon=True).start()
    log.info("serving /metrics, /healthz, /readyz on port %d", port)
    return server
