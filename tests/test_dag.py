"""streamd.dag: Nodes grouped into stages (operator chaining), joins and sink stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streamd.config import Settings
from streamd.dag import Plan, in_process, plan
from streamd.nodes.base import Node, resolve
from streamd.topology import Topology, load

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "topologies" / "surface-inspection.yaml"
SETTINGS = Settings()


class Pass(Node):
    def process(self, run, inputs):
        return next(iter(inputs.values()))


class Sink(Node):
    is_sink = True

    def process(self, run, inputs):
        return None


PASS = "tests.test_dag:Pass"
SINK = "tests.test_dag:Sink"


def sink_nodes(t: Topology) -> set[str]:
    return {n for n, spec in t.nodes.items() if resolve(spec.type).is_sink}


def make_plan(t: Topology, **kw: Any) -> Plan:
    return plan(t, sink_nodes(t), **kw)


def topo(tmp_path: Path, nodes: dict[str, Any], **top: Any) -> Topology:
    data = {
        "name": "dag-test",
        "sources": [{"topic": "in", "kind": "reading"}],
        "sinks": {"results": {"topic": "out"}, "dead_letter": {"topic": "dlq"}},
        "nodes": nodes,
        **top,
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load(path, settings=SETTINGS)


def summary(p: Plan) -> dict[str, tuple[tuple[str, ...], str]]:
    return {sid: (s.nodes, s.queue) for sid, s in p.stages.items()}


# -- the shipped topology ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Plan:
    return make_plan(load(SHIPPED, settings=SETTINGS))


def test_shipped_stages(shipped):
    # two tasks per batch: the cpu work, then the model and its post-processing on the gpu queue
    assert summary(shipped) == {
        "decode": (("decode", "preprocess", "quality"), "cpu"),
        "autoencoder": (("autoencoder", "ae_score", "combine", "publish"), "gpu"),
    }
    assert shipped.topology == "surface-inspection"
    assert shipped.order == ("decode", "autoencoder")


def test_shipped_root_fuses_decode_preprocess_and_the_quality_branch(shipped):
    (root,) = shipped.roots()
    assert root.id == "decode"
    assert root.is_root
    assert root.input_nodes == ()
    assert root.parents == ()
    assert (root.head, root.nodes[-1]) == ("decode", "quality")
    assert root.node_parents == ((), ("decode",), ("preprocess",))  # quality: fan-out fusion after preprocess
    assert root.children == ("autoencoder",)
    assert root.exports == ("preprocess", "quality")  # the model's input and the quality verdict cross Redis


def test_shipped_model_stage_reads_both_exports_and_publishes(shipped):
    last = shipped.stages["autoencoder"]
    assert last.queue == "gpu"
    assert last.parents == ("decode",)
    assert last.input_nodes == ("preprocess", "quality")
    assert last.node_parents == (("preprocess",), ("autoencoder",), ("ae_score", "quality"), ("combine",))
    assert last.children == ()
    assert last.exports == ()  # the anomaly maps never leave the gpu worker
    assert last.has_sink
    assert not last.is_root
    assert shipped.exports == ("preprocess", "quality")


def test_shipped_sink_stages(shipped):
    assert shipped.sink_stages == ("autoencoder",)


def test_shipped_without_fusion():
    t = load(SHIPPED, settings=SETTINGS)
    p = make_plan(t, fusion=False)
    assert all(s.nodes == (sid,) for sid, s in p.stages.items())
    assert set(p.stages) == set(t.nodes)
    assert p.stages["preprocess"].parents == ("decode",)
    assert p.stages["publish"].parents == ("combine",)
    assert p.sink_stages == ("publish",)


# -- fusion switches ------------------------------------------------------------------------------


CHAIN: dict[str, Any] = {
    "a": {"type": PASS},
    "b": {"type": PASS, "parents": ["a"]},
    "c": {"type": PASS, "parents": ["b"]},
    "out": {"type": SINK, "parents": ["c"]},
}


def test_a_chain_on_one_queue_is_one_stage(tmp_path):
    p = make_plan(topo(tmp_path, CHAIN))
    assert summary(p) == {"a": (("a", "b", "c", "out"), "cpu")}
    assert p.sink_stages == ("a",)
    stage = p.stages["a"]
    assert stage.is_root and stage.has_sink and stage.children == ()


def test_topology_fusion_false(tmp_path):
    p = make_plan(topo(tmp_path, CHAIN, fusion=False))
    assert list(p.stages) == ["a", "b", "c", "out"]
    assert all(len(s.nodes) == 1 for s in p.stages.values())
    assert p.stages["b"].parents == ("a",) and p.stages["b"].children == ("c",)
    assert p.stages["b"].input_nodes == ("a",)
    assert p.sink_stages == ("out",)


def test_plan_fusion_argument_overrides_topology(tmp_path):
    t = topo(tmp_path, CHAIN, fusion=False)
    assert len(make_plan(t, fusion=True).stages) == 1
    t2 = topo(tmp_path, CHAIN)
    assert len(make_plan(t2, fusion=False).stages) == 4


def test_node_fuse_false_starts_a_new_stage_and_ends_the_previous(tmp_path):
    nodes = {**CHAIN, "b": {"type": PASS, "parents": ["a"], "fuse": False}}
    p = make_plan(topo(tmp_path, nodes))
    # b may not join a's chain, and c may not join b's (b opts out of fusion entirely)
    assert summary(p) == {"a": (("a",), "cpu"), "b": (("b",), "cpu"), "c": (("c", "out"), "cpu")}
    assert p.stages["c"].parents == ("b",)
    assert p.stages["c"].input_nodes == ("b",)


def test_queue_change_breaks_a_chain(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "b": {"type": PASS, "parents": ["a"]},
        "m": {"type": PASS, "parents": ["b"], "queue": "gpu"},
        "m2": {"type": PASS, "parents": ["m"], "queue": "gpu"},
        "c": {"type": PASS, "parents": ["m2"]},
        "out": {"type": SINK, "parents": ["c"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert summary(p) == {
        "a": (("a", "b"), "cpu"),
        "m": (("m", "m2"), "gpu"),
        "c": (("c", "out"), "cpu"),
    }
    assert p.stages["m"].parents == ("a",) and p.stages["m"].children == ("c",)
    assert p.stages["m"].input_nodes == ("b",)


def test_fan_out_and_join_on_one_queue_fuse_into_one_stage(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "left": {"type": PASS, "parents": ["a"]},
        "right": {"type": PASS, "parents": ["a"]},
        "right2": {"type": PASS, "parents": ["right"]},
        "join": {"type": PASS, "parents": ["left", "right2"]},
        "out": {"type": SINK, "parents": ["join"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert summary(p) == {"a": (("a", "left", "right", "right2", "join", "out"), "cpu")}
    assert p.stages["a"].node_parents == ((), ("a",), ("a",), ("right",), ("left", "right2"), ("join",))
    assert p.stages["a"].exports == ()


#: a -> left, right -> join -> out, with the two branches on queues of their own
DIAMOND: dict[str, Any] = {
    "a": {"type": PASS},
    "left": {"type": PASS, "parents": ["a"], "queue": "side"},
    "right": {"type": PASS, "parents": ["a"], "queue": "side"},
    "join": {"type": PASS, "parents": ["left", "right"], "queue": "side"},
    "out": {"type": SINK, "parents": ["join"], "queue": "side"},
}


def test_join_with_equal_depths_extends_the_first_parent(tmp_path):
    p = make_plan(topo(tmp_path, DIAMOND))
    # left and right cannot fan out of a (another queue) nor into each other (their parent is not there)
    assert summary(p) == {"a": (("a",), "cpu"), "left": (("left", "join", "out"), "side"),
                          "right": (("right",), "side")}
    assert p.stages["left"].node_parents == (("a",), ("left", "right"), ("join",))
    assert p.stages["left"].parents == ("a", "right")
    assert p.stages["a"].exports == ("a",)


def test_fan_out_fuses_siblings_and_exports_each_output_read_elsewhere(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "b": {"type": PASS, "parents": ["a"]},
        "m": {"type": PASS, "parents": ["b"], "queue": "gpu"},
        "q": {"type": PASS, "parents": ["b"]},  # fan-out: its only parent is in a's stage
        "j": {"type": PASS, "parents": ["m", "q"], "queue": "gpu"},
        "out": {"type": SINK, "parents": ["j"], "queue": "gpu"},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert summary(p) == {"a": (("a", "b", "q"), "cpu"), "m": (("m", "j", "out"), "gpu")}
    assert p.stages["a"].exports == ("b", "q")
    assert p.stages["m"].input_nodes == ("b", "q")
    assert p.stages["m"].parents == ("a",)


def test_a_join_is_not_fused_where_its_stage_would_wait_for_itself(tmp_path):
    # j's parents: q (the last Node of a's stage, j its only child) and n, behind the gpu stage that a's
    # stage feeds. Fused into a's stage, j would make that stage wait for the gpu stage, which waits for it.
    nodes = {
        "a": {"type": PASS},
        "b": {"type": PASS, "parents": ["a"]},
        "m": {"type": PASS, "parents": ["b"], "queue": "gpu"},
        "n": {"type": PASS, "parents": ["m"], "queue": "gpu"},
        "q": {"type": PASS, "parents": ["b"]},
        "j": {"type": PASS, "parents": ["n", "q"]},
        "out": {"type": SINK, "parents": ["j"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert summary(p) == {"a": (("a", "b", "q"), "cpu"), "m": (("m", "n"), "gpu"), "j": (("j", "out"), "cpu")}
    assert p.stages["j"].parents == ("m", "a")
    assert p.stages["a"].children == ("m", "j")


def test_fan_out_respects_fuse_false(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "s1": {"type": SINK, "parents": ["a"]},
        "s2": {"type": SINK, "parents": ["a"], "fuse": False},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert summary(p) == {"a": (("a", "s1"), "cpu"), "s2": (("s2",), "cpu")}


def test_join_is_not_fused_into_a_parent_with_other_children_or_on_another_queue(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "left": {"type": PASS, "parents": ["a"]},
        "tap": {"type": SINK, "parents": ["left"]},  # left has two children: no chain goes on from it
        "right": {"type": PASS, "parents": ["a"], "queue": "gpu"},
        "join": {"type": PASS, "parents": ["left", "right"]},
        "out": {"type": SINK, "parents": ["join"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert p.stages["a"].nodes == ("a", "left", "tap")  # left and tap fan out into a's stage
    assert p.stages["join"].nodes == ("join", "out")
    assert p.stages["join"].parents == ("a", "right")
    assert p.stages["join"].input_nodes == ("left", "right")


def test_join_fusion_off_with_fusion_false(tmp_path):
    p = make_plan(topo(tmp_path, DIAMOND, fusion=False))
    assert p.stages["join"].parents == ("left", "right") and p.stages["join"].nodes == ("join",)


def test_several_sink_stages(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "s1": {"type": SINK, "parents": ["a"], "queue": "io"},
        "s2": {"type": SINK, "parents": ["a"], "queue": "io"},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert p.sink_stages == ("s1", "s2")
    assert not p.stages["a"].has_sink
    assert p.stages["a"].children == ("s1", "s2")


def test_sink_nodes_argument_decides_has_sink(tmp_path):
    t = topo(tmp_path, CHAIN, fusion=False)
    p = plan(t, {"c", "out"})
    assert p.sink_stages == ("c", "out")
    assert plan(t, set()).sink_stages == ()


# -- stages a worker runs in-process ------------------------------------------------------------


def test_a_worker_serving_both_queues_runs_the_shipped_model_stage_in_process(shipped):
    t = load(SHIPPED, settings=SETTINGS)
    assert in_process(shipped, t, ("cpu", "gpu")) == {"autoencoder"}
    assert in_process(shipped, t, ("gpu",)) == set()  # its parent stage runs on another worker
    assert in_process(shipped, t, ("cpu",)) == set()
    assert in_process(make_plan(t, fusion=False), t, ("cpu", "gpu")) == set()


def test_in_process_follows_single_parent_stages_on_served_queues_and_fuse(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "m": {"type": PASS, "parents": ["a"], "queue": "gpu"},
        "c": {"type": PASS, "parents": ["m"]},
        "j": {"type": PASS, "parents": ["c", "m"], "queue": "side"},
        "out": {"type": SINK, "parents": ["j"], "queue": "side"},
    }
    t = topo(tmp_path, nodes)
    p = make_plan(t)
    assert {sid: s.parents for sid, s in p.stages.items()} == {
        "a": (), "m": ("a",), "c": ("m",), "j": ("c", "m")}
    assert in_process(p, t, ("cpu", "gpu", "side")) == {"m", "c"}  # j is a join: always a task
    assert in_process(p, t, ("cpu", "side")) == set()
    t = topo(tmp_path, {**nodes, "c": {"type": PASS, "parents": ["m"], "fuse": False}})
    assert in_process(make_plan(t), t, ("cpu", "gpu", "side")) == {"m"}
