"""A learned parameter used as an operand (ConvNeXt's / timm's layer scale,
``x * self.gamma.view(1, -1, 1, 1)``): the drop-in trace quantizes it through a QuantStub,
now with the qconfig's weight quantizers per tensor (for the defaults a running min / max,
symmetric qint8_narrow: the largest magnitude maps to +-127). With the activations'
moving-average qint8 (scale amax / 127.5) it mapped to 127.5, rounded to 128 and was
clamped, and a growing parameter outran the average: its straight-through gradient was 0
step after step (a constant-initialised layer scale never trained; a trained one's largest
channel stayed frozen)."""
import warnings

import pytest
import torch
import torch.nn as nn

import gpuquant
from gpuquant.quantization import (disable_observer, ema_fakequant_qconfig, lsq_qconfig,
                                   quantize, quantize_qat)
from gpuquant.quantization.observer import MinMaxObserver
from tests.dropin.dropin_helpers import INT8_BACKEND
from tests.int8_vs_qat import capture, check_modules
import gpuquant.backends as backends


class LayerScale2d(nn.Module):  # timm.layers.LayerScale2d (inplace=False)
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self, init):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 1)
        self.ls = LayerScale2d(8, init)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return self.c2(y + self.ls(self.c1(y)))


def _convert(init, qconfig=ema_fakequant_qconfig):
    x = torch.randn(2, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_qat(Net(init).train(), qconfig, example_inputs=(x,)), x


@pytest.mark.parametrize("qconfig", [ema_fakequant_qconfig, lsq_qconfig], ids=["ema", "lsq"])
@pytest.mark.parametrize("init", [1e-3, 0.1, 1.0])
def test_layer_scale_trains_on_every_channel(init, qconfig):
    torch.manual_seed(0)
    qat, x = _convert(init, qconfig)
    stub = qat.ls.quant
    assert stub.act_fake_quant.dtype is gpuquant.qint8_narrow
    assert getattr(stub.act_fake_quant, "axis", None) is None
    if stub.act_observer is not None:
        assert isinstance(stub.act_observer, MinMaxObserver) and stub.act_observer.axis is None
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    # (LSQ: its learned scale starts at amax / 127; values that grow past it clamp until the
    # scale's own gradient catches up, as LSQ weights do: the first step is checked)
    for _ in range(4 if qconfig is ema_fakequant_qconfig else 1):
        opt.zero_grad()
        qat(torch.randn_like(x)).square().mean().backward()
        assert bool((qat.ls.gamma.grad != 0).all()), qat.ls.gamma.grad
        opt.step()
    if qconfig is lsq_qconfig:
        return
    # a spread of trained values: the largest channel gets its gradient too
    with torch.no_grad():
        qat.ls.gamma.copy_(torch.rand(8) * 0.5 + 0.05)
    for _ in range(3):
        opt.zero_grad()
        qat(torch.randn_like(x)).square().mean().backward()
        assert float(qat.ls.gamma.grad[qat.ls.gamma.argmax()]) != 0.0
        opt.step()


def _train_then_check_int8(qat, x, steps):
    """``steps`` SGD steps, calibrate, convert: every int8 module within 1 step of its QAT
    module (tests/int8_vs_qat.py)."""
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        qat(torch.randn_like(x)).square().mean().backward()
        opt.step()
    qat.eval()
    qat(x)
    disable_observer(qat)
    _, cap = capture(qat, x)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(qat, inplace=False)
    with backends.use(INT8_BACKEND):
        check_modules(qat_modules, int8, cap)


def test_layer_scale_int8_matches_qat():
    torch.manual_seed(1)
    qat, x = _convert(1e-2)
    _train_then_check_int8(qat, x, 3)


def test_propagate_and_reset_qconfig_keep_the_weight_operand_quantizers():
    """propagate_qconfig / reset_qconfig gave the layer scale's stub the activations'
    quantizers again, and its largest channel's gradient went back to 0 (found by review)."""
    from gpuquant.quantization import propagate_qconfig, reset_qconfig
    torch.manual_seed(0)
    qat, x = _convert(0.1)
    qat(x)
    for redo in (propagate_qconfig, reset_qconfig):
        redo(qat, ema_fakequant_qconfig)
        stub = qat.ls.quant
        assert isinstance(stub.act_observer, MinMaxObserver), redo.__name__
        assert stub.act_fake_quant.dtype is gpuquant.qint8_narrow


class Tokens(nn.Module):
    """A ViT-style class token concatenated with projected tokens, a position table added."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.02)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.head(t + self.pos)


def test_a_concatenated_parameter_keeps_the_activation_dtype():
    """The class token's stub feeds a Concat, which takes one dtype: it keeps the activation
    quantizers (with the weights' qint8_narrow the first QAT forward was refused); the
    position table added to the tokens takes the weights'. int8 matches QAT."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = quantize_qat(Tokens().train(), example_inputs=(x,))
    marked = [n for n, m in qat.named_modules() if m.__dict__.get("_param_operand")]
    assert len(marked) == 1
    assert qat.get_submodule(marked[0]).act_fake_quant.dtype is gpuquant.qint8_narrow
    _train_then_check_int8(qat, x, 2)
