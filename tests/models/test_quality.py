"""Quality of the SHIPPED model files on held-out synthetic data (seeds never used in training).

Runs the .onnx files under models/ with onnxruntime on CPU; AUROC is rank based (numpy).
The full figures come from ``python models/evaluate.py``; these sets are smaller to stay fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamd import synth
from streamd.metrics_quality import auroc, camera_set, kind_figures, sensor_set
from streamd.nodes.sensor import FEATURE_NAMES, vibration_features

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[2] / "models"
CAMERA = MODELS / "surface-ae" / "model.onnx"
SENSOR = MODELS / "vibration-gauss" / "model.onnx"

# held-out seeds: the training scripts use 1001-1004 (camera) and 1101-1104 (sensor)
CAMERA_SEED = 424242
SENSOR_SEED = 434343


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _meta(sess) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def _camera_scores(sess, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(x), 64):
        m, s = sess.run(["anomaly_map", "score"], {"image": x[i : i + 64]})
        maps.append(m)
        scores.append(s)
    return np.concatenate(maps), np.concatenate(scores)


@pytest.fixture(scope="module")
def camera():
    return _session(CAMERA)


def test_camera_model_contract(camera):
    (inp,) = camera.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [1, 128, 128] and not isinstance(inp.shape[0], int)
    outs = {o.name: o for o in camera.get_outputs()}
    assert outs["anomaly_map"].shape[1:] == [1, 128, 128]
    assert len(outs["score"].shape) == 1
    meta = _meta(camera)
    assert meta["streamd.name"] == "surface-ae"
    assert meta["streamd.kind"] == "camera"
    assert meta["streamd.version"]
    float(meta["streamd.threshold"])
    float(meta["streamd.map_threshold"])
    assert CAMERA.stat().st_size < 5_000_000
    # dynamic batch: batch of 3 gives the same per-frame scores as 3 batches of 1
    x, _ = camera_set(CAMERA_SEED + 9, 1, 1)  # one good frame and one of each defect
    x = x[:3]
    _, together = _camera_scores(camera, x)
    apart = np.concatenate([camera.run(["score"], {"image": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-5)


def test_camera_model_quality(camera):
    threshold = float(_meta(camera)["streamd.threshold"])
    x, labels = camera_set(CAMERA_SEED, 300, 60)
    _, scores = _camera_scores(camera, x)
    rows, fpr = kind_figures(scores, labels, threshold)
    report = "\n".join(r.line() for r in rows) + f"\n  false-positive rate {fpr:.3f}"
    by_kind = {r.kind: r for r in rows}
    assert by_kind["all"].auroc >= 0.97, report
    for kind in synth.DEFECT_KINDS:
        assert by_kind[kind].auroc >= 0.95, report
        assert by_kind[kind].recall >= 0.8, report
    assert fpr <= 0.03, report


@pytest.mark.parametrize("size,channels", [((240, 320), 3), ((480, 640), 3), ((96, 96), 1)])
def test_camera_model_on_resized_frames(camera, size, channels):
    """Frames made at another resolution, reduced to grey 128x128 like the preprocess Node does."""
    threshold = float(_meta(camera)["streamd.threshold"])
    x, labels = camera_set(CAMERA_SEED + 1, 80, 20, size=size, channels=channels)
    _, scores = _camera_scores(camera, x)
    rows, fpr = kind_figures(scores, labels, threshold)
    report = "\n".join(r.line() for r in rows) + f"\n  false-positive rate {fpr:.3f}"
    by_kind = {r.kind: r for r in rows}
    assert by_kind["all"].auroc >= 0.97, report
    for kind in synth.DEFECT_KINDS:
        assert by_kind[kind].recall >= 0.7, report
    assert fpr <= 0.05, report


def test_camera_model_on_jpeg_frames(camera):
    """Frames as `streamd demo` sends them: 240x320 RGB, JPEG quality 90."""
    threshold = float(_meta(camera)["streamd.threshold"])
    x, labels = camera_set(CAMERA_SEED + 3, 100, 25, size=(240, 320), channels=3, jpeg_quality=90)
    _, scores = _camera_scores(camera, x)
    rows, fpr = kind_figures(scores, labels, threshold)
    report = "\n".join(r.line() for r in rows) + f"\n  false-positive rate {fpr:.3f}"
    by_kind = {r.kind: r for r in rows}
    assert by_kind["all"].auroc >= 0.97, report
    for kind in synth.DEFECT_KINDS:
        assert by_kind[kind].recall >= 0.7, report
    assert fpr <= 0.05, report


def test_evaluation_input_matches_the_preprocess_node():
    """to_model_input (used for every figure here) gives what image.decode + image.preprocess give."""
    from streamd.config import Settings
    from streamd.metrics_quality import to_model_input
    from streamd.nodes.base import SOURCE, NodeEnv, Origin, RunContext
    from streamd.nodes.image import DecodeImage, Preprocess

    env = NodeEnv(settings=Settings(), topology_name="t", base_dir=MODELS)
    run = RunContext(topology="t", run_id="r", origin=Origin("cameras.frames", 0, 0), kind="frame")
    decode = DecodeImage("decode", {}, env)
    pre = Preprocess("preprocess", {"size": [128, 128], "grayscale": True}, env)
    for size, channels in (((240, 320), 3), ((128, 128), 1), ((96, 96), 3)):
        img, _ = synth.camera_frame(np.random.default_rng(1), "spot", size=size, channels=channels)
        msg = {"kind": "frame", "codec": "raw", "shape": list(img.shape), "dtype": "uint8", "data": img.tobytes()}
        tensor = pre.process(run, {"decode": decode.process(run, {SOURCE: msg})})["tensor"]
        np.testing.assert_allclose(tensor, to_model_input(img), atol=1e-5)


def test_camera_map_points_at_the_defect(camera):
    """The anomaly map's peak lies in (or next to) the defect's box."""
    rng = np.random.default_rng(CAMERA_SEED + 2)
    from streamd.metrics_quality import to_model_input

    hits = 0
    n = 0
    for kind in synth.DEFECT_KINDS:
        for _ in range(10):
            img, (x, y, w, h) = synth.camera_frame(rng, kind)
            amap = camera.run(["anomaly_map"], {"image": to_model_input(img)[None]})[0][0, 0]
            py, px = np.unravel_index(int(amap.argmax()), amap.shape)
            hits += (x - 4 <= px < x + w + 4) and (y - 4 <= py < y + h + 4)
            n += 1
    assert hits >= 0.9 * n


@pytest.fixture(scope="module")
def sensor():
    return _session(SENSOR)


def test_sensor_model_contract(sensor):
    (inp,) = sensor.get_inputs()
    assert inp.name == "features" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [len(FEATURE_NAMES)] and not isinstance(inp.shape[0], int)
    outs = {o.name: o for o in sensor.get_outputs()}
    assert len(outs["score"].shape) == 1
    meta = _meta(sensor)
    assert meta["streamd.name"] == "vibration-gauss"
    assert meta["streamd.kind"] == "sensor"
    assert meta["streamd.version"]
    assert meta["streamd.features"] == ",".join(FEATURE_NAMES)  # trained on the features the Node computes
    float(meta["streamd.threshold"])


@pytest.mark.parametrize("rate_hz,n", [(5000.0, 4096), (10000.0, 8192)])
def test_sensor_model_quality(sensor, rate_hz, n):
    threshold = float(_meta(sensor)["streamd.threshold"])
    windows, labels = sensor_set(SENSOR_SEED + int(rate_hz), 400, 80, rate_hz=rate_hz, n=n)
    feats = np.stack([vibration_features(w, rate_hz) for w in windows])
    scores = sensor.run(["score"], {"features": feats})[0]
    rows, fpr = kind_figures(scores, labels, threshold)
    report = "\n".join(r.line() for r in rows) + f"\n  false-positive rate {fpr:.3f}"
    by_kind = {r.kind: r for r in rows}
    assert by_kind["all"].auroc >= 0.95, report
    for kind in synth.SENSOR_FAULTS:
        assert by_kind[kind].auroc >= 0.95, report
        assert by_kind[kind].recall >= 0.8, report
    assert fpr <= 0.03, report


def test_auroc_matches_definition():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 50), rng.normal(1, 1, 40)
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(neg, pos) == pytest.approx(brute)
    assert auroc([0, 0], [0, 0]) == 0.5
    assert auroc([0, 1], [2, 3]) == 1.0
