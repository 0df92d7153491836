"""Print the quality figures of the shipped models on held-out synthetic data.

    python models/evaluate.py            # full sets (about two minutes on 2 CPU cores)
    python models/evaluate.py --quick    # smaller sets

For each model file under models/ and each held-out set (regenerated with fixed
seeds that the training scripts never use), per defect / fault kind: AUROC
(rank based), recall at the threshold shipped in the model's metadata, and the
false-positive rate of the normal samples at that threshold. Then the model's
latency with ONNX Runtime on CPU, batch 1. Needs numpy, onnxruntime and pillow
only (what streamd itself needs).

The camera model is also judged on the *production path*
(:func:`production_set`): frames of many resolutions and aspect ratios, grey or
RGB, sent raw or as JPEG, turned into model input by the ``image.decode`` and
``image.preprocess`` Nodes themselves. ``models/surface-ae/train.py`` trains and
picks its threshold on such frames (other seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from streamd import synth  # noqa: E402
from streamd.metrics_quality import camera_set, kind_figures, sensor_set  # noqa: E402
from streamd.nodes.sensor import vibration_features  # noqa: E402

CAMERA = HERE / "surface-ae" / "model.onnx"
SENSOR = HERE / "vibration-gauss" / "model.onnx"

# (title, seed, size, channels, normal, per kind); full and --quick counts
CAMERA_SETS = [
    ("128x128 grey", 2001, (128, 128), 1, (1000, 200), (300, 60)),
    ("240x320 RGB, resized to 128x128", 2002, (240, 320), 3, (300, 100), (100, 30)),
    ("480x640 RGB, resized to 128x128", 2003, (480, 640), 3, (300, 100), (100, 30)),
    ("96x96 RGB, resized to 128x128", 2004, (96, 96), 3, (300, 100), (100, 30)),
    ("240x320 RGB, JPEG quality 90 (as streamd demo sends), resized", 2005, (240, 320), 3, (300, 100), (100, 30)),
]
JPEG_SETS = {2005: 90}
# (title, seed, rate, samples, normal, per kind)
SENSOR_SETS = [
    ("5 kHz, 4096 samples", 3001, 5000.0, 4096, (5000, 300), (300, 60)),
    ("10 kHz, 8192 samples", 3002, 10000.0, 8192, (1000, 100), (100, 30)),
    ("5 kHz, 2048 samples (shorter window)", 3003, 5000.0, 2048, (1000, 100), (100, 30)),
]


def sensor_margins(scores: np.ndarray, labels: list, threshold: float) -> None:
    """How far the highest normal score and the lowest score of each fault kind are from the threshold."""
    kinds = np.array(["ok" if lab is None else lab for lab in labels])
    top = float(scores[kinds == "ok"].max())
    lows = ", ".join(
        f"{k} {scores[kinds == k].min():.3f}" for k in dict.fromkeys(kinds.tolist()) if k != "ok"
    )
    print(f"    highest normal score {top:.3f} (threshold / {threshold / top:.2f}); lowest score: {lows}")


# The production path: frames of many resolutions and aspect ratios, grey or RGB, sent raw or
# as JPEG of varying quality, decoded and resized by the image.decode / image.preprocess Nodes.
PRODUCTION_SIZES: tuple[tuple[int, int], ...] = (
    (128, 128),
    (240, 320),
    (96, 160),
    (480, 640),
    (96, 96),
    (120, 160),
    (200, 200),
    (144, 176),
    (256, 256),
    (180, 320),
    (300, 400),
    (160, 120),
    (112, 112),
    (360, 480),
)
PRODUCTION_JPEG = (75, 95)  # quality drawn uniformly in this range (inclusive)
PRODUCTION_RAW = 0.2  # share of frames sent uncompressed
DEMO_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (240, 320), (96, 160))  # what tests/support.py sends
# (title, seed, sizes, JPEG quality range, raw share, (normal, per kind) full and --quick)
PRODUCTION_SETS = [
    (
        "14 sizes/aspect ratios, grey or RGB, raw or JPEG q75-95",
        2006,
        PRODUCTION_SIZES,
        PRODUCTION_JPEG,
        PRODUCTION_RAW,
        (3000, 200),
        (600, 40),
    ),
    (
        "128x128, 240x320, 96x160, grey or RGB, JPEG q90 (as the end-to-end tests send)",
        2007,
        DEMO_SIZES,
        (90, 90),
        0.0,
        (1500, 100),
        (300, 30),
    ),
]


def shipped_preprocess_params() -> dict:
    """The ``preprocess`` Node's params in topologies/surface-inspection.yaml (size, grayscale, dtype)."""
    import yaml

    topo = yaml.safe_load((HERE.parent / "topologies" / "surface-inspection.yaml").read_text())
    return dict(topo["nodes"]["preprocess"]["params"])


class ProductionPath:
    """A frame's way into the model in production: TP frame message -> image.decode -> image.preprocess.

    Uses the Nodes themselves (``decode_frame`` and :class:`~streamd.nodes.image.Preprocess`
    with the surface-inspection topology's params), so what the model is trained and judged
    on is what a running pipeline feeds it.
    """

    def __init__(self) -> None:
        from streamd.config import Settings
        from streamd.nodes.base import NodeEnv, Origin, RunContext
        from streamd.nodes.image import Preprocess

        env = NodeEnv(settings=Settings(), topology_name="surface-ae", base_dir=HERE)
        self._pre = Preprocess("preprocess", shipped_preprocess_params(), env)
        self._run = RunContext(
            topology="surface-ae", run_id="eval", origin=Origin("cameras.frames", 0, 0), kind="frame"
        )

    @staticmethod
    def message(img: np.ndarray, jpeg_quality: int | None) -> dict:
        """The decoded TP ``frame`` message a camera would send (raw, or JPEG at ``jpeg_quality``)."""
        import io

        from PIL import Image

        if jpeg_quality is None:
            return {"kind": "frame", "codec": "raw", "shape": list(img.shape), "dtype": "uint8", "data": img.tobytes()}
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="JPEG", quality=jpeg_quality)
        return {"kind": "frame", "codec": "jpeg", "data": buf.getvalue()}

    def __call__(self, img: np.ndarray, jpeg_quality: int | None) -> np.ndarray:
        """uint8 [h, w, c] frame -> float32 [1, 128, 128] model input (rounded as the topology's dtype)."""
        from streamd.nodes.image import decode_frame

        arr = decode_frame(self.message(img, jpeg_quality))
        tensor = self._pre.process(self._run, {"decode": arr})["tensor"]
        return tensor.astype(np.float32)  # as the onnx.model Node casts it for the model


def production_set(
    seed: int,
    n_normal: int,
    n_per_defect: int,
    kinds: tuple[str, ...] = synth.DEFECT_KINDS,
    sizes: tuple[tuple[int, int], ...] = PRODUCTION_SIZES,
    jpeg_quality: tuple[int, int] = PRODUCTION_JPEG,
    raw_share: float = PRODUCTION_RAW,
) -> tuple[np.ndarray, list[str | None]]:
    """A labelled set [N, 1, 128, 128] through the production path, normal first then each kind.

    Each frame draws its size from ``sizes``, 1 or 3 channels, and raw (with probability
    ``raw_share``) or JPEG with a quality in ``jpeg_quality`` (inclusive), from a generator of
    its own, so that the frames themselves do not depend on these choices.
    """
    rng = np.random.default_rng(seed)
    setup = np.random.default_rng([seed, 1])
    path = ProductionPath()
    labels: list[str | None] = [None] * n_normal + [k for k in kinds for _ in range(n_per_defect)]
    x = np.empty((len(labels), 1, 128, 128), dtype=np.float32)
    for i, lab in enumerate(labels):
        size = sizes[int(setup.integers(len(sizes)))]
        channels = 1 if setup.random() < 0.5 else 3
        raw = setup.random() < raw_share
        quality = int(setup.integers(jpeg_quality[0], jpeg_quality[1] + 1))
        img, _ = synth.camera_frame(rng, lab, size=size, channels=channels)
        x[i] = path(img, None if raw else quality)
    return x, labels


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def header(sess, path: Path) -> float:
    meta = sess.get_modelmeta().custom_metadata_map
    thr = float(meta["streamd.threshold"])
    extra = f"  map_threshold {meta['streamd.map_threshold']}" if "streamd.map_threshold" in meta else ""
    print(
        f"\n{meta['streamd.name']} {meta['streamd.version']} ({meta['streamd.kind']})  "
        f"{path.relative_to(HERE.parent)}  {path.stat().st_size / 1e3:.1f} kB  threshold {thr:g}{extra}"
    )
    return thr


def report(title: str, scores: np.ndarray, labels: list, threshold: float) -> None:
    rows, fpr = kind_figures(scores, labels, threshold)
    n_ok = sum(1 for lab in labels if lab is None)
    print(f"  {title}: {n_ok} normal + {rows[0].n} per kind")
    print(f"    {'kind':<10} {'n':>5}  {'AUROC':>6}  {'recall@thr':>10}")
    for r in rows:
        print(f"    {r.kind:<10} {r.n:>5}  {r.auroc:6.4f}  {r.recall:10.3f}")
    print(f"    false-positive rate at threshold: {fpr:.4f} ({round(fpr * n_ok)}/{n_ok} normal)")


def latency(sess, name: str, x: np.ndarray) -> None:
    for _ in range(20):
        sess.run(None, {name: x})
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    print(
        f"  latency, ONNX Runtime CPU, batch 1, 1 thread: median {np.median(times) * 1e3:.2f} ms, "
        f"p99 {np.quantile(times, 0.99) * 1e3:.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller held-out sets")
    args = ap.parse_args(argv)
    pick = 5 if args.quick else 4
    t0 = time.perf_counter()

    sess = session(CAMERA)
    thr = header(sess, CAMERA)
    for title, seed, size, ch, *counts in CAMERA_SETS:
        n_ok, n_kind = counts[pick - 4]
        x, labels = camera_set(seed, n_ok, n_kind, size=size, channels=ch, jpeg_quality=JPEG_SETS.get(seed))
        scores = np.concatenate([sess.run(["score"], {"image": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
        report(f"{title}, seed {seed}", scores, labels, thr)
    print("  production path (TP frame -> image.decode -> image.preprocess):")
    for title, seed, sizes, quality, raw_share, *counts in PRODUCTION_SETS:
        n_ok, n_kind = counts[pick - 4]
        x, labels = production_set(seed, n_ok, n_kind, sizes=sizes, jpeg_quality=quality, raw_share=raw_share)
        scores = np.concatenate([sess.run(["score"], {"image": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
        report(f"{title}, seed {seed}", scores, labels, thr)
        ok = scores[:n_ok]
        print(
            f"    normal scores: median {np.median(ok):.3f}, max {ok.max():.3f} ({ok.max() / thr:.2f} x threshold); "
            f"lowest defect score {scores[n_ok:].min():.3f} ({scores[n_ok:].min() / thr:.2f} x threshold)"
        )
    latency(session(CAMERA, 1), "image", np.random.default_rng(0).random((1, 1, 128, 128), dtype=np.float32))

    sess = session(SENSOR)
    thr = header(sess, SENSOR)
    for title, seed, rate, n, *counts in SENSOR_SETS:
        n_ok, n_kind = counts[pick - 4]
        windows, labels = sensor_set(seed, n_ok, n_kind, rate_hz=rate, n=n)
        feats = np.stack([vibration_features(w, rate) for w in windows])
        scores = sess.run(["score"], {"features": feats})[0]
        report(f"{title}, seed {seed}", scores, labels, thr)
        sensor_margins(scores, labels, thr)
    latency(session(SENSOR, 1), "features", feats[:1])
    t_feat = time.perf_counter()
    for w in windows[:200]:
        vibration_features(w, rate)
    print(
        f"  feature extraction (sensor.features, numpy): {(time.perf_counter() - t_feat) / 200 * 1e3:.2f} ms per window"
    )
    print(f"\n(evaluated in {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
