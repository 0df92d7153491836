"""Print the quality figures of the shipped models on held-out synthetic data.

    python models/evaluate.py            # full sets (about a minute on 2 CPU cores)
    python models/evaluate.py --quick    # smaller sets

For each model file under models/ and each held-out set (regenerated with fixed
seeds that the training scripts never use), per defect / fault kind: AUROC
(rank based), recall at the threshold shipped in the model's metadata, and the
false-positive rate of the normal samples at that threshold. Then the model's
latency with ONNX Runtime on CPU, batch 1. Needs numpy, onnxruntime and pillow
only (what streamd itself needs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

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
    ("5 kHz, 4096 samples", 3001, 5000.0, 4096, (1000, 200), (300, 60)),
    ("10 kHz, 8192 samples", 3002, 10000.0, 8192, (300, 100), (100, 30)),
    ("5 kHz, 2048 samples (shorter window)", 3003, 5000.0, 2048, (300, 100), (100, 30)),
]


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
    latency(session(CAMERA, 1), "image", np.random.default_rng(0).random((1, 1, 128, 128), dtype=np.float32))

    sess = session(SENSOR)
    thr = header(sess, SENSOR)
    for title, seed, rate, n, *counts in SENSOR_SETS:
        n_ok, n_kind = counts[pick - 4]
        windows, labels = sensor_set(seed, n_ok, n_kind, rate_hz=rate, n=n)
        feats = np.stack([vibration_features(w, rate) for w in windows])
        report(f"{title}, seed {seed}", sess.run(["score"], {"features": feats})[0], labels, thr)
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
