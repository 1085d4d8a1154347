"""Shared helpers of the float / QAT / quantized module tests."""
from functools import partial

import torch

import gpuquant
import gpuquant.nn as gnn
import gpuquant.models as M
from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize, QConfig,
                                   disable_observer, ema_fakequant_qconfig, quantize,
                                   quantize_qat)

# asymmetric uint8 activations: exercises nonzero zero points end to end
uint8_qconfig = QConfig(
    weight_observer=ema_fakequant_qconfig.weight_observer,
    act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=gpuquant.quint8,
                         symmetric=False),
    weight_fake_quant=ema_fakequant_qconfig.weight_fake_quant,
    act_fake_quant=partial(FakeQuantize, dtype=gpuquant.quint8))

QCONFIGS = {"int8": ema_fakequant_qconfig, "uint8": uint8_qconfig}


class Wrap(gnn.Module):
    """QuantStub per input -> the module under test -> DequantStub."""

    def __init__(self, module, n_inputs=1, concat_dim=None):
        super().__init__()
        self.stubs = torch.nn.ModuleList([gnn.QuantStub() for _ in range(n_inputs)])
        self.m = module
        self.concat_dim = concat_dim
        self.dq = gnn.DequantStub()

    def forward(self, *xs):
        ins = [s(x) for s, x in zip(self.stubs, xs)]
        y = self.m(ins, self.concat_dim) if self.concat_dim is not None else self.m(*ins)
        return self.dq(y)


def randomize_bn(module):
    """Non-trivial BatchNorm statistics and affine parameters (gamma of both signs)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_(0, 0.3)
    return module


def steps(y, y_ref, scale):
    """Difference in output steps (exact multiples of the scale up to float rounding)."""
    return torch.round((y - y_ref) / scale).abs()


class FusionBlocks(gnn.Module):
    """Every fusion case: conv as the add's second operand, a depthwise conv as its first,
    two linears into one add (one fuses), a conv whose output is used twice (no fusion), a
    linear feeding a view before the add (no fusion), the last linear into the DequantStub."""

    def __init__(self):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.conv0 = gnn.ConvBnRelu2d(3, 8, 3, 1, 1)
        self.conv1 = gnn.ConvBn2d(8, 8, 3, 1, 1)
        self.add1 = gnn.Elemwise("add_relu")
        self.dw = gnn.ConvBn2d(8, 8, 3, 1, 1, groups=8)
        self.add2 = gnn.Elemwise("add")
        self.twice = gnn.Conv2d(8, 8, 1)
        self.add3 = gnn.Elemwise("add")
        self.pool = gnn.AdaptiveAvgPool2d(1)
        self.fc1 = gnn.Linear(8, 8)
        self.fc2 = gnn.LinearRelu(8, 8)
        self.add4 = gnn.Elemwise("add")
        self.fc3 = gnn.Linear(8, 8)
        self.add5 = gnn.Elemwise("add")
        self.fc4 = gnn.Linear(8, 5)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        y = self.conv0(self.quant(x))
        y = self.add1(y, self.conv1(y))
        y = self.add2(self.dw(y), y)
        t = self.twice(y)
        y = self.add3(t, t)
        z = torch.flatten(self.pool(y), 1)
        z = self.add4(self.fc1(z), self.fc2(z))
        z = self.add5(self.fc3(z).reshape(-1, 8), z)
        return self.dequant(self.fc4(z))


def convert_calibrated(model, x, qconfig="int8"):
    """Float -> QAT -> one calibration pass on x -> quantized (eval)."""
    randomize_bn(model)
    model = M.settle_bn(model, x).eval()
    qat = quantize_qat(model, QCONFIGS[qconfig]).eval()
    with torch.no_grad():
        qat(x)
    disable_observer(qat)
    return quantize(qat).eval()
