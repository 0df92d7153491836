"""The exception tree of streamd.

Every error streamd raises on purpose derives from :class:`StreamdError`, so a
caller can catch them all at once. Messages say *what* went wrong, *where*
(node id, YAML path, topic/partition/offset) and *what to do*.

::

    StreamdError
    ├── ConfigError               bad environment variable or command-line value
    ├── TopologyError             a topology file that cannot run (YAML path in .path)
    ├── ProtocolError             a Kafka message that breaks TP v1 (reason in .reason)
    │   └── UnsupportedVersion    "tp" major version other than 1
    ├── NodeError                 a Node failed on one input (node id in .node)
    │   ├── BadInput              the input cannot be processed (corrupt image, ...)
    │   └── ModelInputMismatch    tensor shape/dtype does not fit the model
    ├── FrameExpired              the claim-checked payload is gone from Redis
    ├── ServiceUnavailable        Kafka, Redis or the Celery broker cannot be reached
    │   └── NotConfirmed          RabbitMQ did not confirm a stage task the daemon published
    └── PublishError              a sink could not deliver a record to Kafka

Each error that ends up on the dead-letter topic carries a ``reason`` (a short
snake_case word, the ``reason`` field of the TP v1 ``error`` record).
"""

from __future__ import annotations

__all__ = [
    "StreamdError",
    "ConfigError",
    "TopologyError",
    "ProtocolError",
    "UnsupportedVersion",
    "NodeError",
    "BadInput",
    "ModelInputMismatch",
    "FrameExpired",
    "ServiceUnavailable",
    "NotConfirmed",
    "PublishError",
]


class StreamdError(Exception):
    """Root of every error streamd raises on purpose."""

    reason = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(StreamdError):
    """A configuration value (environment variable, CLI flag) is invalid."""

    reason = "config_error"


class TopologyError(StreamdError):
    """A topology cannot run. ``path`` is the YAML path, e.g. ``nodes.score.parents[1]``."""

    reason = "topology_error"

    def __init__(self, message: str, *, path: str = "", file: str = "") -> None:
        where = f"{file}: " if file else ""
        where += f"at {path}: " if path else ""
        super().__init__(f"{where}{message}")
        self.problem = message
        self.path = path
        self.file = file

    def in_file(self, file: str) -> TopologyError:
        """The same error, naming the topology file."""
        return TopologyError(self.problem, path=self.path, file=file)


class ProtocolError(StreamdError):
    """A message breaks TP v1. ``field`` names the offending key when there is one."""

    reason = "schema_violation"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.field = field


class UnsupportedVersion(ProtocolError):
    """The ``tp`` major version is not 1."""

    reason = "unsupported_version"


class NodeError(StreamdError):
    """A Node failed on one input."""

    reason = "node_failed"

    def __init__(self, message: str, *, node: str = "", reason: str | None = None) -> None:
        prefix = f"node {node!r}: " if node else ""
        super().__init__(f"{prefix}{message}", reason=reason)
        self.node = node


class BadInput(NodeError):
    """The input cannot be processed by this Node (corrupt image, wrong shape...).

    Retrying will not help: the run is dead-lettered at once.
    """

    reason = "bad_input"


class ModelInputMismatch(BadInput):
    """The tensor handed to an ONNX model does not fit its declared input."""

    reason = "model_input_mismatch"


class FrameExpired(StreamdError):
    """The payload of a run is no longer in Redis (its TTL ran out, or it was dropped)."""

    reason = "frame_expired"


class ServiceUnavailable(StreamdError):
    """Kafka, Redis or the Celery broker cannot be reached."""

    reason = "service_unavailable"


class NotConfirmed(ServiceUnavailable):
    """RabbitMQ did not confirm a stage task: it refused it, the connection was lost first, or it took too long."""


class PublishError(StreamdError):
    """A sink could not deliver a record to Kafka."""

    reason = "publish_failed"
