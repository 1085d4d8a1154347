"""Fixed-point requantization parameters, computed once on the host (contract section 1).

A real multiplier ``m = s_in * s_w[c] / s_out`` (> 0) becomes an int32 ``multiplier`` in
[2^30, 2^31) and a right shift ``rshift`` with ``m ~= multiplier * 2^-31 * 2^-rshift``,
computed in float64 with ``math.frexp`` exactly as TFLite's ``QuantizeMultiplier``
(rounding half away from zero). ``rshift`` may be negative (a left shift, for m >= 1);
multipliers below 2^-32 (``frexp`` exponent < -31) become (0, 0), as TFLite does.

Applying it (every backend, bit for bit; see ``reference.requantize``)::

    x = acc                     # int32
    if rshift < 0: x = saturate_int32(x * 2^-rshift)
    x = SaturatingRoundingDoublingHighMul(x, multiplier)
    x = RoundingDivideByPOT(x, max(rshift, 0))
    y = clamp(x + zero_point, qmin, qmax)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._tensors import version as _version
from ..dtypes import QuantDtype, get_dtype

__all__ = ["quantize_multiplier", "Requant", "make_requant", "AddParams", "make_add_params",
           "activation_range", "ACTIVATIONS", "INT32_MIN", "INT32_MAX"]

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
_RSHIFT_MIN, _RSHIFT_MAX = -30, 31  # what quantize_multiplier gives (m in [2^-32, 2^30))
ADD_MAX_LEFT_SHIFT = 24  # (x - zp) * 2^left_shift (8-bit inputs: |x - zp| <= 255) times a
# multiplier < 2^31 fits int64 (the backends' wide path); TFLite / make_add_params use 20
ACTIVATIONS = ("none", "relu", "relu6")


# the pure math lives in a torch-free module shared with gpuquant.runtime
from ..multipliers import activation_bounds, add_multipliers  # noqa: E402
from ..multipliers import quantize_multiplier_one as _quantize_one  # noqa: E402


def quantize_multiplier(real, saturate: bool = False) -> tuple:
    """Float multipliers -> (int32 multiplier tensor, int32 rshift tensor), same shape.

    Args:
        real: float, sequence or tensor of positive multipliers (computed in float64).
        saturate: the output range is narrower than 2^30: multipliers >= 2^30 become the
            largest one, which saturates every nonzero accumulator as they do
            (:func:`gpuquant.multipliers.quantize_multiplier_one`); else they raise.
    """
    t = torch.as_tensor(real, dtype=torch.float64).detach().cpu()
    pairs = [_quantize_one(float(v), saturate) for v in t.flatten().tolist()]
    mult = torch.tensor([p[0] for p in pairs], dtype=torch.int32).reshape(t.shape)
    shift = torch.tensor([p[1] for p in pairs], dtype=torch.int32).reshape(t.shape)
    return mult, shift


def activation_range(dtype: QuantDtype, scale: float, zero_point: int, activation: str):
    """Integer clamp range [lo, hi] of a quantized output with a fused activation."""
    return activation_bounds(dtype.qmin, dtype.qmax, scale, zero_point, activation)


@dataclass
class Requant:
    """Output requantization: int32 accumulator -> quantized output (per channel or not).

    ``multiplier`` / ``rshift``: int32 tensors of shape () or (C,) (C = output channels,
    the last dimension of a linear's output and dim 1 of a conv's). ``zero_point``,
    ``qmin``, ``qmax``: Python ints (the activation's clamp folded into qmin/qmax).
    ``dtype``: the output QuantDtype (its ``storage`` is the torch dtype written).
    ``left_shift``: whether some ``rshift`` is negative (a multiplier >= 1: the saturating
    left shift), known on the host; computed when the shifts are given as a CPU tensor (every
    constructor in gpuquant builds them there), kept by :meth:`to`, None where unknown. The
    GPU epilogues leave the left-shift path out only where :meth:`may_left_shift` is False.

    Raises:
        ValueError: ``zero_point`` outside ``dtype``'s range, or a clamp that is not
            ``dtype.qmin <= qmin <= qmax <= dtype.qmax``.
    """

    multiplier: torch.Tensor
    rshift: torch.Tensor
    zero_point: int
    qmin: int
    qmax: int
    dtype: QuantDtype
    left_shift: Optional[bool] = None

    def __post_init__(self):
        d = self.dtype
        if not isinstance(d, QuantDtype):
            raise TypeError(f"Requant: dtype must be a gpuquant QuantDtype, got {d!r}")
        for name in ("zero_point", "qmin", "qmax"):
            v = getattr(self, name)
            if isinstance(v, bool) or not hasattr(v, "__index__") or (
                    isinstance(v, torch.Tensor) and (v.numel() != 1 or v.is_floating_point())):
                raise TypeError(f"Requant: {name} must be an int, got {v!r}")
            setattr(self, name, int(v.__index__()))
        for name in ("multiplier", "rshift"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or v.dtype != torch.int32:
                raise TypeError(f"Requant: {name} must be an int32 tensor, got "
                                f"{getattr(v, 'dtype', type(v).__name__)}")
            if v.dim() > 1:
                raise ValueError(f"Requant: {name} must have shape () or (C,), got "
                                 f"{tuple(v.shape)}")
        if self.multiplier.shape != self.rshift.shape:
            raise ValueError(f"Requant: multiplier and rshift shapes differ: "
                             f"{tuple(self.multiplier.shape)} and {tuple(self.rshift.shape)}")
        if self.multiplier.device.type == "cpu" and self.rshift.device.type == "cpu":
            # (device tensors: checked where a kernel first reads them, check_values)
            self.check_values(self.multiplier, self.rshift)
        if not d.qmin <= self.zero_point <= d.qmax:
            raise ValueError(f"Requant: output zero point {self.zero_point} is outside the "
                             f"{d.name} range [{d.qmin}, {d.qmax}]")
        if not d.qmin <= self.qmin <= self.qmax <= d.qmax:
            raise ValueError(f"Requant: the output clamp [qmin, qmax] = [{self.qmin}, "
                             f"{self.qmax}] must be a non-empty range inside the {d.name} "
                             f"range [{d.qmin}, {d.qmax}]")
        if not self.qmin <= self.zero_point <= self.qmax:
            # an activation's clamp keeps real 0 (ReLU: [zp, qmax], ReLU6: [zp, zp + 6 / s]);
            # the int32 epilogues clamp y - zp before adding zp, which needs it too
            raise ValueError(f"Requant: the output clamp [qmin, qmax] = [{self.qmin}, "
                             f"{self.qmax}] must contain the zero point {self.zero_point} "
                             f"(real 0 stays representable, as every activation clamp keeps "
                             f"it)")
        if isinstance(self.rshift, torch.Tensor) and self.rshift.device.type == "cpu":
            # the values decide, whatever was passed (dataclasses.replace passes the old flag)
            self.left_shift = bool((self.rshift < 0).any())
        self._shift_src = self.rshift  # (the flag describes this tensor: reassigning it,
        self._shift_version = _version(self.rshift)  # or writing it in place, voids it)

    @staticmethod
    def check_values(m: torch.Tensor, r: torch.Tensor, who: str = "Requant") -> None:
        """ValueError unless the CPU tensors ``m`` (multipliers) are in [0, 2^31) and ``r``
        (shifts) in make_requant's range: what every backend's fixed point relies on."""
        bad = (m < 0) | (r < _RSHIFT_MIN) | (r > _RSHIFT_MAX)
        if bool(bad.any()):
            i = bad.flatten().nonzero()[:4].flatten()
            raise ValueError(f"{who}: multipliers must be in [0, 2^31) and shifts in "
                             f"[{_RSHIFT_MIN}, {_RSHIFT_MAX}] (make_requant's range), got "
                             f"multipliers {m.flatten()[i].tolist()}, shifts "
                             f"{r.flatten()[i].tolist()} (channels {i.tolist()})")

    def may_left_shift(self) -> bool:
        """False only when no ``rshift`` is negative for certain: known on the host and the
        shifts neither replaced nor changed in place since (no device read)."""
        return (self.left_shift is not False or self.rshift is not self._shift_src
                or _version(self.rshift) != self._shift_version)

    def to(self, device) -> "Requant":
        known = self.left_shift if (self.rshift is self._shift_src and _version(self.rshift)
                                    == self._shift_version) else None
        return Requant(self.multiplier.to(device), self.rshift.to(device), self.zero_point,
                       self.qmin, self.qmax, self.dtype, known)

    @property
    def per_channel(self) -> bool:
        return self.multiplier.dim() == 1


def _int_arg(v, what: str) -> int:
    """An integer argument (int, NumPy integer, one-element integer tensor, or an integral
    float) as an int; bools and non-integral values refused, never truncated."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{what} must be an int, got a {v.dtype} tensor of shape "
                            f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"{what} must be an integer, got {v!r}")
        return int(v)
    if not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(v).__name__} ({v!r})")
    return int(v.__index__())


def _positive_scale(v, what: str) -> float:
    """A scale argument (a Python / NumPy real, a one-element tensor or 0-d array) as a
    float; ValueError naming ``what`` unless it is finite and > 0."""
    try:
        f = None if isinstance(v, (bool, str, bytes)) else float(v)
    except (TypeError, ValueError):
        f = None
    if f is None or not 0.0 < f < float("inf"):
        raise ValueError(f"{what} must be a finite float > 0, got {v!r}")
    return f


def make_requant(in_scale, w_scale, out_scale: float, out_zero_point: int, out_dtype,
                 activation: str = "none") -> Requant:
    """Requant for ``acc`` in units of ``in_scale * w_scale`` to an output of ``out_scale``.

    Args:
        in_scale: input scale (float or 0-d tensor).
        w_scale: weight scale: float, or a (C,) tensor for per-channel weights; pass 1.0 for
            ops whose accumulator is in input units (mul passes s_a * s_b as in_scale).
        out_scale, out_zero_point, out_dtype: the output's qparams.
        activation: "none", "relu" or "relu6", fused as the clamp range.

    Raises:
        ValueError: ``out_zero_point`` outside the output dtype's range, an unknown
            ``activation``, an ``out_scale`` that is not a finite float > 0, an ``in_scale``
            or ``w_scale`` not finite and > 0 (each), scales whose ratio is not a finite
            positive multiplier. (A ratio >= 2^30 saturates every nonzero accumulator for
            an 8- or 4-bit output: it becomes the largest multiplier, same bytes.)
    """
    dtype = get_dtype(out_dtype)
    out_zero_point = _int_arg(out_zero_point, "make_requant: out_zero_point")
    _positive_scale(out_scale, "make_requant: out_scale")
    s_in = torch.as_tensor(in_scale, dtype=torch.float64).cpu()
    s_w = torch.as_tensor(w_scale, dtype=torch.float64).cpu()
    for what, v in (("in_scale", s_in), ("w_scale", s_w)):  # each, not just their product:
        bad = ~(torch.isfinite(v) & (v > 0))              # two negative scales multiply to
        if bool(bad.any()):                                # a positive, sign-flipped layer
            raise ValueError(f"make_requant: {what} must be finite and > 0, got "
                             f"{v[bad].flatten()[:4].tolist()}")
    real = s_in * s_w / float(out_scale)
    mult, shift = quantize_multiplier(real, saturate=dtype.qmax - dtype.qmin < 2 ** 30)
    lo, hi = activation_range(dtype, float(out_scale), int(out_zero_point), activation)
    return Requant(mult, shift, int(out_zero_point), lo, hi, dtype)


@dataclass
class AddParams:
    """TFLite reference integer add: ``left_shift`` and per-input / output multipliers."""

    left_shift: int
    a_zero_point: int
    a_multiplier: int
    a_rshift: int
    b_zero_point: int
    b_multiplier: int
    b_rshift: int
    out: Requant  # per-tensor; its multiplier/rshift rescale the sum

    def __post_init__(self):
        """Hand-built parameters are held to what every backend computes alike (as
        :class:`Requant` is): refused with a ValueError / TypeError naming the value."""
        for name in ("left_shift", "a_zero_point", "a_multiplier", "a_rshift", "b_zero_point",
                     "b_multiplier", "b_rshift"):
            v = getattr(self, name)
            if isinstance(v, (bool, float)) or not hasattr(v, "__index__"):
                raise TypeError(f"AddParams: {name} must be an int, got {v!r}")
            setattr(self, name, int(v.__index__()))
        if not 0 <= self.left_shift <= ADD_MAX_LEFT_SHIFT:
            raise ValueError(f"AddParams: left_shift must be in [0, {ADD_MAX_LEFT_SHIFT}] (8-bit "
                             f"inputs shifted by it, times a multiplier, fit int64), got "
                             f"{self.left_shift}")
        for side in ("a", "b"):
            m, r = getattr(self, f"{side}_multiplier"), getattr(self, f"{side}_rshift")
            if not (0 <= m < 2 ** 31 and _RSHIFT_MIN <= r <= _RSHIFT_MAX):
                raise ValueError(f"AddParams: {side}_multiplier must be in [0, 2^31) and "
                                 f"{side}_rshift in [{_RSHIFT_MIN}, {_RSHIFT_MAX}] (make_requant's "
                                 f"range), got {m} and {r}")
        if not isinstance(self.out, Requant):
            raise TypeError(f"AddParams: out must be a Requant, got {type(self.out).__name__}")
        if self.out.multiplier.numel() != 1:
            raise ValueError(f"AddParams: out must be per-tensor (one multiplier), got "
                             f"{self.out.multiplier.numel()}")


def make_add_params(a_scale: float, a_zp: int, b_scale: float, b_zp: int, out_scale: float,
                    out_zp: int, out_dtype, activation: str = "none") -> AddParams:
    """As TFLite's ``PrepareGeneralSubOrAdd``: left_shift 20, inputs scaled by
    ``s_i / (2 max(s_a, s_b))``, the sum by ``2 max(s_a, s_b) / (2^20 s_out)``."""
    a_zp, b_zp, out_zp = (_int_arg(v, f"make_add_params: {n}") for v, n in
                          ((a_zp, "a_zp"), (b_zp, "b_zp"), (out_zp, "out_zp")))
    for v, n in ((a_scale, "a_scale"), (b_scale, "b_scale")):  # (as make_requant's scales:
        _positive_scale(v, f"make_add_params: {n}")               # NumPy reals too)
    left_shift, (ma, sa), (mb, sb), sum_scale = add_multipliers(a_scale, b_scale)
    out = make_requant(sum_scale, 1.0, out_scale, out_zp, out_dtype, activation)
    return AddParams(left_shift, int(a_zp), int(ma), int(sa), int(b_zp), int(mb), int(sb), out)
