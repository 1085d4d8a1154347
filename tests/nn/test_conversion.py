"""quantize_qat / quantize: state_dict round trips, training refusal, disable_quantize,
BN folding edge cases, model-code compatibility, bad input."""
import copy
import io
import re

import numpy as np
import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
import gpuquant.nn.qat as qat_nn
import gpuquant.nn.quantized as qnn
from gpuquant.nn.qat.module import QATModule
from gpuquant.nn.quantized.module import QuantizedModule
from gpuquant.quantization import (FakeQuantBase, Observer, calibration_qconfig,
                                   disable_fake_quant, disable_observer, ema_fakequant_qconfig,
                                   ema_lowbit_fakequant_qconfig, enable_fake_quant,
                                   enable_observer, get_qat_mapping, lsq_qconfig,
                                   passive_qconfig, propagate_qconfig, quantize, quantize_qat,
                                   reset_qconfig, tqt_qconfig)
from tests.nn.nn_helpers import QCONFIGS, randomize_bn


class Net(gnn.Module):
    """Every module kind; flatten / view / reshape in the model code."""

    def __init__(self, reshape="flatten"):
        super().__init__()
        self.reshape = reshape
        self.quant = gnn.QuantStub()
        self.c1 = gnn.ConvBnRelu2d(3, 8, 3, padding=1)
        self.c2 = gnn.ConvBn2d(8, 8, 3, padding=1, groups=8)
        self.add = gnn.Elemwise("add_relu")
        self.c3 = gnn.ConvRelu62d(8, 6, 1)
        self.cat = gnn.Concat()
        self.mul = gnn.Elemwise("mul")
        self.pool = gnn.MaxPool2d(2)
        self.avg = gnn.AvgPool2d(2, ceil_mode=True)
        self.gap = gnn.AdaptiveAvgPool2d(1)
        self.fc = gnn.LinearBnRelu1d(14 * 2 * 3, 16)
        self.fc2 = gnn.Linear(16, 5)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        x = self.quant(x)
        y = self.c1(x)
        y = self.add(self.c2(y), y)
        y = self.cat([y, self.c3(y)], 1)
        y = self.mul(y, self.gap(y))
        y = self.avg(self.pool(y))
        if self.reshape == "flatten":
            y = torch.flatten(y, 1)
        else:
            y = y.reshape(y.shape[0], -1)
        return self.dequant(self.fc2(self.fc(y)))


def _qat(model=None, qconfig=ema_fakequant_qconfig, steps=3, shape=(6, 3, 9, 10)):
    torch.manual_seed(0)
    model = model or Net()
    randomize_bn(model)
    q = quantize_qat(model, qconfig)
    q.train()
    with torch.no_grad():
        for _ in range(steps):
            q(torch.randn(shape))
    return q.eval()


WHOLE_NET_QCONFIGS = {"ema_int8": ema_fakequant_qconfig, "ema_uint8": QCONFIGS["uint8"],
                      "lowbit_4bit": ema_lowbit_fakequant_qconfig, "lsq": lsq_qconfig,
                      "tqt": tqt_qconfig}


@pytest.mark.parametrize("reshape,qc", [("flatten", q) for q in sorted(WHOLE_NET_QCONFIGS)]
                         + [("reshape", "ema_int8")])
def test_whole_net_three_forms_agree(reshape, qc):
    x = torch.randn(5, 3, 9, 10)
    float_model = Net(reshape).eval()
    y_float = float_model(x)
    q = _qat(copy.deepcopy(float_model), qconfig=WHOLE_NET_QCONFIGS[qc])
    with torch.no_grad():
        y_qat = q(x)
    int8 = quantize(q, inplace=False)
    y8 = int8(x)
    assert y8.shape == y_float.shape == y_qat.shape and y8.dtype == torch.float32
    s = float(q.fc2.get_activation_qparams().scale)
    assert float(((y8 - y_qat).abs() / s).max()) <= 4  # several layers: a few steps at most
    assert isinstance(int8.c1, qnn.ConvBnRelu2d) and isinstance(q.c1, qat_nn.ConvBnRelu2d)


def test_view_on_int8_activations():
    class V(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.c, self.gap = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3), gnn.AdaptiveAvgPool2d(1)
            self.fc, self.dq = gnn.Linear(4, 2), gnn.DequantStub()

        def forward(self, x):
            y = self.gap(self.c(self.q(x)))
            return self.dq(self.fc(y.view(y.size(0), -1)))
    x = torch.randn(3, 3, 7, 7)
    q = _qat(V(), shape=(3, 3, 7, 7))
    with torch.no_grad():
        y_qat = q(x)
    s = float(q.fc.get_activation_qparams().scale)
    y8 = quantize(q)(x)
    assert float(((y8 - y_qat).abs() / s).max()) <= 1


def test_state_dict_round_trip_qat_and_quantized():
    x = torch.randn(4, 3, 9, 10)
    a = _qat()
    b = _qat(steps=1)
    b.load_state_dict(a.state_dict())
    disable_observer(a)
    disable_observer(b)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ia = quantize(a, inplace=False)
    ib = quantize(_qat(steps=2), inplace=False)
    buf = io.BytesIO()
    torch.save(ia.state_dict(), buf)
    buf.seek(0)
    ib.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(ia(x), ib(x))
    for k, v in ia.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ib.state_dict()[k]), k
    assert ia.c1.weight.dtype == torch.int8 and ia.c1.bias.dtype == torch.int32


def test_state_dict_carries_activation_dtypes():
    a = quantize(_qat(qconfig=QCONFIGS["uint8"]), inplace=False)
    b = quantize(_qat(), inplace=False)  # int8 activations
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 9, 10)
    assert b.quant(x).dtype == torch.uint8
    assert torch.equal(a(x), b(x))


def test_quantized_refuses_training():
    int8 = quantize(_qat())
    with pytest.raises(RuntimeError, match="inference-only|training"):
        int8.train()
    with pytest.raises(RuntimeError, match="training"):
        qnn.Conv2d(3, 4, 3).train()
    m = quantize(_qat())
    m.c1.training = True
    with pytest.raises(RuntimeError, match="training"):
        m(torch.randn(2, 3, 9, 10))
    m.eval()  # eval is fine
    m(torch.randn(2, 3, 9, 10))


def test_disable_quantize_keeps_float():
    class Island(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.c = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3)
            self.dq = gnn.DequantStub()
            self.head = gnn.ConvBn2d(4, 2, 1).disable_quantize()

        def forward(self, x):
            return self.head(self.dq(self.c(self.q(x))))
    m = Island().eval()
    q = quantize_qat(m, inplace=False)
    assert type(q.head) is gnn.ConvBn2d and type(q.c) is qat_nn.ConvRelu2d
    with torch.no_grad():
        q(torch.randn(2, 3, 6, 6))
    int8 = quantize(q, inplace=False)
    assert type(int8.head) is gnn.ConvBn2d and type(int8.c) is qnn.ConvRelu2d
    y = int8(torch.randn(2, 3, 6, 6))
    assert y.dtype == torch.float32 and y.shape == (2, 2, 4, 4)
    with pytest.raises(TypeError, match="bool"):
        m.disable_quantize("yes")


class FloatHead(gnn.Module):
    """A quantized conv, a ConvBn2d head between stubs (``stubs``) or fed and read directly
    by quantized modules, a quantized tail conv."""

    def __init__(self, stubs=True):
        super().__init__()
        self.q, self.c = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3)
        self.dq, self.q2 = (gnn.DequantStub(), gnn.QuantStub()) if stubs else (None, None)
        self.head = gnn.ConvBn2d(4, 5, 1)
        self.tail, self.out = gnn.Conv2d(5, 2, 1), gnn.DequantStub()

    def forward(self, x):
        y = self.c(self.q(x))
        y = self.q2(self.head(self.dq(y))) if self.q2 is not None else self.head(y)
        return self.out(self.tail(y))


def test_disable_quantize_after_quantize_qat_keeps_the_module_float():
    """disable_quantize() on a module of a QAT model: quantize() left the QAT module in the
    int8 model (fake-quantizing, its observers recording); without stubs around it the int8
    model failed at its first call ('Input type (signed char) and bias type (float) should
    be the same'). It goes back to its float class with the trained weights, as a module
    marked before quantize_qat stays float; without stubs, quantize names the module that
    reads it."""
    x = torch.randn(4, 3, 7, 6)
    qat = quantize_qat(randomize_bn(FloatHead()).eval())
    with torch.no_grad():
        qat(x)
    assert qat.head.disable_quantize() is qat.head
    int8 = quantize(qat, inplace=False)
    head = int8.head
    assert type(head) is gnn.ConvBn2d and type(int8.c) is qnn.ConvRelu2d
    assert not any(isinstance(m, (QATModule, FakeQuantBase, Observer)) for m in head.modules())
    ref = gnn.ConvBn2d(4, 5, 1).eval()
    assert head.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(qat.head.state_dict(), strict=False)
    z = torch.randn(2, 4, 5, 4)
    with torch.no_grad():
        assert torch.equal(head(z), ref(z))
        y = int8(x)
    assert y.dtype == torch.float32 and y.shape == (4, 2, 5, 4)
    # a quantized module reading the float module's output has no int8 input
    qat = quantize_qat(randomize_bn(FloatHead(stubs=False)).eval())
    with torch.no_grad():
        qat(x)
    qat.head.disable_quantize()
    with pytest.raises(ValueError, match=r"quantize: input 0 of module 'tail' \(Conv2d\) comes "
                                         r"from a ConvBn2d marked with disable_quantize\(\), "
                                         r"which stays float"):
        quantize(qat, inplace=False)


def test_per_module_qconfig_override():
    m = Net()
    m.fc2.qconfig = calibration_qconfig
    q = quantize_qat(m, ema_fakequant_qconfig)
    assert q.fc2.act_fake_quant is None and q.fc.act_fake_quant is not None


@pytest.mark.parametrize("cls,shape", [(gnn.ConvBnRelu2d, (4, 3, 6, 6)), (gnn.LinearBn1d, (8, 3))])
@pytest.mark.parametrize("case", ["gamma0", "tiny_gamma", "tiny_var", "const_input"])
@pytest.mark.parametrize("mode", ["single", "exact"])
def test_bn_folding_no_nan(cls, shape, case, mode):
    f = cls(3, 5, 3, padding=1) if cls is gnn.ConvBnRelu2d else cls(3, 5)
    with torch.no_grad():
        if case == "gamma0":
            f.bn.weight.zero_()
        if case == "tiny_gamma":
            f.bn.weight.copy_(torch.tensor([1e-30, -1e-12, 1e-7, -3e-6, 1.0]))
        if case == "tiny_var":
            f.bn.running_var.fill_(1e-12)
            f.bn.eps = 1e-10
    x = torch.full(shape, 0.7) if case == "const_input" else torch.randn(shape)
    q = quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False).train()
    q.set_bn_fold(mode)
    x.requires_grad_(True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)
    assert torch.isfinite(q.bn.running_mean).all() and torch.isfinite(q.bn.running_var).all()
    q.eval()
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    if case == "gamma0":  # the folded weight is exactly zero: output = the folded bias
        w, b = q.folded_weight_bias()
        assert torch.equal(w, torch.zeros_like(w))
        assert torch.isfinite(b).all()


def test_freeze_bn_stats():
    f = randomize_bn(gnn.ConvBn2d(3, 4, 3))
    q = quantize_qat(f, inplace=False)
    disable_fake_quant(q)
    x = torch.randn(4, 3, 7, 7)
    q.freeze_bn_stats()
    rm = q.bn.running_mean.clone()
    y_train = q.train()(x)
    assert torch.equal(q.bn.running_mean, rm)
    assert torch.equal(y_train, q.eval()(x))


def test_enable_disable_helpers_and_reset():
    q = _qat()
    disable_fake_quant(q)
    assert all(not m.enabled for m in q.modules() if isinstance(m, FakeQuantBase))
    enable_fake_quant(q)
    assert all(m.enabled for m in q.modules() if isinstance(m, FakeQuantBase))
    disable_observer(q)
    assert all(not m.enabled for m in q.modules() if isinstance(m, Observer))
    enable_observer(q)
    before = q.c1.get_activation_qparams()
    reset_qconfig(q, passive_qconfig)  # passive observers keep the calibrated qparams
    assert q.c1.get_activation_qparams() == before
    propagate_qconfig(q, lsq_qconfig)
    q.train()
    q(torch.randn(4, 3, 9, 10))
    assert type(q.c1.act_fake_quant).__name__ == "LSQ"


def test_reset_qconfig_to_lsq_carries_the_trained_qparams():
    """Found by review: reset_qconfig(model, lsq_qconfig) (MegEngine's flow: train with
    moving averages, then learn the scales) dropped the trained ranges: LSQ had no
    set_qparams, so it started from a fresh observer's first batch (a scale 15% off in a probe,
    the QAT model's outputs moved) although LSQ starts from qparams by design."""
    q = _qat()
    disable_observer(q)
    x = torch.randn(4, 3, 9, 10)
    y = q(x)
    before = {n: (m.get_weight_qparams() if m.with_weight else None,
                  m.get_activation_qparams() if m.with_act else None)
              for n, m in q.named_modules() if isinstance(m, QATModule)}
    reset_qconfig(q, lsq_qconfig)
    for n, m in q.named_modules():
        if isinstance(m, QATModule):
            w, a = before[n]
            if w is not None:
                assert type(m.weight_fake_quant).__name__ == "LSQ"
                assert m.get_weight_qparams() == w, n
            if a is not None:
                assert m.get_activation_qparams() == a, n
    assert torch.equal(q(x), y)  # the same model, now with learnable scales
    # a learned fake quant that cannot take them (another dtype) starts from its observer
    q = _qat(qconfig=ema_lowbit_fakequant_qconfig)
    reset_qconfig(q, lsq_qconfig)
    assert not q.c1.act_fake_quant._initialized
    q(x)
    assert q.c1.act_fake_quant._initialized


def test_reset_qconfig_refuses_per_channel_activations_before_changing_anything():
    """Found by review: quantize_qat and propagate_qconfig refuse a per-channel activation
    observer, reset_qconfig took it: the next QAT forward failed with a shape error from
    the layer after a pooling, far from the cause."""
    from functools import partial
    from gpuquant.quantization import MinMaxObserver
    q = _qat()
    bad = ema_fakequant_qconfig._replace(
        act_observer=partial(MinMaxObserver, dtype=gpuquant.qint8, axis=1))
    before = {n: type(m) for n, m in q.named_modules()}
    observers = [m.act_observer for m in q.modules() if isinstance(m, QATModule) and m.with_act]
    with pytest.raises(ValueError, match=r"reset_qconfig: .*act_observer is per channel"):
        reset_qconfig(q, bad)
    assert {n: type(m) for n, m in q.named_modules()} == before
    assert observers == [m.act_observer for m in q.modules()
                         if isinstance(m, QATModule) and m.with_act]


def test_quantize_before_observation_names_module():
    q = quantize_qat(Net())
    with pytest.raises(ValueError, match="'quant'|observ|not run"):
        quantize(q)


def test_missing_quant_stub_names_module():
    class NoStub(gnn.Module):
        def __init__(self):
            super().__init__()
            self.conv = gnn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)
    q = quantize_qat(NoStub())
    q(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="'conv'.*QuantStub"):
        quantize(q)


def test_unsupported_module_in_mapping():
    mapping = {k: v for k, v in get_qat_mapping().items() if k is not gnn.Linear}
    with pytest.raises(TypeError, match="'fc2'.*Linear"):
        quantize_qat(Net(), mapping=mapping)
    with pytest.raises(TypeError, match="from_float_module"):
        quantize_qat(Net(), mapping={gnn.Conv2d: torch.nn.ReLU})
    q = _qat()
    with pytest.raises(TypeError, match="no quantized version"):
        quantize(q, mapping={qat_nn.Conv2d: qnn.Conv2d})
    with pytest.raises(TypeError, match="QConfig"):
        quantize_qat(Net(), qconfig="ema")


def test_bad_input_dtype_and_device():
    int8 = quantize(_qat())
    with pytest.raises(TypeError, match="float"):
        int8(torch.randint(-5, 5, (2, 3, 9, 10), dtype=torch.int8))
    with pytest.raises(TypeError, match="QuantStub"):
        int8.c1(torch.randn(2, 3, 9, 10))
    with pytest.raises(TypeError, match="qint8"):
        int8.c1(torch.zeros(2, 3, 9, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="device"):
        int8.c1(torch.zeros(2, 3, 9, 10, dtype=torch.int8, device="meta"))


def test_inplace_false_leaves_original():
    m = Net()
    q = quantize_qat(m, inplace=False)
    assert type(m.c1) is gnn.ConvBnRelu2d and type(q.c1) is qat_nn.ConvBnRelu2d
    single = quantize_qat(gnn.Linear(4, 3))  # a module passed alone is replaced
    assert type(single) is qat_nn.Linear


def test_weights_per_channel_int8_bias_int32():
    q = _qat()
    int8 = quantize(q, inplace=False)
    conv = int8.c1
    w_qp = q.c1.get_weight_qparams()
    assert w_qp.axis == 0 and conv.weight_scale.shape == (8,)
    assert conv.weight.dtype == torch.int8 and int(conv.weight.abs().max()) <= 127
    w, b = q.c1.folded_weight_bias()
    s = conv.input_scale.double() * conv.weight_scale.double()
    assert torch.equal(conv.bias, torch.round(b.detach().double() / s).to(torch.int32))
    assert torch.equal(conv.weight, gpuquant.functional.quantize(w.detach(), w_qp))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_and_per_tensor_weights(padding):
    from functools import partial

    from gpuquant.quantization import MinMaxObserver, QConfig
    qc = QConfig(partial(MinMaxObserver, dtype=gpuquant.qint8_narrow, symmetric=True),  # per tensor
                 ema_fakequant_qconfig.act_observer, ema_fakequant_qconfig.weight_fake_quant,
                 ema_fakequant_qconfig.act_fake_quant)

    class P(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.c, self.dq = gnn.QuantStub(), gnn.ConvRelu2d(3, 5, 3, padding=padding), \
                gnn.DequantStub()

        def forward(self, x):
            return self.dq(self.c(self.q(x)))
    x = torch.randn(2, 3, 7, 6)
    q = _qat(P(), qconfig=qc, shape=(2, 3, 7, 6))
    with torch.no_grad():
        y_qat = q(x)
    s = float(q.c.get_activation_qparams().scale)
    assert q.c.get_weight_qparams().axis is None
    int8 = quantize(q)
    assert int8.c.weight_scale.shape == (5,)
    y8 = int8(x)
    assert y8.shape == y_qat.shape
    assert float(((y8 - y_qat).abs() / s).round().max()) <= 1


def test_direct_qat_construction_needs_qconfig():
    m = qat_nn.ConvRelu2d(3, 4, 3)
    with pytest.raises(RuntimeError, match="set_qconfig|quantize_qat"):
        m(torch.randn(1, 3, 5, 5))
    m.set_qconfig(ema_fakequant_qconfig)
    y = m(torch.randn(2, 3, 5, 5))
    assert y.shape == (2, 4, 3, 3) and m.get_weight_qparams().axis == 0
    with pytest.raises(TypeError, match="QConfig"):
        m.set_qconfig(object())


def test_conversion_is_idempotent():
    q = quantize_qat(quantize_qat(Net()))
    assert isinstance(q.c1, qat_nn.ConvBnRelu2d) and q.c1.__class__ is qat_nn.ConvBnRelu2d
    q.train()
    with torch.no_grad():
        q(torch.randn(4, 3, 9, 10))
    int8 = quantize(quantize(q.eval()))
    assert isinstance(int8.c1, qnn.ConvBnRelu2d)


def test_freeze_bn_stats_on_a_whole_model():
    """freeze_bn_stats(model) freezes every folded Conv+BN: training then runs on the running
    statistics (which stop moving) and gives the eval output; freeze=False undoes it."""
    from gpuquant.models import resnet18
    from gpuquant.nn.qat.conv import BnFoldedModule
    from gpuquant.quantization import freeze_bn_stats
    torch.manual_seed(0)
    q = quantize_qat(resnet18(num_classes=10), ema_fakequant_qconfig).train()
    x = torch.randn(4, 3, 32, 32)
    q(x)  # observers and BN statistics see a batch
    folded = [m for m in q.modules() if isinstance(m, BnFoldedModule)]
    assert folded and freeze_bn_stats(q) is q and all(m.bn_frozen for m in folded)
    disable_observer(q)
    before = [m.bn.running_mean.clone() for m in folded]
    with torch.no_grad():
        y_train = q.train()(x)
        y_eval = q.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert all(torch.equal(b, m.bn.running_mean) for b, m in zip(before, folded))
    freeze_bn_stats(q, False)
    assert not any(m.bn_frozen for m in folded)
    with pytest.raises(TypeError, match="freeze must be a bool"):
        freeze_bn_stats(q, 1)
    with pytest.raises(TypeError):
        freeze_bn_stats("model")


class _Box(torch.nn.Module):
    """A plain torch.nn container subclass (not a gpuquant.nn.Module)."""

    def __init__(self):
        super().__init__()
        self.a = gnn.ConvBnRelu2d(3, 4, 3)

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("container", ["sequential", "modulelist", "subclass"])
def test_qconfig_on_a_torch_nn_container_is_honoured(container):
    """A qconfig set on a plain torch.nn container applies to everything under it (nested
    too), as on a gpuquant.nn.Module container; the rest keeps the argument's."""
    inner = {"sequential": lambda: torch.nn.Sequential(gnn.ConvBnRelu2d(3, 4, 3),
                                                        torch.nn.Sequential(gnn.Linear(4, 2))),
             "modulelist": lambda: torch.nn.ModuleList([gnn.ConvBnRelu2d(3, 4, 3),
                                                        gnn.Linear(4, 2)]),
             "subclass": _Box}[container]()
    inner.qconfig = lsq_qconfig
    model = torch.nn.Sequential(gnn.QuantStub(), inner, gnn.Linear(3, 3), gnn.DequantStub())
    q = quantize_qat(model, ema_fakequant_qconfig)
    under = [m for m in q[1].modules() if isinstance(m, QATModule)]
    assert under and all(m.qconfig is lsq_qconfig for m in under)
    assert all(type(m.weight_fake_quant).__name__ == "LSQ" for m in under)
    assert q[0].qconfig is ema_fakequant_qconfig and q[2].qconfig is ema_fakequant_qconfig
    assert type(q[2].weight_fake_quant).__name__ != "LSQ"


def test_qconfig_attribute_must_be_a_qconfig():
    model = torch.nn.Sequential(gnn.QuantStub(), torch.nn.Sequential(gnn.Linear(3, 3)),
                                gnn.DequantStub())
    model[1].qconfig = "lsq"
    with pytest.raises(TypeError, match=r"module '1' \(Sequential\) has a qconfig attribute "
                                        r"of type str; it must be a gpuquant"):
        quantize_qat(model, ema_fakequant_qconfig)
    assert type(model[1][0]) is gnn.Linear  # nothing converted


@pytest.mark.parametrize("fn", ["quantize_qat", "quantize", "reset_qconfig"])
@pytest.mark.parametrize("bad", ["no", 0, None])
def test_inplace_must_be_a_bool(fn, bad):
    model = Net()
    call = {"quantize_qat": lambda: quantize_qat(model, inplace=bad),
            "quantize": lambda: quantize(_qat(model), inplace=bad),
            "reset_qconfig": lambda: reset_qconfig(_qat(model), passive_qconfig,
                                                   inplace=bad)}[fn]
    with pytest.raises(TypeError, match=rf"{fn}: inplace must be a bool \(True or False\), "
                                        rf"got {bad!r}"):
        call()
    if fn == "quantize_qat":
        assert type(model.c1) is gnn.ConvBnRelu2d  # not converted


def test_quantize_of_a_float_model_is_refused():
    model = Net()
    with pytest.raises(ValueError, match=r"quantize: no QAT module found in the Net model; "
                                         r"convert it with .*quantize_qat"):
        quantize(model)
    assert type(model.c1) is gnn.ConvBnRelu2d
    int8 = quantize(_qat())
    assert quantize(int8) is int8  # an int8 model stays as it is


def test_quantize_qat_of_a_qat_model_with_another_qconfig_is_refused():
    """Converting again with the same qconfig is a no-op; another qconfig raises (before
    anything changes) and points at propagate_qconfig / reset_qconfig, which do it."""
    q = _qat()
    fq = q.c1.weight_fake_quant
    assert quantize_qat(q, ema_fakequant_qconfig) is q and q.c1.weight_fake_quant is fq
    with pytest.raises(ValueError, match=r"module 'quant' \(QuantStub\) is already a QAT "
                                         r"module with another qconfig.*propagate_qconfig.*"
                                         r"reset_qconfig"):
        quantize_qat(q, lsq_qconfig)
    assert q.c1.weight_fake_quant is fq and q.c1.qconfig is ema_fakequant_qconfig
    propagate_qconfig(q, lsq_qconfig)
    assert type(q.c1.weight_fake_quant).__name__ == "LSQ"
    assert quantize_qat(q, lsq_qconfig) is q  # consistent again
    # a module's own qconfig (set on the float module) stays its own: converting again is
    # still a no-op
    m = torch.nn.Sequential(gnn.QuantStub(), gnn.ConvBnRelu2d(3, 4, 3), gnn.DequantStub())
    m[1].qconfig = lsq_qconfig
    q = quantize_qat(m, ema_fakequant_qconfig)
    fq = q[1].weight_fake_quant
    assert type(fq).__name__ == "LSQ" and quantize_qat(q, ema_fakequant_qconfig) is q
    assert q[1].weight_fake_quant is fq


def test_quantize_qat_gives_directly_built_qat_modules_their_quantizers():
    """The error of a QAT module built without a qconfig says to call quantize_qat: that
    works."""
    model = torch.nn.Sequential(qat_nn.QuantStub(), qat_nn.ConvRelu2d(3, 4, 3),
                                qat_nn.DequantStub())
    q = quantize_qat(model, ema_fakequant_qconfig)
    y = q(torch.randn(2, 3, 6, 7))
    assert y.shape == (2, 4, 4, 5) and q[1].qconfig is ema_fakequant_qconfig


@pytest.mark.parametrize("shape", [(0, 4), (0, 3, 6, 6)])
def test_empty_first_batch_says_the_input_was_empty(shape):
    layer = gnn.Linear(4, 3) if len(shape) == 2 else gnn.ConvRelu2d(3, 4, 3)
    q = quantize_qat(torch.nn.Sequential(gnn.QuantStub(), layer, gnn.DequantStub()))
    with pytest.raises(ValueError, match=rf"ExponentialMovingAverageObserver has not observed "
                                         rf"any data: its input was empty \(shape "
                                         rf"{re.escape(str(shape))}\)"):
        q(torch.randn(shape))
    x = torch.randn((5,) + shape[1:])
    assert q(x).shape[0] == 5 and q(torch.randn(shape)).shape[0] == 0  # empty after data: fine


def _qparam_buffers(model):
    """(name, tensor) of every qparam buffer (``<name>_scale`` / ``<name>_zero_point``) of
    the quantized modules."""
    return [(f"{n}.{k}", t) for n, m in model.named_modules()
            if isinstance(m, QuantizedModule)
            for k, t in m._buffers.items() if k.endswith(("_scale", "_zero_point"))]


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16", "to_meta_bfloat16"])
def test_floating_casts_keep_the_qparams_of_a_converted_model(cast):
    """.half() / .bfloat16() / .to(dtype) leave the float32 scales and the integer buffers
    as they are (the int8 model's arithmetic is fixed), so the output is the same values,
    rounded once to the cast dtype (the dequantized output follows the cast, as a float
    part after it does); device moves still apply to them."""
    int8 = quantize(_qat())
    x = torch.randn(4, 3, 9, 10).half()
    want = int8(x)
    before = {n: t.clone() for n, t in _qparam_buffers(int8)}
    cast_model = copy.deepcopy(int8)
    cast_model = {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(),
                  "to_float16": lambda m: m.to(torch.float16),
                  "to_meta_bfloat16": lambda m: m.to("meta", torch.bfloat16)}[cast](cast_model)
    after = dict(_qparam_buffers(cast_model))
    assert before.keys() == after.keys() and before
    for n, t in after.items():
        assert t.dtype == before[n].dtype, n
        assert t.device == torch.device("meta" if cast == "to_meta_bfloat16" else "cpu"), n
        if t.device.type == "cpu":
            assert torch.equal(t, before[n]), n
    assert all(t.dtype in (torch.int8, torch.int32) for n, t in cast_model.named_buffers()
               if n.endswith(("weight", "bias")))
    if cast != "to_meta_bfloat16":
        dt = torch.bfloat16 if cast == "bfloat16" else torch.float16
        assert torch.equal(cast_model(x), want.to(dt))


@pytest.mark.parametrize("edit", ["in_place", "assign"])
def test_qparam_edits_after_a_forward_are_honoured(edit):
    """Scale and zero-point buffers edited in place or assigned anew after a forward give the
    output of a model that had them from the start (the cached requantization, checks and
    stub qparams are rebuilt); a fused ConvDequant follows its DequantStub's scale."""
    from gpuquant.quantization import fuse_epilogues
    int8 = quantize(_qat())
    x = torch.randn(3, 3, 9, 10)
    edits = [("fc2", "output_scale", 2.0), ("dequant", "input_scale", 2.0),
             ("c1", "input_scale", 1.5), ("quant", "output_scale", 1.5),
             ("avg", "input_zero_point", 1), ("fc", "output_zero_point", 3),
             ("fc2", "input_zero_point", 3)]

    def apply(model):
        for mod, buf, f in edits:
            m = getattr(model, mod)
            if edit == "in_place":
                getattr(m, buf).mul_(f) if isinstance(f, float) else getattr(m, buf).add_(f)
            else:
                setattr(m, buf, getattr(m, buf) * f if isinstance(f, float)
                        else getattr(m, buf) + f)
        return model

    fresh = apply(copy.deepcopy(int8))
    want = fresh(x)
    used = copy.deepcopy(int8)
    assert not torch.equal(used(x), want)
    assert torch.equal(apply(used)(x), want)
    assert torch.equal(used(x), want)  # and cached again

    fused = fuse_epilogues(copy.deepcopy(int8))
    assert isinstance(fused.dequant, qnn.ConvDequant)
    fused(x)
    dq = fused.dequant.dequant
    if edit == "in_place":
        dq.input_scale.mul_(2.0)
    else:
        dq.input_scale = dq.input_scale * 2.0
    ref = copy.deepcopy(int8)
    ref.dequant.input_scale.mul_(2.0)
    assert torch.equal(fused(x), ref(x))


class _DeadInput(gnn.Module):
    """c1's ReLU output is always zero (bias -100), so c2's input scale stays at eps."""

    def __init__(self, linear=False):
        super().__init__()
        self.q = gnn.QuantStub()
        self.c1 = gnn.ConvRelu2d(3, 4, 3, padding=1)
        self.c2 = gnn.Linear(64, 5) if linear else gnn.Conv2d(4, 5, 3, padding=1)
        self.dq = gnn.DequantStub()
        with torch.no_grad():
            self.c1.bias.fill_(-100.0)
            self.c2.bias.copy_(torch.tensor([0.5, -3.0, 40.0, 0.0, 1e-3]))
        self.linear = linear

    def forward(self, x):
        y = self.c1(self.q(x))
        if self.linear:
            y = y.flatten(2)
        return self.dq(self.c2(y))


@pytest.mark.parametrize("linear", [False, True])
def test_bias_past_int32_at_a_degenerate_input_scale_raises_the_weight_scale(linear):
    """A layer whose input was always zero (s_x = float32 eps): b / (s_x s_w) is past int32
    for ordinary biases. Conversion raises those channels' weight scales until the bias
    fits (a warning names them; the others keep the observer's), and the int8 output stays
    within one output step of the QAT model's."""
    torch.manual_seed(0)
    qat = quantize_qat(_DeadInput(linear), ema_fakequant_qconfig)
    for _ in range(3):
        qat(torch.randn(2, 3, 8, 8))
    qat.eval()
    s_w = qat.c2.get_weight_qparams().scale.clone()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = qat(x)
    with pytest.warns(UserWarning, match=r"module 'c2'.*channel\(s\) \[0, 1, 2\].*raised"):
        int8 = quantize(copy.deepcopy(qat))
    got_scale = int8.c2._qparams("weight").scale
    assert torch.equal(got_scale[3:], s_w[3:].to(got_scale))  # the bias fits there
    assert bool((got_scale[:3] > s_w[:3]).all())
    assert int8.c2.bias.abs().max() < 2 ** 31 - 1
    with gpuquant.backends.use("numpy"), torch.no_grad():
        got = int8(x)
    step = float(int8.c2._qparams("output").scale)
    assert (got - want).abs().max() <= step * (1 + 1e-4)


@pytest.mark.parametrize("linear", [False, True])
def test_bias_fitted_at_conversion_runs_with_4bit_activations(linear):
    """quint4 activations are stored as uint8, and the integer op checks the accumulator's
    worst case with the storage's range (|x - zp| <= 255) on every call. The bias fitting of
    a degenerate input scale (and the conversion's own accumulator check) used the 4-bit
    range instead (<= 15): quantize() accepted a model whose bias left too little room, and
    every inference of it raised. Now the int8 model runs, within one output step."""
    torch.manual_seed(0)
    qat = quantize_qat(_DeadInput(linear), ema_lowbit_fakequant_qconfig)
    for _ in range(3):
        qat(torch.randn(2, 3, 8, 8))
    qat.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = qat(x)
    with pytest.warns(UserWarning, match=r"module 'c2'.*raised"):
        int8 = quantize(copy.deepcopy(qat))
    with gpuquant.backends.use("numpy"), torch.no_grad():
        got = int8(x)
    step = float(int8.c2._qparams("output").scale)
    assert (got - want).abs().max() <= step * (1 + 1e-4)


class _StubbedConv(gnn.Module):
    """QuantStub -> ``layer`` (as ``c``) -> DequantStub."""

    def __init__(self, layer):
        super().__init__()
        self.q, self.c, self.dq = gnn.QuantStub(), layer, gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.c(self.q(x)))


@pytest.mark.parametrize("make", [lambda: gnn.ConvRelu2d(1, 3, 1), lambda: gnn.ConvRelu62d(1, 3, 1)],
                         ids=["relu", "relu6"])
def test_requant_multiplier_past_2_pow_30_saturates_as_the_exact_one_does(make, tmp_path):
    """A layer whose calibrated output range is empty (a dead ReLU: scale eps) after inputs
    of ~1e8 has a requantization multiplier s_x s_w / s_y past 2^30, which quantize() used
    to refuse ("scales are inconsistent"). With it, as with the largest multiplier
    (2^31 - 1, rshift -30) now used, an accumulator of 0 gives the zero point and any other
    saturates the 8-bit output: the int8 model equals the QAT model byte for byte on every
    backend and in the exported runtime, for dead, live and zero inputs."""
    from gpuquant.multipliers import SATURATED
    from gpuquant.quantization import disable_observer, ema_fakequant_qconfig
    net = _StubbedConv(make())
    with torch.no_grad():
        net.c.weight.fill_(-float(torch.rand(()) + 0.5))
        net.c.bias.fill_(-float(torch.rand(())))
    qat = quantize_qat(net, ema_fakequant_qconfig).eval()
    x = torch.rand(2, 1, 5, 4) * 1e8
    with torch.no_grad():
        qat(x)  # calibration: every output <= 0
    int8 = quantize(copy.deepcopy(qat))
    r = int8.c.requant("cpu")
    assert r.multiplier.tolist() == [SATURATED[0]] * 3 and r.rshift.tolist() == [SATURATED[1]] * 3
    disable_observer(qat)
    xs = torch.cat([x, -x, torch.zeros_like(x)])  # dead, saturating, zero accumulators
    with torch.no_grad():
        want = qat(xs)
        for be in [b for b in ("numpy", "reference", "triton") if b in gpuquant.backends.available()]:
            with gpuquant.backends.use(be):
                assert torch.equal(int8(xs), want), be
    assert bool((want > 0).any()) and bool((want == 0).any())
    pytest.importorskip("onnx")
    import gpuquant.runtime as rt
    from gpuquant.export import to_onnx
    to_onnx(int8, xs, tmp_path / "m.onnx")
    assert np.array_equal(rt.load(tmp_path / "m.onnx").run(xs.numpy()), want.numpy())


def test_observer_that_kept_no_batch_fails_the_conversion_by_name():
    """With check_finite=False a NaN / Inf batch is dropped without a host read; an observer
    that saw only such batches reports has_observed with a +-inf state (qparams of scale
    eps): quantize() refuses it, naming the module and the dropped count, instead of an
    int8 model whose outputs are all ~0. One finite batch after is enough."""
    from functools import partial

    from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize,
                                       MinMaxObserver, QConfig)
    qc = QConfig(weight_observer=partial(MinMaxObserver, symmetric=True, axis=0,
                                         dtype=gpuquant.qint8_narrow, check_finite=False),
                 act_observer=partial(ExponentialMovingAverageObserver, 0.9,
                                      check_finite=False),
                 weight_fake_quant=partial(FakeQuantize, gpuquant.qint8_narrow),
                 act_fake_quant=partial(FakeQuantize, gpuquant.qint8))
    qat = quantize_qat(_StubbedConv(gnn.ConvRelu2d(3, 4, 3)), qc).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        qat(torch.full_like(x, float("nan")))
    assert qat.q.act_observer.has_observed and not qat.q.act_observer.recorded_finite()
    with pytest.raises(ValueError, match=r"quantize: module 'q' \(QuantStub\): its .* kept no "
                                         r"batch.*nonfinite_batches = 1"):
        quantize(copy.deepcopy(qat))
    with torch.no_grad():
        qat(x)
    quantize(qat)


def test_histogram_observer_that_kept_no_batch_fails_the_conversion_by_name():
    """The same for the calibration observer: calibration_qconfig.without_host_reads() drops
    NaN / Inf batches on the device; a HistogramObserver that saw only such batches has an
    empty histogram and gave qparams of scale eps, and quantize() converted it silently (the
    check covered the MinMax / moving-average observers only). Now it is refused by name;
    one finite batch after is enough."""
    qat = quantize_qat(_StubbedConv(gnn.ConvRelu2d(3, 4, 3)),
                       calibration_qconfig.without_host_reads()).eval()
    x = torch.randn(2, 3, 6, 6)
    bad = x.clone()
    bad[torch.rand(bad.shape) < 0.5] = float("nan")
    bad[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        qat(bad)
    with pytest.raises(ValueError, match=r"quantize: module 'q' \(QuantStub\): its "
                                         r"HistogramObserver kept no batch.*"
                                         r"nonfinite_batches = 1"):
        quantize(copy.deepcopy(qat))
    obs = qat.q.act_observer
    assert obs.has_observed and not obs.recorded_finite()
    with torch.no_grad():
        qat(x)
    assert obs.recorded_finite() and qat.c.act_observer.recorded_finite()
    quantize(qat)



@pytest.mark.parametrize("where,target", [
    ("q", lambda m: m.q),  # a QuantStub: converted unchecked, failed at the first call
    ("c", lambda m: m.c),  # its activation: the conversion's own check
])
def test_learned_scale_past_float32_fails_the_conversion_naming_the_module(where, target):
    """A TQT threshold trained so low that its scale (2**-147) has no float32 reciprocal
    (the forward floors it at 2**-126): the learned fake quants hand their qparams over
    unvalidated, so a QuantStub's converted without a word and the int8 model failed at its
    first call, naming no module. quantize() refuses the learned value, naming the module,
    as a load of that state refuses it."""
    torch.manual_seed(0)
    qat = quantize_qat(_StubbedConv(gnn.ConvRelu2d(3, 4, 3)), tqt_qconfig)
    qat(torch.randn(2, 3, 6, 6))
    with torch.no_grad():
        target(qat).act_fake_quant.log2_t.fill_(-140.0)  # scale 2**-140 / 128
    with pytest.raises(ValueError, match=rf"quantize: module '{where}' \(\w+\): its TQT's "
                                         rf"learned log2_t \[-140.0\] .* no usable scale"):
        quantize(qat)
    assert isinstance(qat.q, QATModule)  # unchanged


def test_conversion_error_of_a_root_module_names_it():
    """quantize() of a QAT module itself (no parent): its errors name it too."""
    q = quantize_qat(gnn.QuantStub(), tqt_qconfig)
    q(torch.randn(2, 3))
    with torch.no_grad():
        q.act_fake_quant.log2_t.fill_(-140.0)
    with pytest.raises(ValueError, match=r"quantize: module '<root>' \(QuantStub\): its "
                                         r"TQT's learned log2_t"):
        quantize(q)


@pytest.mark.parametrize("what", ["scale", "zero_point"])
def test_nan_learned_lsq_value_fails_the_conversion_naming_it(what):
    """A learned LSQ scale or zero point that training drove to NaN: quantize() names the
    module and the value (a NaN zero point had become -2147483648 in int32, and the error
    said 'zero_point [-2147483648] outside the range of quint8', naming no NaN)."""
    from gpuquant.quantization import lsq_qconfig
    torch.manual_seed(0)
    qat = quantize_qat(_StubbedConv(gnn.ConvRelu2d(3, 4, 3)), lsq_qconfig)
    qat(torch.randn(2, 3, 6, 6))
    with torch.no_grad():
        getattr(qat.c.act_fake_quant, what).fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"quantize: module 'c' \(\w+\): its LSQ's learned "
                                         rf"{what} \[nan\]"):
        quantize(qat)


def test_quant_stub_names_a_numpy_array_as_one():
    """A NumPy array given to the int8 model: 'QuantStub: expects a float tensor, got
    float32' read as a dtype problem; the message now says it is not a torch.Tensor and how
    to convert it."""
    torch.manual_seed(0)
    qat = quantize_qat(_StubbedConv(gnn.ConvRelu2d(3, 4, 3)))
    x = torch.randn(2, 3, 6, 7)
    qat(x)
    int8 = quantize(qat)
    with pytest.raises(TypeError, match=r"QuantStub: expects a float torch.Tensor .*got "
                                        r"numpy.ndarray \(float32\); convert with "
                                        r"torch.from_numpy\(x\)"):
        int8(x.numpy())
    with pytest.raises(TypeError, match=r"got list$"):
        int8.q([1.0, 2.0])
    int8(torch.from_numpy(x.numpy()))


def test_concat_of_inputs_of_two_dtypes_is_refused_at_the_first_step():
    """The int8 Concat takes inputs of one dtype; a quint8 branch beside a qint8 one trained
    and calibrated, then quantize() refused it. The QAT Concat now refuses it at its first
    forward, naming both inputs; with one dtype it converts, and Elemwise("add") takes
    the mixed pair."""
    from functools import partial

    from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize,
                                       MinMaxObserver, QConfig, ema_fakequant_qconfig)
    u8 = QConfig(partial(MinMaxObserver, dtype=gpuquant.qint8_narrow, axis=0),
                 partial(ExponentialMovingAverageObserver, dtype=gpuquant.quint8,
                         symmetric=False),
                 partial(FakeQuantize, dtype=gpuquant.qint8_narrow),
                 partial(FakeQuantize, dtype=gpuquant.quint8))

    class Net(gnn.Module):
        def __init__(self, join):
            super().__init__()
            self.q, self.dq = gnn.QuantStub(), gnn.DequantStub()
            self.a = gnn.ConvBnRelu2d(3, 4, 3, padding=1)
            self.a.qconfig = u8  # quint8 output
            self.b = gnn.ConvBn2d(3, 5, 3, padding=1)  # qint8 output (the default)
            self.j = join

        def forward(self, x):
            x = self.q(x)
            a, b = self.a(x), self.b(x)
            y = self.j([a, b], 1) if isinstance(self.j, gnn.Concat) else self.j(a, b[:, :4])
            return self.dq(y)

    x = torch.randn(2, 3, 6, 6)
    qat = quantize_qat(Net(gnn.Concat()), ema_fakequant_qconfig)
    with pytest.raises(ValueError, match=r"Concat: input 0 \(ConvBnRelu2d\) is quint8 and input "
                                         r"1 \(ConvBn2d\) is qint8; the int8 Concat takes "
                                         r"inputs of one dtype"):
        qat(x)
    one = Net(gnn.Concat())
    one.a.qconfig = None  # one dtype: trains and converts
    qat1 = quantize_qat(one, ema_fakequant_qconfig)
    qat1(x)
    quantize(qat1)
    mixed_add = quantize_qat(Net(gnn.Elemwise("add")), ema_fakequant_qconfig)
    mixed_add(x)  # the add takes inputs of two dtypes
    quantize(mixed_add)


class _Stubs(gnn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.q, self.c, self.c2 = gnn.QuantStub(), gnn.Conv2d(3, 5, 3), gnn.Conv2d(5, 5, 1)
        self.q2, self.dq, self.dq2 = gnn.QuantStub(), gnn.DequantStub(), gnn.DequantStub()
        for unused in {"quantstub_on_int8": ("dq2", "c2"), "dequant_twice": ("q2", "c2"),
                       "conv_after_dequant": ("q2",)}[mode]:
            delattr(self, unused)

    def forward(self, x):
        a = self.c(self.q(x))
        if self.mode == "quantstub_on_int8":
            return self.dq(self.q2(a))
        if self.mode == "dequant_twice":
            return self.dq2(self.dq(a))
        return self.dq2(self.c2(self.dq(a)))  # a quantized conv fed the dequantized value


@pytest.mark.parametrize("mode,msg", [
    ("quantstub_on_int8", r"QuantStub 'q2': its input is the quantized output of a Conv2d"),
    ("dequant_twice", r"input 0 of module 'dq2' \(DequantStub\) was not produced by a "
                      r"quantized module"),
    ("conv_after_dequant", r"input 0 of module 'c2' \(Conv2d\) was not produced by a "
                           r"quantized module"),
])
def test_stubs_where_the_int8_model_cannot_run_them_are_refused_at_conversion(mode, msg):
    """The QAT DequantStub passed its input through (the producer's tag with it) and the
    QuantStub recorded no producer: a QuantStub on a quantized value, two DequantStubs in a
    row or a quantized conv after a DequantStub converted, and the int8 model failed at its
    first call naming no module ('QuantStub: expects a float tensor ..., got torch.int8')."""
    qat = quantize_qat(_Stubs(mode), ema_fakequant_qconfig)
    qat(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=rf"^quantize: {msg}"):
        quantize(qat.eval())
