"""streamd.dag: Nodes grouped into stages (operator chaining), joins and sink stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streamd.config import Settings
from streamd.dag import Plan, plan
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
    assert summary(shipped) == {
        "decode": (("decode", "preprocess"), "cpu"),
        "autoencoder": (("autoencoder",), "gpu"),
        "quality": (("quality",), "cpu"),
        "ae_score": (("ae_score", "combine", "publish"), "cpu"),
    }
    assert shipped.topology == "surface-inspection"
    assert shipped.order == ("decode", "autoencoder", "quality", "ae_score")


def test_shipped_root_is_decode_and_preprocess_fused(shipped):
    (root,) = shipped.roots()
    assert root.id == "decode"
    assert root.is_root
    assert root.input_nodes == ()
    assert root.parents == ()
    assert (root.head, root.tail) == ("decode", "preprocess")


def test_shipped_fan_out_after_preprocess(shipped):
    assert shipped.stages["decode"].children == ("autoencoder", "quality")
    assert shipped.stages["autoencoder"].parents == ("decode",)
    assert shipped.stages["autoencoder"].input_nodes == ("preprocess",)
    assert shipped.stages["quality"].input_nodes == ("preprocess",)
    assert shipped.stages["autoencoder"].children == ("ae_score",)


def test_shipped_gpu_model_is_its_own_stage(shipped):
    ae = shipped.stages["autoencoder"]
    assert ae.queue == "gpu"
    assert ae.nodes == ("autoencoder",)
    assert shipped.stages["ae_score"].queue == "cpu"


def test_shipped_join_at_combine_fused_into_the_model_branch(shipped):
    # combine joins the chain of its deepest parent (ae_score, behind the model); the stage then waits
    # for the quality stage too, and reads both outside parents' outputs
    last = shipped.stages["ae_score"]
    assert last.nodes == ("ae_score", "combine", "publish")
    assert last.parents == ("autoencoder", "quality")
    assert last.input_nodes == ("autoencoder", "quality")
    assert last.node_parents == (("autoencoder",), ("ae_score", "quality"), ("combine",))
    assert last.children == ()
    assert last.has_sink
    assert not last.is_root
    assert shipped.stages["quality"].children == ("ae_score",)


def test_shipped_sink_stages(shipped):
    assert shipped.sink_stages == ("ae_score",)
    assert [s for s in shipped.order if shipped.stages[s].has_sink] == ["ae_score"]


def test_stage_of(shipped):
    assert shipped.stage_of("preprocess").id == "decode"
    assert shipped.stage_of("publish").id == "ae_score"
    assert shipped.stage_of("autoencoder").id == "autoencoder"
    with pytest.raises(KeyError):
        shipped.stage_of("nope")


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


def test_fan_out_and_join(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "left": {"type": PASS, "parents": ["a"]},
        "right": {"type": PASS, "parents": ["a"]},
        "right2": {"type": PASS, "parents": ["right"]},
        "join": {"type": PASS, "parents": ["left", "right2"]},
        "out": {"type": SINK, "parents": ["join"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    # join extends the chain of its deepest parent (right2); its other parent's stage becomes a parent stage
    assert summary(p) == {
        "a": (("a",), "cpu"),
        "left": (("left",), "cpu"),
        "right": (("right", "right2", "join", "out"), "cpu"),
    }
    assert p.stages["a"].children == ("left", "right")
    assert p.stages["right"].parents == ("a", "left")
    assert p.stages["right"].input_nodes == ("a", "left")
    assert p.stages["left"].children == ("right",)


#: a -> left, right -> join -> out: a join whose two parents are equally deep
DIAMOND: dict[str, Any] = {
    "a": {"type": PASS},
    "left": {"type": PASS, "parents": ["a"]},
    "right": {"type": PASS, "parents": ["a"]},
    "join": {"type": PASS, "parents": ["left", "right"]},
    "out": {"type": SINK, "parents": ["join"]},
}


def test_join_with_equal_depths_extends_the_first_parent(tmp_path):
    p = make_plan(topo(tmp_path, DIAMOND))
    assert summary(p) == {"a": (("a",), "cpu"), "left": (("left", "join", "out"), "cpu"), "right": (("right",), "cpu")}
    assert p.stages["left"].node_parents == (("a",), ("left", "right"), ("join",))


def test_join_is_not_fused_into_a_parent_with_other_children_or_on_another_queue(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "left": {"type": PASS, "parents": ["a"]},
        "tap": {"type": SINK, "parents": ["left"]},  # left has two children: its chain ends there
        "right": {"type": PASS, "parents": ["a"], "queue": "gpu"},
        "join": {"type": PASS, "parents": ["left", "right"]},
        "out": {"type": SINK, "parents": ["join"]},
    }
    p = make_plan(topo(tmp_path, nodes))
    assert p.stages["join"].nodes == ("join", "out")
    assert p.stages["join"].parents == ("left", "right")
    assert p.stages["join"].input_nodes == ("left", "right")


def test_join_fusion_off_with_fusion_false(tmp_path):
    p = make_plan(topo(tmp_path, DIAMOND, fusion=False))
    assert p.stages["join"].parents == ("left", "right") and p.stages["join"].nodes == ("join",)


def test_several_sink_stages(tmp_path):
    nodes = {
        "a": {"type": PASS},
        "s1": {"type": SINK, "parents": ["a"]},
        "s2": {"type": SINK, "parents": ["a"]},
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
