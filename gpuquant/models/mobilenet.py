"""MobileNetV2 (torchvision's architecture, width 1.0: 3,504,872 parameters for 1000 classes)
from gpuquant.nn fused modules: Conv+BN+ReLU6 as ``ConvBnRelu62d``, the linear bottleneck as
``ConvBn2d``, the residual as ``Elemwise("add")``."""
from __future__ import annotations

import torch

from .._compile import eager_under_compile
from .. import nn as gnn
from ..nn.qat.module import keep_producer
from ._checks import positive_float, positive_int, probability

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenet_v2"]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def init_mobilenet(model: torch.nn.Module) -> None:
    """torchvision's MobileNet initialisation: convolutions Kaiming-normal (fan out) with
    zero biases, linears normal(0, 0.01) with zero biases (BatchNorms keep 1 / 0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.01)
            torch.nn.init.zeros_(m.bias)


class InvertedResidual(gnn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(gnn.ConvBnRelu62d(inp, hidden, 1, bias=False))
        layers += [gnn.ConvBnRelu62d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   gnn.ConvBn2d(hidden, oup, 1, bias=False)]
        self.conv = torch.nn.Sequential(*layers)
        self.add = gnn.Elemwise("add") if self.use_res_connect else None

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        y = self.conv(x)
        return self.add(x, y) if self.use_res_connect else y


class MobileNetV2(gnn.Module):
    """MobileNetV2 for ``(N, 3, H, W)`` images."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        num_classes = positive_int(num_classes, "num_classes", "MobileNetV2")
        width_mult = positive_float(width_mult, "width_mult", "MobileNetV2")
        dropout = probability(dropout, "dropout", "MobileNetV2")
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                   [6, 160, 3, 2], [6, 320, 1, 1]]
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        self.quant = gnn.QuantStub()
        features = [gnn.ConvBnRelu62d(3, inp, 3, 2, 1, bias=False)]
        for t, c, n, s in setting:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(gnn.ConvBnRelu62d(inp, self.last_channel, 1, bias=False))
        self.features = torch.nn.Sequential(*features)
        self.avgpool = gnn.AdaptiveAvgPool2d((1, 1))
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(dropout),
                                              gnn.Linear(self.last_channel, num_classes))
        self.dequant = gnn.DequantStub()
        init_mobilenet(self)

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        x = self.avgpool(self.features(self.quant(x)))
        x = keep_producer(torch.flatten(x, 1), x)
        # (training-mode dropout writes a new tensor: it carries the pool's qparams, as the
        # int8 model's identity dropout does)
        x = keep_producer(self.classifier[0](x), x)
        return self.dequant(self.classifier[1](x))


def mobilenet_v2(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 (3,504,872 parameters for 1000 classes, as torchvision's)."""
    return MobileNetV2(num_classes, **kwargs)
