"""Sensor Nodes: sensor.window and sensor.features on good and bad TP readings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from streamd import synth
from streamd.config import Settings
from streamd.exceptions import BadInput, TopologyError
from streamd.nodes.base import SOURCE, NodeEnv, Origin, RunContext, resolve
from streamd.nodes.sensor import (
    AMP_FLOOR_G,
    FEATURE_GROUPS,
    FEATURE_NAMES,
    SensorFeatures,
    SensorWindow,
    vibration_features,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env() -> NodeEnv:
    return NodeEnv(settings=Settings(), topology_name="vibration-monitoring", base_dir=ROOT / "topologies")


RUN = RunContext(topology="vibration-monitoring", run_id="r1", origin=Origin("sensors.readings", 0, 7), kind="reading")


def reading(values: np.ndarray | bytes, rate_hz: float = 5000.0, **extra) -> dict:
    data = values if isinstance(values, bytes) else np.asarray(values, dtype="<f4").tobytes()
    msg = {
        "tp": 1,
        "kind": "reading",
        "source": "turbine3-bearing1",
        "seq": 88,
        "ts": 1795618807.471,
        "rate_hz": rate_hz,
        "unit": "g",
        "values": data,
    }
    msg.update(extra)
    return msg


def window(fault: str | None = None, seed: int = 0, n: int = 4096) -> np.ndarray:
    return synth.sensor_window(np.random.default_rng(seed), fault, n=n)


def test_registered_names_resolve():
    assert resolve("sensor.features") is SensorFeatures
    assert resolve("sensor.window") is SensorWindow


def test_features_on_a_good_reading(env):
    node = SensorFeatures("features", {}, env)
    node.setup()
    out = node.process(RUN, {SOURCE: reading(window())})
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32 and out.shape == (len(FEATURE_NAMES),)
    assert np.isfinite(out).all()
    # the one feature implementation: the Node gives exactly what train.py computes
    np.testing.assert_array_equal(out, vibration_features(window(), 5000.0))


def test_features_use_the_last_window_samples(env):
    node = SensorFeatures("features", {"window": 2048}, env)
    x = window(n=6000)
    out = node.process(RUN, {SOURCE: reading(x)})
    np.testing.assert_array_equal(out, vibration_features(x[-2048:], 5000.0))


def test_features_separate_faults_from_healthy(env):
    """The same machine (same seed) with each fault: the feature of that fault's group rises."""
    node = SensorFeatures("features", {}, env)
    i_1x, i_kurt_hf, i_ses, i_half, i_high = (
        FEATURE_NAMES.index(k)
        for k in ("log_amp_1x", "log_kurtosis_hf", "log_ses_bpfo", "log_amp_half_orders", "log_amp_4x_10x")
    )
    ok = node.process(RUN, {SOURCE: reading(window(None, 3))})
    imbalance = node.process(RUN, {SOURCE: reading(window("imbalance", 3))})
    assert imbalance[i_1x] > ok[i_1x] + math.log(2.5) - 0.05  # the 1x line rises 2.5-4.5 times
    bearing = node.process(RUN, {SOURCE: reading(window("bearing", 3))})
    assert bearing[i_kurt_hf] > ok[i_kurt_hf] + 0.3 and bearing[i_ses] > ok[i_ses] + 1.0
    looseness = node.process(RUN, {SOURCE: reading(window("looseness", 3))})
    assert looseness[i_half] > ok[i_half] + 1.0 and looseness[i_high] > ok[i_high] + 0.5


def test_feature_groups_cover_the_features_once():
    names = [n for group in FEATURE_GROUPS.values() for n in group]
    assert tuple(names) == FEATURE_NAMES and len(set(names)) == len(names)
    assert set(FEATURE_GROUPS) == {"imbalance", "looseness", "bearing", "overall"}


def test_line_amplitudes_are_in_g():
    """A pure 1x line of 0.25 g and a 2x line of 0.05 g read as such (Hann window, +-3 % band)."""
    t = np.arange(4096) / 5000.0
    x = 0.25 * np.sin(2 * np.pi * 30.3 * t) + 0.05 * np.sin(2 * np.pi * 60.6 * t + 1.0)
    f = dict(zip(FEATURE_NAMES, np.exp(vibration_features(x, 5000.0)), strict=True))
    assert f["log_amp_1x"] == pytest.approx(0.25, rel=0.01)
    assert f["log_amp_2x"] == pytest.approx(0.05, rel=0.01)
    assert f["log_amp_half_orders"] == pytest.approx(AMP_FLOOR_G, rel=0.05)  # nothing there: the floor


def test_features_after_sensor_window(env):
    win = SensorWindow("window", {"window": 4096}, env)
    feats = SensorFeatures("features", {}, env)
    w = win.process(RUN, {SOURCE: reading(window())})
    assert w["values"].dtype == np.float32 and w["values"].shape == (4096,) and w["rate_hz"] == 5000.0
    out = feats.process(RUN, {"window": w})
    np.testing.assert_array_equal(out, vibration_features(window(), 5000.0))


@pytest.mark.parametrize(
    "values,why",
    [
        (b"", "empty"),
        (b"\x00\x00\x80?\x00", "not a whole number"),
        (np.full(4096, np.nan), "NaN"),
        (np.concatenate([np.zeros(4095), [np.inf]]), "NaN or infinite"),
        (np.zeros(1000), "needs 4096"),
    ],
    ids=["empty", "partial-float", "nan", "inf", "too-short"],
)
@pytest.mark.parametrize("cls", [SensorFeatures, SensorWindow])
def test_bad_values_are_rejected(env, cls, values, why):
    node = cls("features", {}, env)
    with pytest.raises(BadInput, match=why) as info:
        node.process(RUN, {SOURCE: reading(values)})
    assert info.value.reason == "bad_values"
    assert info.value.node == "features"
    assert "features" in str(info.value)


def test_values_must_be_binary(env):
    node = SensorFeatures("features", {}, env)
    with pytest.raises(BadInput, match="binary") as info:
        node.process(RUN, {SOURCE: {**reading(window()), "values": [0.0] * 4096}})
    assert info.value.reason == "bad_values"


@pytest.mark.parametrize("rate_hz", [1000.0, 3000.0])
def test_too_low_a_sampling_rate_is_rejected(env, rate_hz):
    """The bearing band starts at 1.25 kHz: under 4 kHz it would be (nearly) above Nyquist."""
    node = SensorFeatures("features", {}, env)
    with pytest.raises(BadInput, match="below") as info:
        node.process(RUN, {SOURCE: reading(window(), rate_hz=rate_hz)})
    assert info.value.reason == "bad_values"


def test_a_flat_signal_gives_finite_features(env):
    """A dead sensor (all zeros) is not an error here: finite features, which a model scores as far off."""
    out = SensorFeatures("features", {}, env).process(RUN, {SOURCE: reading(np.zeros(4096))})
    assert np.isfinite(out).all()


def test_wrong_message_kind_is_rejected(env):
    with pytest.raises(BadInput) as info:
        SensorFeatures("features", {}, env).process(RUN, {SOURCE: {"kind": "frame", "data": b"x"}})
    assert info.value.reason == "unsupported_kind"


@pytest.mark.parametrize(
    "params,path",
    [
        ({"window": "4096"}, "nodes.features.params.window"),
        ({"window": 16}, "nodes.features.params.window"),
        ({"shaft_hz": [60, 10]}, "nodes.features.params.shaft_hz"),
        ({"shaft_hz": 30}, "nodes.features.params.shaft_hz"),
        ({"bearing_orders": [3.0]}, "nodes.features.params.bearing_orders"),
        ({"min_rate_hz": 100}, "nodes.features.params.min_rate_hz"),
        ({"min_rate_hz": 3000}, "nodes.features.params.min_rate_hz"),
    ],
)
def test_bad_params_name_their_yaml_path(env, params, path):
    with pytest.raises(TopologyError) as info:
        SensorFeatures("features", params, env)
    assert info.value.path == path


def test_features_feed_the_shipped_sensor_model(env):
    """features -> onnx.model -> anomaly.score, as in topologies/vibration-monitoring.yaml."""
    pytest.importorskip("onnxruntime")
    feats = SensorFeatures("features", {}, env)
    model = resolve("onnx.model")("model", {"model": "models/vibration-gauss/model.onnx", "providers": ["cpu"]}, env)
    score = resolve("anomaly.score")("score", {"label": "vibration"}, env)
    model.setup()
    verdicts, worst_group = {}, {}
    for fault in (None, "bearing", "imbalance", "looseness"):
        f = feats.process(RUN, {SOURCE: reading(window(fault, 5))})
        out = model.process(RUN, {"features": f})
        verdicts[fault] = score.process(RUN, {"model": out})
        worst_group[fault] = list(FEATURE_GROUPS)[int(np.argmax(out["outputs"]["group_score"]))]
    assert verdicts[None]["anomaly"] is False
    for fault in synth.SENSOR_FAULTS:
        assert verdicts[fault]["anomaly"] is True, (fault, verdicts[fault])
        assert worst_group[fault] == fault  # group_score tells which fault group raised the score
    assert verdicts["bearing"]["model"]["name"] == "vibration-gauss"
