"""Scoring Nodes: turn model outputs into verdicts, check image quality, merge detectors.

A *verdict* is the dict every sink publishes from::

    {"anomaly": bool, "score": float, "threshold": float, "label": str,
     "regions": [[x, y, w, h], ...], "model": {"name": str, "version": str}}

``regions`` are in the pixel coordinates of the original frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..exceptions import BadInput, TopologyError
from .base import Node, NodeEnv, RunContext, register

__all__ = ["AnomalyScore", "ImageQuality", "Combine", "find_regions", "verdict"]


def verdict(*, score: float, threshold: float, label: str, regions: list[list[int]], model: Mapping[str, str],
            ok_label: str = "ok") -> dict[str, Any]:
    anomalous = bool(score >= threshold)
    return {
        "anomaly": anomalous,
        "score": float(score),
        "threshold": float(threshold),
        "label": label if anomalous else ok_label,
        "regions": regions if anomalous else [],
        "model": {"name": str(model["name"]), "version": str(model["version"])},
    }


def find_regions(mask: np.ndarray, orig_size: tuple[int, int] | None = None, *, grid: int = 64,
                 min_cells: int = 1, max_regions: int = 16) -> list[list[int]]:
    """Bounding boxes [x, y, w, h] of the connected areas of a boolean mask, in ``orig_size`` pixels.

    The mask is max-pooled to at most ``grid`` x ``grid`` cells first, so the
    labelling cost stays small whatever the map's resolution.
    """
    arr = np.asarray(mask, dtype=bool)
    h, w = int(arr.shape[-2]), int(arr.shape[-1])
    mask = arr.reshape(h, w)
    fy, fx = max(1, -(-h // grid)), max(1, -(-w // grid))
    ph, pw = -(-h // fy), -(-w // fx)
    padded = np.zeros((ph * fy, pw * fx), dtype=bool)
    padded[:h, :w] = mask
    cells: np.ndarray = np.asarray(padded.reshape(ph, fy, pw, fx).any(axis=(1, 3)))
    oh, ow = orig_size or (h, w)
    sy, sx = oh / h, ow / w
    seen = np.zeros_like(cells)
    boxes: list[tuple[int, list[int]]] = []
    for y0, x0 in zip(*np.nonzero(cells), strict=True):
        if seen[y0, x0]:
            continue
        stack = [(int(y0), int(x0))]
        seen[y0, x0] = True
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < ph and 0 <= nx < pw and cells[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(ys) < min_cells:
            continue
        top, left = min(ys) * fy, min(xs) * fx
        bottom, right = min(h, (max(ys) + 1) * fy), min(w, (max(xs) + 1) * fx)
        box = [int(left * sx), int(top * sy), max(1, int(round((right - left) * sx))),
               max(1, int(round((bottom - top) * sy)))]
        boxes.append((len(ys), box))
    boxes.sort(key=lambda b: -b[0])
    return [b for _, b in boxes[:max_regions]]


def _single_input(node: Node, inputs: Mapping[str, Any]) -> Any:
    if len(inputs) != 1:
        raise BadInput(f"expects one parent, got {len(inputs)}", node=node.node_id)
    return next(iter(inputs.values()))


@register("anomaly.score")
class AnomalyScore(Node):
    """Model output to verdict: score vs threshold gives the label; the anomaly map gives regions.

    params: ``score_output`` (default "score"), ``map_output`` (default "anomaly_map"),
    ``threshold`` (default: the model's streamd.threshold), ``map_threshold``
    (default: the model's streamd.map_threshold), ``label`` (default "defect").
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.score_output = self.param("score_output", "score", kind=str)
        self.map_output = self.param("map_output", "anomaly_map", kind=str)
        self.threshold = self.param("threshold", None, kind=(int, float))
        self.map_threshold = self.param("map_threshold", None, kind=(int, float))
        self.label = self.param("label", "defect", kind=str)

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        value = _single_input(self, inputs)
        if not isinstance(value, Mapping) or "outputs" not in value:
            raise BadInput("expects the output of an onnx.model Node", node=self.node_id)
        outputs = value["outputs"]
        if self.score_output not in outputs:
            raise BadInput(f"model output {self.score_output!r} not found (has {', '.join(outputs)})",
                           node=self.node_id, reason="model_input_mismatch")
        score = float(np.asarray(outputs[self.score_output]).reshape(-1)[0])
        threshold = float(self.threshold if self.threshold is not None else value.get("threshold", 0.5))
        regions: list[list[int]] = []
        amap = outputs.get(self.map_output)
        map_threshold = self.map_threshold if self.map_threshold is not None else value.get("map_threshold")
        if score >= threshold and amap is not None:
            amap = np.asarray(amap, dtype=np.float32)
            cut = float(map_threshold) if map_threshold is not None else float(amap.max()) * 0.5
            orig = value.get("context", {}).get("orig_size")
            regions = find_regions(amap >= cut, tuple(orig) if orig else None)
        return verdict(score=score, threshold=threshold, label=self.label, regions=regions, model=value["model"])


@register("image.quality")
class ImageQuality(Node):
    """Camera-health check on a preprocessed image: exposure, contrast and focus.

    Flags frames a model should not be trusted on (lens covered, lamp failed,
    camera out of focus) with labels ``underexposed``, ``overexposed``,
    ``low_contrast`` or ``blurred``. params (on the [0, 1] scale):
    ``min_mean`` 0.08, ``max_mean`` 0.92, ``min_std`` 0.02, ``min_sharpness`` 0.0005.
    Score is the worst violation ratio; threshold 1.0.
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.min_mean = float(self.param("min_mean", 0.08, kind=(int, float)))
        self.max_mean = float(self.param("max_mean", 0.92, kind=(int, float)))
        self.min_std = float(self.param("min_std", 0.02, kind=(int, float)))
        self.min_sharpness = float(self.param("min_sharpness", 0.0005, kind=(int, float)))
        if not 0 <= self.min_mean < self.max_mean <= 1:
            raise TopologyError("need 0 <= min_mean < max_mean <= 1", path=f"nodes.{node_id}.params")

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        value = _single_input(self, inputs)
        tensor = np.asarray(value["tensor"] if isinstance(value, Mapping) else value, dtype=np.float32)
        img = tensor.mean(axis=0) if tensor.ndim == 3 else tensor
        mean, std = float(img.mean()), float(img.std())
        lap = img[1:-1, 1:-1] * 4 - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
        sharpness = float(lap.var())
        checks = {
            "underexposed": self.min_mean / max(mean, 1e-6),
            "overexposed": (1 - self.max_mean) / max(1 - mean, 1e-6),
            "low_contrast": self.min_std / max(std, 1e-6),
            # sharpness is a variance (squared scale): its square root compares like the others
            "blurred": (self.min_sharpness / max(sharpness, 1e-9)) ** 0.5,
        }
        label, score = max(checks.items(), key=lambda kv: kv[1])
        return verdict(score=score, threshold=1.0, label=label, regions=[],
                       model={"name": "image-quality", "version": "1"})


@register("anomaly.combine")
class Combine(Node):
    """Join several verdicts into one.

    Each parent's score is normalised by its threshold, so the combined
    ``score`` is the largest ``score / threshold`` and the combined threshold
    is 1.0: the frame is anomalous when any detector fires. The label and the
    model are those of the detector that fired most (or of ``primary`` when
    none fired); regions are the union of the firing detectors' regions.
    params: ``primary`` (parent id whose model names the result; default: the first parent).
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.primary = self.param("primary", None, kind=str)

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        if not inputs:
            raise BadInput("has no inputs", node=self.node_id)
        for parent, v in inputs.items():
            if not isinstance(v, Mapping) or "score" not in v or "threshold" not in v:
                raise BadInput(f"parent {parent!r} did not give a verdict", node=self.node_id)
        ratios = {p: float(v["score"]) / max(float(v["threshold"]), 1e-12) for p, v in inputs.items()}
        top = max(ratios, key=lambda p: ratios[p])
        primary = self.primary if self.primary in inputs else next(iter(inputs))
        fired = [p for p in inputs if inputs[p]["anomaly"]]
        regions = [r for p in fired for r in inputs[p]["regions"]]
        lead = inputs[top] if fired else inputs[primary]
        return verdict(score=ratios[top], threshold=1.0, label=str(lead["label"]), regions=regions,
                       model=lead["model"])
