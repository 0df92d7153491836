"""streamd.confirms: publishing without waiting for each confirm, against a real RabbitMQ."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

from streamd.confirms import ConfirmPipeline, Ticket
from streamd.exceptions import NotConfirmed

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(broker_url: str) -> Iterator[tuple[ConfirmPipeline, str, Callable[..., Callable[[Any], None]]]]:
    """A pipeline on an app with publisher confirms on, a queue of its own (at most 3 messages: RabbitMQ
    refuses, with a nack, what would make it longer) and ``send(n)``, what publishes message n to it."""
    name = f"streamd-test-confirms-{uuid.uuid4().hex[:8]}"
    app = Celery("confirms-test", broker=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options={"confirm_publish": True}, broker_heartbeat=30)
    exchange = Exchange(name, type="direct", durable=False, auto_delete=True)
    q = Queue(name, exchange, routing_key=name, durable=False,
              queue_arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
    with Connection(broker_url) as conn:
        q(conn.default_channel).declare()

    def send(n: int) -> Callable[[Any], None]:
        def publish(producer: Any) -> None:
            producer.publish({"n": n}, exchange=name, routing_key=name, serializer="json", declare=None,
                             retry=False)

        return publish

    pipeline = ConfirmPipeline(app)
    yield pipeline, name, send
    pipeline.close()
    with Connection(broker_url) as conn:
        q(conn.default_channel).delete()


def _drain(broker_url: str, name: str) -> list[int]:
    got = []
    with Connection(broker_url) as conn:
        while (m := conn.default_channel.basic_get(name, no_ack=True)) is not None:
            got.append(json.loads(m.body)["n"])
    return got


def test_publish_returns_before_the_confirm_and_wait_returns_once_it_came(queue, broker_url):
    pipeline, name, send = queue
    tickets = [pipeline.publish(send(n)) for n in range(3)]
    assert [t.tag for t in tickets] == [1, 2, 3]
    assert len({t.connection for t in tickets}) == 1
    for t in tickets:
        pipeline.wait(t, timeout=10)
    assert sorted(_drain(broker_url, name)) == [0, 1, 2]


def test_a_task_rabbitmq_refuses_is_not_confirmed(queue, broker_url):
    pipeline, name, send = queue
    tickets = [pipeline.publish(send(n)) for n in range(4)]  # the queue holds 3: the fourth is nacked
    for t in tickets[:3]:
        pipeline.wait(t, timeout=10)
    with pytest.raises(NotConfirmed, match="refused 1 stage task"):
        pipeline.wait(tickets[3], timeout=10)
    assert sorted(_drain(broker_url, name)) == [0, 1, 2]


def test_tasks_of_a_lost_connection_are_not_confirmed_and_the_next_publish_reconnects(queue, broker_url):
    pipeline, name, send = queue
    before = pipeline.publish(send(0))
    pipeline.wait(before, timeout=10)
    pending = pipeline.publish(send(1))
    pipeline.close()  # what a lost connection does: what it had not confirmed never will be
    with pytest.raises(NotConfirmed, match="connection to RabbitMQ was lost"):
        pipeline.wait(pending, timeout=10)
    after = pipeline.publish(send(2))
    assert after.connection != pending.connection and after.tag == 1
    pipeline.wait(after, timeout=10)
    assert 2 in _drain(broker_url, name)


def test_a_confirm_that_does_not_come_times_out(queue):
    pipeline, _, send = queue
    ticket = pipeline.publish(send(0))
    pipeline.wait(ticket, timeout=10)
    never = Ticket(ticket.connection, 99)
    pipeline._pending.add(99)  # a publish RabbitMQ never confirms (as under a disk alarm), which no test can cause
    t0 = time.monotonic()
    with pytest.raises(NotConfirmed, match="did not confirm 1 stage task"):
        pipeline.wait(never, timeout=0.3)
    assert time.monotonic() - t0 < 5
    pipeline.tick()  # reading and heartbeats on a quiet connection


def test_an_unreachable_broker_is_an_error_at_publish():
    app = Celery("confirms-test", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    app.conf.update(broker_connection_timeout=1)
    pipeline = ConfirmPipeline(app)

    def send(producer: Any) -> None:
        raise AssertionError("nothing to publish on")

    with pytest.raises(OperationalError):  # a KombuError: the daemon retries its hand-off
        pipeline.publish(send)
