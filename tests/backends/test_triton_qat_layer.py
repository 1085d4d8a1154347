"""The training QAT Conv+BN(+act) layer as one autograd node (triton op conv_bn_act_train,
Triton interpreter on CPU) against the three-node form it replaces (the fold op, the
convolution, the batch-norm + activation op): the same kernels in the same order, so every
output byte, gradient, running statistic and observer state is equal, step after step."""
import copy

import pytest
import torch

import gpuquant.backends as backends
import gpuquant.backends.triton as tb
import gpuquant.nn as gnn
from gpuquant.backends.triton import qat_layer
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat

from tests.backends.test_triton_bn_fold import _randomize

DEV = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")

CASES = [  # (id, factory, input shape, channels_last, bf16 autocast, x needs grad)
    ("relu_bias_cl", lambda: gnn.ConvBnRelu2d(4, 6, 3, padding=1, bias=True), (3, 4, 7, 6),
     True, False, True),
    ("stride2_input_layer", lambda: gnn.ConvBn2d(5, 7, 3, stride=2), (2, 5, 9, 8), False,
     False, False),
    ("depthwise_relu6", lambda: gnn.ConvBnRelu62d(6, 6, 3, padding=1, groups=6), (2, 6, 5, 5),
     True, False, True),
    ("dilated_bf16_autocast", lambda: gnn.ConvBnRelu2d(4, 8, 3, padding=2, dilation=2),
     (2, 4, 6, 6), True, True, True),
]


def _step(model, x, g, autocast, one_node):
    saved = tb.OPS["conv_bn_act_train"]
    calls = []

    def spy(*a, **k):
        out = saved(*a, **k) if one_node else None
        calls.append(out is not None)
        return out
    tb.OPS["conv_bn_act_train"] = spy
    try:
        with backends.use("triton"), torch.autocast(DEV, dtype=torch.bfloat16,
                                                    enabled=autocast):
            y = model(x)
        y.backward(g if g is not None else torch.ones_like(y))
    finally:
        tb.OPS["conv_bn_act_train"] = saved
    assert calls == [one_node]
    return y


@pytest.mark.parametrize("name,factory,shape,cl,autocast,x_grad", CASES,
                         ids=[c[0] for c in CASES])
def test_one_node_layer_equals_the_three_node_form(name, factory, shape, cl, autocast, x_grad):
    torch.manual_seed(0)
    a = quantize_qat(_randomize(factory(), 1), qat_qconfig()).to(DEV).train()
    if cl:
        a = a.to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    for step in range(3):  # the first step sizes the weight observer's state
        x = torch.randn(shape, device=DEV) * (1 + step)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = (x.clone().requires_grad_(x_grad) for _ in range(2))
        for m in (a, b):
            m.zero_grad(set_to_none=True)
        g = torch.randn(x.shape[0], a.bn.num_features, *_out_hw(a.conv, x), device=DEV)
        ya = _step(a, xa, g.to(torch.bfloat16 if autocast else torch.float32), autocast, True)
        yb = _step(b, xb, g.to(ya.dtype), autocast, False)
        assert ya.dtype == yb.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert ya.stride() == yb.stride()
        assert torch.equal(ya, yb)
        if x_grad:
            assert xa.grad.dtype == x.dtype and torch.equal(xa.grad, xb.grad)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), n
        for (n, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
            assert torch.equal(p, q), n
        assert a.weight_observer.has_observed and a.act_observer.has_observed
    if a.conv.bias is not None:  # cancelled by the batch statistics: a zero gradient
        assert torch.equal(a.conv.bias.grad, torch.zeros_like(a.conv.bias))


def _out_hw(conv, x):
    return [(x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1)
             - 1) // conv.stride[i] + 1 for i in range(2)]


def _layer_args(m):
    return (m.conv, m.bn, m.weight_observer, m.weight_fake_quant, m.act_observer,
            m.act_fake_quant, m.activation, 1e-6, type(m).__name__)


def test_one_node_layer_declines_what_it_does_not_take():
    x = torch.randn(2, 4, 6, 6, device=DEV)
    ok = quantize_qat(gnn.ConvBnRelu2d(4, 6, 3, padding=1), qat_qconfig()).to(DEV).train()
    same = quantize_qat(gnn.ConvBnRelu2d(4, 6, 3, padding="same"), qat_qconfig()).to(DEV)
    no_affine = quantize_qat(gnn.ConvBnRelu2d(4, 6, 3), qat_qconfig()).to(DEV).train()
    no_affine.bn.affine = False
    lin = quantize_qat(gnn.LinearBnRelu1d(4, 6), qat_qconfig()).to(DEV).train()
    with backends.use("triton"):
        assert qat_layer.conv_bn_act_train(x, *_layer_args(ok)) is not None
        assert qat_layer.conv_bn_act_train(x, *_layer_args(same.train())) is None
        assert qat_layer.conv_bn_act_train(x, *_layer_args(no_affine)) is None
        assert qat_layer.conv_bn_act_train(x[0], *_layer_args(ok)) is None  # unbatched
        assert qat_layer.conv_bn_act_train(x.double(), *_layer_args(ok)) is None
        assert qat_layer.conv_bn_act_train(x, *_layer_args(ok)[:6], "gelu", 1e-6, "m") is None
        # the Linear+BN modules keep the two fused ops around F.linear
        y = lin(torch.randn(5, 4, device=DEV))
        assert y.shape == (5, 6)
        # autocast off and x's dtype not the weight's: the module's own error, not ours
        with pytest.raises(RuntimeError):
            ok(x.to(torch.bfloat16))
    if DEV == "cpu":  # the interpreter only when triton is chosen explicitly
        assert qat_layer.conv_bn_act_train(x, *_layer_args(ok)) is None


def test_one_node_layer_refuses_one_value_per_channel():
    m = quantize_qat(gnn.ConvBnRelu2d(3, 4, 3), qat_qconfig()).to(DEV).train()
    with backends.use("triton"), pytest.raises(ValueError, match="ConvBnRelu2d: expected more "
                                                                 "than 1 value per channel"):
        m(torch.randn(1, 3, 3, 3, device=DEV))
    # the refused batch left the activation observer unobserved, as the reference does
    assert not m.act_observer.has_observed and m.weight_observer.has_observed
    with pytest.raises(ValueError, match="has not observed"):
        m.get_activation_qparams()


@pytest.mark.parametrize("factory,shape", [
    (lambda: gnn.ConvBnRelu2d(3, 4, 3), (2, 3, 5, 5)),   # one node (conv_bn_act_train)
    (lambda: gnn.LinearBn1d(5, 4), (6, 5)),              # the fold and bn + act ops
])
def test_double_backward_through_fused_kernels_is_refused(factory, shape):
    """A second backward through the fused QAT kernels' gradients (not differentiable: a
    gradient penalty) raises a clear error instead of dropping their second-order terms
    silently (the reference backend computes them); a create_graph=True backward that
    never differentiates through them, and a plain one, run."""
    torch.manual_seed(0)
    m = quantize_qat(factory(), qat_qconfig()).to(DEV).train()
    x = torch.randn(*shape, device=DEV, requires_grad=True)
    with backends.use("triton"):
        m(x)
        y = m(x)
        (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
        assert torch.isfinite(gx).all()
        with pytest.raises(RuntimeError, match="double backward .*create_graph=True.*"
                                               r"backends.use\('reference'\)"):
            gx.pow(2).sum().backward()
        y = m(x)
        (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
        assert torch.isfinite(gx).all()


class _Stubbed(gnn.Module):
    """QuantStub -> ``layer`` (twice the input for an Elemwise) -> DequantStub."""

    def __init__(self, layer):
        super().__init__()
        self.q, self.m, self.dq = gnn.QuantStub(), layer, gnn.DequantStub()

    def forward(self, x):
        x = self.q(x)
        return self.dq(self.m(x, x) if isinstance(self.m, gnn.Elemwise) else self.m(x))


@pytest.mark.parametrize("layer,fake_quant", [
    (lambda: gnn.ConvBnRelu2d(3, 4, 3), True),   # the one-node layer, the stub's fake quant
    (lambda: gnn.ConvBnRelu2d(3, 4, 3), False),  # the batch-norm normalisation kernel alone
    (lambda: gnn.Conv2d(3, 4, 3), True),         # weight observe + fake quant
    (lambda: gnn.Elemwise("mul"), True),         # observe + fake quant of an activation
], ids=["convbn", "convbn-fq-off", "conv", "mul"])
def test_double_backward_through_any_triton_qat_kernel_names_the_way_out(layer, fake_quant):
    """Every Triton QAT kernel's backward (fake quant, LSQ / TQT, the observers', the
    batch-norm ones) refuses a second backward with gpuquant's message: a model's QuantStub
    (plain fake quant) gave torch's generic once_differentiable error, and with fake quant
    off the batch-norm normalisation's kernel gave a wrong gamma gradient silently."""
    from gpuquant.quantization import disable_fake_quant, disable_observer
    torch.manual_seed(1)
    m = quantize_qat(_Stubbed(layer()), qat_qconfig()).to(DEV).train()
    if not fake_quant:
        disable_fake_quant(m)
        disable_observer(m)
    x = torch.randn(2, 3, 5, 5, device=DEV, requires_grad=True)
    with backends.use("triton"):
        m(x)
        y = m(x)
        (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=r"double backward .*create_graph=True.*"
                                               r"backends.use\('reference'\)"):
            gx.pow(2).sum().backward()


def test_one_node_layer_casts_neither_the_weight_nor_its_gradient(monkeypatch):
    """Under bf16 autocast the fold kernel writes the folded weight in bf16 (no cast launch
    after it) and its backward takes the convolution's bf16 weight gradient as it is (no
    cast to float32 before it): each cast was a launch and an allocation a layer a step."""
    seen = []
    fwd, bwd = qat_layer.fold_forward, qat_layer.fold_backward

    def fold_forward(*a, **k):
        out = fwd(*a, **k)
        seen.append(("weight", out[0].dtype))
        return out

    def fold_backward(gwf, *a, **k):
        seen.append(("grad", gwf.dtype))
        return bwd(gwf, *a, **k)
    monkeypatch.setattr(qat_layer, "fold_forward", fold_forward)
    monkeypatch.setattr(qat_layer, "fold_backward", fold_backward)
    casts = []
    real_to = torch.Tensor.to

    def to(self, *a, **k):  # the layer's parameter-sized casts (x is cast once, it is 4-d)
        if self.dim() == 4 and self.shape[1:] == (4, 3, 3):
            casts.append(self.dtype)
        return real_to(self, *a, **k)
    torch.manual_seed(0)
    m = quantize_qat(_randomize(gnn.ConvBnRelu2d(4, 8, 3, padding=1), 1),
                     qat_qconfig()).to(DEV).train()
    x = torch.randn(2, 4, 6, 6, device=DEV)
    _step(m, x, None, True, True)  # observers start
    seen.clear()
    monkeypatch.setattr(torch.Tensor, "to", to)
    _step(m, x, None, True, True)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert seen == [("weight", torch.bfloat16), ("grad", torch.bfloat16)]
    assert casts == []
