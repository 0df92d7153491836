"""Train the camera model ``surface-ae`` from synthetic normal frames and write model.onnx.

    python models/surface-ae/train.py            # writes models/surface-ae/model.onnx
    python models/surface-ae/train.py --out /tmp/m.onnx

Needs numpy and onnx (the ``train`` extra); no deep-learning framework. Every
number comes from fixed seeds, so a run reproduces the shipped file's weights
(up to float rounding of the BLAS in use).

The model is two linear auto-encoders fitted in closed form (PCA) on normal
frames only, turned into an ONNX graph:

* local branch: the 7x7 patch around every second pixel is whitened by the patch
  covariance of normal frames (a stride-2 ``Conv`` with 49 filters = the PCA
  encoder scaled by 1/sqrt(eigenvalue)); its squared norm is the patch's
  Mahalanobis distance (PCA reconstruction error plus the in-subspace code's
  deviation). Catches scratches and spots: patch content the brushed texture
  never has.
* global branch: the frame, average-pooled 8x8 to 16x16, is encoded onto the
  top 48 principal components of normal frames and decoded back (``MatMul``
  pair, a linear auto-encoder); the squared residual, upsampled, is high where
  the part's layout differs from every normal part. Catches missing bolts.

Each branch's map is smoothed and turned into a z-score per pixel with the mean
and spread that map has on normal frames (bolt edges vary with the part's pose,
flat metal does not), and the anomaly map is the larger of the two. ``score`` is
the map's maximum. The image threshold is a high quantile of the scores of
held-out normal frames (no defect is used to choose it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from streamd.metrics_quality import camera_set, kind_figures  # noqa: E402

NAME = "surface-ae"
VERSION = "1.0.0"
SEED_FIT = 1001  # normal frames for the PCA fits
SEED_NORM = 1002  # normal frames for the per-pixel map statistics
SEED_VAL = 1003  # normal frames for the image threshold
SEED_CHECK = 1004  # a small labelled set printed at the end (the held-out test sets use other seeds)

N_FIT = 800
N_NORM = 400
N_VAL = 1000
THRESHOLD_QUANTILE = 0.995
MAP_THRESHOLD = 1.0  # per-pixel level for drawing regions (1 = the extreme pixel of an unusual normal frame)
BRANCH_QUANTILE = 0.99

PATCH = 7
POOL = 8
N_GLOBAL = 48
SMOOTH_SIGMA = 0.75  # in pixels of the stride-2 local map
STRIDE = 2
EPS_VAR = 1e-5


def normal_frames(seed: int, n: int) -> np.ndarray:
    x, _ = camera_set(seed, n, 0)
    return x


def fit_local(x: np.ndarray, rng: np.random.Generator, per_image: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Whitening filters [P*P, 1, P, P] and biases from random patches of normal frames."""
    n, _, h, w = x.shape
    p = PATCH
    ys = rng.integers(0, h - p + 1, size=(n, per_image))
    xs = rng.integers(0, w - p + 1, size=(n, per_image))
    oy, ox = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    patches = x[np.arange(n)[:, None, None, None], 0, ys[..., None, None] + oy, xs[..., None, None] + ox]
    patches = patches.reshape(-1, p * p).astype(np.float64)
    mu = patches.mean(0)
    cov = np.cov(patches, rowvar=False)
    lam, vec = np.linalg.eigh(cov)
    lam = np.maximum(lam, 0) + EPS_VAR
    wmat = (vec / np.sqrt(lam)).T  # rows: whitened components
    filters = wmat.reshape(-1, 1, p, p).astype(np.float32)
    bias = (-wmat @ mu).astype(np.float32)
    return filters, bias


def fit_global(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and top principal components [D, K] of the 4x4-pooled frames."""
    n = x.shape[0]
    s = 128 // POOL
    pooled = x.reshape(n, s, POOL, s, POOL).mean((2, 4)).reshape(n, -1).astype(np.float64)
    mu = pooled.mean(0)
    _, _, vt = np.linalg.svd(pooled - mu, full_matrices=False)
    return mu.astype(np.float32), vt[:N_GLOBAL].T.astype(np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)[None, None]


def build(
    filters: np.ndarray,
    bias: np.ndarray,
    g_mu: np.ndarray,
    g_pc: np.ndarray,
    stats: dict[str, np.ndarray] | None,
    meta: dict[str, str],
):
    """The ONNX graph. With ``stats`` None, outputs the raw smoothed branch maps (for fitting the stats)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s = 128 // POOL
    p = PATCH
    smooth = gaussian_kernel(SMOOTH_SIGMA)
    r = smooth.shape[-1] // 2
    init = [
        numpy_helper.from_array(filters, "local_w"),
        numpy_helper.from_array(bias, "local_b"),
        numpy_helper.from_array(smooth, "smooth_w"),
        numpy_helper.from_array(g_mu.reshape(1, -1), "global_mu"),
        numpy_helper.from_array(g_pc, "global_enc"),
        numpy_helper.from_array(np.ascontiguousarray(g_pc.T), "global_dec"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, 1, s, s], dtype=np.int64), "shape_pooled"),
        numpy_helper.from_array(np.array([1.0, 1.0, float(POOL), float(POOL)], dtype=np.float32), "up_scales"),
        numpy_helper.from_array(np.array([1.0, 1.0, float(STRIDE), float(STRIDE)], dtype=np.float32), "local_scales"),
        numpy_helper.from_array(np.array([], dtype=np.float32), "empty_roi"),
    ]
    nodes = [
        # local branch: Mahalanobis distance of the 7x7 patch at every second pixel, smoothed, upsampled
        helper.make_node(
            "Conv",
            ["image", "local_w", "local_b"],
            ["local_z"],
            pads=[p // 2] * 4,
            strides=[STRIDE, STRIDE],
            name="local_whiten",
        ),
        helper.make_node("Mul", ["local_z", "local_z"], ["local_z2"]),
        helper.make_node("ReduceSum", ["local_z2", "axis1"], ["local_d2"], keepdims=1, name="local_mahalanobis"),
        helper.make_node("Conv", ["local_d2", "smooth_w"], ["local_sm"], pads=[r] * 4, name="local_smooth"),
        helper.make_node(
            "Resize", ["local_sm", "empty_roi", "local_scales"], ["local_raw"], mode="linear", name="local_upsample"
        ),
        # global branch: linear auto-encoder on the 32x32 pooled frame
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Sub", ["flat", "global_mu"], ["centred"]),
        helper.make_node("MatMul", ["centred", "global_enc"], ["code"], name="global_encoder"),
        helper.make_node("MatMul", ["code", "global_dec"], ["recon"], name="global_decoder"),
        helper.make_node("Sub", ["centred", "recon"], ["resid"]),
        helper.make_node("Mul", ["resid", "resid"], ["resid2"]),
        helper.make_node("Reshape", ["resid2", "shape_pooled"], ["resid_map"]),
        helper.make_node(
            "Resize", ["resid_map", "empty_roi", "up_scales"], ["global_raw"], mode="linear", name="global_upsample"
        ),
    ]
    if stats is None:
        outputs = [
            helper.make_tensor_value_info("local_raw", TensorProto.FLOAT, ["N", 1, 128, 128]),
            helper.make_tensor_value_info("global_raw", TensorProto.FLOAT, ["N", 1, 128, 128]),
        ]
    else:
        for k in ("local_mean", "local_inv", "global_mean", "global_inv"):
            init.append(numpy_helper.from_array(stats[k].astype(np.float32)[None, None], k))
        nodes += [
            helper.make_node("Sub", ["local_raw", "local_mean"], ["local_c"]),
            helper.make_node("Mul", ["local_c", "local_inv"], ["local_map"]),
            helper.make_node("Sub", ["global_raw", "global_mean"], ["global_c"]),
            helper.make_node("Mul", ["global_c", "global_inv"], ["global_map"]),
            helper.make_node("Max", ["local_map", "global_map"], ["anomaly_map"]),
            helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
        ]
        outputs = [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, 128, 128]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 128, 128])],
        outputs,
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamd")
    model.ir_version = 8
    model.doc_string = (
        "Surface anomaly model for 128x128 grey frames in [0,1]: patch Mahalanobis (local) and "
        "linear auto-encoder residual (global), z-scored per pixel. See MODEL_CARD.md."
    )
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def run(model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = None
    for i in range(0, len(x), batch):
        o = sess.run(None, {"image": x[i : i + batch]})
        outs = [list() for _ in o] if outs is None else outs
        for acc, a in zip(outs, o, strict=True):
            acc.append(a)
    assert outs is not None
    return [np.concatenate(a) for a in outs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    x_fit = normal_frames(SEED_FIT, N_FIT)
    filters, bias = fit_local(x_fit, np.random.default_rng(SEED_FIT))
    g_mu, g_pc = fit_global(x_fit)
    del x_fit
    print(f"fitted PCA on {N_FIT} normal frames in {time.perf_counter() - t0:.1f}s")

    x_norm = normal_frames(SEED_NORM, N_NORM)
    raw = build(filters, bias, g_mu, g_pc, None, {})
    local_raw, global_raw = run(raw, x_norm)
    stats = {}
    for k, m in (("local", local_raw), ("global", global_raw)):
        mean = m.mean(0)[0]
        std = m.std(0)[0]
        # floor the spread so that a flat region cannot give huge z-scores
        std = np.maximum(std, np.quantile(std, 0.25))
        # then put both branches on one scale: a normal frame's maximum z is about 1 in each
        z_max = ((m - mean) / std).reshape(len(m), -1).max(1)
        scale = float(np.quantile(z_max, BRANCH_QUANTILE))
        stats[f"{k}_mean"] = mean
        stats[f"{k}_inv"] = 1.0 / (std * scale)
        print(f"{k} branch: normal max z median {np.median(z_max):.2f}, q{BRANCH_QUANTILE} {scale:.2f}")
    del x_norm

    meta = {
        "streamd.name": NAME,
        "streamd.version": VERSION,
        "streamd.kind": "camera",
        "streamd.threshold": "0",
        "streamd.map_threshold": f"{MAP_THRESHOLD:g}",
    }
    model = build(filters, bias, g_mu, g_pc, stats, meta)
    x_val = normal_frames(SEED_VAL, N_VAL)
    (_, val_scores) = run(model, x_val)
    threshold = float(np.quantile(val_scores, THRESHOLD_QUANTILE))
    meta["streamd.threshold"] = f"{threshold:.4f}"
    model = build(filters, bias, g_mu, g_pc, stats, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.SerializeToString())
    print(
        f"threshold {threshold:.4f} = {THRESHOLD_QUANTILE} quantile of {N_VAL} normal validation scores "
        f"(median {np.median(val_scores):.3f}, max {val_scores.max():.3f})"
    )

    x_chk, labels = camera_set(SEED_CHECK, 200, 100)
    _, scores = run(model, x_chk)
    rows, fpr = kind_figures(scores, labels, threshold)
    print(f"check set (seed {SEED_CHECK}): false-positive rate at threshold {fpr:.3f}")
    for row in rows:
        print(row.line())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
