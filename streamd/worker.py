"""``streamd worker``: a Celery worker serving some of a topology's queues.

Pool and concurrency per queue (override with --pool/--concurrency or
STREAMD_WORKER_CONCURRENCY): a worker that serves ``gpu`` runs one prefork
process (one ONNX Runtime session, one GPU context); a ``cpu``-only worker
runs one prefork process per core. Each process builds the topology's Nodes
after the fork, loads and warms up its models at start, and sets ONNX
Runtime's intra-op threads to cores / processes so processes do not
oversubscribe the machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Reject

from .broker import TASK_NAME, Dispatcher, make_celery
from .config import Settings
from .dag import Plan, plan
from .deadletters import DeadLetterSink
from .exceptions import ConfigError, StreamdError
from .executor import Retry, StageExecutor
from .kafka import Publisher
from .metrics import Metrics
from .runs import Batch, RunStore
from .shutdown import start_drain_watchdog
from .topology import Topology

__all__ = ["WorkerRuntime", "build_worker_app", "run_worker", "choose_pool"]

log = logging.getLogger(__name__)

#: Seconds between retries of a failing stage: 1, 2, 4 ... capped.
MAX_BACKOFF_S = 30


class WorkerRuntime:
    """Per-process state of a worker: Nodes, Redis, the Kafka producer, the executor."""

    def __init__(self, topology: Topology, settings: Settings, queues: list[str], metrics: Metrics | None) -> None:
        self.topology = topology
        self.settings = settings
        self.queues = queues
        self.metrics = metrics
        self._executor: StageExecutor | None = None
        self._pid = -1
        self.app: Celery | None = None
        self.plan: Plan | None = None

    def executor(self) -> StageExecutor:
        if self._executor is None or self._pid != os.getpid():
            env = self.topology.node_env(self.settings)
            publisher = Publisher(self.settings)
            env.publisher = publisher
            env.metrics = self.metrics
            nodes = self.topology.build_nodes(env)
            self.plan = plan(self.topology, {n for n, node in nodes.items() if node.is_sink})
            assert self.app is not None
            store = RunStore(redis.Redis.from_url(self.settings.redis_url), self.topology.name,
                             self.settings.frame_ttl_s)
            dlq = DeadLetterSink(self.topology.name, self.topology.sinks["dead_letter"].topic, publisher,
                                 self.metrics)
            self._executor = StageExecutor(topology=self.topology.name, plan=self.plan, nodes=nodes, store=store,
                                           dead_letters=dlq, dispatch=Dispatcher(self.app, self.topology),
                                           metrics=self.metrics)
            self._pid = os.getpid()
            self._executor.setup(self.queues)
        return self._executor


def build_worker_app(topology: Topology, settings: Settings, queues: list[str],
                     metrics: Metrics | None = None) -> tuple[Celery, WorkerRuntime]:
    app = make_celery(topology, settings)
    runtime = WorkerRuntime(topology, settings, queues, metrics)
    runtime.app = app
    max_retries = max(spec.retries for spec in topology.nodes.values())

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def stage_task(self: Any, topology_name: str, stage_id: str, message: dict[str, Any]) -> None:
        if topology_name != topology.name:
            raise Reject(f"task for topology {topology_name!r} reached a worker of {topology.name!r}", requeue=False)
        batch = Batch.from_message(message)
        attempt = int(self.request.retries or 0)
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        try:
            runtime.executor().run(stage_id, batch, final_attempt=attempt >= max_retries, redelivered=redelivered)
        except Retry as exc:
            if metrics is not None:
                metrics.task_retries.labels(topology.name, stage_id).inc()
            log.warning("stage %s: %s; retry %d of %d", stage_id, exc, attempt + 1, max_retries,
                        extra={"stage": stage_id, "node": exc.node, "topology": topology.name,
                               "origin": ", ".join(str(r.origin) for r in batch.runs[:8])})
            raise self.retry(countdown=min(MAX_BACKOFF_S, 2**attempt), max_retries=None) from None
        except (StreamdError, redis.RedisError, OSError) as exc:
            # Infrastructure (Redis, Kafka for the dead letters) is down: nothing was lost, try again
            # later; the message stays with the broker until then.
            delay = min(MAX_BACKOFF_S, 2 ** min(attempt, 5))
            log.error("stage %s: %s: %s; retrying in %d s", stage_id, type(exc).__name__, exc, delay,
                      extra={"stage": stage_id, "topology": topology.name})
            raise self.retry(countdown=delay, max_retries=None) from None

    @signals.worker_process_init.connect(weak=False)
    def _init_process(**_: Any) -> None:  # prefork child: load and warm up the models now
        runtime.executor()

    @signals.worker_shutting_down.connect(weak=False)
    def _bounded_drain(**_: Any) -> None:
        # Celery's warm shutdown waits for running tasks without a bound; tasks not finished
        # by then stay unacknowledged and the broker redelivers them to another worker.
        start_drain_watchdog(settings.drain_timeout_s, what="worker")

    return app, runtime


def choose_pool(queues: list[str], settings: Settings, pool: str | None, concurrency: int | None) -> tuple[str, int]:
    cores = os.cpu_count() or 1
    if concurrency is None or concurrency <= 0:
        concurrency = settings.worker_concurrency or (1 if "gpu" in queues else cores)
    return pool or "prefork", concurrency


def run_worker(topology: Topology, settings: Settings, queues: list[str], *, pool: str | None = None,
               concurrency: int | None = None, metrics: Metrics | None = None) -> int:
    unknown = [q for q in queues if q not in topology.queues()]
    if unknown:
        raise ConfigError(
            f"queue(s) {', '.join(unknown)} are not used by topology {topology.name!r} "
            f"(its queues: {', '.join(topology.queues())})"
        )
    pool, concurrency = choose_pool(queues, settings, pool, concurrency)
    if not settings.onnx_threads:
        settings = replace(settings, onnx_threads=max(1, (os.cpu_count() or 1) // concurrency))
    app, _ = build_worker_app(topology, settings, queues, metrics)
    argv = [
        "worker",
        "-Q", ",".join(topology.celery_queue(q) for q in queues),
        "-P", pool,
        "-c", str(concurrency),
        "-n", f"{topology.name}-{'-'.join(queues)}-{os.getpid()}@%h",
        "-l", settings.log_level.upper(),
        "-O", "fair",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    log.info("worker for %s: queues %s, pool %s x%d, ONNX threads %d", topology.name, ",".join(queues), pool,
             concurrency, settings.onnx_threads)
    app.worker_main(argv)
    return 0
