"""streamd.kafka: the per-process publisher, against a real Kafka-protocol broker (tansu)."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.config import Settings
from streamd.kafka import Publisher, ensure_topics

from .support import TopicReader, frame_message, unique

pytestmark = pytest.mark.integration


def test_warm_makes_the_producer_that_publish_then_uses(kafka_bootstrap: str) -> None:
    settings = Settings.from_env({"STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap})
    topic = unique("test-publisher")
    ensure_topics(settings, {topic: 1})
    publisher = Publisher(settings)
    publisher.warm()
    producer = publisher._producer
    assert producer is not None  # made before the first record, so its producer id is fetched meanwhile
    publisher.warm()
    record = frame_message("cam-warm", 7, np.zeros((8, 8, 1), dtype=np.uint8))
    assert publisher.publish([(topic, b"k", record)]) == 1
    assert publisher._producer is producer  # one producer per process
    publisher.close()
    reader = TopicReader(kafka_bootstrap, topic, 1)
    try:
        (got,) = reader.until(lambda ms: len(ms) >= 1, timeout=30, what="the published record")
        assert (got["source"], got["seq"]) == ("cam-warm", 7)
    finally:
        reader.close()
