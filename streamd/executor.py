"""Runs one stage of the DAG for one batch of runs (the body of the Celery task).

1. Inputs: a root stage reads the raw inputs from Redis (claim check) and
   decodes them; a later stage reads its parent stages' outputs.
2. The stage's Nodes run in order, on the whole batch (``process_batch``).
   A Node that fails on the batch is retried run by run, so one bad input
   does not take its neighbours down: :class:`BadInput` dead-letters that run
   at once; any other exception makes the task retry (see :class:`Retry`),
   and once retries are spent the runs that still fail are dead-lettered
   with reason ``node_failed`` (``publish_failed`` for a sink).
3. The outputs that later stages read (the stage's exports) go to Redis,
   one value per Node; each child stage is dispatched (joins dispatch once
   all their parents are done); a sink stage ends the runs.
4. A child stage this worker serves too, whose only parent stage is this
   one (``in_process``, see :func:`streamd.dag.in_process`), runs right here
   on the outputs in memory instead: no Redis, no broker. If it fails, its
   inputs are stored and it is dispatched after all, to retry as a task.

A worker with more pool processes than compute slots (:mod:`streamd.gate`)
holds a slot while Nodes run and gives it back before the task waits: before
a sink Node, before storing outputs and dispatching, and when the task ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from . import tp
from .dag import Plan, Stage
from .deadletters import DeadLetter, DeadLetterSink
from .exceptions import BadInput, StreamdError
from .gate import NO_GATE, Gate
from .nodes.base import SOURCE, Node, RunContext
from .runs import Batch, RunStore
from .values import pack_value

__all__ = ["StageExecutor", "Retry"]

log = logging.getLogger(__name__)

#: dispatch(stage, batch) sends a stage task for a batch (a worker's returns once the broker has it; what it
#: returns is not used).
Dispatch = Callable[[Stage, Batch], object]


class Retry(Exception):
    """Some runs failed in a way that may pass on a later attempt."""

    def __init__(self, cause: BaseException, node: str) -> None:
        super().__init__(f"node {node!r}: {type(cause).__name__}: {cause}")
        self.cause = cause
        self.node = node


class StageExecutor:
    def __init__(self, *, topology: str, plan: Plan, nodes: Mapping[str, Node], store: RunStore,
                 dead_letters: DeadLetterSink, dispatch: Dispatch, metrics: Any = None,
                 shedding_topics: Collection[str] | None = None, in_process: Collection[str] = (),
                 gate: Gate = NO_GATE) -> None:
        """``shedding_topics``: the source topics whose runs may be shed while in flight
        (``Topology.shedding_topics``); a sink stage looks for their tombstones. None: look always.
        ``in_process``: the stages this process runs itself, right after their parent stage, instead of
        dispatching them (:func:`streamd.dag.in_process`). ``gate``: the worker's compute gate."""
        self.topology = topology
        self.gate = gate
        self.in_process = frozenset(in_process)
        self.shedding_topics = shedding_topics
        self.plan = plan
        self.nodes = nodes
        self.store = store
        self.dead_letters = dead_letters
        self.dispatch = dispatch
        self.metrics = metrics
        self._ready: set[str] = set()

    def setup(self, queues: Sequence[str] | None = None) -> None:
        """Load (and warm up) the Nodes of the stages on ``queues`` (all when None)."""
        for stage in self.plan.stages.values():
            if queues is None or stage.queue in queues:
                for n in stage.nodes:
                    self._node(n)

    def _node(self, node_id: str) -> Node:
        node = self.nodes[node_id]
        if node_id not in self._ready:
            node.setup()
            self._ready.add(node_id)
        return node

    # -- the task body -------------------------------------------------------------
    def run(self, stage_id: str, batch: Batch, *, final_attempt: bool, redelivered: bool = False) -> None:
        stage = self.plan.stages[stage_id]
        runs, inputs, letters = self._inputs(stage, batch)
        try:
            self._run(stage, batch, runs, inputs, letters, final_attempt=final_attempt, redelivered=redelivered)
        finally:
            self.gate.leave()

    def _run(self, stage: Stage, batch: Batch, runs: list[RunContext], inputs: list[dict[str, Any]],
             letters: list[DeadLetter], *, final_attempt: bool, redelivered: bool) -> None:
        if stage.has_sink and self._may_be_shed(runs):  # runs shed meanwhile already have their dead letter
            shed = self.store.dropped([r.run_id for r in runs])
            if shed:
                keep = [i for i, r in enumerate(runs) if r.run_id not in shed]
                runs, inputs = [runs[i] for i in keep], [inputs[i] for i in keep]
        # ``inputs[k]`` holds run k's values by Node id: the outside parents' outputs, then each Node's own
        for node_id, parents in zip(stage.nodes, stage.node_parents, strict=True):
            if not runs:
                break
            args = [{p: values[p] for p in parents} if parents else values for values in inputs]
            ok, outs, failed = self._call(node_id, runs, args, final_attempt=final_attempt)
            letters += failed
            if len(ok) != len(runs):
                kept = {r.run_id for r in ok}
                inputs = [v for r, v in zip(runs, inputs, strict=True) if r.run_id in kept]
            runs = ok
            for values, out in zip(inputs, outs, strict=True):
                values[node_id] = out
        here = [c for c in stage.children if c in self.in_process]
        sent = [c for c in stage.children if c not in self.in_process]
        ready: list[bool] = []
        if sent and runs:
            runs, inputs, ready, bad = self._store_outputs(stage, batch, runs, inputs, sent, redelivered)
            letters += bad
        self._dead_letter(batch, letters)
        if not runs:
            return
        alive = batch.only({r.run_id for r in runs})
        for child_id, go in zip(sent, ready, strict=True):
            if go:
                self.dispatch(self.plan.stages[child_id], alive)
        for child_id in here:
            self._run_here(stage, self.plan.stages[child_id], alive, runs, inputs, redelivered)
        if stage.has_sink and self.store.sinks_done(batch.batch_id, stage.id, len(self.plan.sink_stages)):
            self.store.finish(runs, forget=(batch.batch_id, self.plan.order, self.plan.exports))

    def _run_here(self, parent: Stage, child: Stage, batch: Batch, runs: list[RunContext],
                  inputs: list[dict[str, Any]], redelivered: bool) -> None:
        """Run ``child`` in this process on the parent's outputs as they are: no broker, no Redis. A
        failure gives it to its queue after all (outputs stored, task dispatched), where its retries
        and dead letters work as for any stage task."""
        values = [{n: v[n] for n in child.input_nodes} for v in inputs]
        try:
            self._run(child, batch, list(runs), values, [], final_attempt=False, redelivered=redelivered)
        except Exception as exc:  # noqa: BLE001 - handed to the broker, which retries it
            log.warning("stage %s failed in-process after %s (%s: %s); dispatching it to queue %s",
                        child.id, parent.id, type(exc).__name__, exc, child.queue,
                        extra={"stage": child.id, "topology": self.topology})
            self._count_in_process(child, "dispatched")
            runs, _, _, bad = self._store_outputs(parent, batch, runs, inputs, [child.id], redelivered)
            self._dead_letter(batch, bad)
            if runs:
                self.dispatch(child, batch.only({r.run_id for r in runs}))
            return
        self._count_in_process(child, "ran")

    # -- steps ---------------------------------------------------------------------
    def _store_outputs(self, stage: Stage, batch: Batch, runs: list[RunContext], inputs: list[dict[str, Any]],
                       children: Sequence[str], redelivered: bool
                       ) -> tuple[list[RunContext], list[dict[str, Any]], list[bool], list[DeadLetter]]:
        """Store the stage's exports for ``children`` and record it with their joins; returns the runs
        kept, their values, whether each child is ready, and dead letters for runs that cannot be stored.
        Gives the compute slot back first: Redis, then the broker, and another process computes meanwhile."""
        self.gate.leave()
        runs, inputs, packed, bad = self._pack_outputs(stage, runs, inputs)
        if not runs:
            return runs, inputs, [False] * len(children), bad
        counts = [(c, len(self.plan.stages[c].parents)) for c in children]
        ready = self.store.put_outputs_and_join(batch.batch_id, stage.id, packed, counts, redelivered=redelivered)
        return runs, inputs, ready, bad

    def _dead_letter(self, batch: Batch, letters: list[DeadLetter]) -> None:
        if letters:
            self.dead_letters.publish(letters)
            self.store.finish([r for r in batch.runs if r.run_id in {_run_id(d, batch) for d in letters}])

    def _count_in_process(self, stage: Stage, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.stages_in_process.labels(self.topology, stage.id, outcome).inc()

    def _may_be_shed(self, runs: Sequence[RunContext]) -> bool:
        if self.shedding_topics is None:
            return bool(runs)
        return any(r.origin.topic in self.shedding_topics for r in runs)

    def _pack_outputs(self, stage: Stage, runs: list[RunContext], inputs: list[dict[str, Any]]
                      ) -> tuple[list[RunContext], list[dict[str, Any]], dict[str, bytes], list[DeadLetter]]:
        """The stage's exported outputs, packed by Node; a run whose output cannot be stored is dead-lettered."""
        try:
            return runs, inputs, _pack(stage.exports, runs, inputs), []
        except TypeError:  # some Node output holds a type that cannot cross stages: find which runs
            letters, keep = [], []
            for k, (run, inp) in enumerate(zip(runs, inputs, strict=True)):
                failure = _unstorable(stage.exports, inp)
                if failure is None:
                    keep.append(k)
                    continue
                node, exc = failure
                letters.append(DeadLetter(run.origin, "node_failed", f"output of node {node!r} cannot "
                                          f"be stored for the next stage: {exc}", node, run.source))
            runs, inputs = [runs[k] for k in keep], [inputs[k] for k in keep]
            return runs, inputs, _pack(stage.exports, runs, inputs), letters

    def _inputs(self, stage: Stage, batch: Batch) -> tuple[list[RunContext], list[dict[str, Any]], list[DeadLetter]]:
        runs: list[RunContext] = []
        inputs: list[dict[str, Any]] = []
        letters: list[DeadLetter] = []
        missing: list[RunContext] = []
        if stage.is_root:
            for run, raw in zip(batch.runs, self.store.frames([r.run_id for r in batch.runs]), strict=True):
                if raw is None:
                    missing.append(run)
                    continue
                try:
                    msg = tp.decode(raw)
                except StreamdError as exc:  # validated at ingest; only a corrupted store gets here
                    letters.append(DeadLetter(run.origin, exc.reason, str(exc), stage.head, run.source))
                    continue
                runs.append(run)
                inputs.append({SOURCE: msg})
        else:
            outputs = self.store.outputs(batch.batch_id, stage.input_nodes)
            for run in batch.runs:
                if any(o is None for o in outputs):
                    missing.append(run)
                elif all(run.run_id in o for o in outputs if o is not None):
                    runs.append(run)
                    inputs.append({n: o[run.run_id] for n, o in zip(stage.input_nodes, outputs, strict=True)
                                   if o is not None})
                # else: a parent dead-lettered this run already
        if missing:
            settled = self.store.settled([r.run_id for r in missing])
            expired = [r for r in missing if r.run_id not in settled]
            for run in expired:
                letters.append(DeadLetter(
                    run.origin, "frame_expired",
                    f"payload of run {run.run_id} left Redis before stage {stage.id!r} ran "
                    f"(STREAMD_FRAME_TTL_S too short for the backlog, or Redis evicted it); the input is lost",
                    stage.head, run.source))
            if expired and self.metrics is not None:
                self.metrics.frames_expired.labels(self.topology).inc(len(expired))
        return runs, inputs, letters

    def _call(self, node_id: str, runs: list[RunContext], inputs: list[dict[str, Any]], *,
              final_attempt: bool) -> tuple[list[RunContext], list[Any], list[DeadLetter]]:
        node = self._node(node_id)
        if node.is_sink:
            self.gate.leave()  # a sink waits for its service (Kafka's acks): another process computes meanwhile
        else:
            self.gate.enter()
        t0 = time.perf_counter()
        try:
            outs = node.process_batch(runs, inputs)
            ok_runs = runs
            letters: list[DeadLetter] = []
        except Exception as batch_exc:  # isolate the failing run(s)
            if len(runs) == 1:
                ok_runs, outs, letters = self._one_by_one(node, runs, inputs, final_attempt, first=batch_exc)
            else:
                ok_runs, outs, letters = self._one_by_one(node, runs, inputs, final_attempt)
        if self.metrics is not None:
            self.metrics.node_duration.labels(self.topology, node_id).observe(time.perf_counter() - t0)
        return ok_runs, outs, letters

    def _one_by_one(self, node: Node, runs: list[RunContext], inputs: list[dict[str, Any]], final_attempt: bool,
                    first: BaseException | None = None) -> tuple[list[RunContext], list[Any], list[DeadLetter]]:
        ok_runs: list[RunContext] = []
        outs: list[Any] = []
        letters: list[DeadLetter] = []
        for run, inp in zip(runs, inputs, strict=True):
            try:
                if first is not None:
                    raise first
                out = node.process(run, inp)
            except BadInput as exc:
                letters.append(DeadLetter(run.origin, exc.reason, str(exc), node.node_id, run.source))
                continue
            except Exception as exc:
                if not final_attempt:
                    raise Retry(exc, node.node_id) from exc
                reason = exc.reason if isinstance(exc, StreamdError) and not isinstance(exc, BadInput) else None
                reason = reason if reason and reason != "internal_error" else (
                    "publish_failed" if node.is_sink else "node_failed")
                log.exception("node %s failed on %s after its retries", node.node_id, run.origin,
                              extra={"node": node.node_id, "origin": str(run.origin), "source": run.source,
                                     "topology": self.topology})
                letters.append(DeadLetter(run.origin, reason, f"{type(exc).__name__}: {exc} (retries spent)",
                                          node.node_id, run.source))
                continue
            ok_runs.append(run)
            outs.append(out)
        return ok_runs, outs, letters


def _pack(nodes: Sequence[str], runs: Sequence[RunContext], inputs: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    return {n: pack_value({r.run_id: i[n] for r, i in zip(runs, inputs, strict=True)}) for n in nodes}


def _unstorable(nodes: Sequence[str], values: Mapping[str, Any]) -> tuple[str, TypeError] | None:
    """The first of these Nodes whose output cannot be packed, with the error; None if all can."""
    for n in nodes:
        try:
            pack_value(values[n])
        except TypeError as exc:
            return n, exc
    return None


def _run_id(letter: DeadLetter, batch: Batch) -> str:
    for r in batch.runs:
        if r.origin == letter.origin:
            return r.run_id
    return ""
