"""Epilogue fusion (gpuquant.quantization.fuse_epilogues): which pairs fuse, same bytes as the
unfused model on the NumPy and reference backends, the fused integer front-ends and their
checks, unfuse / export / save. The Triton kernels of the fused ops are checked in
tests/backends/test_triton_inference*.py."""
import dataclasses

import pytest
import torch

import gpuquant
import gpuquant.functional as GF
import gpuquant.models as M
from gpuquant.backends import use
from gpuquant.nn import quantized as Q
from gpuquant.quantization import fuse_epilogues, unfuse_epilogues

from tests.nn.nn_helpers import FusionBlocks as Blocks, convert_calibrated as _convert


@pytest.mark.parametrize("qconfig", ["int8", "uint8"])
def test_fusion_pairs_and_bytes(qconfig):
    x = torch.randn(3, 3, 9, 7)
    q = _convert(Blocks(), x, qconfig)
    f = fuse_epilogues(q)
    assert sorted(f.fused) == sorted([("conv1", "add1"), ("dw", "add2"), ("fc1", "add4"),
                                      ("fc4", "dequant")])
    assert isinstance(f.add1, Q.ConvAdd) and f.add1.operand == 1 and f.add2.operand == 0
    assert isinstance(f.dequant, Q.ConvDequant)
    assert not hasattr(f, "conv1") and f.add1.producer is q.conv1  # moved, not copied
    assert isinstance(f.add3, Q.Elemwise) and isinstance(f.add5, Q.Elemwise)
    xs = torch.randn(4, 3, 9, 7) * 1.5
    for backend in ("numpy", "reference"):
        with use(backend), torch.no_grad():
            want, got = q(xs), f(xs)
        assert got.dtype == torch.float32 and torch.equal(got, want), backend
        assert want.abs().max() > 0


@pytest.mark.parametrize("name,in_ch,size,n_fused", [("resnet18", 3, 32, 9),
                                                     ("mobilenet_v2", 3, 32, 11),
                                                     ("digits_net", 1, 8, 2)])
def test_networks_fused_equal_unfused(name, in_ch, size, n_fused):
    x = torch.randn(4, in_ch, size, size)
    q = _convert(getattr(M, name)(num_classes=10), x)
    f = fuse_epilogues(q)
    assert len(f.fused) == n_fused
    xs = torch.randn(2, in_ch, size, size)
    with use("numpy"), torch.no_grad():
        assert torch.equal(f(xs), q(xs))


def test_fused_ops_compose_on_a_backend_without_kernels(monkeypatch):
    """The reference backend has no fused kernels: the front-end composes its base ops; the
    NumPy backend lists the compositions (the oracle of GPUQUANT_VERIFY)."""
    from gpuquant.backends import fused_op, get_backend
    assert fused_op("conv2d_add", "conv2d", torch.zeros(1)) is not None  # numpy's, auto
    with use("reference"):
        assert fused_op("conv2d_add", "conv2d", torch.zeros(1)) is None
    for name in ("conv2d_add", "linear_add", "conv2d_dequant", "linear_dequant"):
        assert name in get_backend("numpy").OPS


def _conv_case(dtype=torch.uint8, zp=7):
    x = torch.randint(0, 200, (2, 6, 9, 8), dtype=torch.int16).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (10, 6, 3, 3), dtype=torch.int8)
    b = torch.randint(-3000, 3000, (10,), dtype=torch.int32)
    rq = GF.make_requant(0.02, torch.rand(10) * 0.01 + 0.001, 0.1, 3, "qint8", "none")
    p = GF.make_add_params(0.1, 3, 0.07, -5, 0.15, 2, "qint8", "relu")
    res = torch.randint(-128, 128, (2, 10, 5, 4), dtype=torch.int8)
    return x, zp, w, b, (2, 2), (1, 1), (1, 1), 1, rq, res, p


@pytest.mark.parametrize("backend", ["numpy", "reference"])
def test_conv2d_add_and_dequant_frontends(backend):
    x, zp, w, b, st, pd, dl, g, rq, res, p = _conv_case()
    with use(backend):
        y = GF.conv2d(x, zp, w, b, st, pd, dl, g, rq)
        assert torch.equal(GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, res, p), GF.add(y, res, p))
        # a residual that broadcasts (one image, one row) composes: same bytes as add
        r1 = res[:1, :, :1]
        assert torch.equal(GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, r1, p), GF.add(y, r1, p))
        deq = GF.conv2d_dequant(x, zp, w, b, st, pd, dl, g, rq, 0.1)
        want = GF.dequantize(y, gpuquant.QParams("qint8", torch.tensor(0.1), torch.tensor(3)))
        assert deq.dtype == torch.float32 and torch.equal(deq, want)
        xl = torch.randint(-128, 128, (5, 3, 33), dtype=torch.int8)
        wl = torch.randint(-127, 128, (10, 33), dtype=torch.int8)
        resl = torch.randint(-128, 128, (5, 3, 10), dtype=torch.int8)
        yl = GF.linear(xl, -4, wl, b, rq)
        assert torch.equal(GF.linear_add(xl, -4, wl, b, rq, resl, p), GF.add(yl, resl, p))
        assert torch.equal(GF.linear_dequant(xl, -4, wl, b, rq, torch.tensor(0.1)),
                           (yl.float() - 3) * torch.tensor(0.1))


def test_fused_frontends_refuse_bad_input():
    x, zp, w, b, st, pd, dl, g, rq, res, p = _conv_case()
    with pytest.raises(TypeError, match="residual must be an int8 or uint8"):
        GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, res.float(), p)
    with pytest.raises(TypeError, match="add_params must be a gpuquant.functional.AddParams"):
        GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, res, rq)
    with pytest.raises(ValueError, match=r"output and residual shapes \(2, 10, 5, 4\) and "
                                         r"\(2, 10, 5, 3\) do not broadcast"):
        GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, res[..., :3], p)
    with pytest.raises(ValueError, match="residual zero point 300"):
        GF.conv2d_add(x, zp, w, b, st, pd, dl, g, rq, res,
                      dataclasses.replace(p, b_zero_point=300))
    with pytest.raises(TypeError, match="conv2d_add: weight must be a 4-D int8"):
        GF.conv2d_add(x, zp, w.float(), b, st, pd, dl, g, rq, res, p)
    with pytest.raises(ValueError, match="conv2d_dequant: scale must be positive and finite"):
        GF.conv2d_dequant(x, zp, w, b, st, pd, dl, g, rq, float("nan"))
    for bad in (1e300, 3.5e38, 1e-300, 1e-39, torch.tensor(1e300, dtype=torch.float64)):
        # not a float32 with a finite float32 reciprocal (QParams refuses the same)
        with pytest.raises(ValueError, match="conv2d_dequant: scale must be positive and finite"):
            GF.conv2d_dequant(x, zp, w, b, st, pd, dl, g, rq, bad)
    with pytest.raises(TypeError, match="linear_dequant: scale must be a float"):
        GF.linear_dequant(torch.zeros(2, 4, dtype=torch.int8), 0,
                          torch.zeros(3, 4, dtype=torch.int8), None, rq_pt(), "0.1")
    rq32 = GF.make_requant(0.02, 0.01, 0.1, 3, "qint32", "none")
    with pytest.raises(ValueError, match=r"linear_add: the linear's output \(rq.dtype qint32\) "
                                         r"must be 8-bit"):
        GF.linear_add(torch.zeros(2, 4, dtype=torch.int8), 0, torch.zeros(3, 4, dtype=torch.int8),
                      None, rq32, torch.zeros(2, 3, dtype=torch.int8), p)
    with pytest.raises(ValueError, match="linear_add: x has 5 features"):
        GF.linear_add(torch.zeros(2, 5, dtype=torch.int8), 0, torch.zeros(3, 4, dtype=torch.int8),
                      None, rq_pt(), torch.zeros(2, 3, dtype=torch.int8), p)


def rq_pt():
    return GF.make_requant(0.02, 0.01, 0.1, 3, "qint8", "none")


def test_fused_modules_check_their_parts():
    conv = Q.Conv2d(4, 4, 3)
    with pytest.raises(TypeError, match="add must be a quantized Elemwise"):
        Q.ConvAdd(conv, Q.Elemwise("mul"))
    with pytest.raises(TypeError, match="producer must be a quantized Conv2d or Linear"):
        Q.ConvAdd(Q.QuantStub(), Q.Elemwise("add"))
    with pytest.raises(ValueError, match="operand must be 0 or 1"):
        Q.ConvAdd(conv, Q.Elemwise("add"), 2)
    stub = Q.DequantStub()
    stub._set_qparams("input", gpuquant.QParams("qint8", torch.tensor(0.5), torch.tensor(0)))
    with pytest.raises(ValueError, match="input qparams differ"):
        Q.ConvDequant(conv, stub)


def test_fuse_refuses_bad_models():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fuse_epilogues("model")
    with pytest.raises(ValueError, match="holds no gpuquant.nn.quantized module"):
        fuse_epilogues(torch.nn.Linear(2, 2))
    x = torch.randn(2, 1, 8, 8)
    q = _convert(M.digits_net(num_classes=10), x)
    q.training = True
    with pytest.raises(ValueError, match="training mode"):
        fuse_epilogues(q)
    q.training = False
    h = q.conv3.register_forward_hook(lambda m, i, o: o)  # the fused graph would skip it
    with pytest.raises(ValueError, match=r"forward hooks or pre-hooks \(\['conv3'\]\)"):
        fuse_epilogues(q)
    h.remove()
    f = fuse_epilogues(q)
    import copy
    assert copy.deepcopy(f).fused == f.fused  # the documented attribute survives a copy


def test_unfuse_export_and_save(tmp_path):
    x = torch.randn(4, 3, 9, 7)
    q = _convert(Blocks(), x, "uint8")
    f = fuse_epilogues(q)
    u = unfuse_epilogues(f)
    called = [u.get_submodule(n.target) for n in u.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, (Q.ConvAdd, Q.ConvDequant)) for m in called)
    assert sum(isinstance(m, Q.Elemwise) for m in called) == 5
    xs = torch.randn(2, 3, 9, 7)
    with use("numpy"), torch.no_grad():
        assert torch.equal(u(xs), q(xs))
    with pytest.raises(TypeError, match="save the model before fusing"):
        gpuquant.save(f, tmp_path / "f.gq")
    pytest.importorskip("onnx")
    from gpuquant import runtime
    from gpuquant.export import to_onnx
    to_onnx(f, x[:1], tmp_path / "f.onnx")
    to_onnx(q, x[:1], tmp_path / "q.onnx")
    a = runtime.load(str(tmp_path / "f.onnx")).run(xs.numpy())
    b = runtime.load(str(tmp_path / "q.onnx")).run(xs.numpy())
    assert (a == b).all()


def test_verify_reports_fused_modules():
    """backends.verify hooks the fused modules (not leaves: they hold their two parts), named
    by the consumer's path as in the unfused model."""
    from gpuquant.backends import verify
    x = torch.randn(3, 3, 9, 7)
    f = fuse_epilogues(_convert(Blocks(), x))
    report = verify(f, x, backend="reference")
    names = [m.name for m in report.modules]
    assert report.ok and {"add1", "add2", "add4", "dequant"} <= set(names)
    kinds = {m.name: m.kind for m in report.modules}
    assert kinds["add1"] == "ConvAdd" and kinds["dequant"] == "ConvDequant"
    assert not any(n.endswith((".producer", ".add")) for n in names)


def test_quantized_convs_check_each_input_shape_once(monkeypatch):
    """A quantized conv module runs the functional op's checks of x against the layer once
    per input shape (its weights are constants): repeated calls skip them, with the same
    bytes; a new shape, a bad input, a bad residual or a weight assigned anew is checked."""
    import gpuquant.functional.integer as integer
    x = torch.randn(3, 3, 9, 7)
    q = _convert(Blocks(), x)
    f = fuse_epilogues(q)
    calls, lin = [], []
    real, real_lin = integer._conv_args, integer._linear_args
    monkeypatch.setattr(integer, "_conv_args", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(integer, "_linear_args", lambda *a: lin.append(a[0]) or real_lin(*a))
    xs = torch.randn(4, 3, 9, 7)
    with use("numpy"), torch.no_grad():
        first = f(xs)
        n, n_lin = len(calls), len(lin)
        assert n == 4 and calls.count("conv2d_add") == 2  # conv0, conv1 + add, dw + add, twice
        assert n_lin == 4 and "linear_add" in lin and "linear_dequant" in lin  # fc1 .. fc4
        assert torch.equal(f(xs), first)
        assert len(calls) == n and len(lin) == n_lin  # nothing checked again
        assert torch.equal(q(xs), first)  # q's conv1 / dw unfused: their "" epilogue is new
        assert len(calls) == n + 2
        f(torch.randn(2, 3, 5, 6))  # a new shape: checked
        assert len(calls) == n + 6
        conv0 = f.conv0
        with pytest.raises(ValueError, match="x has 4 channels"):
            conv0(torch.zeros(1, 4, 9, 7, dtype=torch.int8))
        good = torch.zeros(4, 8, 9, 7, dtype=torch.int8)
        p = f.add1.add.params(good.device, swap=f.add1.operand == 1)
        f.add1.producer.run(good, "add", good, p)  # cached for this shape now
        with pytest.raises(TypeError, match="residual must be an int8 or uint8"):
            f.add1.producer.run(good, "add", good.float(), p)
        conv0.weight = conv0.weight.float()  # a new tensor: a new key, checked
        with pytest.raises(TypeError, match="weight must be a 4-D int8"):
            f(xs)


def test_in_place_weight_edits_are_checked_again():
    """The accumulator-range bound (max |weight|) and the per-shape checks follow in-place
    edits of a quantized conv's weight: an edit that could overflow int32 is refused."""
    x = torch.randn(2, 3, 9, 7)
    q = _convert(Blocks(), x)
    conv = q.conv1
    xq = torch.zeros(2, 8, 9, 7, dtype=torch.int8)
    with use("numpy"), torch.no_grad():
        conv(xq)  # checked and cached for this shape
        big = 2 ** 31 // (127 * 8 * 9 + 1) + 1  # a bias near the int32 edge
        conv.bias.fill_(2 ** 31 - 1 - big)
        conv.weight.fill_(127)
        with pytest.raises(ValueError, match="overflow|int32|accumulator"):
            conv(xq)


def test_dequant_output_is_contiguous_nchw_fused_or_not():
    """The float result leaving the int8 network has the float / QAT models' layout, so
    float code after it (``y.view(y.size(0), -1)``) runs on the int8 model too."""
    import gpuquant.nn as gnn
    from gpuquant.quantization import fuse_epilogues, quantize, quantize_qat

    class Net(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.conv, self.dq = gnn.QuantStub(), gnn.Conv2d(3, 4, 3, padding=1), \
                gnn.DequantStub()

        def forward(self, x):
            y = self.dq(self.conv(self.q(x)))
            return y.view(y.size(0), -1)
    x = torch.randn(2, 3, 5, 5)
    qat = quantize_qat(Net().eval()).eval()
    with torch.no_grad():
        want = qat(x)
        q = quantize(qat)
        f = fuse_epilogues(q)
        for m in (q, f):
            with use("numpy"):
                y = m(x)
            assert y.shape == want.shape == (2, 100)
        with use("numpy"):
            assert torch.equal(q(x), f(x))


def test_quantized_module_constructors_check_their_arguments():
    with pytest.raises(ValueError, match=r"divisible by groups \(2\)"):
        Q.Conv2d(3, 8, 3, groups=2)
    with pytest.raises(ValueError, match="Conv2d: kernel height must be an int >= 1, got 0"):
        Q.Conv2d(3, 8, 0)
    with pytest.raises(ValueError, match="Concat: num_inputs must be an int >= 1, got -1"):
        Q.Concat(-1)
    with pytest.raises(ValueError, match="8-bit storage .* got qint32"):
        Q.QuantStub("qint32")


def test_quantized_conv_and_linear_constructors_take_torch_geometry():
    """torch's padding='same' / 'valid' are resolved as conversion does (the module kept
    ('same', 'same') and failed its first call); geometry and sizes that torch refuses are
    refused at construction, naming the value (Linear(0, 4) and Conv2d(stride=0) were
    built and failed at their first call)."""
    m = Q.Conv2d(4, 8, 3, padding="same", dilation=2)
    assert m.padding == (2, 2) and Q.Conv2d(4, 8, 3, padding="valid").padding == (0, 0)
    with use("numpy"):
        assert m(torch.zeros(1, 4, 6, 6, dtype=torch.int8)).shape == (1, 8, 6, 6)
    with pytest.raises(NotImplementedError, match="asymmetrically"):
        Q.Conv2d(4, 8, 4, padding="same")
    with pytest.raises(ValueError, match="Conv2d: stride must be an int >= 1, got 0"):
        Q.Conv2d(4, 8, 3, stride=0)
    with pytest.raises(ValueError, match="Conv2d: padding must be an int >= 0, got -1"):
        Q.Conv2d(4, 8, 3, padding=(1, -1))
    with pytest.raises(ValueError, match="Conv2d: dilation must be an int or a pair"):
        Q.Conv2d(4, 8, 3, dilation=(1, 1, 1))
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'valid' or 'same'"):
        Q.Conv2d(4, 8, 3, padding="full")
    with pytest.raises(ValueError, match="Linear: in_features must be an int >= 1, got 0"):
        Q.Linear(0, 4)
    with pytest.raises(TypeError, match="LinearRelu: out_features must be an int >= 1"):
        Q.LinearRelu(4, 2.5)


def test_quantized_modules_take_numpy_ints_and_list_geometry():
    """NumPy integers are ints to the constructors; a conv's padding assigned as a list
    after its first call is checked and run with the new geometry (the checked-state key
    must be hashable)."""
    import numpy as np
    m = Q.Conv2d(np.int64(4), np.int64(8), np.int64(3))
    assert Q.Concat(np.int64(2)).num_inputs == 2
    x = torch.zeros(1, 4, 6, 6, dtype=torch.int8)
    with use("numpy"):
        assert m(x).shape == (1, 8, 4, 4)
        m.padding = [1, 1]
        assert m(x).shape == (1, 8, 6, 6)
