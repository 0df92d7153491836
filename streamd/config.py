"""Settings from environment variables (12-factor).

Every variable streamd reads is declared once, in :data:`VARIABLES`, with its
default and meaning; ``docs/configuration.md`` and the deployment files are
checked against this table by the tests, so they cannot drift.

Secrets (passwords in URLs, SASL passwords) are never printed: use
:func:`redact` on anything that may hold one before it reaches a log line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError

__all__ = ["Settings", "Variable", "VARIABLES", "redact"]


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    help: str
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("STREAMD_KAFKA_BOOTSTRAP", "localhost:9092", "Kafka bootstrap servers, comma separated"),
    Variable("STREAMD_REDIS_URL", "redis://localhost:6379/0", "Redis for frame data (rediss:// for TLS)", secret=True),
    Variable("STREAMD_BROKER_URL", "amqp://guest:guest@localhost:5672//", "Celery broker", secret=True),
    Variable("STREAMD_METRICS_PORT", "9100", "HTTP port for /metrics, /healthz, /readyz (0 disables)"),
    Variable("STREAMD_FRAME_TTL_S", "60", "seconds a claim-checked payload stays in Redis"),
    Variable("STREAMD_DRAIN_TIMEOUT_S", "30", "seconds SIGTERM waits for work in flight before exiting"),
    Variable("STREAMD_LOG_LEVEL", "info", "debug, info, warning or error"),
    Variable("STREAMD_LOG_FORMAT", "text", "text or json"),
    Variable("STREAMD_GROUP_ID", "", "Kafka consumer group (default: streamd-<topology name>)"),
    Variable("STREAMD_KAFKA_SESSION_TIMEOUT_MS", "10000", "Kafka consumer session timeout"),
    Variable("STREAMD_KAFKA_FETCH_MAX_WAIT_MS", "10",
             "longest the broker may hold the daemon's fetch while no record is ready (faust's own: 1500)"),
    Variable("STREAMD_KAFKA_FETCH_MAX_WAIT_BACKLOG_MS", "100",
             "the same while every source is held at its max_in_flight bound (fewer, fuller fetches)"),
    Variable("STREAMD_KAFKA_SECURITY_PROTOCOL", "", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    Variable("STREAMD_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    Variable("STREAMD_KAFKA_SASL_USERNAME", "", "SASL user name"),
    Variable("STREAMD_KAFKA_SASL_PASSWORD", "", "SASL password", secret=True),
    Variable("STREAMD_KAFKA_SSL_CA_LOCATION", "", "CA bundle for Kafka TLS"),
    Variable("STREAMD_ONNX_PROVIDERS", "", "execution providers to try, e.g. tensorrt,cuda,cpu (default: per Node)"),
    Variable("STREAMD_ONNX_THREADS", "0", "intra-op threads per worker process (0: cores / processes; 1 for gpu)"),
    Variable("STREAMD_WORKER_CONCURRENCY", "0", "processes per worker (0: 1 for gpu, cores + 1 for cpu)"),
    Variable("STREAMD_WORKER_COMPUTE_SLOTS", "0",
             "pool processes of a worker that run Nodes at once (0: cores); more processes wait for a slot"),
    Variable("STREAMD_WORKER_PREFETCH", "2",
             "stage tasks a worker holds per process: the running one and the next, ready when it ends (1: none)"),
    Variable("STREAMD_MALLOC_TUNING", "1",
             "1: keep large buffers in the heap (glibc mallopt thresholds, see streamd.memory); 0: leave malloc alone"),
    Variable("STREAMD_GC_FREEZE", "1",
             "1: processes take their start-up heap out of Python's full collections (gc.freeze, see streamd.memory)"),
    Variable("STREAMD_BROKER_QUEUE_VERSION", "2",
             "RabbitMQ classic queue version the stage queues are declared with (x-queue-version: 1 or 2; "
             "0: no argument, the broker's default)"),
    Variable("STREAMD_PIPELINED_CONFIRMS", "1",
             "1: the daemon hands off without waiting for RabbitMQ's publisher confirm; the Kafka offset waits for it"),
    Variable("STREAMD_UVLOOP", "1",
             "1: the daemon's event loops run on uvloop where it is installed (less CPU per event); 0: asyncio's own"),
    Variable("STREAMD_MODELS_DIR", "",
             "where relative model paths resolve first (then the topology's folder, its parent, ./)"),
)

_BY_NAME = {v.name: v for v in VARIABLES}

#: Short names of the ONNX Runtime execution providers streamd knows.
ONNX_PROVIDERS = ("tensorrt", "cuda", "cpu")

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")


def redact(text: str) -> str:
    """Mask passwords in URLs (``amqp://user:***@host``) and known secret values."""
    out = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    pw = os.environ.get("STREAMD_KAFKA_SASL_PASSWORD")
    if pw:
        out = out.replace(pw, "***")
    return out


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, _BY_NAME[name].default)


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; set it to e.g. {_BY_NAME[name].default}") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _switch(env: Mapping[str, str], name: str) -> bool:
    raw = _get(env, name).strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"{name}={raw!r}: use 1 or 0")
    return raw in ("1", "true", "yes", "on")


def _float(env: Mapping[str, str], name: str) -> float:
    raw = _get(env, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {_BY_NAME[name].default}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={raw!r} must be a finite number above 0")
    return value


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str = "amqp://guest:guest@localhost:5672//"
    metrics_port: int = 9100
    frame_ttl_s: float = 60.0
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "text"
    group_id: str = ""
    kafka_session_timeout_ms: int = 10000
    kafka_fetch_max_wait_ms: int = 10
    kafka_fetch_max_wait_backlog_ms: int = 100
    kafka_security: dict[str, str] = field(default_factory=dict)
    onnx_providers: tuple[str, ...] = ()
    onnx_threads: int = 0
    worker_concurrency: int = 0
    worker_compute_slots: int = 0
    worker_prefetch: int = 2
    malloc_tuning: bool = True
    gc_freeze: bool = True
    broker_queue_version: int = 2
    pipelined_confirms: bool = True
    uvloop: bool = True
    models_dir: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        level = _get(env, "STREAMD_LOG_LEVEL").lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"STREAMD_LOG_LEVEL={level!r}: use debug, info, warning or error")
        fmt = _get(env, "STREAMD_LOG_FORMAT").lower()
        if fmt not in ("text", "json"):
            raise ConfigError(f"STREAMD_LOG_FORMAT={fmt!r}: use text or json")
        security = {
            key: _get(env, name)
            for key, name in (
                ("security.protocol", "STREAMD_KAFKA_SECURITY_PROTOCOL"),
                ("sasl.mechanism", "STREAMD_KAFKA_SASL_MECHANISM"),
                ("sasl.username", "STREAMD_KAFKA_SASL_USERNAME"),
                ("sasl.password", "STREAMD_KAFKA_SASL_PASSWORD"),
                ("ssl.ca.location", "STREAMD_KAFKA_SSL_CA_LOCATION"),
            )
            if _get(env, name)
        }
        providers = tuple(p.strip().lower() for p in _get(env, "STREAMD_ONNX_PROVIDERS").split(",") if p.strip())
        unknown = [p for p in providers if p not in ONNX_PROVIDERS]
        if unknown:
            raise ConfigError(f"STREAMD_ONNX_PROVIDERS names unknown provider(s) {', '.join(unknown)}; "
                              f"use a comma-separated list of {', '.join(ONNX_PROVIDERS)}")
        queue_version = _int(env, "STREAMD_BROKER_QUEUE_VERSION")
        if queue_version not in (0, 1, 2):
            raise ConfigError(f"STREAMD_BROKER_QUEUE_VERSION={queue_version}: use 2 (classic queues version 2, the "
                              "default), 1, or 0 (declare the queues without x-queue-version)")
        return cls(
            kafka_bootstrap=_get(env, "STREAMD_KAFKA_BOOTSTRAP"),
            redis_url=_get(env, "STREAMD_REDIS_URL"),
            broker_url=_get(env, "STREAMD_BROKER_URL"),
            metrics_port=_int(env, "STREAMD_METRICS_PORT"),
            frame_ttl_s=_float(env, "STREAMD_FRAME_TTL_S"),
            drain_timeout_s=_float(env, "STREAMD_DRAIN_TIMEOUT_S"),
            log_level=level,
            log_format=fmt,
            group_id=_get(env, "STREAMD_GROUP_ID"),
            kafka_session_timeout_ms=_int(env, "STREAMD_KAFKA_SESSION_TIMEOUT_MS", minimum=1000),
            kafka_fetch_max_wait_ms=_int(env, "STREAMD_KAFKA_FETCH_MAX_WAIT_MS", minimum=1),
            kafka_fetch_max_wait_backlog_ms=_int(env, "STREAMD_KAFKA_FETCH_MAX_WAIT_BACKLOG_MS", minimum=1),
            kafka_security=security,
            onnx_providers=providers,
            onnx_threads=_int(env, "STREAMD_ONNX_THREADS"),
            worker_concurrency=_int(env, "STREAMD_WORKER_CONCURRENCY"),
            worker_compute_slots=_int(env, "STREAMD_WORKER_COMPUTE_SLOTS"),
            worker_prefetch=_int(env, "STREAMD_WORKER_PREFETCH", minimum=1),
            malloc_tuning=_switch(env, "STREAMD_MALLOC_TUNING"),
            gc_freeze=_switch(env, "STREAMD_GC_FREEZE"),
            broker_queue_version=queue_version,
            pipelined_confirms=_switch(env, "STREAMD_PIPELINED_CONFIRMS"),
            uvloop=_switch(env, "STREAMD_UVLOOP"),
            models_dir=_get(env, "STREAMD_MODELS_DIR"),
        )

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client streamd creates."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_security}
