"""The ``streamd`` command line (also ``python -m streamd``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import Settings
from .exceptions import StreamdError

__all__ = ["main"]

log = logging.getLogger("streamd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamd", description="Kafka-native stream processing for anomaly detection.")
    p.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the embedded demo: broker, workers, daemon and synthetic cameras")
    d.add_argument("--frames", type=int, default=0,
                   help="stop after this many frames (default: run until Ctrl-C or SIGTERM)")
    d.add_argument("--cameras", type=int, default=3, help="number of synthetic cameras (default 3)")
    d.add_argument("--fps", type=float, default=10.0, help="frames per second per camera (default 10)")
    d.add_argument("--defect-rate", type=float, default=0.1, help="share of frames with a defect (default 0.1)")
    d.add_argument("--topology", default=None, help="topology file (default: the packaged surface-inspection)")

    r = sub.add_parser("run", help="the ingest daemon for one topology")
    r.add_argument("topology", help="topology YAML file")

    w = sub.add_parser("worker", help="a Celery worker serving some of a topology's queues")
    w.add_argument("topology", help="topology YAML file")
    w.add_argument("--queues", "-Q", default="", help="comma-separated queues (default: all of the topology's)")
    w.add_argument("--pool", choices=("prefork", "solo", "threads"), default=None,
                   help="Celery pool (default prefork; solo measured ~6x slower, docs/performance.md)")
    w.add_argument("--concurrency", "-c", type=int, default=None,
                   help="processes (default: 1 when serving gpu on a GPU, else one per core plus one, one per core "
                        "computing at a time: STREAMD_WORKER_COMPUTE_SLOTS)")

    v = sub.add_parser("validate", help="check a topology; errors name the Node and the YAML path")
    v.add_argument("topology", nargs="+", help="topology YAML file(s)")

    t = sub.add_parser("tp", help="TP v1 tools")
    tsub = t.add_subparsers(dest="tp_command", required=True, metavar="TP_COMMAND")
    from . import tptool

    tptool.add_subcommands(tsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        from .logs import setup_logging

        setup_logging(settings.log_level, settings.log_format)
        return _dispatch(args, settings)
    except StreamdError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from . import topology as topo_mod

    if args.command == "validate":
        for path in args.topology:
            t = topo_mod.load(path, settings=settings)
            from .dag import plan
            from .nodes.base import resolve

            sinks = {n for n, spec in t.nodes.items() if resolve(spec.type).is_sink}
            p = plan(t, sinks)
            stages = "; ".join(f"{s.id}[{s.queue}]: {' -> '.join(s.nodes)}" for s in p.stages.values())
            print(f"{path}: ok: topology {t.name!r}, {len(t.nodes)} nodes, queues {', '.join(t.queues())}; "
                  f"stages: {stages}")
        return 0
    if args.command == "tp":
        return int(args.func(args))
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args, settings)
    topology = topo_mod.load(args.topology, settings=settings)
    if settings.malloc_tuning:
        from .memory import tune_malloc

        tune_malloc()
    if args.command == "run":
        from .daemon import Daemon

        return Daemon(topology, settings).run()
    if args.command == "worker":
        from .worker import run_worker
        from .workermetrics import worker_metrics

        queues = [q.strip() for q in args.queues.split(",") if q.strip()] or topology.queues()
        metrics = worker_metrics(topology, settings, queues)
        return run_worker(topology, settings, queues, pool=args.pool, concurrency=args.concurrency, metrics=metrics)
    raise AssertionError(args.command)
