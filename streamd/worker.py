"""``streamd worker``: a Celery worker serving some of a topology's queues.

Pool and concurrency per queue (override with --pool/--concurrency or
STREAMD_WORKER_CONCURRENCY): a worker that serves ``gpu`` runs one prefork
process (one ONNX Runtime session, one GPU context) where ONNX Runtime can use
CUDA or TensorRT; where it cannot (no onnxruntime-gpu, or ``STREAMD_ONNX_PROVIDERS``
puts the CPU first), its models run on the CPU, and it runs like a ``cpu``
worker, since one process would leave the other cores idle (docs/performance.md):
one process per core plus one, of which one per core runs Nodes at a time
(``STREAMD_WORKER_COMPUTE_SLOTS``, :mod:`streamd.gate`), so that a task's
waits overlap another's compute. Each process builds the topology's Nodes after
the fork, loads and warms up its models at start, and sets ONNX Runtime's
intra-op threads to cores / processes computing at once (1 for a gpu worker)
so processes do not oversubscribe the machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Reject

from .broker import TASK_NAME, Dispatcher, declare_queues, make_celery
from .config import Settings
from .dag import in_process, plan
from .deadletters import DeadLetter, DeadLetterSink
from .exceptions import ConfigError, StreamdError
from .executor import Retry, StageExecutor
from .gate import NO_GATE, ComputeGate, Gate, pool_index
from .kafka import Publisher
from .memory import freeze_heap
from .metrics import Metrics
from .nodes.base import Node, resolve
from .runs import Batch, RunStore
from .shutdown import start_drain_watchdog
from .topology import Topology

__all__ = ["WorkerRuntime", "build_worker_app", "run_worker", "choose_pool", "compute_slots", "compute_gate"]

log = logging.getLogger(__name__)

#: Seconds between retries of a failing stage: 1, 2, 4 ... capped.
MAX_BACKOFF_S = 30


class WorkerRuntime:
    """Per-process state of a worker: Redis, the Kafka producer, dead letters, Nodes, the executor.

    Everything is created in the process that uses it (after a prefork fork)."""

    def __init__(self, topology: Topology, settings: Settings, queues: list[str], metrics: Metrics | None,
                 gate: Gate = NO_GATE) -> None:
        self.topology = topology
        self.gate = gate
        self.settings = settings
        self.queues = queues
        self.metrics = metrics
        self.app: Celery | None = None
        self._pid = -1
        self._executor: StageExecutor | None = None
        self._nodes: dict[str, Node] = {}
        self.plan = plan(topology, {n for n, spec in topology.nodes.items() if resolve(spec.type).is_sink})

    def _fresh(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._executor = None
        self._nodes = {}
        self.publisher = Publisher(self.settings)
        self.store = RunStore(redis.Redis.from_url(self.settings.redis_url), self.topology.name,
                              self.settings.frame_ttl_s)
        self.dead_letters = DeadLetterSink(self.topology.name, self.topology.sinks["dead_letter"].topic,
                                           self.publisher, self.metrics)

    def executor(self) -> StageExecutor:
        self._fresh()
        if self._executor is None:
            env = self.topology.node_env(self.settings)
            env.publisher = self.publisher
            env.metrics = self.metrics
            self._nodes = self.topology.build_nodes(env)
            assert self.app is not None
            executor = StageExecutor(topology=self.topology.name, plan=self.plan, nodes=self._nodes,
                                     store=self.store, dead_letters=self.dead_letters,
                                     dispatch=Dispatcher(self.app, self.topology), metrics=self.metrics,
                                     shedding_topics=self.topology.shedding_topics(),
                                     in_process=in_process(self.plan, self.topology, self.queues),
                                     gate=self.gate)
            executor.setup(self.queues)
            self.publisher.warm()  # the producer id is fetched while the process waits for its first task
            self._executor = executor
        return self._executor

    def retries(self, stage_id: str) -> int:
        """Retries of a stage: the most any of its Nodes asks for (0 for a stage this topology lacks)."""
        stage = self.plan.stages.get(stage_id)
        return max((self.topology.nodes[n].retries for n in stage.nodes), default=0) if stage else 0

    def abandon(self, stage_id: str, batch: Batch, exc: BaseException) -> None:
        """Dead-letter every run of a batch that cannot be processed at all (a bug, a stage this
        worker's topology does not have, a Node that cannot start), so that no run vanishes."""
        self._fresh()
        if stage_id in self.plan.stages:
            why = f"{type(exc).__name__}: {exc} (retries spent)"
        else:
            why = (f"stage {stage_id!r} is not in this worker's topology {self.topology.name!r}: "
                   "workers and daemon run different topology versions")
        log.error("stage %s: abandoning %d run(s): %s", stage_id, len(batch.runs), why,
                  extra={"stage": stage_id, "topology": self.topology.name})
        self.dead_letters.publish([DeadLetter(r.origin, "node_failed", why, stage_id, r.source) for r in batch.runs])
        self.store.finish(batch.runs)

    def close(self) -> None:
        for node in self._nodes.values():
            try:
                node.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("node %s: close failed", node.node_id)
        if self._pid == os.getpid():
            self.publisher.close()


def build_worker_app(topology: Topology, settings: Settings, queues: list[str],
                     metrics: Metrics | None = None, gate: Gate = NO_GATE) -> tuple[Celery, WorkerRuntime]:
    """The worker's Celery app and its per-process runtime. ``gate``: the compute gate of its pool, made
    here, in the main process, before the pool forks (:func:`compute_gate`)."""
    app = make_celery(topology, settings)
    runtime = WorkerRuntime(topology, settings, queues, metrics, gate)
    runtime.app = app

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def stage_task(self: Any, topology_name: str, stage_id: str, message: dict[str, Any]) -> None:
        if topology_name != topology.name:
            raise Reject(f"task for topology {topology_name!r} reached a worker of {topology.name!r}", requeue=False)
        batch = Batch.from_message(message)
        attempt = int(self.request.retries or 0)
        retries = runtime.retries(stage_id)
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        context = {"stage": stage_id, "topology": topology.name,
                   "origin": ", ".join(str(r.origin) for r in batch.runs[:8])}
        try:
            runtime.executor().run(stage_id, batch, final_attempt=attempt >= retries, redelivered=redelivered)
        except Retry as exc:
            if metrics is not None:
                metrics.task_retries.labels(topology.name, stage_id).inc()
            log.warning("stage %s: %s; retry %d of %d", stage_id, exc, attempt + 1, retries,
                        extra={**context, "node": exc.node})
            raise self.retry(countdown=min(MAX_BACKOFF_S, 2**attempt), max_retries=None) from None
        except (StreamdError, redis.RedisError, OSError) as exc:
            # Infrastructure (Redis, Kafka for the dead letters) is down: nothing was lost, try again
            # later; the message stays with the broker until then.
            delay = min(MAX_BACKOFF_S, 2 ** min(attempt, 5))
            log.error("stage %s: %s: %s; retrying in %d s", stage_id, type(exc).__name__, exc, delay, extra=context)
            raise self.retry(countdown=delay, max_retries=None) from None
        except Exception as exc:  # a bug: retry like a Node failure, then dead-letter; never drop silently
            if attempt < retries:
                log.exception("stage %s failed; retry %d of %d", stage_id, attempt + 1, retries, extra=context)
                raise self.retry(countdown=min(MAX_BACKOFF_S, 2**attempt), max_retries=None) from None
            runtime.abandon(stage_id, batch, exc)

    @signals.worker_init.connect(weak=False)
    def _freeze_before_fork(**_: Any) -> None:  # the main process, before the pool's children are forked
        if settings.gc_freeze:
            freeze_heap("worker start-up")

    @signals.worker_ready.connect(weak=False)
    def _freeze_ready(**_: Any) -> None:  # the main process, its consumer and pool started
        if settings.gc_freeze:
            freeze_heap("worker ready")

    @signals.worker_process_init.connect(weak=False)
    def _init_process(**_: Any) -> None:  # prefork child: load and warm up the models now
        gate.attach(pool_index())  # gives back a slot that the process this one replaces died holding
        try:
            runtime.executor()
        except Exception:  # noqa: BLE001 - the first task retries, then dead-letters its runs
            log.exception("worker process could not load its Nodes")
        if settings.gc_freeze:
            freeze_heap("worker process with its Nodes loaded")

    @signals.worker_process_shutdown.connect(weak=False)
    def _close_process(**_: Any) -> None:
        runtime.close()

    @signals.worker_shutting_down.connect(weak=False)
    def _bounded_drain(**_: Any) -> None:
        # Celery's warm shutdown waits for running tasks without a bound; tasks not finished
        # by then stay unacknowledged and the broker redelivers them to another worker.
        start_drain_watchdog(settings.drain_timeout_s, what="worker")

    return app, runtime


def choose_pool(queues: list[str], settings: Settings, pool: str | None, concurrency: int | None, *,
                cuda: bool | None = None) -> tuple[str, int]:
    """Pool and processes: ``--concurrency``, else STREAMD_WORKER_CONCURRENCY, else one process for a worker
    that serves ``gpu`` on a GPU, one per core plus one otherwise (one per core computes at a time:
    :func:`compute_slots`). ``cuda``: whether the models can use CUDA (None: ask ONNX Runtime,
    :func:`cuda_usable`)."""
    cores = os.cpu_count() or 1
    if concurrency is None or concurrency <= 0:
        concurrency = settings.worker_concurrency
    if not concurrency:
        on_gpu = "gpu" in queues and (cuda_usable(settings) if cuda is None else cuda)
        concurrency = 1 if on_gpu else cores + 1
    return pool or "prefork", concurrency


def compute_slots(settings: Settings, pool: str, concurrency: int) -> int | None:
    """How many of a prefork pool's processes may run Nodes at once: STREAMD_WORKER_COMPUTE_SLOTS, else the
    cores; None (no gate) when that is not fewer than the processes, or the pool is not prefork."""
    slots = settings.worker_compute_slots or os.cpu_count() or 1
    return slots if pool == "prefork" and concurrency > slots else None


def compute_gate(slots: int | None, concurrency: int, metrics: Metrics | None, topology: str) -> Gate:
    """The pool's compute gate (to make in the main process, before the pool forks); NO_GATE for None."""
    if slots is None:
        return NO_GATE
    waited = metrics.compute_slot_wait.labels(topology) if metrics is not None else None
    return ComputeGate(slots, concurrency, on_wait=waited.inc if waited is not None else None)


def cuda_usable(settings: Settings) -> bool:
    """Whether this worker's ONNX models will run on the GPU: the first provider they ask for that ONNX
    Runtime has (``STREAMD_ONNX_PROVIDERS``, else the Nodes' default cuda, cpu) is CUDA or TensorRT."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from .nodes.onnx import DEFAULT_PROVIDERS, PROVIDERS

    available = ort.get_available_providers()
    first = next((p for p in settings.onnx_providers or DEFAULT_PROVIDERS if PROVIDERS[p] in available), "cpu")
    return first in ("tensorrt", "cuda")


def run_worker(topology: Topology, settings: Settings, queues: list[str], *, pool: str | None = None,
               concurrency: int | None = None, metrics: Metrics | None = None) -> int:
    unknown = [q for q in queues if q not in topology.queues()]
    if unknown:
        raise ConfigError(
            f"queue(s) {', '.join(unknown)} are not used by topology {topology.name!r} "
            f"(its queues: {', '.join(topology.queues())})"
        )
    cuda = cuda_usable(settings)
    pool, concurrency = choose_pool(queues, settings, pool, concurrency, cuda=cuda)
    slots = compute_slots(settings, pool, concurrency)
    if not settings.onnx_threads:
        # A gpu worker's model runs on the GPU; on a CPU fallback one thread leaves the cores to the cpu
        # workers next to it (measured: benchmarks/, docs/performance.md). A cpu pool splits the cores
        # between the processes that compute at once.
        threads = 1 if "gpu" in queues else max(1, (os.cpu_count() or 1) // (slots or concurrency))
        settings = replace(settings, onnx_threads=threads)
    app, _ = build_worker_app(topology, settings, queues, metrics,
                              compute_gate(slots, concurrency, metrics, topology.name))
    declare_queues(app, settings)  # fail here, saying what to do, rather than in Celery's consumer start-up
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
    note = " (no CUDA here: the gpu queue's models run on the CPU)" if "gpu" in queues and not cuda else ""
    gated = f", {slots} computing at a time" if slots else ""
    log.info("worker for %s: queues %s, pool %s x%d%s, ONNX threads %d%s", topology.name, ",".join(queues), pool,
             concurrency, gated, settings.onnx_threads, note)
    app.worker_main(argv)
    return 0
