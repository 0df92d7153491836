"""Unit tests of the TP v1 codec (streamd.tp) and its golden vectors. Nothing running is needed."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from streamd import tp
from streamd.exceptions import ProtocolError, StreamdError, UnsupportedVersion

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "docs" / "tp-v1-vectors"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("tp_v1_make_vectors", VECTORS / "make_vectors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
INDEX = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))

TS = 1795618807.471
ORIGIN = {"topic": "line3.frames", "partition": 2, "offset": 40213}


def frame(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "tp": 1,
        "kind": "frame",
        "source": "cam1",
        "seq": 5,
        "ts": TS,
        "codec": "png",
        "data": b"\x89PNG...",
    }
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not _DROP}


def raw(**fields: Any) -> dict[str, Any]:
    base = {"codec": "raw", "shape": [2, 2, 3], "dtype": "uint8", "data": bytes(12)}
    base.update(fields)
    return frame(**base)


def reading(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "tp": 1,
        "kind": "reading",
        "source": "bearing1",
        "seq": 0,
        "ts": TS,
        "rate_hz": 5000.0,
        "unit": "g",
        "values": struct.pack("<3f", 1.0, 2.0, 3.0),
    }
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not _DROP}


_DROP = object()

RESULT_ARGS: dict[str, Any] = {
    "topology": "demo",
    "node": "publish",
    "source": "cam1",
    "seq": 5,
    "ts": TS,
    "detected_at": TS + 0.05,
    "anomaly": True,
    "score": 0.9,
    "threshold": 0.5,
    "label": "scratch",
    "model": {"name": "ae", "version": "1"},
    "regions": [[1, 2, 3, 4]],
    "origin": ORIGIN,
}


def result_args(**changes: Any) -> dict[str, Any]:
    return {**RESULT_ARGS, **changes}


ERROR_ARGS: dict[str, Any] = {
    "reason": "bad_image",
    "detail": "cannot identify image",
    "stage": "decode",
    "source": "cam1",
    "origin": ORIGIN,
    "at": TS + 1,
}


# --- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        frame(codec="jpeg", data=b"\xff\xd8\xff\xe0jpeg", meta={"line": 3, "nested": {"a": [1, 2.5, None]}}),
        frame(),
        raw(),
        raw(shape=[3, 1, 1], data=b"\x00\x7f\xff"),
        raw(shape=[1, 1, 4], data=b"\x01\x02\x03\x04"),
        reading(),
        reading(meta=None),
    ],
)
def test_input_round_trip(msg: dict[str, Any]) -> None:
    assert tp.decode(tp.pack(msg)) == msg


def test_decode_accepts_integer_ts_and_seq_zero() -> None:
    assert tp.decode(tp.pack(frame(ts=1795618807, seq=0)))["ts"] == 1795618807


def test_pack_uses_bin_for_bytes_and_float64_for_floats() -> None:
    packed = tp.pack({"data": b"ab", "ts": TS})
    assert b"\xc4\x02ab" in packed  # bin 8, length 2
    assert b"\xcb" + struct.pack(">d", TS) in packed  # float 64, big-endian


def test_unknown_keys_are_ignored_and_kept() -> None:
    msg = frame(exposure_us=800, vendor={"x": b"\x00"})
    assert tp.decode(tp.pack(msg)) == msg


def test_result_round_trip_and_event_id() -> None:
    msg, data = tp.encode_result(**result_args(meta={"line": 3}))
    assert tp.decode_any(data) == msg
    assert msg["event_id"] == tp.event_id("line3.frames", 2, 40213, "publish")
    assert msg["kind"] == "result" and msg["tp"] == 1 and msg["meta"] == {"line": 3}


def test_anomaly_round_trip() -> None:
    msg, data = tp.encode_result(**result_args(kind="anomaly"))
    assert tp.decode_any(data)["kind"] == "anomaly"
    assert tp.decode(data, kinds=tp.OUTPUT_KINDS) == msg


def test_error_round_trip_event_id_uses_stage() -> None:
    msg, data = tp.encode_error(**ERROR_ARGS)
    assert tp.decode_any(data) == msg
    assert msg["event_id"] == tp.event_id("line3.frames", 2, 40213, "decode")
    msg, data = tp.encode_error(**{**ERROR_ARGS, "stage": "ingest", "source": None, "reason": "undecodable"})
    assert tp.decode_any(data)["source"] is None
    assert msg["event_id"] == tp.event_id("line3.frames", 2, 40213, "ingest")


def test_encode_result_keeps_numpy_numbers() -> None:
    msg, data = tp.encode_result(
        **result_args(
            regions=np.array([[1.5, 2.25, 3.0, 4.0]], dtype=np.float32),
            score=np.float32(0.75),
            anomaly=np.bool_(True),
            seq=np.int64(5),
            origin={"topic": "t", "partition": np.int32(1), "offset": np.int64(9)},
        )
    )
    back = tp.decode_any(data)
    assert back["regions"] == [[1.5, 2.25, 3.0, 4.0]]
    assert back["score"] == 0.75 and back["anomaly"] is True
    assert back["origin"] == {"topic": "t", "partition": 1, "offset": 9}
    assert msg["event_id"] == tp.event_id("t", 1, 9, "publish")


def test_encode_result_integer_regions_stay_integers() -> None:
    _, data = tp.encode_result(**result_args(regions=[[1, 2, 3, 4], (np.int16(5), 6, 7.5, 8)]))
    regions = tp.decode_any(data)["regions"]
    assert regions == [[1, 2, 3, 4], [5, 6, 7.5, 8]]
    assert all(type(v) is int for v in regions[0])


# --- validation: every failure names the field and the reason ---------------------------------------------------

INVALID_INPUTS = [
    # (message, reason, field)
    (_DROP, "undecodable", None),  # placeholder replaced below (tombstone)
    (frame(tp=2), "unsupported_version", "tp"),
    (frame(tp="1"), "schema_violation", "tp"),
    (frame(tp=1.0), "schema_violation", "tp"),
    (frame(tp=True), "schema_violation", "tp"),
    (frame(tp=_DROP), "schema_violation", "tp"),
    (frame(kind=_DROP), "schema_violation", "kind"),
    (frame(kind="video"), "schema_violation", "kind"),
    (frame(kind=1), "schema_violation", "kind"),
    (frame(source=_DROP), "schema_violation", "source"),
    (frame(source=""), "schema_violation", "source"),
    (frame(source=7), "schema_violation", "source"),
    (frame(seq=-1), "schema_violation", "seq"),
    (frame(seq=1.0), "schema_violation", "seq"),
    (frame(seq=True), "schema_violation", "seq"),
    (frame(seq=_DROP), "schema_violation", "seq"),
    (frame(ts=_DROP), "schema_violation", "ts"),
    (frame(ts="now"), "schema_violation", "ts"),
    (frame(ts=math.nan), "schema_violation", "ts"),
    (frame(ts=math.inf), "schema_violation", "ts"),
    (frame(ts=False), "schema_violation", "ts"),
    (frame(codec=_DROP), "schema_violation", "codec"),
    (frame(codec="gif"), "unsupported_codec", "codec"),
    (frame(codec="JPEG"), "unsupported_codec", "codec"),
    (frame(data=_DROP), "schema_violation", "data"),
    (frame(data="text"), "schema_violation", "data"),
    (frame(data=b""), "schema_violation", "data"),
    (frame(meta=[1, 2]), "schema_violation", "meta"),
    (frame(meta="x"), "schema_violation", "meta"),
    (raw(shape=_DROP), "schema_violation", "shape"),
    (raw(shape=[2, 2]), "schema_violation", "shape"),
    (raw(shape=[2, 2, 3, 1]), "schema_violation", "shape"),
    (raw(shape=[2, 0, 3]), "schema_violation", "shape"),
    (raw(shape=[2, 2.0, 3]), "schema_violation", "shape"),
    (raw(shape=[2, True, 3]), "schema_violation", "shape"),
    (raw(shape=[1, 6, 2]), "schema_violation", "shape"),
    (raw(shape="2x2x3"), "schema_violation", "shape"),
    (raw(dtype=_DROP), "schema_violation", "dtype"),
    (raw(dtype="float32"), "schema_violation", "dtype"),
    (raw(data=bytes(11)), "schema_violation", "data"),
    (raw(data=bytes(13)), "schema_violation", "data"),
    (reading(rate_hz=0), "schema_violation", "rate_hz"),
    (reading(rate_hz=-5.0), "schema_violation", "rate_hz"),
    (reading(rate_hz=_DROP), "schema_violation", "rate_hz"),
    (reading(unit=_DROP), "schema_violation", "unit"),
    (reading(unit=3), "schema_violation", "unit"),
    (reading(values=bytes(10)), "schema_violation", "values"),
    (reading(values=b""), "schema_violation", "values"),
    (reading(values=[1.0, 2.0]), "schema_violation", "values"),
    (reading(meta=[]), "schema_violation", "meta"),
    (reading(seq=-3), "schema_violation", "seq"),
]
INVALID_INPUTS[0] = (None, "undecodable", None)


@pytest.mark.parametrize(("msg", "reason", "field"), INVALID_INPUTS)
def test_invalid_input_names_field_and_reason(msg: dict[str, Any] | None, reason: str, field: str | None) -> None:
    with pytest.raises(ProtocolError) as info:
        tp.decode(None if msg is None else tp.pack(msg))
    assert info.value.reason == reason
    assert info.value.field == field
    assert reason in tp.REASONS
    if field is not None:
        assert repr(field) in str(info.value) or field in str(info.value)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (b"", "not msgpack"),
        (b"\xc1", "not msgpack"),
        (b'{"tp": 1}', "not msgpack"),
        (tp.pack(frame()) + b"\x00", "not msgpack"),  # trailing bytes
        (tp.pack(frame())[:-3], "not msgpack"),  # truncated
        (msgpack.packb([1, 2, 3]), "map"),
        (msgpack.packb("frame"), "map"),
        (msgpack.packb({1: "x"}), "not msgpack"),  # integer key
        (msgpack.packb({b"tp": 1}, use_bin_type=True), "string"),  # bin key
        (tp.pack(frame(meta={"a": {b"k": 1}})), "string"),  # nested bin key
        (tp.pack(frame(meta={"a": [{b"k": 1}]})), "string"),  # bin key inside a list
        (b"\xa2\xff\xfe", "not msgpack"),  # str that is not UTF-8
    ],
)
def test_undecodable(value: bytes, detail: str) -> None:
    with pytest.raises(ProtocolError, match=detail) as info:
        tp.decode(value)
    assert info.value.reason == "undecodable"
    assert info.value.field is None


def test_unsupported_version_is_a_protocol_error() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        tp.decode(tp.pack(frame(tp=2)))
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, StreamdError)
    assert info.value.reason == "unsupported_version" and info.value.field == "tp"
    assert "2" in str(info.value)


def test_version_is_checked_before_anything_else() -> None:
    assert _reason(tp.pack({"tp": 2})) == ("unsupported_version", "tp")


def test_oversized_is_checked_before_parsing() -> None:
    data = tp.pack(frame(data=bytes(1000)))
    with pytest.raises(ProtocolError, match="max_message_bytes") as info:
        tp.decode(data, max_bytes=999)
    assert info.value.reason == "oversized_frame"
    assert tp.decode(data, max_bytes=len(data))["source"] == "cam1"
    assert _reason(b"\xc1" * 50, max_bytes=10) == ("oversized_frame", None)


def test_kinds_restrict_what_decode_accepts() -> None:
    _, result = tp.encode_result(**RESULT_ARGS)
    assert _reason(result) == ("unsupported_kind", "kind")  # decode() takes input kinds by default
    assert _reason(tp.pack(frame()), kinds=("reading",)) == ("unsupported_kind", "kind")
    assert tp.decode(result, kinds=("result",))["kind"] == "result"


def test_validate_returns_kind() -> None:
    assert tp.validate(frame()) == "frame"
    assert tp.validate(reading()) == "reading"


def _reason(value: bytes | None, **kwargs: Any) -> tuple[str, str | None]:
    with pytest.raises(ProtocolError) as info:
        tp.decode(value, **kwargs)
    return info.value.reason, info.value.field


# --- encoders validate what they publish -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"label": ""}, "label"),
        ({"topology": ""}, "topology"),
        ({"node": ""}, "node"),
        ({"source": ""}, "source"),
        ({"seq": -1}, "seq"),
        ({"score": math.nan}, "score"),
        ({"threshold": math.inf}, "threshold"),
        ({"ts": math.nan}, "ts"),
        ({"detected_at": -math.inf}, "detected_at"),
        ({"model": {"name": "ae", "version": ""}}, "version"),
        ({"model": {"name": "", "version": "1"}}, "name"),
        ({"regions": [[1, 2, 3]]}, "regions[0]"),
        ({"regions": [[1, 2, 3, 4], [1, 2, 3, "4"]]}, "regions[1]"),
        ({"origin": {"topic": "", "partition": 0, "offset": 0}}, "topic"),
        ({"origin": {"topic": "t", "partition": 0, "offset": -1}}, "offset"),
        ({"origin": {"topic": "t", "partition": -1, "offset": 0}}, "partition"),
        ({"meta": None, "kind": "frame"}, "codec"),  # encode_result refuses to build an input kind
    ],
)
def test_encode_result_validates(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        tp.encode_result(**result_args(**changes))
    assert info.value.reason == "schema_violation"
    assert info.value.field == field


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"reason": ""}, "reason"),
        ({"stage": ""}, "stage"),
        ({"detail": None}, "detail"),
        ({"source": 5}, "source"),
        ({"at": math.nan}, "at"),
        ({"origin": {"topic": "t", "partition": 0, "offset": -5}}, "offset"),
        ({"origin": {"topic": "t", "partition": 0, "offset": "5"}}, "offset"),
    ],
)
def test_encode_error_validates(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        tp.encode_error(**{**ERROR_ARGS, **changes})
    assert info.value.reason == "schema_violation"
    assert info.value.field == field


def test_error_record_needs_source_key_even_when_nil() -> None:
    msg, _ = tp.encode_error(**{**ERROR_ARGS, "source": None})
    del msg["source"]
    with pytest.raises(ProtocolError) as info:
        tp.encode(msg)
    assert info.value.field == "source"


def test_encode_rejects_what_decode_rejects() -> None:
    with pytest.raises(ProtocolError) as info:
        tp.encode(frame(codec="gif"))
    assert info.value.reason == "unsupported_codec"


def test_reasons_table() -> None:
    for reason, meaning in tp.REASONS.items():
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", reason), reason
        assert meaning
    for needed in (
        "undecodable",
        "unsupported_version",
        "schema_violation",
        "unsupported_codec",
        "oversized_frame",
        "bad_image",
        "frame_expired",
        "node_failed",
        "dropped",
    ):
        assert needed in tp.REASONS


# --- event_id ------------------------------------------------------------------------------------------------------


def test_event_id_is_deterministic_32_hex() -> None:
    first = tp.event_id("line3.frames", 2, 40213, "publish")
    assert first == tp.event_id("line3.frames", 2, 40213, "publish")
    assert re.fullmatch(r"[0-9a-f]{32}", first)


def test_event_id_changes_with_every_input() -> None:
    ids = {
        tp.event_id("t", 0, 0, "n"),
        tp.event_id("u", 0, 0, "n"),
        tp.event_id("t", 1, 0, "n"),
        tp.event_id("t", 0, 1, "n"),
        tp.event_id("t", 0, 0, "m"),
        tp.event_id("t", 0, 10, ""),  # the separator keeps (0, 10, "") apart from (0, 1, "0")
        tp.event_id("t", 0, 1, "0"),
    }
    assert len(ids) == 7


def test_event_id_known_value() -> None:
    # sha256(b"cams\x1f0\x1f0\x1fsink")[:32], computed independently of streamd
    assert tp.event_id("cams", 0, 0, "sink") == "972a94d0e12671e2328ae01f75829d0a"


@pytest.mark.parametrize("vector", INDEX["event_ids"], ids=lambda v: f"{v['topic']}-{v['offset']}-{v['node']}")
def test_event_id_vectors(vector: dict[str, Any]) -> None:
    assert tp.event_id(vector["topic"], vector["partition"], vector["offset"], vector["node"]) == vector["event_id"]
    preimage = "\x1f".join([vector["topic"], str(vector["partition"]), str(vector["offset"]), vector["node"]])
    assert preimage.encode("utf-8").hex() == vector["preimage_hex"]


# --- golden vectors ------------------------------------------------------------------------------------------------


def test_committed_vectors_are_what_the_generator_makes() -> None:
    built = gen.build()
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".msgpack", ".json")}
    assert on_disk == set(built), "regenerate: python docs/tp-v1-vectors/make_vectors.py"
    for name, data in built.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} is stale: python docs/tp-v1-vectors/make_vectors.py"


def test_generator_check_mode(tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "reading.msgpack").write_bytes(b"\x00")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def test_vectors_cover_the_required_cases() -> None:
    valid = {m["file"]: m["kind"] for m in INDEX["messages"] if m["expect"] == "valid"}
    invalid = {m["file"]: (m["reason"], m["field"]) for m in INDEX["messages"] if m["expect"] == "invalid"}
    assert set(valid.values()) == {"frame", "reading", "result", "anomaly", "error"}
    codecs = {json.dumps(m["decoded"].get("codec")) for m in INDEX["messages"] if m.get("kind") == "frame"}
    assert {'"jpeg"', '"png"', '"raw"'} <= codecs
    assert {r for r, _ in invalid.values()} >= {
        "undecodable",
        "unsupported_version",
        "schema_violation",
        "unsupported_codec",
    }
    assert "frame-unknown-keys.msgpack" in valid


@pytest.mark.parametrize("entry", INDEX["messages"], ids=lambda e: e["file"])
def test_vector_decodes_to_expected_outcome(entry: dict[str, Any]) -> None:
    data = (VECTORS / entry["file"]).read_bytes()
    if entry["expect"] == "valid":
        msg = tp.decode_any(data)
        assert msg["kind"] == entry["kind"]
        assert gen.to_json(msg) == entry["decoded"]
        assert gen.from_json(entry["decoded"]) == msg
        assert tp.pack(msg) == data  # the streamd encoder reproduces the exact bytes
        if msg["kind"] in tp.OUTPUT_KINDS:
            node = msg.get("node", msg.get("stage"))
            origin = msg["origin"]
            assert msg["event_id"] == tp.event_id(origin["topic"], origin["partition"], origin["offset"], node)
        if msg["kind"] in tp.INPUT_KINDS:
            assert tp.decode(data) == msg
    else:
        with pytest.raises(ProtocolError) as info:
            tp.decode_any(data)
        assert (info.value.reason, info.value.field) == (entry["reason"], entry["field"])


def test_jpeg_vector_is_a_real_jpeg() -> None:
    msg = tp.decode((VECTORS / "frame-jpeg.msgpack").read_bytes())
    with Image.open(io.BytesIO(msg["data"])) as img:
        assert img.format == "JPEG" and img.size == (8, 8) and img.mode == "RGB"
        pixels = np.asarray(img, dtype=np.int16)
    expected = np.array([[(x * 32, y * 32, 128) for x in range(8)] for y in range(8)], dtype=np.int16)
    error = np.abs(pixels - expected)
    assert error.max() <= 32 and error.mean() <= 8  # lossy (chroma subsampled), but the gradient survives


def test_png_vector_is_a_real_png() -> None:
    msg = tp.decode((VECTORS / "frame-png.msgpack").read_bytes())
    with Image.open(io.BytesIO(msg["data"])) as img:
        assert img.format == "PNG" and img.size == (4, 2) and img.mode == "RGB"
        pixels = np.asarray(img).reshape(-1, 3)
    assert [tuple(p) for p in pixels.tolist()] == gen.PNG_PIXELS


def test_raw_and_reading_vectors_decode_to_arrays() -> None:
    msg = tp.decode((VECTORS / "frame-raw-rgb.msgpack").read_bytes())
    image = np.frombuffer(msg["data"], dtype=np.uint8).reshape(msg["shape"])
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [255, 255, 255]
    msg = tp.decode((VECTORS / "reading.msgpack").read_bytes())
    assert np.frombuffer(msg["values"], dtype="<f4").tolist() == [0.0, 0.5, -1.25, 3.0]


# --- the spec document stays in step with the code --------------------------------------------------------------

SPEC = (ROOT / "docs" / "tp-v1.md").read_text(encoding="utf-8")


def test_spec_reason_table_is_tp_reasons() -> None:
    section = SPEC.split("## 8. Error reasons", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (.+?) \|$", section, flags=re.MULTILINE))
    assert rows == tp.REASONS


def test_spec_names_every_vector_file() -> None:
    section = SPEC.split("## 9. Golden vectors", 1)[1].split("\n## ", 1)[0]
    for entry in INDEX["messages"]:
        assert f"`{entry['file'].removesuffix('.msgpack')}`" in section, entry["file"]


def test_spec_event_id_example() -> None:
    assert "`63616d731f301f301f73696e6b`" in SPEC
    assert f"`{tp.event_id('cams', 0, 0, 'sink')}`" in SPEC
