"""``Activation``: the integer table lookup (``gpuquant.functional.lookup``) on every backend,
the table against its definition, the modules' arguments, QAT gradients, and a network of
activations run int8 on every backend byte for byte."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import gpuquant
import gpuquant.backends as backends
import gpuquant.nn as gnn
from gpuquant import QParams, qint8, quint4, quint8
from gpuquant.functional import lookup
from gpuquant.nn.activation import ACTIVATION_KINDS, activation_fn
from gpuquant.nn.quantized.activation import activation_table
from gpuquant.quantization import quantize, quantize_qat

from tests.int8_vs_qat import capture, check_modules
from tests.nn.nn_helpers import QCONFIGS

CL = torch.channels_last
BACKENDS = [b for b in ("reference", "numpy", "triton") if b in backends.available()]


def _rand_codes(shape, dtype, g):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("xdt", [torch.int8, torch.uint8])
@pytest.mark.parametrize("tdt", [torch.int8, torch.uint8])
@pytest.mark.parametrize("shape,layout", [((2, 5, 3, 7), "cl"), ((2, 5, 3, 7), "nchw"),
                                          ((3, 1, 1, 1), "cl"), ((33, 17), "rows"),
                                          ((1031,), "flat"), ((), "scalar"), ((0, 4), "empty"),
                                          ((2, 6, 4, 5), "strided")])
def test_lookup_every_backend_is_the_plain_index(xdt, tdt, shape, layout):
    g = torch.Generator().manual_seed(zlib.crc32(repr((xdt, tdt, shape, layout)).encode()))
    x = _rand_codes(shape, xdt, g)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = x[:, ::2, :, 1:]
    table = _rand_codes((256,), tdt, g)
    off = 128 if xdt == torch.int8 else 0
    # every code of the dtype appears: the table's two ends included
    if x.numel() >= 256 and x.is_contiguous():
        x.view(-1)[:256] = (torch.arange(256) - off).to(xdt)
    want = table[x.to(torch.int64) + off]
    for b in BACKENDS:
        with backends.use(b):
            got = lookup(x, table)
        assert got.dtype == tdt and got.shape == x.shape, b
        assert torch.equal(got, want), b
        if x.dim() == 4:  # quantized activations live channels_last
            assert got.is_contiguous(memory_format=CL), b


def test_lookup_refuses_bad_input():
    x = torch.zeros(2, 3, dtype=torch.int8)
    t = torch.zeros(256, dtype=torch.int8)
    with pytest.raises(TypeError, match="x must be an int8 or uint8"):
        lookup(x.float(), t)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lookup([1, 2], t)
    with pytest.raises(TypeError, match="table must be an int8 or uint8 tensor of the 256"):
        lookup(x, t.to(torch.int32))
    with pytest.raises(ValueError, match=r"256 entries.*\(255,\)"):
        lookup(x, t[:255])
    with pytest.raises(ValueError, match=r"256 entries.*\(16, 16\)"):
        lookup(x, t.reshape(16, 16))
    with pytest.raises(ValueError, match="device"):
        lookup(x, t.to("meta"))


def _plain_table(kind, slope, qp_in, qp_out):
    """The table's definition written out: x = float32(q - zp) * s; f in float32; then
    clamp(rne(f(x) * float32(1 / s_out)) + zp_out, qmin, qmax)."""
    lo = -128 if qp_in.dtype.storage == torch.int8 else 0
    s_in, zp_in = float(qp_in.scale), int(qp_in.zero_point)
    inv = torch.tensor(1.0, dtype=torch.float32) / qp_out.scale.float()
    out = []
    f = activation_fn(kind, slope)
    for q in range(lo, lo + 256):
        x = torch.tensor(float(q - zp_in), dtype=torch.float32) * torch.tensor(s_in)
        y = f(x.reshape(1))[0]
        r = torch.round(y * inv)  # torch.round: half to even
        v = int(r) + int(qp_out.zero_point) if math.isfinite(float(r)) else \
            (qp_out.dtype.qmax if float(r) > 0 else qp_out.dtype.qmin)
        out.append(min(max(v, qp_out.dtype.qmin), qp_out.dtype.qmax))
    return torch.tensor(out, dtype=qp_out.dtype.storage)


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_table_is_its_definition(kind):
    g = torch.Generator().manual_seed(len(kind))
    for qp_in, qp_out in ((QParams(qint8, 0.07, 3), QParams(qint8, 0.011, -5)),
                          (QParams(quint8, 0.031, 131), QParams(quint8, 0.02, 17)),
                          (QParams(quint4, 0.5, 7), QParams(qint8, 0.05, 0))):
        s = float(torch.rand((), generator=g)) * 0.5 + 0.01
        qp_in = QParams(qp_in.dtype, qp_in.scale * (1 + s), qp_in.zero_point)
        t = activation_table(kind, qp_in, qp_out, 0.2)
        assert t.shape == (256,) and t.dtype == qp_out.dtype.storage
        assert torch.equal(t, _plain_table(kind, 0.2, qp_in, qp_out)), (kind, qp_in, qp_out)


def test_modules_refuse_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        gnn.Activation("swish")
    with pytest.raises(ValueError, match="kind must be one of"):
        gnn.quantized.Activation("relu")
    with pytest.raises(TypeError, match="kind must be a str"):
        gnn.Activation(3)
    with pytest.raises(TypeError, match="kind must be a str"):
        gnn.quantized.Activation(["silu"])
    with pytest.raises(TypeError, match="activation_fn: kind must be a str"):
        activation_fn(["silu"])
    with pytest.raises(TypeError, match="activation_fn: negative_slope must be a float"):
        activation_fn("silu", "x")
    with pytest.raises(ValueError, match="activation_fn: negative_slope must be finite"):
        activation_fn("leaky_relu", float("nan"))
    with pytest.raises(ValueError, match="input_dtype must be stored in 8 bits"):
        gnn.quantized.Upsample(input_dtype="qint32", size=2)
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        gnn.Activation("leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        gnn.Activation("leaky_relu", negative_slope=float("nan"))
    with pytest.raises(ValueError, match="stored in 8 bits"):
        gnn.quantized.Activation("silu", output_dtype="qint32")
    with pytest.raises(TypeError, match="input_qparams must be a gpuquant.QParams"):
        activation_table("silu", 0.1, QParams(qint8, 0.1, 0))
    with pytest.raises(ValueError, match="per-tensor 8-bit"):
        activation_table("silu", QParams(qint8, torch.tensor([0.1, 0.2]),
                                                   torch.zeros(2, dtype=torch.int32), 0),
                         QParams(qint8, 0.1, 0))
    m = gnn.quantized.Activation("tanh")
    with pytest.raises(TypeError, match="put a gpuquant.nn.QuantStub first"):
        m(torch.randn(3))


def test_float_module_is_the_torch_function():
    x = torch.randn(4, 9) * 4
    want = {"silu": F.silu(x), "hardswish": F.hardswish(x), "hardsigmoid": F.hardsigmoid(x),
            "sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x), "gelu": F.gelu(x),
            "gelu_tanh": F.gelu(x, approximate="tanh"), "mish": F.mish(x), "elu": F.elu(x),
            "softplus": F.softplus(x), "leaky_relu": F.leaky_relu(x, 0.01)}
    assert set(want) == set(ACTIVATION_KINDS)
    for kind, y in want.items():
        assert torch.equal(gnn.Activation(kind)(x), y), kind
    assert torch.equal(gnn.Activation("leaky_relu", 0.3)(x), F.leaky_relu(x, 0.3))
    assert "negative_slope=0.3" in repr(gnn.Activation("leaky_relu", 0.3))


class _Net(gnn.Module):
    """conv -> silu -> conv -> hardswish, a squeeze-and-excitation gate (hardsigmoid times
    the features), tanh, then a linear: every activation fed by a quantized op."""

    def __init__(self):
        super().__init__()
        self.q = gnn.QuantStub()
        self.c1 = gnn.ConvBn2d(3, 12, 3, padding=1)
        self.a1 = gnn.Activation("silu")
        self.c2 = gnn.ConvBn2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.a2 = gnn.Activation("hardswish")
        self.pool = gnn.AdaptiveAvgPool2d(1)
        self.se = gnn.Conv2d(12, 12, 1)
        self.gate = gnn.Activation("hardsigmoid")
        self.mul = gnn.Elemwise("mul")
        self.a3 = gnn.Activation("tanh")
        self.fc = gnn.Linear(12 * 4 * 5, 7)
        self.a4 = gnn.Activation("leaky_relu", 0.1)
        self.dq = gnn.DequantStub()

    def forward(self, x):
        y = self.a2(self.c2(self.a1(self.c1(self.q(x)))))
        y = self.a3(self.mul(y, self.gate(self.se(self.pool(y)))))
        return self.dq(self.a4(self.fc(y.flatten(1))))


@pytest.mark.parametrize("qc", ["int8", "uint8"])
def test_network_trains_and_runs_int8_on_every_backend(qc):
    torch.manual_seed(0)
    model = _Net()
    qat = quantize_qat(model, QCONFIGS[qc])
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 10)
    target = torch.randn(4, 7)
    for _ in range(4):
        loss = F.mse_loss(qat(x), target)
        opt.zero_grad()
        loss.backward()
        # the activations pass gradients (no zeroed branch through the tables' modules)
        assert float(qat.c1.conv.weight.grad.abs().sum()) > 0
        assert float(qat.se.weight.grad.abs().sum()) > 0
        opt.step()
    qat.eval()
    y_qat, cap = capture(qat, x)
    int8 = quantize(qat, inplace=False)
    # module by module, each int8 module on its QAT module's quantized inputs: within one
    # step, and the tables identical to QAT on every element
    check_modules(dict(qat.named_modules()), int8, cap)
    for name in ("a1", "a2", "gate", "a3", "a4"):
        inp, out = cap[name]
        qp_in = getattr(qat, name).input_qparams(name)[0]
        got = getattr(int8, name)(gpuquant.functional.quantize(inp[0], qp_in))
        want = gpuquant.functional.quantize(out, getattr(qat, name).get_activation_qparams())
        assert torch.equal(got, want.contiguous(memory_format=CL) if got.dim() == 4 else want), name
    outs = {}
    for b in BACKENDS:
        with backends.use(b):
            outs[b] = int8(x)
    first = outs[BACKENDS[0]]
    for b, y in outs.items():
        assert torch.equal(y, first), b
    scale = float(qat.a4.get_activation_qparams().scale)
    d = ((first - y_qat) / scale).round().abs()
    # end to end the layers' 1-step gaps may stack (measured: 1 step int8, 2 uint8; 93%
    # of the outputs identical)
    assert float(d.max()) <= 2
    assert float((d == 0).float().mean()) >= 0.8


def test_qat_gradient_is_the_float_functions_inside_the_range():
    """Fake quant and observers off, QAT == float, gradients included; on, the input
    gradient is f'(x_fq) where the output stays inside its quantization range."""
    from gpuquant.quantization import disable_fake_quant, disable_observer
    torch.manual_seed(1)
    for kind in ("silu", "gelu", "tanh"):
        model = torch.nn.Sequential(gnn.QuantStub(), gnn.Activation(kind), gnn.DequantStub())
        qat = quantize_qat(model, inplace=False)
        x = torch.randn(64) * 2
        qat(x)
        disable_fake_quant(qat)
        disable_observer(qat)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        qat(xa).sum().backward()
        activation_fn(kind)(xb).sum().backward()
        assert torch.equal(xa.grad, xb.grad), kind


def test_changing_kind_or_slope_rebuilds_the_table():
    """The int8 module's table follows ``kind`` and ``negative_slope`` (it was cached on the
    qparam buffers only: a changed slope kept serving the old table)."""
    m = gnn.quantized.Activation("leaky_relu", 0.1)
    m._set_qparams("input", QParams(qint8, 0.05, 0))
    m._set_qparams("output", QParams(qint8, 0.05, 0))
    x = torch.arange(-128, 128, dtype=torch.int8)
    y1 = m(x)
    m.negative_slope = 0.5
    y2 = m(x)
    assert not torch.equal(y1, y2)
    assert torch.equal(y2, lookup(x, activation_table("leaky_relu", QParams(qint8, 0.05, 0),
                                                      QParams(qint8, 0.05, 0), 0.5)))
    m.kind = "tanh"
    assert torch.equal(m(x), lookup(x, activation_table("tanh", QParams(qint8, 0.05, 0),
                                                        QParams(qint8, 0.05, 0))))


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_bf16_autocast_qat_equals_the_table(kind):
    """Under bf16 autocast the producer's fake-quantized output is bfloat16 (the grid value
    rounded to 8 bits): QAT computes f in float32 on the grid value it stands for, so the
    int8 table gives QAT's codes on every element (f in bfloat16 put 2-6% one step off)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(gnn.QuantStub(), gnn.Conv2d(3, 8, 3, padding=1),
                            gnn.Activation(kind, 0.1), gnn.DequantStub())
    qat = quantize_qat(m)
    x = torch.randn(4, 3, 8, 8) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qat(x).float().sum().backward()  # trains: the straight-through gradient reaches x
        assert qat[1].weight.grad is not None and torch.isfinite(qat[1].weight.grad).all()
    qat.eval()
    cap = {}
    h = qat[2].register_forward_hook(lambda mod, i, o: cap.__setitem__("a", (i[0], o)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        qat(x)
    h.remove()
    inp, out = cap["a"]
    assert inp.dtype == torch.bfloat16
    int8 = quantize(qat, inplace=False)
    got = int8[2](gpuquant.functional.quantize(inp.float(), qat[2].input_qparams()[0]))
    want = gpuquant.functional.quantize(out.float(), qat[2].get_activation_qparams())
    assert torch.equal(got, want)
