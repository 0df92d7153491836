"""The Celery side: one Celery app per topology, its settings, and dispatch.

Settings that carry streamd's delivery guarantees (see docs/reliability.md):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged
  after it ran, and a worker killed mid-task (SIGKILL, OOM) gives it back to
  the broker, which redelivers it to another worker.
* ``worker_prefetch_multiplier`` = ``STREAMD_WORKER_PREFETCH`` (2) with ``-O fair``:
  a worker holds the running task and the next one per process, and gives a
  task only to a free process; the next is in hand when a task ends, instead
  of an ack and a delivery later (the gap between a pool process's tasks: 2.8
  against 1.9 ms median; drains +3 %, docs/performance.md, ninth round). At
  most one batch per process waits behind a running one (1: none).
* ``confirm_publish``: a worker's dispatch of a child stage returns only when
  RabbitMQ has the message (the task is acknowledged after it). The daemon
  publishes its root stages on a connection of its own and waits for the
  confirms off the hand-off path (:mod:`streamd.confirms`); either way the
  Kafka offset is committed only after a durable hand-off.
* Classic queues version 2 (``x-queue-version: 2``, ``STREAMD_BROKER_QUEUE_VERSION``):
  RabbitMQ still confirms a persistent task only once it is on disk, but a
  version-1 queue syncs its index to disk in its own process before every
  confirm, and holds every delivery meanwhile: on a disk whose fsync now and
  then takes 0.2-0.7 s, each such sync stalled every stage task for as long
  (docs/performance.md, eleventh round). :func:`declare_queues` says what to do
  when a queue exists with other arguments.
* JSON only (``accept_content``): a broker message is untrusted input; pickle
  is never accepted. Frame bytes never travel here, only run ids.
* ``visibility_timeout`` (Redis broker only) longer than any task, so a
  running task is not redelivered while still running.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import Celery
from kombu import Exchange, Queue
from kombu.utils.uuid import uuid

from .config import Settings, redact
from .confirms import ConfirmPipeline, Ticket
from .dag import Stage
from .exceptions import ConfigError, ServiceUnavailable, StreamdError
from .runs import Batch
from .topology import Topology

__all__ = ["make_celery", "declare_queues", "Dispatcher", "TASK_NAME", "speaks_amqp"]

TASK_NAME = "streamd.stage"
#: AMQP delivery mode of stage tasks: written to disk by RabbitMQ (Celery's default too).
PERSISTENT = 2
#: The queue argument that picks a RabbitMQ classic queue's implementation (3.10+; RabbitMQ 4 has only version 2).
QUEUE_VERSION_ARG = "x-queue-version"
#: Seconds; redelivery of a task after this long without acknowledgement (Redis broker only).
VISIBILITY_TIMEOUT_S = 4 * 3600


def make_celery(topology: Topology, settings: Settings) -> Celery:
    app = Celery(f"streamd-{topology.name}", broker=settings.broker_url, set_as_current=False)
    exchange = Exchange(f"streamd.{topology.name}", type="direct", durable=True)
    arguments = {QUEUE_VERSION_ARG: settings.broker_queue_version} if settings.broker_queue_version else None
    queues = [Queue(topology.celery_queue(q), exchange, routing_key=topology.celery_queue(q), durable=True,
                    queue_arguments=arguments)
              for q in topology.queues()]
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=settings.worker_prefetch,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True, "visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_heartbeat=30,
        task_queues=queues,
        task_default_queue=queues[0].name,
        task_default_exchange=exchange.name,
        task_create_missing_queues=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app


def declare_queues(app: Celery, settings: Settings) -> None:
    """Declare the app's exchange and queues; raise ServiceUnavailable when the broker cannot be reached, and
    ConfigError, saying what to do, when a queue exists with other arguments (RabbitMQ refuses to declare it)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
            for q in app.conf.task_queues:
                try:
                    q(conn.default_channel).declare()
                except PreconditionFailed as exc:
                    raise ConfigError(
                        f"RabbitMQ queue {q.name!r} exists with other arguments than streamd declares "
                        f"({exc.reply_text}). streamd declares its stage queues with "
                        f"{QUEUE_VERSION_ARG}={settings.broker_queue_version or 'none'} "
                        f"(STREAMD_BROKER_QUEUE_VERSION={settings.broker_queue_version}). Either set "
                        "STREAMD_BROKER_QUEUE_VERSION to what the queue has (0: no argument) for the daemon and "
                        f"every worker, or stop them, let the queue empty and delete it (rabbitmqctl delete_queue "
                        f"{q.name}): it is declared again at the next start (docs/operations.md)"
                    ) from None
    except StreamdError:
        raise
    except Exception as exc:
        raise ServiceUnavailable(
            f"Celery broker at {redact(settings.broker_url)} is not reachable ({exc}); check STREAMD_BROKER_URL"
        ) from None


def speaks_amqp(app: Celery) -> bool:
    """Whether the app's broker is an AMQP one (RabbitMQ), which has publisher confirms."""
    conn = app.connection_for_write()  # not connected
    try:
        return bool(conn.transport.driver_type == "amqp")
    finally:
        conn.release()


class Dispatcher:
    """Sends stage tasks (used by the daemon for root stages and by workers for children).

    A stage task is the message Celery's ``send_task`` would send (made by
    Celery's own ``create_task_message``: protocol 2, JSON, persistent),
    published on a producer this process holds on to. ``send_task`` acquires a
    producer from the pool, routes, fires signals and re-reads settings on every
    call: twice the CPU of the publish itself (docs/performance.md), on a path
    taken once per stage per batch. A publish that fails on the connection is
    retried once on a fresh producer; a second failure is raised to the caller
    (the daemon retries its hand-off, a worker's task is retried). Thread-safe:
    the daemon's hand-off threads (one per source topic) share the producer
    under a lock.
    """

    def __init__(self, app: Celery, topology: Topology, *, pipeline: ConfirmPipeline | None = None) -> None:
        self.app = app
        self.topology = topology
        self.exchange = f"streamd.{topology.name}"
        #: With a pipeline (the daemon on RabbitMQ), a call publishes without waiting for the confirm and
        #: returns the ticket to wait for (streamd.confirms); without one it returns once RabbitMQ confirmed.
        self.pipeline = pipeline
        self._producer: Any = None
        self._pid = -1
        # The daemon hands off from a thread per source topic; they share the held producer (one AMQP channel).
        self._lock = threading.RLock()
        conn = app.connection_for_write()  # not connected: only asked which errors mean "connection lost"
        self._lost: tuple[type[BaseException], ...] = tuple(conn.connection_errors)
        conn.release()

    def __call__(self, stage: Stage, batch: Batch) -> Ticket | None:
        q = self.topology.celery_queue(stage.queue)
        message = self.app.amqp.create_task_message(
            uuid(), TASK_NAME, [self.topology.name, stage.id, batch.message()], {},
            # Celery would saferepr() the whole batch into the message headers for its logs: not needed.
            argsrepr=f"[{self.topology.name!r}, {stage.id!r}, <batch {batch.batch_id} of {len(batch.runs)}>]",
            kwargsrepr="{}",
        )

        def send(producer: Any) -> None:
            producer.publish(message.body, exchange=self.exchange, routing_key=q, headers=message.headers,
                             serializer="json", delivery_mode=PERSISTENT, declare=None, retry=False,
                             **message.properties)

        if self.pipeline is not None:
            return self.pipeline.publish(send)
        with self._lock:
            for attempt in (1, 2):
                producer = self._held()
                try:
                    send(producer)
                    return None
                except self._lost:
                    self.close()
                    if attempt == 2:
                        raise
        return None

    def _held(self) -> Any:
        if self._producer is None or self._pid != os.getpid():  # never use a producer made before a fork
            self._producer = self.app.producer_pool.acquire(block=True)
            self._pid = os.getpid()
        return self._producer

    def backlog(self) -> int:
        """Stage tasks waiting for a worker, over all the topology's queues (passive declares).

        On the held producer's channel; any error counts as no backlog (the
        caller only uses it to decide how long to gather a batch)."""
        with self._lock:
            try:
                channel = self._held().channel
                return sum(self._ready(channel, q) for q in self.topology.queues())
            except Exception:
                self.close()
                return 0

    def close(self) -> None:
        """Give the held producer back (its connection is dropped: it may be the broken one)."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None and self._pid == os.getpid():
            try:
                producer.connection.collect()
            finally:
                producer.release()

    def queue_depths(self) -> dict[str, int]:
        """Messages ready in each of the topology's queues (passive declare: creates nothing)."""
        depths: dict[str, int] = {}
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            for q in self.topology.queues():
                try:
                    depths[q] = self._ready(channel, q)
                except Exception:
                    depths[q] = 0
        return depths

    def _ready(self, channel: Any, queue: str) -> int:
        """Messages ready in the topology's ``queue`` (passive declare: creates nothing)."""
        _, count, _ = channel.queue_declare(queue=self.topology.celery_queue(queue), passive=True)
        return int(count)
