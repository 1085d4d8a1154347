"""Float fully connected layers, alone or fused with BatchNorm1d and ReLU.

Constructor arguments are ``torch.nn.Linear``'s (and ``eps``, ``momentum`` of
``torch.nn.BatchNorm1d`` for the Bn forms). ``Linear`` / ``LinearRelu`` take inputs of any
rank (``(..., in_features)``); the Bn forms take ``(N, in_features)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import positive_int
from .conv import apply_activation
from .module import Module

__all__ = ["Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d"]


def check_features(who: str, in_features, out_features) -> None:
    """Both ints >= 1 (torch makes a negative one a RuntimeError and takes 0, which the
    int8 layer cannot)."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        positive_int(v, name, who)


class Linear(Module, torch.nn.Linear):
    """``torch.nn.Linear`` as a gpuquant module (quantizable)."""

    activation = "none"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        check_features(type(self).__name__, in_features, out_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    def forward(self, x):
        return apply_activation(F.linear(x, self.weight, self.bias), self.activation)


class LinearRelu(Linear):
    """Linear followed by ReLU."""

    activation = "relu"


class LinearBn1d(Module):
    """Linear followed by BatchNorm1d over the features (input ``(N, in_features)``).

    Attributes:
        linear: the ``torch.nn.Linear``; bn: the ``torch.nn.BatchNorm1d``.
    """

    activation = "none"

    def __init__(self, in_features, out_features, bias=False, eps=1e-5, momentum=0.1,
                 affine=True, track_running_stats=True, device=None, dtype=None):
        super().__init__()
        check_features(type(self).__name__, in_features, out_features)
        self.linear = torch.nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm1d(out_features, eps, momentum, affine, track_running_stats,
                                       device=device, dtype=dtype)

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (N, in_features) input, got shape "
                             f"{tuple(x.shape)}")
        return apply_activation(self.bn(self.linear(x)), self.activation)


class LinearBnRelu1d(LinearBn1d):
    """Linear, BatchNorm1d, ReLU."""

    activation = "relu"
