"""streamd.executor: one stage for one batch, against a real Redis.

The Celery broker and Kafka are replaced by test doubles: ``dispatch`` records
(stage, batch) calls, and the dead-letter sink records the letters it is given.
The Nodes are test classes named by import string. Needs Redis at
STREAMD_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); skipped when none is reachable.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from streamd import tp
from streamd.config import Settings
from streamd.dag import Stage, in_process, plan
from streamd.deadletters import DeadLetter
from streamd.exceptions import BadInput
from streamd.executor import Retry, StageExecutor
from streamd.keys import Keys
from streamd.metrics import Metrics
from streamd.nodes.base import SOURCE, Node, Origin, RunContext
from streamd.runs import Batch, RunStore, member, run_id_for
from streamd.topology import load

REDIS_URL = os.environ.get("STREAMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TOPIC = "sensors.in"

#: What the sink Node received: (node id, run id, inputs by parent).
RECORDED: list[tuple[str, str, dict[str, Any]]] = []


class RecordingGate:
    """A compute gate for one process that records what the executor asks of it, and what the Nodes see."""

    def __init__(self) -> None:
        self.held = False
        self.log: list[str] = []

    def attach(self, index: int | None) -> None:
        pass

    def enter(self) -> None:
        if not self.held:
            self.held = True
            self.log.append("enter")

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.log.append("leave")


#: Set by a test: each Node call is logged in it as "<node id>:held" or "<node id>:free".
GATE: RecordingGate | None = None


def _probe(node_id: str) -> None:
    if GATE is not None:
        GATE.log.append(f"{node_id}:{'held' if GATE.held else 'free'}")


def _value(inputs: Any) -> int:
    if SOURCE in inputs:
        return int(inputs[SOURCE]["seq"])
    (value,) = inputs.values()
    return int(value)


class Double(Node):
    def process(self, run: RunContext, inputs: Any) -> Any:
        _probe(self.node_id)
        return _value(inputs) * 2


class RejectOdd(Node):
    """Passes even numbers; an odd one can never succeed."""

    def process(self, run: RunContext, inputs: Any) -> Any:
        value = _value(inputs)
        if value % 2:
            raise BadInput(f"odd input {value}", node=self.node_id)
        return value


class Flaky(Node):
    """Adds one; fails transiently (RuntimeError) for the runs whose seq is in ``params.fail_seqs``."""

    def __init__(self, node_id: str, params: Any, env: Any) -> None:
        super().__init__(node_id, params, env)
        self.fail_seqs = set(self.param("fail_seqs", [], kind=list))

    def process(self, run: RunContext, inputs: Any) -> Any:
        _probe(self.node_id)
        if run.seq in self.fail_seqs:
            raise RuntimeError(f"device busy on seq {run.seq}")
        return _value(inputs) + 1


class Recorder(Node):
    """A sink that records what it got instead of publishing to Kafka."""

    is_sink = True

    def process(self, run: RunContext, inputs: Any) -> Any:
        _probe(self.node_id)
        RECORDED.append((self.node_id, run.run_id, dict(inputs)))
        return None


class DeadLetters:
    """Stands in for DeadLetterSink (which publishes to Kafka)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def publish(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


#            check -> double ─┬─> left ──┬─> sink      stages: check[check, double], left, right, sink (join)
#                             └─> right ─┘             with fuse_join: check[check, double], left[left, sink], right
# left, right and sink run on a queue of their own, so that neither branch fuses into check's stage (fan-out).
def topology_yaml(name: str, fail_seqs: Sequence[int], fuse_join: bool = False) -> dict[str, Any]:
    mod = __name__
    return {
        "name": name,
        "sources": [{"topic": TOPIC, "kind": "reading"}],
        "sinks": {"results": {"topic": "out"}, "dead_letter": {"topic": "dlq"}},
        "nodes": {
            "check": {"type": f"{mod}:RejectOdd"},
            "double": {"type": f"{mod}:Double", "parents": ["check"]},
            "left": {"type": f"{mod}:Double", "parents": ["double"], "queue": "side"},
            "right": {"type": f"{mod}:Flaky", "parents": ["double"], "params": {"fail_seqs": list(fail_seqs)},
                      "queue": "side"},
            "sink": {"type": f"{mod}:Recorder", "parents": ["left", "right"], "fuse": fuse_join, "queue": "side"},
        },
    }


class Harness:
    def __init__(self, client: redis.Redis, tmp_path: Path, fail_seqs: Sequence[int] = (),
                 fuse_join: bool = False, queues: Sequence[str] = ()) -> None:
        self.client = client
        self.name = f"test-exec-{uuid.uuid4().hex[:10]}"
        path = tmp_path / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(topology_yaml(self.name, fail_seqs, fuse_join), sort_keys=False))
        settings = Settings()
        self.topology = load(path, settings=settings)
        nodes = self.topology.build_nodes(self.topology.node_env(settings))
        self.plan = plan(self.topology, {n for n, node in nodes.items() if node.is_sink})
        self.store = RunStore(client, self.name, 60.0)
        self.dead = DeadLetters()
        self.calls: list[tuple[str, Batch]] = []
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.executor = StageExecutor(topology=self.name, plan=self.plan, nodes=nodes, store=self.store,
                                      dead_letters=self.dead,  # type: ignore[arg-type]
                                      dispatch=self.dispatch, metrics=self.metrics,
                                      in_process=in_process(self.plan, self.topology, queues))

    def dispatch(self, stage: Stage, batch: Batch) -> None:
        self.calls.append((stage.id, batch))

    def run_for(self, seq: int) -> RunContext:
        origin = Origin(TOPIC, 0, 100 + seq)
        return RunContext(topology=self.name, run_id=run_id_for(self.name, origin), origin=origin, kind="reading",
                          source="pump1", seq=seq, ts=1795618807.0)

    def admit(self, seqs: Sequence[int]) -> Batch:
        runs = [self.run_for(s) for s in seqs]
        items = []
        for run in runs:
            msg = {"tp": 1, "kind": "reading", "source": "pump1", "seq": run.seq, "ts": 1795618807.0,
                   "rate_hz": 100.0, "unit": "g", "values": b"\x00\x00\x80\x3f"}
            items.append((run, tp.pack(msg)))
        self.store.admit(items)
        return Batch.of(runs)

    def drain(self, *, final_attempt: bool = True) -> None:
        """Run dispatched stages in order, as the Celery workers would."""
        while self.calls:
            stage_id, batch = self.calls.pop(0)
            self.executor.run(stage_id, batch, final_attempt=final_attempt)

    def seqs(self, batch: Batch) -> list[int]:
        return [r.seq for r in batch.runs]  # type: ignore[misc]

    def recorded(self) -> dict[int, dict[str, Any]]:
        by_id = {self.run_for(s).run_id: s for s in range(100)}
        return {by_id[rid]: inputs for node, rid, inputs in RECORDED if node == "sink" and rid in by_id}

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=f"streamd:{self.name}:*", count=1000))
        if keys:
            self.client.delete(*keys)


@pytest.fixture
def make(client: redis.Redis, tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def factory(fail_seqs: Sequence[int] = (), fuse_join: bool = False, queues: Sequence[str] = ()) -> Harness:
        h = Harness(client, tmp_path, fail_seqs, fuse_join, queues)
        made.append(h)
        return h

    RECORDED.clear()
    yield factory
    RECORDED.clear()
    for h in made:
        h.cleanup()


def test_plan_of_the_test_topology(make):
    h = make()
    assert {sid: s.nodes for sid, s in h.plan.stages.items()} == {
        "check": ("check", "double"), "left": ("left",), "right": ("right",), "sink": ("sink",)}
    assert h.plan.stages["sink"].parents == ("left", "right")


def test_plan_with_the_join_fused_into_a_branch(make):
    h = make(fuse_join=True)
    assert {sid: s.nodes for sid, s in h.plan.stages.items()} == {
        "check": ("check", "double"), "left": ("left", "sink"), "right": ("right",)}
    assert h.plan.stages["left"].parents == ("check", "right")


# -- root stage ------------------------------------------------------------------------------------


def test_root_stage_reads_frames_from_redis_and_fans_out(make):
    h = make()
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=False)
    assert h.dead.letters == []
    # fan-out: both children get the whole batch
    assert [(s, b.batch_id, h.seqs(b)) for s, b in h.calls] == [
        ("left", batch.batch_id, [2, 4, 6]), ("right", batch.batch_id, [2, 4, 6])]
    check, double = h.store.outputs(batch.batch_id, ["check", "double"])
    assert check is None  # only what a later stage reads is stored: the exported Node's output, per run
    assert double == {h.run_for(s).run_id: s * 2 for s in (2, 4, 6)}
    assert h.store.in_flight(TOPIC) == 3  # not finished before a sink


def test_bad_input_dead_letters_only_that_run(make):
    h = make()
    batch = h.admit([1, 2, 4])
    h.executor.run("check", batch, final_attempt=False)
    (letter,) = h.dead.letters
    assert letter.reason == "bad_input"
    assert letter.stage == "check"
    assert letter.origin == Origin(TOPIC, 0, 101)
    assert letter.source == "pump1"
    assert "odd input 1" in letter.detail
    # the others continue, in the same batch (same id, so the join still meets)
    assert [(s, b.batch_id, h.seqs(b)) for s, b in h.calls] == [
        ("left", batch.batch_id, [2, 4]), ("right", batch.batch_id, [2, 4])]
    # the dead-lettered run is finished: payload and in-flight slot freed
    assert h.store.in_flight(TOPIC) == 2
    assert h.store.frames([h.run_for(1).run_id]) == [None]
    h.drain()
    assert sorted(h.recorded()) == [2, 4]
    assert h.store.in_flight(TOPIC) == 0


def test_whole_batch_bad_dispatches_nothing(make):
    h = make()
    batch = h.admit([1, 3])
    h.executor.run("check", batch, final_attempt=False)
    assert [d.reason for d in h.dead.letters] == ["bad_input", "bad_input"]
    assert h.calls == []
    assert h.store.in_flight(TOPIC) == 0


# -- transient errors -------------------------------------------------------------------------------


def test_transient_error_raises_retry_when_not_final(make):
    h = make(fail_seqs=[4])
    batch = h.admit([2, 4])
    h.executor.run("check", batch, final_attempt=False)
    h.calls.clear()
    with pytest.raises(Retry) as info:
        h.executor.run("right", batch, final_attempt=False)
    assert info.value.node == "right"
    assert isinstance(info.value.cause, RuntimeError)
    assert "device busy on seq 4" in str(info.value)
    assert h.dead.letters == []
    assert h.calls == []
    assert h.store.in_flight(TOPIC) == 2  # nothing finished: the task will run again


def test_transient_error_single_run_raises_retry(make):
    h = make(fail_seqs=[2])
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=False)
    with pytest.raises(Retry):
        h.executor.run("right", batch, final_attempt=False)


def test_transient_error_dead_letters_node_failed_on_final_attempt(make):
    h = make(fail_seqs=[4])
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=True)
    h.calls.clear()
    h.executor.run("left", batch, final_attempt=True)
    assert h.calls == []  # the join waits for right
    h.executor.run("right", batch, final_attempt=True)
    (letter,) = h.dead.letters
    assert letter.reason == "node_failed"
    assert letter.stage == "right"
    assert letter.origin == h.run_for(4).origin
    assert "RuntimeError" in letter.detail and "retries spent" in letter.detail
    # the other runs go on to the join
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("sink", [2, 6])]
    assert h.store.in_flight(TOPIC) == 2
    h.drain()
    assert h.recorded() == {2: {"left": 8, "right": 5}, 6: {"left": 24, "right": 13}}
    assert h.store.in_flight(TOPIC) == 0


# -- expired and shed payloads ------------------------------------------------------------------------


def test_expired_payload_is_dead_lettered(make):
    h = make()
    batch = h.admit([2, 4])
    lost = h.run_for(2)
    h.client.delete(Keys(h.name).frame(lost.run_id))  # the TTL ran out
    h.executor.run("check", batch, final_attempt=False)
    (letter,) = h.dead.letters
    assert letter.reason == "frame_expired"
    assert letter.stage == "check"
    assert letter.origin == lost.origin
    assert "STREAMD_FRAME_TTL_S" in letter.detail
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("left", [4]), ("right", [4])]
    assert h.store.in_flight(TOPIC) == 1
    assert h.registry.get_sample_value("streamd_frames_expired_total", {"topology": h.name}) == 1


def test_expired_parent_output_is_dead_lettered(make):
    h = make()
    batch = h.admit([2, 4])
    h.executor.run("check", batch, final_attempt=False)
    h.client.delete(Keys(h.name).output(batch.batch_id, "double"))
    h.executor.run("left", batch, final_attempt=False)
    assert sorted(d.reason for d in h.dead.letters) == ["frame_expired", "frame_expired"]
    assert {d.stage for d in h.dead.letters} == {"left"}
    assert h.store.in_flight(TOPIC) == 0


def test_tombstoned_run_is_skipped_silently(make):
    h = make()
    shed = h.admit([8])
    dropped = h.store.pop_oldest(TOPIC, 1)  # the overload policy sheds it (the daemon dead-letters it)
    assert [rid for rid, _, _ in dropped] == [shed.runs[0].run_id]
    rest = h.admit([2, 4])
    batch = Batch.of([*shed.runs, *rest.runs])
    h.executor.run("check", batch, final_attempt=False)
    assert h.dead.letters == []
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("left", [2, 4]), ("right", [2, 4])]
    assert h.registry.get_sample_value("streamd_frames_expired_total", {"topology": h.name}) is None


def test_corrupted_payload_is_dead_lettered_with_its_protocol_reason(make):
    h = make()
    batch = h.admit([2])
    h.client.set(Keys(h.name).frame(batch.runs[0].run_id), b"\xc1 not msgpack")
    h.executor.run("check", batch, final_attempt=False)
    (letter,) = h.dead.letters
    assert letter.reason == "undecodable"
    assert h.calls == []


# -- the join and the sink ----------------------------------------------------------------------------


def test_join_dispatches_once(make):
    h = make()
    batch = h.admit([2, 4])
    h.executor.run("check", batch, final_attempt=False)
    h.calls.clear()
    h.executor.run("left", batch, final_attempt=False)
    assert h.calls == []
    h.executor.run("right", batch, final_attempt=False)
    assert [(s, b.batch_id, h.seqs(b)) for s, b in h.calls] == [("sink", batch.batch_id, [2, 4])]
    # a parent run again (a retry after the join completed) does not dispatch the join a second time
    h.executor.run("left", batch, final_attempt=False)
    assert len(h.calls) == 1


def test_join_redelivered_parent_dispatches_again(make):
    h = make()
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=False)
    h.calls.clear()
    h.executor.run("left", batch, final_attempt=False)
    h.executor.run("right", batch, final_attempt=False)
    h.executor.run("left", batch, final_attempt=False, redelivered=True)
    assert [s for s, _ in h.calls] == ["sink", "sink"]  # at-least-once: a join may run twice


def test_sink_stage_finishes_runs(make):
    h = make()
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=True)
    h.drain()
    assert h.recorded() == {
        2: {"left": 8, "right": 5},
        4: {"left": 16, "right": 9},
        6: {"left": 24, "right": 13},
    }
    assert h.dead.letters == []
    assert h.store.in_flight(TOPIC) == 0
    assert h.store.store_size() == (0, 0)
    assert h.store.frames([r.run_id for r in batch.runs]) == [None, None, None]
    # the batch's intermediate outputs are gone too
    assert h.store.outputs(batch.batch_id, list(h.plan.order)) == [None] * 4


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> RecordingGate:
    probe = RecordingGate()
    monkeypatch.setattr(f"{__name__}.GATE", probe)
    return probe


def test_nodes_compute_under_the_gate_and_the_task_waits_outside_it(make, gate):
    """A slot is held from the first Node to the stage's last, given back before storing outputs and
    dispatching, before a sink (which waits for its service), and when the task ends (streamd.gate)."""
    h = make()
    h.executor.gate = gate
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=True)
    assert gate.log == ["enter", "double:held", "leave"]  # check (RejectOdd) entered it; held until the outputs
    assert len(h.calls) == 2  # stored and dispatched after that
    gate.log.clear()
    h.drain()  # left, right, then the sink (a join)
    assert gate.log == ["enter", "left:held", "leave", "enter", "right:held", "leave", "sink:free"]
    assert h.recorded() == {2: {"left": 8, "right": 5}}


def test_a_failing_task_gives_its_slot_back(make, gate):
    h = make(fail_seqs=[2])
    h.executor.gate = gate
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=False)
    gate.log.clear()
    with pytest.raises(Retry):
        h.executor.run("right", batch, final_attempt=False)
    assert gate.log == ["enter", "right:held", "leave"]
    assert not gate.held


def test_an_in_process_stage_runs_on_its_parents_slot(make, gate):
    h = make(queues=("cpu", "side"))  # every stage on a served queue: the branches run in-process
    h.executor.gate = gate
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=True)
    # left runs here on the slot taken for check; each branch stores its outputs for the join without it
    assert gate.log == ["enter", "double:held", "left:held", "leave", "enter", "right:held", "leave"]
    gate.log.clear()
    h.drain()
    assert gate.log == ["sink:free"]


def test_fused_join_waits_for_its_outside_parent_and_reads_its_outputs(make):
    h = make(fuse_join=True)
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=True)
    # the stage [left, sink] is a join of check and right: it is not dispatched before right is done
    assert [s for s, _ in h.calls] == ["right"]
    h.drain()
    assert [s for s, _ in h.calls] == []
    # the same inputs as with the join in a stage of its own (test_sink_stage_finishes_runs)
    assert h.recorded() == {2: {"left": 8, "right": 5}, 4: {"left": 16, "right": 9}, 6: {"left": 24, "right": 13}}
    assert h.store.in_flight(TOPIC) == 0
    assert h.store.store_size() == (0, 0)
    assert h.store.outputs(batch.batch_id, list(h.plan.order)) == [None] * 3


def test_fused_join_skips_a_run_its_outside_parent_dead_lettered(make):
    h = make(fail_seqs=[4], fuse_join=True)
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=True)
    h.drain()  # right fails run 4 for good, then dispatches [left, sink]
    assert h.recorded() == {2: {"left": 8, "right": 5}, 6: {"left": 24, "right": 13}}
    assert len(h.dead.letters) == 1  # one outcome per run: no second letter, no result for run 4
    assert h.store.in_flight(TOPIC) == 0


def test_node_duration_is_observed(make):
    h = make()
    h.executor.run("check", h.admit([2]), final_attempt=False)
    for node in ("check", "double"):
        assert h.registry.get_sample_value("streamd_node_duration_seconds_count",
                                           {"topology": h.name, "node": node}) == 1


def test_setup_runs_once_per_node(make):
    h = make()
    calls: list[str] = []
    for node_id, node in h.executor.nodes.items():
        node.setup = lambda n=node_id: calls.append(n)  # type: ignore[method-assign]
    h.executor.setup(["cpu"])
    assert sorted(calls) == ["check", "double"]  # the stages on the queues asked for
    batch = h.admit([2])
    h.executor.run("check", batch, final_attempt=False)
    h.executor.run("left", batch, final_attempt=False)  # a Node not set up yet is set up when first used
    h.executor.run("check", batch, final_attempt=False)
    assert sorted(calls) == ["check", "double", "left"]


def test_run_shed_mid_dag_does_not_reach_the_sink(make):
    h = make()
    batch = h.admit([2, 4])
    h.executor.run("check", batch, final_attempt=False)
    shed = h.run_for(2)
    h.client.zadd(Keys(h.name).inflight(TOPIC), {member(shed): time.time() - 100}, xx=True)  # make it the oldest
    assert [rid for rid, _, _ in h.store.pop_oldest(TOPIC, 1)] == [shed.run_id]
    h.drain()
    assert sorted(h.recorded()) == [4]  # the daemon dead-lettered run 2 as dropped: no result besides
    assert h.dead.letters == []
    assert h.store.in_flight(TOPIC) == 0


def test_sink_stage_skips_the_tombstone_lookup_where_no_source_sheds_in_flight_runs(make):
    h = make()
    assert h.topology.shedding_topics() == frozenset()  # overload: block
    h.executor.shedding_topics = h.topology.shedding_topics()

    def no_lookup(run_ids):
        raise AssertionError("a sink stage of a topology without drop_oldest read tombstones")

    h.store.dropped = no_lookup  # type: ignore[method-assign]
    h.executor.run("check", h.admit([2, 4]), final_attempt=False)
    h.drain()
    assert sorted(h.recorded()) == [2, 4]
    h.executor.shedding_topics = frozenset({TOPIC})
    h.executor.run("check", h.admit([6]), final_attempt=False)
    with pytest.raises(AssertionError, match="tombstones"):
        h.drain()


# -- known problems ------------------------------------------------------------------------------------


def test_redelivered_sink_task_after_success_sends_no_dead_letters(make):
    h = make()
    batch = h.admit([2, 4])
    h.executor.run("check", batch, final_attempt=True)
    h.drain()
    assert sorted(h.recorded()) == [2, 4]
    # the worker died after the sink finished the runs but before Celery got the ack: the task comes back
    h.executor.run("sink", batch, final_attempt=True, redelivered=True)
    assert h.dead.letters == []


# -- stages run in-process (a worker that serves the child's queue too) -----------------------------


def _in_process_count(h: Harness, stage: str, outcome: str) -> float | None:
    return h.registry.get_sample_value("streamd_stages_in_process_total",
                                       {"topology": h.name, "stage": stage, "outcome": outcome})


def test_branches_on_a_served_queue_run_in_process_and_only_the_join_is_dispatched(make):
    h = make(queues=("cpu", "side"))
    assert h.executor.in_process == {"left", "right"}  # the join waits for two stages: always a task
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=False)
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("sink", [2, 4, 6])]
    # check's output was handed over in memory: only what the dispatched join reads is in Redis
    assert h.store.outputs(batch.batch_id, ["double"]) == [None]
    assert h.store.outputs(batch.batch_id, ["left", "right"])[0] == {h.run_for(s).run_id: s * 4 for s in (2, 4, 6)}
    h.drain()
    # the same records as with every stage a task of its own (test_sink_stage_finishes_runs)
    assert h.recorded() == {2: {"left": 8, "right": 5}, 4: {"left": 16, "right": 9}, 6: {"left": 24, "right": 13}}
    assert h.store.in_flight(TOPIC) == 0
    assert h.store.store_size() == (0, 0)
    assert h.store.outputs(batch.batch_id, list(h.plan.order)) == [None] * 4
    assert _in_process_count(h, "left", "ran") == _in_process_count(h, "right", "ran") == 1


def test_a_stage_failing_in_process_is_dispatched_to_its_queue_with_its_inputs(make):
    h = make(fail_seqs=[4], queues=("cpu", "side"))
    batch = h.admit([2, 4, 6])
    h.executor.run("check", batch, final_attempt=False)  # right raises for run 4: no Retry escapes
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("right", [2, 4, 6])]
    assert h.store.outputs(batch.batch_id, ["double"])[0] == {h.run_for(s).run_id: s * 2 for s in (2, 4, 6)}
    assert _in_process_count(h, "right", "dispatched") == 1
    with pytest.raises(Retry):  # the task's own retries, as for any stage task
        h.executor.run("right", batch, final_attempt=False)
    h.drain(final_attempt=True)
    assert h.recorded() == {2: {"left": 8, "right": 5}, 6: {"left": 24, "right": 13}}
    assert [(d.reason, d.stage) for d in h.dead.letters] == [("node_failed", "right")]
    assert h.store.in_flight(TOPIC) == 0


def test_a_stage_failing_in_process_stores_its_inputs_without_the_slot(make, gate):
    h = make(fail_seqs=[4], queues=("cpu", "side"))
    h.executor.gate = gate
    store = h.store.put_outputs_and_join

    def probed(batch_id: str, stage: str, *args: Any, **kwargs: Any) -> list[bool]:
        _probe(f"store {stage}")
        return store(batch_id, stage, *args, **kwargs)

    h.store.put_outputs_and_join = probed  # type: ignore[method-assign]
    h.executor.run("check", h.admit([2, 4]), final_attempt=False)
    # left stores for the join without the slot; right fails (the batch, then run by run) and check's outputs
    # are stored for right's task without it too
    assert [e for e in gate.log if e.startswith(("store", "enter", "leave"))] == [
        "enter", "leave", "store left:free", "enter", "leave", "store check:free"]
    assert not gate.held
    assert [s for s, _ in h.calls] == ["right"]


def test_bad_input_in_an_in_process_stage_dead_letters_only_that_run(make):
    h = make(queues=("cpu", "side"), fuse_join=True)  # stages check, right (in-process), [left, sink] (a join)
    assert h.executor.in_process == {"right"}
    batch = h.admit([1, 2])
    h.executor.run("check", batch, final_attempt=True)
    assert [d.reason for d in h.dead.letters] == ["bad_input"]  # check rejected run 1 before the branches
    assert [(s, h.seqs(b)) for s, b in h.calls] == [("left", [2])]
    h.drain()
    assert h.recorded() == {2: {"left": 8, "right": 5}}
    assert h.store.in_flight(TOPIC) == 0
