"""streamd.config: settings from STREAMD_* variables, validation and secret redaction."""

from __future__ import annotations

import pytest

from streamd.config import VARIABLES, Settings, redact
from streamd.exceptions import ConfigError, StreamdError

DEFAULTS = {v.name: v.default for v in VARIABLES}


def test_design_defaults():
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "localhost:9092"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.broker_url == "amqp://guest:guest@localhost:5672//"
    assert s.metrics_port == 9100
    assert s.frame_ttl_s == 60.0
    assert s.drain_timeout_s == 30.0
    assert s.log_level == "info"
    assert s.log_format == "text"
    assert s.kafka_security == {}
    assert s.onnx_providers == ()
    assert s.onnx_threads == 0
    assert s.worker_concurrency == 0
    assert s.worker_compute_slots == 0
    assert s.worker_prefetch == 2
    assert s.broker_queue_version == 2
    assert s.models_dir == ""
    assert s.group_id == ""


def test_empty_environment_equals_dataclass_defaults():
    """The VARIABLES table and the Settings field defaults agree."""
    assert Settings.from_env({}) == Settings()


def test_defaults_in_table_match_design():
    assert DEFAULTS["STREAMD_KAFKA_BOOTSTRAP"] == "localhost:9092"
    assert DEFAULTS["STREAMD_REDIS_URL"] == "redis://localhost:6379/0"
    assert DEFAULTS["STREAMD_BROKER_URL"] == "amqp://guest:guest@localhost:5672//"
    assert DEFAULTS["STREAMD_METRICS_PORT"] == "9100"
    assert DEFAULTS["STREAMD_FRAME_TTL_S"] == "60"


def test_from_env_parses_values():
    s = Settings.from_env({
        "STREAMD_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
        "STREAMD_REDIS_URL": "rediss://:pw@redis:6380/2",
        "STREAMD_BROKER_URL": "amqp://u:p@rabbit:5672//",
        "STREAMD_METRICS_PORT": "0",
        "STREAMD_FRAME_TTL_S": "2.5",
        "STREAMD_DRAIN_TIMEOUT_S": "5",
        "STREAMD_LOG_LEVEL": "DEBUG",
        "STREAMD_LOG_FORMAT": "JSON",
        "STREAMD_GROUP_ID": "my-group",
        "STREAMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STREAMD_ONNX_PROVIDERS": " TensorRT, cuda ,,cpu ",
        "STREAMD_ONNX_THREADS": "2",
        "STREAMD_WORKER_CONCURRENCY": "4",
        "STREAMD_WORKER_COMPUTE_SLOTS": "3",
        "STREAMD_WORKER_PREFETCH": "1",
        "STREAMD_BROKER_QUEUE_VERSION": "1",
        "STREAMD_MODELS_DIR": "/models",
    })
    assert s.kafka_bootstrap == "k1:9092,k2:9092"
    assert s.redis_url == "rediss://:pw@redis:6380/2"
    assert s.broker_url == "amqp://u:p@rabbit:5672//"
    assert s.metrics_port == 0
    assert s.frame_ttl_s == 2.5
    assert s.drain_timeout_s == 5.0
    assert s.log_level == "debug"
    assert s.log_format == "json"
    assert s.group_id == "my-group"
    assert s.kafka_session_timeout_ms == 6000
    assert s.onnx_providers == ("tensorrt", "cuda", "cpu")
    assert s.onnx_threads == 2
    assert s.worker_concurrency == 4
    assert s.worker_compute_slots == 3
    assert s.worker_prefetch == 1
    assert s.broker_queue_version == 1
    assert s.models_dir == "/models"


def test_kafka_security_settings():
    s = Settings.from_env({
        "STREAMD_KAFKA_BOOTSTRAP": "broker:9093",
        "STREAMD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAMD_KAFKA_SASL_USERNAME": "streamd",
        "STREAMD_KAFKA_SASL_PASSWORD": "s3cret",
        "STREAMD_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
    })
    assert s.kafka_security == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "streamd",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert s.kafka_config() == {"bootstrap.servers": "broker:9093", **s.kafka_security}


def test_unset_security_values_are_left_out():
    s = Settings.from_env({"STREAMD_KAFKA_SECURITY_PROTOCOL": "SSL"})
    assert s.kafka_config() == {"bootstrap.servers": "localhost:9092", "security.protocol": "SSL"}


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STREAMD_FRAME_TTL_S", "7")
    assert Settings.from_env().frame_ttl_s == 7.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAMD_METRICS_PORT", "http"),
        ("STREAMD_METRICS_PORT", "-1"),
        ("STREAMD_METRICS_PORT", "9100.5"),
        ("STREAMD_FRAME_TTL_S", "soon"),
        ("STREAMD_FRAME_TTL_S", "0"),
        ("STREAMD_FRAME_TTL_S", "-5"),
        ("STREAMD_DRAIN_TIMEOUT_S", "x"),
        ("STREAMD_DRAIN_TIMEOUT_S", "0"),
        ("STREAMD_LOG_LEVEL", "verbose"),
        ("STREAMD_LOG_FORMAT", "xml"),
        ("STREAMD_KAFKA_SESSION_TIMEOUT_MS", "999"),
        ("STREAMD_KAFKA_SESSION_TIMEOUT_MS", "ten"),
        ("STREAMD_ONNX_THREADS", "-2"),
        ("STREAMD_ONNX_THREADS", "many"),
        ("STREAMD_WORKER_CONCURRENCY", "1.5"),
        ("STREAMD_WORKER_COMPUTE_SLOTS", "-1"),
        ("STREAMD_WORKER_COMPUTE_SLOTS", "two"),
        ("STREAMD_WORKER_PREFETCH", "0"),
        ("STREAMD_BROKER_QUEUE_VERSION", "3"),
        ("STREAMD_BROKER_QUEUE_VERSION", "v2"),
        ("STREAMD_MALLOC_TUNING", "maybe"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert isinstance(info.value, StreamdError)
    assert info.value.reason == "config_error"


def test_number_error_says_what_to_set():
    with pytest.raises(ConfigError, match=r"STREAMD_METRICS_PORT='http' is not a whole number; set it to e.g. 9100"):
        Settings.from_env({"STREAMD_METRICS_PORT": "http"})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5"])
def test_frame_ttl_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="STREAMD_FRAME_TTL_S"):
        Settings.from_env({"STREAMD_FRAME_TTL_S": value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://user:p%40ss@cache.plant:6380/1", "rediss://user:***@cache.plant:6380/1"),
        ("broker amqp://u:pw@h// and redis://x:y@r:1/0 down", "broker amqp://u:***@h// and redis://x:***@r:1/0 down"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ],
)
def test_redact_masks_url_passwords(monkeypatch, text, expected):
    monkeypatch.delenv("STREAMD_KAFKA_SASL_PASSWORD", raising=False)
    assert redact(text) == expected


def test_redact_masks_the_sasl_password(monkeypatch):
    monkeypatch.setenv("STREAMD_KAFKA_SASL_PASSWORD", "Tr0ub4dor&3")
    out = redact("SASL authentication failed for streamd with password Tr0ub4dor&3 (again: Tr0ub4dor&3)")
    assert "Tr0ub4dor&3" not in out
    assert out.count("***") == 2
    assert "streamd" in out


def test_redact_without_sasl_password_leaves_text(monkeypatch):
    monkeypatch.delenv("STREAMD_KAFKA_SASL_PASSWORD", raising=False)
    assert redact("plain message") == "plain message"


# -- the variable table -------------------------------------------------------------------


def test_variable_names_are_unique_and_prefixed():
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    assert all(n.startswith("STREAMD_") for n in names)
    assert all(v.help for v in VARIABLES)


def test_secret_variables_are_marked():
    secret = {v.name for v in VARIABLES if v.secret}
    assert {"STREAMD_KAFKA_SASL_PASSWORD", "STREAMD_BROKER_URL", "STREAMD_REDIS_URL"} <= secret


def test_every_variable_is_accepted_with_its_default():
    assert Settings.from_env(DEFAULTS) == Settings.from_env({})


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), ("off", False), ("TRUE", True)])
@pytest.mark.parametrize(("variable", "field"), [("STREAMD_MALLOC_TUNING", "malloc_tuning"),
                                                 ("STREAMD_GC_FREEZE", "gc_freeze"),
                                                 ("STREAMD_PIPELINED_CONFIRMS", "pipelined_confirms"),
                                                 ("STREAMD_UVLOOP", "uvloop")])
def test_switches(variable, field, value, expected):
    assert getattr(Settings.from_env({variable: value}), field) is expected
    assert getattr(Settings.from_env({}), field) is True
