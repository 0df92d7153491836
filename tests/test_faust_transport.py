"""The daemon's faust transport: batched delivery keeps faust's per-message rules (offsets, gaps, flow stops,
commits). The whole path runs against tansu in test_daemon.py and test_reliability.py (kills, restarts and
the rebalances they cause); here its steps are checked one by one."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streamd.config import Settings
from streamd.faust_transport import YIELD_EVERY, FetchWait, batch_delivery_supported, deliver
from streamd.kafka import ensure_topics

from .support import make_topology, unique

TOPIC = "cameras.in"
P0, P1 = TP(TOPIC, 0), TP(TOPIC, 1)


@dataclass
class Message:
    topic: str
    offset: int


class Consumer:
    """What :func:`deliver` reads and calls on faust's consumer, recording what it is given."""

    def __init__(self, commit_every: int | None = None, stop_flow_after: int | None = None) -> None:
        self.delivered: list[int] = []
        self.gaps: list[tuple[TP, int, int]] = []
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._commit_every = commit_every
        self._n_acked = 0
        self.flow_active = True
        self.stop_flow_after = stop_flow_after
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))

    async def callback(self, message: Message) -> None:
        self.delivered.append(message.offset)
        self._n_acked += 1
        if self.stop_flow_after is not None and len(self.delivered) >= self.stop_flow_after:
            self.flow_active = False  # what faust's stop_flow() does when a rebalance starts

    async def _add_gap(self, tp: TP, first: int, last: int) -> None:
        self.gaps.append((tp, first, last))


def batch(*items: tuple[TP, int]) -> list[tuple[TP, Any]]:
    return [(tp, Message(tp.topic, offset)) for tp, offset in items]


def run(consumer: Consumer, fetched: list[tuple[TP, Any]], start: int = 0) -> int:
    return asyncio.run(deliver(consumer, fetched, start))


def test_a_fetch_is_delivered_in_order_and_each_read_offset_is_recorded():
    c = Consumer()
    fetched = batch((P0, 0), (P1, 10), (P0, 1), (P1, 11))
    assert run(c, fetched) == 4
    assert c.delivered == [0, 10, 1, 11]
    assert c._read_offset[P0] == 1 and c._read_offset[P1] == 11
    assert c.gaps == []


def test_offsets_below_the_read_offset_are_skipped_as_faust_does():
    c = Consumer()
    c._read_offset[P0] = 3  # a seek, or messages fetched twice
    assert run(c, batch((P0, 1), (P0, 2), (P0, 3), (P0, 4))) == 4
    assert c.delivered == [3, 4]


def test_missing_offsets_are_registered_as_a_gap():
    c = Consumer()
    c._read_offset[P0] = 3
    run(c, batch((P0, 7)))
    assert c.gaps == [(P0, 4, 7)]  # faust counts offsets missing from the log (compaction, markers) as acked


def test_delivery_stops_where_the_flow_stops():
    c = Consumer(stop_flow_after=2)
    fetched = batch((P0, 0), (P0, 1), (P0, 2), (P0, 3))
    assert run(c, fetched) == 2  # the rest is left to the seek to committed offsets that follows
    assert c._read_offset[P0] == 1


def test_delivery_stops_where_a_commit_is_due_and_resumes_after_it():
    c = Consumer(commit_every=3)
    fetched = batch(*((P0, i) for i in range(5)))
    assert run(c, fetched) == 3  # the caller commits here, outside the race against a rebalance
    c._n_acked = 0
    assert run(c, fetched, 3) == 5
    assert c.delivered == [0, 1, 2, 3, 4]


def test_a_commit_after_every_message_still_moves_on():
    c = Consumer(commit_every=0)
    assert run(c, batch((P0, 0), (P0, 1))) == 1
    assert run(c, batch((P0, 0), (P0, 1)), 1) == 2


def test_a_long_fetch_lets_the_event_loop_turn():
    turns = 0

    async def scenario() -> int:
        nonlocal turns

        async def ticker() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        done = await deliver(Consumer(), batch(*((P0, i) for i in range(3 * YIELD_EVERY))), 0)
        tick.cancel()
        return done

    assert asyncio.run(scenario()) == 3 * YIELD_EVERY
    assert turns >= 3


def test_the_daemons_faust_consumer_has_what_batched_delivery_relies_on(tmp_path: Path, redis_url: str,
                                                                        broker_url: str) -> None:
    """A faust-streaming upgrade that renames what batched delivery uses fails here, not in production
    (where the consumer would fall back to faust's own loop with a warning)."""
    from prometheus_client import CollectorRegistry

    from streamd.daemon import Daemon
    from streamd.metrics import Metrics
    from streamd.topology import load

    path, _ = make_topology(tmp_path)
    settings = Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": "127.0.0.1:9", "STREAMD_REDIS_URL": redis_url,
                                  "STREAMD_BROKER_URL": broker_url})
    daemon = Daemon(load(path, settings=settings), settings, Metrics(CollectorRegistry()))
    try:
        consumer = daemon.app.consumer
        assert type(consumer).__name__ == "KafkaConsumer"
        assert batch_delivery_supported(consumer)
    finally:
        daemon.dispatcher.close()
        daemon.publisher.close()


# -- the fetch wait ----------------------------------------------------------------------------------


def test_the_backlog_wait_applies_only_while_every_source_is_backlogged() -> None:
    seen: list[int] = []
    wait = FetchWait(["a", "b"], short_ms=10, backlog_ms=100, on_change=seen.append)
    assert wait.current_ms == 10
    wait.backlogged("a", True)
    assert wait.current_ms == 10  # "b" still keeps up: its frames must not wait on a long fetch
    wait.backlogged("b", True)
    wait.backlogged("b", True)  # no change, no report
    assert wait.current_ms == 100
    wait.backlogged("a", False)
    assert wait.current_ms == 10
    assert seen == [100, 10]


def test_a_backlog_wait_below_the_short_one_is_raised_to_it() -> None:
    wait = FetchWait(["a"], short_ms=50, backlog_ms=20)
    wait.backlogged("a", True)
    assert wait.current_ms == 50


def test_the_wait_reaches_the_fetch_requests_of_a_running_consumer(kafka_bootstrap: str) -> None:
    """Against tansu: the running fetcher of a started aiokafka consumer sends its next fetch requests with
    the backlog wait, and with the short one again once caught up."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.protocol.fetch import FetchRequest

    topic = unique("fetch-wait")
    ensure_topics(Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap}), {topic: 1})

    async def scenario() -> list[int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=10,
                                    enable_auto_commit=False)
        await consumer.start()
        sent: list[int] = []
        send = consumer._client.send

        async def recording(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(request, FetchRequest):
                sent.append(request._max_wait_ms)
            return await send(node_id, request, *args, **kwargs)

        consumer._client.send = recording
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.seek_to_beginning()
            wait = FetchWait([topic], short_ms=10, backlog_ms=100)
            wait.attach(consumer)
            seen = []
            for backlogged, expected in ((True, 100), (False, 10)):
                wait.backlogged(topic, backlogged)
                deadline = asyncio.get_running_loop().time() + 10
                while expected not in sent[-1:] and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
                seen.append(sent[-1])
            return seen
        finally:
            await consumer.stop()

    assert asyncio.run(scenario()) == [100, 10]
