"""``streamd run``: the ingest daemon, faust-streaming agents on the topology's source topics.

One agent per source topic reads events *without faust's automatic acks*
(``stream.noack()``): faust acks an event when the agent moves on or when the
stream is closed, even after an exception (the traps behind
faust-streaming/faust#606 and robinhood/faust#682). Here an event is acked
only after :meth:`streamd.ingest.Ingestor.handle` returned, i.e. after the
payload is in Redis and its runs are on the broker (or it is dead-lettered);
faust then commits the highest contiguous acked offset.

Back-pressure: under ``overload: block`` the agent waits until the topic has
room below ``max_in_flight`` for the whole batch, so that batches stay whole
(after ``FULL_ROOM_WAIT_S`` it takes what fits). The topic's hand-off thread polls the in-flight
count, ``ROOM_POLL_FIRST_S`` and then up to ``ROOM_POLL_MAX_S`` apart; each
source topic has its own hand-off thread, so one at its bound does not hold up
the others. Meanwhile faust's buffers fill and it stops fetching, so lag grows and
nothing is dropped.

Micro-batches: a batch is cut ``batch.max_wait_ms`` after its first event
(at once, with what the queue holds, when nothing was in flight at the
topic's previous hand-off: at a light load a window gathers nothing and only
adds latency), unless stage tasks are waiting in the broker for a worker (the workers are
all busy, at any stage): then it keeps gathering, window by window, up to
``batch.busy_wait_ms``, since handing it off now would only queue it. A
light load keeps its latency (a free worker takes the batch at once); a load
that queues work gets bigger batches (one task per stage per batch), so the
per-task cost falls as the load rises instead of small batches piling up.
The broker is asked at most every ``BACKLOG_CHECK_S``; under ``block`` the
room check, the wait for room and the hand-off are one trip to the hand-off
thread.

Event loops: faust's loop and its consumer thread's run on uvloop where it is
installed (``STREAMD_UVLOOP``): at a moderate load the daemon's CPU is mostly
loop turns, thread wake-ups and socket reads, which uvloop makes cheaper.

Fetching: faust's consumer with its fetch wait set from
``STREAMD_KAFKA_FETCH_MAX_WAIT_MS`` (faust hard-codes 1.5 s), raised to
``STREAMD_KAFKA_FETCH_MAX_WAIT_BACKLOG_MS`` while every source waits for room at
its bound and lowered again when a source's stream runs dry (caught up), and each
fetch's messages delivered to the agents under one race against a rebalance
instead of one per message (:mod:`streamd.faust_transport`).

Confirms: on RabbitMQ a hand-off publishes its stage tasks without waiting for
RabbitMQ's publisher confirms (:mod:`streamd.confirms`, ``STREAMD_PIPELINED_CONFIRMS``);
a task of its own waits for them and only then acks the hand-off's events (at most
``MAX_UNCONFIRMED`` hand-offs of a topic wait at a time), so a slow confirm (RabbitMQ's
disk) delays an offset commit, not the next hand-off. A confirm that does not come hands
the events off again.

Shutdown: SIGTERM stops the agents (``stream_wait_empty`` is off: faust's
``wait_empty`` hangs forever on an event that is never acked) and a watchdog
ends the process after ``STREAMD_DRAIN_TIMEOUT_S`` whatever faust is doing.
Events not yet handed off are simply not committed: the next daemon reads them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
import time
from typing import Any

import faust
import redis
from confluent_kafka import Consumer, TopicPartition
from kombu.exceptions import KombuError

from .broker import Dispatcher, declare_queues, make_celery, speaks_amqp
from .config import Settings, redact
from .confirms import ConfirmPipeline, Ticket
from .dag import plan
from .deadletters import DeadLetterSink
from .exceptions import ServiceUnavailable, StreamdError
from .faust_transport import FetchWait, kafka_transport
from .http import Health, serve
from .ingest import Ingestor, InMessage
from .kafka import Publisher, ensure_topics
from .memory import freeze_heap
from .metrics import Metrics
from .runs import RunStore
from .shutdown import start_drain_watchdog
from .topology import Topology

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 5.0
#: Seconds a broker backlog reading is reused by the batch windows of every source.
BACKLOG_CHECK_S = 0.05
#: Pauses between two reads of the in-flight count while a ``block`` source is at its bound: the first, and
#: the longest (they double in between). At the bound the broker holds a few batches' work for the workers,
#: so a pause does not leave them dry; and each read (a ZCARD from the hand-off thread, which contends for
#: the GIL with the event loop's thread) costs the daemon several times its own CPU (docs/performance.md).
ROOM_POLL_FIRST_S = 0.008
ROOM_POLL_MAX_S = 0.02
#: Longest one wait for room in the hand-off thread; then the event loop gets the thread back and asks again.
ROOM_WAIT_S = 0.5
#: Seconds a batch at the bound waits for room for all its runs before it goes with what fits. Room comes a
#: task's runs at a time (they end together), so the wait is short; handing off the part that fits instead cut
#: the batch in two, and every batch behind it (a backlog drained in tasks of 16-28 runs rather than 32, each
#: paying a task's fixed costs: docs/performance.md, ninth round).
FULL_ROOM_WAIT_S = 0.1
#: Seconds without room after which in-flight entries older than twice the frame TTL are pruned.
STALE_CHECK_S = 5.0
#: Hand-offs of one source topic that may wait for RabbitMQ's confirms at a time (the offsets of their events
#: are not committed meanwhile); one more waits until the oldest is confirmed.
MAX_UNCONFIRMED = 64
#: Seconds RabbitMQ has to confirm a hand-off's stage tasks before the hand-off is done again.
CONFIRM_TIMEOUT_S = 30.0
_INFRA_ERRORS = (StreamdError, redis.RedisError, KombuError, OSError, ConnectionError)


class Daemon:
    def __init__(self, topology: Topology, settings: Settings, metrics: Metrics | None = None) -> None:
        self.topology = topology
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.health = Health(stale_after_s=120)  # /healthz fails if the monitor loop stops turning
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.celery = make_celery(topology, settings)
        # On RabbitMQ a hand-off publishes without waiting for the publisher confirm: the events are acked (and
        # their offsets committed) once it comes, and a slow one does not hold up the next hand-offs.
        self.confirms = (ConfirmPipeline(self.celery) if settings.pipelined_confirms and speaks_amqp(self.celery)
                         else None)
        self.dispatcher = Dispatcher(self.celery, topology, pipeline=self.confirms)
        self.publisher = Publisher(settings)
        env = topology.node_env(settings)
        nodes = topology.build_nodes(env)
        self.plan = plan(topology, {n for n, node in nodes.items() if node.is_sink})
        self.store = RunStore(self.redis, topology.name, settings.frame_ttl_s)
        self.ingestor = Ingestor(
            topology=topology, plan=self.plan, store=self.store, dispatch=self.dispatcher,
            dead_letters=DeadLetterSink(topology.name, topology.sinks["dead_letter"].topic, self.publisher,
                                        self.metrics),
            metrics=self.metrics,
        )
        # A thread per source topic does its blocking hand-off I/O (and its waits for room), so the event loop
        # keeps turning and a source at its max_in_flight bound does not hold up the others' hand-offs.
        self.pools = {spec.topic: concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                        thread_name_prefix=f"handoff-{i}")
                      for i, spec in enumerate(topology.sources)}
        self._confirm_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="confirms")
        self._unconfirmed = {spec.topic: asyncio.Semaphore(MAX_UNCONFIRMED) for spec in topology.sources}
        self._confirming: set[asyncio.Future[None]] = set()  # the waits for confirms (held: asyncio keeps weak refs)
        self.group_id = settings.group_id or topology.group_id
        self._stop = threading.Event()
        self._frozen_running = False  # the heap was frozen again once consuming (see assigned())
        self._backlog_seen, self._backlog_at = 0, float("-inf")
        self._idle: dict[str, bool] = {}  # per source topic: nothing was in flight at its last hand-off
        self._room_waited: dict[str, float] = {}  # per source topic: seconds waited for room without getting any
        self.fetch_wait = FetchWait([spec.topic for spec in topology.sources], settings.kafka_fetch_max_wait_ms,
                                    settings.kafka_fetch_max_wait_backlog_ms,
                                    on_change=lambda ms: self.metrics.kafka_fetch_wait.set(ms / 1000.0))
        self.metrics.kafka_fetch_wait.set(self.fetch_wait.current_ms / 1000.0)
        self.app = self._build_app()

    # -- start-up ------------------------------------------------------------------
    def prepare(self) -> None:
        """Create topics and broker queues; fail early with a clear message if a service is missing."""
        ensure_topics(self.settings, self.topology.all_topics())
        declare_queues(self.celery, self.settings)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailable(
                f"Redis at {redact(self.settings.redis_url)} is not reachable ({exc}); check STREAMD_REDIS_URL"
            ) from None

    def _build_app(self) -> faust.App:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.kafka_security:
            kwargs["broker_credentials"] = _faust_credentials(s.kafka_security)
        app = faust.App(
            self.group_id,
            broker=",".join(f"kafka://{h}" for h in s.kafka_bootstrap.split(",")),
            web_enabled=False,
            stream_wait_empty=False,
            topic_allow_declare=False,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.kafka_session_timeout_ms / 1000.0,
            broker_heartbeat_interval=max(1.0, s.kafka_session_timeout_ms / 3000.0),
            broker_commit_interval=1.0,
            broker_max_poll_records=500,
            stream_buffer_maxsize=1024,
            value_serializer="raw",
            key_serializer="raw",
            store="memory://",
            **kwargs,
        )
        app.transport = kafka_transport(app, self.fetch_wait)
        for spec in self.topology.sources:
            topic = app.topic(spec.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw", partitions=spec.partitions)
            app.agent(topic, name=f"ingest.{spec.topic}", concurrency=1)(self._agent_for(spec.topic))
        app.timer(MONITOR_INTERVAL_S)(self._monitor)
        app.on_partitions_assigned.connect(self._on_assigned)
        return app

    async def _on_assigned(self, _app: Any, /, *args: Any, **_: Any) -> None:
        self.assigned(args[0] if args else set())  # faust sends the whole new assignment

    def assigned(self, assigned: Any) -> None:
        """The consumer group gave this daemon a new assignment (all of it): gauge and log it, per topic.
        The first one also freezes the heap again: faust's consumer and its fetcher exist from then on."""
        if self.settings.gc_freeze and not self._frozen_running:
            self._frozen_running = True
            freeze_heap("daemon consuming")
        for spec in self.topology.sources:
            parts = sorted(tp.partition for tp in assigned if tp.topic == spec.topic)
            self.metrics.kafka_assigned_partitions.labels(spec.topic).set(len(parts))
            log.info("consumer group %s: partitions %s of %s assigned to this daemon", self.group_id,
                     ",".join(map(str, parts)) or "none", spec.topic)

    # -- the agent -----------------------------------------------------------------
    def _agent_for(self, topic: str) -> Any:
        spec = self.topology.source(topic)
        batch_max = max(1, min(self.topology.batch_max, spec.max_in_flight))
        wait_s = self.topology.batch_wait_ms / 1000.0
        busy_s = max(wait_s, self.topology.batch_busy_wait_ms / 1000.0)

        async def ingest(stream: Any) -> None:
            loop = asyncio.get_running_loop()
            log.debug("agent for %s on %s", topic, type(loop).__module__)
            queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue(maxsize=batch_max)
            flusher = asyncio.ensure_future(self._flusher(topic, queue, batch_max, wait_s, busy_s))
            flusher.add_done_callback(_crash_on_error)
            try:
                async for event in stream.noack().events():
                    await queue.put((loop.time(), event))  # its arrival: the batch window counts from there
            finally:
                flusher.cancel()

        ingest.__name__ = f"ingest_{topic.replace('.', '_').replace('-', '_')}"
        return ingest

    async def _flusher(self, topic: str, queue: asyncio.Queue[tuple[float, Any]], batch_max: int, wait_s: float,
                       busy_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if queue.empty():
                self.fetch_wait.backlogged(topic, False)  # the stream ran dry: the daemon has caught up
            start, first = await queue.get()
            events = [first]
            # The window counts from the first event's arrival: one that arrived during the previous hand-off
            # has waited that long already. Nothing was in flight at the last hand-off (a light load): a
            # window would gather nothing more and only add its length to the latency, so the batch is what
            # the queue holds now (and the broker is not asked for a backlog: a round trip per batch window
            # at a light load, for nothing).
            idle = self._idle.get(topic, False)
            deadline, last = start + (0.0 if idle else wait_s), start + busy_s
            while len(events) < batch_max:
                if not queue.empty():  # what is there already: no timer, no task per event
                    events.append(queue.get_nowait()[1])
                    continue
                now = loop.time()
                if now >= deadline:
                    # The window is over: cut the batch, unless stage tasks are waiting for a worker (it would
                    # only queue behind them); then gather one more window, at most until busy_wait_ms.
                    if idle or now >= last or not await self._backlog(topic):
                        break
                    deadline = min(loop.time() + max(wait_s, 0.002), last)
                    continue
                try:
                    events.append((await asyncio.wait_for(queue.get(), deadline - now))[1])
                except TimeoutError:
                    pass
            await self._handoff(topic, events)

    async def _backlog(self, topic: str) -> int:
        """Stage tasks waiting in the broker; asked at most every BACKLOG_CHECK_S (two passive queue
        declares each time), since a backlog comes and goes over many batch windows."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._backlog_at >= BACKLOG_CHECK_S:
            self._backlog_seen = await loop.run_in_executor(self.pools[topic], self.dispatcher.backlog)
            self._backlog_at = loop.time()
        return self._backlog_seen

    async def _handoff(self, topic: str, events: list[Any]) -> None:
        block = self.topology.source(topic).overload == "block"
        while events:  # under block: hand off what there is room for (the whole batch, if it comes), then the rest
            done = await self._handoff_now(topic, events, block)
            events = events[done:]
            if events and self._stop.is_set():
                return  # stopping: what was not handed off is not acked, so not committed (the next daemon reads it)

    async def _handoff_now(self, topic: str, events: list[Any], block: bool) -> int:
        """Hand off the events (under block: all of them once there is room for all, or after FULL_ROOM_WAIT_S as
        many as there is room for, waiting at most ROOM_WAIT_S), in one trip to the hand-off thread; return how
        many. They are acked once RabbitMQ confirmed their stage tasks: at once when the hand-off waited for that
        itself, else by a wait of its own, while the next hand-offs go on (at most MAX_UNCONFIRMED of a topic wait
        at a time)."""
        loop = asyncio.get_running_loop()
        msgs = [InMessage(e.message.topic, e.message.partition, e.message.offset, e.key, e.value) for e in events]
        unconfirmed = self._unconfirmed[topic]
        await unconfirmed.acquire()
        delay = 0.2
        try:
            while True:
                try:
                    done, tickets = await loop.run_in_executor(self.pools[topic], self._handoff_sync, topic, msgs,
                                                               block)
                    break
                except _INFRA_ERRORS as exc:
                    log.error("hand-off of %d message(s) from %s failed, retrying in %.1f s: %s", len(msgs), topic,
                              delay, redact(f"{type(exc).__name__}: {exc}"))
                    self.health.set("redis", False, f"hand-off failing: {exc}")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
        except BaseException:
            unconfirmed.release()
            raise
        if tickets:
            wait = asyncio.ensure_future(self._ack_when_confirmed(topic, events[:done], tickets))
            self._confirming.add(wait)
            wait.add_done_callback(self._confirming.discard)
            wait.add_done_callback(_crash_on_error)
        else:
            unconfirmed.release()
            for e in events[:done]:
                e.ack()
        return done

    async def _ack_when_confirmed(self, topic: str, events: list[Any], tickets: list[Ticket]) -> None:
        """Ack a hand-off's events once RabbitMQ confirmed its stage tasks; hand them off again if it did not."""
        assert self.confirms is not None
        loop = asyncio.get_running_loop()
        failed: BaseException | None = None
        try:
            for ticket in tickets:
                await loop.run_in_executor(self._confirm_pool, self.confirms.wait, ticket, CONFIRM_TIMEOUT_S)
        except _INFRA_ERRORS as exc:
            failed = exc
        finally:
            self._unconfirmed[topic].release()
        if failed is None:
            for e in events:
                e.ack()
            return
        log.warning("hand-off of %d message(s) from %s: %s", len(events), topic, failed)
        await self._handoff(topic, events)  # acked once this one is confirmed

    def _handoff_sync(self, topic: str, msgs: list[InMessage], block: bool) -> tuple[int, list[Ticket]]:
        spec = self.topology.source(topic)
        room = self.ingestor.room(topic)
        # all of max_in_flight free: the runs handed off before have all ended (a light load)
        self._idle[topic] = room >= spec.max_in_flight
        if block:
            need = min(len(msgs), spec.max_in_flight)
            if room < need:
                room = self._wait_room(topic, need)
            msgs = msgs[:max(0, room)]
        tickets = self.ingestor.handle(msgs) if msgs else []
        return len(msgs), tickets

    def _wait_room(self, topic: str, need: int) -> int:
        """In the topic's hand-off thread: poll the in-flight count until the topic has room for the ``need`` runs
        of the batch, or, after FULL_ROOM_WAIT_S, for at least one; for at most ROOM_WAIT_S (then the loop asks
        again: a stopping daemon is not held up); return the room.

        Polling here, not from the event loop, costs one ZCARD per look instead of a thread trip as well.
        """
        self.fetch_wait.backlogged(topic, True)  # more to read than may be handed off: fewer, fuller fetches
        delay, waited = ROOM_POLL_FIRST_S, 0.0
        while True:
            time.sleep(delay)
            waited += delay
            room = self.ingestor.room(topic)
            if (room >= need or (room >= 1 and waited >= FULL_ROOM_WAIT_S) or waited >= ROOM_WAIT_S
                    or self._stop.is_set()):
                break
            delay = min(delay * 2, ROOM_POLL_MAX_S)
        self._room_waited[topic] = self._room_waited.get(topic, 0.0) + waited
        if room < 1 and self._room_waited[topic] > STALE_CHECK_S:
            # entries of runs whose payload expired long ago (a worker lost them) cannot block forever
            self.store.prune(topic, self.settings.frame_ttl_s * 2)
            self._room_waited[topic] = 0.0
        elif room >= 1:
            self._room_waited[topic] = 0.0
        return room

    # -- monitoring ----------------------------------------------------------------
    async def _monitor(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.refresh_gauges)

    def refresh_gauges(self) -> None:
        m, name = self.metrics, self.topology.name
        if self.confirms is not None:
            try:
                self.confirms.tick()  # heartbeats on the hand-off's RabbitMQ connection while it is quiet
            except Exception:  # noqa: BLE001 - a broken connection is replaced at the next hand-off
                log.debug("confirm pipeline tick failed", exc_info=True)
        self.health.beat = time.time()
        if self.health.check("redis", self.redis.ping):
            keys, size = self.store.store_size()
            m.frame_store_keys.labels(name).set(keys)
            m.frame_store_bytes.labels(name).set(size)
            for spec in self.topology.sources:
                m.frames_in_flight.labels(name, spec.topic).set(self.store.in_flight(spec.topic))
        try:
            for queue, depth in self.dispatcher.queue_depths().items():
                m.queue_depth.labels(self.topology.celery_queue(queue)).set(depth)
            self.health.set("broker", True, "ok")
        except Exception as exc:
            self.health.set("broker", False, f"{type(exc).__name__}: {exc}")
        try:
            for (topic, partition), lag in consumer_lag(self.settings, self.group_id, self.topology).items():
                m.kafka_consumer_lag.labels(topic, str(partition)).set(lag)
            self.health.set("kafka", True, "ok")
        except Exception as exc:
            self.health.set("kafka", False, f"{type(exc).__name__}: {exc}")

    # -- running -------------------------------------------------------------------
    def run(self) -> int:
        if self.settings.uvloop:
            use_uvloop()
        self.prepare()
        serve(self.settings.metrics_port, self.metrics.registry, self.health)
        threading.Thread(target=self._first_check, daemon=True).start()
        worker = _Worker(self.app, loglevel=self.settings.log_level, drain_timeout_s=self.settings.drain_timeout_s,
                         stop_waiting=self._stop.set, quiet=True, redirect_stdouts=False, override_logging=False)
        if self.settings.gc_freeze:
            freeze_heap("daemon start-up")
        log.info("streamd daemon for %s: group %s, sources %s", self.topology.name, self.group_id,
                 ", ".join(s.topic for s in self.topology.sources))
        worker.execute_from_commandline()
        return 0

    def _first_check(self) -> None:
        try:
            self.refresh_gauges()
        except Exception:
            log.exception("first readiness check failed")


class _Worker(faust.Worker):
    """faust's worker with a bounded drain: SIGTERM starts a watchdog that ends the process."""

    def __init__(self, *args: Any, drain_timeout_s: float, stop_waiting: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drain_timeout_s = drain_timeout_s
        self.stop_waiting = stop_waiting  # tells the hand-off thread to stop waiting for room

    def _on_sigterm(self) -> None:
        self.stop_waiting()
        start_drain_watchdog(self.drain_timeout_s, what="daemon")
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self.stop_waiting()
        start_drain_watchdog(self.drain_timeout_s, what="daemon")
        super()._on_sigint()


def use_uvloop() -> bool:
    """Run the event loops made from now on (faust's, and its consumer thread's) on uvloop, where it is
    installed: the daemon's CPU is mostly event-loop turns, thread wake-ups and socket reads."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: the daemon runs on asyncio's own event loop")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _crash_on_error(fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.critical("ingest loop died: %r; stopping the daemon so that it restarts cleanly", exc, exc_info=exc)
        os.kill(os.getpid(), signal.SIGTERM)


def consumer_lag(settings: Settings, group_id: str, topology: Topology) -> dict[tuple[str, int], int]:
    """High watermark minus committed offset for every partition of the source topics."""
    c = Consumer({**settings.kafka_config(), "group.id": group_id, "enable.auto.commit": False,
                  "session.timeout.ms": settings.kafka_session_timeout_ms})
    try:
        tps = [TopicPartition(s.topic, p) for s in topology.sources for p in range(s.partitions)]
        committed = c.committed(tps, timeout=10)
        lag = {}
        for tp in committed:
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10, cached=False)
            start = tp.offset if tp.offset >= 0 else low
            lag[(tp.topic, tp.partition)] = max(0, high - start)
        return lag
    finally:
        c.close()


def _faust_credentials(security: dict[str, str]) -> Any:
    import ssl

    protocol = security.get("security.protocol", "").upper()
    ctx = None
    if "SSL" in protocol:
        ctx = ssl.create_default_context(cafile=security.get("ssl.ca.location") or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=security.get("sasl.username"), password=security.get("sasl.password"),
            mechanism=security.get("sasl.mechanism", "PLAIN"), ssl_context=ctx,
        )
    return ctx
