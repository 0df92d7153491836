"""Every Prometheus metric streamd exports, built against an injectable registry.

Conventions: prefix ``streamd_``, base units (seconds, bytes), ``_total`` for
counters, histograms for latencies. Build one :class:`Metrics` per process
(``Metrics()`` uses the default registry; tests pass a fresh
``CollectorRegistry``). In prefork Celery workers the values are shared
across child processes through ``PROMETHEUS_MULTIPROC_DIR`` (see
:mod:`streamd.http`).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "LATENCY_BUCKETS", "FAST_BUCKETS"]

#: End-to-end and per-node latencies: 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Inference: 100 us to 10 s.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The metric objects of one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = REGISTRY if registry is None else registry
        self.registry = r
        # Gauges that are set by one process only (the daemon) use "liveall"
        # semantics in multiprocess mode, so dead processes do not linger.
        self.kafka_consumer_lag = Gauge(
            "streamd_kafka_consumer_lag",
            "Messages not yet committed by the consumer group: high watermark minus committed offset",
            ["topic", "partition"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.kafka_assigned_partitions = Gauge(
            "streamd_kafka_assigned_partitions",
            "Partitions of a source topic assigned to this ingest daemon by its consumer group",
            ["topic"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.kafka_fetch_wait = Gauge(
            "streamd_kafka_fetch_wait_seconds",
            "Longest the broker may hold this ingest daemon's fetch now: the short wait while it keeps up, "
            "the backlog wait while every source is at its max_in_flight bound",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.queue_depth = Gauge(
            "streamd_queue_depth",
            "Messages waiting in a Celery broker queue",
            ["queue"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.node_duration = Histogram(
            "streamd_node_duration_seconds",
            "Time one Node takes per call (a micro-batch counts once)",
            ["topology", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "streamd_inference_duration_seconds",
            "ONNX Runtime session.run time per batch, by model and execution provider",
            ["model", "provider"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.inference_batch_size = Histogram(
            "streamd_inference_batch_size",
            "Inputs per ONNX Runtime session.run",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "streamd_end_to_end_latency_seconds",
            "From the input's capture ts to the publication of its result",
            ["topology"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames_ingested = Counter(
            "streamd_frames_ingested_total",
            "Input messages handed off to the workers (stored in Redis and dispatched)",
            ["topology", "topic"],
            registry=r,
        )
        self.frames_dropped = Counter(
            "streamd_frames_dropped_total",
            "Input messages shed by the overload policy",
            ["topology", "topic", "reason"],
            registry=r,
        )
        self.frames_expired = Counter(
            "streamd_frames_expired_total",
            "Runs whose payload left Redis before a worker reached it",
            ["topology"],
            registry=r,
        )
        self.dead_letters = Counter(
            "streamd_dead_letters_total",
            "Records published to the dead-letter topic",
            ["topology", "reason", "stage"],
            registry=r,
        )
        self.events_published = Counter(
            "streamd_events_published_total",
            "Records published by sinks",
            ["topology", "kind"],
            registry=r,
        )
        self.frames_in_flight = Gauge(
            "streamd_frames_in_flight",
            "Inputs handed off but not yet finished (result or dead letter)",
            ["topology", "topic"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.frame_store_keys = Gauge(
            "streamd_frame_store_keys",
            "Payload keys held in Redis for this topology",
            ["topology"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.frame_store_bytes = Gauge(
            "streamd_frame_store_bytes",
            "Payload bytes held in Redis for this topology",
            ["topology"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.task_retries = Counter(
            "streamd_task_retries_total",
            "Stage tasks retried after a Node exception",
            ["topology", "stage"],
            registry=r,
        )
        self.compute_slot_wait = Counter(
            "streamd_compute_slot_wait_seconds_total",
            "Seconds worker processes waited for a compute slot (STREAMD_WORKER_COMPUTE_SLOTS) before running "
            "Nodes; near (processes - slots) per second the worker's CPUs are saturated",
            ["topology"],
            registry=r,
        )
        self.stages_in_process = Counter(
            "streamd_stages_in_process_total",
            "Stage runs a worker did itself right after their parent stage, without the broker (outcome ran), "
            "or handed to their queue after failing there (outcome dispatched)",
            ["topology", "stage", "outcome"],
            registry=r,
        )
