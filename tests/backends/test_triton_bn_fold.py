"""The fused BN fold of QAT Conv+BN / Linear+BN (triton ops bn_fold_weight and
bn_normalize_train, Triton interpreter on CPU) against the definitions in torch ops
(gpuquant.nn.qat.bn_train): outputs, every gradient and the running statistics agree to
float32 rounding, and the fused ops really run."""
import copy

import pytest
import torch

import gpuquant.backends as backends
import gpuquant.backends.triton as tb
import gpuquant.nn as gnn
from gpuquant.backends.triton import bn_fold
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")

CASES = [  # (name, factory, input shape, channels_last, momentum)
    ("convbnrelu_bias_cl", lambda: gnn.ConvBnRelu2d(4, 6, 3, padding=1, bias=True),
     (3, 4, 7, 6), True, 0.1),
    ("convbn_stride2", lambda: gnn.ConvBn2d(5, 7, 3, stride=2), (2, 5, 9, 8), False, 0.1),
    ("depthwise_cumulative", lambda: gnn.ConvBnRelu62d(6, 6, 3, padding=1, groups=6),
     (2, 6, 5, 5), True, None),
    ("linearbn", lambda: gnn.LinearBn1d(9, 5), (11, 9), False, 0.3),
    ("linearbnrelu_bias", lambda: gnn.LinearBnRelu1d(7, 4, bias=True), (6, 7), False, 0.1),
]


@pytest.fixture
def spies(monkeypatch):
    calls = []

    def spy(name):
        fn = tb.OPS[name]

        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls.append((name, out is not None))
            return out
        monkeypatch.setitem(tb.OPS, name, wrapped)
    spy("bn_fold_weight")
    spy("bn_fold_observe_fake_quant")
    spy("bn_normalize_train")
    return calls


def _randomize(f, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn = f.bn
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.weight[0] = 0.0           # zero-init gamma: the gradient must still flow
        bn.weight[1] = -3e-7         # below the clamp: folded with 1e-6
        bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
        bn.bias[0] = 0.5             # gamma = 0 outputs beta: above 0, a ReLU passes it
    return f


@pytest.mark.parametrize("name,factory,shape,cl,momentum", CASES, ids=[c[0] for c in CASES])
def test_fused_bn_fold_equals_the_definition(spies, name, factory, shape, cl, momentum):
    torch.manual_seed(0)
    f = _randomize(factory(), 1)
    f.bn.momentum = momentum
    fused = quantize_qat(copy.deepcopy(f), qat_qconfig()).to(DEV).train()
    ref = copy.deepcopy(fused)
    if cl:
        fused = fused.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    for step in range(2):
        x = torch.randn(shape, device=DEV) * (1 + step)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for m in (fused, ref):
            m.zero_grad()
        with backends.use("triton"):
            y = fused(x)
            g = torch.randn(y.shape, device=DEV)
            y.backward(g)
        with backends.use("reference"):
            yr = ref(x)
            yr.backward(g)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
        for n in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(fused.bn, n), getattr(ref.bn, n),
                                       rtol=1e-5, atol=1e-6, msg=n)
        assert int(fused.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)
    assert fused.bn.weight.grad[0] != 0  # gamma = 0 still learns
    ran = [c for c in spies if c[1]]
    assert {n for n, _ in ran} == {"bn_fold_observe_fake_quant", "bn_normalize_train"}


def test_fused_bn_fold_under_bf16_autocast(spies):
    """bf16 convolution output (mixed dtypes in the statistics, the normalisation and its
    backward): close to the definition at bf16 precision, running statistics in float32."""
    torch.manual_seed(3)
    f = _randomize(gnn.ConvBnRelu2d(4, 8, 3, padding=1), 2)
    fused = quantize_qat(copy.deepcopy(f), qat_qconfig()).to(DEV).train()
    fused = fused.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(fused)
    x = torch.randn(2, 4, 6, 6, device=DEV).contiguous(memory_format=torch.channels_last)
    outs = []
    for m, be in ((fused, "triton"), (ref, "reference")):
        with backends.use(be), torch.autocast(DEV, dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append(y.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2, msg=n)
    assert fused.bn.running_var.dtype == torch.float32
    torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var, rtol=1e-3, atol=1e-4)
    assert {n for n, ok in spies if ok} == {"bn_fold_observe_fake_quant", "bn_normalize_train"}


def test_fused_ops_decline_what_they_do_not_take():
    w = torch.randn(4, 3, 3, 3, device=DEV)
    gamma, rv = torch.randn(4, device=DEV), torch.rand(4, device=DEV) + 0.5
    with backends.use("triton"):
        # output-channel rows not contiguous, a float64 weight
        assert bn_fold.bn_fold_weight(w.permute(1, 0, 2, 3), gamma, rv, 1e-5, 1e-6) is None
        assert bn_fold.bn_fold_weight(w.double(), gamma, rv, 1e-5, 1e-6) is None
        assert bn_fold.bn_fold_weight(w, gamma, rv, 1e-5, 1e-6) is not None
    if DEV == "cpu":  # the interpreter only when triton is chosen explicitly
        with backends.use("reference"):
            assert bn_fold.bn_fold_weight(w, gamma, rv, 1e-5, 1e-6) is None


# ------------------------------------------------------- fold + observe + fake quant, fused
def _weight_quantizers(kind):
    from gpuquant import qint8_narrow, quint8
    from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize,
                                       MinMaxObserver)
    if kind == "minmax":
        obs = MinMaxObserver(qint8_narrow, symmetric=True, axis=0, check_finite=False)
        return obs, FakeQuantize(qint8_narrow)
    obs = ExponentialMovingAverageObserver(0.7, quint8, symmetric=False, axis=0,
                                           check_finite=False)
    return obs, FakeQuantize(quint8)


@pytest.mark.parametrize("kind", ["minmax", "ema_affine"])
@pytest.mark.parametrize("shape,cl", [((6, 5, 3, 3), True), ((5, 1500), False),
                                      ((3, 2, 1, 1), False)], ids=["conv_cl", "long_row", "tiny"])
def test_fused_fold_observe_fake_quant_equals_the_unfused_kernels(kind, shape, cl):
    """One launch (fold, per-channel observe, fake quant) and one backward launch give the
    bytes of the three-launch path (bn_fold_weight, observe_fake_quant) and its gradients:
    output, observer state, non-finite batch count, grad w and grad gamma, over steps that
    include a NaN row, gamma 0 / below the clamp, and a frozen (disabled) observer."""
    from gpuquant.backends.triton import observer as tobs
    g = torch.Generator().manual_seed(7)
    C = shape[0]
    w0 = torch.randn(shape, generator=g).to(DEV)
    if cl:
        w0 = w0.contiguous(memory_format=torch.channels_last)
    gamma0 = torch.randn(C, generator=g).to(DEV)
    gamma0[0], gamma0[1 % C] = 0.0, -3e-7
    rv = (torch.rand(C, generator=g) + 0.5).to(DEV)
    pairs = [_weight_quantizers(kind) for _ in range(2)]
    for o, f in pairs:
        o.to(DEV), f.to(DEV)
    for step in range(4):
        if step == 3:
            for o, _ in pairs:
                o.disable()
        w_in = (w0 * (1 + 0.5 * step)).clone()
        if step == 1:
            w_in[(C - 1,) + (0,) * (w_in.dim() - 1)] = float("nan")  # a non-finite row
        outs = []
        for fused, (obs, fq) in zip((True, False), pairs):
            w = w_in.clone().requires_grad_(True)
            gamma = gamma0.clone().requires_grad_(True)
            with backends.use("triton"):
                if fused:
                    out = bn_fold.bn_fold_observe_fake_quant(w, gamma, rv, 1e-5, 1e-6, obs, fq)
                    assert out is not None
                    wq, t, W, E = out
                else:
                    wf, t, W, E = bn_fold.bn_fold_weight(w, gamma, rv, 1e-5, 1e-6)
                    if obs.enabled:
                        wq = tobs.observe_fake_quant(wf, obs, fq)
                        assert wq is not None
                    else:
                        wq = fq(wf, obs.get_qparams())
                gq = torch.randn(wq.shape, generator=torch.Generator().manual_seed(step)).to(DEV)
                (wq * gq).sum().backward(retain_graph=True)
                (W.sum() + E.sum()).backward()
            outs.append((wq.detach(), t, W.detach(), E.detach(), w.grad, gamma.grad,
                         obs.min_val.clone(), obs.max_val.clone(), int(obs.nonfinite_batches)))
        names = ("wq", "t", "W", "E", "grad_w", "grad_gamma", "min_val", "max_val")
        for n, a, b in zip(names, outs[0], outs[1]):
            assert torch.equal(torch.nan_to_num(a, 9.0), torch.nan_to_num(b, 9.0)), (n, step)
            assert torch.equal(a.isnan(), b.isnan()), (n, step)
        assert outs[0][-1] == outs[1][-1] == (1 if step >= 1 else 0)
        assert outs[0][0].stride() == w_in.stride()
    assert torch.equal(bn_fold._ticket(pairs[0][0]).cpu(), torch.zeros(2, dtype=torch.int32))


def test_fused_fold_observe_fake_quant_declines_what_it_does_not_take():
    from gpuquant import qint8
    from gpuquant.quantization import FakeQuantize, HistogramObserver, MinMaxObserver
    w = torch.randn(4, 3, 3, 3, device=DEV)
    gamma, rv = torch.randn(4, device=DEV), torch.rand(4, device=DEV) + 0.5
    op = bn_fold.bn_fold_observe_fake_quant
    with backends.use("triton"):
        fq = FakeQuantize(qint8).to(DEV)
        for obs in (MinMaxObserver(qint8, axis=0),  # check_finite: a host read
                    MinMaxObserver(qint8, check_finite=False),  # per tensor
                    MinMaxObserver(qint8, axis=1, check_finite=False),
                    HistogramObserver(qint8)):
            assert op(w, gamma, rv, 1e-5, 1e-6, obs.to(DEV), fq) is None
        fresh = MinMaxObserver(qint8, axis=0, check_finite=False).to(DEV).disable()
        assert op(w, gamma, rv, 1e-5, 1e-6, fresh, fq) is None  # nothing observed yet
        obs = MinMaxObserver(qint8, axis=0, check_finite=False).to(DEV)
        assert op(w, gamma, rv, 1e-5, 1e-6, obs, fq.disable()) is None
        assert op(w, gamma, rv, 1e-5, 1e-6, obs, None) is None
        assert op(w.double(), gamma, rv, 1e-5, 1e-6, obs, fq.enable()) is None
        assert op(w, gamma, rv, 1e-5, 1e-6, obs, fq) is not None
