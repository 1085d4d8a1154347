"""MobileNetV3 Large and Small (torchvision's architectures, width 1.0: 5,483,032 and
2,542,856 parameters for 1000 classes) from gpuquant.nn modules: Conv+BN+ReLU as
``ConvBnRelu2d``, Conv+BN then hardswish as ``ConvBn2d`` + ``Activation("hardswish")``, the
squeeze-and-excitation gate as pooling, two 1x1 convs, ``Activation("hardsigmoid")`` and
``Elemwise("mul")``, the residual as ``Elemwise("add")``: every layer int8 once converted."""
from __future__ import annotations

from typing import List, NamedTuple

import torch

from .._compile import eager_under_compile
from .. import nn as gnn
from ..nn.qat.module import keep_producer
from ._checks import positive_int, probability
from .mobilenet import _make_divisible, init_mobilenet

__all__ = ["MobileNetV3", "mobilenet_v3_large", "mobilenet_v3_small"]

_BN = {"eps": 0.001, "momentum": 0.01}  # torchvision's MobileNetV3 BatchNorm


class _Block(NamedTuple):
    inp: int
    kernel: int
    expanded: int
    out: int
    use_se: bool
    hardswish: bool
    stride: int


# (input, kernel, expanded, output, squeeze-and-excitation, hardswish, stride): torchvision's
_LARGE = [(16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2),
          (24, 3, 72, 24, False, False, 1), (24, 5, 72, 40, True, False, 2),
          (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
          (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1),
          (80, 3, 184, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
          (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
          (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1),
          (160, 5, 960, 160, True, True, 1)]
_SMALL = [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
          (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
          (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
          (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
          (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
          (96, 5, 576, 96, True, True, 1)]


def _conv_bn_act(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1,
                 hardswish: bool = False, relu: bool = False) -> torch.nn.Module:
    pad = (kernel - 1) // 2
    if relu:
        return gnn.ConvBnRelu2d(inp, out, kernel, stride, pad, groups=groups, **_BN)
    conv = gnn.ConvBn2d(inp, out, kernel, stride, pad, groups=groups, **_BN)
    return torch.nn.Sequential(conv, gnn.Activation("hardswish")) if hardswish else conv


class SqueezeExcitation(gnn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))`` (torchvision's, with its 1x1 convs)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = gnn.AdaptiveAvgPool2d(1)
        self.fc1 = gnn.ConvRelu2d(channels, squeeze, 1)
        self.fc2 = gnn.Conv2d(squeeze, channels, 1)
        self.gate = gnn.Activation("hardsigmoid")
        self.mul = gnn.Elemwise("mul")

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        return self.mul(self.gate(self.fc2(self.fc1(self.avgpool(x)))), x)


class InvertedResidual(gnn.Module):
    def __init__(self, b: _Block):
        super().__init__()
        self.use_res_connect = b.stride == 1 and b.inp == b.out
        layers: List[torch.nn.Module] = []
        act = {"hardswish": b.hardswish, "relu": not b.hardswish}
        if b.expanded != b.inp:
            layers.append(_conv_bn_act(b.inp, b.expanded, 1, **act))
        layers.append(_conv_bn_act(b.expanded, b.expanded, b.kernel, b.stride, b.expanded,
                                   **act))
        if b.use_se:
            layers.append(SqueezeExcitation(b.expanded, _make_divisible(b.expanded // 4, 8)))
        layers.append(_conv_bn_act(b.expanded, b.out, 1))
        self.block = torch.nn.Sequential(*layers)
        self.add = gnn.Elemwise("add") if self.use_res_connect else None

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        y = self.block(x)
        return self.add(y, x) if self.use_res_connect else y


class MobileNetV3(gnn.Module):
    """MobileNetV3 for ``(N, 3, H, W)`` images (``arch`` "large" or "small")."""

    def __init__(self, arch: str = "large", num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        if arch not in ("large", "small"):
            raise ValueError(f"MobileNetV3: arch must be 'large' or 'small', got {arch!r}")
        num_classes = positive_int(num_classes, "num_classes", "MobileNetV3")
        dropout = probability(dropout, "dropout", "MobileNetV3")
        blocks = [_Block(*b) for b in (_LARGE if arch == "large" else _SMALL)]
        last_channel = 1280 if arch == "large" else 1024
        self.quant = gnn.QuantStub()
        layers = [_conv_bn_act(3, 16, 3, 2, hardswish=True)]
        layers += [InvertedResidual(b) for b in blocks]
        last_in = blocks[-1].out
        layers.append(_conv_bn_act(last_in, 6 * last_in, 1, hardswish=True))
        self.features = torch.nn.Sequential(*layers)
        self.avgpool = gnn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Sequential(
            gnn.Linear(6 * last_in, last_channel), gnn.Activation("hardswish"),
            torch.nn.Dropout(dropout), gnn.Linear(last_channel, num_classes))
        self.dequant = gnn.DequantStub()
        init_mobilenet(self)

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        x = self.avgpool(self.features(self.quant(x)))
        x = keep_producer(torch.flatten(x, 1), x)
        c = self.classifier
        x = c[1](c[0](x))
        # (training-mode dropout writes a new tensor: it keeps the activation's qparams, as
        # the int8 model's identity dropout does)
        x = keep_producer(c[2](x), x)
        return self.dequant(c[3](x))


def mobilenet_v3_large(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large (5,483,032 parameters for 1000 classes, as torchvision's)."""
    return MobileNetV3("large", num_classes, **kwargs)


def mobilenet_v3_small(num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small (2,542,856 parameters for 1000 classes, as torchvision's)."""
    return MobileNetV3("small", num_classes, **kwargs)
