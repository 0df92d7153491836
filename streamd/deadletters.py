"""Dead letters: every input that ends without a result ends here, with a reason.

Both the daemon (bad messages, shed frames) and the workers (Node failures,
expired payloads, failed publications) publish TP v1 ``error`` records to the
topology's ``dead_letter`` topic through :class:`DeadLetterSink`, which waits
for Kafka's acknowledgement and counts each record in
``streamd_dead_letters_total{reason,stage}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import redact
from .kafka import Publisher
from .nodes.base import Origin
from .tp import REASONS, encode_error

__all__ = ["DeadLetter", "DeadLetterSink"]

log = logging.getLogger(__name__)

MAX_DETAIL = 2000


@dataclass(frozen=True)
class DeadLetter:
    origin: Origin
    reason: str
    detail: str
    stage: str
    source: str | None = None


class DeadLetterSink:
    def __init__(self, topology: str, topic: str, publisher: Publisher, metrics: Any = None) -> None:
        self.topology = topology
        self.topic = topic
        self.publisher = publisher
        self.metrics = metrics

    def publish(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        records = []
        now = time.time()
        for d in letters:
            detail = redact(d.detail)[:MAX_DETAIL]
            reason = d.reason
            if reason not in REASONS:  # an error class with no TP reason of its own
                reason, detail = "node_failed", f"{d.reason}: {detail}"
            _, value = encode_error(reason=reason, detail=detail, stage=d.stage, source=d.source,
                                    origin=d.origin.as_dict(), at=now)
            records.append((self.topic, (d.source or "").encode() or None, value))
        self.publisher.publish(records)
        for d in letters:
            log.warning("dead letter %s at %s (%s): %s", d.reason, d.origin, d.stage, redact(d.detail)[:300],
                        extra={"origin": str(d.origin), "source": d.source, "node": d.stage})
            if self.metrics is not None:
                self.metrics.dead_letters.labels(self.topology, d.reason, d.stage).inc()
