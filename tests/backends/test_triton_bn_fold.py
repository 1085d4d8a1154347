"""The fused BN fold of QAT Conv+BN / Linear+BN (triton ops bn_fold_weight and
bn_normalize_train, Triton interpreter on CPU) against the definitions in torch ops
(gpuquant.nn.qat.bn_train): outputs, every gradient and the running statistics agree to
float32 rounding, and the fused ops really run."""
import copy

import pytest
import torch

import gpuquant.backends as backends
import gpuquant.backends.triton as tb
import triton
import triton.language as tl
import gpuquant.nn as gnn
from gpuquant.backends.triton import bn_act as _bn_act
from gpuquant.backends.triton import bn_fold
from gpuquant.backends.triton.common import module_tickets
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _qconfig():
    """qat_qconfig with affine activations. With the symmetric qint8 range the batch's
    largest output sits on a rounding tie (max / scale = 127.5), so a one-ulp difference in
    the normalisation (the fused op's own against F.batch_norm) flips that element between
    127 (in range) and 128 (clamped, no gradient): tolerance comparisons of the gradients
    cannot hold there. The fused op's bytes are checked exactly below, against a replica."""
    from functools import partial

    from gpuquant import quint8
    from gpuquant.quantization import ExponentialMovingAverageObserver, FakeQuantize
    return qat_qconfig()._replace(
        act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=quint8,
                             symmetric=False, check_finite=False),
        act_fake_quant=partial(FakeQuantize, dtype=quint8))


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
    spy("bn_normalize_observe_fake_quant")
    spy("bn_normalize_train")
    spy("conv_bn_act_train")
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
    fused = quantize_qat(copy.deepcopy(f), _qconfig()).to(DEV).train()
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
    ran = {n for n, ok in spies if ok}
    if name.startswith("linear"):  # the two fused ops around the linear
        assert ran == {"bn_fold_observe_fake_quant", "bn_normalize_observe_fake_quant"}
    else:  # one autograd node for the layer (its parts are the two ops' launchers)
        assert ran == {"conv_bn_act_train"}


@pytest.mark.parametrize("momentum", [1.0, 0.7, None])
@pytest.mark.parametrize("factory,shape", [
    (lambda: gnn.ConvBnRelu2d(3, 4, 1), (4, 3, 3, 3)),  # conv_bn_act_train
    (lambda: gnn.LinearBn1d(3, 4), (12, 3)),             # bn_normalize_observe_fake_quant
], ids=["conv", "linear"])
def test_fused_running_stats_update_at_large_factors(spies, factory, shape, momentum):
    """Momentum >= 0.5 and the first batch of a cumulative average (factor 1): the running
    statistics are lerped from the nearer end, as ``torch.lerp`` does; ``rv + 1 * (v - rv)``
    lost a low-variance channel's variance to cancellation (0.0 for 7.7e-9)."""
    torch.manual_seed(0)
    f = factory()
    f.bn.momentum = momentum
    layer = getattr(f, "conv", None) or f.linear
    with torch.no_grad():  # channel 0's output: nearly constant (variance ~1e-8)
        layer.weight[0] *= 1e-4
    fused = quantize_qat(f, _qconfig()).to(DEV).train()
    ref = copy.deepcopy(fused)
    x = torch.randn(shape, device=DEV)
    with backends.use("triton"):
        fused(x)
    with backends.use("reference"):
        ref(x)
    assert {n for n, ok in spies if ok}
    for n in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused.bn, n), getattr(ref.bn, n), rtol=1e-5,
                                   atol=0, msg=n)


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
    assert {n for n, ok in spies if ok} == {"conv_bn_act_train"}


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
    tickets = module_tickets(pairs[0][0], pairs[0][0].min_val.device)
    assert torch.equal(tickets.cpu(), torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_fq", [False, True], ids=["fold", "fold_fq"])
def test_fold_writes_the_weight_in_the_conv_dtype(dt, with_fq):
    """``fold_forward(out_dtype=dt)`` writes ``wf.to(dt)``'s bytes (the one-node QAT layer's
    autocast cast, done in the fold's store): round to nearest even, ties both ways, the
    largest finite float32 (Inf in float16), Inf, -0; and ``fold_backward`` given the
    gradient in ``dt`` equals it given that gradient cast to float32 first."""
    g = torch.Generator().manual_seed(3)
    C, L = 4, 300
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (C, L), generator=g, dtype=torch.int64)
    w = (torch.randn(C, L, generator=g) * 3).to(DEV)
    if not with_fq:  # t == 1 exactly (gamma == sqrt(1 + 0)): the stored values are w's own
        w = bits.to(torch.int32).view(torch.float32).to(DEV)
        w = torch.where(w.isnan(), torch.zeros((), device=DEV), w)
        ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11,
                             1 + 3 * 2 ** -11, 3.4028235e38, float("inf"), -0.0])
        w[0, :ties.numel()] = ties.to(DEV)
    gamma = torch.ones(C, device=DEV)
    rv = torch.ones(C, device=DEV)
    obs = _weight_quantizers("minmax")[0].to(DEV) if with_fq else None
    if obs is not None:
        obs._prepare_state(torch.empty(C, device=DEV))
    outs = []
    for out_dtype in (dt, None):  # (the MinMax state sees w twice: the same qparams)
        with backends.use("triton"):
            outs.append(bn_fold.fold_forward(w, gamma, rv, 0.0, 1e-6, obs, out_dtype=out_dtype))
    wf_dt, wf32 = outs[0][0], outs[1][0]
    assert wf_dt.dtype == dt and wf32.dtype == torch.float32
    want = wf32.to(dt)
    assert torch.equal(wf_dt.view(torch.int16), want.view(torch.int16))
    t, saved = outs[0][1], outs[0][4]
    gwf = (torch.randn(C, L, generator=g) * 2).to(DEV).to(dt)
    with backends.use("triton"):
        a = bn_fold.fold_backward(gwf, None, None, w, gamma, t, saved, True)
        b = bn_fold.fold_backward(gwf.float(), None, None, w, gamma, t, saved, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


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


# --------------------------------------- batch norm + activation observe + fake quant, fused
def _act_quantizers(kind):
    from gpuquant import qint8, quint8
    from gpuquant.quantization import (ExponentialMovingAverageObserver, FakeQuantize,
                                       MinMaxObserver)
    if kind == "minmax_affine":
        return MinMaxObserver(quint8, symmetric=False, check_finite=False), FakeQuantize(quint8)
    return (ExponentialMovingAverageObserver(0.8, qint8, symmetric=True, check_finite=False),
            FakeQuantize(qint8))


BN_ACT_CASES = [  # (id, shape, layout, dtype, activation, observer kind)
    ("cl_f32_relu_ema", (3, 16, 5, 7), "cl", torch.float32, "relu", "ema"),
    ("nchw_bf16_relu_ema", (2, 7, 6, 5), "nchw", torch.bfloat16, "relu", "ema"),
    ("nchw_n1_f16_affine", (1, 12, 4, 9), "nchw", torch.float16, "none", "minmax_affine"),
    ("cl_c96_bf16_relu6_affine", (2, 96, 3, 3), "cl", torch.bfloat16, "relu6", "minmax_affine"),
    ("cl_c24_f32_relu6_ema", (2, 24, 4, 4), "cl", torch.float32, "relu6", "ema"),
    ("linear_f32_ema", (37, 10), "nchw", torch.float32, "none", "ema"),
]


@pytest.mark.parametrize("shape,layout,dtype,act,kind", [c[1:] for c in BN_ACT_CASES],
                         ids=[c[0] for c in BN_ACT_CASES])
def test_fused_bn_act_equals_the_definition_on_its_normalisation(shape, layout, dtype, act,
                                                                 kind):
    """bn_normalize_observe_fake_quant against the definition applied to the fused op's own
    normalisation ((z - mean) * a + beta in float32, rounded to z's dtype, from the op's
    mean and a): output bytes, observer state and non-finite count exactly, over steps with
    a NaN channel (its outputs NaN, the batch not recorded) and a frozen observer; the
    gradients (the fused batch-norm backward of the straight-through gradient) those of
    PyTorch's native_batch_norm_backward given the definition's, and the batch and running
    statistics those of torch.var_mean, to float32 rounding."""
    from gpuquant.backends.triton import bn_act
    from gpuquant.quantization.fake_quant import apply_fake_quant_with_observer
    g = torch.Generator().manual_seed(11)
    C = shape[1]
    dims = (0,) + tuple(range(2, len(shape)))
    sh = (1, -1) + (1,) * (len(shape) - 2)
    W1 = ((torch.rand(C, generator=g) + 0.3) * (4 if act == "relu6" else 1)).to(DEV)
    beta0 = (torch.randn(C, generator=g) * 0.3).to(DEV)
    E = (torch.rand(C, generator=g) * 1e-4 + 1e-6).to(DEV)
    t = (torch.rand(C, generator=g) + 0.5).to(DEV)
    bn = torch.nn.BatchNorm2d(C, momentum=0.2).to(DEV)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    (obs, fq), (obs_r, fq_r) = _act_quantizers(kind), _act_quantizers(kind)
    for m in (obs, fq, obs_r, fq_r):
        m.to(DEV)
    for step in range(4):
        if step == 3:
            obs.disable(), obs_r.disable()
        W0 = W1.clone()
        if step < 2:  # gamma = 0: that channel outputs beta (its channel block's backward
            W0[1] = 0.0  # recomputes the mask; steps 2 and 3 compare with the bounds)
        z0 = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEV).to(dtype)
        if step == 1:
            z0[(0, C - 1) + (0,) * (len(shape) - 2)] = float("nan")
        if layout == "cl":
            z0 = z0.contiguous(memory_format=torch.channels_last)
        z = z0.clone().requires_grad_(True)
        W, beta = W0.clone().requires_grad_(True), beta0.clone().requires_grad_(True)
        Eg = E.clone().requires_grad_(True)
        spy = {}
        real = bn_act.bn_act_forward

        def capture(*a, **k):
            out = real(*a, **k)
            C = out[0].shape[1]
            spy["mean"], spy["invstd"], spy["a"], *_ = (v.clone() for v in
                                                         bn_act._vec_parts(out[1], C))
            return out
        bn_act.bn_act_forward = capture
        try:
            with backends.use("triton"):
                y = bn_act.bn_normalize_observe_fake_quant(z, W, beta, Eg, t, bn, None, obs, fq,
                                                           act)
                assert y is not None
                gy = torch.randn(shape, generator=g).to(DEV).to(dtype)
                if step == 2 and act != "none":  # an inf gradient where the activation is dead:
                    pre = ((z0.float() - spy["mean"].reshape(sh)) * spy["a"].reshape(sh)
                           + beta0.reshape(sh))  # its gradient is 0, not NaN (torch's chain)
                    gy[tuple((pre < -0.01).nonzero()[0].tolist())] = float("inf")
                y.backward(gy)
        finally:
            bn_act.bn_act_forward = real
        mean, invstd, a = spy["mean"], spy["invstd"], spy["a"]
        # the definition on the op's normalisation
        yn = ((z0.float() - mean.reshape(sh)) * a.reshape(sh) + beta0.reshape(sh)).to(dtype)
        yn = yn.detach().requires_grad_(True)
        with backends.use("reference"):
            ya = torch.nn.functional.relu6(yn) if act == "relu6" else yn
            if step == 0 and act == "relu6":
                assert (ya == 6).any() and (ya == 0).any()  # both ends of ReLU6 are hit
            yr = apply_fake_quant_with_observer(ya, fq_r, obs_r, act == "relu")
        yr.backward(gy)
        assert y.dtype == dtype and y.stride() == z0.stride()
        assert torch.equal(y.isnan(), yr.isnan()), step
        assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(yr)), step
        for n in ("min_val", "max_val", "nonfinite_batches"):
            assert torch.equal(getattr(obs, n), getattr(obs_r, n)), (n, step)
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(
            yn.grad, z0, W0, None, None, mean, invstd, True, 0.0, [True, True, True])
        ge = -0.5 * W0 * invstd * invstd * gw
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else \
            dict(rtol=1e-2, atol=1e-2)  # one ulp of bf16 / fp16 in grad_z
        for n, a_, b_ in (("z", z.grad, gz), ("W", W.grad, gw), ("beta", beta.grad, gb),
                          ("E", Eg.grad, ge)):
            torch.testing.assert_close(a_, b_, equal_nan=True, msg=f"{n} step {step}", **tol)
        if step != 1:  # statistics (the NaN step's last channel is NaN throughout)
            var_r, mean_r = torch.var_mean(z0.float(), dim=dims, correction=0)
            torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(invstd, torch.rsqrt(var_r + E), rtol=1e-5, atol=1e-6)
            n = z0.numel() // C
            rm_new = torch.lerp(rm0, mean_r / t, 0.2)
            rv_new = torch.lerp(rv0, var_r / (t * t) * (n / (n - 1)), 0.2)
            torch.testing.assert_close(bn.running_mean, rm_new, rtol=1e-5, atol=1e-6,
                                       equal_nan=True)  # NaN since the NaN step, as torch's
            torch.testing.assert_close(bn.running_var, rv_new, rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
        rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    assert int(bn.num_batches_tracked) == 4
    assert int(obs.nonfinite_batches) == 1
    # the last-program tickets of the statistics and gradient-sum kernels reset themselves
    tickets = module_tickets(bn, bn.running_mean.device)
    assert torch.equal(tickets.cpu(), torch.zeros(2, dtype=torch.int32))


@pytest.mark.gpu
def test_fused_qat_kernels_on_the_gpu_with_many_programs():
    """The same checks at ResNet-50 sizes on the device: thousands of programs race for the
    last-program tickets (the weight kernel's non-finite count, the batch-norm statistics'
    and gradient sums' finishing programs), which the interpreter runs one at a time."""
    for shape, cl in (((512, 512, 3, 3), True), ((2048, 512), False)):
        for kind in ("minmax", "ema_affine"):
            test_fused_fold_observe_fake_quant_equals_the_unfused_kernels(kind, shape, cl)
    for case in (((64, 64, 56, 56), "cl", torch.bfloat16, "relu", "ema"),
                 ((32, 256, 14, 14), "nchw", torch.float32, "relu6", "minmax_affine"),
                 ((16, 2048, 7, 7), "cl", torch.bfloat16, "none", "ema"),
                 ((96, 96, 28, 28), "cl", torch.float16, "relu6", "ema")):
        test_fused_bn_act_equals_the_definition_on_its_normalisation(*case)


@pytest.mark.parametrize("plan", ["default", "many-iterations"])
def test_fused_bn_statistics_with_a_large_mean(monkeypatch, plan):
    """Per-channel mean 300 and standard deviation 0.05 (a cancellation trap for sums of
    squares): the fused statistics (a Welford pair per element slot, Chan merges, one
    shifted pass over the partials) keep the mean to 2 ulp and the variance to 5e-4 against
    float64. ``many-iterations``: small tiles and 3 programs a channel block, so each slot
    sees many values and the last row block is partly past the rows."""
    from gpuquant.backends.triton import bn_act
    from gpuquant.backends.triton import fake_quant as tfq
    from gpuquant.quantization import ExponentialMovingAverageObserver
    if plan == "many-iterations":
        monkeypatch.setattr(bn_act, "_TILE", 64)             # 8 channels x 8 rows a tile
        monkeypatch.setattr(tfq, "_target_programs", lambda device: 3)
    g = torch.Generator().manual_seed(3)
    C = 8
    z = (torch.randn(6, C, 17, 13, generator=g, dtype=torch.float64) * 0.05
         + 300.0 + torch.arange(C, dtype=torch.float64).reshape(1, C, 1, 1))
    z32 = z.float().to(DEV).contiguous(memory_format=torch.channels_last)
    ones = torch.ones(C, device=DEV)
    obs = ExponentialMovingAverageObserver(0.9, check_finite=False).to(DEV)
    bn = torch.nn.BatchNorm2d(C).to(DEV)
    with backends.use("triton"):
        _, vec = bn_act.bn_act_forward(
            z32, ones, ones * 0, ones * 1e-12, ones, None, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, 0.1, obs, 0, module_tickets(bn, DEV))
        mean, invstd, *_ = bn_act._vec_parts(vec, C)
    var_r, mean_r = torch.var_mean(z32.double().cpu(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double().cpu(), mean_r, rtol=4e-7, atol=0)  # ~2 ulp
    var = invstd.double().cpu() ** -2
    # 1.1e-4 measured: the tile means near 300 carry float32's 1.5e-5 rounding into the
    # between-tile part of the variance (mean / deviation = 6000 here; at 10, ~1e-9)
    torch.testing.assert_close(var, var_r, rtol=5e-4, atol=0)


@pytest.mark.parametrize("bias,cl,mode", [(True, True, "frozen"), (False, False, "frozen"),
                                          (True, False, "eval")])
def test_fused_frozen_fold_equals_the_definition(monkeypatch, bias, cl, mode):
    """Running-statistics Conv+BN (frozen BatchNorm while training, or eval): the fused
    fold + observe + fake quant of the weight and the folded bias give the bytes of
    folded_weight_bias() then the weight's observe + fake quant (weight observer state too),
    and the gradients of w, gamma, beta and the conv bias to float32 rounding."""
    import gpuquant.backends.triton as tb
    f = _randomize(gnn.ConvBnRelu2d(4, 6, 3, padding=1, bias=bias), 5)
    fused = quantize_qat(copy.deepcopy(f), qat_qconfig()).to(DEV)
    fused.freeze_bn_stats()
    fused = fused.train() if mode == "frozen" else fused.eval()
    ref = copy.deepcopy(fused)
    if cl:
        fused = fused.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    calls = []
    op = tb.OPS["bn_fold_frozen_observe_fake_quant"]

    def spy(*a, **k):
        out = op(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setitem(tb.OPS, "bn_fold_frozen_observe_fake_quant", spy)
    for step in range(2):
        x = torch.randn(3, 4, 7, 6, device=DEV) * (1 + step)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for m, fuse in ((fused, True), (ref, False)):
            m.zero_grad()
            if not fuse:
                monkeypatch.delitem(tb.OPS, "bn_fold_frozen_observe_fake_quant")
            with backends.use("triton"):
                y = m(x)
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(step))
                           .to(DEV))
            if not fuse:
                monkeypatch.setitem(tb.OPS, "bn_fold_frozen_observe_fake_quant", spy)
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1])
        for n in ("min_val", "max_val"):
            assert torch.equal(getattr(fused.weight_observer, n), getattr(ref.weight_observer, n))
        for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert calls == [True, True]
    # the folded weight and bias as the int8 conversion reads them are unchanged
    w1, b1 = fused.folded_weight_bias()
    w2, b2 = ref.folded_weight_bias()
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_tickets_are_made_outside_graph_capture(monkeypatch):
    """A kernel with launch tickets first needed inside CUDA-graph capture cannot allocate
    them there (the zeros would live in the graph's pool): a clear error, not a stale
    buffer; made before capture, they are reused."""
    from gpuquant.backends.triton import common
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    owner = type("Owner", (), {})()
    fake_cuda = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="inside CUDA-graph capture; run it once before"):
        common._zero_tickets(2, fake_cuda)
    made = torch.zeros(2, dtype=torch.int32)
    owner.__dict__["_gpuquant_tickets"] = made
    assert common.module_tickets(owner, "cpu") is made  # existing tickets: no allocation


@pytest.mark.parametrize("shape", [(256, 64, 112, 112), (168, 64, 112, 112), (700, 256, 56, 56),
                                   (400, 32, 112, 112), (2, 2048, 7, 7)])
def test_apply_kernel_grid_within_cuda_limits(shape):
    """One row block a program: a channels_last ResNet stem at batch 168+ has more than
    65535 of them; they go on grid axis 0 (axes 1 and 2 stop at 65535 on CUDA)."""
    from gpuquant.backends.triton import bn_act
    from gpuquant.backends.triton.fake_quant import row_plan
    for fmt in (torch.channels_last, torch.contiguous_format):
        z = torch.empty(shape, device="meta").to(memory_format=fmt)
        ep = row_plan(z, 1, tile=bn_act._TILE, programs=2 ** 40)
        gx, gy = bn_act.apply_grid(ep, shape[1])
        assert gx < 2 ** 31 and gy <= 65535, (shape, fmt, gx, gy)


@triton.jit
def _mask_bounds_kernel(z_ptr, par_ptr, bounds_ptr, out_ptr, N, C, qmin, qmax,
                        OUT: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """A test kernel: per channel :func:`bn_act._mask_thresholds`, and for each z and
    upstream gradient 1, inf and -inf (which tell every in-range / live combination apart:
    0, g, or g * 0 = NaN) the backward's straight-through gradient both ways: compared with
    the bounds, and recomputed (``_fq_act``)."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(par_ptr + c, mask=cm, other=0.0)
    a = tl.load(par_ptr + C + c, mask=cm, other=1.0)
    beta = tl.load(par_ptr + 2 * C + c, mask=cm, other=0.0)
    s = tl.load(par_ptr + 3 * C)
    zp = tl.load(par_ptr + 3 * C + 1)
    inv = tl.math.div_rn(1.0, s)
    live_lo, live_hi, inr_lo, inr_hi, reg = _bn_act._mask_thresholds(
        mean, a, beta, s, zp, inv, qmin, qmax, OUT, ACT)
    if pid == 0:
        tl.store(bounds_ptr + c, live_lo, mask=cm)
        tl.store(bounds_ptr + C + c, live_hi, mask=cm)
        tl.store(bounds_ptr + 2 * C + c, inr_lo, mask=cm)
        tl.store(bounds_ptr + 3 * C + c, inr_hi, mask=cm)
        tl.store(bounds_ptr + 4 * C + c, reg, mask=cm)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    zm = offs < N
    z = tl.load(z_ptr + offs, mask=zm, other=0.0).to(tl.float32)[:, None]
    o = offs[:, None] * C + c[None, :]
    m = zm[:, None] & cm[None, :]
    plane = N * C
    mean, a, beta = mean[None, :], a[None, :], beta[None, :]
    bounds = (live_lo[None, :], live_hi[None, :], inr_lo[None, :], inr_hi[None, :])
    for k in tl.static_range(3):
        g = tl.full(z.shape, 1.0 if k == 0 else (float("inf") if k == 1 else float("-inf")),
                    tl.float32) + 0.0 * mean
        fast = _bn_act._st_grad(g, z, mean, a, beta, inv, s, zp, qmin, qmax, *bounds, True,
                                OUT, ACT)
        slow = _bn_act._st_grad(g, z, mean, a, beta, inv, s, zp, qmin, qmax, *bounds, False,
                                OUT, ACT)
        tl.store(out_ptr + 2 * k * plane + o, fast, mask=m)
        tl.store(out_ptr + (2 * k + 1) * plane + o, slow, mask=m)


def _every_value(dtype):
    """Every value of a 16-bit float dtype (NaNs included), as float32."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).float()


def _f32_probe_values(bounds, g):
    """float32 values for the float32 case: random ones over many magnitudes, specials, and
    each finite bound with its 3 neighbours either side."""
    mags = torch.exp2(torch.randint(-40, 40, (4000,), generator=g).float())
    vals = [torch.randn(4000, generator=g) * mags, torch.randn(4000, generator=g) * 3,
            torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                          3.4028235e38, -3.4028235e38, 1e-45, -1e-45])]
    b = bounds[:4].flatten()
    b = b[torch.isfinite(b)]
    for _ in range(3):
        vals += [b]
        b_up, b_dn = torch.nextafter(b, torch.tensor(float("inf"))), \
            torch.nextafter(b, torch.tensor(float("-inf")))
        vals += [b_up, b_dn]
        b = torch.cat([b_up, b_dn])
    return torch.cat(vals)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the bisection's huge values
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("qrange", [(0.0, 255.0, 128.0), (-128.0, 127.0, 0.0),
                                    (-127.0, 127.0, -3.0)])
def test_backward_mask_bounds_equal_the_recomputed_masks(dtype, act, qrange):
    """The backward's straight-through masks as comparisons of z with per-channel bounds
    (found by bisection in the forward) equal the masks recomputed from z (normalisation,
    activation, fake quant) for every bfloat16 / float16 value, NaN and infinities
    included, and for float32 values around each bound; channels where the bounds do not
    hold (a <= 0, a non-finite mean or beta) are flagged for the recompute path."""
    from gpuquant.backends.triton.bn_act import _TL_DTYPE
    g = torch.Generator().manual_seed(int(act * 10 + qrange[0]) + 7)
    qmin, qmax, zp = qrange
    C = 12
    mean = torch.randn(C, generator=g) * 3
    a = torch.rand(C, generator=g) * 4 + 0.01
    beta = torch.randn(C, generator=g)
    mean[0], a[0] = 0.0, 1.0                    # the identity
    a[1] = 3e-30                                # y ~ beta for every finite z
    mean[2], a[2] = 6e4, 1e30                   # (z - mean) * a overflows
    beta[3] = 2.5 * 0.037                        # beta on a rounding tie of the scale
    irregular = {8: ("a", 0.0), 9: ("a", -0.5), 10: ("mean", float("nan")),
                 11: ("beta", float("inf"))}
    for c, (n, v) in irregular.items():
        dict(mean=mean, a=a, beta=beta)[n][c] = v
    s = 0.037
    par = torch.cat([mean, a, beta, torch.tensor([s, zp])]).to(DEV)
    kern = _mask_bounds_kernel
    bounds = torch.empty(5 * C, device=DEV)
    if dtype == torch.float32:
        # bounds first (one z), then the values around them
        one = torch.zeros(1, device=DEV)
        kern[(1,)](one, par, bounds, torch.empty(6 * C, device=DEV), 1, C,
                   qmin, qmax, OUT=_TL_DTYPE[dtype], ACT=act, BLOCK=16, BLOCK_C=16)
        z = _f32_probe_values(bounds.view(5, C)[:, :8].cpu(), g).to(DEV)
    else:
        z = _every_value(dtype).to(DEV)
    # the interpreter runs one program a block (few, large ones: fast); compiled, a block of
    # BLOCK x BLOCK_C values lives in registers (1 << 16 of them never finished compiling:
    # the GPU lease's tests stage spent its minutes in this test)
    N, BLOCK = z.numel(), (1 << 16) if DEV == "cpu" else 128
    out = torch.empty(6 * N * C, device=DEV)
    kern[(triton.cdiv(N, BLOCK),)](z.to(dtype), par, bounds, out, N, C, qmin, qmax,
                                   OUT=_TL_DTYPE[dtype], ACT=act, BLOCK=BLOCK, BLOCK_C=16)
    out = out.view(3, 2, N, C)[..., :8].cpu()
    reg = bounds.view(5, C)[4].cpu()
    assert reg.tolist() == [1.0] * 8 + [0.0] * 4
    ones = out[0, 1]
    assert (ones == 1).any() and (ones == 0).any()  # both sides of the masks are hit
    for k in range(3):  # bit for bit (the NaNs are both torch's canonical one)
        assert torch.equal(out[k, 0].view(torch.int32), out[k, 1].view(torch.int32)), k


@pytest.mark.filterwarnings("ignore:divide by zero")  # 1 / 0^2, in the branch not taken
def test_stats_finish_from_invstd_keeps_a_nan_variance():
    """On CUDA the batch statistics come from torch.batch_norm_stats as 1 / sqrt(var) (eps 0,
    0 where var is 0) and the finishing kernel turns them back into the variance. A NaN
    batch's invstd is NaN there: its variance and running variance must be NaN, as
    torch.var_mean gives the definition, not 0 (finite running statistics from a NaN batch,
    the GPU-only path that the CPU tests, which pass the variance, never took)."""
    from gpuquant.backends.triton.launch import launch
    C = 4
    f32 = dict(dtype=torch.float32, device=DEV)
    mean = torch.tensor([float("nan"), 1.0, -2.0, 0.5], **f32)
    invstd = torch.tensor([float("nan"), 0.0, 0.5, 2.0], **f32)  # var NaN, 0, 4, 0.25
    E, W, t = torch.full((C,), 1e-5, **f32), torch.ones(C, **f32), torch.ones(C, **f32)
    rm, rv = torch.zeros(C, **f32), torch.ones(C, **f32)
    nbt = torch.zeros((), dtype=torch.int64, device=DEV)
    var_eps, inv, k = (torch.empty(C, **f32) for _ in range(3))
    launch(bn_fold._stats_finish_kernel, (1,), mean, invstd, E, W, t, mean, rm, rv, nbt, var_eps,
           inv, k, C, 0.1, 2.0, FROM_INVSTD=True, HAS_BIAS=False, CUMULATIVE=False,
           BLOCK_C=4, num_warps=4)
    var = torch.tensor([float("nan"), 0.0, 4.0, 0.25], **f32)
    assert torch.equal(var_eps.isnan(), var.isnan()) and torch.equal(rv.isnan(), var.isnan())
    torch.testing.assert_close(var_eps[1:], var[1:] + E[1:])
    torch.testing.assert_close(rv[1:], 0.9 + 0.1 * var[1:] * 2.0)
    assert bool(rm[0].isnan()) and int(nbt) == 1


@pytest.mark.gpu
def test_backward_mask_bounds_on_the_gpu():
    """The bounds against the recompute, compiled: the GPU's own rounding, comparisons and
    NaN handling on both sides (one compile per output dtype and activation)."""
    for dtype, act, qrange in ((torch.bfloat16, 1, (0.0, 255.0, 128.0)),
                               (torch.bfloat16, 2, (-128.0, 127.0, 0.0)),
                               (torch.float16, 0, (-127.0, 127.0, -3.0)),
                               (torch.float32, 1, (-128.0, 127.0, 0.0))):
        test_backward_mask_bounds_equal_the_recomputed_masks(dtype, act, qrange)
