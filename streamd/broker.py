"""The Celery side: one Celery app per topology, its settings, and dispatch.

Settings that carry streamd's delivery guarantees (see docs/reliability.md):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged
  after it ran, and a worker killed mid-task (SIGKILL, OOM) gives it back to
  the broker, which redelivers it to another worker.
* ``worker_prefetch_multiplier=1``: a worker holds one task per process, so a
  long inference does not idle tasks behind it.
* ``confirm_publish``: the daemon's dispatch returns only when RabbitMQ has
  the message, so the Kafka offset is committed after a durable hand-off.
* JSON only (``accept_content``): a broker message is untrusted input; pickle
  is never accepted. Frame bytes never travel here, only run ids.
* ``visibility_timeout`` (Redis broker only) longer than any task, so a
  running task is not redelivered while still running.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from .config import Settings
from .dag import Stage
from .runs import Batch
from .topology import Topology

__all__ = ["make_celery", "Dispatcher", "TASK_NAME"]

TASK_NAME = "streamd.stage"
#: Seconds; redelivery of a task after this long without acknowledgement (Redis broker only).
VISIBILITY_TIMEOUT_S = 4 * 3600


def make_celery(topology: Topology, settings: Settings) -> Celery:
    app = Celery(f"streamd-{topology.name}", broker=settings.broker_url, set_as_current=False)
    exchange = Exchange(f"streamd.{topology.name}", type="direct", durable=True)
    queues = [Queue(topology.celery_queue(q), exchange, routing_key=topology.celery_queue(q), durable=True)
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
        worker_prefetch_multiplier=1,
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


class Dispatcher:
    """Sends stage tasks (used by the daemon for root stages and by workers for children)."""

    def __init__(self, app: Celery, topology: Topology) -> None:
        self.app = app
        self.topology = topology

    def __call__(self, stage: Stage, batch: Batch) -> None:
        q = self.topology.celery_queue(stage.queue)
        self.app.send_task(
            TASK_NAME,
            args=[self.topology.name, stage.id, batch.message()],
            queue=q,
            routing_key=q,
            exchange=f"streamd.{self.topology.name}",
            # Celery would saferepr() the whole batch into the message headers for its logs: not needed.
            argsrepr=f"[{self.topology.name!r}, {stage.id!r}, <batch {batch.batch_id} of {len(batch.runs)}>]",
            kwargsrepr="{}",
        )

    def queue_depths(self) -> dict[str, int]:
        """Messages ready in each of the topology's queues (passive declare: creates nothing)."""
        depths: dict[str, int] = {}
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            for q in self.topology.queues():
                name = self.topology.celery_queue(q)
                try:
                    _, count, _ = channel.queue_declare(queue=name, passive=True)
                except Exception:
                    count = 0
                depths[q] = int(count)
        return depths
