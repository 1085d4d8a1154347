"""Shared helpers of the float / QAT / quantized module tests."""
from functools import partial

import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize, QConfig,
                                   ema_fakequant_qconfig)

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
