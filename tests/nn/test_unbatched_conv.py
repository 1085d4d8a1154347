"""Unbatched ``(C, H, W)`` input to the int8 convolutions and pools, as ``torch.nn.Conv2d``,
torch's pools and the QAT modules take it: run as a batch of 1, the same bytes, the output
without its batch dimension (the converted model refused it: 'conv2d: x must be 4-D (N, C,
H, W)'); the BN-folded QAT modules refuse it, as their float modules' BatchNorm2d does."""
import copy

import pytest
import torch

import gpuquant
import gpuquant.functional as GF
import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant.quantization import disable_observer, fuse_epilogues, quantize, quantize_qat

from tests.nn.nn_helpers import randomize_bn

BACKENDS = [b for b in backends.available() if "cpu" in backends.get_backend(b).DEVICES]


def _x(shape, dtype=torch.int8):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8])
def test_functional_conv2d_takes_unbatched_input(backend, xdtype):
    zp = -5 if xdtype == torch.int8 else 131
    x = _x((6, 11, 7), xdtype)
    w = torch.randint(-127, 128, (10, 3, 3, 3), dtype=torch.int8)
    b = torch.randint(-5000, 5000, (10,), dtype=torch.int32)
    rq = GF.make_requant(0.05, torch.rand(10) * 0.01 + 0.002, 0.3, 3, gpuquant.qint8)
    addp = GF.make_add_params(0.3, 3, 0.2, -7, 0.4, 1, gpuquant.qint8, "relu")
    conv = (zp, w, b, 2, 1, 1, 2, rq)
    with backends.use(backend):
        y = GF.conv2d(x, *conv)
        y1 = GF.conv2d(x[None], *conv)
        assert y.shape == (10, 6, 4) and torch.equal(y, y1[0])
        for res in (_x((10, 6, 4)), _x((6, 1))):  # the output's shape, and broadcast
            assert torch.equal(GF.conv2d_add(x, *conv, res, addp),
                               GF.conv2d_add(x[None], *conv, res[None], addp)[0])
        # a 4-D residual broadcasts the output to its batch, as torch's add would
        res4 = _x((2, 10, 6, 4))
        assert torch.equal(GF.conv2d_add(x, *conv, res4, addp),
                           GF.conv2d_add(x[None], *conv, res4, addp))
        yd = GF.conv2d_dequant(x, *conv, 0.3)
        assert yd.shape == (10, 6, 4)
        assert torch.equal(yd, GF.conv2d_dequant(x[None], *conv, 0.3)[0])
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\) or 3-D unbatched "
                                         r"\(C, H, W\), got shape \(11, 7\)"):
        GF.conv2d(x[0], *conv)


class Net(gnn.Module):
    """Convs (plain, ReLU, BN-folded) into a residual add and a last conv: the add and the
    DequantStub fuse into ConvAdd / ConvDequant under fuse_epilogues."""

    def __init__(self):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.c0 = gnn.ConvRelu2d(3, 6, 3, padding=1)
        self.c1 = gnn.Conv2d(6, 6, 3, padding=1)  # (a ConvBn2d refuses 3-D, as torch's BN)
        self.add = gnn.Elemwise("add")
        self.c2 = gnn.Conv2d(6, 5, 1)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        y = self.c0(self.quant(x))
        return self.dequant(self.c2(self.add(self.c1(y), y)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_model_takes_unbatched_input(backend):
    x = torch.randn(4, 3, 9, 7)
    qat = quantize_qat(randomize_bn(Net())).eval()
    qat(x)
    disable_observer(qat)
    q = quantize(copy.deepcopy(qat)).eval()
    fused = fuse_epilogues(copy.deepcopy(q))
    assert {type(m).__name__ for m in fused.modules()} >= {"ConvAdd", "ConvDequant"}
    x1 = torch.randn(3, 9, 7)
    y_qat = qat(x1)
    with backends.use(backend):
        y1 = q(x1[None])
        for model in (q, fused):
            y = model(x1)
            assert y.shape == y_qat.shape == (5, 9, 7) and y.is_contiguous()
            assert torch.equal(y, y1[0])
    # the QAT model's output, within the one output step the contract allows
    scale = float(q.c2.output_scale)
    assert torch.round((y - y_qat) / scale).abs().max() <= 1


def test_linear_ranks_follow_the_qat_modules():
    """Linear takes (..., in_features) as torch does, LinearBn1d (N, in_features) only, as
    its float and QAT forms: the int8 modules take and refuse the same ranks."""
    lin = torch.nn.Sequential(gnn.QuantStub(), gnn.LinearRelu(6, 4), gnn.DequantStub())
    bn = torch.nn.Sequential(gnn.QuantStub(), gnn.LinearBn1d(6, 4), gnn.DequantStub())
    qats = [quantize_qat(m).eval() for m in (lin, bn)]
    for m in qats:
        m(torch.randn(8, 6))
    q_lin, q_bn = (quantize(copy.deepcopy(m)).eval() for m in qats)
    x = torch.randn(2, 3, 6)
    for xs in (x[0, 0], x):
        assert q_lin(xs).shape == qats[0](xs).shape
        assert torch.equal(q_lin(xs), q_lin(xs.reshape(-1, 6)).reshape(*xs.shape[:-1], 4))
    for m in (qats[1], q_bn):
        for xs in (x[0, 0], x):
            with pytest.raises(ValueError, match=r"LinearBn1d takes \(N, in_features\) input"):
                m(xs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qat_conv_bn_refuses_unbatched_input_as_its_float_module(mode):
    """A BatchNorm2d takes 4-D input only: so do the float ConvBn2d and the QAT one, in
    training and in eval (the QAT layer used to run a 3-D input, normalising over the wrong
    dimension: wrong numbers without an error where H_out equals the channel count)."""
    f = gnn.ConvBnRelu2d(3, 6, 3, padding=1)
    qat = quantize_qat(torch.nn.Sequential(gnn.QuantStub(), copy.deepcopy(f),
                                           gnn.DequantStub()))
    x = torch.randn(3, 6, 6)
    for m in (f, qat):
        getattr(m, mode)()
        with pytest.raises(ValueError, match="expected 4D input"):
            m(x)
    assert getattr(qat, mode)()(x[None]).shape == (1, 6, 6, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pools_take_unbatched_input_in_qat_and_int8(backend):
    """The functional pools run an unbatched input as the batch of 1; a QAT model of pools
    on a 3-D input gives the int8 model's values exactly (the average pools' integer
    rounding included), as it does with the batch dimension."""
    x = _x((6, 9, 7))
    with backends.use(backend):
        for y, y1 in ((GF.max_pool2d(x, 3, 2, 1), GF.max_pool2d(x[None], 3, 2, 1)),
                      (GF.avg_pool2d(x, 3, 3, 2, 1, True), GF.avg_pool2d(x[None], 3, 3, 2, 1,
                                                                          True)),
                      (GF.adaptive_avg_pool2d(x, -2, (2, 3)),
                       GF.adaptive_avg_pool2d(x[None], -2, (2, 3)))):
            assert y.dim() == 3 and torch.equal(y, y1[0])
    net = torch.nn.Sequential(gnn.QuantStub(), gnn.MaxPool2d(2, ceil_mode=True),
                              gnn.AvgPool2d(3, 1, 1), gnn.AdaptiveAvgPool2d((2, 2)),
                              gnn.DequantStub())
    qat = quantize_qat(net).eval()
    qat(torch.randn(2, 4, 9, 7))
    disable_observer(qat)
    q = quantize(copy.deepcopy(qat)).eval()
    xf = torch.randn(4, 9, 7)
    with backends.use(backend):
        y = q(xf)
    assert y.shape == (4, 2, 2) and torch.equal(y, qat(xf))
    assert torch.equal(y, qat(xf[None])[0])
