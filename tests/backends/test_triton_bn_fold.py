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
    assert {n for n, _ in ran} == {"bn_fold_weight", "bn_normalize_train"}


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
    assert {n for n, ok in spies if ok} == {"bn_fold_weight", "bn_normalize_train"}


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
