"""QParams: dtype, scale and zero point (per tensor or per channel along ``axis``)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .dtypes import QuantDtype, get_dtype

__all__ = ["QParams"]

# the smallest float32 scale whose float32 reciprocal is finite: 1 / 2^-128 = 2^128
# overflows float32; the next float32 above 2^-128 is the first that does not
_MIN_SCALE = float(torch.nextafter(torch.tensor(2.0 ** -128), torch.tensor(1.0)))

# 2 * (1 + 2**-22), exact in float32: bounds a symmetric quantized range scale * (qmax - qmin)
# above by amax * _SYM_SPAN, whatever the roundings of the scale's division and that product
# (the observers' range check: quantization/observer.py, and the fused Triton observer's)
_SYM_SPAN = 2.0 + 2.0 ** -21


def _as_tensor(value, dtype: torch.dtype, what: str, bounds=None) -> torch.Tensor:
    """``value`` (a number or a tensor) as a tensor of ``dtype``. ``bounds``: for integer
    ``dtype``, the ``QuantDtype`` whose ``[qmin, qmax]`` the values must lie in, checked
    before the conversion (a cast to int32 would wrap a wider integer into range)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{what} must be a real number tensor, got dtype {value.dtype}")
        if value.is_floating_point() != dtype.is_floating_point:
            kind, hint = (("a floating-point", "") if dtype.is_floating_point else
                          ("an integer", " (round a float one and cast it: .round().int())"))
            raise TypeError(f"{what} must be {kind} tensor, got dtype {value.dtype}{hint}")
        value = value.detach()
        if bounds is not None:
            v = value.cpu().to(torch.int64)  # uint8 vs a negative bound: compare as int64
            bad = (v < bounds.qmin) | (v > bounds.qmax)
            if bool(bad.any()):
                _out_of_range(what, v[bad].flatten()[:4].tolist(), bounds)
        # a copy, always: the caller's tensor changed after validation must not change these
        # qparams (a float32 scale zeroed in place had made every later quantize saturate)
        return value.to(dtype, copy=True)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        # a NumPy scalar (np.float32, np.int64, ...: registered as numbers.Real) as the
        # Python number it holds, exactly (np.bool_ is no numbers.Real and stays refused)
        value = value.item() if hasattr(value, "item") else \
            (int(value) if isinstance(value, numbers.Integral) else float(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number or a tensor, got {type(value).__name__} ({value!r})")
    if not dtype.is_floating_point and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be an integer, got {value!r}")
    if bounds is not None and not bounds.qmin <= value <= bounds.qmax:
        _out_of_range(what, [value], bounds)
    return torch.tensor(value, dtype=dtype)


def _max_scale(d: QuantDtype) -> float:
    """The largest float32 scale whose ``scale * (qmax - qmin)`` is finite float32."""
    span = torch.tensor(float(d.qmax - d.qmin))
    big = torch.tensor(torch.finfo(torch.float32).max) / span
    while not torch.isfinite(big * span):
        big = torch.nextafter(big, torch.tensor(0.0))
    return float(big)


def _out_of_range(what: str, values: list, d: QuantDtype):
    raise ValueError(f"{what} {values} outside the range of {d.name}: [{d.qmin}, {d.qmax}]")


class QParams:
    """Quantization parameters: ``QParams(dtype, scale, zero_point, axis=None)``.

    Args:
        dtype: a :class:`gpuquant.QuantDtype` (or its name).
        scale: positive finite float32; a scalar for per-tensor, a 1-D vector (one scale
            per slice along ``axis``) for per-channel.
        zero_point: int32 of the same shape as ``scale``, inside the dtype's range.
        axis: ``None`` for per-tensor, else the channel axis of the tensors it applies to
            (negative values count from the end once a tensor is given).

    Raises:
        ValueError: scale <= 0, NaN or Inf; zero point outside [qmin, qmax]; shapes that do
            not match; a vector scale without an axis or an axis without a vector scale.
        TypeError: arguments of the wrong kind.

    Example:
        >>> qp = QParams(gpuquant.qint8, 0.05, 0)
        >>> qp_w = QParams(gpuquant.qint8_narrow, torch.rand(16) + 0.01, torch.zeros(16, dtype=torch.int32), axis=0)
    """

    __slots__ = ("dtype", "scale", "zero_point", "axis")

    def __init__(self, dtype, scale, zero_point=0, axis: Optional[int] = None):
        self.dtype: QuantDtype = get_dtype(dtype)
        scale = _as_tensor(scale, torch.float32, "scale")
        zero_point = _as_tensor(zero_point, torch.int32, "zero_point", self.dtype)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be None or an int, got {type(axis).__name__} ({axis!r})")
        if axis is None:
            if scale.numel() != 1:
                raise ValueError(f"per-tensor QParams (axis=None) need a single scale, got shape "
                                 f"{tuple(scale.shape)}; pass axis= for per-channel scales")
            scale = scale.reshape(())
            if zero_point.numel() != 1:
                raise ValueError(f"zero_point must have one element for per-tensor QParams, got "
                                 f"shape {tuple(zero_point.shape)}")
            zero_point = zero_point.reshape(())
        else:
            if scale.dim() != 1:
                raise ValueError(f"per-channel scale must be 1-D, got shape {tuple(scale.shape)}")
            if zero_point.dim() == 0:
                zero_point = zero_point.expand(scale.shape).clone()
            if zero_point.shape != scale.shape:
                raise ValueError(f"zero_point shape {tuple(zero_point.shape)} does not match scale "
                                 f"shape {tuple(scale.shape)}")
        if zero_point.device != scale.device:
            zero_point = zero_point.to(scale.device)
        s = scale.detach().cpu()
        # 1 / scale (the kernels' inv_scale, float32) must be finite too: below ~2.94e-39 it
        # is inf, and 0 * inf made 0.0 NaN; and the dtype's whole range dequantized,
        # (q - zero_point) * scale, must be finite float32 (above ~1.3e36 for 8 bits it was
        # inf)
        span = float(self.dtype.qmax - self.dtype.qmin)
        bad = ~torch.isfinite(s) | (s <= 0) | ~torch.isfinite(1.0 / s) | \
            ~torch.isfinite(s * span)
        if bool(bad.any()):
            raise ValueError(f"scale must be finite and > 0 with a finite float32 reciprocal, "
                             f"and {self.dtype.name}'s range times it finite in float32 (in "
                             f"[{_MIN_SCALE:.3g}, {_max_scale(self.dtype):.3g}]), got "
                             f"{s[bad].flatten()[:4].tolist()} (at {int(bad.sum())} "
                             f"position(s))")
        self.scale = scale
        self.zero_point = zero_point
        self.axis = axis

    @classmethod
    def trusted(cls, dtype: QuantDtype, scale: torch.Tensor, zero_point: torch.Tensor,
                axis: Optional[int] = None) -> "QParams":
        """Build without validation or host sync, for internal hot paths (observers on the GPU)
        whose values are valid by construction: float32 ``scale`` >= eps, int32 ``zero_point``
        in range, shapes already matching."""
        self = cls.__new__(cls)
        self.dtype, self.scale, self.zero_point, self.axis = dtype, scale, zero_point, axis
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def qmin(self) -> int:
        return self.dtype.qmin

    @property
    def qmax(self) -> int:
        return self.dtype.qmax

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def resolve_axis(self, ndim: int) -> Optional[int]:
        """The non-negative channel axis for a tensor of ``ndim`` dimensions.

        Raises:
            ValueError: axis out of range for that tensor.
        """
        if self.axis is None:
            return None
        if ndim == 0:
            raise ValueError(f"per-channel QParams (axis {self.axis}) need a tensor with a "
                             f"channel axis, got a 0-d tensor")
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis {self.axis} out of range for a tensor of {ndim} dimensions; "
                             f"allowed: [{-ndim}, {ndim - 1}]")
        return self.axis % ndim

    def check_tensor(self, x: torch.Tensor) -> Optional[int]:
        """Check these qparams fit tensor ``x``; return the resolved axis.

        Raises:
            ValueError: axis out of range, or channel count != number of scales.
        """
        axis = self.resolve_axis(x.dim())
        if axis is not None and x.shape[axis] != self.scale.numel():
            raise ValueError(f"tensor has {x.shape[axis]} channels along axis {self.axis} but "
                             f"QParams hold {self.scale.numel()} scales")
        return axis

    def to(self, device) -> "QParams":
        """These qparams on ``device`` (a ``torch.device`` or a device string).

        Raises:
            ValueError: a string torch does not read as a device. TypeError: not a device.
        """
        if isinstance(device, str):
            try:
                device = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"QParams.to: not a device: {device!r} ({e})") from None
        elif not isinstance(device, torch.device):
            raise TypeError(f"QParams.to: device must be a torch.device or a device string, "
                            f"got {type(device).__name__} ({device!r})")
        return QParams(self.dtype, self.scale.to(device), self.zero_point.to(device), self.axis)

    def item_scale(self) -> float:
        """The per-tensor scale as a Python float (host sync)."""
        if self.per_channel:
            raise ValueError("item_scale() needs per-tensor QParams, got per-channel")
        return float(self.scale)

    def item_zero_point(self) -> int:
        if self.per_channel:
            raise ValueError("item_zero_point() needs per-tensor QParams, got per-channel")
        return int(self.zero_point)

    def __eq__(self, other) -> bool:
        if not isinstance(other, QParams):
            return NotImplemented
        return (self.dtype == other.dtype and self.axis == other.axis
                and torch.equal(self.scale.cpu(), other.scale.cpu())
                and torch.equal(self.zero_point.cpu(), other.zero_point.cpu()))

    def __repr__(self) -> str:
        if self.per_channel:
            return (f"QParams({self.dtype.name}, scale=<{self.scale.numel()} per-channel>, "
                    f"axis={self.axis})")
        return (f"QParams({self.dtype.name}, scale={float(self.scale):.6g}, "
                f"zero_point={int(self.zero_point)})")

    def state(self) -> dict:
        """Plain-data form (for save/load and checkpoints)."""
        return {"dtype": self.dtype.name, "scale": self.scale.cpu(),
                "zero_point": self.zero_point.cpu(), "axis": self.axis}

    @classmethod
    def from_state(cls, state: dict) -> "QParams":
        """The QParams of a :meth:`state` dict (validated as the constructor validates).

        Raises:
            TypeError: not a dict. ValueError: a key missing; what the constructor raises.
        """
        if not isinstance(state, dict):
            raise TypeError(f"QParams.from_state needs a dict (QParams.state()), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("dtype", "scale", "zero_point", "axis") if k not in state]
        if missing:
            raise ValueError(f"QParams.from_state: the state lacks {missing}; a QParams state "
                             f"has dtype, scale, zero_point and axis (QParams.state())")
        return cls(state["dtype"], state["scale"], state["zero_point"], state["axis"])


