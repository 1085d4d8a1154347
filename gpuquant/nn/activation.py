"""Float pointwise activations other than ReLU / ReLU6 (which fuse into the layer before) as
one module, ``Activation(kind)``, so each gets its own output quantization. The int8 form
(:class:`gpuquant.nn.quantized.Activation`) is a lookup table over the input's 256 codes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .module import Module

__all__ = ["Activation", "ACTIVATION_KINDS", "activation_fn", "check_kind", "check_slope"]

# kind -> f(x, negative_slope): each the torch function of the same name, float in, float out
_FNS = {
    "silu": lambda x, a: F.silu(x),
    "hardswish": lambda x, a: F.hardswish(x),
    "hardsigmoid": lambda x, a: F.hardsigmoid(x),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "gelu": lambda x, a: F.gelu(x),
    "gelu_tanh": lambda x, a: F.gelu(x, approximate="tanh"),
    "mish": lambda x, a: F.mish(x),
    "elu": lambda x, a: F.elu(x),
    "softplus": lambda x, a: F.softplus(x),
    "leaky_relu": lambda x, a: F.leaky_relu(x, a),
}

ACTIVATION_KINDS = tuple(_FNS)


def check_kind(kind, who: str = "Activation") -> str:
    """``kind`` if it is one of :data:`ACTIVATION_KINDS`.

    Raises:
        TypeError: not a str. ValueError: another name."""
    if not isinstance(kind, str):
        raise TypeError(f"{who}: kind must be a str, one of {ACTIVATION_KINDS}, got "
                        f"{type(kind).__name__} ({kind!r})")
    if kind not in _FNS:
        raise ValueError(f"{who}: kind must be one of {ACTIVATION_KINDS}, got {kind!r}")
    return kind


def check_slope(negative_slope, who: str = "Activation") -> float:
    """``negative_slope`` as a float.

    Raises:
        TypeError: not a real number. ValueError: not finite."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"{who}: negative_slope must be a float, got "
                        f"{type(negative_slope).__name__} ({negative_slope!r})")
    if not math.isfinite(negative_slope):
        raise ValueError(f"{who}: negative_slope must be finite, got {negative_slope}")
    return float(negative_slope)


def activation_fn(kind: str, negative_slope: float = 0.01):
    """``x -> f(x)`` for ``kind`` (one of :data:`ACTIVATION_KINDS`).

    Raises:
        TypeError, ValueError: as :func:`check_kind` and :func:`check_slope`.
    """
    f = _FNS[check_kind(kind, "activation_fn")]
    slope = check_slope(negative_slope, "activation_fn")
    return lambda x: f(x, slope)


class Activation(Module):
    """``Activation(kind, negative_slope=0.01)``: ``forward(x)`` applies ``kind``, one of
    ``"silu"``, ``"hardswish"``, ``"hardsigmoid"``, ``"sigmoid"``, ``"tanh"``, ``"gelu"``,
    ``"gelu_tanh"`` (``F.gelu(x, approximate="tanh")``), ``"mish"``, ``"elu"`` (alpha 1),
    ``"softplus"`` (beta 1) or ``"leaky_relu"`` (with ``negative_slope``; the other kinds
    ignore it), as the torch function of that name computes it.

    Quantized, the op maps each of the input's 256 codes through a table built at conversion
    (``quantize(f(dequantize(q)))``), so it costs one byte gather whatever ``kind`` is, and
    every backend gives the same bytes.

    Raises:
        ValueError: unknown kind, or a non-finite ``negative_slope``.
        TypeError: ``kind`` not a str, ``negative_slope`` not a number.
    """

    def __init__(self, kind: str, negative_slope: float = 0.01):
        super().__init__()
        self.kind = check_kind(kind)
        self.negative_slope = check_slope(negative_slope)

    def extra_repr(self) -> str:
        if self.kind == "leaky_relu":
            return f"{self.kind!r}, negative_slope={self.negative_slope}"
        return repr(self.kind)

    def _float_op(self, x):
        return _FNS[self.kind](x, self.negative_slope)

    def forward(self, x):
        return self._float_op(x)
