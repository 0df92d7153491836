"""Run a ``streamd`` command with a *proposed* patch applied, to measure it before it lands.

    python benchmarks/shims.py --fetch-wait-ms 10 -- run TOPOLOGY.yaml

Used by ``bench.py --daemon-fetch-wait-ms``; the figures it gives are labelled as such. The
patch here is the one proposed for streamd/daemon.py in docs/performance.md: faust hard-codes
``fetch_max_wait_ms=1500`` for its aiokafka consumer (no faust setting reaches it), and a broker
that answers a parked fetch only at that deadline (the tansu broker of the demo and the tests
does) then holds every frame up to 1.5 s before the daemon sees it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def kafka_transport(app: Any, fetch_max_wait_ms: int) -> Any:
    """faust's aiokafka transport with ``fetch_max_wait_ms`` set: the patch has landed, so this is
    streamd's own (``STREAMD_KAFKA_FETCH_MAX_WAIT_MS``), kept as a shim for older trees' comparisons."""
    from streamd.daemon import _kafka_transport

    return _kafka_transport(app, fetch_max_wait_ms)


def patch_fetch_wait(max_wait_ms: int) -> None:
    """What the proposed streamd/daemon.py change does: ``app.transport = kafka_transport(app, ms)``
    right after ``faust.App(...)`` in ``Daemon._build_app`` (here: when faust first builds it).
    A streamd that has the change already gets STREAMD_KAFKA_FETCH_MAX_WAIT_MS instead."""
    import os

    import faust

    from streamd import daemon

    if hasattr(daemon, "_kafka_transport"):
        os.environ["STREAMD_KAFKA_FETCH_MAX_WAIT_MS"] = str(max_wait_ms)
        return

    faust.App._new_transport = lambda self: kafka_transport(self, max_wait_ms)  # type: ignore[method-assign]


def patch_busy_batching(busy_wait_ms: float, busy_runs: int = 1) -> None:
    """The daemon keeps gathering a batch past ``batch.max_wait_ms`` while the workers are busy.

    Today a batch is cut after ``max_wait_ms`` (5 ms) whatever the load, so at a steady offered rate
    batches hold one or two frames and every frame pays the whole per-task cost of every stage: the
    sustainable rate is a fraction of the backlog-drain rate. With this patch, when the window is over
    and a full batch (``batch.max_size`` runs) is already in flight, the flusher gathers for another
    window, up to ``busy_wait_ms`` in all: light load keeps its latency, heavy load gets full batches.
    "Busy" is ``busy_runs`` or more runs of the topic in flight (0 = a full batch).
    """
    import asyncio
    import inspect

    from streamd.daemon import Daemon

    if "busy_s" in inspect.signature(Daemon._flusher).parameters:
        print("shims: this streamd batches while busy already; set batch.busy_wait_ms in the topology instead",
              file=sys.stderr)
        return
    busy_s = busy_wait_ms / 1000.0

    async def _flusher(self: Any, topic: str, queue: Any, batch_max: int, wait_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            events = [await queue.get()]
            start = loop.time()
            deadline, last = start + wait_s, start + max(wait_s, busy_s)
            while len(events) < batch_max:
                now = loop.time()
                if now >= deadline:
                    if now >= last:
                        break
                    in_flight = await loop.run_in_executor(self.pool, self.store.in_flight, topic)
                    if in_flight < (busy_runs or batch_max):
                        break
                    deadline = min(loop.time() + max(wait_s, 0.002), last)
                    continue
                try:
                    events.append(await asyncio.wait_for(queue.get(), deadline - now))
                except TimeoutError:
                    pass
            await self._handoff(topic, events)

    Daemon._flusher = _flusher  # type: ignore[method-assign,assignment]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fetch-wait-ms", type=int, default=0)
    p.add_argument("--busy-batching-ms", type=float, default=0)
    p.add_argument("--busy-runs", type=int, default=1)
    p.add_argument("streamd_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.fetch_wait_ms:
        patch_fetch_wait(args.fetch_wait_ms)
    if args.busy_batching_ms:
        patch_busy_batching(args.busy_batching_ms, args.busy_runs)
    from streamd.cli import main as streamd_main

    argv = args.streamd_args[1:] if args.streamd_args[:1] == ["--"] else args.streamd_args
    return streamd_main(argv)


if __name__ == "__main__":
    sys.exit(main())
