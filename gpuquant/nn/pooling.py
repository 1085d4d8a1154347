"""Float pooling layers (``torch.nn``'s, as gpuquant modules)."""
from __future__ import annotations

import torch

from .._checks import int_pair, positive_int
from .module import Module

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


def _check_window(who: str, kernel_size, stride, padding, dilation=1) -> None:
    """A pooling window as torch takes it, refused at construction with ValueError /
    TypeError (torch takes a zero or negative size until the first forward, and then
    raises a RuntimeError): kernel size, stride (None: the kernel size) and dilation ints
    >= 1, padding ints >= 0 and at most half the dilated kernel."""
    k, d = int_pair(kernel_size, "kernel_size", who), int_pair(dilation, "dilation", who)
    if stride is not None:
        int_pair(stride, "stride", who)
    for p, kk, dd in zip(int_pair(padding, "padding", who, 0), k, d):
        if 2 * p > dd * (kk - 1) + 1:
            raise ValueError(f"{who}: padding ({padding!r}) must be at most half the "
                             f"(dilated) kernel size ({kernel_size!r})")


class MaxPool2d(Module, torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` (quantized: max of the integers, same qparams)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        _check_window(type(self).__name__, kernel_size, stride, padding, dilation)
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)


class AvgPool2d(Module, torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` (quantized: TFLite integer average, same qparams)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        _check_window(type(self).__name__, kernel_size, stride, padding)
        if divisor_override is not None:
            positive_int(divisor_override, "divisor_override", type(self).__name__)
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)


class AdaptiveAvgPool2d(Module, torch.nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d`` (quantized: integer average, same qparams)."""

    def __init__(self, output_size):
        sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
        if isinstance(output_size, (tuple, list)) and len(output_size) != 2:
            raise ValueError(f"{type(self).__name__}: output_size must be an int or a pair "
                             f"(None for the input's size), got {output_size!r}")
        for v in sizes:
            if v is not None:
                positive_int(v, "output_size", type(self).__name__)
        super().__init__(output_size)
