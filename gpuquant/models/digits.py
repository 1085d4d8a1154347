"""A small network for scikit-learn's 8x8 digits (the ``gpuquant demo`` model): every kind
of quantized module on the way (conv+BN+ReLU, residual add, average pool, linear)."""
from __future__ import annotations

import torch

from .._compile import eager_under_compile
from .. import nn as gnn
from ..nn.qat.module import keep_producer
from ._checks import positive_int

__all__ = ["DigitsNet", "digits_net"]


class DigitsNet(gnn.Module):
    """``(N, 1, 8, 8)`` grayscale images -> 10 logits (about 23 k parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        num_classes = positive_int(num_classes, "num_classes", "DigitsNet")
        width = positive_int(width, "width", "DigitsNet", minimum=2)  # conv1 has width // 2
        self.quant = gnn.QuantStub()
        self.conv1 = gnn.ConvBnRelu2d(1, width // 2, 3, padding=1, bias=False)           # 8x8
        self.conv2 = gnn.ConvBnRelu2d(width // 2, width, 3, stride=2, padding=1, bias=False)  # 4x4
        self.conv3 = gnn.ConvBn2d(width, width, 3, padding=1, bias=False)
        self.add_relu = gnn.Elemwise("add_relu")
        self.pool = gnn.AvgPool2d(2)                                                     # 2x2
        self.fc1 = gnn.LinearRelu(width * 4, 64)
        self.fc2 = gnn.Linear(64, num_classes)
        self.dequant = gnn.DequantStub()

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        x = self.conv2(self.conv1(self.quant(x)))
        x = self.pool(self.add_relu(self.conv3(x), x))
        x = keep_producer(torch.flatten(x, 1), x)  # (a copy in channels_last)
        return self.dequant(self.fc2(self.fc1(x)))


def digits_net(num_classes: int = 10, **kwargs) -> DigitsNet:
    """The demo's network for 8x8 digits."""
    return DigitsNet(num_classes, **kwargs)
