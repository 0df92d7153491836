"""streamd.synth: deterministic frames and vibration windows with the defects they claim to have."""

from __future__ import annotations

import time

import numpy as np
import pytest

from streamd import synth


def _frame(seed: int, defect: str | None = None, **kw):
    return synth.camera_frame(np.random.default_rng(seed), defect, **kw)


@pytest.mark.parametrize("defect", [None, *synth.DEFECT_KINDS])
def test_camera_frame_is_deterministic(defect):
    a, box_a = _frame(7, defect)
    b, box_b = _frame(7, defect)
    assert np.array_equal(a, b)
    assert box_a == box_b
    c, _ = _frame(8, defect)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size,channels", [((128, 128), 1), ((240, 320), 3), ((64, 96), 1), ((480, 640), 3)])
@pytest.mark.parametrize("defect", [None, *synth.DEFECT_KINDS])
def test_camera_frame_shape_dtype_and_box(size, channels, defect):
    img, box = _frame(3, defect, size=size, channels=channels)
    assert img.dtype == np.uint8
    assert img.shape == (*size, channels)
    if defect is None:
        assert box is None
    else:
        x, y, w, h = box
        assert all(isinstance(v, int) for v in box)
        assert 0 <= x and 0 <= y and w >= 1 and h >= 1
        assert x + w <= size[1] and y + h <= size[0]
    # a real image, not saturated or flat
    assert 40 < img.mean() < 220
    assert img.std() > 5


def test_default_frame_is_128_grey():
    img, box = synth.camera_frame(np.random.default_rng(0))
    assert img.shape == (128, 128, 1) and box is None


@pytest.mark.parametrize("defect", synth.DEFECT_KINDS)
@pytest.mark.parametrize("size,channels", [((128, 128), 1), ((240, 320), 3)])
def test_defect_changes_only_pixels_inside_its_box(defect, size, channels):
    """Same seed with and without the defect: the same part, differing only inside the box."""
    for seed in range(10):
        good, _ = _frame(seed, None, size=size, channels=channels)
        bad, (x, y, w, h) = _frame(seed, defect, size=size, channels=channels)
        diff = np.abs(bad.astype(np.int16) - good.astype(np.int16)).max(axis=2)
        inside = diff[y : y + h, x : x + w]
        assert inside.max() >= 25, f"seed {seed}: {defect} is barely visible"
        outside = diff.copy()
        outside[max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1] = 0
        assert outside.max() <= 2, f"seed {seed}: {defect} changed pixels outside its box"


def test_missing_bolt_removes_a_bright_head():
    """A missing bolt leaves a dark hole where a normal part has a bright hex head."""
    img, (x, y, w, h) = _frame(11, "missing")
    g = img[..., 0].astype(np.float32)
    cy, cx = y + h // 2, x + w // 2
    centre = g[cy - 2 : cy + 3, cx - 2 : cx + 3].mean()
    good, _ = _frame(11, None)
    heads = []
    for bu, bv in synth.BOLT_POSITIONS:
        px, py = int(bu * 128), int(bv * 128)
        heads.append(good[py - 2 : py + 3, px - 2 : px + 3, 0].astype(np.float32).mean())
    assert centre < min(heads) - 40


def test_rgb_frame_luma_matches_grey_content():
    """The RGB frame is the grey scene tinted: its ITU-R 601 luma is close to the grey frame's."""
    grey, _ = _frame(5, "spot", channels=1)
    rgb, _ = _frame(5, "spot", channels=3)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert np.abs(luma - grey[..., 0]).mean() < 3.0


def test_camera_frame_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect"):
        synth.camera_frame(rng, "dent")
    with pytest.raises(ValueError, match="channels"):
        synth.camera_frame(rng, channels=2)


def test_camera_frame_is_fast_enough_for_live_demo():
    # sanity only (no tight timing assertion): 50 frames well under a second
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(50):
        synth.camera_frame(rng, synth.DEFECT_KINDS[i % 3] if i % 2 else None)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("fault", [None, *synth.SENSOR_FAULTS])
def test_sensor_window_deterministic_and_shaped(fault):
    a = synth.sensor_window(np.random.default_rng(4), fault)
    b = synth.sensor_window(np.random.default_rng(4), fault)
    assert a.dtype == np.float32 and a.shape == (4096,)
    assert np.array_equal(a, b)
    assert np.isfinite(a).all()
    c = synth.sensor_window(np.random.default_rng(4), fault, rate_hz=10000.0, n=2048)
    assert c.shape == (2048,)


def test_sensor_faults_have_their_signatures():
    """Same seed with and without the fault: the same machine, plus the fault's signature."""
    ratios = {f: [] for f in synth.SENSOR_FAULTS}
    for seed in range(10):
        ok = synth.sensor_window(np.random.default_rng(seed))
        imb = synth.sensor_window(np.random.default_rng(seed), "imbalance")
        loose = synth.sensor_window(np.random.default_rng(seed), "looseness")
        bear = synth.sensor_window(np.random.default_rng(seed), "bearing")
        ratios["imbalance"].append(_rms(imb) / _rms(ok))  # raised 1x dominates the RMS
        ratios["looseness"].append(_band(loose, 150, 600) / _band(ok, 150, 600))  # harmonics 4x..10x and more
        ratios["bearing"].append(_band(bear, 1300, 2400) / _band(ok, 1300, 2400))  # resonance rung by impacts
        assert _kurt(bear) > _kurt(ok)
    assert min(ratios["imbalance"]) > 1.8
    assert min(ratios["looseness"]) > 1.3 and np.median(ratios["looseness"]) > 3.0
    assert min(ratios["bearing"]) > 2.0 and np.median(ratios["bearing"]) > 5.0


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def _kurt(x: np.ndarray) -> float:
    x = x - x.mean()
    return float(np.mean(x**4) / np.mean(x**2) ** 2)


def _band(x: np.ndarray, lo: float, hi: float, rate: float = 5000.0) -> float:
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / rate)
    return float(p[(f >= lo) & (f < hi)].sum() / p.sum())


def test_sensor_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown fault"):
        synth.sensor_window(np.random.default_rng(0), "misalignment")
