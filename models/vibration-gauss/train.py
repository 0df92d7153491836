"""Train the sensor model ``vibration-gauss`` from synthetic healthy windows and write model.onnx.

    python models/vibration-gauss/train.py            # writes models/vibration-gauss/model.onnx
    python models/vibration-gauss/train.py --out /tmp/m.onnx

Needs numpy and onnx (the ``train`` extra). Fixed seeds: a run reproduces the
shipped file (up to float rounding of the BLAS in use).

The model is a Gaussian density of healthy machines in feature space, one per
feature group. The features are :func:`streamd.nodes.sensor.vibration_features`
(the same function the ``sensor.features`` Node runs, imported from there), in
the groups of :data:`streamd.nodes.sensor.FEATURE_GROUPS`: ``imbalance`` (the 1x
line), ``looseness`` (half orders, 4x-10x, crest factor), ``bearing`` (the
1.25-2.5 kHz band: kurtosis, level, envelope spectrum at BPFO) and ``overall``.
For each group, the mean and a slightly shrunk covariance of healthy windows
give a whitening matrix and the Mahalanobis distance
``sqrt((x - mean)^T C^-1 (x - mean))`` over that group's features, divided by
the largest distance seen on the healthy fitting windows: ``group_score`` is 1.0
at the edge of the healthy fleet, in every group. ``score`` is the largest
group score (a fault has to stand out in one group only, as a vibration analyst
sets one alarm per fault frequency band, and is not diluted by the spread of
the features that it leaves alone); ``feature_z`` is the per-feature deviation
in standard deviations (which feature made the score).

The threshold is the largest score of held-out healthy windows times a margin;
no faulty window is used to choose it.
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
from streamd.nodes.sensor import FEATURE_GROUPS, FEATURE_NAMES, vibration_features  # noqa: E402

NAME = "vibration-gauss"
VERSION = "1.1.0"
SEED_FIT = 1101  # healthy windows for means, covariances and group limits
SEED_VAL = 1102  # healthy windows for the threshold
SEED_CHECK = 1103  # a small labelled set printed at the end (held-out test sets use other seeds)
N_FIT = 8000
N_VAL = 6000
THRESHOLD_MARGIN = 1.4  # threshold = largest healthy validation score x this
SHRINK = 0.05  # covariance shrinkage towards its diagonal
RATE_HZ = 5000.0
WINDOW = 4096


def features(windows: list[np.ndarray], rate_hz: float = RATE_HZ) -> np.ndarray:
    return np.stack([vibration_features(w, rate_hz) for w in windows]).astype(np.float32)


def group_columns() -> list[list[int]]:
    return [[FEATURE_NAMES.index(name) for name in names] for names in FEATURE_GROUPS.values()]


def fit(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean [F], block-diagonal whitening [F, F] (z = (x - mean) @ W), per-feature std [F],
    group indicator [F, G] and the inverse of each group's largest healthy distance [G]."""
    x = f.astype(np.float64)
    nf = x.shape[1]
    mean = x.mean(0)
    std = x.std(0)
    w = np.zeros((nf, nf))
    member = np.zeros((nf, len(FEATURE_GROUPS)))
    inv_limit = np.zeros(len(FEATURE_GROUPS))
    for g, cols in enumerate(group_columns()):
        xc = x[:, cols] - mean[cols]
        cov = np.atleast_2d(np.cov(xc, rowvar=False))
        cov = (1 - SHRINK) * cov + SHRINK * np.diag(np.diag(cov))
        wg = np.linalg.inv(np.linalg.cholesky(cov)).T  # cov = L L^T  ->  z = L^-1 (x - mean)
        w[np.ix_(cols, cols)] = wg
        member[cols, g] = 1.0
        inv_limit[g] = 1.0 / float(np.sqrt(((xc @ wg) ** 2).sum(1)).max())
    f32 = np.float32
    return mean.astype(f32), w.astype(f32), std.astype(f32), member.astype(f32), inv_limit.astype(f32)


def build(mean, w, std, member, inv_limit, meta: dict[str, str]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nf, ng = member.shape
    init = [
        numpy_helper.from_array(mean.reshape(1, -1), "mean"),
        numpy_helper.from_array(w, "whiten"),
        numpy_helper.from_array(member, "groups"),
        numpy_helper.from_array(inv_limit.reshape(1, -1), "inv_limit"),
        numpy_helper.from_array((1.0 / std).reshape(1, -1).astype(np.float32), "inv_std"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "whiten"], ["z"], name="whiten"),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
        helper.make_node("MatMul", ["z2", "groups"], ["d2"], name="mahalanobis2_per_group"),
        helper.make_node("Sqrt", ["d2"], ["d"]),
        helper.make_node("Mul", ["d", "inv_limit"], ["group_score"]),
        helper.make_node("ReduceMax", ["group_score"], ["score"], axes=[1], keepdims=0, name="worst_group"),
        helper.make_node("Mul", ["centred", "inv_std"], ["feature_z"]),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", nf])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("feature_z", TensorProto.FLOAT, ["N", nf]),
            helper.make_tensor_value_info("group_score", TensorProto.FLOAT, ["N", ng]),
        ],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamd")
    model.ir_version = 8
    model.doc_string = (
        "Vibration anomaly model: per feature group (" + ", ".join(FEATURE_GROUPS) + "), the Mahalanobis distance "
        f"of streamd.nodes.sensor.vibration_features ({nf} features: {', '.join(FEATURE_NAMES)}) from healthy "
        "machines over the largest healthy one; score = the largest. See MODEL_CARD.md."
    )
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def run(model, f: np.ndarray, output: str = "score") -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([output], {"features": f})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    windows, _ = sensor_set(SEED_FIT, N_FIT, 0, rate_hz=RATE_HZ, n=WINDOW)
    params = fit(features(windows))
    print(f"fitted on {N_FIT} healthy windows in {time.perf_counter() - t0:.1f}s")

    meta = {
        "streamd.name": NAME,
        "streamd.version": VERSION,
        "streamd.kind": "sensor",
        "streamd.threshold": "0",
        "streamd.features": ",".join(FEATURE_NAMES),
        "streamd.groups": ";".join(f"{g}={','.join(names)}" for g, names in FEATURE_GROUPS.items()),
        "streamd.window": str(WINDOW),
        "streamd.rate_hz": f"{RATE_HZ:g}",
    }
    windows, _ = sensor_set(SEED_VAL, N_VAL, 0, rate_hz=RATE_HZ, n=WINDOW)
    val_groups = run(build(*params, meta), features(windows), "group_score")
    val = val_groups.max(1)
    threshold = float(val.max()) * THRESHOLD_MARGIN
    meta["streamd.threshold"] = f"{threshold:.4f}"
    model = build(*params, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.SerializeToString())
    print(
        f"threshold {threshold:.4f} = {THRESHOLD_MARGIN} x the largest of {N_VAL} healthy validation scores "
        f"(median {np.median(val):.3f}, max {val.max():.3f}; per group max "
        + ", ".join(f"{g} {v:.3f}" for g, v in zip(FEATURE_GROUPS, val_groups.max(0), strict=True))
        + ")"
    )

    windows, labels = sensor_set(SEED_CHECK, 300, 100, rate_hz=RATE_HZ, n=WINDOW)
    scores = run(model, features(windows))
    rows, fpr = kind_figures(scores, labels, threshold)
    print(f"check set (seed {SEED_CHECK}): false-positive rate at threshold {fpr:.3f}")
    for row in rows:
        lowest = scores[np.array([lab == row.kind or (row.kind == "all" and lab is not None) for lab in labels])].min()
        print(f"{row.line()}  lowest score {lowest:.3f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.1f} kB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
