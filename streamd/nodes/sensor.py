"""Sensor Nodes: vibration windows from TP ``reading`` messages, and their features.

``sensor.window``   root Node: the reading's samples as float32 [window], checked
``sensor.features`` root Node (or child of ``sensor.window``): the feature vector a
                    vibration model scores, float32 [len(FEATURE_NAMES)]

:func:`vibration_features` is the one implementation of the features: the
training script of ``models/vibration-gauss`` imports it from here, so a model is
always scored on exactly the features it was fitted on.

Features (all dimensionless or logarithms, so that a healthy machine at another
speed or load lands near the same point):

* time domain: log RMS, log peak, log crest factor, log kurtosis;
* spectrum: log fraction of the power in 0-100, 100-500, 500-1000 Hz and 1 kHz up
  to Nyquist (at most 2.5 kHz), where bearing-defect impacts ring the structure;
* shaft orders (the shaft speed is the strongest peak in ``shaft_hz``): log
  amplitude of 1x, log power fraction of 1x, 2x, 3x, of the half orders
  0.5x/1.5x/2.5x and of the higher harmonics 4x-10x;
* envelope: kurtosis of the 1 kHz+ band and the peak of its envelope spectrum at
  the outer-race defect frequency (searched in ``bearing_orders`` x shaft speed)
  over the envelope spectrum's median level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..exceptions import BadInput, TopologyError
from .base import SOURCE, Node, NodeEnv, RunContext, register

__all__ = [
    "FEATURE_NAMES",
    "SensorWindow",
    "SensorFeatures",
    "vibration_features",
    "window_from_reading",
]

FEATURE_NAMES: tuple[str, ...] = (
    "log_rms",
    "log_peak",
    "log_crest",
    "log_kurtosis",
    "log_frac_0_100hz",
    "log_frac_100_500hz",
    "log_frac_500_1000hz",
    "log_frac_1000hz_up",
    "log_amp_1x",
    "log_frac_1x",
    "log_frac_2x",
    "log_frac_3x",
    "log_frac_half_orders",
    "log_frac_4x_10x",
    "log_kurtosis_1000hz_up",
    "log_envelope_bpfo_peak",
)

_EPS = 1e-12
#: the sampling rate needed for the 1 kHz+ band (its top is at most 2.5 kHz and below Nyquist)
MIN_RATE_HZ = 2500.0
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

    ``x`` holds at least :data:`MIN_SAMPLES` finite samples taken at ``rate_hz`` (>= 2500 Hz).
    Raises ValueError for input that cannot give features.
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

    # spectrum (Hann window, one-sided power)
    win = np.hanning(n)
    spec = np.fft.rfft(x * win)
    p = np.abs(spec) ** 2
    p[0] = 0.0
    freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
    df = rate_hz / n
    total = float(p.sum()) + _EPS
    hf_lo, hf_hi = 1000.0, min(2500.0, 0.96 * nyq)

    def frac(mask: np.ndarray) -> float:
        return float(p[mask].sum()) / total

    bands = [
        frac(freqs < 100.0),
        frac((freqs >= 100.0) & (freqs < 500.0)),
        frac((freqs >= 500.0) & (freqs < 1000.0)),
        frac(freqs >= hf_lo),
    ]

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

    order = {o: frac(_order_mask(freqs, o * f_r, df)) for o in (1, 2, 3)}
    half_orders = sum(frac(_order_mask(freqs, o * f_r, df)) for o in (0.5, 1.5, 2.5))
    high = sum(frac(_order_mask(freqs, o * f_r, df)) for o in range(4, 11))
    # amplitude of the 1x line in g (Hann window: coherent gain 0.5)
    m1 = _order_mask(freqs, f_r, df)
    amp_1x = 2.0 * math.sqrt(float(p[m1].sum()) / float((win**2).sum()) / n) if m1.any() else 0.0

    # high band: impulsiveness and envelope spectrum. The band-pass works on the FFT of the
    # window with 10 % cosine tapers (so that the strong low orders do not leak into the band),
    # and only the untapered middle of the band signal is used.
    m = n // 10
    taper = np.ones(n)
    ramp = 0.5 * (1.0 - np.cos(np.pi * np.arange(m) / m))
    taper[:m], taper[n - m :] = ramp, ramp[::-1]
    band = (freqs >= hf_lo) & (freqs < hf_hi)
    analytic = np.zeros(n, dtype=complex)
    analytic[: freqs.size][band] = 2.0 * np.fft.rfft(x * taper)[band]
    env_c = np.fft.ifft(analytic)[m : n - m]  # analytic band signal (Hilbert via the FFT)
    xb = env_c.real
    pb = float(np.mean(xb**2))
    kurt_hf = float(np.mean(xb**4)) / (pb**2 + _EPS) if pb > 0 else 0.0
    env = np.abs(env_c)
    env = env - env.mean()
    pe = np.abs(np.fft.rfft(env * np.hanning(env.size))) ** 2
    fe = np.fft.rfftfreq(env.size, 1.0 / rate_hz)
    b_lo, b_hi = float(bearing_orders[0]) * f_r, float(bearing_orders[1]) * f_r
    in_b = (fe >= b_lo) & (fe <= b_hi)
    ref = (fe >= 0.5 * f_r) & (fe <= min(12.0 * f_r, nyq))
    env_peak = float(pe[in_b].max()) / (float(np.median(pe[ref])) + _EPS) if in_b.any() and ref.any() else 1.0

    feats = [
        math.log(rms + 1e-9),
        math.log(peak + 1e-9),
        math.log((peak + 1e-9) / (rms + 1e-9)),
        math.log(kurt + 1e-6),
        *(math.log(b + 1e-9) for b in bands),
        math.log(amp_1x + 1e-9),
        *(math.log(order[o] + 1e-9) for o in (1, 2, 3)),
        math.log(half_orders + 1e-9),
        math.log(high + 1e-9),
        math.log(kurt_hf + 1e-6),
        math.log(env_peak + 1e-6),
    ]
    return np.asarray(feats, dtype=np.float32)


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


@register("sensor.window")
class SensorWindow(Node):
    """Root Node for ``reading`` sources: the last ``window`` samples as ``{"values", "rate_hz"}``.

    params: ``window`` (samples, default 4096; shorter readings are rejected).
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.window = self.param("window", 4096, kind=int)
        if self.window < MIN_SAMPLES:
            raise TopologyError(
                f"param 'window' must be at least {MIN_SAMPLES} samples, got {self.window}",
                path=f"nodes.{node_id}.params.window",
            )

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
      ``min_rate_hz``     lowest accepted sampling rate (default 2500; not lower)

    The defaults are those the shipped ``models/vibration-gauss`` model was trained with.
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.window = self.param("window", 4096, kind=int)
        if self.window < MIN_SAMPLES:
            raise TopologyError(
                f"param 'window' must be at least {MIN_SAMPLES} samples, got {self.window}",
                path=f"nodes.{node_id}.params.window",
            )
        self.shaft_hz = _pair(self, "shaft_hz", (10.0, 60.0))
        self.bearing_orders = _pair(self, "bearing_orders", (3.0, 4.0))
        self.min_rate_hz = float(self.param("min_rate_hz", MIN_RATE_HZ, kind=(int, float)))
        if self.min_rate_hz < MIN_RATE_HZ:
            raise TopologyError(
                f"param 'min_rate_hz' cannot be below {MIN_RATE_HZ:g} (the features use the band up to 1.25 kHz+)",
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
