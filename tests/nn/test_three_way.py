"""The contract's three-way check for every module (MegEngine's module tests):
1. QAT with fake quant and observers off == float;
2. QAT == fake_quant of the float math with the QAT qparams (the bias on its int32 grid
   s_x * s_w, as MegEngine's check);
3. dequantized int8 output within 1 output step of QAT everywhere, identical on >= 99% of
   the elements for single conv / linear layers (the measured share is asserted)."""
import pytest
import torch
import torch.nn.functional as F

import gpuquant.nn as gnn
from gpuquant.functional import fake_quant
from gpuquant.quantization import (disable_fake_quant, disable_observer, quantize,
                                   quantize_qat, set_bn_fold)

from tests.nn.nn_helpers import QCONFIGS, Wrap, randomize_bn, steps

# (name, factory, input shape); awkward sizes on purpose
CONV_CASES = [
    ("conv3x3_bias", lambda: gnn.Conv2d(3, 8, 3, padding=1), (2, 3, 11, 9)),
    ("conv_relu_stride2", lambda: gnn.ConvRelu2d(5, 7, 3, stride=2, padding=1), (2, 5, 13, 10)),
    ("conv_relu6_dilation2", lambda: gnn.ConvRelu62d(4, 6, 3, padding=2, dilation=2), (1, 4, 12, 11)),
    ("conv_1x1_nobias", lambda: gnn.Conv2d(16, 9, 1, bias=False), (2, 16, 7, 7)),
    ("convbn_1x1_stride2", lambda: gnn.ConvBn2d(6, 12, 1, stride=2), (2, 6, 15, 9)),
    ("convbnrelu_bias", lambda: gnn.ConvBnRelu2d(3, 10, 3, padding=1, bias=True), (2, 3, 9, 9)),
    ("depthwise_bnrelu6", lambda: gnn.ConvBnRelu62d(8, 8, 3, stride=1, padding=1, groups=8), (2, 8, 10, 13)),
    ("grouped_stride2", lambda: gnn.ConvBnRelu2d(6, 9, 3, stride=2, padding=1, groups=3), (2, 6, 11, 11)),
]
LINEAR_CASES = [
    ("linear_2d", lambda: gnn.Linear(33, 17), (31, 33)),
    ("linear_3d", lambda: gnn.Linear(20, 11), (3, 7, 20)),
    ("linear_relu", lambda: gnn.LinearRelu(23, 19), (40, 23)),
    ("linear_bn", lambda: gnn.LinearBn1d(21, 13), (50, 21)),
    ("linear_bn_relu_bias", lambda: gnn.LinearBnRelu1d(18, 29, bias=True), (45, 18)),
]


def _prepare(factory, shapes, qconfig, concat_dim=None, train_steps=3):
    torch.manual_seed(0)
    f = factory()
    randomize_bn(f)
    model = Wrap(f, len(shapes), concat_dim).eval()
    xs = [torch.randn(s) * (1.0 + i) for i, s in enumerate(shapes)]
    float_out = model(*xs).detach()
    qat = quantize_qat(model, qconfig, inplace=False)
    qat.train()
    with torch.no_grad():
        for _ in range(train_steps):  # observers see a few batches (BN stats move too)
            qat(*[torch.randn_like(x) * x.std() for x in xs])
    qat.eval()
    return model, qat, xs, float_out


def _float_off(qat):
    disable_fake_quant(qat)
    disable_observer(qat)
    return qat


def _bias_fq(qat, b):
    """The bias on its int32 grid: qint32 fake quant with scale s_x * s_w[c] (in float64,
    as conversion rounds it), MegEngine's fake_quant_bias."""
    if b is None:
        return None
    unit = qat.stubs[0].get_activation_qparams().scale.double() * \
        qat.m.get_weight_qparams().scale.double()
    return (torch.round(b.detach().double() / unit) * unit).float()


def _conv_expected(qat, x):
    m = qat.m
    x_fq = fake_quant(x, qat.stubs[0].get_activation_qparams())
    w, b = m.folded_weight_bias()
    w_fq = fake_quant(w.detach(), m.get_weight_qparams())
    conv = m.conv if hasattr(m, "bn") else m
    y = F.conv2d(x_fq, w_fq, _bias_fq(qat, b), conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    return fake_quant(gnn.conv.apply_activation(y, m.activation), m.get_activation_qparams())


def _linear_expected(qat, x):
    m = qat.m
    x_fq = fake_quant(x, qat.stubs[0].get_activation_qparams())
    w, b = m.folded_weight_bias()
    y = F.linear(x_fq, fake_quant(w.detach(), m.get_weight_qparams()), _bias_fq(qat, b))
    return fake_quant(gnn.conv.apply_activation(y, m.activation), m.get_activation_qparams())


def _check_int8(qat, xs, min_identical, report):
    with torch.no_grad():
        y_qat = qat(*xs)
    out_scale = float(qat.m.get_activation_qparams().scale) if qat.m.with_act else \
        float(qat.stubs[0].get_activation_qparams().scale)
    int8 = quantize(qat, inplace=False)
    y8 = int8(*xs)
    d = steps(y8, y_qat, out_scale)
    identical = float((d == 0).float().mean())
    report["identical"] = identical
    assert float(d.max()) <= 1, f"int8 differs from QAT by {float(d.max())} steps"
    assert identical >= min_identical, f"only {identical:.4f} of the outputs identical"
    return int8


@pytest.mark.parametrize("qc", ["int8", "uint8"])
@pytest.mark.parametrize("name,factory,shape", CONV_CASES + LINEAR_CASES,
                         ids=[c[0] for c in CONV_CASES + LINEAR_CASES])
def test_conv_linear_three_way(name, factory, shape, qc):
    model, qat, (x,), _ = _prepare(factory, [shape], QCONFIGS[qc])
    # 2. QAT == fake_quant(float math with the QAT qparams), bit for bit
    with torch.no_grad():
        y = qat(x)
        exp = _conv_expected(qat, x) if len(shape) == 4 and "linear" not in name else \
            _linear_expected(qat, x)
    assert torch.equal(y, exp)
    # 3. int8 vs QAT
    report = {}
    _check_int8(qat, [x], 0.99, report)
    # 1. fake quant and observers off == float (eval: BN folded with running statistics)
    qat0 = _float_off(quantize_qat(model, QCONFIGS[qc], inplace=False)).eval()
    with torch.no_grad():
        y_off = qat0(x)
        y_float = model(x)
    if hasattr(model.m, "bn"):
        torch.testing.assert_close(y_off, y_float, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(y_off, y_float)


@pytest.mark.parametrize("name,factory,shape", [c for c in CONV_CASES + LINEAR_CASES
                                                if "bn" in c[0]],
                         ids=[c[0] for c in CONV_CASES + LINEAR_CASES if "bn" in c[0]])
@pytest.mark.parametrize("mode", ["single", "exact"])
def test_bn_training_matches_float(name, factory, shape, mode):
    """1. in training mode: batch statistics, running statistics updated as torch does, in
    both BatchNorm folding forms; gradients of the input and of every parameter."""
    torch.manual_seed(1)
    f = randomize_bn(factory())
    qat = set_bn_fold(quantize_qat(Wrap(f), inplace=False), mode).train()
    _float_off(qat)
    model = Wrap(_clone_float(f)).train()
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_qat = qat(x)
    y_float = model(x2)
    torch.testing.assert_close(y_qat, y_float, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qat.m.bn.running_mean, model.m.bn.running_mean)
    torch.testing.assert_close(qat.m.bn.running_var, model.m.bn.running_var)
    assert int(qat.m.bn.num_batches_tracked) == int(model.m.bn.num_batches_tracked) == 1
    g = torch.randn_like(y_qat)
    y_qat.backward(g)
    y_float.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (n, p), (n2, p2) in zip(qat.m.named_parameters(), model.m.named_parameters()):
        assert n == n2
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=n)


def _clone_float(f):
    import copy
    return copy.deepcopy(f)


@pytest.mark.parametrize("method", ["add", "add_relu", "mul"])
@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_elemwise_three_way(method, qc):
    shapes = [(2, 5, 7, 9), (2, 5, 7, 9)] if method != "mul" else [(2, 5, 7, 9), (2, 5, 1, 1)]
    model, qat, xs, float_out = _prepare(lambda: gnn.Elemwise(method), shapes, QCONFIGS[qc])
    with torch.no_grad():
        y = qat(*xs)
        a = fake_quant(xs[0], qat.stubs[0].get_activation_qparams())
        b = fake_quant(xs[1], qat.stubs[1].get_activation_qparams())
        exp = fake_quant(qat.m._float_op(a, b), qat.m.get_activation_qparams())
    assert torch.equal(y, exp)
    report = {}
    _check_int8(qat, xs, 0.97, report)
    _float_off(qat)
    assert torch.equal(qat(*xs), float_out)


@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_concat_three_way(qc):
    shapes = [(2, 3, 5, 7), (2, 6, 5, 7), (2, 1, 5, 7)]
    model, qat, xs, float_out = _prepare(gnn.Concat, shapes, QCONFIGS[qc], concat_dim=1)
    with torch.no_grad():
        y = qat(*xs)
        parts = [fake_quant(x, s.get_activation_qparams()) for x, s in zip(xs, qat.stubs)]
        exp = fake_quant(torch.cat(parts, 1), qat.m.get_activation_qparams())
    assert torch.equal(y, exp)
    _check_int8(qat, xs, 0.97, {})
    _float_off(qat)
    assert torch.equal(qat(*xs), float_out)


ACTIVATION_KINDS = gnn.activation.ACTIVATION_KINDS


@pytest.mark.parametrize("qc", ["int8", "uint8"])
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_three_way(kind, qc):
    """The int8 table of every kind against QAT: identical on every element here (the CPU
    computes f on the fake-quantized input exactly as conversion built the table)."""
    factory = (lambda: gnn.Activation(kind, negative_slope=0.1)) if kind == "leaky_relu" \
        else (lambda: gnn.Activation(kind))
    model, qat, (x,), float_out = _prepare(factory, [(2, 5, 7, 9)], QCONFIGS[qc])
    x = x * 3  # reach the saturating parts (sigmoid, tanh, hardswish's clamps)
    with torch.no_grad():
        y = qat(x)  # observers record in eval mode too: read the qparams after the call
        x_fq = fake_quant(x, qat.stubs[0].get_activation_qparams())
        exp = fake_quant(model.m._float_op(x_fq), qat.m.get_activation_qparams())
    assert torch.equal(y, exp)
    report = {}
    int8 = _check_int8(qat, [x], 1.0, report)
    assert report["identical"] == 1.0
    assert isinstance(int8.m, gnn.quantized.Activation) and int8.m.kind == kind
    _float_off(qat)
    assert torch.equal(qat(x), model(x))


POOL_CASES = [
    ("maxpool", lambda: gnn.MaxPool2d(3, 2, 1), (2, 4, 11, 9)),
    ("maxpool_ceil_dil", lambda: gnn.MaxPool2d(2, 2, 0, dilation=2, ceil_mode=True), (1, 3, 9, 10)),
    ("avgpool", lambda: gnn.AvgPool2d(2), (2, 5, 8, 9)),
    ("avgpool_pad_ceil", lambda: gnn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
     (2, 3, 10, 7)),
    ("adaptive_avg", lambda: gnn.AdaptiveAvgPool2d((2, 3)), (2, 6, 7, 11)),
    ("adaptive_avg_1x1", lambda: gnn.AdaptiveAvgPool2d(1), (3, 7, 5, 5)),
]


@pytest.mark.parametrize("qc", ["int8", "uint8"])
@pytest.mark.parametrize("name,factory,shape", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pool_three_way(name, factory, shape, qc):
    model, qat, (x,), float_out = _prepare(factory, [shape], QCONFIGS[qc])
    with torch.no_grad():
        y = qat(x)  # observers record in eval mode too: read the qparams after the call
        qp = qat.stubs[0].get_activation_qparams()
        s = float(qp.scale)
        ref = fake_quant(model.m(fake_quant(x, qp)), qp)  # float pooling, then rne
    d = steps(y, ref, s)
    # max pooling: exact; average pooling rounds half away from zero as the integer op
    # does, so it may differ from rne by one step, only at exact ties
    assert float(d.max()) <= (0 if "max" in name else 1)
    int8 = _check_int8(qat, [x], 1.0, {})  # QAT mimics the integer rounding: identical
    assert int8(x).shape == float_out.shape
    _float_off(qat)
    assert torch.equal(qat(x), float_out)


def test_stubs_round_trip():
    model, qat, (x,), float_out = _prepare(lambda: torch.nn.Identity(), [(3, 4, 5, 6)],
                                           QCONFIGS["uint8"])
    with torch.no_grad():
        y = qat(x)
        qp = qat.stubs[0].get_activation_qparams()
        assert torch.equal(y, fake_quant(x, qp))
    int8 = quantize(qat, inplace=False)
    q = int8.stubs[0](x)
    assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(int8(x), fake_quant(x, qp))
