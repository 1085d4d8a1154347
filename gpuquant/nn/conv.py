"""Float convolutions, alone or fused with BatchNorm and ReLU / ReLU6.

Constructor arguments are ``torch.nn.Conv2d``'s (and, for the Bn forms, ``eps`` and
``momentum`` of ``torch.nn.BatchNorm2d``). The ReLU6 forms (for MobileNetV2) append ``6`` to
the activation's name: ``ConvRelu62d``, ``ConvBnRelu62d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import int_pair, positive_int
from .module import Module

__all__ = ["Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d", "ConvBnRelu62d",
           "apply_activation"]


def check_conv_args(who: str, in_channels, out_channels, kernel_size, stride, padding,
                    dilation, groups) -> None:
    """torch.nn.Conv2d's geometry arguments, refused at construction with ValueError /
    TypeError (torch makes a negative count a RuntimeError and takes a zero or negative
    stride, dilation or padding until the first forward): channels, groups, kernel size,
    stride and dilation ints >= 1, padding ints >= 0 (or torch's 'valid' / 'same')."""
    channels = [positive_int(v, name, who) for name, v in
                (("in_channels", in_channels), ("out_channels", out_channels),
                 ("groups", groups))]
    if channels[0] % channels[2] or channels[1] % channels[2]:
        raise ValueError(f"{who}: in_channels ({in_channels}) and out_channels "
                         f"({out_channels}) must be divisible by groups ({groups})")
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        int_pair(v, name, who)
    if not isinstance(padding, str):  # (torch checks the strings)
        int_pair(padding, "padding", who, 0)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """``"none"``, ``"relu"`` or ``"relu6"`` applied to ``y``."""
    if activation == "relu":
        return F.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    return y


class Conv2d(Module, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` as a gpuquant module (quantizable)."""

    activation = "none"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        check_conv_args(type(self).__name__, in_channels, out_channels, kernel_size, stride,
                        padding, dilation, groups)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)

    def forward(self, x):
        return apply_activation(self._conv_forward(x, self.weight, self.bias), self.activation)


class ConvRelu2d(Conv2d):
    """Conv2d followed by ReLU."""

    activation = "relu"


class ConvRelu62d(Conv2d):
    """Conv2d followed by ReLU6."""

    activation = "relu6"


class ConvBn2d(Module):
    """Conv2d followed by BatchNorm2d (folded into the convolution when quantized).

    Args:
        in_channels ... padding_mode: as ``torch.nn.Conv2d`` (``bias`` defaults to False
            here, as a bias before BatchNorm is redundant).
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm2d``.

    Attributes:
        conv: the ``torch.nn.Conv2d``; bn: the ``torch.nn.BatchNorm2d``.
    """

    activation = "none"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1,
                 affine=True, track_running_stats=True, device=None, dtype=None):
        super().__init__()
        check_conv_args(type(self).__name__, in_channels, out_channels, kernel_size, stride,
                        padding, dilation, groups)
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups, bias, padding_mode, device=device,
                                    dtype=dtype)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                                       device=device, dtype=dtype)

    def forward(self, x):
        return apply_activation(self.bn(self.conv(x)), self.activation)


class ConvBnRelu2d(ConvBn2d):
    """Conv2d, BatchNorm2d, ReLU."""

    activation = "relu"


class ConvBnRelu62d(ConvBn2d):
    """Conv2d, BatchNorm2d, ReLU6."""

    activation = "relu6"
