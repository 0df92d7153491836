"""streamd.topology: loading and checking topology YAML files; ``streamd validate``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamd.cli import main
from streamd.config import Settings
from streamd.exceptions import StreamdError, TopologyError
from streamd.nodes.base import Node
from streamd.topology import Topology, load

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "topologies" / "surface-inspection.yaml"
SETTINGS = Settings()


class MyNode(Node):
    """A plant's own Node class, named in a topology by import string."""

    def process(self, run, inputs):
        return next(iter(inputs.values()))


class MySink(Node):
    is_sink = True

    def process(self, run, inputs):
        return None


NOT_A_NODE = object()

BASE: dict[str, Any] = {
    "name": "unit-topo",
    "sources": [{"topic": "cams.frames", "kind": "frame"}],
    "sinks": {
        "results": {"topic": "unit.results"},
        "anomalies": {"topic": "unit.anomalies"},
        "dead_letter": {"topic": "unit.dlq"},
    },
    "nodes": {
        "decode": {"type": "image.decode"},
        "preprocess": {"type": "image.preprocess", "parents": ["decode"], "params": {"size": [64, 64]}},
        "quality": {"type": "image.quality", "parents": ["preprocess"]},
        "publish": {"type": "kafka.sink", "parents": ["quality"]},
    },
}


def write(tmp_path: Path, data: Any, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def load_error(tmp_path: Path, data: Any) -> TopologyError:
    path = write(tmp_path, data)
    with pytest.raises(TopologyError) as info:
        load(path, settings=SETTINGS)
    err = info.value
    assert str(path) in str(err), "the error names the file"
    assert err.file == str(path)
    assert isinstance(err, StreamdError)
    return err


# -- the shipped topology ---------------------------------------------------------------


def test_loads_the_shipped_topology():
    t = load(SHIPPED, settings=SETTINGS)
    assert isinstance(t, Topology)
    assert t.name == "surface-inspection"
    assert t.order == ("decode", "preprocess", "autoencoder", "quality", "ae_score", "combine", "publish")
    assert t.roots() == ["decode"]
    assert t.children("preprocess") == ["autoencoder", "quality"]
    assert t.nodes["combine"].parents == ("ae_score", "quality")
    assert t.nodes["autoencoder"].queue == "gpu"
    assert t.queues() == ["cpu", "gpu"]
    assert t.celery_queue("gpu") == "streamd.surface-inspection.gpu"
    assert t.group_id == "streamd-surface-inspection"
    assert t.fusion is True
    assert (t.batch_max, t.batch_wait_ms) == (32, 5.0)
    src = t.source("cameras.frames")
    assert (src.kind, src.partitions, src.max_in_flight, src.overload) == ("frame", 3, 256, "block")
    assert src.max_message_bytes == 8388608
    assert set(t.sinks) == {"results", "anomalies", "dead_letter"}
    assert t.all_topics() == {"cameras.frames": 3, "inspection.results": 3, "inspection.anomalies": 3,
                              "streamd.dlq": 3}
    assert t.base_dir == SHIPPED.parent.resolve()


def test_defaults_of_a_minimal_topology(tmp_path):
    t = load(write(tmp_path, base()), settings=SETTINGS)
    spec = t.nodes["decode"]
    assert (spec.queue, spec.parents, spec.retries, spec.fuse, dict(spec.params)) == ("cpu", (), 2, True, {})
    src = t.sources[0]
    assert (src.partitions, src.max_in_flight, src.overload, src.sample_every) == (3, 64, "block", 2)
    assert (t.fusion, t.batch_max, t.batch_wait_ms) == (True, 16, 5.0)


def test_anomalies_sink_is_optional(tmp_path):
    data = base()
    del data["sinks"]["anomalies"]
    t = load(write(tmp_path, data), settings=SETTINGS)
    assert set(t.sinks) == {"results", "dead_letter"}


# -- structure errors -----------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    data = base()
    data["nodez"] = {}
    err = load_error(tmp_path, data)
    assert err.path == "nodez"
    assert "unknown key 'nodez'" in str(err)
    assert "allowed here" in str(err) and "nodes" in str(err)


def test_unknown_node_key_names_the_node(tmp_path):
    data = base()
    data["nodes"]["preprocess"]["parameters"] = {}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.preprocess.parameters"
    assert f"at {err.path}:" in str(err)
    assert "unknown key 'parameters'" in str(err)


def test_missing_name(tmp_path):
    data = base()
    del data["name"]
    err = load_error(tmp_path, data)
    assert err.path == "name"
    assert "is required" in str(err)


@pytest.mark.parametrize("name", ["Surface Inspection", "-lead", "a" * 64, "ünï"])
def test_bad_name(tmp_path, name):
    data = base()
    data["name"] = name
    err = load_error(tmp_path, data)
    assert err.path == "name"
    assert repr(name) in str(err)


def test_name_must_be_a_string(tmp_path):
    data = base()
    data["name"] = 12
    err = load_error(tmp_path, data)
    assert err.path == "name"
    assert "must be str" in str(err)


def test_unknown_parent(tmp_path):
    data = base()
    data["nodes"]["quality"]["parents"] = ["preprocess", "preproces"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.parents[1]"
    assert "unknown parent 'preproces'" in str(err)
    assert "decode, preprocess, quality, publish" in str(err)


def test_self_parent(tmp_path):
    data = base()
    data["nodes"]["quality"]["parents"] = ["quality"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.parents[0]"
    assert "'quality' cannot be its own parent" in str(err)


def test_parent_listed_twice(tmp_path):
    data = base()
    data["nodes"]["quality"]["parents"] = ["preprocess", "preprocess"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.parents"


def test_cycle_names_the_cycle_nodes(tmp_path):
    data = base()
    data["nodes"]["preprocess"]["parents"] = ["decode", "quality"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.preprocess.parents"
    assert "form a cycle" in str(err)
    for n in ("preprocess", "quality"):
        assert n in err.problem
    assert "decode" not in err.problem


def test_cycle_error_does_not_name_nodes_downstream_of_the_cycle(tmp_path):
    data = base()
    data["nodes"]["preprocess"]["parents"] = ["decode", "quality"]
    err = load_error(tmp_path, data)
    assert "publish" not in err.problem


def test_no_root(tmp_path):
    data = base()
    data["nodes"]["decode"]["parents"] = ["publish"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes"
    assert "no root Node" in str(err)


def test_no_sink_node(tmp_path):
    data = base()
    del data["nodes"]["publish"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes"
    assert "no sink Node" in str(err)


def test_node_that_reaches_no_sink(tmp_path):
    data = base()
    data["nodes"]["orphan"] = {"type": "image.quality", "parents": ["preprocess"]}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.orphan"
    assert "'orphan' reaches no sink" in str(err)


def test_empty_nodes(tmp_path):
    data = base()
    data["nodes"] = {}
    err = load_error(tmp_path, data)
    assert err.path == "nodes"


def test_node_must_be_a_mapping(tmp_path):
    data = base()
    data["nodes"]["quality"] = "image.quality"
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality"
    assert "must be a mapping" in str(err)


def test_missing_node_type(tmp_path):
    data = base()
    del data["nodes"]["quality"]["type"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.type"
    assert "is required" in str(err)


# -- Node types ------------------------------------------------------------------------------


def test_unknown_node_type_lists_known_types(tmp_path):
    data = base()
    data["nodes"]["quality"]["type"] = "image.qualty"
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.type"
    assert "unknown Node type 'image.qualty'" in str(err)
    for known in ("anomaly.combine", "anomaly.score", "image.decode", "image.preprocess", "image.quality",
                  "kafka.sink", "onnx.model"):
        assert known in str(err)
    assert "import string" in str(err)


def test_import_string_node_types(tmp_path):
    data = base()
    data["nodes"]["quality"]["type"] = "tests.test_topology:MyNode"
    data["nodes"]["extra_sink"] = {"type": "tests.test_topology:MySink", "parents": ["preprocess"]}
    t = load(write(tmp_path, data), settings=SETTINGS)
    built = t.build_nodes(t.node_env(SETTINGS))
    assert type(built["quality"]) is MyNode
    assert type(built["extra_sink"]) is MySink
    assert built["extra_sink"].is_sink


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        ("tests.test_topology:NoSuchNode", "cannot import Node class 'tests.test_topology:NoSuchNode'"),
        ("no_such_package.nodes:Glare", "cannot import Node class 'no_such_package.nodes:Glare'"),
        ("tests.test_topology:NOT_A_NODE", "is not a streamd Node class"),
        ("tests.test_topology:Path", "is not a streamd Node class"),
    ],
)
def test_bad_import_string(tmp_path, type_name, message):
    data = base()
    data["nodes"]["quality"]["type"] = type_name
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.type"
    assert message in str(err)


# -- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [[1], [0, 64], [64, 64, 3], ["a", 64]])
def test_bad_preprocess_size(tmp_path, size):
    data = base()
    data["nodes"]["preprocess"]["params"] = {"size": size}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.preprocess.params.size"
    assert "size must be [h, w]" in str(err)


def test_param_of_wrong_type(tmp_path):
    data = base()
    data["nodes"]["preprocess"]["params"] = {"grayscale": "yes"}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.preprocess.params.grayscale"
    assert "must be bool" in str(err)


def test_onnx_model_missing_file(tmp_path):
    data = base()
    data["nodes"]["model"] = {"type": "onnx.model", "queue": "gpu", "parents": ["preprocess"],
                              "params": {"model": "models/nowhere/model.onnx"}}
    data["nodes"]["score"] = {"type": "anomaly.score", "parents": ["model"]}
    data["nodes"]["publish"]["parents"] = ["score"]
    del data["nodes"]["quality"]
    err = load_error(tmp_path, data)
    assert err.path == "nodes.model.params.model"
    assert "does not exist" in str(err)
    assert "STREAMD_MODELS_DIR" in str(err)


def test_onnx_model_requires_model_param(tmp_path):
    data = base()
    data["nodes"]["quality"] = {"type": "onnx.model", "parents": ["preprocess"]}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.params.model"


def test_onnx_model_unknown_provider(tmp_path):
    data = base()
    data["nodes"]["quality"] = {"type": "onnx.model", "parents": ["preprocess"],
                                "params": {"model": str(ROOT / "models/surface-ae/model.onnx"),
                                           "providers": ["cuda", "tpu"]}}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.params.providers[1]"


def test_sink_param_names_undeclared_sink(tmp_path):
    data = base()
    data["nodes"]["publish"]["params"] = {"results": "audit"}
    err = load_error(tmp_path, data)
    assert err.path == "nodes.publish.params.results"


# -- sources, sinks, options ---------------------------------------------------------------------


def test_bad_overload_policy(tmp_path):
    data = base()
    data["sources"][0]["overload"] = "drop_newest"
    err = load_error(tmp_path, data)
    assert err.path == "sources[0].overload"
    assert "block, drop_oldest, sample" in str(err)


def test_shedding_topics_are_the_drop_oldest_sources(tmp_path):
    data = base()
    assert load(write(tmp_path, data), settings=SETTINGS).shedding_topics() == frozenset()
    data["sources"][0]["overload"] = "drop_oldest"
    topic = data["sources"][0]["topic"]
    assert load(write(tmp_path, data), settings=SETTINGS).shedding_topics() == frozenset({topic})


def test_bad_source_kind(tmp_path):
    data = base()
    data["sources"][0]["kind"] = "video"
    err = load_error(tmp_path, data)
    assert err.path == "sources[0].kind"


def test_source_topic_listed_twice(tmp_path):
    data = base()
    data["sources"].append({"topic": "cams.frames", "kind": "frame"})
    err = load_error(tmp_path, data)
    assert err.path == "sources[1].topic"


def test_sources_required(tmp_path):
    data = base()
    del data["sources"]
    err = load_error(tmp_path, data)
    assert err.path == "sources"


@pytest.mark.parametrize("key", ["partitions", "max_in_flight", "sample_every", "max_message_bytes"])
def test_source_numbers_must_be_positive(tmp_path, key):
    data = base()
    data["sources"][0][key] = 0
    err = load_error(tmp_path, data)
    assert err.path == f"sources[0].{key}"


def test_missing_results_sink(tmp_path):
    data = base()
    del data["sinks"]["results"]
    err = load_error(tmp_path, data)
    assert err.path == "sinks.results"
    assert "is required" in str(err)


def test_missing_dead_letter_sink(tmp_path):
    data = base()
    del data["sinks"]["dead_letter"]
    err = load_error(tmp_path, data)
    assert err.path == "sinks.dead_letter"


def test_bad_sink_topic(tmp_path):
    data = base()
    data["sinks"]["results"]["topic"] = "bad topic!"
    err = load_error(tmp_path, data)
    assert err.path == "sinks.results.topic"


def test_bad_queue_name(tmp_path):
    data = base()
    data["nodes"]["quality"]["queue"] = "GPU queue"
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.queue"


def test_negative_retries(tmp_path):
    data = base()
    data["nodes"]["quality"]["retries"] = -1
    err = load_error(tmp_path, data)
    assert err.path == "nodes.quality.retries"


def test_fusion_must_be_bool(tmp_path):
    data = base()
    data["fusion"] = "yes"
    err = load_error(tmp_path, data)
    assert err.path == "fusion"


def test_batch_options(tmp_path):
    data = base()
    data["batch"] = {"max_size": 0}
    assert load_error(tmp_path, data).path == "batch.max_size"
    data["batch"] = {"max_wait_ms": -1}
    assert load_error(tmp_path, data).path == "batch.max_wait_ms"
    data["batch"] = {"max_size": 4, "timeout": 1}
    assert load_error(tmp_path, data).path == "batch.timeout"


# -- file errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError) as info:
        load(path, settings=SETTINGS)
    assert str(path) in str(info.value)
    assert "cannot read topology file" in str(info.value)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "name: x\nnodes: [unclosed\n")
    with pytest.raises(TopologyError) as info:
        load(path, settings=SETTINGS)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(TopologyError, match="must be a mapping"):
        load(path, settings=SETTINGS)


# -- streamd validate ---------------------------------------------------------------------------


@pytest.fixture
def keep_logging():
    """``streamd.cli.main`` configures the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_validate_shipped_topology(capsys, keep_logging):
    assert main(["validate", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out
    assert "surface-inspection" in out
    assert "decode -> preprocess" in out


def test_cli_validate_several_files(tmp_path, capsys, keep_logging):
    assert main(["validate", str(SHIPPED), str(write(tmp_path, base()))]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok:") == 2


def test_cli_validate_bad_topology(tmp_path, capsys, keep_logging):
    data = base()
    data["nodes"]["quality"]["parents"] = ["preprocess", "nope"]
    path = write(tmp_path, data)
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert "nodes.quality.parents[1]" in captured.err
    assert str(path) in captured.err
    assert "ok" not in captured.out


def test_cli_validate_missing_file(tmp_path, capsys, keep_logging):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read topology file" in capsys.readouterr().err
