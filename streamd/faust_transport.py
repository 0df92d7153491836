"""faust's Kafka transport (aiokafka driver) as the daemon uses it: two changes to faust's consumer.

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

faust-streaming's internals move between releases: :func:`batch_delivery_supported` checks that what
the second change relies on is there, and the consumer falls back to faust's own loop (with a
warning) where it is not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

__all__ = ["kafka_transport", "batch_delivery_supported"]

log = logging.getLogger(__name__)

#: Messages delivered between two turns of the event loop (faust's own figure).
YIELD_EVERY = 100
#: What the batched fetch loop reads or calls on faust's consumer.
_NEEDS = ("callback", "getmany", "wait_first", "suspend_flow", "_read_offset", "_add_gap", "_commit_every",
          "_n_acked", "commit", "consumer_stopped_errors", "diag", "flow_active")


def batch_delivery_supported(consumer: Any) -> bool:
    return all(hasattr(consumer, name) for name in _NEEDS)


def kafka_transport(app: faust.App, fetch_max_wait_ms: int) -> Any:
    """faust's aiokafka transport with ``fetch_max_wait_ms`` set and batched delivery (see the module)."""
    from faust.transport import consumer as base
    from faust.transport.drivers import aiokafka as driver

    fetching_flag = getattr(base, "CONSUMER_FETCHING", "FETCHING")

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read by AIOKafkaConsumer.start() for its fetcher
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
