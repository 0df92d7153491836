"""TP v1: the msgpack wire protocol of every Kafka message streamd reads or writes.

The normative text, with golden vectors for other languages, is
``docs/tp-v1.md``; this module implements it. In short: a message is a
msgpack map with string keys; ``tp`` is the integer major version (1);
``kind`` is one of ``frame`` and ``reading`` (inputs) or ``result``,
``anomaly`` and ``error`` (outputs). Unknown keys are ignored.

:func:`decode` parses and validates an input message and raises
:class:`~streamd.exceptions.ProtocolError` naming the field and the reason
(``undecodable``, ``unsupported_version``, ``schema_violation``,
``unsupported_codec``, ``oversized_frame``). The ``encode_*`` functions build
output records and validate them the same way, so streamd never publishes
what it would itself reject.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack

from .exceptions import ProtocolError, UnsupportedVersion

__all__ = [
    "VERSION",
    "INPUT_KINDS",
    "OUTPUT_KINDS",
    "CODECS",
    "REASONS",
    "event_id",
    "decode",
    "decode_any",
    "validate",
    "encode",
    "encode_result",
    "encode_error",
    "pack",
]

VERSION = 1
INPUT_KINDS = ("frame", "reading")
OUTPUT_KINDS = ("result", "anomaly", "error")
CODECS = ("jpeg", "png", "raw")
RAW_DTYPES = ("uint8",)

#: The ``reason`` values of ``error`` records, with what they mean.
REASONS: dict[str, str] = {
    "undecodable": "the Kafka value is not a msgpack map with string keys",
    "unsupported_version": "the tp major version is not 1",
    "schema_violation": "a required field is missing or has the wrong type or value",
    "unsupported_codec": "codec is not jpeg, png or raw",
    "unsupported_kind": "kind is not what the source topic carries",
    "unknown_source": "the source id is not in the topology's allowed list",
    "oversized_frame": "the message is larger than the source's max_message_bytes",
    "bad_image": "the image bytes cannot be decoded",
    "bad_input": "a Node rejected the input (detail says why)",
    "bad_values": "a sensor reading's samples are empty, not float32, not finite or too few for the window",
    "model_input_mismatch": "the tensor does not fit the model's declared input",
    "node_failed": "a Node raised after its retries were spent",
    "frame_expired": "the payload left Redis (TTL) before the run reached it",
    "dropped": "shed by the source's overload policy (drop_oldest or sample)",
    "publish_failed": "a sink could not deliver the record to Kafka",
}


def event_id(topic: str, partition: int, offset: int, node: str) -> str:
    """Deterministic id of an output: the first 32 hex digits of SHA-256 over
    ``topic``, ``partition``, ``offset`` and ``node`` joined by U+001F."""
    text = f"{topic}\x1f{int(partition)}\x1f{int(offset)}\x1f{node}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def pack(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise ProtocolError("the Kafka message has no value (tombstone)", reason="undecodable")
    try:
        msg = msgpack.unpackb(value, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        detail = str(exc) or "invalid byte sequence"
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {detail}", reason="undecodable") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a TP message is a msgpack map, got {type(msg).__name__}", reason="undecodable")
    bad = _non_string_key(msg)
    if bad is not None:
        raise ProtocolError(
            f"map keys must be msgpack strings, got {type(bad).__name__} {_short(bad)}", reason="undecodable"
        )
    return msg


_CONTAINERS = (dict, list)


def _non_string_key(value: Any) -> Any:
    """The first map key (at any depth, depth first) that is not a string, or None. Only maps and lists are
    visited: a frame's dozen fields cost a loop, not a call each (this runs for every message ingested)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return key
            if isinstance(item, _CONTAINERS):
                bad = _non_string_key(item)
                if bad is not None:
                    return bad
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, _CONTAINERS):
                bad = _non_string_key(item)
                if bad is not None:
                    return bad
    return None


def _violation(field: str, problem: str) -> ProtocolError:
    return ProtocolError(f"field {field!r} {problem}", reason="schema_violation", field=field)


def _require(msg: Mapping[str, Any], field: str, types: type | tuple[type, ...], what: str) -> Any:
    if field not in msg:
        raise _violation(field, f"is missing (expected {what})")
    value = msg[field]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise _violation(field, f"must be {what}, got {type(value).__name__} {_short(value)}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(msg: Mapping[str, Any], field: str, *, positive: bool = False) -> float:
    value = float(_require(msg, field, (int, float), "a number"))
    if not math.isfinite(value) or (positive and value <= 0):
        raise _violation(field, f"must be a finite {'positive ' if positive else ''}number, got {value!r}")
    return value


def _nonneg_int(msg: Mapping[str, Any], field: str) -> int:
    value = _require(msg, field, int, "a non-negative integer")
    if value < 0:
        raise _violation(field, f"must be a non-negative integer, got {value}")
    return int(value)


def _text(msg: Mapping[str, Any], field: str) -> str:
    value = _require(msg, field, str, "a non-empty string")
    if not value:
        raise _violation(field, "must be a non-empty string")
    return str(value)


def _check_version(msg: Mapping[str, Any]) -> None:
    tp = _require(msg, "tp", int, "the integer major version 1")
    if tp != VERSION:
        raise UnsupportedVersion(
            f"tp major version {tp} is not supported by this streamd (speaks TP v{VERSION})", field="tp"
        )


def _check_meta(msg: Mapping[str, Any]) -> None:
    if "meta" in msg and msg["meta"] is not None and not isinstance(msg["meta"], dict):
        raise _violation("meta", f"must be a map when present, got {type(msg['meta']).__name__}")


def _check_frame(msg: Mapping[str, Any]) -> None:
    _text(msg, "source")
    _nonneg_int(msg, "seq")
    _number(msg, "ts")
    codec = _require(msg, "codec", str, "one of jpeg, png, raw")
    data = _require(msg, "data", bytes, "binary image data")
    if codec not in CODECS:
        raise ProtocolError(
            f"field 'codec' is {codec!r}; TP v1 frames use jpeg, png or raw", reason="unsupported_codec", field="codec"
        )
    if not data:
        raise _violation("data", "is empty")
    if codec == "raw":
        shape = _require(msg, "shape", list, "[h, w, c] for raw frames")
        if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise _violation("shape", f"must be three positive integers [h, w, c], got {_short(shape)}")
        if shape[2] not in (1, 3, 4):
            raise _violation("shape", f"channel count must be 1, 3 or 4, got {shape[2]}")
        dtype = _require(msg, "dtype", str, "'uint8' for raw frames")
        if dtype not in RAW_DTYPES:
            raise _violation("dtype", f"must be one of {', '.join(RAW_DTYPES)}, got {dtype!r}")
        expected = shape[0] * shape[1] * shape[2]
        if len(data) != expected:
            raise _violation("data", f"holds {len(data)} bytes but shape {shape} uint8 needs {expected}")
    _check_meta(msg)


def _check_reading(msg: Mapping[str, Any]) -> None:
    _text(msg, "source")
    _nonneg_int(msg, "seq")
    _number(msg, "ts")
    _number(msg, "rate_hz", positive=True)
    _require(msg, "unit", str, "a unit string such as 'g'")
    values = _require(msg, "values", bytes, "binary little-endian float32 samples")
    if not values or len(values) % 4:
        raise _violation("values", f"must hold a whole, non-zero number of float32 samples, got {len(values)} bytes")
    _check_meta(msg)


def _check_origin(msg: Mapping[str, Any]) -> None:
    origin = _require(msg, "origin", dict, "a map {topic, partition, offset}")
    _text(origin, "topic")
    _nonneg_int(origin, "partition")
    _nonneg_int(origin, "offset")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain_number(value: Any) -> Any:
    """A Python int or float from any real number (numpy scalars included), keeping integers integral.

    Anything else is returned unchanged, for :func:`validate` to reject.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _plain_region(region: Any) -> Any:
    if isinstance(region, (str, bytes)) or not isinstance(region, Iterable):
        return region
    return [_plain_number(v) for v in region]


def _plain_origin(origin: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(origin)
    for key in ("partition", "offset"):
        if isinstance(out.get(key), numbers.Integral) and not isinstance(out[key], bool):
            out[key] = int(out[key])
    return out


def _check_result(msg: Mapping[str, Any]) -> None:
    for f in ("event_id", "topology", "node", "source", "label"):
        _text(msg, f)
    _nonneg_int(msg, "seq")
    _number(msg, "ts")
    _number(msg, "detected_at")
    _require(msg, "anomaly", bool, "true or false")
    _number(msg, "score")
    _number(msg, "threshold")
    model = _require(msg, "model", dict, "a map {name, version}")
    _text(model, "name")
    _text(model, "version")
    regions = _require(msg, "regions", list, "a list of [x, y, w, h]")
    for i, r in enumerate(regions):
        if not (isinstance(r, list) and len(r) == 4 and all(_is_number(v) for v in r)):
            raise _violation(f"regions[{i}]", f"must be [x, y, w, h] numbers, got {_short(r)}")
    _check_origin(msg)
    _check_meta(msg)


def _check_error(msg: Mapping[str, Any]) -> None:
    _text(msg, "event_id")
    _text(msg, "reason")
    _require(msg, "detail", str, "a human-readable string")
    _text(msg, "stage")
    if msg.get("source") is not None:
        _require(msg, "source", str, "a string or nil")
    elif "source" not in msg:
        raise _violation("source", "is missing (a string, or nil when unknown)")
    _check_origin(msg)
    _number(msg, "at")


_CHECKS = {
    "frame": _check_frame,
    "reading": _check_reading,
    "result": _check_result,
    "anomaly": _check_result,
    "error": _check_error,
}


def validate(msg: Mapping[str, Any], *, kinds: Sequence[str] = INPUT_KINDS + OUTPUT_KINDS) -> str:
    """Check a decoded message against TP v1; return its kind."""
    _check_version(msg)
    kind = _require(msg, "kind", str, f"one of {', '.join(kinds)}")
    if kind not in kinds:
        raise ProtocolError(
            f"field 'kind' is {kind!r}; expected one of {', '.join(kinds)}",
            reason="unsupported_kind" if kind in _CHECKS else "schema_violation",
            field="kind",
        )
    _CHECKS[kind](msg)
    return str(kind)


def decode(value: bytes | None, *, kinds: Sequence[str] = INPUT_KINDS, max_bytes: int | None = None) -> dict[str, Any]:
    """Parse and validate one Kafka value; raise :class:`ProtocolError` with a reason."""
    if max_bytes is not None and value is not None and len(value) > max_bytes:
        raise ProtocolError(
            f"message of {len(value)} bytes exceeds the source limit of {max_bytes} bytes "
            "(raise max_message_bytes in the topology if such frames are expected)",
            reason="oversized_frame",
        )
    msg = _unpack(value)
    validate(msg, kinds=kinds)
    return msg


def decode_any(value: bytes | None) -> dict[str, Any]:
    """Parse and validate any TP v1 message (input or output kinds)."""
    return decode(value, kinds=INPUT_KINDS + OUTPUT_KINDS)


def encode(message: Mapping[str, Any]) -> bytes:
    """Validate and pack an output message."""
    validate(message, kinds=OUTPUT_KINDS + INPUT_KINDS)
    return pack(message)


def encode_result(
    *,
    kind: str = "result",
    topology: str,
    node: str,
    source: str,
    seq: int,
    ts: float,
    detected_at: float,
    anomaly: bool,
    score: float,
    threshold: float,
    label: str,
    model: Mapping[str, str],
    regions: Sequence[Sequence[float]],
    origin: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Build, validate and pack a ``result`` (or ``anomaly``) record; event_id is derived from origin and node."""
    msg: dict[str, Any] = {
        "tp": VERSION,
        "kind": kind,
        "event_id": event_id(origin["topic"], origin["partition"], origin["offset"], node),
        "topology": topology,
        "node": node,
        "source": source,
        "seq": int(seq),
        "ts": float(ts),
        "detected_at": float(detected_at),
        "anomaly": bool(anomaly),
        "score": float(score),
        "threshold": float(threshold),
        "label": label,
        "model": {"name": str(model["name"]), "version": str(model["version"])},
        "regions": [_plain_region(r) for r in regions],
        "origin": _plain_origin(origin),
        "meta": dict(meta or {}),
    }
    return msg, encode(msg)


def encode_error(
    *,
    reason: str,
    detail: str,
    stage: str,
    source: str | None,
    origin: Mapping[str, Any],
    at: float,
) -> tuple[dict[str, Any], bytes]:
    """Build, validate and pack an ``error`` (dead-letter) record."""
    msg: dict[str, Any] = {
        "tp": VERSION,
        "kind": "error",
        "event_id": event_id(origin["topic"], origin["partition"], origin["offset"], stage),
        "reason": reason,
        "detail": detail,
        "stage": stage,
        "source": source,
        "origin": _plain_origin(origin),
        "at": float(at),
    }
    return msg, encode(msg)
