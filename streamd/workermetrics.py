"""Metrics and health endpoints of a worker, right across prefork child processes.

Celery's prefork pool runs tasks in child processes, each with its own
memory; counters incremented there would be invisible to an HTTP server in
the parent. prometheus_client's multiprocess mode writes each process's
values to files in ``PROMETHEUS_MULTIPROC_DIR`` and the parent's ``/metrics``
adds them up. This module switches that mode on *before* any metric exists,
starts the endpoints in the parent, and checks Redis, the broker and Kafka
for ``/readyz`` every few seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

from .config import Settings
from .http import Health, serve
from .metrics import Metrics
from .topology import Topology

__all__ = ["worker_metrics"]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0


def _multiprocess_dir() -> str:
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):  # stale files of an earlier run would be added in
            if name.endswith(".db"):
                os.unlink(os.path.join(d, name))
    else:
        d = tempfile.mkdtemp(prefix="streamd-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
        import atexit

        atexit.register(shutil.rmtree, d, True)
    return d


def worker_metrics(topology: Topology, settings: Settings, queues: list[str]) -> Metrics:
    _multiprocess_dir()
    from celery import signals
    from prometheus_client import CollectorRegistry, multiprocess, values

    values.ValueClass = values.MultiProcessValue()
    metrics = Metrics(CollectorRegistry())
    health = Health()
    serve(settings.metrics_port, metrics.registry, health)

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_gone(pid: int | None = None, **_: object) -> None:
        multiprocess.mark_process_dead(pid or os.getpid())

    threading.Thread(target=_check_loop, args=(settings, health), name="readiness", daemon=True).start()
    return metrics


def _check_loop(settings: Settings, health: Health) -> None:
    import redis
    from confluent_kafka.admin import AdminClient
    from kombu import Connection

    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    admin = AdminClient(settings.kafka_config())
    while True:
        health.beat = time.time()
        health.check("redis", r.ping)
        health.check("kafka", lambda: admin.list_topics(timeout=5))

        def broker() -> None:
            with Connection(settings.broker_url, connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=1)

        health.check("broker", broker)
        time.sleep(CHECK_INTERVAL_S)
