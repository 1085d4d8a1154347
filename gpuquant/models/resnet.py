"""ResNet-18 / ResNet-50 (torchvision's architecture, v1.5: stride on the 3x3 conv of the
bottleneck) built from gpuquant.nn fused modules: Conv+BN(+ReLU) fused, each residual
addition an ``Elemwise("add_relu")``, a QuantStub at the input and a DequantStub at the
output. Parameter counts equal torchvision's (11,689,512 and 25,557,032 for 1000 classes).
"""
from __future__ import annotations

import torch

from .._compile import eager_under_compile
from .. import nn as gnn
from ..nn.qat.module import keep_producer
from .._checks import check_bool
from ._checks import positive_int

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50"]


class BasicBlock(gnn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv_bn_relu1 = gnn.ConvBnRelu2d(inplanes, planes, 3, stride, 1, bias=False)
        self.conv_bn2 = gnn.ConvBn2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = downsample
        self.add_relu = gnn.Elemwise("add_relu")

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu(self.conv_bn2(self.conv_bn_relu1(x)), identity)


class Bottleneck(gnn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv_bn_relu1 = gnn.ConvBnRelu2d(inplanes, planes, 1, bias=False)
        self.conv_bn_relu2 = gnn.ConvBnRelu2d(planes, planes, 3, stride, 1, bias=False)
        self.conv_bn3 = gnn.ConvBn2d(planes, planes * 4, 1, bias=False)
        self.downsample = downsample
        self.add_relu = gnn.Elemwise("add_relu")

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.conv_bn3(self.conv_bn_relu2(self.conv_bn_relu1(x)))
        return self.add_relu(y, identity)


class ResNet(gnn.Module):
    """ResNet for ``(N, 3, H, W)`` images (any H, W >= 32). ``width``: the first stage's
    channels (64, torchvision's; the stages double it); narrower nets have the same layers
    and launches (the stand-in host timing uses 8: no CPU compute to speak of)."""

    def __init__(self, block, layers, num_classes: int = 1000, zero_init_residual: bool = False,
                 width: int = 64):
        super().__init__()
        if not (isinstance(block, type) and issubclass(block, torch.nn.Module)
                and isinstance(getattr(block, "expansion", None), int)):
            raise TypeError(f"ResNet: block must be a block class with an int 'expansion' "
                            f"(gpuquant.models.resnet.BasicBlock, Bottleneck), got {block!r}")
        if not isinstance(layers, (tuple, list)) or len(layers) != 4:
            raise ValueError(f"ResNet: layers must be 4 block counts (one a stage), got "
                             f"{layers!r}")
        layers = [positive_int(n, "layers", "ResNet") for n in layers]
        width = positive_int(width, "width", "ResNet")
        num_classes = positive_int(num_classes, "num_classes", "ResNet")
        check_bool(zero_init_residual, "ResNet", "zero_init_residual")
        self.inplanes = width
        self.quant = gnn.QuantStub()
        self.conv_bn_relu1 = gnn.ConvBnRelu2d(3, width, 7, 2, 3, bias=False)
        self.maxpool = gnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.avgpool = gnn.AdaptiveAvgPool2d((1, 1))
        self.fc = gnn.Linear(8 * width * block.expansion, num_classes)
        self.dequant = gnn.DequantStub()
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "conv_bn3", None) or getattr(m, "conv_bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last is not None:
                    torch.nn.init.zeros_(last.bn.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = gnn.ConvBn2d(self.inplanes, planes * block.expansion, 1, stride,
                                      bias=False)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return torch.nn.Sequential(*layers)

    @eager_under_compile  # only gpuquant modules inside: nothing to compile
    def forward(self, x):
        x = self.maxpool(self.conv_bn_relu1(self.quant(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = keep_producer(torch.flatten(x, 1), x)
        return self.dequant(self.fc(x))


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18 (11,689,512 parameters for 1000 classes, as torchvision's)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (25,557,032 parameters for 1000 classes, as torchvision's)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)
