"""Train the camera model ``surface-ae`` from synthetic normal frames and write model.onnx.

    python models/surface-ae/train.py            # writes models/surface-ae/model.onnx
    python models/surface-ae/train.py --out /tmp/m.onnx

Needs numpy, pillow and onnx (the ``train`` extra); no deep-learning framework.
Every number comes from fixed seeds, so a run reproduces the shipped file's
weights (up to float rounding of the BLAS in use).

Training data go through the *production path*: frames rendered at many
resolutions and aspect ratios, grey or RGB, sent raw or as JPEG of quality
75-95, decoded and resized to 128x128 by the ``image.decode`` and
``image.preprocess`` Nodes themselves (``models/evaluate.py:production_set``).
What the model learns as "normal", and the threshold, are therefore those of the
frames a running pipeline feeds it, not of ideal 128x128 renders.

The model is two linear auto-encoders fitted in closed form (PCA) on normal
frames only, turned into an ONNX graph:

* local branch (texture): the frame is blurred (Gaussian, sigma 1.5 px) and the
  brushing is taken out by subtracting from every pixel the mean of the 25
  pixels of its row (the brushing runs along the rows, to within the part's
  +-3 degrees). The 5x5 patch around every second pixel of that (frame edges
  mirrored) is whitened by the patch covariance of normal frames (a stride-2
  ``Conv`` = the PCA encoder scaled by 1/sqrt(eigenvalue + noise floor)); its
  squared norm is the patch's Mahalanobis distance, divided by the frame's
  typical distance (the mean of the map after a 3x3 erosion). Blur, floor and
  that division make a frame rendered at 128x128 (sharp pixel noise) and one
  downsized from 480x640 or JPEG-compressed (soft) look alike to the model,
  while a scratch or a stain, patch content across the brushing, stays far
  out. Catches scratches and spots.
* global branch (layout): the frame, average-pooled 8x8 to 16x16, is encoded
  onto the top 48 principal components of normal frames and decoded back
  (``MatMul`` pair); the squared residual, upsampled, is high where the part's
  layout differs from every normal part. Catches missing bolts.

Each branch's map is smoothed and turned into a z-score per pixel: minus its
median on normal frames, divided by its spread there (0.99 quantile minus
median, the largest within 2 px: bolt edges vary with the part's pose, flat
metal does not), scaled so that the largest value on the normal frames is 1;
the anomaly map is the larger of the two and ``score`` its maximum. The image
threshold is the largest score of 3000 held-out normal production-path frames
times a margin (no defect is used to choose it).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(HERE.parent))  # models/evaluate.py: the production-path data sets

from evaluate import production_set  # noqa: E402

from streamd.metrics_quality import kind_figures  # noqa: E402

NAME = "surface-ae"
VERSION = "1.1.0"
SEED_FIT = 1001  # normal frames for the PCA fits
SEED_NORM = 1002  # normal frames for the per-pixel map statistics
SEED_VAL = 1003  # normal frames for the image threshold
SEED_CHECK = 1004  # a small labelled set printed at the end (the held-out test sets use other seeds)

N_FIT = 800
N_NORM = 800
N_VAL = 3000
THRESHOLD_MARGIN = 1.25  # threshold = margin x the largest normal validation score
MAP_THRESHOLD = 1.0  # per-pixel level for drawing regions (1 = the extreme pixel of a normal frame)
BRANCH_QUANTILE = 1.0  # each branch: this quantile of the normal frames' maximum z becomes 1
SPREAD_QUANTILE = 0.99  # per-pixel spread: this quantile of the normal frames' map minus its median ...
SPREAD_RADIUS = 2  # ... taken as the largest within this many pixels (the part moves a few pixels)
SPREAD_FLOOR_QUANTILE = 0.25  # and at least this quantile of the spread map

POOL = 8
N_GLOBAL = 48


@dataclass(frozen=True)
class Branch:
    """A patch Mahalanobis branch: [average-pool], [blur], [row high-pass], mirror-pad, whitening Conv,
    squared norm, [divide by the frame's typical distance], smooth, upsample to 128x128."""

    name: str
    pool: int  # average-pooling factor before the patches
    patch: int  # patch side
    stride: int  # patch step (on the pooled frame)
    floor: float  # variance added to every eigenvalue (noise floor)
    sigma: float  # Gaussian smoothing of the distance map, in its own pixels
    frame_norm: bool = False  # divide the distance map by the frame's typical (eroded mean) distance
    hp: int = 0  # subtract the mean of the 2*hp+1 pixels along the row (the brushing direction) first
    blur: float = 0.0  # Gaussian pre-blur (sigma, px of the pooled frame) before everything else

    @property
    def grid(self) -> int:
        return 128 // self.pool // self.stride


BRANCHES = (Branch("local", pool=1, patch=5, stride=2, floor=2e-4, sigma=0.75, frame_norm=True, hp=12, blur=1.5),)


def normal_frames(seed: int, n: int) -> np.ndarray:
    x, _ = production_set(seed, n, 0)
    return x


def pool(x: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, c, h // k, k, w // k, k).mean((3, 5))


def row_highpass(x: np.ndarray, k: int) -> np.ndarray:
    """x minus its mean over 2k+1 pixels along each row (edges mirrored); as the graph's hp Conv."""
    if k == 0:
        return x
    xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (k, k)), mode="reflect").astype(np.float64)
    c = np.cumsum(np.pad(xp, ((0, 0), (0, 0), (0, 0), (1, 0))), axis=3)
    w = x.shape[3]
    return (x - (c[..., 2 * k + 1 : 2 * k + 1 + w] - c[..., :w]) / (2 * k + 1)).astype(np.float32)


def gauss1d(sigma: float) -> np.ndarray:
    r = int(np.ceil(2.5 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with mirrored edges; as the graph's blur Conv."""
    if sigma <= 0:
        return x
    g = gauss1d(sigma).astype(np.float64)
    r = len(g) // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    h, w = x.shape[2:]
    y = sum(g[i] * xp[:, :, i : i + h, :] for i in range(len(g)))
    y = sum(g[i] * y[:, :, :, i : i + w] for i in range(len(g)))
    return y.astype(np.float32)


def fit_branch(
    b: Branch, x: np.ndarray, rng: np.random.Generator, per_image: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Whitening filters [P*P, 1, P, P] and biases from random patches of normal frames (mirrored edges)."""
    p, r = b.patch, b.patch // 2
    xp = np.pad(row_highpass(blur(pool(x, b.pool), b.blur), b.hp), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    n, _, h, w = xp.shape
    ys = rng.integers(0, h - p + 1, size=(n, per_image))
    xs = rng.integers(0, w - p + 1, size=(n, per_image))
    oy, ox = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    patches = xp[np.arange(n)[:, None, None, None], 0, ys[..., None, None] + oy, xs[..., None, None] + ox]
    patches = patches.reshape(-1, p * p).astype(np.float64)
    mu = patches.mean(0)
    cov = np.cov(patches, rowvar=False)
    lam, vec = np.linalg.eigh(cov)
    lam = np.maximum(lam, 0) + b.floor
    wmat = (vec / np.sqrt(lam)).T  # rows: whitened components
    return wmat.reshape(-1, 1, p, p).astype(np.float32), (-wmat @ mu).astype(np.float32)


def fit_global(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and top principal components [D, K] of the 8x8-pooled frames."""
    pooled = pool(x, POOL).reshape(len(x), -1).astype(np.float64)
    mu = pooled.mean(0)
    _, _, vt = np.linalg.svd(pooled - mu, full_matrices=False)
    return mu.astype(np.float32), vt[:N_GLOBAL].T.astype(np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)[None, None]


def build(
    fitted: dict[str, tuple[np.ndarray, np.ndarray]],
    g_mu: np.ndarray,
    g_pc: np.ndarray,
    stats: dict[str, np.ndarray] | None,
    meta: dict[str, str],
):
    """The ONNX graph. With ``stats`` None, outputs the raw smoothed branch maps (for fitting the stats)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s = 128 // POOL
    init = [
        numpy_helper.from_array(g_mu.reshape(1, -1), "global_mu"),
        numpy_helper.from_array(g_pc, "global_enc"),
        numpy_helper.from_array(np.ascontiguousarray(g_pc.T), "global_dec"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, 1, s, s], dtype=np.int64), "shape_pooled"),
        numpy_helper.from_array(np.array([1.0, 1.0, float(POOL), float(POOL)], dtype=np.float32), "global_scales"),
        numpy_helper.from_array(np.array([], dtype=np.float32), "empty_roi"),
    ]
    nodes = []
    names = []
    for b in BRANCHES:
        w, bias = fitted[b.name]
        r = b.patch // 2
        smooth = gaussian_kernel(b.sigma)
        rs = smooth.shape[-1] // 2
        up = 128 // b.grid
        init += [
            numpy_helper.from_array(w, f"{b.name}_w"),
            numpy_helper.from_array(bias, f"{b.name}_b"),
            numpy_helper.from_array(smooth, f"{b.name}_smooth_w"),
            numpy_helper.from_array(np.array([0, 0, r, r, 0, 0, r, r], dtype=np.int64), f"{b.name}_pads"),
            numpy_helper.from_array(np.array([0, 0, rs, rs, 0, 0, rs, rs], dtype=np.int64), f"{b.name}_spads"),
            numpy_helper.from_array(np.array([1.0, 1.0, float(up), float(up)], dtype=np.float32), f"{b.name}_scales"),
        ]
        src = "image"
        if b.pool > 1:
            nodes.append(
                helper.make_node(
                    "AveragePool",
                    ["image"],
                    [f"{b.name}_pooled"],
                    kernel_shape=[b.pool, b.pool],
                    strides=[b.pool, b.pool],
                )
            )
            src = f"{b.name}_pooled"
        if b.blur > 0:
            g = gauss1d(b.blur)
            rb = len(g) // 2
            init += [
                numpy_helper.from_array(g.reshape(1, 1, -1, 1), f"{b.name}_blur_v"),
                numpy_helper.from_array(g.reshape(1, 1, 1, -1), f"{b.name}_blur_h"),
                numpy_helper.from_array(np.array([0, 0, rb, rb, 0, 0, rb, rb], dtype=np.int64), f"{b.name}_blur_pads"),
            ]
            nodes += [  # separable: a column then a row Conv
                helper.make_node("Pad", [src, f"{b.name}_blur_pads"], [f"{b.name}_blur_in"], mode="reflect"),
                helper.make_node(
                    "Conv",
                    [f"{b.name}_blur_in", f"{b.name}_blur_v"],
                    [f"{b.name}_blur_mid"],
                    name=f"{b.name}_blur_columns",
                ),
                helper.make_node(
                    "Conv",
                    [f"{b.name}_blur_mid", f"{b.name}_blur_h"],
                    [f"{b.name}_blurred"],
                    name=f"{b.name}_blur_rows",
                ),
            ]
            src = f"{b.name}_blurred"
        if b.hp:
            width = 2 * b.hp + 1
            hp_w = np.full((1, 1, 1, width), -1.0 / width, dtype=np.float32)
            hp_w[0, 0, 0, b.hp] += 1.0
            init += [
                numpy_helper.from_array(hp_w, f"{b.name}_hp_w"),
                numpy_helper.from_array(np.array([0, 0, 0, b.hp, 0, 0, 0, b.hp], dtype=np.int64), f"{b.name}_hp_pads"),
            ]
            nodes += [
                helper.make_node("Pad", [src, f"{b.name}_hp_pads"], [f"{b.name}_hp_in"], mode="reflect"),
                helper.make_node(
                    "Conv", [f"{b.name}_hp_in", f"{b.name}_hp_w"], [f"{b.name}_hp"], name=f"{b.name}_row_highpass"
                ),
            ]
            src = f"{b.name}_hp"
        nodes += [
            helper.make_node("Pad", [src, f"{b.name}_pads"], [f"{b.name}_padded"], mode="reflect"),
            helper.make_node(
                "Conv",
                [f"{b.name}_padded", f"{b.name}_w", f"{b.name}_b"],
                [f"{b.name}_z"],
                strides=[b.stride, b.stride],
                name=f"{b.name}_whiten",
            ),
            helper.make_node("Mul", [f"{b.name}_z", f"{b.name}_z"], [f"{b.name}_z2"]),
            helper.make_node(
                "ReduceSum", [f"{b.name}_z2", "axis1"], [f"{b.name}_d2"], keepdims=1, name=f"{b.name}_mahalanobis"
            ),
        ]
        d2 = f"{b.name}_d2"
        if b.frame_norm:
            # the frame's typical patch distance: the mean of the map after a 3x3 erosion (so that a thin
            # scratch barely moves it); sharp frames (rendered at 128x128) and soft ones (downsized, JPEG)
            # then share one scale. Erosion = -MaxPool(-d2); the mean of the negated erosion is minus the
            # level, so d2 / (-level), negated, is d2 / level.
            nodes += [
                helper.make_node("Neg", [d2], [f"{b.name}_neg"]),
                helper.make_node(
                    "MaxPool", [f"{b.name}_neg"], [f"{b.name}_ero_neg"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
                ),
                helper.make_node("ReduceMean", [f"{b.name}_ero_neg"], [f"{b.name}_level_neg"], axes=[2, 3], keepdims=1),
                helper.make_node("Div", [d2, f"{b.name}_level_neg"], [f"{b.name}_d2n_neg"]),
                helper.make_node("Neg", [f"{b.name}_d2n_neg"], [f"{b.name}_d2n"]),
            ]
            d2 = f"{b.name}_d2n"
        nodes += [
            helper.make_node("Pad", [d2, f"{b.name}_spads"], [f"{b.name}_d2p"], mode="edge"),
            helper.make_node(
                "Conv", [f"{b.name}_d2p", f"{b.name}_smooth_w"], [f"{b.name}_sm"], name=f"{b.name}_smooth"
            ),
            helper.make_node(
                "Resize",
                [f"{b.name}_sm", "empty_roi", f"{b.name}_scales"],
                [f"{b.name}_raw"],
                mode="linear",
                name=f"{b.name}_upsample",
            ),
        ]
        names.append(b.name)
    # global branch: linear auto-encoder on the 16x16 pooled frame
    nodes += [
        helper.make_node("AveragePool", ["image"], ["g_pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["g_pooled"], ["flat"], axis=1),
        helper.make_node("Sub", ["flat", "global_mu"], ["centred"]),
        helper.make_node("MatMul", ["centred", "global_enc"], ["code"], name="global_encoder"),
        helper.make_node("MatMul", ["code", "global_dec"], ["recon"], name="global_decoder"),
        helper.make_node("Sub", ["centred", "recon"], ["resid"]),
        helper.make_node("Mul", ["resid", "resid"], ["resid2"]),
        helper.make_node("Reshape", ["resid2", "shape_pooled"], ["resid_map"]),
        helper.make_node(
            "Resize", ["resid_map", "empty_roi", "global_scales"], ["global_raw"], mode="linear", name="global_upsample"
        ),
    ]
    names.append("global")
    if stats is None:
        outputs = [helper.make_tensor_value_info(f"{k}_raw", TensorProto.FLOAT, ["N", 1, 128, 128]) for k in names]
    else:
        for k in names:
            for part in ("mean", "inv"):
                init.append(numpy_helper.from_array(stats[f"{k}_{part}"].astype(np.float32)[None, None], f"{k}_{part}"))
            nodes += [
                helper.make_node("Sub", [f"{k}_raw", f"{k}_mean"], [f"{k}_c"]),
                helper.make_node("Mul", [f"{k}_c", f"{k}_inv"], [f"{k}_map"]),
            ]
        nodes += [
            helper.make_node("Max", [f"{k}_map" for k in names], ["anomaly_map"]),
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
        "Surface anomaly model for 128x128 grey frames in [0,1]: patch Mahalanobis at two scales and "
        "linear auto-encoder residual, z-scored per pixel; trained on production-path frames. See MODEL_CARD.md."
    )
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def run(model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs: list[list[np.ndarray]] | None = None
    for i in range(0, len(x), batch):
        o = sess.run(None, {"image": x[i : i + batch]})
        outs = [list() for _ in o] if outs is None else outs
        for acc, a in zip(outs, o, strict=True):
            acc.append(a)
    assert outs is not None
    return [np.concatenate(a) for a in outs]


def _max_filter(a: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return a
    p = np.pad(a, r, mode="edge")
    h, w = a.shape
    return np.max([p[dy : dy + h, dx : dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)], axis=0)


def fit(x_fit: np.ndarray, x_norm: np.ndarray, verbose: bool = True):
    """(fitted branch filters, global mean, global PCs, per-pixel stats) from normal frames."""
    fitted = {b.name: fit_branch(b, x_fit, np.random.default_rng([SEED_FIT, i])) for i, b in enumerate(BRANCHES)}
    g_mu, g_pc = fit_global(x_fit)
    raw_maps = run(build(fitted, g_mu, g_pc, None, {}), x_norm)
    stats = {}
    for k, m in zip([b.name for b in BRANCHES] + ["global"], raw_maps, strict=True):
        m = m[:, 0]
        # heavy tails (bolt edges move with the pose, texture is not Gaussian): the spread is the
        # distance from the median to a high quantile, the largest over a small neighbourhood
        centre = np.median(m, 0)
        spread = _max_filter(np.quantile(m, SPREAD_QUANTILE, axis=0) - centre, SPREAD_RADIUS)
        # floor the spread so that a flat region cannot give huge z-scores
        spread = np.maximum(spread, np.quantile(spread, SPREAD_FLOOR_QUANTILE))
        # then put the branches on one scale: the largest z of the normal frames becomes 1 in each
        z_max = ((m - centre) / spread).reshape(len(m), -1).max(1)
        scale = float(np.quantile(z_max, BRANCH_QUANTILE))
        stats[f"{k}_mean"] = centre
        stats[f"{k}_inv"] = 1.0 / (spread * scale)
        if verbose:
            print(f"{k} branch: normal max z median {np.median(z_max):.2f}, q{BRANCH_QUANTILE} {scale:.2f}")
    return fitted, g_mu, g_pc, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    x_fit = normal_frames(SEED_FIT, N_FIT)
    x_norm = normal_frames(SEED_NORM, N_NORM)
    print(f"made {N_FIT} + {N_NORM} production-path normal frames in {time.perf_counter() - t0:.1f}s")
    fitted, g_mu, g_pc, stats = fit(x_fit, x_norm)
    del x_fit, x_norm

    meta = {
        "streamd.name": NAME,
        "streamd.version": VERSION,
        "streamd.kind": "camera",
        "streamd.threshold": "0",
        "streamd.map_threshold": f"{MAP_THRESHOLD:g}",
    }
    model = build(fitted, g_mu, g_pc, stats, meta)
    x_val = normal_frames(SEED_VAL, N_VAL)
    (_, val_scores) = run(model, x_val)
    threshold = float(val_scores.max()) * THRESHOLD_MARGIN
    meta["streamd.threshold"] = f"{threshold:.4f}"
    model = build(fitted, g_mu, g_pc, stats, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.SerializeToString())
    print(
        f"threshold {threshold:.4f} = {THRESHOLD_MARGIN} x the largest of {N_VAL} normal validation scores "
        f"(median {np.median(val_scores):.3f}, q0.999 {np.quantile(val_scores, 0.999):.3f}, "
        f"max {val_scores.max():.3f})"
    )

    x_chk, labels = production_set(SEED_CHECK, 300, 100)
    _, scores = run(model, x_chk)
    rows, fpr = kind_figures(scores, labels, threshold)
    print(f"check set (seed {SEED_CHECK}, production path): false-positive rate at threshold {fpr:.3f}")
    for row in rows:
        print(row.line())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
