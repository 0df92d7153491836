"""Quality figures for the shipped anomaly models, with numpy only.

Used by ``models/evaluate.py``, the training scripts and ``tests/models``: rank
based AUROC (no scikit-learn at run or test time), recall and false-positive
rate at a threshold, and the held-out data sets regenerated from fixed seeds
with :mod:`streamd.synth`, pre-processed exactly as the camera model's contract
says (ITU-R 601 luma, bilinear resize to 128x128, divided by 255).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import synth

__all__ = [
    "auroc",
    "rates_at",
    "KindFigures",
    "kind_figures",
    "to_model_input",
    "camera_set",
    "sensor_set",
]


def auroc(scores_normal: Sequence[float] | np.ndarray, scores_anomal: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: P(anomalous score > normal score), ties counting one half."""
    neg = np.asarray(scores_normal, dtype=np.float64).ravel()
    pos = np.asarray(scores_anomal, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("auroc needs at least one normal and one anomalous score")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[neg.size :].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def rates_at(scores_normal: np.ndarray, scores_anomal: np.ndarray, threshold: float) -> tuple[float, float]:
    """(recall, false-positive rate) when ``score >= threshold`` means anomalous (as anomaly.score decides)."""
    recall = float(np.mean(np.asarray(scores_anomal) >= threshold)) if len(scores_anomal) else float("nan")
    fpr = float(np.mean(np.asarray(scores_normal) >= threshold)) if len(scores_normal) else float("nan")
    return recall, fpr


@dataclass(frozen=True)
class KindFigures:
    kind: str
    n: int
    auroc: float
    recall: float

    def line(self) -> str:
        return f"  {self.kind:<10} n={self.n:<5d} AUROC={self.auroc:.4f}  recall@thr={self.recall:.3f}"


def kind_figures(scores: np.ndarray, labels: Sequence[str | None], threshold: float) -> tuple[list[KindFigures], float]:
    """Per-kind figures against the normal samples, plus the normal false-positive rate."""
    labels_arr = np.array(["ok" if lab is None else lab for lab in labels])
    normal = scores[labels_arr == "ok"]
    rows = []
    kinds = [k for k in dict.fromkeys(labels_arr.tolist()) if k != "ok"]
    for k in kinds:
        s = scores[labels_arr == k]
        rec, _ = rates_at(normal, s, threshold)
        rows.append(KindFigures(k, int(s.size), auroc(normal, s), rec))
    allpos = scores[labels_arr != "ok"]
    rec, fpr = rates_at(normal, allpos, threshold)
    rows.append(KindFigures("all", int(allpos.size), auroc(normal, allpos), rec))
    return rows, fpr


def to_model_input(image: np.ndarray, size: int = 128) -> np.ndarray:
    """uint8 [h, w, c] frame -> float32 [1, size, size] in [0, 1], as the preprocess Node does.

    Grey via ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), bilinear resize, / 255.
    """
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 3:
        g = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
    elif img.ndim == 3:
        g = img[..., 0].astype(np.float32)
    else:
        g = img.astype(np.float32)
    g = g.astype(np.float32)
    if g.shape != (size, size):
        g = np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    return (g / 255.0).astype(np.float32)[None]


def camera_set(
    seed: int,
    n_normal: int,
    n_per_defect: int,
    size: tuple[int, int] = (128, 128),
    channels: int = 1,
    kinds: Sequence[str] = synth.DEFECT_KINDS,
    jpeg_quality: int | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """A labelled set of model inputs float32 [N, 1, 128, 128], normal first then each defect kind.

    With ``jpeg_quality``, each frame goes through a JPEG encode/decode first, as frames sent
    with ``codec: jpeg`` do.
    """
    rng = np.random.default_rng(seed)
    labels: list[str | None] = [None] * n_normal + [k for k in kinds for _ in range(n_per_defect)]
    x = np.empty((len(labels), 1, 128, 128), dtype=np.float32)
    for i, lab in enumerate(labels):
        img, _ = synth.camera_frame(rng, lab, size=size, channels=channels)
        if jpeg_quality is not None:
            img = _jpeg_roundtrip(img, jpeg_quality)
        x[i] = to_model_input(img)
    return x, labels


def _jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as decoded:
        out = np.asarray(decoded)
    return out[:, :, None] if out.ndim == 2 else out


def sensor_set(
    seed: int,
    n_normal: int,
    n_per_fault: int,
    rate_hz: float = 5000.0,
    n: int = 4096,
    kinds: Sequence[str] = synth.SENSOR_FAULTS,
) -> tuple[list[np.ndarray], list[str | None]]:
    """A labelled list of raw vibration windows, normal first then each fault kind."""
    rng = np.random.default_rng(seed)
    labels: list[str | None] = [None] * n_normal + [k for k in kinds for _ in range(n_per_fault)]
    return [synth.sensor_window(rng, lab, rate_hz=rate_hz, n=n) for lab in labels], labels
