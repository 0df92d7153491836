"""onnx.model with the shipped surface-ae model on CPU: providers, metadata, input checks, batching, metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from streamd import synth
from streamd.config import Settings
from streamd.exceptions import BadInput, ModelInputMismatch, TopologyError
from streamd.metrics import Metrics
from streamd.nodes.base import NodeEnv, Origin, RunContext, resolve
from streamd.nodes.onnx import OnnxModel

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "surface-ae" / "model.onnx"
PARAMS = {"model": "models/surface-ae/model.onnx", "providers": ["cpu"], "warmup": 1}


def make_env(**settings) -> NodeEnv:
    return NodeEnv(settings=Settings(onnx_threads=1, **settings), topology_name="unit",
                   base_dir=ROOT / "topologies")


def runs(n: int) -> list[RunContext]:
    return [RunContext(topology="unit", run_id=f"r{i}", origin=Origin("cameras.frames", 0, i), kind="frame")
            for i in range(n)]


def tensors(n: int, seed: int = 0) -> list[dict]:
    """Preprocessed synthetic camera frames, some with defects (what the model sees in production)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        defect = (None, *synth.DEFECT_KINDS)[i % 4]
        img, _ = synth.camera_frame(rng, defect=defect, size=(128, 128))
        tensor = (img[:, :, 0].astype(np.float32) / np.float32(255.0))[None]
        out.append({"preprocess": {"tensor": tensor, "orig_size": [240 + i, 320]}})
    return out


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    node = OnnxModel("autoencoder", PARAMS, make_env())
    node.setup()
    return node


def test_registered():
    assert resolve("onnx.model") is OnnxModel


def test_relative_model_path_resolves_next_to_the_topology_folder():
    node = OnnxModel("autoencoder", PARAMS, make_env())
    assert node.model_path.resolve() == MODEL.resolve()


def test_models_dir_setting(tmp_path):
    (tmp_path / "surface-ae").mkdir()
    (tmp_path / "surface-ae" / "model.onnx").write_bytes(MODEL.read_bytes())
    node = OnnxModel("m", {"model": "surface-ae/model.onnx"}, make_env(models_dir=str(tmp_path)))
    assert node.model_path == tmp_path / "surface-ae" / "model.onnx"


def test_missing_model_file():
    with pytest.raises(TopologyError) as info:
        OnnxModel("m", {"model": "models/none/model.onnx"}, make_env())
    assert info.value.path == "nodes.m.params.model"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA: nothing to fall back from")
def test_cuda_falls_back_to_cpu_with_a_warning(caplog):
    node = OnnxModel("autoencoder", {**PARAMS, "providers": ["cuda", "cpu"]}, make_env())
    with caplog.at_level(logging.WARNING, logger="streamd.nodes.onnx"):
        node.setup()
    assert node.provider == "cpu"
    assert node.session.get_providers()[0] == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "streamd.nodes.onnx"]
    assert warnings, caplog.text
    text = warnings[0].getMessage()
    assert "autoencoder" in text and "cuda" in text and "cpu" in text


def test_cpu_only_gives_no_warning(caplog):
    node = OnnxModel("autoencoder", PARAMS, make_env())
    with caplog.at_level(logging.WARNING, logger="streamd.nodes.onnx"):
        node.setup()
    assert node.provider == "cpu"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_settings_providers_override_params():
    node = OnnxModel("m", {**PARAMS, "providers": ["tensorrt", "cuda"]}, make_env(onnx_providers=("cpu",)))
    assert node.wanted == ["cpu"]


def test_metadata(model):
    assert model.model_info == {"name": "surface-ae", "version": "1.1.0"}
    assert model.threshold == pytest.approx(1.6823)
    assert model.map_threshold == pytest.approx(1.0)
    assert model.input_shape[1:] == [1, 128, 128]


def test_output_carries_metadata_and_context(model):
    (out,) = model.process_batch(runs(1), tensors(1))
    assert set(out) == {"outputs", "model", "threshold", "map_threshold", "context"}
    assert out["model"] == {"name": "surface-ae", "version": "1.1.0"}
    assert out["threshold"] == pytest.approx(1.6823)
    assert out["map_threshold"] == pytest.approx(1.0)
    assert out["context"] == {"orig_size": [240, 320]}
    assert set(out["outputs"]) == {"score", "anomaly_map"}
    assert out["outputs"]["anomaly_map"].shape == (1, 128, 128)
    assert np.isfinite(float(out["outputs"]["score"]))


def test_bare_array_input(model):
    arr = tensors(1)[0]["preprocess"]["tensor"]
    out = model.process(runs(1)[0], {"preprocess": arr})
    assert out["context"] == {}


def test_float64_input_is_cast(model):
    t = tensors(1)[0]
    as64 = {"preprocess": {**t["preprocess"], "tensor": t["preprocess"]["tensor"].astype(np.float64)}}
    a = model.process(runs(1)[0], t)
    b = model.process(runs(1)[0], as64)
    np.testing.assert_allclose(a["outputs"]["anomaly_map"], b["outputs"]["anomaly_map"], atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 128, 128), (128, 128), (1, 1, 128, 128)])
def test_wrong_shape(model, shape):
    with pytest.raises(ModelInputMismatch) as info:
        model.process(runs(1)[0], {"preprocess": {"tensor": np.zeros(shape, np.float32)}})
    err = info.value
    assert isinstance(err, BadInput)  # dead-lettered at once, not retried
    assert err.reason == "model_input_mismatch"
    assert err.node == "autoencoder"
    assert str(list(shape)) in str(err)
    assert "model.onnx" in str(err)


def test_missing_input_key(model):
    with pytest.raises(ModelInputMismatch) as info:
        model.process(runs(1)[0], {"preprocess": {"image": np.zeros((1, 128, 128), np.float32)}})
    assert "'tensor'" in str(info.value)
    assert "image" in str(info.value)


def test_input_key_param():
    node = OnnxModel("m", {**PARAMS, "input_key": "image"}, make_env())
    out = node.process(runs(1)[0], {"p": {"image": np.zeros((1, 128, 128), np.float32), "extra": 1}})
    assert out["context"] == {"extra": 1}


def test_wrong_dtype(model):
    with pytest.raises(ModelInputMismatch, match="dtype"):
        model.process(runs(1)[0], {"p": {"tensor": np.zeros((1, 128, 128), np.complex64)}})


def test_process_batch_equals_one_by_one(model):
    rs, ins = runs(5), tensors(5, seed=1)
    batched = model.process_batch(rs, ins)
    single = [model.process(r, i) for r, i in zip(rs, ins, strict=True)]
    assert len(batched) == 5
    for b, s in zip(batched, single, strict=True):
        assert b["context"] == s["context"]
        np.testing.assert_allclose(float(b["outputs"]["score"]), float(s["outputs"]["score"]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(b["outputs"]["anomaly_map"], s["outputs"]["anomaly_map"], atol=1e-5, rtol=0)
    assert [b["context"]["orig_size"][0] for b in batched] == [240, 241, 242, 243, 244]


def test_max_batch_chunking_gives_the_same_results(model):
    registry = CollectorRegistry()
    env = make_env()
    env.metrics = Metrics(registry)
    small = OnnxModel("autoencoder", {**PARAMS, "max_batch": 2, "warmup": 0}, env)
    rs, ins = runs(5), tensors(5, seed=2)
    chunked = small.process_batch(rs, ins)  # sets itself up on first use
    whole = model.process_batch(rs, ins)
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a["outputs"]["anomaly_map"], b["outputs"]["anomaly_map"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(float(a["outputs"]["score"]), float(b["outputs"]["score"]), atol=1e-5, rtol=0)
    # 5 inputs with max_batch 2: session.run on 2, 2 and 1 inputs
    assert registry.get_sample_value("streamd_inference_batch_size_count", {"model": "surface-ae"}) == 3
    assert registry.get_sample_value("streamd_inference_batch_size_sum", {"model": "surface-ae"}) == 5


def test_inference_metrics_are_observed():
    registry = CollectorRegistry()
    env = make_env()
    env.metrics = Metrics(registry)
    node = OnnxModel("autoencoder", {**PARAMS, "warmup": 0}, env)
    node.setup()
    labels = {"model": "surface-ae", "provider": "cpu"}
    assert not registry.get_sample_value("streamd_inference_duration_seconds_count", labels)
    node.process_batch(runs(3), tensors(3))
    node.process(runs(1)[0], tensors(1)[0])
    assert registry.get_sample_value("streamd_inference_duration_seconds_count", labels) == 2
    assert (registry.get_sample_value("streamd_inference_duration_seconds_sum", labels) or 0) > 0
    assert registry.get_sample_value("streamd_inference_batch_size_count", {"model": "surface-ae"}) == 2
    assert registry.get_sample_value("streamd_inference_batch_size_sum", {"model": "surface-ae"}) == 4


def test_half_outputs_are_float16_and_float16_input_is_cast(model):
    half = OnnxModel("autoencoder", {**PARAMS, "half_outputs": ["anomaly_map"]}, make_env())
    half.setup()
    inputs = tensors(4)
    full = model.process_batch(runs(4), inputs)
    halved = half.process_batch(runs(4), [{"p": {**i["preprocess"], "tensor": i["preprocess"]["tensor"]
                                                  .astype(np.float16)}} for i in inputs])
    for f, h in zip(full, halved, strict=True):
        assert h["outputs"]["anomaly_map"].dtype == np.float16
        assert h["outputs"]["score"].dtype == f["outputs"]["score"].dtype  # not named: left as it is
        # the input rounded to float16 moves the score by under 0.1 % (and a few thousandths near the threshold)
        np.testing.assert_allclose(h["outputs"]["score"], f["outputs"]["score"], rtol=2e-3, atol=0.01)


def test_half_outputs_naming_an_unknown_output_fails_at_setup():
    node = OnnxModel("autoencoder", {**PARAMS, "half_outputs": ["heatmap"]}, make_env())
    with pytest.raises(TopologyError) as info:
        node.setup()
    assert info.value.path == "nodes.autoencoder.params.half_outputs"
    assert "heatmap" in str(info.value) and "anomaly_map" in str(info.value)
