"""Sensor Nodes: vibration windows from TP ``reading`` messages, and their features.

``sensor.window``   root Node: the reading's samples as float32 [window], checked
``sensor.features`` root Node (or child of ``sensor.window``): the feature vector a
                    vibration model scores, float32 [len(FEATURE_NAMES)]

:func:`vibration_features` is the one implementation of the features: the
training script of ``models/vibration-gauss`` imports it from here, so a model is
always scored on exactly the features it was fitted on.

The features are logarithms of levels in g or of dimensionless ratios, in four
groups (:data:`FEATURE_GROUPS`), one per thing a vibration analyst looks at:

* ``imbalance``: amplitude of the 1x shaft line (g);
* ``looseness``: amplitude (g) of the half orders 0.5x/1.5x/2.5x and of the
  harmonics 4x-10x, each over a floor of :data:`AMP_FLOOR_G` so that the noise
  level of a healthy machine does not spread them out; crest factor (a clipped,
  truncated waveform lowers it);
* ``bearing``: in the band :data:`BEARING_BAND_HZ` (1.25-2.5 kHz, above the
  structural resonances of the machine, where outer-race impacts ring): kurtosis,
  and the squared-envelope spectrum at the outer-race defect frequency (BPFO,
  searched in ``bearing_orders`` x shaft speed) summed over its first three
  harmonics, over the median level of that spectrum. Both are ratios: the band's
  level itself is mostly sensor noise, which differs from sensor to sensor (and
  with the sampling rate), so it is left out;
* ``overall``: RMS, kurtosis, amplitudes of 2x and 3x (g), fraction of the power
  up to 2.5 kHz in 0-100, 100-500, 500-1000 Hz and 1-2.5 kHz.

The shaft speed is the strongest spectral line in ``shaft_hz``, refined by
parabolic interpolation; order lines are summed over +-3 % of their frequency
(at least +-2 bins), so that slow speed wander stays inside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..exceptions import BadInput, TopologyError
from .base import SOURCE, Node, NodeEnv, RunContext, register

__all__ = [
    "FEATURE_GROUPS",
    "FEATURE_NAMES",
    "SensorWindow",
    "SensorFeatures",
    "vibration_features",
    "window_from_reading",
]

#: Feature names by fault group, in input order. A model may score each group on its own.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "imbalance": ("log_amp_1x",),
    "looseness": ("log_amp_half_orders", "log_amp_4x_10x", "log_crest"),
    "bearing": ("log_kurtosis_hf", "log_ses_bpfo"),
    "overall": (
        "log_rms",
        "log_kurtosis",
        "log_amp_2x",
        "log_amp_3x",
        "log_frac_0_100hz",
        "log_frac_100_500hz",
        "log_frac_500_1000hz",
        "log_frac_1000hz_up",
    ),
}
FEATURE_NAMES: tuple[str, ...] = tuple(name for names in FEATURE_GROUPS.values() for name in names)

_EPS = 1e-12
#: band where bearing impacts ring: above the structural modes, up to 2.5 kHz (and 0.96 x Nyquist)
BEARING_BAND_HZ = (1250.0, 2500.0)
#: the spectrum features look at frequencies up to this
TOP_HZ = 2500.0
#: floor (g) added to the half-order and 4x-10x amplitudes before the logarithm
AMP_FLOOR_G = 0.01
#: the sampling rate needed for the bearing band (1.25 kHz up to at least 1.9 kHz below Nyquist)
MIN_RATE_HZ = 4000.0
MIN_SAMPLES = 256


def _order_mask(freqs: np.ndarray, f: float, df: float) -> np.ndarray:
    half = max(2.0 * df, 0.03 * f)
    return (freqs >= f - half) & (freqs <= f + half)


def vibration_features(
    x: np.ndarray,
    rate_hz: float,
    *,
    shaft_hz: Sequence[float] = (10.0, 60.0),
    bearing_orders: Sequence[float] = (3.0, 4.0),
) -> np.ndarray:
    """The feature vector (float32, in the order of :data:`FEATURE_NAMES`) of one vibration window.

    ``x`` holds at least :data:`MIN_SAMPLES` finite samples (g) taken at ``rate_hz``
    (>= :data:`MIN_RATE_HZ`). Raises ValueError for input that cannot give features.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < MIN_SAMPLES:
        raise ValueError(f"needs at least {MIN_SAMPLES} samples, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("samples must be finite (no NaN or inf)")
    if not (math.isfinite(rate_hz) and rate_hz >= MIN_RATE_HZ):
        raise ValueError(f"rate_hz must be at least {MIN_RATE_HZ:g} Hz, got {rate_hz!r}")
    n = x.size
    x = x - x.mean()
    nyq = rate_hz / 2.0

    # time domain
    power = float(np.mean(x**2))
    rms = math.sqrt(power)
    peak = float(np.max(np.abs(x)))
    kurt = float(np.mean(x**4)) / (power**2 + _EPS) if power > 0 else 0.0

    # spectrum (Hann window, one-sided power); a line of amplitude A (g) sums to A^2 / line_gain
    win = np.hanning(n)
    p = np.abs(np.fft.rfft(x * win)) ** 2
    p[0] = 0.0
    freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
    df = rate_hz / n
    line_gain = 4.0 / (float((win**2).sum()) * n)
    top = min(TOP_HZ, nyq)
    total = float(p[freqs <= top].sum()) + _EPS

    def frac(lo: float, hi: float) -> float:
        return float(p[(freqs >= lo) & (freqs < hi)].sum()) / total

    bands = [frac(0.0, 100.0), frac(100.0, 500.0), frac(500.0, 1000.0), frac(1000.0, top + df)]

    # shaft speed: strongest line in the search range, refined by parabolic interpolation
    lo, hi = float(shaft_hz[0]), float(shaft_hz[1])
    idx = np.nonzero((freqs >= lo) & (freqs <= hi))[0]
    if idx.size:
        k = int(idx[np.argmax(p[idx])])
        f_r = freqs[k]
        if 0 < k < p.size - 1:
            a, b, c = np.log(p[k - 1 : k + 2] + _EPS)
            denom = a - 2 * b + c
            if denom < 0:
                f_r += 0.5 * (a - c) / denom * df
    else:
        f_r = lo
    f_r = float(max(f_r, df))

    def amp(orders: Sequence[float]) -> float:
        """RSS amplitude (g) of the lines at these shaft orders."""
        s = sum(float(p[_order_mask(freqs, o * f_r, df)].sum()) for o in orders)
        return math.sqrt(s * line_gain)

    amp_1x, amp_2x, amp_3x = amp((1,)), amp((2,)), amp((3,))
    amp_half = amp((0.5, 1.5, 2.5))
    amp_high = amp(range(4, 11))

    # bearing band: impulsiveness and squared-envelope spectrum. The band-pass works on
    # the FFT of the window with 10 % cosine tapers (so that the strong low orders do not leak
    # into the band), and only the untapered middle of the band signal is used.
    m = n // 10
    taper = np.ones(n)
    ramp = 0.5 * (1.0 - np.cos(np.pi * np.arange(m) / m))
    taper[:m], taper[n - m :] = ramp, ramp[::-1]
    band = (freqs >= BEARING_BAND_HZ[0]) & (freqs < min(BEARING_BAND_HZ[1], 0.96 * nyq))
    analytic = np.zeros(n, dtype=complex)
    analytic[: freqs.size][band] = 2.0 * np.fft.rfft(x * taper)[band]
    env_c = np.fft.ifft(analytic)[m : n - m]  # analytic band signal (Hilbert via the FFT)
    xb = env_c.real
    pb = float(np.mean(xb**2))
    kurt_hf = float(np.mean(xb**4)) / (pb**2 + _EPS) if pb > 0 else 0.0
    env2 = np.abs(env_c) ** 2
    env2 = env2 - env2.mean()
    pe = np.abs(np.fft.rfft(env2 * np.hanning(env2.size))) ** 2
    fe = np.fft.rfftfreq(env2.size, 1.0 / rate_hz)
    cand = np.nonzero((fe >= float(bearing_orders[0]) * f_r) & (fe <= float(bearing_orders[1]) * f_r))[0]
    ref = (fe >= 0.5 * f_r) & (fe <= min(12.0 * f_r, nyq))
    ses = 0.0
    if cand.size and ref.any():
        # BPFO and its 2nd and 3rd harmonics (each the largest of 3 bins around h x the candidate bin)
        pm = np.maximum(pe, np.maximum(np.r_[pe[1:], 0.0], np.r_[0.0, pe[:-1]]))
        last = pe.size - 1
        harm = pe[cand] + pm[np.minimum(2 * cand, last)] * (2 * cand <= last)
        harm = harm + pm[np.minimum(3 * cand, last)] * (3 * cand <= last)
        ses = float(harm.max()) / (float(np.median(pe[ref])) + _EPS)

    values = {
        "log_amp_1x": math.log(amp_1x + 1e-9),
        "log_amp_half_orders": math.log(amp_half + AMP_FLOOR_G),
        "log_amp_4x_10x": math.log(amp_high + AMP_FLOOR_G),
        "log_crest": math.log((peak + 1e-9) / (rms + 1e-9)),
        "log_kurtosis_hf": math.log(kurt_hf + 1e-6),
        "log_ses_bpfo": math.log(ses + 1e-6),
        "log_rms": math.log(rms + 1e-9),
        "log_kurtosis": math.log(kurt + 1e-6),
        "log_amp_2x": math.log(amp_2x + 1e-9),
        "log_amp_3x": math.log(amp_3x + 1e-9),
        "log_frac_0_100hz": math.log(bands[0] + 1e-9),
        "log_frac_100_500hz": math.log(bands[1] + 1e-9),
        "log_frac_500_1000hz": math.log(bands[2] + 1e-9),
        "log_frac_1000hz_up": math.log(bands[3] + 1e-9),
    }
    return np.asarray([values[name] for name in FEATURE_NAMES], dtype=np.float32)


def window_from_reading(msg: Mapping[str, Any], *, window: int, node: str = "") -> tuple[np.ndarray, float]:
    """The last ``window`` samples of a TP ``reading`` message and its rate; BadInput if unusable."""
    if not isinstance(msg, Mapping):
        raise BadInput(f"expects a TP reading message, got {type(msg).__name__}", node=node, reason="bad_values")
    if msg.get("kind", "reading") != "reading":
        raise BadInput(f"expects a 'reading' message, got {msg.get('kind')!r}", node=node, reason="unsupported_kind")
    raw = msg.get("values")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise BadInput(
            f"'values' must be binary little-endian float32, got {type(raw).__name__}", node=node, reason="bad_values"
        )
    nbytes = len(raw)
    if nbytes == 0:
        raise BadInput("'values' is empty", node=node, reason="bad_values")
    if nbytes % 4:
        raise BadInput(
            f"'values' holds {nbytes} bytes, not a whole number of float32 samples", node=node, reason="bad_values"
        )
    samples = np.frombuffer(raw, dtype="<f4")
    if samples.size < window:
        raise BadInput(
            f"reading holds {samples.size} samples, the window needs {window}: send longer readings or lower "
            f"params.window",
            node=node,
            reason="bad_values",
        )
    samples = samples[-window:]
    bad = int(np.count_nonzero(~np.isfinite(samples)))
    if bad:
        raise BadInput(f"'values' holds {bad} NaN or infinite samples", node=node, reason="bad_values")
    rate = msg.get("rate_hz")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise BadInput(f"'rate_hz' must be a positive number, got {rate!r}", node=node, reason="bad_values")
    return samples.astype(np.float32), float(rate)


def _pair(node: Node, name: str, default: tuple[float, float]) -> tuple[float, float]:
    value = node.param(name, list(default), kind=(list, tuple))
    path = f"nodes.{node.node_id}.params.{name}"
    if (
        len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not 0 < value[0] < value[1]
    ):
        raise TopologyError(f"param {name!r} must be [low, high] with 0 < low < high, got {value!r}", path=path)
    return float(value[0]), float(value[1])


def _check_window(node: Node, window: int) -> int:
    if window < MIN_SAMPLES:
        raise TopologyError(
            f"param 'window' must be at least {MIN_SAMPLES} samples, got {window}",
            path=f"nodes.{node.node_id}.params.window",
        )
    return window


@register("sensor.window")
class SensorWindow(Node):
    """Root Node for ``reading`` sources: the last ``window`` samples as ``{"values", "rate_hz"}``.

    params: ``window`` (samples, default 4096; shorter readings are rejected).
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.window = _check_window(self, self.param("window", 4096, kind=int))

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        values, rate = window_from_reading(_single(self, inputs), window=self.window, node=self.node_id)
        return {"values": values, "rate_hz": rate}


@register("sensor.features")
class SensorFeatures(Node):
    """Vibration features of a window: float32 [len(FEATURE_NAMES)], the input of a vibration model.

    Root Node for ``reading`` sources, or a child of ``sensor.window``.

    params:
      ``window``          samples per window, the last ones of the reading (default 4096;
                          shorter readings are rejected with reason ``bad_values``)
      ``shaft_hz``        [low, high] range where the shaft speed line is searched (default [10, 60])
      ``bearing_orders``  [low, high] shaft orders where the outer-race defect frequency (BPFO) is
                          searched in the envelope spectrum (default [3.0, 4.0])
      ``min_rate_hz``     lowest accepted sampling rate (default 4000; not lower)

    The defaults are those the shipped ``models/vibration-gauss`` model was trained with.
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.window = _check_window(self, self.param("window", 4096, kind=int))
        self.shaft_hz = _pair(self, "shaft_hz", (10.0, 60.0))
        self.bearing_orders = _pair(self, "bearing_orders", (3.0, 4.0))
        self.min_rate_hz = float(self.param("min_rate_hz", MIN_RATE_HZ, kind=(int, float)))
        if self.min_rate_hz < MIN_RATE_HZ:
            raise TopologyError(
                f"param 'min_rate_hz' cannot be below {MIN_RATE_HZ:g} (the bearing features need the band "
                f"from 1.25 kHz up to at least 1.9 kHz below Nyquist)",
                path=f"nodes.{node_id}.params.min_rate_hz",
            )

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        value = _single(self, inputs)
        if isinstance(value, Mapping) and "values" in value and isinstance(value["values"], np.ndarray):
            samples = np.asarray(value["values"], dtype=np.float32)[-self.window :]  # from sensor.window
            if samples.size < self.window:
                raise BadInput(
                    f"window holds {samples.size} samples, needs {self.window}", node=self.node_id, reason="bad_values"
                )
            rate = float(value.get("rate_hz", 0.0))
        else:
            samples, rate = window_from_reading(value, window=self.window, node=self.node_id)
        if rate < self.min_rate_hz:
            raise BadInput(
                f"sampling rate {rate:g} Hz is below {self.min_rate_hz:g} Hz, too low for the vibration features",
                node=self.node_id,
                reason="bad_values",
            )
        try:
            return vibration_features(samples, rate, shaft_hz=self.shaft_hz, bearing_orders=self.bearing_orders)
        except ValueError as exc:
            raise BadInput(str(exc), node=self.node_id, reason="bad_values") from None


def _single(node: Node, inputs: Mapping[str, Any]) -> Any:
    if SOURCE in inputs:
        return inputs[SOURCE]
    if len(inputs) != 1:
        raise BadInput(f"expects one parent, got {len(inputs)}", node=node.node_id)
    return next(iter(inputs.values()))
