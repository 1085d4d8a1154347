"""Fake-quant modules: FakeQuantize, LSQ (vs torch's learnable fake-quant ops), TQT (vs the
paper's gradient, analytic and by finite differences), apply_fake_quant_with_observer, and
dispatch of the learned ops to a backend."""
import math
import sys
import types

import pytest
import torch

import gpuquant
from gpuquant import QParams
from gpuquant.backends import registry
from gpuquant.functional import fake_quant
from gpuquant.quantization import (LSQ, TQT, ExponentialMovingAverageObserver, FakeQuantize,
                                   MinMaxObserver, apply_fake_quant_with_observer)


def _grad_factor(n, dtype):
    return 1.0 / math.sqrt(n * dtype.qmax)


# ------------------------------------------------------------------------- FakeQuantize
def test_fake_quantize_module_equals_functional_and_switches():
    fq = FakeQuantize(gpuquant.quint8)
    x = torch.randn(4, 9)
    qp = QParams(gpuquant.quint8, 0.02, 100)
    assert torch.equal(fq(x, qp), fake_quant(x, qp))
    assert fq.get_qparams() is None
    assert fq.disable() is fq and not fq.enabled
    assert fq(x, qp) is x
    fq.enable()
    with pytest.raises(ValueError, match="quint8.*qint8"):
        fq(x, QParams(gpuquant.qint8, 0.02, 0))
    with pytest.raises(TypeError, match="QParams"):
        fq(x, None)


# ------------------------------------------------------------------------- LSQ vs torch
# Per-tensor zero points are >= 0 here: torch's per-tensor *backward* uses
# trunc(zero_point + 0.5), which for a negative integer zero point is not the zero point its
# forward used (-3 -> -2); gpuquant uses the forward's zero point in both passes.
LSQ_TENSOR_CASES = [(gpuquant.qint8, True, 0), (gpuquant.quint8, False, 37),
                    (gpuquant.qint4, True, 0), (gpuquant.quint4, False, 3),
                    (gpuquant.qint8, False, 5), (gpuquant.qint8_narrow, True, 0)]


@pytest.mark.parametrize("dtype,symmetric,zp", LSQ_TENSOR_CASES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (37,), (4, 5, 33)], ids=str)
def test_lsq_per_tensor_matches_torch_learnable(dtype, symmetric, zp, shape):
    scale = float(torch.rand(()) * 0.05 + 0.01)
    if symmetric and not dtype.signed:
        zp = (dtype.qmax + dtype.qmin + 1) // 2
    x = torch.randn(shape) * scale * (dtype.qmax - dtype.qmin) * 0.4  # some clamp
    lsq = LSQ(dtype, symmetric=symmetric)
    xa = x.clone().requires_grad_(True)
    y = lsq(xa, QParams(dtype, scale, zp))  # initialises from these qparams
    g = _grad_factor(x.numel(), dtype)
    xb = x.clone().requires_grad_(True)
    s_ref = torch.tensor([scale], requires_grad=True)
    z_ref = torch.tensor([float(zp)], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, z_ref, dtype.qmin, dtype.qmax, g)
    assert torch.equal(y, ref)
    dy = torch.randn(shape)
    y.backward(dy)
    ref.backward(dy)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(lsq.scale.grad.reshape(1), s_ref.grad, rtol=2e-5, atol=1e-6)
    if symmetric:
        assert not lsq.zero_point.requires_grad
    else:
        torch.testing.assert_close(lsq.zero_point.grad.reshape(1), z_ref.grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("dtype,symmetric", [(gpuquant.qint8_narrow, True), (gpuquant.quint8, False),
                                             (gpuquant.qint4, False)], ids=str)
@pytest.mark.parametrize("shape,axis", [((6, 4, 3, 3), 0), ((5, 7, 9), 1), ((3, 4, 11), -1)], ids=str)
def test_lsq_per_channel_matches_torch_learnable(dtype, symmetric, shape, axis):
    ax = axis % len(shape)
    c = shape[ax]
    scale = torch.rand(c) * 0.05 + 0.01
    if symmetric:
        zp = torch.full((c,), 0 if dtype.signed else (dtype.qmax + dtype.qmin + 1) // 2, dtype=torch.int32)
    else:
        zp = torch.randint(dtype.qmin, dtype.qmax + 1, (c,), dtype=torch.int32)
    bshape = [-1 if d == ax else 1 for d in range(len(shape))]
    x = torch.randn(shape) * scale.reshape(bshape) * (dtype.qmax - dtype.qmin) * 0.4
    lsq = LSQ(dtype, axis=axis, symmetric=symmetric)
    xa = x.clone().requires_grad_(True)
    y = lsq(xa, QParams(dtype, scale, zp, axis=axis))
    g = _grad_factor(x.numel(), dtype)  # the whole tensor's elements (contract, torch)
    xb = x.clone().requires_grad_(True)
    s_ref = scale.clone().requires_grad_(True)
    z_ref = zp.float().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_channel_affine(xb, s_ref, z_ref, ax, dtype.qmin,
                                                            dtype.qmax, g)
    assert torch.equal(y, ref)
    dy = torch.randn(shape)
    y.backward(dy)
    ref.backward(dy)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(lsq.scale.grad, s_ref.grad, rtol=2e-5, atol=1e-6)
    if not symmetric:
        torch.testing.assert_close(lsq.zero_point.grad, z_ref.grad, rtol=2e-5, atol=1e-7)
    qp = lsq.get_qparams()
    assert torch.equal(qp.scale, scale) and torch.equal(qp.zero_point, zp) and qp.axis == axis


@pytest.mark.parametrize("axis", [0, 1, -1], ids=str)
def test_lsq_per_channel_grad_scale_is_the_contracts_numel_as_torch_module(axis):
    """Contract section 1: LSQ's gradient scale is ``g = 1 / sqrt(numel * qmax)``, and torch's
    ``_LearnableFakeQuantize`` (the outside reference) uses ``X.numel()`` per-channel too,
    not the elements of one channel (which made per-channel scale gradients sqrt(C) times
    torch's)."""
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    torch.manual_seed(5)
    shape = (6, 4, 3, 3)
    ax = axis % len(shape)
    c = shape[ax]
    dtype = gpuquant.qint8_narrow
    scale = torch.rand(c) * 0.05 + 0.01
    bshape = [-1 if d == ax else 1 for d in range(len(shape))]
    x = torch.randn(shape) * scale.reshape(bshape) * 100
    lsq = LSQ(dtype, axis=axis)
    y = lsq(x, QParams(dtype, scale, 0, axis=axis))
    ref_mod = _LearnableFakeQuantize(observer=torch.ao.quantization.PerChannelMinMaxObserver,
                                     quant_min=dtype.qmin, quant_max=dtype.qmax,
                                     channel_len=c, use_grad_scaling=True, ch_axis=ax,
                                     dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    ref_mod.toggle_observer_update(False)
    with torch.no_grad():
        ref_mod.scale.copy_(scale)
        ref_mod.zero_point.zero_()
    ref = ref_mod(x)
    assert torch.equal(y, ref)
    dy = torch.randn(shape)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(lsq.scale.grad, ref_mod.scale.grad, rtol=2e-5, atol=1e-7)


def test_lsq_data_init_half_input_and_no_grad_scaling():
    x = torch.randn(3, 50)
    lsq = LSQ(gpuquant.qint8, init="data", grad_scaling=False)
    y = lsq(x.half().requires_grad_(True), QParams(gpuquant.qint8, 0.5, 0))  # qparams ignored
    assert y.dtype == torch.float16
    expect = 2 * x.half().float().abs().mean() / math.sqrt(127)
    assert float(lsq.scale.detach()) == pytest.approx(float(expect), rel=1e-6)
    lsq2 = LSQ(gpuquant.qint8, axis=0)  # no qparams given: the paper's init per channel
    lsq2(x)
    torch.testing.assert_close(lsq2.scale.detach(), 2 * x.abs().mean(1) / math.sqrt(127))
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    s_ref = lsq.scale.detach().reshape(1).clone().requires_grad_(True)
    lsq.scale.grad = None
    lsq(xa).sum().backward()
    torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, torch.zeros(1), -128, 127, 1.0).sum().backward()
    torch.testing.assert_close(lsq.scale.grad.reshape(1), s_ref.grad, rtol=2e-5, atol=1e-5)


def test_lsq_learns_a_better_step_size():
    torch.manual_seed(0)
    u = torch.rand(4000) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace: MinMax step is too coarse
    lsq = LSQ(gpuquant.qint4)
    obs = MinMaxObserver(gpuquant.qint4)
    obs(x)
    lsq(x, obs.get_qparams())
    opt = torch.optim.Adam(lsq.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = ((lsq(x) - x) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    final = ((lsq(x) - x) ** 2).mean().item()
    assert final < 0.6 * first, (first, final)


def test_lsq_negative_scale_parameter_stays_usable():
    lsq = LSQ(gpuquant.qint8)
    x = torch.randn(20)
    lsq(x, QParams(gpuquant.qint8, 0.05, 0))
    with torch.no_grad():
        lsq.scale.fill_(-0.05)
    assert torch.equal(lsq(x), fake_quant(x, QParams(gpuquant.qint8, 0.05, 0)))
    assert float(lsq.get_qparams().scale) == pytest.approx(0.05)


# ------------------------------------------------------------------------- TQT
def _tqt_reference(x, log2_t, dy, dtype, axis=None):
    """Jain et al. 2019 in float64: y and the gradients wrt x and log2_t."""
    xd = x.double()
    s = 2.0 ** torch.ceil(log2_t.double()) / (dtype.qmax + 1)
    if axis is not None:
        s = s.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    v = xd / s
    r = torch.round(v)
    inside = (r >= dtype.qmin) & (r <= dtype.qmax)
    y = r.clamp(dtype.qmin, dtype.qmax) * s
    inner = torch.where(inside, r - v, torch.where(r < dtype.qmin, float(dtype.qmin), float(dtype.qmax)))
    gl = dy.double() * s * math.log(2) * inner
    gl = gl.sum() if axis is None else gl.sum([d for d in range(x.dim()) if d != axis])
    return y, dy.double() * inside, gl


@pytest.mark.parametrize("dtype", [gpuquant.qint8, gpuquant.quint8, gpuquant.qint4,
                                   gpuquant.qint8_narrow], ids=str)
@pytest.mark.parametrize("axis", [None, 1])
def test_tqt_forward_and_gradients_match_the_paper(dtype, axis):
    shape = (3, 5, 40)
    x = torch.randn(shape) * 2
    tqt = TQT(dtype, axis=axis)
    c = shape[1]
    amax = torch.rand(c if axis is not None else ()) * 3 + 1
    zp = torch.zeros_like(amax, dtype=torch.int32)
    if not dtype.signed:
        x = x.abs()
    xa = x.clone().requires_grad_(True)
    y = tqt(xa, QParams(dtype, amax / dtype.qmax, zp, axis=axis))
    # the learned scale is a power of two and the forward is plain fake_quant with it
    qp = tqt.get_qparams()
    m, _ = torch.frexp(qp.scale)
    assert bool((m == 0.5).all())
    assert torch.equal(y, fake_quant(x, qp))
    dy = torch.randn(shape)
    y.backward(dy)
    y_ref, gx_ref, gl_ref = _tqt_reference(x, tqt.log2_t.detach(), dy, dtype, axis)
    assert torch.equal(y.double(), y_ref)
    assert torch.equal(xa.grad.double(), gx_ref)
    torch.testing.assert_close(tqt.log2_t.grad.double(), gl_ref, rtol=1e-5, atol=1e-6)


def test_tqt_log2_gradient_equals_finite_difference_of_ste_surrogate():
    """With round and ceil replaced by the identity where the STE differentiates through them,
    y(l) = s(l) * (r - x/s0 + x/s(l)) inside and s(l) * (qmin | qmax) outside; its central finite
    difference at l = ceil(log2 t) (float64) must equal the gradient TQT returns."""
    dtype = gpuquant.qint8
    x = torch.randn(500, dtype=torch.float64) * 3
    x[:5] = torch.tensor([500.0, -600.0, 0.0, 1e-3, -7.0], dtype=torch.float64)
    dy = torch.randn(500, dtype=torch.float64)
    tqt = TQT(dtype)
    l0 = 2.3
    tqt(x.float(), QParams(dtype, 2 ** l0 / 128, 0))
    with torch.no_grad():
        tqt.log2_t.fill_(l0)
    tqt(x.float()).mul(dy.float()).sum().backward()
    lc = math.ceil(l0)
    s0 = 2.0 ** lc / 128
    r = torch.round(x / s0)

    def surrogate(l):
        s = 2.0 ** l / 128
        inside = s * (r - x / s0 + x / s)
        y = torch.where(r < dtype.qmin, s * dtype.qmin, torch.where(r > dtype.qmax, s * dtype.qmax, inside))
        return float((dy * y).sum())

    h = 1e-5
    fd = (surrogate(lc + h) - surrogate(lc - h)) / (2 * h)
    assert float(tqt.log2_t.grad) == pytest.approx(fd, rel=1e-4, abs=1e-4)


def test_tqt_training_moves_threshold_to_a_good_clip():
    torch.manual_seed(1)
    x = torch.randn(4000)
    tqt = TQT(gpuquant.qint4)
    tqt(x, QParams(gpuquant.qint4, 40.0 / 8, 0))  # far too wide: amax 40, t = 64
    assert float(tqt.log2_t.detach()) == pytest.approx(math.log2(40.0), rel=1e-6)
    opt = torch.optim.Adam(tqt.parameters(), lr=0.1)
    start = ((tqt(x) - x) ** 2).mean().item()
    for _ in range(80):
        opt.zero_grad()
        ((tqt(x) - x) ** 2).mean().backward()
        opt.step()
    end = ((tqt(x) - x) ** 2).mean().item()
    t = 2.0 ** math.ceil(float(tqt.log2_t.detach()))
    assert end < 0.2 * start, (start, end)
    assert 2.0 <= t <= 8.0, t  # 4-bit N(0,1): the best power-of-two thresholds are 2..4


def test_tqt_init_from_qparams_and_data():
    tqt = TQT(gpuquant.qint8)
    tqt(torch.randn(10), QParams(gpuquant.qint8, 0.1, 0))  # amax = 0.1 * 128
    assert float(tqt.log2_t.detach()) == pytest.approx(math.log2(12.8), rel=1e-6)
    tqt2 = TQT(gpuquant.qint8, axis=0, init="data")
    x = torch.randn(4, 30)
    tqt2(x, QParams(gpuquant.qint8, torch.full((4,), 0.1), 0, axis=0))
    torch.testing.assert_close(tqt2.log2_t.detach(), torch.log2(x.abs().amax(1)))


# ------------------------------------------------------------------------- module plumbing
@pytest.mark.parametrize("make", [lambda: LSQ(gpuquant.quint8, axis=1, symmetric=False),
                                  lambda: TQT(gpuquant.qint8_narrow, axis=1), lambda: LSQ()])
def test_learned_state_dict_round_trip(make):
    a = make()
    x = torch.randn(3, 6, 5) + 0.5
    obs = MinMaxObserver(a.dtype, symmetric=False, axis=getattr(a, "axis", None))
    obs(x)
    a(x, obs.get_qparams())
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(1.37)
    b = make()
    assert b.get_qparams() is None
    b.load_state_dict(a.state_dict())
    assert b.get_qparams() == a.get_qparams()
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("make", [lambda: LSQ(gpuquant.qint8, axis=0, symmetric=False),
                                  lambda: TQT(gpuquant.qint8)])
def test_learned_scales_stay_float32_through_model_dtype_conversion(make):
    """model.to(torch.bfloat16) used to turn the learned scale into a bfloat16 Parameter:
    bfloat16 qparams (the contract: float32) and optimizer steps rounded away."""
    a = make()
    x = torch.randn(4, 8)
    a(x)
    want = a.get_qparams()
    torch.nn.Sequential(a).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    got = a.get_qparams()
    assert got.scale.dtype == torch.float32 and got == want
    assert a(x.bfloat16()).dtype == torch.bfloat16


def test_learned_modules_validate():
    with pytest.raises(ValueError, match="init"):
        LSQ(init="random")
    with pytest.raises(TypeError, match="axis"):
        TQT(axis="0")
    lsq = LSQ(gpuquant.qint8, axis=0)
    with pytest.raises(ValueError, match="axis=None"):
        lsq(torch.randn(3, 4), QParams(gpuquant.qint8, 0.1, 0))
    with pytest.raises(ValueError, match="simulates qint8"):
        lsq(torch.randn(3, 4), QParams(gpuquant.quint8, torch.ones(3), 0, axis=0))
    lsq(torch.randn(3, 4), QParams(gpuquant.qint8, torch.ones(3), 0, axis=0))
    with pytest.raises(ValueError, match="channels"):
        lsq(torch.randn(5, 4))
    with pytest.raises(ValueError, match="out of range"):
        LSQ(axis=3)(torch.randn(3, 4))
    with pytest.raises(TypeError, match="float32"):
        LSQ()(torch.arange(4))
    assert LSQ().disable()(torch.arange(4)) is not None  # disabled: passes anything through


# ------------------------------------------------------------------------- apply_...
def test_apply_fake_quant_with_observer_paths():
    x = torch.randn(8, 16)
    obs = ExponentialMovingAverageObserver()
    fq = FakeQuantize(gpuquant.qint8)
    y = apply_fake_quant_with_observer(x, fq, obs)
    assert torch.equal(y, fake_quant(x, obs.get_qparams()))
    # no fake quant: observe only, return x itself
    obs2 = MinMaxObserver()
    assert apply_fake_quant_with_observer(x, None, obs2) is x and obs2.has_observed
    assert apply_fake_quant_with_observer(x, None, None) is x
    # disabled fake quant: observer still records
    fq.disable()
    obs3 = MinMaxObserver()
    assert apply_fake_quant_with_observer(x, fq, obs3) is x and obs3.has_observed
    fq.enable()
    # disabled observer: qparams frozen
    obs3.disable()
    y2 = apply_fake_quant_with_observer(x * 10, fq, obs3)
    assert torch.equal(y2, fake_quant(x * 10, obs3.get_qparams()))
    assert torch.equal(obs3.max_val, x.max())
    with pytest.raises(ValueError, match="no observer"):
        apply_fake_quant_with_observer(x, fq, None)
    with pytest.raises(ValueError, match="has not observed"):
        apply_fake_quant_with_observer(x, fq, MinMaxObserver().disable())


def test_apply_with_learned_fake_quant_uses_learned_qparams():
    x = torch.randn(8, 16)
    obs = MinMaxObserver(gpuquant.qint8)
    lsq = LSQ(gpuquant.qint8)
    y = apply_fake_quant_with_observer(x, lsq, obs)  # initialises from the observer
    assert torch.equal(y, fake_quant(x, obs.get_qparams()))
    with torch.no_grad():
        lsq.scale.mul_(0.5)
    y2 = apply_fake_quant_with_observer(x, lsq, obs)
    assert torch.equal(y2, fake_quant(x, lsq.get_qparams()))
    assert not torch.equal(y2, fake_quant(x, obs.get_qparams()))
    # no observer: LSQ / TQT initialise from the data
    tqt = TQT(gpuquant.qint8)
    apply_fake_quant_with_observer(x, tqt, None)
    assert float(tqt.log2_t.detach()) == pytest.approx(math.log2(float(x.abs().max())), rel=1e-6)


def test_learned_ops_dispatch_to_a_backend_op(monkeypatch):
    """A backend registering "lsq_fake_quant" / "tqt_fake_quant" receives the documented
    arguments (the Triton issue plugs its fused kernels in this way)."""
    from gpuquant.quantization import fake_quant as fqmod
    calls = []

    def lsq_op(x, scale, zero_point, qmin, qmax, axis, grad_factor):
        calls.append(("lsq", qmin, qmax, axis, grad_factor, tuple(scale.shape)))
        return fqmod._LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)

    def tqt_op(x, log2_t, qmin, qmax, axis):
        calls.append(("tqt", qmin, qmax, axis))
        return fqmod._TQTFakeQuant.apply(x, log2_t, qmin, qmax, axis)

    mod = types.ModuleType("_gq_test_learned_backend")
    mod.NAME, mod.DEVICES, mod.PRIORITY = "learned_test", frozenset({"cpu"}), 0
    mod.OPS = {"lsq_fake_quant": lsq_op, "tqt_fake_quant": tqt_op}
    mod.is_available = lambda: (True, "")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(registry._MODULES, "learned_test", mod.__name__)
    monkeypatch.delitem(registry._loaded, "learned_test", raising=False)
    x = torch.randn(4, 6, 5)
    with gpuquant.backends.use("learned_test"):
        lsq = LSQ(gpuquant.qint8_narrow, axis=-1)
        y = lsq(x.requires_grad_(True), QParams(gpuquant.qint8_narrow, torch.full((5,), 0.02), 0, axis=-1))
        y.sum().backward()
        TQT(gpuquant.qint4)(x, QParams(gpuquant.qint4, 0.3, 0))
    registry.unregister("learned_test")
    assert calls[0] == ("lsq", -127, 127, 2, 1.0 / math.sqrt(120 * 127), (5,))
    assert calls[1] == ("tqt", -8, 7, None)
    assert lsq.scale.grad is not None


@pytest.mark.gpu
def test_learned_fake_quant_on_cuda_matches_cpu_and_never_syncs():
    x = torch.randn(8, 16, 9)
    qp = QParams(gpuquant.qint8_narrow, torch.rand(16) * 0.05 + 0.01, 0, axis=1)
    cpu = LSQ(gpuquant.qint8_narrow, axis=1)
    gpu = LSQ(gpuquant.qint8_narrow, axis=1).cuda()
    cpu(x, qp)
    gpu(x.cuda(), qp.to("cuda"))
    tq = TQT(gpuquant.qint8).cuda()
    tq(x.cuda(), QParams(gpuquant.qint8, 0.1, 0).to("cuda"))
    xa = x.clone().requires_grad_(True)
    xb = x.cuda().requires_grad_(True)
    dy = torch.randn_like(x)
    cpu(xa).backward(dy)
    dy_gpu = dy.cuda()  # a copy from pageable host memory syncs: outside the checked region
    torch.cuda.synchronize()
    with gpuquant.backends.use("reference"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = gpu(xb)
            y.backward(dy_gpu)
            tq(xb).sum().backward()
            gpu.get_qparams(), tq.get_qparams()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y.cpu(), cpu(x))
    torch.testing.assert_close(gpu.scale.grad.cpu(), cpu.scale.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LSQ, TQT])
@pytest.mark.parametrize("x", [torch.tensor([float("inf"), 1.0]),
                               torch.tensor([0.5, float("nan")]), torch.empty(0)],
                         ids=["inf", "nan", "empty"])
def test_learned_quantizers_refuse_to_start_from_a_non_finite_or_empty_batch(cls, x):
    """The data init would set the learned scale to NaN / Inf for good."""
    fq = cls()
    with pytest.raises(ValueError, match="initialises .* from the data"):
        fq(x)
    y = fq(torch.randn(16))  # still uninitialised: a clean batch starts it
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("cls", [LSQ, TQT])
@pytest.mark.parametrize("observer", [
    lambda: ExponentialMovingAverageObserver(0.9, gpuquant.qint8, check_finite=False),
    lambda: MinMaxObserver(gpuquant.qint8, check_finite=False),
    lambda: gpuquant.quantization.HistogramObserver(gpuquant.qint8, check_finite=False)],
    ids=["ema", "minmax", "histogram"])
def test_learned_quantizers_refuse_to_start_from_an_observer_that_kept_no_batch(cls, observer):
    """check_finite=False drops a NaN / Inf batch on the device and the observer still
    reports has_observed, with the qparams of an empty range (scale eps): LSQ / TQT started
    from them, and the layer's outputs stayed ~0 (a learned scale of 1.2e-7). Now the first
    call refuses, the learned quantizer stays uninitialised, and a finite batch starts it
    from the observer's range."""
    obs, fq = observer(), cls(gpuquant.qint8)
    x = torch.randn(256) * 3
    bad = x.clone()
    bad[int(torch.randint(256, ()))] = float("inf")
    with pytest.raises(ValueError, match=r"kept no batch.*nonfinite_batches = 1"):
        apply_fake_quant_with_observer(bad, fq, obs)
    assert fq.get_qparams() is None
    y = apply_fake_quant_with_observer(x, fq, obs)
    qp = fq.get_qparams()
    assert float(qp.scale) > 1e-3
    assert (y - x).abs().max() <= float(qp.scale)
