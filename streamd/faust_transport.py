"""faust's Kafka transport (aiokafka driver) as the daemon uses it: three changes to faust's consumer.

1. **Fetch wait.** faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer; a broker that answers
   a parked fetch only at that deadline (tansu does) would hold every frame up to 1.5 s. The daemon
   sets it from ``STREAMD_KAFKA_FETCH_MAX_WAIT_MS``.

2. **One race per fetched batch, not per message.** faust's fetch loop
   (``faust.transport.consumer.Consumer._drain_messages``) hands every message to the streams under
   ``Service.wait_first(deliver(message), suspend_flow.wait())``, so that a delivery stuck on a full
   stream buffer is abandoned when a rebalance stops the flow. ``wait_first`` makes four tasks and an
   ``asyncio.wait`` each time: about 16 us of the event loop's thread per message on a 2-core VM, the
   largest single item in the daemon's per-frame cost after the hand-off itself
   (docs/performance.md). Here the messages of one fetch are delivered in order by one coroutine,
   raced once against the same events. What a flow stop abandons is the same as before: faust's own
   ``getmany`` stops yielding as soon as the flow stops, and a rebalance seeks every assigned
   partition back to its committed offset (``perform_seek``) and clears the stream buffers, so
   nothing that was not delivered is ever acknowledged. A message's read offset is recorded after
   its delivery (faust records it even when the delivery was abandoned). Gaps in offsets, periodic
   commits (``broker_commit_every``) and a turn of the event loop every 100 messages are kept as
   faust has them.

3. **A longer fetch wait while backlogged** (:class:`FetchWait`). Every fetch costs the daemon's
   consumer thread (aiokafka's protocol code, in Python, and a wake-up that contends for the GIL with
   the event loop and the hand-off) and the broker. While the daemon keeps up, a short wait is what
   keeps a frame from waiting on a parked fetch; while every source is held at its ``max_in_flight``
   bound, the daemon has more records than it may hand off and a short wait only buys more, smaller
   fetches. The wait is then ``STREAMD_KAFKA_FETCH_MAX_WAIT_BACKLOG_MS``, back to the short one as
   soon as a source's batching finds nothing queued (the daemon has caught up). Apache Kafka answers
   a fetch as soon as records are there, so there this changes little; a broker that holds every
   fetch to its deadline (tansu) answers ten times less often in a backlog (docs/performance.md,
   sixth round).

faust-streaming's internals move between releases: :func:`batch_delivery_supported` checks that what
the second change relies on is there, and the consumer falls back to faust's own loop (with a
warning) where it is not; where aiokafka's fetcher does not have the attribute the third change sets,
the wait stays the short one (with a warning).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import faust

__all__ = ["kafka_transport", "batch_delivery_supported", "FetchWait"]

log = logging.getLogger(__name__)

#: Messages delivered between two turns of the event loop (faust's own figure).
YIELD_EVERY = 100
#: What the batched fetch loop reads or calls on faust's consumer.
_NEEDS = ("callback", "getmany", "wait_first", "suspend_flow", "_read_offset", "_add_gap", "_commit_every",
          "_n_acked", "commit", "consumer_stopped_errors", "diag", "flow_active")


def batch_delivery_supported(consumer: Any) -> bool:
    return all(hasattr(consumer, name) for name in _NEEDS)


class FetchWait:
    """How long the broker may hold the daemon's fetch: ``short_ms`` while the daemon keeps up,
    ``backlog_ms`` while every source topic is backlogged (see the module). Thread-safe: the hand-off
    threads and the event loop report; the consumer thread reads the value when it builds a fetch."""

    def __init__(self, topics: Iterable[str], short_ms: int, backlog_ms: int,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.short_ms, self.backlog_ms = short_ms, max(short_ms, backlog_ms)
        self.current_ms = short_ms
        self.consumer: Any = None  # the aiokafka consumer, once faust's consumer thread has made it
        self.on_change = on_change
        self._backlogged = dict.fromkeys(topics, False)
        self._lock = threading.Lock()
        self._warned = False

    def attach(self, consumer: Any) -> None:
        """faust's consumer thread made a new aiokafka consumer: it starts with the wait that applies now."""
        with self._lock:
            self.consumer = consumer
            self._apply(self.current_ms)

    def backlogged(self, topic: str, yes: bool) -> None:
        """``topic`` is (or is no longer) held at its bound with more to read."""
        with self._lock:
            if self._backlogged.get(topic) is yes:
                return
            self._backlogged[topic] = yes
            want = self.backlog_ms if self._backlogged and all(self._backlogged.values()) else self.short_ms
            if want != self.current_ms and self._apply(want):
                self.current_ms = want
                log.debug("fetch wait now %d ms (%s)", want, "backlogged" if want == self.backlog_ms else "keeping up")
                if self.on_change is not None:
                    self.on_change(want)

    def _apply(self, ms: int) -> bool:
        consumer = self.consumer
        if consumer is None:
            return True  # no consumer yet: attach() gives it current_ms
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None and not hasattr(fetcher, "_fetch_max_wait_ms"):
            if not self._warned:
                log.warning("this aiokafka's fetcher has no _fetch_max_wait_ms: the fetch wait stays %d ms",
                            self.current_ms)
                self._warned = True
            return False
        consumer._fetch_max_wait_ms = ms  # read by AIOKafkaConsumer.start() for the fetcher it makes
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = ms  # read each time the consumer thread builds a fetch request
        return True


def kafka_transport(app: faust.App, fetch_wait: FetchWait) -> Any:
    """faust's aiokafka transport with its fetch wait from ``fetch_wait`` and batched delivery (see the
    module)."""
    from faust.transport import consumer as base
    from faust.transport.drivers import aiokafka as driver

    fetching_flag = getattr(base, "CONSUMER_FETCHING", "FETCHING")

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            fetch_wait.attach(consumer)
            return consumer

    class KafkaConsumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

        async def _drain_messages(self, fetcher: Any) -> None:
            if not batch_delivery_supported(self):
                log.warning("this faust-streaming lacks what batched delivery relies on; using faust's own "
                            "per-message fetch loop")
                await super()._drain_messages(fetcher)
                return
            should_stop, fetcher_should_stop = self._stopped.is_set, fetcher._stopped.is_set
            try:
                while not (should_stop() or fetcher_should_stop()):
                    self.diag.set_flag(fetching_flag)
                    fetched = self.getmany(timeout=1.0)
                    await self.sleep(0)  # as faust: getmany may return at once, again and again
                    if not self.should_stop:
                        await self._deliver_fetched([item async for item in fetched])
                    self.diag.unset_flag(fetching_flag)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    log.info("the broker stopped the consumer while the daemon shuts down")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    return
                raise
            except Exception as exc:
                log.exception("faust's fetch loop raised: %r", exc)
                raise
            finally:
                self.diag.unset_flag(fetching_flag)

        async def _deliver_fetched(self, batch: list[tuple[Any, Any]]) -> None:
            """Deliver one fetch's messages in order, raced against a flow stop (or the consumer
            stopping) once per stretch between two commits instead of once per message."""
            done = 0
            while done < len(batch) and not self.should_stop:
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()  # outside the race, as faust has it
                delivery = deliver(self, batch, done)
                race = await self.wait_first(delivery, self.suspend_flow.wait())
                if race.stopped or delivery not in race.done or self.suspend_flow.is_set():
                    return  # a rebalance stopped the flow, or the consumer is stopping: see the module
                handed = race.results[race.done.index(delivery)]
                if handed <= done:
                    return  # the flow stopped before the first of them
                done = handed

    class Transport(driver.Transport):
        Consumer = KafkaConsumer

    return Transport(app.conf.broker_consumer, app)


async def deliver(consumer: Any, batch: list[tuple[Any, Any]], start: int) -> int:
    """Hand ``batch[start:]`` to the streams (faust's per-message steps); stop where a commit is due, or
    the flow stopped. Returns the index of the first message not handed over."""
    callback = consumer.callback
    read_offset = consumer._read_offset
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    every = consumer._commit_every
    for i in range(start, len(batch)):
        if not consumer.flow_active or (i > start and every is not None and consumer._n_acked >= every):
            return i  # at least one message per call, so that a commit after every message still moves on
        if (i - start) % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)  # let the loop turn on a long fetch
        tp, message = batch[i]
        offset, r_offset = message.offset, read_offset[tp]
        if r_offset is not None and offset < r_offset:
            continue  # already read (faust drops it too)
        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
            await consumer._add_gap(tp, r_offset + 1, offset)  # offsets missing from the log count as acked
        await callback(message)
        read_offset[tp] = offset
    return len(batch)
