"""Deterministic synthetic camera frames and vibration windows, with injected defects.

Used by ``streamd demo`` (frames generated live), by the model training scripts
under ``models/`` and by the quality tests. Everything is driven by the
``numpy.random.Generator`` the caller passes in, so the same seed gives the same
data on every machine; nothing here keeps global state.

Camera frames show a brushed (machined) metal plate held by four hex bolts,
under uneven lighting, with a small position and rotation jitter from part to
part. The scene is defined in *frame-relative* coordinates, so a frame rendered
at 240x320 and resized to 128x128 looks like one rendered at 128x128 (as with a
camera whose field of view is set to the part).

Defects (:data:`DEFECT_KINDS`):

``scratch``  a thin straight bright or dark line, tapered at both ends, across the brushing
``spot``     a round, irregular stain (darker, rust-coloured in RGB) or a bright spot
``missing``  one of the four bolts is absent: its empty, threaded hole shows instead

Vibration windows (:data:`SENSOR_FAULTS`) are accelerometer signals (unit g) of a
rotating machine: shaft speed 18-45 Hz with slow speed wander, 1x/2x/3x
harmonics, a structural resonance excited by broadband noise, and sensor noise.

``bearing``    outer-race defect: impacts at BPFO (3.2-3.7 x shaft speed) that ring a
               1.4-2.2 kHz resonance, amplitude-modulated by the shaft rotation
``imbalance``  raised 1x component
``looseness``  many harmonics, half-order sub-harmonics and a clipped (truncated) waveform
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DEFECT_KINDS",
    "SENSOR_FAULTS",
    "BOLT_POSITIONS",
    "camera_frame",
    "sensor_window",
]

DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "missing")
SENSOR_FAULTS: tuple[str, ...] = ("bearing", "imbalance", "looseness")

#: Bolt centres on the part, in frame-relative (u, v) coordinates before jitter.
BOLT_POSITIONS: tuple[tuple[float, float], ...] = ((0.2, 0.2), (0.8, 0.2), (0.2, 0.8), (0.8, 0.8))
_BOLT_R = 0.05  # hex head "radius" (centre to flat), frame-relative
_RING_R = 0.075  # dark washer shadow / counterbore around the head
_HOLE_R = 0.035  # empty threaded hole when the bolt is missing
_EDGE = 0.9 / 128  # soft-edge width, about one pixel at 128x128

# metal tint (RGB gains) and stain colour; grey frames use the ITU-R 601 luma of these
_TINT = np.array([0.96, 1.0, 1.05], dtype=np.float32)
_STAIN = np.array([0.55, 0.8, 1.0], dtype=np.float32)  # how much each channel darkens (rust)

_PROFILE_LO, _PROFILE_HI, _PROFILE_N = -0.3, 1.3, 4096
_PROFILE_GRID = np.linspace(_PROFILE_LO, _PROFILE_HI, _PROFILE_N)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-variance 1-D noise low-passed with a Gaussian of ``sigma`` samples."""
    half = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.convolve(rng.standard_normal(n + 2 * half), k, mode="valid")
    return x / (x.std() + 1e-12)


def _soft(inside: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside) to a soft 0..1 mask, one pixel wide edge."""
    return np.clip(inside / _EDGE + 0.5, 0.0, 1.0)


def _window(cx: float, cy: float, r: float, h: int, w: int) -> tuple[slice, slice]:
    """Pixel window (rows, cols) covering a disc of frame-relative radius r."""
    x0 = max(int(math.floor((cx - r) * w)), 0)
    x1 = min(int(math.ceil((cx + r) * w)) + 1, w)
    y0 = max(int(math.floor((cy - r) * h)), 0)
    y1 = min(int(math.ceil((cy + r) * h)) + 1, h)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _box(cx: float, cy: float, rx: float, ry: float, h: int, w: int) -> list[int]:
    """[x, y, w, h] pixel box around a centre, clipped to the frame."""
    x0 = max(int(math.floor((cx - rx) * w)), 0)
    y0 = max(int(math.floor((cy - ry) * h)), 0)
    x1 = min(int(math.ceil((cx + rx) * w)), w)
    y1 = min(int(math.ceil((cy + ry) * h)), h)
    return [x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)]


def camera_frame(
    rng: np.random.Generator,
    defect: str | None = None,
    size: tuple[int, int] = (128, 128),
    channels: int = 1,
) -> tuple[np.ndarray, list[int] | None]:
    """One frame of a part: ``(image uint8 [h, w, channels], box [x, y, w, h] or None)``.

    ``defect`` is None (a good part) or one of :data:`DEFECT_KINDS`; ``box`` is the
    defect's bounding box in pixels of this frame. ``channels`` is 1 (grey) or 3 (RGB).
    """
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_KINDS} or None")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {size!r}")

    u = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    v = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]

    # part pose: small shift and rotation about the frame centre
    theta = math.radians(rng.uniform(-3.0, 3.0))
    dx, dy = rng.uniform(-0.025, 0.025, size=2)
    c, s = math.cos(theta), math.sin(theta)
    # part coordinate across the brushing (brush lines run along the part's u axis)
    pv = -s * (u - 0.5 - dx) + c * (v - 0.5 - dy) + 0.5
    pu = c * (u - 0.5 - dx) + s * (v - 0.5 - dy) + 0.5

    # brushed texture: fine lines + coarser streaks across pv, slowly varying along pu
    fine = _smooth_noise(rng, _PROFILE_N, 14.0)
    coarse = _smooth_noise(rng, _PROFILE_N, 60.0)
    pv_flat = pv.ravel()
    tex = np.interp(pv_flat, _PROFILE_GRID, 0.035 * fine + 0.018 * coarse).reshape(h, w)
    ph = rng.uniform(0, 2 * math.pi)
    tex *= 1.0 + 0.25 * np.sin(2 * math.pi * 1.3 * pu + ph)

    # lighting: level, linear gradient, vignette
    gx, gy = rng.uniform(-0.14, 0.14, size=2)
    level = 0.55 + rng.uniform(-0.06, 0.06)
    vig = rng.uniform(0.0, 0.25)
    light = level + gx * (u - 0.5) + gy * (v - 0.5) - vig * ((u - 0.5) ** 2 + (v - 0.5) ** 2)
    img = (light + tex).astype(np.float32)

    # every draw of a good part happens before the defect's draws: the same seed with and
    # without a defect gives the same part, pose, lighting and noise
    noise = rng.normal(0.0, 0.012, size=(h, w)).astype(np.float32)
    which = int(rng.integers(4))
    hex_angles = rng.uniform(0, math.pi / 3, size=4)
    missing = which if defect == "missing" else -1
    stain = None  # RGB colour of a stain, applied on top of its grey darkening
    box: list[int] | None = None

    for i, (bu, bv) in enumerate(BOLT_POSITIONS):
        cx = 0.5 + dx + c * (bu - 0.5) - s * (bv - 0.5)
        cy = 0.5 + dy + s * (bu - 0.5) + c * (bv - 0.5)
        rows, cols = _window(cx, cy, _RING_R + 2 * _EDGE, h, w)
        ddx = u[:, cols] - cx
        ddy = v[rows, :] - cy
        r = np.sqrt(ddx**2 + ddy**2)
        patch = img[rows, cols]
        ring = _soft(_RING_R - r)
        if i == missing:
            # empty counterbore with a dark threaded hole, no head
            patch -= 0.12 * ring
            hole = _soft(_HOLE_R - r)
            patch -= 0.28 * hole
            patch += 0.04 * hole * np.sin(r * (2 * math.pi / 0.012))  # thread rings
            box = _box(cx, cy, _RING_R, _RING_R, h, w)
        else:
            patch -= 0.16 * ring
            a = hex_angles[i]
            hexd = np.maximum.reduce(
                [np.abs(ddx * math.cos(a + k * math.pi / 3) + ddy * math.sin(a + k * math.pi / 3)) for k in range(3)]
            )
            head = _soft(_BOLT_R - hexd)
            shade = 0.34 - 1.2 * (ddx + ddy)  # lit from the top left
            patch += head * shade

    if defect == "scratch":
        box = _scratch(rng, img, u, v, h, w)
    elif defect == "spot":
        box, stain = _spot(rng, img, u, v, h, w)

    img += noise  # sensor noise

    if channels == 1:
        out = img[:, :, None]
    else:
        out = img[:, :, None] * _TINT
        if stain is not None:
            out -= stain[:, :, None] * (_STAIN - _luma(_STAIN))  # luma-neutral: blue down, red up
        out *= 1.0 / _luma(_TINT)  # so that the luma of the RGB frame is the grey frame
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), box


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _pick_centre(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A defect centre away from the bolts and the frame border."""
    while True:
        cx, cy = rng.uniform(margin, 1 - margin, size=2)
        if all((cx - bu) ** 2 + (cy - bv) ** 2 > 0.16**2 for bu, bv in BOLT_POSITIONS):
            return float(cx), float(cy)


def _scratch(rng: np.random.Generator, img: np.ndarray, u: np.ndarray, v: np.ndarray, h: int, w: int) -> list[int]:
    cx, cy = _pick_centre(rng, 0.2)
    ang = math.radians(rng.uniform(15.0, 165.0)) * (1 if rng.random() < 0.5 else -1)
    length = rng.uniform(0.15, 0.35)
    width = rng.uniform(0.5, 1.0) / 128
    contrast = rng.uniform(0.16, 0.32) * (1.0 if rng.random() < 0.7 else -1.0)
    ca, sa = math.cos(ang), math.sin(ang)
    half = length / 2
    rows, cols = _window(cx, cy, half + 4 * width + _EDGE, h, w)
    du = u[:, cols] - cx
    dv = v[rows, :] - cy
    along = du * ca + dv * sa
    across = -du * sa + dv * ca
    t = np.clip(along / half, -1.0, 1.0)
    d2 = across**2 + np.maximum(np.abs(along) - half, 0.0) ** 2
    # pixel-scale blur of the line so that thin lines stay visible after resampling
    sig2 = width**2 + (0.5 / 128) ** 2
    taper = np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0)) * 0.7 + 0.3
    img[rows, cols] += contrast * taper * np.exp(-0.5 * d2 / sig2) * (width / math.sqrt(sig2))
    margin = 3.0 * math.sqrt(sig2)
    return _box(cx, cy, abs(half * ca) + margin, abs(half * sa) + margin, h, w)


def _spot(
    rng: np.random.Generator, img: np.ndarray, u: np.ndarray, v: np.ndarray, h: int, w: int
) -> tuple[list[int], np.ndarray | None]:
    cx, cy = _pick_centre(rng, 0.12)
    rad = rng.uniform(0.025, 0.06)
    contrast = rng.uniform(0.12, 0.28)
    bright = rng.random() < 0.25
    p1, p2 = rng.uniform(0, 2 * math.pi, size=2)
    a1, a2 = rng.uniform(0.05, 0.2), rng.uniform(0.0, 0.12)
    rmax = rad * (1 + a1 + a2)
    rows, cols = _window(cx, cy, rmax + 2 * _EDGE, h, w)
    du = u[:, cols] - cx
    dv = v[rows, :] - cy
    r = np.sqrt(du**2 + dv**2)
    phi = np.arctan2(dv, du)
    edge = rad * (1 + a1 * np.sin(2 * phi + p1) + a2 * np.sin(3 * phi + p2))
    m = _soft(edge - r)
    # a stain is darker at its rim (coffee ring), softer in its middle
    prof = m * (0.7 + 0.3 * np.clip(r / edge, 0, 1) ** 2)
    box = _box(cx, cy, rmax, rmax, h, w)
    if bright:
        img[rows, cols] += contrast * prof
        return box, None
    img[rows, cols] -= contrast * prof
    stain = np.zeros((h, w), dtype=np.float32)
    stain[rows, cols] = contrast * prof
    # grey luma is already darkened in img; RGB frames add a luma-neutral shift towards rust
    return box, stain


def sensor_window(
    rng: np.random.Generator,
    fault: str | None = None,
    rate_hz: float = 5000.0,
    n: int = 4096,
) -> np.ndarray:
    """One accelerometer window (unit g), float32 [n], sampled at ``rate_hz``.

    ``fault`` is None (healthy machine) or one of :data:`SENSOR_FAULTS`. A healthy
    machine has a 1x line of 0.18-0.32 g. Faults are drawn at severities worth an
    alarm, clearly above the healthy band: ``imbalance`` raises the machine's own 1x
    2.5-4.5 times (to 0.45-1.44 g, at least 1.4x the highest healthy 1x);
    ``bearing`` rings the 1.4-2.2 kHz resonance at an RMS of 0.035-0.14 g (see
    ``_BEARING_RMS_G``, about 1.5x the highest healthy level in that band or more);
    ``looseness`` adds 0.5x/1.5x/2.5x lines of 0.04-0.09 g and 2x-10x harmonics
    of up to 0.09 g, and clips the waveform. The same ``rng`` state with and without a
    fault gives the same machine.
    """
    if fault is not None and fault not in SENSOR_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {SENSOR_FAULTS} or None")
    if n < 64 or rate_hz <= 0:
        raise ValueError(f"need n >= 64 and rate_hz > 0, got n={n!r}, rate_hz={rate_hz!r}")
    t = np.arange(n) / rate_hz
    f0 = rng.uniform(18.0, 45.0)
    # slow speed wander: +-0.5 % sinusoid plus a small random drift
    wander = 0.005 * np.sin(2 * math.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 2 * math.pi))
    drift = np.cumsum(rng.standard_normal(n)) * (0.002 / math.sqrt(n))
    f_inst = f0 * (1.0 + wander + drift)
    phase = 2 * math.pi * np.cumsum(f_inst) / rate_hz  # shaft angle, rad

    amps = {1: rng.uniform(0.18, 0.32), 2: rng.uniform(0.04, 0.1), 3: rng.uniform(0.015, 0.04)}
    phases = {k: rng.uniform(0, 2 * math.pi) for k in amps}
    # broadband: white sensor noise + a structural resonance rung by random forcing
    x = rng.normal(0.0, 0.03, n)
    force = rng.normal(0.0, math.sqrt(5000.0 / rate_hz), n)  # same force spectrum at any sampling rate
    x += _resonance(force, rng.uniform(600, 1000), rng.uniform(0.02, 0.05), rate_hz) * rng.uniform(0.02, 0.04)
    # sometimes a steady electrical / process tone unrelated to the shaft
    tone = rng.uniform(0.01, 0.04) * np.sin(2 * math.pi * rng.choice([50.0, 100.0, 120.0, 300.0]) * t)
    if rng.random() < 0.5:
        x += tone

    # every draw of a healthy machine happens above: the same seed with and without a
    # fault gives the same machine, the fault's own draws come below
    if fault == "imbalance":
        amps[1] *= rng.uniform(2.5, 4.5)
    if fault == "looseness":
        for k in range(2, 11):
            amps[k] = amps.get(k, 0.0) + rng.uniform(0.04, 0.1) * (1.0 - 0.05 * k)
            phases.setdefault(k, rng.uniform(0, 2 * math.pi))
        for sub in (0.5, 1.5, 2.5):
            x += rng.uniform(0.04, 0.09) * np.sin(sub * phase + rng.uniform(0, 2 * math.pi))
    for k, a in amps.items():
        x += a * np.sin(k * phase + phases[k])

    if fault == "bearing":
        bpfo = f0 * rng.uniform(3.2, 3.7)
        period = rate_hz / bpfo
        hits = np.arange(int(n / period) + 2)
        pos = np.round(hits * period + rng.uniform(0, period) + rng.normal(0, 0.01 * period, hits.size)).astype(int)
        pos = pos[(pos >= 0) & (pos < n)]
        imp = np.zeros(n)
        mod = 1.0 + 0.6 * np.cos(phase[pos] + rng.uniform(0, 2 * math.pi))
        imp[pos] = rng.uniform(0.5, 1.0) * mod * (1 + 0.2 * rng.standard_normal(pos.size))
        ring = _resonance(imp, rng.uniform(1400, 2200), rng.uniform(0.03, 0.08), rate_hz)
        # severity = RMS of the ringing, log-uniform in _BEARING_RMS_G, whatever the damping,
        # resonance and impact rate (see _BEARING_RMS_G)
        level = math.exp(rng.uniform(math.log(_BEARING_RMS_G[0]), math.log(_BEARING_RMS_G[1])))
        x += ring * (level / (float(ring.std()) + 1e-12))
    if fault == "looseness":
        lim = np.quantile(np.abs(x), rng.uniform(0.85, 0.95))
        x = np.clip(x, -lim, lim)
    return x.astype(np.float32)


#: RMS (g) of a bearing defect's ringing, lowest and highest. A healthy machine's level in the
#: 1.25-2.5 kHz band is 0.020-0.028 g, so even the mildest defect puts the band at 1.5x the
#: highest healthy level or more: clearly above the healthy band, as an alarm level is set.
#: Milder (incipient) defects, buried in the healthy band, are a trend to watch, not an alarm.
_BEARING_RMS_G = (0.035, 0.14)


def _resonance(force: np.ndarray, f_hz: float, zeta: float, rate_hz: float) -> np.ndarray:
    """Response of a damped mode (natural frequency f_hz, damping ratio zeta) to ``force``, peak-normalised."""
    wn = 2 * math.pi * f_hz
    tau = 1.0 / (zeta * wn)
    m = max(int(6 * tau * rate_hz), 8)
    tk = np.arange(m) / rate_hz
    kern = np.exp(-tk / tau) * np.sin(wn * math.sqrt(1 - zeta**2) * tk)
    return np.convolve(force, kern, mode="full")[: force.size]
