"""Where streamd's time goes, per frame: the daemon's hand-off and every stage, in one process.

    .venv/bin/python benchmarks/hotpath.py [--frames N] [--batch 16] [--set KEY=VALUE ...]

This drives the real :class:`streamd.ingest.Ingestor` and :class:`streamd.executor.StageExecutor`
against the real Redis, RabbitMQ (stage tasks are published with confirms, as in production, into
this run's own queues, which are deleted at the end) and Kafka (the sink publishes), but runs each
dispatched stage in this process instead of a Celery worker. Every store call, dispatch and Node
call is timed with ``time.process_time`` (CPU of this process, ONNX Runtime's threads included;
much less sensitive to other work on the machine than wall time) and ``time.perf_counter`` (wall:
includes the round trips to Redis/RabbitMQ/Kafka).

What it does not see: the Celery machinery around a task (the worker's main process receiving the
AMQP message, the billiard pipe to the pool process, the ack) and the faust consumer; bench.py's CPU
accounting of the ``streamd worker`` main processes and of the daemon covers those.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402 - the benchmark's helpers (services, topology copies, frames)

Timings = dict[str, list[float]]


def timed(table: Timings, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            table[name].append(time.process_time() - c0)
            table[name + "\x00wall"].append(time.perf_counter() - w0)
    return wrapper


def run(args: argparse.Namespace) -> int:
    from streamd.broker import Dispatcher, make_celery
    from streamd.config import Settings
    from streamd.dag import in_process, plan
    from streamd.deadletters import DeadLetterSink
    from streamd.executor import StageExecutor
    from streamd.ingest import Ingestor, InMessage
    from streamd.kafka import Publisher, ensure_topics
    from streamd.runs import RunStore
    from streamd.topology import load

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    services = bench.start_services(args, out)
    edits = {"batch.max_size": args.batch, **bench._kv(args.sets)}
    topo = bench.copy_topology(args.topology, out, "hotpath", 4, edits)
    try:
        env = {"STREAMD_KAFKA_BOOTSTRAP": services.kafka, "STREAMD_REDIS_URL": services.redis_url,
               "STREAMD_BROKER_URL": services.broker_url, "STREAMD_ONNX_THREADS": str(args.onnx_threads)}
        settings = Settings.from_env(env)
        if settings.malloc_tuning:
            from streamd.memory import tune_malloc

            tune_malloc()  # as `streamd run` and `streamd worker` do
        ensure_topics(settings, topo.topics())
        t = load(topo.path, settings=settings)
        import redis

        r = redis.Redis.from_url(settings.redis_url)
        celery = make_celery(t, settings)
        with celery.connection_for_write() as conn:
            for q in celery.conf.task_queues:
                q(conn.default_channel).declare()
        publisher = Publisher(settings)
        node_env = t.node_env(settings)
        node_env.publisher = publisher
        nodes = t.build_nodes(node_env)
        p = plan(t, {n for n, node in nodes.items() if node.is_sink})
        store = RunStore(r, t.name, settings.frame_ttl_s)
        table: Timings = defaultdict(list)
        for name in ("admit", "frames", "outputs", "put_outputs_and_join", "finish", "dropped", "sinks_done",
                     "in_flight"):
            setattr(store, name, timed(table, f"redis: RunStore.{name}", getattr(store, name)))
        real_dispatch = Dispatcher(celery, t)
        pending: list[tuple[Any, Any]] = []

        def dispatch(stage: Any, batch: Any) -> None:
            real_dispatch(stage, batch)  # to RabbitMQ with a publisher confirm, as in production
            pending.append((stage, batch))

        timed_dispatch = timed(table, "rabbitmq: dispatch (send_task + confirm)", dispatch)
        for n, node in nodes.items():
            node.process_batch = timed(table, f"node: {n}", node.process_batch)  # type: ignore[method-assign]
        dlq = DeadLetterSink(t.name, t.sinks["dead_letter"].topic, publisher)
        ingestor = Ingestor(topology=t, plan=p, store=store, dispatch=timed_dispatch, dead_letters=dlq)
        executor = StageExecutor(topology=t.name, plan=p, nodes=nodes, store=store, dead_letters=dlq,
                                 dispatch=timed_dispatch, shedding_topics=t.shedding_topics(),
                                 in_process=in_process(p, t, args.queues.split(",")))
        executor.setup()
        from streamd.runs import Batch

        frames = bench.Frames(min(256, args.frames), seed=args.seed, cameras=8)
        stage_cpu: Timings = defaultdict(list)
        total_cpu = total_wall = 0.0
        offset = 0
        n_batches = 0
        for start in range(0, args.frames + args.batch * 4, args.batch):
            warm = start < args.batch * 4  # the first 4 batches warm up, not counted
            msgs = [InMessage(topo.source, 0, offset + k, frames.source(start + k).encode(),
                              frames.message(start + k, time.time())) for k in range(args.batch)]
            offset += args.batch
            c0, w0 = time.process_time(), time.perf_counter()
            ingestor.handle(msgs)
            ingest_cpu = time.process_time() - c0
            while pending:
                stage, batch = pending.pop(0)
                batch = Batch.from_message(json.loads(json.dumps(batch.message())))  # as Celery's JSON does
                s0 = time.process_time()
                executor.run(stage.id, batch, final_attempt=True)
                if not warm:
                    stage_cpu[stage.id].append(time.process_time() - s0)
            if warm:
                table.clear()
                continue
            stage_cpu["(daemon) Ingestor.handle"].append(ingest_cpu)
            total_cpu += time.process_time() - c0
            total_wall += time.perf_counter() - w0
            n_batches += 1
        n = n_batches * args.batch
        lines = [bench.machine_line(bench.machine()),
                 f"hot path of {args.topology.name}: {n} frames in batches of {args.batch} "
                 f"({', '.join(f'{k}={v}' for k, v in edits.items())}; a worker on {args.queues}); stages: "
                 + "; ".join(f"{s.id}[{s.queue}]={'+'.join(s.nodes)}" for s in p.stages.values()),
                 f"total: CPU {total_cpu / n * 1e6:.0f} us/frame, wall {total_wall / n * 1e6:.0f} us/frame "
                 f"(one process, everything in series)",
                 "per stage (CPU us/frame, this process): " + ", ".join(
                     f"{k} {sum(v) / n * 1e6:.0f}" for k, v in stage_cpu.items())]
        lines.append(f"{'operation':48s} {'calls/batch':>11s} {'CPU us/frame':>12s} {'wall us/frame':>13s}")
        rows = sorted(((k, v) for k, v in table.items() if not k.endswith("\x00wall")), key=lambda kv: -sum(kv[1]))
        for k, v in rows:
            wall = table[k + "\x00wall"]
            lines.append(f"{k:48s} {len(v) / n_batches:11.1f} {sum(v) / n * 1e6:12.0f} {sum(wall) / n * 1e6:13.0f}")
        node_cpu = sum(sum(v) for k, v in table.items() if k.startswith("node: ") and not k.endswith("\x00wall"))
        lines.append(f"Nodes (the work an inline consumer does too): CPU {node_cpu / n * 1e6:.0f} us/frame; "
                     f"everything else (streamd's overhead in this process): "
                     f"{(total_cpu - node_cpu) / n * 1e6:.0f} us/frame")
        text = "\n".join(lines)
        print(text)
        (out / f"hotpath-{args.batch}.txt").write_text(text + "\n")
        publisher.close()
        return 0
    finally:
        bench.cleanup_broker_and_redis(services, topo)
        services.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--frames", type=int, default=960)
    p.add_argument("--batch", type=int, default=16, help="batch.max_size (default 16)")
    p.add_argument("--onnx-threads", type=int, default=1)
    p.add_argument("--queues", default="cpu,gpu",
                   help="the queues one worker serves, as `streamd worker --queues` (default cpu,gpu: a child stage "
                        "on them runs in the same task); `cpu` or `gpu` dispatches every stage, as a worker per queue")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="topology edit (repeatable), e.g. fusion=false or nodes.ae_score.queue=gpu")
    p.add_argument("--topology", type=Path, default=bench.DEFAULT_TOPOLOGY)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--kafka", default="")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument("--out", type=Path, default=bench.REPO / "bench-out")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
