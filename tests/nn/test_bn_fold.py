"""The two training forms of folded Conv+BN / Linear+BN (gpuquant.nn.qat.conv) and the
per-channel-epsilon batch normalisation behind the one-convolution form."""
import copy

import pytest
import torch

import gpuquant.nn as gnn
from gpuquant.nn.qat.bn_train import normalize, normalize_composite
from gpuquant.quantization import (disable_fake_quant, disable_observer, ema_fakequant_qconfig,
                                   quantize, quantize_qat, set_bn_fold)
from tests.nn.nn_helpers import Wrap, randomize_bn

SHAPES = [(7, 5), (3, 4, 9), (2, 6, 5, 7), (1, 3, 1, 2)]


def _inputs(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    z = (torch.randn(shape, generator=g) * 3 + torch.randn(c, generator=g).reshape(
        (1, c) + (1,) * (len(shape) - 2)) * 5)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z = z.to(dtype)
    w = torch.randn(c, generator=g)  # negative weights included
    b = torch.randn(c, generator=g)
    eps = torch.rand(c, generator=g) * 1e-2 + 1e-6
    return z, w, b, eps


def _grads(fn, z, w, b, eps, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (z, w, b, eps)]
    y, mean, var, n = fn(*leaves, torch.nn.BatchNorm2d(z.shape[1]))
    y.backward(gy)
    return y.detach(), mean, var, n, [t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_equals_its_composite_definition(shape, dtype):
    """The fused autograd function (one statistics pass, eval-form batch_norm, PyTorch's
    batch-norm backward with our inverse deviation) against the same formula in torch ops."""
    for channels_last in ([False, True] if len(shape) == 4 else [False]):
        z, w, b, eps = _inputs(shape, dtype, channels_last, seed=len(shape))
        gy = torch.randn(shape).to(dtype)
        y1, m1, v1, n1, g1 = _grads(normalize, z, w, b, eps, gy)
        y2, m2, v2, n2, g2 = _grads(normalize_composite, z, w, b, eps, gy)
        assert y1.dtype == z.dtype and y1.shape == z.shape and n1 == n2
        assert m1.dtype == v1.dtype == torch.float32
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y1.float(), y2.float(), **tol)
        for name, a, e in zip(("z", "weight", "bias", "eps"), g1, g2):
            torch.testing.assert_close(a.float(), e.float(), **tol, msg=name)


def test_normalize_eps_gradient_is_the_derivative():
    """d y / d eps against a central finite difference in float64 terms (float32 inputs)."""
    z, w, b, eps = _inputs((4, 3, 5, 5), torch.float32, False, seed=3)
    eps = eps * 100  # large enough for a clear difference
    gy = torch.randn(z.shape)
    *_, grads = _grads(normalize, z, w, b, eps, gy)
    h = 1e-3
    for c in range(3):
        d = torch.zeros(3)
        d[c] = h
        yp = normalize(z, w, b, eps + d, None)[0]
        ym = normalize(z, w, b, eps - d, None)[0]
        fd = float(((yp.double() - ym.double()) * gy.double()).sum() / (2 * h))
        assert abs(float(grads[3][c]) - fd) <= 1e-3 * max(1.0, abs(fd)), (c, fd)


def test_normalize_rejects_1d_input():
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.randn(5), torch.ones(5), torch.zeros(5), torch.ones(5), None)


def _float_off(q):
    disable_fake_quant(q)
    disable_observer(q)
    return q


def test_zero_gamma_channels_keep_their_gradient_in_the_single_form():
    """Residual blocks often start with gamma = 0 (zero-init): the single form must still
    give gamma the float BatchNorm's gradient (sum of grad * xhat), not 0."""
    torch.manual_seed(0)
    f = randomize_bn(gnn.ConvBn2d(4, 6, 3, padding=1))  # no ReLU: every channel has a gradient
    with torch.no_grad():
        f.bn.weight[:3] = 0.0
    ref = copy.deepcopy(f).train()
    q = _float_off(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False)).train()
    x = torch.randn(3, 4, 7, 6)
    g = torch.randn(3, 6, 7, 6)
    ref(x).backward(g)
    y = q(x)
    y.backward(g)
    torch.testing.assert_close(y, ref(x).detach(), rtol=1e-4, atol=1e-5)
    assert torch.all(ref.bn.weight.grad[:3] != 0)
    torch.testing.assert_close(q.bn.weight.grad, ref.bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make, shape", [(lambda: gnn.ConvBn2d(3, 4, 3, padding=1), (4, 3, 6, 5)),
                                         (lambda: gnn.LinearBn1d(6, 4), (5, 6))],
                         ids=["conv", "linear"])
def test_single_form_second_order_gradients_follow_torch(make, shape):
    """A gradient penalty (create_graph=True) through the single form, fake quant off, gives
    the float module's gradients. The first-order backward's statistics and inverse deviation
    were constants to autograd, so the second-order terms through eps, which carries gamma
    in the single fold (E = eps t^2), were dropped: gamma's gradient was 27% off at eps 0.1
    (75% for LinearBn1d), with no error."""
    torch.manual_seed(5)
    f = randomize_bn(make())
    f.bn.eps = float(torch.empty(()).uniform_(0.05, 0.2))
    ref = copy.deepcopy(f).train()
    q = _float_off(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False)).train()
    x0 = torch.randn(shape)
    got = []
    for m in (ref, q):
        x = x0.clone().requires_grad_(True)
        y = m(x)
        w = torch.linspace(-1, 1, y.numel()).reshape(y.shape) ** 3
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        inner = m.conv if hasattr(m, "conv") else m.linear
        got.append((gx.detach(), m.bn.weight.grad, m.bn.bias.grad, inner.weight.grad))
    for name, a, e in zip(("grad_x", "gamma", "beta", "weight"), got[1], got[0]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_form_running_statistics_follow_torch(momentum):
    """Several training steps (fake quant off): running statistics and num_batches_tracked as
    torch.nn.BatchNorm2d keeps them, including the cumulative average (momentum None)."""
    torch.manual_seed(2)
    f = randomize_bn(gnn.ConvBn2d(3, 5, 3, stride=2, bias=True))
    f.bn.momentum = momentum
    ref = copy.deepcopy(f).train()
    q = _float_off(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False)).train()
    for _ in range(4):
        x = torch.randn(4, 3, 9, 8) * 2 + 1
        with torch.no_grad():
            torch.testing.assert_close(q(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(q.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 4


def test_forms_agree_with_fake_quant_on_and_deploy_the_same_int8():
    """With fake quantization on the two forms see different batch statistics (the folded
    quantized convolution's vs the float one's) but stay close; after training either
    converts, and its int8 model agrees with its QAT eval output within one output step."""
    torch.manual_seed(4)
    f = Wrap(randomize_bn(gnn.ConvBnRelu2d(5, 8, 3, padding=1)))
    x = torch.randn(6, 5, 8, 8)
    outs = {}
    for mode in ("single", "exact"):
        q = set_bn_fold(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False),
                        mode).train()
        opt = torch.optim.SGD(q.parameters(), lr=1e-2)
        for i in range(3):
            opt.zero_grad()
            y = q(x)
            y.square().mean().backward()
            opt.step()
            if i == 0:
                outs[mode] = y.detach()
        q.eval()
        with torch.no_grad():
            y_qat = q(x)
        int8 = quantize(copy.deepcopy(q), inplace=False)
        step = float(q.m.get_activation_qparams().scale)
        assert float((y_qat - int8(x)).abs().max()) <= step * 1.001
    step = float(outs["single"].abs().max()) / 127
    assert float((outs["single"] - outs["exact"]).abs().max()) <= 4 * step


def test_set_bn_fold_checks_its_input_and_travels_in_state_dict():
    q = quantize_qat(gnn.ConvBn2d(3, 4, 3), ema_fakequant_qconfig, inplace=False)
    assert q.bn_fold == "single"
    with pytest.raises(ValueError, match="'fast'"):
        set_bn_fold(q, "fast")
    with pytest.raises(ValueError, match="bn_fold"):
        q.set_bn_fold("approx")
    with pytest.raises(TypeError, match="Module"):
        set_bn_fold("model", "exact")
    assert set_bn_fold(q, "exact") is q and q.bn_fold == "exact"
    r = quantize_qat(gnn.ConvBn2d(3, 4, 3), ema_fakequant_qconfig, inplace=False)
    r.load_state_dict(q.state_dict())
    assert r.bn_fold == "exact"
    state = q.state_dict()
    state["_extra_state"] = {"bn_frozen": False}  # a checkpoint from before bn_fold
    r.load_state_dict(state)
    assert r.bn_fold == "single"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_on_cuda_equals_its_composite_definition(dtype):
    """The CUDA statistics path (torch.batch_norm_stats) and the CUDA batch-norm kernels,
    channels_last and contiguous, against the composite formula on the same device."""
    for shape in SHAPES:
        for channels_last in ([False, True] if len(shape) == 4 else [False]):
            z, w, b, eps = (t.cuda() for t in _inputs(shape, dtype, channels_last, seed=5))
            gy = torch.randn(shape, device="cuda").to(dtype)
            y1, m1, v1, _, g1 = _grads(normalize, z, w, b, eps, gy)
            y2, m2, v2, _, g2 = _grads(normalize_composite, z, w, b, eps, gy)
            assert m1.dtype == v1.dtype == torch.float32 and y1.dtype == dtype
            torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else \
                dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(y1.float(), y2.float(), **tol)
            for name, a, e in zip(("z", "weight", "bias", "eps"), g1, g2):
                torch.testing.assert_close(a.float(), e.float(), **tol, msg=name)


@pytest.mark.parametrize("mode", ["single", "exact"])
def test_one_value_per_channel_in_training_is_refused(mode):
    """BatchNorm statistics of one value per channel are meaningless (torch raises too)."""
    conv = set_bn_fold(quantize_qat(gnn.ConvBn2d(3, 4, 1), ema_fakequant_qconfig,
                                    inplace=False), mode).train()
    with pytest.raises(ValueError, match="more than 1 value per channel.*1, 3, 1, 1"):
        conv(torch.randn(1, 3, 1, 1))
    lin = set_bn_fold(quantize_qat(gnn.LinearBn1d(3, 4), ema_fakequant_qconfig,
                                   inplace=False), mode).train()
    with pytest.raises(ValueError, match="LinearBn1d.*more than 1 value"):
        lin(torch.randn(1, 3))
    conv.eval()(torch.randn(1, 3, 1, 1))  # eval: running statistics, any batch


@pytest.mark.parametrize("cls", [gnn.ConvBn2d, gnn.ConvBnRelu2d, gnn.ConvBnRelu62d],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["single", "exact"])
def test_half_precision_model_trains_a_step(cls, dtype, mode):
    """A model cast to float16 / bfloat16 (no autocast) trains: the fold stays in the
    parameters' dtype (no float32 promotion), output in the input's dtype, finite loss and
    gradients in the parameters' dtype; with fake quant and observers off the output is the
    float module's to the dtype's rounding."""
    torch.manual_seed(11)
    f = randomize_bn(cls(3, 5, 3, padding=1, bias=True)).to(dtype).train()
    ref = copy.deepcopy(f)
    q = set_bn_fold(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False),
                    mode).train()
    x = (torch.randn(4, 3, 7, 9) * 2).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (4, 5, 7, 9)
    loss = y.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert torch.isfinite(p.grad).all(), name
    assert q.bn.running_mean.dtype == dtype and torch.isfinite(q.bn.running_var).all()
    off = _float_off(quantize_qat(copy.deepcopy(f), ema_fakequant_qconfig, inplace=False))
    y_off = set_bn_fold(off, mode).train()(x)
    assert y_off.dtype == dtype
    torch.testing.assert_close(y_off.float(), ref(x).float(), rtol=5e-2, atol=5e-2)


@pytest.fixture
def strict_batch_norm(monkeypatch):
    """torch 2.10 and 2.11's F.batch_norm (the GPU machines' torch): eps <= 0 is refused even
    in eval form (2.13, CI's, allows 0 there); our eps-0 normalisations must not go through it."""
    real = torch.nn.functional.batch_norm

    def strict(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return real(input, running_mean, running_var, weight, bias, training, momentum, eps)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", strict)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_normalisations_run_where_batch_norm_refuses_eps_zero(strict_batch_norm,
                                                                      backend):
    import gpuquant.backends as backends
    from gpuquant.backends.triton import bn_fold

    z, w, b, eps = _inputs((2, 6, 5, 7), torch.float32, False, seed=11)
    y, *_ = normalize(z, w, b, eps, torch.nn.BatchNorm2d(6))
    y2, *_ = normalize_composite(z, w, b, eps, torch.nn.BatchNorm2d(6))
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    with backends.use(backend):
        if backend == "triton":  # the fused local-statistics op itself (interpreter)
            bn = torch.nn.BatchNorm2d(6)
            t = torch.ones(6)
            out = bn_fold.bn_normalize_train(z, w, b, eps, t, bn)
            assert out is not None
            torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-4)
        torch.manual_seed(0)
        model = quantize_qat(Wrap(gnn.ConvBnRelu2d(3, 4, 3)), ema_fakequant_qconfig).train()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        assert model.m.conv.weight.grad is not None
