"""Stage tasks published without waiting for each RabbitMQ publisher confirm (the daemon's hand-off).

RabbitMQ confirms a persistent message to a durable queue once it is on disk. Waiting for that
confirm inside the hand-off ties every frame that arrives meanwhile to RabbitMQ's disk: on the
benchmark's VM a confirm came within 2-3 ms most of the time and after 35-250 ms several times a
minute, and each slow one held up the next hand-offs of its topic (docs/performance.md, eighth
round). A worker has the task before RabbitMQ confirms it; only the Kafka offset has to wait.

:class:`ConfirmPipeline` publishes on a connection of its own, on a channel in confirm mode, and
returns a :class:`Ticket` at once; :meth:`ConfirmPipeline.wait` returns once RabbitMQ confirmed
the ticket's task. It raises :class:`~streamd.exceptions.NotConfirmed` when RabbitMQ refused
one (a nack), when the connection was lost first (the tasks may or may not be queued), or at its
timeout: the caller then hands the batch off again (its run ids are deterministic, so the claim
check is overwritten; a stage task that is queued twice runs twice, which at-least-once allows).

Thread-safety: publishing (the hand-off threads) and reading confirms share the connection under
one lock. A waiter waits for the socket to become readable outside the lock, then reads every
frame there is under it, so a hand-off never waits for a confirm.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery
from kombu import Connection, Producer

from .exceptions import NotConfirmed

__all__ = ["ConfirmPipeline", "Ticket"]

log = logging.getLogger(__name__)

#: Longest one wait for the socket; heartbeats are sent between waits.
POLL_S = 1.0


@dataclass(frozen=True)
class Ticket:
    """One published stage task: the connection it went out on and its delivery tag there."""

    connection: int
    tag: int


class ConfirmPipeline:
    """Publishes with publisher confirms, without waiting for them (see the module's docstring)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._generation = 0  # one per connection: a ticket of an earlier one can no longer be confirmed
        self._next_tag = 1
        self._pending: set[int] = set()  # delivery tags published and not yet confirmed, this connection
        self._nacked: set[int] = set()
        self._lost: tuple[type[BaseException], ...] = ()

    # -- publishing (hand-off threads) ----------------------------------------------------------------------------
    def publish(self, send: Callable[[Producer], None]) -> Ticket:
        """Publish one message (``send`` publishes it on the producer given); return at once with its ticket.
        A connection that fails is replaced and the message published once more; a second failure is raised
        (the daemon retries its hand-off)."""
        with self._lock:
            for attempt in (1, 2):
                producer = self._connected()
                try:
                    send(producer)
                except self._lost:
                    self._drop("publishing failed")
                    if attempt == 2:
                        raise
                    continue
                tag = self._next_tag
                self._next_tag += 1
                self._pending.add(tag)
                return Ticket(self._generation, tag)
        raise AssertionError("unreachable")

    # -- confirms ---------------------------------------------------------------------------------------------------
    def wait(self, ticket: Ticket, timeout: float) -> None:
        """Return once RabbitMQ confirmed the task of ``ticket``; raise NotConfirmed otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._settled(ticket):
                    return
                self._read()
                if self._settled(ticket):
                    return
                assert self._conn is not None
                sock = self._conn.connection.sock
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotConfirmed(f"RabbitMQ did not confirm 1 stage task within {timeout:.0f} s; check the broker "
                                   "(disk alarms, flow control)")
            try:
                select.select([sock], [], [], min(left, POLL_S))
            except (OSError, ValueError):  # the socket was closed meanwhile: the next look says so
                pass

    def tick(self) -> None:
        """Read what RabbitMQ sent and send a heartbeat when one is due (call every few seconds)."""
        with self._lock:
            if self._conn is not None:
                self._read()

    def close(self) -> None:
        with self._lock:
            self._drop("closing")

    def _settled(self, ticket: Ticket) -> bool:
        """Under the lock: True when the ticket's task is confirmed; raise when it cannot be."""
        if ticket.connection != self._generation:
            raise NotConfirmed("the connection to RabbitMQ was lost before it confirmed 1 stage task; "
                               "handing it off again")
        if ticket.tag in self._nacked:
            self._nacked.discard(ticket.tag)
            raise NotConfirmed("RabbitMQ refused 1 stage task (a nack: an internal error of the queue); "
                               "handing it off again")
        return ticket.tag not in self._pending

    def _read(self) -> None:
        """Under the lock: handle every frame there is (confirms), without blocking; heartbeats."""
        assert self._conn is not None
        conn = self._conn.connection
        try:
            conn.heartbeat_tick()
            while True:
                conn.drain_events(timeout=0)
        except TimeoutError:
            pass
        except self._lost as exc:
            self._drop(f"reading confirms failed: {exc}")

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=True)

    def _settle(self, tag: int, multiple: bool, *, nacked: bool) -> None:
        done = {t for t in self._pending if t <= tag} if multiple else {tag} & self._pending
        self._pending -= done
        if nacked:
            self._nacked |= done

    # -- the connection -------------------------------------------------------------------------------------------
    def _connected(self) -> Producer:
        """Under the lock: the producer, on a connection of this pipeline's own in confirm mode."""
        if self._producer is not None:
            return self._producer
        conf = self.app.conf
        # Not the app's confirm_publish: with it, py-amqp waits for every confirm inside the publish.
        options = {**(conf.broker_transport_options or {}), "confirm_publish": False}
        conn = Connection(conf.broker_url, heartbeat=conf.broker_heartbeat, transport_options=options,
                          connect_timeout=conf.broker_connection_timeout)
        self._lost = tuple(conn.connection_errors) + tuple(conn.channel_errors)
        try:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        except BaseException:
            conn.release()
            raise
        self._conn, self._producer = conn, Producer(channel)
        self._generation += 1
        self._next_tag = 1  # a channel numbers its publishes from 1 once in confirm mode
        self._pending.clear()
        self._nacked.clear()
        return self._producer

    def _drop(self, why: str) -> None:
        """Under the lock: forget the connection; what it had not confirmed can no longer be confirmed."""
        conn, self._conn, self._producer = self._conn, None, None
        if conn is None:
            return
        if self._pending:
            log.warning("RabbitMQ connection for stage tasks dropped (%s) with %d task(s) not confirmed; their "
                        "hand-offs are done again", why, len(self._pending))
        self._generation += 1
        self._pending.clear()
        self._nacked.clear()
        try:
            conn.collect()
        except Exception:  # noqa: BLE001 - closing a broken connection is best effort
            log.debug("closing the stage-task connection failed", exc_info=True)
