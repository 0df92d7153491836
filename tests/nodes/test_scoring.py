"""Scoring Nodes: anomaly.score, image.quality, anomaly.combine, and find_regions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from streamd import synth
from streamd.config import Settings
from streamd.exceptions import BadInput, TopologyError
from streamd.nodes.base import NodeEnv, Origin, RunContext, resolve
from streamd.nodes.image import Preprocess
from streamd.nodes.scoring import AnomalyScore, Combine, ImageQuality, find_regions, verdict

ROOT = Path(__file__).resolve().parents[2]
RUN = RunContext(topology="unit", run_id="r1", origin=Origin("cameras.frames", 1, 9), kind="frame")
MODEL = {"name": "surface-ae", "version": "1.0.0"}
VERDICT_KEYS = {"anomaly", "score", "threshold", "label", "regions", "model"}


@pytest.fixture
def env() -> NodeEnv:
    return NodeEnv(settings=Settings(), topology_name="unit", base_dir=ROOT / "topologies")


def test_registered():
    assert resolve("anomaly.score") is AnomalyScore
    assert resolve("image.quality") is ImageQuality
    assert resolve("anomaly.combine") is Combine


# -- find_regions -----------------------------------------------------------------------------


def test_no_blob():
    assert find_regions(np.zeros((128, 128), bool)) == []


def test_one_blob_in_map_pixels():
    mask = np.zeros((128, 128), bool)
    mask[10:20, 30:40] = True
    assert find_regions(mask) == [[30, 10, 10, 10]]


def test_one_blob_scaled_to_orig_size():
    mask = np.zeros((1, 128, 128), bool)  # a leading channel dimension is allowed
    mask[0, 10:20, 30:40] = True
    # 128x128 map of a 256x512 frame: x scales by 4, y by 2
    assert find_regions(mask, (256, 512)) == [[120, 20, 40, 20]]


def test_two_blobs_largest_first():
    mask = np.zeros((64, 64), bool)
    mask[2:4, 2:4] = True  # small
    mask[30:50, 20:40] = True  # large
    assert find_regions(mask) == [[20, 30, 20, 20], [2, 2, 2, 2]]


def test_diagonal_cells_are_separate_blobs():
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = mask[1, 1] = True
    assert len(find_regions(mask)) == 2


def test_min_cells_and_max_regions():
    mask = np.zeros((32, 32), bool)
    mask[0, 0] = True
    mask[10:14, 10:14] = True
    mask[20:22, 20:22] = True
    assert find_regions(mask, min_cells=4) == [[10, 10, 4, 4], [20, 20, 2, 2]]
    assert find_regions(mask, max_regions=1) == [[10, 10, 4, 4]]


def test_large_map_is_pooled_but_box_stays_in_pixels():
    mask = np.zeros((512, 512), bool)
    mask[100:140, 200:260] = True
    ((x, y, w, h),) = find_regions(mask)
    # pooled to 64x64 cells of 8x8 pixels: the box grows to cell edges, never shrinks
    assert x <= 200 and y <= 100 and x + w >= 260 and y + h >= 140
    assert x > 190 and y > 90 and w < 80 and h < 60


# -- anomaly.score --------------------------------------------------------------------------------


def model_output(score: float, amap: np.ndarray | None = None, *, threshold: float = 1.5,
                 map_threshold: float | None = 0.5, orig_size: list[int] | None = None) -> dict:
    outputs: dict[str, Any] = {"score": np.float32(score)}
    if amap is not None:
        outputs["anomaly_map"] = amap
    context = {"orig_size": orig_size} if orig_size else {}
    return {"outputs": outputs, "model": MODEL, "threshold": threshold, "map_threshold": map_threshold,
            "context": context}


def blob_map() -> np.ndarray:
    amap = np.zeros((1, 128, 128), np.float32)
    amap[0, 10:20, 30:40] = 0.9
    return amap


def test_score_above_model_threshold(env):
    v = AnomalyScore("ae_score", {"label": "defect"}, env).process(
        RUN, {"autoencoder": model_output(2.0, blob_map(), orig_size=[256, 512])})
    assert set(v) == VERDICT_KEYS
    assert v["anomaly"] is True
    assert v["score"] == pytest.approx(2.0)
    assert v["threshold"] == 1.5  # from the model's metadata
    assert v["label"] == "defect"
    assert v["model"] == MODEL
    assert v["regions"] == [[120, 20, 40, 20]]  # map box scaled to the 256x512 frame


def test_score_below_model_threshold(env):
    v = AnomalyScore("ae_score", {}, env).process(RUN, {"autoencoder": model_output(1.0, blob_map())})
    assert v["anomaly"] is False
    assert v["label"] == "ok"
    assert v["regions"] == []
    assert v["threshold"] == 1.5


def test_score_equal_to_threshold_is_anomalous(env):
    v = AnomalyScore("ae_score", {}, env).process(RUN, {"autoencoder": model_output(1.5, blob_map())})
    assert v["anomaly"] is True


def test_threshold_param_overrides_model(env):
    node = AnomalyScore("ae_score", {"threshold": 3.0}, env)
    v = node.process(RUN, {"autoencoder": model_output(2.0, blob_map())})
    assert v["threshold"] == 3.0
    assert v["anomaly"] is False
    low = AnomalyScore("ae_score", {"threshold": 0.5}, env).process(RUN, {"autoencoder": model_output(1.0)})
    assert low["anomaly"] is True and low["threshold"] == 0.5


def test_default_threshold_without_model_metadata(env):
    value = model_output(0.6)
    del value["threshold"]
    v = AnomalyScore("ae_score", {}, env).process(RUN, {"autoencoder": value})
    assert v["threshold"] == 0.5 and v["anomaly"] is True


def test_regions_without_orig_size_are_map_pixels(env):
    v = AnomalyScore("ae_score", {}, env).process(RUN, {"autoencoder": model_output(2.0, blob_map())})
    assert v["regions"] == [[30, 10, 10, 10]]


def test_map_threshold_param_and_default(env):
    amap = blob_map()
    amap[0, 100:110, 100:110] = 0.3  # a weaker second blob
    both = AnomalyScore("s", {"map_threshold": 0.2}, env).process(RUN, {"m": model_output(2.0, amap)})
    assert both["regions"] == [[30, 10, 10, 10], [100, 100, 10, 10]]
    # no map threshold anywhere: half the map's maximum (0.45) keeps only the strong blob
    half = AnomalyScore("s", {}, env).process(RUN, {"m": model_output(2.0, amap, map_threshold=None)})
    assert half["regions"] == [[30, 10, 10, 10]]


def test_score_without_anomaly_map(env):
    v = AnomalyScore("s", {}, env).process(RUN, {"m": model_output(2.0, None)})
    assert v["anomaly"] is True and v["regions"] == []


def test_score_output_names(env):
    value = model_output(2.0)
    value["outputs"] = {"recon_error": np.array([2.0], np.float32)}
    v = AnomalyScore("s", {"score_output": "recon_error"}, env).process(RUN, {"m": value})
    assert v["score"] == pytest.approx(2.0)
    with pytest.raises(BadInput) as info:
        AnomalyScore("s", {}, env).process(RUN, {"m": value})
    assert info.value.reason == "model_input_mismatch"
    assert "recon_error" in str(info.value)


def test_score_rejects_non_model_input(env):
    node = AnomalyScore("s", {}, env)
    with pytest.raises(BadInput):
        node.process(RUN, {"m": {"tensor": np.zeros(3)}})
    with pytest.raises(BadInput, match="expects one parent"):
        node.process(RUN, {"a": model_output(1.0), "b": model_output(1.0)})


def test_score_bad_param(env):
    with pytest.raises(TopologyError) as info:
        AnomalyScore("s", {"threshold": "high"}, env)
    assert info.value.path == "nodes.s.params.threshold"


# -- image.quality ----------------------------------------------------------------------------------


def tensor(img: np.ndarray) -> dict:
    return {"tensor": img[None].astype(np.float32), "orig_size": list(img.shape)}


RNG = np.random.default_rng(5)
QUALITY_CASES = {
    "underexposed": RNG.uniform(0.0, 0.06, (128, 128)),
    "overexposed": RNG.uniform(0.94, 1.0, (128, 128)),
    "low_contrast": 0.5 + RNG.normal(0.0, 0.005, (128, 128)),
    "blurred": np.tile(np.linspace(0.2, 0.8, 128), (128, 1)),  # contrast but no detail at all
}


@pytest.mark.parametrize("label", list(QUALITY_CASES))
def test_quality_flags(env, label):
    v = ImageQuality("quality", {}, env).process(RUN, {"preprocess": tensor(QUALITY_CASES[label])})
    assert set(v) == VERDICT_KEYS
    assert v["anomaly"] is True
    assert v["label"] == label
    assert v["score"] > 1.0
    assert v["threshold"] == 1.0
    assert v["regions"] == []
    assert v["model"] == {"name": "image-quality", "version": "1"}


def test_quality_accepts_a_bare_array(env):
    v = ImageQuality("quality", {}, env).process(RUN, {"p": QUALITY_CASES["underexposed"].astype(np.float32)})
    assert v["label"] == "underexposed"


@pytest.mark.parametrize("size", [(128, 128), (240, 320), (96, 160)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("defect", [None, "scratch", "spot", "missing"])
def test_quality_passes_synthetic_frames(env, size, channels, defect):
    rng = np.random.default_rng(size[0] * 10 + channels)
    img, _ = synth.camera_frame(rng, defect=defect, size=size, channels=channels)
    pre = Preprocess("preprocess", {"size": [128, 128], "grayscale": True}, env).process(RUN, {"decode": img})
    v = ImageQuality("quality", {}, env).process(RUN, {"preprocess": pre})
    assert v["anomaly"] is False, v
    assert v["label"] == "ok"
    assert v["score"] < 1.0


def test_quality_flags_a_defocused_synthetic_frame(env):
    img, _ = synth.camera_frame(np.random.default_rng(3), size=(240, 320))
    blurred = np.asarray(Image.fromarray(img[:, :, 0]).filter(ImageFilter.GaussianBlur(6)))[:, :, None]
    pre = Preprocess("preprocess", {}, env).process(RUN, {"decode": blurred})
    v = ImageQuality("quality", {}, env).process(RUN, {"preprocess": pre})
    assert v["anomaly"] is True and v["label"] == "blurred"


def test_quality_params(env):
    strict = ImageQuality("q", {"min_std": 0.5}, env)
    img, _ = synth.camera_frame(np.random.default_rng(0))
    pre = Preprocess("p", {}, env).process(RUN, {"d": img})
    assert strict.process(RUN, {"p": pre})["label"] == "low_contrast"
    with pytest.raises(TopologyError) as info:
        ImageQuality("q", {"min_mean": 0.9, "max_mean": 0.5}, env)
    assert info.value.path == "nodes.q.params"


# -- anomaly.combine ----------------------------------------------------------------------------------


def ae(score: float, threshold: float = 1.5, regions: list | None = None) -> dict:
    return verdict(score=score, threshold=threshold, label="defect", regions=regions or [[1, 2, 3, 4]],
                   model=MODEL)


def quality(score: float, label: str = "blurred") -> dict:
    return verdict(score=score, threshold=1.0, label=label, regions=[],
                   model={"name": "image-quality", "version": "1"})


def test_combine_detector_fires(env):
    v = Combine("combine", {"primary": "ae_score"}, env).process(
        RUN, {"ae_score": ae(3.0, regions=[[5, 6, 7, 8]]), "quality": quality(0.3)})
    assert set(v) == VERDICT_KEYS
    assert v["anomaly"] is True
    assert v["score"] == pytest.approx(2.0)  # 3.0 / 1.5, normalised by its threshold
    assert v["threshold"] == 1.0
    assert v["label"] == "defect"
    assert v["model"] == MODEL
    assert v["regions"] == [[5, 6, 7, 8]]


def test_combine_quality_fires(env):
    v = Combine("combine", {"primary": "ae_score"}, env).process(
        RUN, {"ae_score": ae(0.75), "quality": quality(4.0, "underexposed")})
    assert v["anomaly"] is True
    assert v["score"] == pytest.approx(4.0)
    assert v["label"] == "underexposed"
    assert v["model"] == {"name": "image-quality", "version": "1"}
    assert v["regions"] == []


def test_combine_both_fire_takes_the_strongest_and_all_regions(env):
    v = Combine("combine", {"primary": "ae_score"}, env).process(
        RUN, {"ae_score": ae(3.0, regions=[[5, 6, 7, 8]]), "quality": quality(1.2)})
    assert v["label"] == "defect"  # 2.0 beats 1.2
    assert v["score"] == pytest.approx(2.0)
    assert v["regions"] == [[5, 6, 7, 8]]


def test_combine_none_fires_uses_primary(env):
    node = Combine("combine", {"primary": "ae_score"}, env)
    v = node.process(RUN, {"quality": quality(0.9), "ae_score": ae(0.75)})
    assert v["anomaly"] is False
    assert v["label"] == "ok"
    assert v["score"] == pytest.approx(0.9)  # the largest normalised score, even from another detector
    assert v["threshold"] == 1.0
    assert v["model"] == MODEL  # named by the primary, although quality came first and scored higher
    assert v["regions"] == []


def test_combine_default_primary_is_the_first_parent(env):
    v = Combine("combine", {}, env).process(RUN, {"quality": quality(0.2), "ae_score": ae(0.3)})
    assert v["model"] == {"name": "image-quality", "version": "1"}


def test_combine_rejects_non_verdicts(env):
    with pytest.raises(BadInput, match="'quality' did not give a verdict"):
        Combine("combine", {}, env).process(RUN, {"ae_score": ae(1.0), "quality": {"tensor": 1}})
