"""Float pooling layers (``torch.nn``'s, as gpuquant modules)."""
from __future__ import annotations

import torch

from .module import Module

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


class MaxPool2d(Module, torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` (quantized: max of the integers, same qparams)."""


class AvgPool2d(Module, torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` (quantized: TFLite integer average, same qparams)."""


class AdaptiveAvgPool2d(Module, torch.nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d`` (quantized: integer average, same qparams)."""
