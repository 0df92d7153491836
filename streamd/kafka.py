"""Kafka plumbing shared by the daemon, the sinks and the tools (confluent-kafka).

* :func:`ensure_topics` creates missing topics with the partition count the
  topology gives (never rely on broker auto-creation: it picks its own count).
* :class:`Publisher` is an idempotent producer created lazily *in the process
  that uses it* (a librdkafka producer must not cross a fork), whose
  :meth:`Publisher.publish` returns only when every record is acknowledged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .config import Settings
from .exceptions import PublishError, ServiceUnavailable

__all__ = ["ensure_topics", "Publisher", "Record"]

log = logging.getLogger(__name__)

#: (topic, key, value)
Record = tuple[str, bytes | None, bytes]


def ensure_topics(settings: Settings, topics: Mapping[str, int], *, timeout: float = 30.0) -> list[str]:
    """Create each missing topic with its partition count; return the names created.

    An existing topic with another partition count is left alone, with a warning.
    """
    admin = AdminClient(settings.kafka_config())
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ServiceUnavailable(
            f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout:.0f} s ({exc}); "
            "check STREAMD_KAFKA_BOOTSTRAP and that the brokers are up"
        ) from None
    missing = {t: n for t, n in topics.items() if t not in meta.topics}
    for t, n in topics.items():
        if t in meta.topics and len(meta.topics[t].partitions) != n:
            log.warning(
                "topic %s has %d partitions, the topology asks for %d; leaving it as it is",
                t,
                len(meta.topics[t].partitions),
                n,
            )
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=n, replication_factor=-1) for t, n in missing.items()],
        request_timeout=timeout,
    )
    created = []
    for topic, fut in futures.items():
        try:
            fut.result(timeout=timeout)
            created.append(topic)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise ServiceUnavailable(f"could not create Kafka topic {topic!r}: {exc}") from None
    log.info("created topics %s", ", ".join(f"{t}({missing[t]})" for t in created))
    # Keep `admin` referenced until here: futures die with a destroyed handle.
    del admin
    return created


class Publisher:
    """An idempotent producer per process; :meth:`publish` waits for every acknowledgement."""

    def __init__(self, settings: Settings, *, extra: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.extra = dict(extra or {})
        self._producer: Producer | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _get(self) -> Producer:
        if self._producer is None or self._pid != os.getpid():
            conf = {
                **self.settings.kafka_config(),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                "message.timeout.ms": 30000,
                **self.extra,
            }
            self._producer = Producer(conf)
            self._pid = os.getpid()
        return self._producer

    def warm(self) -> None:
        """Create this process's producer now: an idempotent producer gets its producer id from the
        broker first, and the first records would otherwise wait for that."""
        with self._lock:
            self._get().poll(0)

    def publish(self, records: Iterable[Record], *, timeout: float = 30.0) -> int:
        """Send records and wait until Kafka acknowledged all of them; raise PublishError otherwise."""
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err.str()}")

        with self._lock:
            producer = self._get()
            n = 0
            for topic, key, value in records:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
                n += 1
            deadline = time.monotonic() + timeout
            remaining = producer.flush(timeout)
            while remaining and time.monotonic() < deadline:
                remaining = producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            raise PublishError(
                f"{remaining} record(s) not acknowledged by Kafka at {self.settings.kafka_bootstrap} "
                f"within {timeout:.0f} s"
            )
        if errors:
            raise PublishError(f"Kafka refused {len(errors)} record(s): {errors[0]}")
        return n

    def close(self) -> None:
        if self._producer is not None and self._pid == os.getpid():
            self._producer.flush(5)
        self._producer = None
