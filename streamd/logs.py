"""Logging set-up: plain text or one JSON object per line (STREAMD_LOG_FORMAT=json).

JSON lines carry the record's context when the code gives it through
``extra=`` (``source``, ``origin``, ``node``); every line passes through
:func:`streamd.config.redact`, so no URL password or SASL secret is printed.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .config import redact

__all__ = ["setup_logging"]

_CONTEXT = ("source", "origin", "node", "topology", "stage")


class _RedactingText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pid": record.process,
        }
        for key in _CONTEXT:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(_RedactingText("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faust", "mode", "kombu", "amqp", "celery"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
