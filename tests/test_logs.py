"""streamd.logs: JSON lines with context, and no secret in any line."""

from __future__ import annotations

import json
import logging

import pytest

from streamd.logs import setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_context_and_hide_secrets(capsys, monkeypatch, restore_root):
    monkeypatch.setenv("STREAMD_KAFKA_SASL_PASSWORD", "hunter2-secret")
    setup_logging("info", "json")
    log = logging.getLogger("streamd.test")
    log.warning("broker amqp://plant:s3cret@rabbit:5672// refused; sasl hunter2-secret",
                extra={"source": "line3-cam07", "origin": "cameras.frames[2]@1234", "node": "decode"})
    try:
        raise RuntimeError("redis://:pw@cache:6379/0 down")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    first, second = lines
    assert first["level"] == "warning" and first["logger"] == "streamd.test"
    assert (first["source"], first["origin"], first["node"]) == ("line3-cam07", "cameras.frames[2]@1234", "decode")
    text = json.dumps(lines)
    assert "s3cret" not in text and "hunter2-secret" not in text and ":pw@" not in text
    assert "amqp://plant:***@rabbit" in first["msg"]
    assert "RuntimeError" in second["exc"]


def test_text_format_is_redacted_too(capsys, restore_root):
    setup_logging("info", "text")
    logging.getLogger("streamd.test").info("using amqp://guest:guest@localhost:5672//")
    err = capsys.readouterr().err
    assert "guest:***@localhost" in err and "guest:guest" not in err
