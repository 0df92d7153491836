"""streamd.broker: the stage tasks the Dispatcher publishes, read back from a real RabbitMQ."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed
from kombu import Connection

from streamd.broker import PERSISTENT, QUEUE_VERSION_ARG, TASK_NAME, Dispatcher, declare_queues, make_celery
from streamd.config import Settings
from streamd.dag import plan
from streamd.exceptions import ConfigError, ServiceUnavailable
from streamd.nodes.base import Origin, RunContext
from streamd.runs import Batch, run_id_for
from streamd.topology import Topology, load

from .support import make_topology


@pytest.fixture
def setup(tmp_path: Path, broker_url: str) -> Iterator[tuple[Topology, Dispatcher, Any]]:
    path, _ = make_topology(tmp_path, suffix=f"broker-{uuid.uuid4().hex[:8]}")
    topo = load(path, settings=Settings())
    app = make_celery(topo, Settings(broker_url=broker_url))
    declare_queues(app, Settings(broker_url=broker_url))
    dispatcher = Dispatcher(app, topo)
    yield topo, dispatcher, app
    dispatcher.close()
    _delete_queues(app)


def _batch(topo: Topology, n: int) -> Batch:
    runs = []
    for i in range(n):
        origin = Origin("cameras.frames", 0, 40 + i)
        runs.append(RunContext(topology=topo.name, run_id=run_id_for(topo.name, origin), origin=origin, kind="frame",
                               source="cam1", seq=i, ts=1795618807.0))
    return Batch.of(runs)


def _get(broker_url: str, queue: str) -> Any:
    with Connection(broker_url) as conn:
        message = conn.default_channel.basic_get(queue, no_ack=True)
        assert message is not None, f"no message in {queue}"
        return message


def test_dispatch_publishes_a_celery_task_message(setup, broker_url):
    topo, dispatcher, app = setup
    p = plan(topo, {"publish"})
    root = p.roots()[0]
    batch = _batch(topo, 3)
    dispatcher(root, batch)
    message = _get(broker_url, topo.celery_queue(root.queue))
    # Celery's protocol 2, as send_task makes it: what a streamd worker consumes
    assert message.headers["task"] == TASK_NAME
    assert message.headers["id"] == message.properties["correlation_id"]
    assert "<batch " in message.headers["argsrepr"]
    assert message.properties["content_type"] == "application/json"
    assert message.properties["delivery_mode"] == PERSISTENT
    args, kwargs, _embed = json.loads(message.body)
    assert args == [topo.name, root.id, batch.message()]
    assert kwargs == {}
    assert Batch.from_message(args[2]) == batch


def test_dispatch_recovers_after_the_connection_is_lost(setup, broker_url):
    topo, dispatcher, app = setup
    root = plan(topo, {"publish"}).roots()[0]
    dispatcher(root, _batch(topo, 1))
    dispatcher._producer.connection.collect()  # the connection goes away under the held producer
    dispatcher(root, _batch(topo, 2))
    queue = topo.celery_queue(root.queue)
    sizes = sorted(len(json.loads(_get(broker_url, queue).body)[0][2]["runs"]) for _ in range(2))
    assert sizes == [1, 2]


def test_backlog_counts_the_tasks_waiting_in_every_queue(setup, broker_url):
    topo, dispatcher, app = setup
    stages = plan(topo, {"publish"}).stages
    assert dispatcher.backlog() == 0
    dispatcher(stages["decode"], _batch(topo, 2))  # cpu queue
    dispatcher(stages["autoencoder"], _batch(topo, 1))  # gpu queue
    dispatcher(stages["autoencoder"], _batch(topo, 3))
    assert dispatcher.backlog() == 3  # messages, not runs
    _get(broker_url, topo.celery_queue("gpu"))
    assert dispatcher.backlog() == 2


def test_the_app_carries_the_delivery_guarantees_and_the_prefetch_setting(tmp_path: Path) -> None:
    """Late acks and redelivery on a lost worker (docs/reliability.md); the prefetch from STREAMD_WORKER_PREFETCH."""
    path, _ = make_topology(tmp_path)
    topo = load(path, settings=Settings())
    conf = make_celery(topo, Settings()).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 2  # the running task and the next, per process
    assert make_celery(topo, Settings.from_env({"STREAMD_WORKER_PREFETCH": "1"})).conf.worker_prefetch_multiplier == 1


def _declare_raw(broker_url: str, name: str, arguments: dict[str, Any] | None) -> str | None:
    """Declare ``name`` durable with ``arguments`` on a connection of its own; RabbitMQ's refusal, if any."""
    with Connection(broker_url) as conn:
        try:
            conn.default_channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        except PreconditionFailed as exc:
            return str(exc.reply_text)
    return None


def _delete_queues(app: Any) -> None:
    with app.connection_for_write() as conn:
        for q in app.conf.task_queues:
            conn.default_channel.queue_delete(q.name)


def test_stage_queues_are_classic_queues_version_2(tmp_path: Path, broker_url: str) -> None:
    """RabbitMQ holds a version-2 queue to its arguments: declaring it as version 1 is refused (that is how a
    queue's arguments show through AMQP), and declaring it again as streamd does is not."""
    path, _ = make_topology(tmp_path, suffix=f"qv-{uuid.uuid4().hex[:8]}")
    topo = load(path, settings=Settings())
    settings = Settings(broker_url=broker_url)
    app = make_celery(topo, settings)
    assert all(q.queue_arguments == {QUEUE_VERSION_ARG: 2} for q in app.conf.task_queues)
    try:
        declare_queues(app, settings)
        declare_queues(app, settings)  # again, at the next start: the same arguments
        name = app.conf.task_queues[0].name
        assert "x-queue-version" in (_declare_raw(broker_url, name, {QUEUE_VERSION_ARG: 1}) or "")
        assert _declare_raw(broker_url, name, {QUEUE_VERSION_ARG: 2}) is None
    finally:
        _delete_queues(app)


def test_a_queue_declared_with_other_arguments_is_a_clear_error(tmp_path: Path, broker_url: str) -> None:
    """An earlier streamd declared the queue without the argument: the error names the queue, the setting and both
    ways out; STREAMD_BROKER_QUEUE_VERSION=0 then declares it as it is."""
    path, _ = make_topology(tmp_path, suffix=f"qv-{uuid.uuid4().hex[:8]}")
    topo = load(path, settings=Settings())
    settings = Settings(broker_url=broker_url)
    app = make_celery(topo, settings)
    name = app.conf.task_queues[0].name
    try:
        assert _declare_raw(broker_url, name, None) is None  # as streamd before the eleventh landing did
        with pytest.raises(ConfigError) as err:
            declare_queues(app, settings)
        text = str(err.value)
        assert name in text and "STREAMD_BROKER_QUEUE_VERSION" in text and "rabbitmqctl delete_queue" in text
        legacy = Settings.from_env({"STREAMD_BROKER_URL": broker_url, "STREAMD_BROKER_QUEUE_VERSION": "0"})
        old_app = make_celery(topo, legacy)
        assert all(q.queue_arguments is None for q in old_app.conf.task_queues)
        declare_queues(old_app, legacy)
    finally:
        _delete_queues(app)


def test_an_unreachable_broker_is_service_unavailable(tmp_path: Path) -> None:
    path, _ = make_topology(tmp_path)
    topo = load(path, settings=Settings())
    settings = Settings(broker_url="amqp://guest:secret@127.0.0.1:1//")
    with pytest.raises(ServiceUnavailable) as err:
        declare_queues(make_celery(topo, settings), settings)
    assert "STREAMD_BROKER_URL" in str(err.value) and "secret" not in str(err.value)
