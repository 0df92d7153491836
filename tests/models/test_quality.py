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
from streamd.nodes.sensor import FEATURE_GROUPS, FEATURE_NAMES, vibration_features

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


def _shipped_preprocess_params() -> dict:
    import yaml

    topo = yaml.safe_load((MODELS.parent / "topologies" / "surface-inspection.yaml").read_text())
    return dict(topo["nodes"]["preprocess"]["params"])


def _production_path_inputs(frames, codec: str, quality: int) -> tuple[np.ndarray, list[str | None]]:
    """Frames as a camera line sends them (TP frame message), through tp.decode, image.decode, image.preprocess."""
    from streamd import tp
    from streamd.config import Settings
    from streamd.nodes.base import SOURCE, NodeEnv, Origin, RunContext
    from streamd.nodes.image import DecodeImage, Preprocess

    from ..support import frame_message, jpeg

    env = NodeEnv(settings=Settings(), topology_name="t", base_dir=MODELS)
    decode = DecodeImage("decode", {}, env)
    pre = Preprocess("preprocess", _shipped_preprocess_params(), env)  # as shipped: float16 tensors
    xs, labels = [], []
    for source, seq, img, defect in frames:
        packed = frame_message(source, seq, img, ts=0.0, codec=codec)
        if codec == "jpeg" and quality != 90:  # frame_message encodes at quality 90
            packed = tp.pack({**tp.decode(packed), "data": jpeg(img, quality)})
        msg = tp.decode(packed)
        run = RunContext(topology="t", run_id=f"{source}-{seq}", origin=Origin("cameras.frames", 0, seq), kind="frame")
        xs.append(pre.process(run, {"decode": decode.process(run, {SOURCE: msg})})["tensor"])
        labels.append(defect)
    return np.stack(xs).astype(np.float32), labels  # the onnx.model Node casts to the model's input type


@pytest.mark.parametrize(
    "codec,quality,seed", [("jpeg", 90, CAMERA_SEED + 4), ("jpeg", 75, CAMERA_SEED + 5), ("raw", 0, CAMERA_SEED + 6)]
)
def test_camera_model_on_the_production_path(camera, codec, quality, seed):
    """What the end-to-end test and `streamd demo` send: 128x128, 240x320 and 96x160 frames, grey and RGB,
    every tenth one defective, as TP frame messages decoded and resized by the Nodes. Not one false
    alarm among the good frames, not one missed defect, and a margin on both sides of the threshold."""
    from ..support import camera_frames

    threshold = float(_meta(camera)["streamd.threshold"])
    x, labels = _production_path_inputs(camera_frames(300, 3, 10, seed=seed), codec, quality)
    _, scores = _camera_scores(camera, x)
    rows, fpr = kind_figures(scores, labels, threshold)
    good = np.array([lab is None for lab in labels])
    report = "\n".join(r.line() for r in rows) + (
        f"\n  false-positive rate {fpr:.4f}; highest good score {scores[good].max():.3f}, "
        f"lowest defect score {scores[~good].min():.3f}, threshold {threshold:.4f}"
    )
    assert fpr == 0.0, report
    assert {r.kind: r.recall for r in rows} == {**{k: 1.0 for k in synth.DEFECT_KINDS}, "all": 1.0}, report
    assert scores[good].max() < threshold / 1.1, report
    assert scores[~good].min() > threshold * 1.5, report


def test_camera_map_points_at_the_defect(camera):
    """The anomaly map's peak lies in (or next to) the defect's box."""
    rng = np.random.default_rng(CAMERA_SEED + 2)
    from streamd.metrics_quality import to_model_input

    hits = 0
    n = 0
    for kind in synth.DEFECT_KINDS:
        for _ in range(10):
            img, box = synth.camera_frame(rng, kind)
            assert box is not None
            x, y, w, h = box
            amap = camera.run(["anomaly_map"], {"image": to_model_input(img)[None]})[0][0, 0]
            py, px = np.unravel_index(int(amap.argmax()), amap.shape)
            hits += int((x - 4 <= px < x + w + 4) and (y - 4 <= py < y + h + 4))
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
    # one group score per feature group, in the order of FEATURE_GROUPS
    assert meta["streamd.groups"] == ";".join(f"{g}={','.join(names)}" for g, names in FEATURE_GROUPS.items())
    assert outs["group_score"].shape[1:] == [len(FEATURE_GROUPS)]
    assert outs["feature_z"].shape[1:] == [len(FEATURE_NAMES)]
    float(meta["streamd.threshold"])


@pytest.mark.parametrize("rate_hz,n", [(5000.0, 4096), (10000.0, 8192)])
def test_sensor_model_quality(sensor, rate_hz, n):
    """No false alarm and no missed fault, with a margin on both sides of the threshold."""
    threshold = float(_meta(sensor)["streamd.threshold"])
    windows, labels = sensor_set(SENSOR_SEED + int(rate_hz), 400, 80, rate_hz=rate_hz, n=n)
    feats = np.stack([vibration_features(w, rate_hz) for w in windows])
    scores, groups = sensor.run(["score", "group_score"], {"features": feats})
    rows, fpr = kind_figures(scores, labels, threshold)
    report = "\n".join(r.line() for r in rows) + f"\n  false-positive rate {fpr:.3f}"
    by_kind = {r.kind: r for r in rows}
    assert by_kind["all"].auroc == 1.0, report
    for kind in synth.SENSOR_FAULTS:
        assert by_kind[kind].recall == 1.0, report
    assert fpr == 0.0, report
    healthy = np.array([lab is None for lab in labels])
    assert scores[healthy].max() < threshold / 1.15, report
    assert scores[~healthy].min() > threshold * 1.15, report
    # the group with the largest score is the fault's own group
    names = list(FEATURE_GROUPS)
    for i in np.nonzero(~healthy)[0]:
        assert names[int(np.argmax(groups[i]))] == labels[i], (labels[i], groups[i])


def test_auroc_matches_definition():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 50), rng.normal(1, 1, 40)
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(neg, pos) == pytest.approx(brute)
    assert auroc([0, 0], [0, 0]) == 0.5
    assert auroc([0, 1], [2, 3]) == 1.0
