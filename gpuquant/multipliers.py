"""Host-side fixed-point multiplier math in plain Python / NumPy (no torch).

One definition of how real rescaling factors become TFLite-style ``(multiplier, rshift)``
pairs and clamp ranges, shared by :mod:`gpuquant.functional.requant` (the quantized
modules, on torch) and :mod:`gpuquant.runtime` (exported models, NumPy only), so both
derive the same integers from the same float32 scales.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["quantize_multiplier_one", "SATURATED", "activation_bounds", "single_rounding_multiplier",
           "add_multipliers", "ADD_LEFT_SHIFT", "ACTIVATIONS", "INT32_MIN", "INT32_MAX"]

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
ACTIVATIONS = ("none", "relu", "relu6")
ADD_LEFT_SHIFT = 20


SATURATED = (2 ** 31 - 1, -30)  # the largest multiplier: ~2^30


def quantize_multiplier_one(m: float, saturate: bool = False):
    """``m > 0`` -> ``(multiplier, rshift)`` with ``multiplier`` in [2^30, 2^31) and
    ``m ~= multiplier * 2^-31 * 2^-rshift`` (TFLite ``QuantizeMultiplier``: ``math.frexp``,
    rounding half away from zero); below 2^-32 (``frexp`` exponent < -31) -> ``(0, 0)``.

    ``m >= 2^30`` with ``saturate`` (an output range narrower than 2^30, every 8- and 4-bit
    dtype) -> :data:`SATURATED`, the largest multiplier: with it, as with ``m`` itself, an
    accumulator of 0 gives the zero point and every other one saturates the output (``|acc|
    m >= 2^30``), so the bytes are those of the exact multiplier. Such scales come from a
    layer whose calibrated output range is empty (a dead ReLU: scale eps) after large inputs.

    Raises:
        ValueError: ``m`` not finite and > 0, or ``m >= 2^30`` without ``saturate``.
    """
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"requantization multiplier must be finite and > 0, got {m!r}")
    q, e = math.frexp(m)  # m = q * 2^e, q in [0.5, 1)
    q_fixed = math.floor(q * 2.0 ** 31 + 0.5)  # half away from zero (q > 0)
    if q_fixed == 2 ** 31:
        q_fixed //= 2
        e += 1
    if e < -31:  # too small to represent: TFLite flushes to zero
        return 0, 0
    if e > 30:
        if saturate:
            return SATURATED
        raise ValueError(f"requantization multiplier {m!r} too large (>= 2^30) for an output "
                         f"range of 2^30 or more: scales are inconsistent")
    return int(q_fixed), int(-e)


def activation_bounds(qmin: int, qmax: int, scale: float, zero_point: int, activation: str):
    """Integer clamp range ``[lo, hi]`` of an output in ``[qmin, qmax]`` with a fused
    activation: ReLU clamps at the zero point, ReLU6 also at ``zp + rne(float32(6 / scale))``.

    Raises:
        ValueError: unknown activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    lo, hi = int(qmin), int(qmax)
    if activation in ("relu", "relu6"):
        lo = max(lo, int(zero_point))
    if activation == "relu6":
        with np.errstate(over="ignore"):
            steps = np.float32(6.0 / float(scale))
        if np.isfinite(steps):  # else (a scale below ~1.8e-38) 6 is past every integer
            six = int(zero_point) + int(np.rint(steps))
            hi = min(hi, max(six, lo))
    return lo, hi


def single_rounding_multiplier(real: float):
    """``(round(real * 2^31), 0)`` for ``real`` in [2^-11, 0.5) (one rounding for small
    accumulators: concat and mul, see ``single_rounding_requant`` in
    :mod:`gpuquant.nn.quantized.elemwise`), else None (use :func:`quantize_multiplier_one`)."""
    real = float(real)
    if not (2.0 ** -11 <= real < 0.5):
        return None
    return int(math.floor(real * 2.0 ** 31 + 0.5)), 0


def add_multipliers(a_scale: float, b_scale: float):
    """TFLite ``PrepareGeneralSubOrAdd``: ``(left_shift, (m_a, rshift_a), (m_b, rshift_b),
    sum_scale)``; inputs are scaled by ``s_i / (2 max(s_a, s_b))`` after a left shift of 20,
    and the sum is in units of ``sum_scale = 2 max(s_a, s_b) / 2^20`` (its requantization to
    the output is ``sum_scale / s_out``)."""
    twice_max = 2.0 * max(float(a_scale), float(b_scale))
    return (ADD_LEFT_SHIFT, quantize_multiplier_one(float(a_scale) / twice_max),
            quantize_multiplier_one(float(b_scale) / twice_max), twice_max / (1 << ADD_LEFT_SHIFT))
