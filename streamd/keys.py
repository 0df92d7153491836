"""Redis key layout, in one place.

Every key streamd writes starts with ``streamd:<topology>:`` so one Redis can
serve several topologies and an operator can find (and size) a topology's
keys with ``SCAN MATCH streamd:<topology>:*``. Every data key has a TTL.

========================================  ==========================================
key                                        holds
========================================  ==========================================
``frame:<run_id>``                         the raw TP input message (claim check)
``out:<batch_id>:<node>``                  a Node's outputs for one batch, read by a later stage
``join:<batch_id>:<stage>``                set of parent stages done (fan-in join)
``done:<batch_id>``                        set of sink stages done for a batch
``dropped:<run_id>``                       tombstone of a run shed by the overload policy
``ended:<run_id>``                         marker of a run that ended (result or dead letter)
``inflight:<source>``                      sorted set run_id -> ingest time (backpressure)
``bytes``                                  hash run_id -> payload bytes (frame-store gauge)
========================================  ==========================================
"""

from __future__ import annotations

__all__ = ["Keys"]

PREFIX = "streamd"


class Keys:
    """Key builder for one topology."""

    def __init__(self, topology: str) -> None:
        self.base = f"{PREFIX}:{topology}:"

    def frame(self, run_id: str) -> str:
        return f"{self.base}frame:{run_id}"

    def output(self, batch_id: str, node: str) -> str:
        return f"{self.base}out:{batch_id}:{node}"

    def join(self, batch_id: str, stage: str) -> str:
        return f"{self.base}join:{batch_id}:{stage}"

    def done(self, batch_id: str) -> str:
        return f"{self.base}done:{batch_id}"

    def dropped(self, run_id: str) -> str:
        return f"{self.base}dropped:{run_id}"

    def ended(self, run_id: str) -> str:
        return f"{self.base}ended:{run_id}"

    def inflight(self, source: str) -> str:
        return f"{self.base}inflight:{source}"

    def inflight_pattern(self) -> str:
        return f"{self.base}inflight:*"

    def bytes(self) -> str:
        return f"{self.base}bytes"
