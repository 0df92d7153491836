"""``streamd tp decode`` and ``streamd tp encode-sample``: TP v1 messages as JSON, and sample input.

``streamd tp decode FILE...`` prints every TP message in the files (one
message, or several concatenated msgpack messages, per file; ``-`` is stdin)
as one JSON line each. ``streamd tp decode --topic T`` does the same for a
Kafka topic. Reading a topic never disturbs a consumer group: the tool assigns
the partitions itself under a throwaway group id and never commits.

Each line is the decoded message with its location first, under ``_file``
(``path``, ``index``: n-th message in the file, ``pos``: byte offset) or
``_kafka`` (``topic``, ``partition``, ``offset``, ``key``, ``timestamp_ms``).
msgpack bin values print as ``{"$bin": base64, "bytes": N}`` (``{"bytes": N}``
with ``--no-data``). A message that breaks TP v1 prints as
``{"_file"|"_kafka": ..., "error": reason, "field": ..., "detail": ...}`` (plus
``"value"`` when it is msgpack at all) and the tool goes on.

Exit status: 0 when every message was valid, 1 when any was not, 2 on a usage
or connection error (nothing read).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import msgpack

from . import tp
from .config import Settings, redact
from .exceptions import ConfigError, ProtocolError

__all__ = [
    "add_arguments",
    "add_encode_sample_arguments",
    "add_subcommands",
    "run",
    "run_encode_sample",
    "to_json",
]

PROG = "streamd tp decode"
_MAP_HEADERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map 16, map 32
_CONNECT_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


# --- argument parsing --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``streamd tp decode``."""
    parser.description = "Print TP v1 messages, from files or a Kafka topic, as JSON lines."
    parser.epilog = (
        'Exit status: 0 all messages valid, 1 some invalid (printed with an "error" key), 2 usage or connection error.'
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="a file holding one TP message or several concatenated ones; - reads stdin",
    )
    parser.add_argument("--topic", "-t", metavar="TOPIC", help="read this Kafka topic instead of files")
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: $STREAMD_KAFKA_BOOTSTRAP, else localhost:9092)",
    )
    parser.add_argument("--partition", "-p", type=int, metavar="P", help="read only this partition (default: all)")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest retained message (default: only messages arriving from now on)",
    )
    parser.add_argument("--max", "-n", type=int, metavar="N", help="stop after N messages")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop after S seconds without a message; also how long to try to reach Kafka "
        f"(default: wait for messages until Ctrl-C; {_CONNECT_TIMEOUT_S:g} s to connect)",
    )
    parser.add_argument(
        "--no-data", action="store_true", help='print binary fields as {"bytes": N} only, without their base64 content'
    )


def add_encode_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``streamd tp encode-sample``."""
    parser.description = "Write synthetic TP v1 input messages (msgpack), e.g. to test a topology or a consumer."
    parser.add_argument("--kind", choices=tp.INPUT_KINDS, default="frame", help="message kind (default: frame)")
    parser.add_argument("--codec", choices=tp.CODECS, default="jpeg", help="image codec of frames (default: jpeg)")
    parser.add_argument("--size", default="128x128", metavar="HxW", help="frame size (default: 128x128)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 grey or 3 RGB (default: 1)")
    parser.add_argument(
        "--defect",
        default=None,
        help="inject a defect into frames (scratch, spot, missing) or a fault into readings "
        "(bearing, imbalance, looseness)",
    )
    parser.add_argument("--source", default=None, help="source id (default: sample-cam or sample-sensor)")
    parser.add_argument("--seq", type=int, default=0, help="seq of the first message (default: 0)")
    parser.add_argument("--count", type=int, default=1, help="messages to write, concatenated (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")


def add_subcommands(subparsers: Any) -> None:
    """Register ``decode`` and ``encode-sample`` on the ``streamd tp`` sub-parsers; each sets ``func``."""
    decode = subparsers.add_parser("decode", help="print TP messages from files or a topic as JSON lines")
    add_arguments(decode)
    decode.set_defaults(func=run)
    sample = subparsers.add_parser("encode-sample", help="write synthetic TP input messages (msgpack)")
    add_encode_sample_arguments(sample)
    sample.set_defaults(func=run_encode_sample)


# --- JSON rendering ----------------------------------------------------------------------------------------------


def to_json(value: Any, *, data: bool = True) -> Any:
    """A decoded msgpack value as JSON-ready data; bin values become ``{"$bin": base64, "bytes": N}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return {"$bin": base64.b64encode(raw).decode("ascii"), "bytes": len(raw)} if data else {"bytes": len(raw)}
    if isinstance(value, dict):
        return {_json_key(k): to_json(v, data=data) for k, v in value.items()}
    if isinstance(value, msgpack.ExtType):  # a namedtuple: before the tuple case
        return {"$ext": value.code, **to_json(value.data, data=data)}
    if isinstance(value, (list, tuple)):
        return [to_json(v, data=data) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}  # nan, inf, -inf: not JSON numbers
    if isinstance(value, msgpack.Timestamp):
        return {"$timestamp": value.to_unix()}
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return json.dumps(to_json(key))


def _kafka_key(key: bytes | None, data: bool) -> Any:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return to_json(key, data=data)


class _Printer:
    """Writes one JSON line per message and remembers whether any was invalid."""

    def __init__(self, out: IO[str], *, data: bool) -> None:
        self.out = out
        self.data = data
        self.count = 0
        self.invalid = 0

    def message(self, where: dict[str, Any], value: bytes | None, *, note: str = "") -> None:
        self.count += 1
        try:
            msg = tp.decode_any(value)
        except ProtocolError as exc:
            self.invalid += 1
            line: dict[str, Any] = {**where, "error": exc.reason, "field": exc.field, "detail": str(exc) + note}
            shown = _loose_unpack(value)
            if shown is not _NOTHING:
                line["value"] = to_json(shown, data=self.data)
        else:
            line = {**where, **to_json(msg, data=self.data)}
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()

    @property
    def status(self) -> int:
        return 1 if self.invalid else 0


_NOTHING = object()


def _loose_unpack(value: bytes | None) -> Any:
    """The value as msgpack without TP's rules (any key type), or _NOTHING when it is not msgpack."""
    if value is None:
        return _NOTHING
    try:
        return msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:
        return _NOTHING


# --- files -------------------------------------------------------------------------------------------------------


def _split(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, note) of each message in a file of concatenated msgpack maps.

    Where the rest cannot be split into maps (garbage, a truncated message, a
    top-level value that is not a map), one last span covers all of it.
    """
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    pos = 0
    while pos < len(data):
        end = None
        if data[pos] in _MAP_HEADERS:
            try:
                unpacker.skip()
                end = unpacker.tell()
            except Exception:
                end = None
        if end is None or end <= pos:
            rest = len(data) - pos
            yield pos, len(data), f" (bytes {pos}..{len(data)} of the file, {rest} bytes, are not a msgpack map)"
            return
        yield pos, end, ""
        pos = end


def _decode_files(args: argparse.Namespace, printer: _Printer) -> int:
    unreadable = False
    for path in args.files:
        if args.max is not None and printer.count >= args.max:
            break
        try:
            if path == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
        except OSError as exc:
            print(f"{PROG}: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            unreadable = True
            continue
        if not data:
            printer.message({"_file": {"path": path, "index": 0, "pos": 0}}, b"", note=" (the file is empty)")
            continue
        for index, (start, end, note) in enumerate(_split(data)):
            if args.max is not None and printer.count >= args.max:
                break
            printer.message({"_file": {"path": path, "index": index, "pos": start}}, data[start:end], note=note)
    return 2 if unreadable else printer.status


# --- Kafka -------------------------------------------------------------------------------------------------------


def _usage(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _decode_topic(args: argparse.Namespace, printer: _Printer) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        return _usage(str(exc))
    conf = settings.kafka_config()
    where = "--bootstrap" if args.bootstrap else "STREAMD_KAFKA_BOOTSTRAP"
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    bootstrap = redact(str(conf["bootstrap.servers"]))
    errors: list[Any] = []
    conf.update(
        {
            # a group id of our own that never joins (we assign) and never commits: real groups are untouched
            "group.id": f"streamd-tp-decode-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest" if args.from_beginning else "latest",
            "error_cb": errors.append,
            "logger": _quiet_logger(),
        }
    )
    try:
        consumer = Consumer(conf)
    except KafkaException as exc:
        return _usage(f"bad Kafka settings: {redact(str(exc))}")
    try:
        connect_s = args.timeout if args.timeout is not None else _CONNECT_TIMEOUT_S
        try:
            metadata = consumer.list_topics(args.topic, timeout=connect_s)
        except KafkaException as exc:
            return _usage(
                f"cannot reach Kafka at {bootstrap} ({where}) within {connect_s:g} s: {redact(str(exc))}; "
                "check the address (set STREAMD_KAFKA_BOOTSTRAP or pass --bootstrap HOST:PORT) and that Kafka is up"
            )
        topic = metadata.topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            why = f": {topic.error.str()}" if topic is not None and topic.error is not None else ""
            return _usage(f"topic {args.topic!r} does not exist on Kafka at {bootstrap} ({where}){why}")
        partitions = sorted(topic.partitions)
        if args.partition is not None:
            if args.partition not in partitions:
                return _usage(f"topic {args.topic!r} has partitions {partitions}, not {args.partition}")
            partitions = [args.partition]
        start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
        consumer.assign([TopicPartition(args.topic, p, start) for p in partitions])
        return _poll(consumer, args, printer, errors, bootstrap, KafkaError)
    except KeyboardInterrupt:
        return printer.status
    finally:
        consumer.close()


def _poll(
    consumer: Any, args: argparse.Namespace, printer: _Printer, errors: list[Any], bootstrap: str, kafka_error: Any
) -> int:
    last = time.monotonic()
    while args.max is None or printer.count < args.max:
        wait = 1.0
        if args.timeout is not None:
            left = last + args.timeout - time.monotonic()
            if left <= 0:
                break
            wait = min(wait, left)
        msg = consumer.poll(wait)
        fatal = [e for e in errors if e.fatal() or e.code() == kafka_error._ALL_BROKERS_DOWN]
        errors.clear()
        if fatal:
            print(f"{PROG}: lost Kafka at {bootstrap}: {redact(fatal[0].str())}", file=sys.stderr)
            return 2
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() != kafka_error._PARTITION_EOF:
                log.warning("%s", msg.error().str())
            continue
        last = time.monotonic()
        ts_type, ts_ms = msg.timestamp()
        where = {
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": _kafka_key(msg.key(), printer.data),
        }
        if ts_type != 0:  # TIMESTAMP_NOT_AVAILABLE
            where["timestamp_ms"] = ts_ms
        printer.message({"_kafka": where}, msg.value())
    return printer.status


def _quiet_logger() -> logging.Logger:
    """librdkafka logs through this logger (not straight to stderr); connection failures are reported by us."""
    logger = logging.getLogger(f"{__name__}.librdkafka")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def run(args: argparse.Namespace) -> int:
    """``streamd tp decode``: returns the exit status."""
    if args.topic and args.files:
        return _usage("give FILEs or --topic, not both")
    if not args.topic and not args.files:
        return _usage("give one or more FILEs (- for stdin) or --topic TOPIC; see --help")
    if args.max is not None and args.max < 1:
        return _usage(f"--max must be at least 1, got {args.max}")
    if args.timeout is not None and args.timeout <= 0:
        return _usage(f"--timeout must be above 0 seconds, got {args.timeout:g}")
    for flag, value in (
        ("--bootstrap", args.bootstrap),
        ("--partition", args.partition),
        ("--from-beginning", args.from_beginning or None),
    ):
        if value is not None and not args.topic:
            return _usage(f"{flag} only applies to --topic")
    printer = _Printer(sys.stdout, data=not args.no_data)
    try:
        return _decode_topic(args, printer) if args.topic else _decode_files(args, printer)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        try:  # keep the interpreter's final flush of stdout from failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # stdout without a file descriptor
            pass
        return printer.status


# --- encode-sample -----------------------------------------------------------------------------------------------


def _sample_messages(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    import numpy as np

    from . import synth

    rng = np.random.default_rng(args.seed)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {args.size!r}: use HxW, e.g. 128x128") from None
    make: Callable[[int], dict[str, Any]]
    if args.kind == "frame":
        if args.defect is not None and args.defect not in synth.DEFECT_KINDS:
            raise ConfigError(f"--defect {args.defect!r}: frames take one of {', '.join(synth.DEFECT_KINDS)}")

        def make(seq: int) -> dict[str, Any]:
            image, _ = synth.camera_frame(rng, args.defect, size=(h, w), channels=args.channels)
            msg: dict[str, Any] = {
                "tp": tp.VERSION,
                "kind": "frame",
                "source": args.source or "sample-cam",
                "seq": seq,
                "ts": time.time(),
                "codec": args.codec,
            }
            if args.codec == "raw":
                msg.update(shape=list(image.shape), dtype="uint8", data=image.tobytes())
            else:
                msg["data"] = _compress(image, args.codec)
            msg["meta"] = {"defect": args.defect} if args.defect else {}
            return msg
    else:
        if args.defect is not None and args.defect not in synth.SENSOR_FAULTS:
            raise ConfigError(f"--defect {args.defect!r}: readings take one of {', '.join(synth.SENSOR_FAULTS)}")

        def make(seq: int) -> dict[str, Any]:
            values = synth.sensor_window(rng, args.defect, rate_hz=5000.0, n=4096)
            return {
                "tp": tp.VERSION,
                "kind": "reading",
                "source": args.source or "sample-sensor",
                "seq": seq,
                "ts": time.time(),
                "rate_hz": 5000.0,
                "unit": "g",
                "values": values.astype("<f4").tobytes(),
                "meta": {"fault": args.defect} if args.defect else {},
            }

    for i in range(args.count):
        yield make(args.seq + i)


def _compress(image: Any, codec: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
        buf, "JPEG" if codec == "jpeg" else "PNG", **({"quality": 90} if codec == "jpeg" else {})
    )
    return buf.getvalue()


def run_encode_sample(args: argparse.Namespace) -> int:
    """``streamd tp encode-sample``: returns the exit status."""
    prog = "streamd tp encode-sample"
    if args.count < 1 or args.seq < 0:
        print(f"{prog}: --count must be at least 1 and --seq at least 0", file=sys.stderr)
        return 2
    if args.output is None and sys.stdout.isatty():
        print(f"{prog}: msgpack is binary; redirect stdout (> sample.msgpack) or pass --output FILE", file=sys.stderr)
        return 2
    try:
        chunks = [tp.encode(msg) for msg in _sample_messages(args)]
    except (ConfigError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(chunks))
        sys.stdout.buffer.flush()
    else:
        try:
            with open(args.output, "wb") as fh:
                fh.write(b"".join(chunks))
        except OSError as exc:
            print(f"{prog}: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0
