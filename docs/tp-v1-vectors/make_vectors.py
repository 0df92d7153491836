"""Write the TP v1 golden vectors: one ``.msgpack`` file per case plus ``vectors.json``.

Run from the repository root::

    python docs/tp-v1-vectors/make_vectors.py          # (re)write the files
    python docs/tp-v1-vectors/make_vectors.py --check  # exit 1 if the files differ

The output is deterministic: every timestamp is fixed and the two images are
embedded below as bytes (made once with Pillow, see ``_JPEG_8X8`` and
``_PNG_4X2``), because JPEG and PNG encoders of different library versions
produce different bytes for the same pixels. The expected outcome of each
case is written here by hand; the generator refuses to write a vector the
codec (``streamd.tp``) disagrees with, and ``tests/test_tp.py`` checks the
committed files against this script.

See ``docs/tp-v1.md`` ("Golden vectors") for the file format.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:
    from streamd import tp
    from streamd.exceptions import ProtocolError
except ImportError:  # run from a checkout without installing streamd
    sys.path.insert(0, str(HERE.parents[1]))
    from streamd import tp
    from streamd.exceptions import ProtocolError

BIN = "$bin"  # JSON marker for msgpack bin values: {"$bin": "<base64>"}

# An 8x8 RGB JPEG (quality 90); pixel (x, y) was (32x, 32y, 128) before compression. Made with:
#   img = Image.new("RGB", (8, 8)); img.putdata([(x * 32, y * 32, 128) for y in range(8) for x in range(8)])
#   img.save(buf, "JPEG", quality=90)
_JPEG_8X8 = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMUFRUVDA8X"
    "GBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wAAR"
    "CAAIAAgDASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEG"
    "E1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWG"
    "h4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEB"
    "AQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYk"
    "NOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDmfhR+yp/qf9D9P4aKKK+RzbifM/rT/eHp"
    "eHvGOcf2FS/e/wBWXmf/2Q=="
)

# A 4x2 RGB PNG, row by row: red, green, blue, white / black, (64,64,64), (128,128,128), (200,100,50). Made with:
#   img = Image.new("RGB", (4, 2)); img.putdata(PNG_PIXELS); img.save(buf, "PNG")
PNG_PIXELS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 255),
    (0, 0, 0),
    (64, 64, 64),
    (128, 128, 128),
    (200, 100, 50),
]
_PNG_4X2 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAQAAAACCAIAAADwyuo0AAAAIElEQVR4nAXBMQEAMAyAMOaMs3qnqT5oQkBA1QNUdfYfeM0JWl6SeKsAAAAASUVORK5CYII="
)

TS = 1795618807.471  # capture time used by every input vector
DETECTED_AT = 1795618807.532
AT = 1795618807.9


def _frame(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"tp": 1, "kind": "frame", "source": "line3-cam07", "seq": 1234, "ts": TS}
    msg.update(fields)
    return msg


def _reading(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "tp": 1,
        "kind": "reading",
        "source": "turbine3-bearing1",
        "seq": 88,
        "ts": TS,
        "rate_hz": 5000.0,
        "unit": "g",
        "values": struct.pack("<4f", 0.0, 0.5, -1.25, 3.0),
    }
    msg.update(fields)
    return msg


def _without(msg: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != key}


_RESULT_ARGS: dict[str, Any] = {
    "topology": "surface-inspection",
    "node": "publish",
    "source": "line3-cam07",
    "seq": 1234,
    "ts": TS,
    "detected_at": DETECTED_AT,
    "threshold": 0.5,
    "model": {"name": "patch-autoencoder", "version": "1.0.0"},
    "origin": {"topic": "line3.frames", "partition": 2, "offset": 40213},
    "meta": {"line": 3},
}


def cases() -> list[dict[str, Any]]:
    """Every vector: name, description, the exact bytes, and the expected outcome."""
    raw_gray = bytes(range(0, 60, 10))  # 2 x 3 x 1
    raw_rgb = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])  # 2 x 2 x 3
    result, result_bytes = tp.encode_result(
        kind="result", anomaly=False, score=0.125, label="ok", regions=[], **_RESULT_ARGS
    )
    anomaly, anomaly_bytes = tp.encode_result(
        kind="anomaly",
        anomaly=True,
        score=0.875,
        label="scratch",
        regions=[[2, 3, 4, 1], [0.5, 0.25, 1.5, 2.0]],
        **_RESULT_ARGS,
    )
    error, error_bytes = tp.encode_error(
        reason="bad_image",
        detail="node 'decode': cannot identify image file (jpeg, 512 bytes)",
        stage="decode",
        source="line3-cam07",
        origin={"topic": "line3.frames", "partition": 2, "offset": 40214},
        at=AT,
    )
    error_ingest, error_ingest_bytes = tp.encode_error(
        reason="undecodable",
        detail="not msgpack: ExtraData: unpack(b) received extra data.",
        stage="ingest",
        source=None,
        origin={"topic": "line3.frames", "partition": 0, "offset": 7},
        at=AT,
    )

    def valid(name: str, description: str, msg: dict[str, Any], data: bytes | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "description": description,
            "bytes": tp.pack(msg) if data is None else data,
            "expect": "valid",
            "kind": msg["kind"],
            "decoded": msg,
        }

    def invalid(name: str, description: str, data: bytes, reason: str, field: str | None) -> dict[str, Any]:
        return {
            "name": name,
            "description": description,
            "bytes": data,
            "expect": "invalid",
            "reason": reason,
            "field": field,
        }

    jpeg = _frame(codec="jpeg", data=_JPEG_8X8, meta={"exposure_us": 800, "line": 3})
    return [
        valid("frame-jpeg", "camera frame, an 8x8 RGB JPEG, with meta", jpeg),
        valid("frame-png", "camera frame, a 4x2 RGB PNG, no meta", _frame(seq=1235, codec="png", data=_PNG_4X2)),
        valid(
            "frame-raw-gray",
            "raw frame, shape [2, 3, 1] uint8, row-major (h, w, c): 6 bytes",
            _frame(seq=1236, codec="raw", shape=[2, 3, 1], dtype="uint8", data=raw_gray),
        ),
        valid(
            "frame-raw-rgb",
            "raw frame, shape [2, 2, 3] uint8 (RGB), row-major (h, w, c): 12 bytes",
            _frame(seq=1237, codec="raw", shape=[2, 2, 3], dtype="uint8", data=raw_rgb),
        ),
        valid("reading", "sensor reading: 4 little-endian float32 samples 0.0, 0.5, -1.25, 3.0", _reading()),
        valid("result", "result record (not anomalous) as a sink publishes it", result, result_bytes),
        valid("anomaly", "anomaly event with two regions, as a sink publishes it", anomaly, anomaly_bytes),
        valid("error", "dead-letter record from a Node (stage is the node id)", error, error_bytes),
        valid(
            "error-ingest",
            "dead-letter record from ingest for an undecodable value (source nil)",
            error_ingest,
            error_ingest_bytes,
        ),
        valid(
            "frame-unknown-keys",
            "frame with keys TP v1 does not define (top level and nested): valid, the extra keys are ignored",
            _frame(seq=1238, codec="png", data=_PNG_4X2, exposure_us=800, vendor={"gain_db": 6.0, "fw": "2.1"}),
        ),
        invalid("not-msgpack", "a JSON text, not msgpack", b'{"tp": 1, "kind": "frame"}', "undecodable", None),
        invalid("truncated", "a frame cut off in the middle of its data", tp.pack(jpeg)[:100], "undecodable", None),
        invalid(
            "array",
            "a msgpack array instead of a map",
            tp.pack([1, "frame", "line3-cam07", 1234]),  # type: ignore[arg-type]
            "undecodable",
            None,
        ),
        invalid(
            "binary-keys",
            "a map whose keys are msgpack bin, not str",
            tp.pack({k.encode(): v for k, v in _frame(codec="png", data=_PNG_4X2).items()}),
            "undecodable",
            None,
        ),
        invalid(
            "tp-2", "tp major version 2", tp.pack(_frame(tp=2, codec="png", data=_PNG_4X2)), "unsupported_version", "tp"
        ),
        invalid(
            "tp-missing",
            "no tp key",
            tp.pack(_without(_frame(codec="png", data=_PNG_4X2), "tp")),
            "schema_violation",
            "tp",
        ),
        invalid(
            "kind-unknown",
            "kind 'video' is not a TP v1 kind",
            tp.pack(_frame(kind="video", codec="png", data=_PNG_4X2)),
            "schema_violation",
            "kind",
        ),
        invalid(
            "missing-source",
            "frame without source",
            tp.pack(_without(_frame(codec="png", data=_PNG_4X2), "source")),
            "schema_violation",
            "source",
        ),
        invalid(
            "seq-negative", "seq is -1", tp.pack(_frame(seq=-1, codec="png", data=_PNG_4X2)), "schema_violation", "seq"
        ),
        invalid(
            "ts-string",
            "ts as a string instead of a float",
            tp.pack(_frame(ts="2026-11-25T10:20:07Z", codec="png", data=_PNG_4X2)),
            "schema_violation",
            "ts",
        ),
        invalid("codec-gif", "codec 'gif'", tp.pack(_frame(codec="gif", data=b"GIF89a")), "unsupported_codec", "codec"),
        invalid(
            "data-as-str",
            "image data sent as a msgpack str instead of bin",
            tp.pack(_frame(codec="raw", shape=[1, 2, 1], dtype="uint8", data="ab")),
            "schema_violation",
            "data",
        ),
        invalid(
            "raw-wrong-size",
            "raw frame of shape [2, 2, 3] (12 bytes) carrying 11 bytes",
            tp.pack(_frame(codec="raw", shape=[2, 2, 3], dtype="uint8", data=raw_rgb[:11])),
            "schema_violation",
            "data",
        ),
        invalid(
            "raw-two-channels",
            "raw frame with 2 channels (only 1, 3 or 4 allowed)",
            tp.pack(_frame(codec="raw", shape=[1, 2, 2], dtype="uint8", data=bytes(4))),
            "schema_violation",
            "shape",
        ),
        invalid(
            "raw-float32",
            "raw frame with dtype float32 (only uint8 allowed)",
            tp.pack(_frame(codec="raw", shape=[1, 1, 1], dtype="float32", data=bytes(4))),
            "schema_violation",
            "dtype",
        ),
        invalid(
            "reading-values-not-float32",
            "reading whose values hold 10 bytes (not a multiple of 4)",
            tp.pack(_reading(values=bytes(10))),
            "schema_violation",
            "values",
        ),
        invalid(
            "reading-rate-zero", "reading with rate_hz 0", tp.pack(_reading(rate_hz=0.0)), "schema_violation", "rate_hz"
        ),
    ]


EVENT_ID_INPUTS: list[tuple[str, int, int, str]] = [
    ("line3.frames", 2, 40213, "publish"),
    ("line3.frames", 2, 40213, "publish_anomalies"),
    ("line3.frames", 2, 40214, "decode"),
    ("line3.frames", 0, 7, "ingest"),
    ("cams", 0, 0, "sink"),
    ("prüfstand-ß", 11, 9007199254740993, "größe"),  # non-ASCII (UTF-8) and an offset above 2**53
]


def event_id_vectors() -> list[dict[str, Any]]:
    out = []
    for topic, partition, offset, node in EVENT_ID_INPUTS:
        preimage = f"{topic}\x1f{partition}\x1f{offset}\x1f{node}".encode()
        out.append(
            {
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "node": node,
                "preimage_hex": preimage.hex(),
                "event_id": tp.event_id(topic, partition, offset, node),
            }
        )
    return out


def to_json(value: Any) -> Any:
    """A decoded TP value as JSON: msgpack bin becomes {"$bin": base64}."""
    if isinstance(value, bytes):
        return {BIN: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(value, dict):
        if set(value) == {BIN}:
            return base64.b64decode(value[BIN])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _outcome(data: bytes) -> tuple[str, str | None, str | None]:
    try:
        msg = tp.decode_any(data)
    except ProtocolError as exc:
        return "invalid", exc.reason, exc.field
    return "valid", msg["kind"], None


def build() -> dict[str, bytes]:
    """Every file of the vector folder: name -> exact content."""
    files: dict[str, bytes] = {}
    index: list[dict[str, Any]] = []
    for case in cases():
        name = case["name"] + ".msgpack"
        data: bytes = case["bytes"]
        got = _outcome(data)
        if case["expect"] == "valid":
            want = ("valid", case["kind"], None)
            if tp.decode_any(data) != case["decoded"]:
                raise AssertionError(f"{name}: decoding does not give the message it was made from")
        else:
            want = ("invalid", case["reason"], case["field"])
        if got != want:
            raise AssertionError(f"{name}: codec says {got}, the vector expects {want}")
        entry: dict[str, Any] = {"file": name, "description": case["description"], "expect": case["expect"]}
        if case["expect"] == "valid":
            entry["kind"] = case["kind"]
            entry["decoded"] = to_json(case["decoded"])
        else:
            entry["reason"] = case["reason"]
            entry["field"] = case["field"]
        index.append(entry)
        files[name] = data
    doc = {
        "tp": tp.VERSION,
        "about": "TP v1 golden vectors; see docs/tp-v1.md. Regenerate with: python docs/tp-v1-vectors/make_vectors.py",
        "binary_marker": BIN,
        "messages": index,
        "event_ids": event_id_vectors(),
    }
    files["vectors.json"] = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: next to this script)")
    args = parser.parse_args(argv)
    files = build()
    stale = sorted(p.name for p in args.out.glob("*.msgpack") if p.name not in files)
    differ = [n for n, data in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != data]
    if args.check:
        for name in differ + stale:
            print(f"differs: {name}", file=sys.stderr)
        return 1 if differ or stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out / name).unlink()
    for name in differ:
        (args.out / name).write_bytes(files[name])
    print(f"{len(files)} files in {args.out} ({len(differ)} written, {len(stale)} removed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
