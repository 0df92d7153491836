"""Train the sensor model ``vibration-gauss`` from synthetic healthy windows and write model.onnx.

    python models/vibration-gauss/train.py            # writes models/vibration-gauss/model.onnx
    python models/vibration-gauss/train.py --out /tmp/m.onnx

Needs numpy and onnx (the ``train`` extra). Fixed seeds: a run reproduces the
shipped file (up to float rounding of the BLAS in use).

The model is a Gaussian density of healthy machines in feature space. The
features are :func:`streamd.nodes.sensor.vibration_features` (the same function
the ``sensor.features`` Node runs, imported from there). The mean and a slightly
shrunk covariance of healthy windows give a whitening matrix; ``score`` is the
Mahalanobis distance ``sqrt((x - mean)^T C^-1 (x - mean))``, and ``feature_z``
the per-feature deviation in standard deviations (which feature made the score).
The threshold is a high quantile of the scores of held-out healthy windows; no
faulty window is used to choose it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from streamd.metrics_quality import kind_figures, sensor_set  # noqa: E402
from streamd.nodes.sensor import FEATURE_NAMES, vibration_features  # noqa: E402

NAME = "vibration-gauss"
VERSION = "1.0.0"
SEED_FIT = 1101  # healthy windows for mean and covariance
SEED_VAL = 1102  # healthy windows for the threshold
SEED_CHECK = 1103  # a small labelled set printed at the end (held-out test sets use other seeds)
N_FIT = 3000
N_VAL = 2000
THRESHOLD_QUANTILE = 0.995
SHRINK = 0.05  # covariance shrinkage towards its diagonal
RATE_HZ = 5000.0
WINDOW = 4096


def features(windows: list[np.ndarray], rate_hz: float = RATE_HZ) -> np.ndarray:
    return np.stack([vibration_features(w, rate_hz) for w in windows]).astype(np.float32)


def fit(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [F], whitening matrix [F, F] (z = (x - mean) @ W) and per-feature std [F]."""
    x = f.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False)
    cov = (1 - SHRINK) * cov + SHRINK * np.diag(np.diag(cov))
    chol = np.linalg.cholesky(cov)  # cov = L L^T  ->  z = L^-1 (x - mean)
    w = np.linalg.inv(chol).T
    return mean.astype(np.float32), w.astype(np.float32), np.sqrt(np.diag(cov)).astype(np.float32)


def build(mean: np.ndarray, w: np.ndarray, std: np.ndarray, meta: dict[str, str]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nf = mean.size
    init = [
        numpy_helper.from_array(mean.reshape(1, -1), "mean"),
        numpy_helper.from_array(w, "whiten"),
        numpy_helper.from_array((1.0 / std).reshape(1, -1).astype(np.float32), "inv_std"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "whiten"], ["z"], name="whiten"),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
        helper.make_node("ReduceSum", ["z2", "axis1"], ["d2"], keepdims=0, name="mahalanobis2"),
        helper.make_node("Sqrt", ["d2"], ["score"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["feature_z"]),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", nf])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("feature_z", TensorProto.FLOAT, ["N", nf]),
        ],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamd")
    model.ir_version = 8
    model.doc_string = (
        "Vibration anomaly model: Mahalanobis distance of streamd.nodes.sensor.vibration_features "
        f"({nf} features: {', '.join(FEATURE_NAMES)}) from healthy machines. See MODEL_CARD.md."
    )
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def score(model, f: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["score"], {"features": f})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    windows, _ = sensor_set(SEED_FIT, N_FIT, 0, rate_hz=RATE_HZ, n=WINDOW)
    mean, w, std = fit(features(windows))
    print(f"fitted on {N_FIT} healthy windows in {time.perf_counter() - t0:.1f}s")

    meta = {
        "streamd.name": NAME,
        "streamd.version": VERSION,
        "streamd.kind": "sensor",
        "streamd.threshold": "0",
        "streamd.features": ",".join(FEATURE_NAMES),
        "streamd.window": str(WINDOW),
    }
    windows, _ = sensor_set(SEED_VAL, N_VAL, 0, rate_hz=RATE_HZ, n=WINDOW)
    val = score(build(mean, w, std, meta), features(windows))
    threshold = float(np.quantile(val, THRESHOLD_QUANTILE))
    meta["streamd.threshold"] = f"{threshold:.4f}"
    model = build(mean, w, std, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.SerializeToString())
    print(
        f"threshold {threshold:.4f} = {THRESHOLD_QUANTILE} quantile of {N_VAL} healthy validation scores "
        f"(median {np.median(val):.3f}, max {val.max():.3f})"
    )

    windows, labels = sensor_set(SEED_CHECK, 300, 100, rate_hz=RATE_HZ, n=WINDOW)
    rows, fpr = kind_figures(score(model, features(windows)), labels, threshold)
    print(f"check set (seed {SEED_CHECK}): false-positive rate at threshold {fpr:.3f}")
    for row in rows:
        print(row.line())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.1f} kB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
