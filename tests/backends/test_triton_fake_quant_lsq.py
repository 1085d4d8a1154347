"""Triton LSQ / TQT: forward bit-identical, x-gradient bit-identical, scale / zero point /
log2_t gradients equal to torch._fake_quantize_learnable_* and to gpuquant's torch
definition (gpuquant.quantization.fake_quant) to float32 rounding of the sums."""
import pytest
import torch

import gpuquant
import gpuquant.backends as backends
from gpuquant.backends.triton import lsq as tlsq
from gpuquant.quantization import fake_quant as qfq

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_triton():
    """The triton backend explicitly: on CPU the fused QAT ops run the interpreter only then."""
    with backends.use("triton"):
        yield

CASES = [
    # (shape, axis, memory format)
    ((5, 33), None, None),
    ((2, 6, 5, 3), None, torch.channels_last),
    ((3, 13, 4, 5), 1, torch.channels_last),
    ((9, 4, 3, 3), 0, None),
    ((9, 4, 3, 3), 0, torch.channels_last),     # channels_last weights: rows in memory order
    ((3, 4, 7), 2, None),
    ((3, 17, 5), 1, None),
]


def sum_close(a, b):
    """Sums of many float32 terms added in different orders: equal to float32 rounding."""
    tol = 2e-6 * max(1.0, float(b.abs().max())) * 8
    assert a.shape == b.shape and a.dtype == b.dtype
    assert float((a - b).abs().max()) <= tol, (a, b)


def params(shape, axis, d):
    sshape = () if axis is None else (shape[axis],)
    s = torch.rand(sshape, device=DEV) * 0.05 + 0.01
    # non-negative and non-integer: the forward rounds it. (torch's per-tensor learnable
    # backward takes trunc(zp + 0.5), which differs from the forward's rne(zp) for negative
    # zero points; gpuquant uses rne(zp) in both.)
    z = torch.randint(0, d.qmax // 2 + 1, sshape, device=DEV).float()
    return s, z + 0.3


def run_lsq(fn, x, s, z, d, axis, gf, g):
    xx = x.detach().clone().requires_grad_()
    ss, zz = s.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    y = fn(xx, ss, zz, d.qmin, d.qmax, axis, gf)
    y.backward(g)
    return y.detach(), xx.grad, ss.grad, zz.grad


def run_tqt(x, lt, d, axis, g):
    """(ours, the definition's): (output, grad x, grad log2 t) of the TQT op each."""
    out = []
    for fn in (lambda *a: tlsq.tqt_fake_quant(*a, programs=3, tile=64), qfq._TQTFakeQuant.apply):
        xx, ll = x.clone().requires_grad_(), lt.clone().requires_grad_()
        y = fn(xx, ll, d.qmin, d.qmax, axis)
        y.backward(g)
        out.append((y.detach(), xx.grad, ll.grad))
    return out


@pytest.mark.parametrize("d", [gpuquant.qint8, gpuquant.quint8, gpuquant.qint4],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,fmt", CASES, ids=str)
def test_lsq_matches_torch_learnable_and_definition(d, shape, axis, fmt):
    x = torch.randn(shape, device=DEV) * 1.5
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    s, z = params(shape, axis, d)
    g = torch.randn(shape, device=DEV)
    gf = 0.37
    ours = run_lsq(lambda *a: tlsq.lsq_fake_quant(*a, programs=3, tile=64), x, s, z, d, axis, gf, g)
    defn = run_lsq(qfq._LSQFakeQuant.apply, x, s, z, d, axis, gf, g)
    if axis is None:
        tfn = lambda xx, ss, zz, lo, hi, ax, f: torch._fake_quantize_learnable_per_tensor_affine(
            xx, ss.reshape(1), zz.reshape(1), lo, hi, f)
    else:
        tfn = lambda xx, ss, zz, lo, hi, ax, f: torch._fake_quantize_learnable_per_channel_affine(
            xx, ss, zz, ax, lo, hi, f)
    theirs = run_lsq(tfn, x, s, z, d, axis, gf, g)
    for other in (defn, theirs):
        assert torch.equal(ours[0], other[0]) and torch.equal(ours[1], other[1])
        sum_close(ours[2], other[2].reshape(ours[2].shape))
        sum_close(ours[3], other[3].reshape(ours[3].shape))
    assert ours[1].stride() == x.stride()


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_lsq_half_inputs_match_definition(dt):
    d = gpuquant.qint8
    shape, axis = (4, 6, 5, 3), 1
    x = (torch.randn(shape, device=DEV) * 1.5).to(dt).contiguous(memory_format=torch.channels_last)
    s, z = params(shape, axis, d)
    g = torch.randn(shape, device=DEV).to(dt)
    ours = run_lsq(tlsq.lsq_fake_quant, x, s, z, d, axis, 0.1, g)
    defn = run_lsq(qfq._LSQFakeQuant.apply, x, s, z, d, axis, 0.1, g)
    assert ours[0].dtype == dt and torch.equal(ours[0], defn[0]) and torch.equal(ours[1], defn[1])
    sum_close(ours[2], defn[2])
    sum_close(ours[3], defn[3])


@pytest.mark.parametrize("d", [gpuquant.qint8, gpuquant.quint4], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,fmt", CASES[::2] + CASES[3:4], ids=str)
def test_tqt_matches_definition(d, shape, axis, fmt):
    x = torch.randn(shape, device=DEV) * 2
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    sshape = () if axis is None else (shape[axis],)
    lt = torch.randn(sshape, device=DEV) * 0.7 + 0.8
    g = torch.randn(shape, device=DEV)
    (y, gx, gl), (yr, gxr, glr) = run_tqt(x, lt, d, axis, g)
    assert torch.equal(y, yr) and torch.equal(gx, gxr)
    sum_close(gl, glr)


def test_backward_is_deterministic_and_split_independent():
    d = gpuquant.qint8
    x = torch.randn(7, 3, 11, device=DEV)
    s, z = params(x.shape, 1, d)
    g = torch.randn(x.shape, device=DEV)
    a = run_lsq(lambda *t: tlsq.lsq_fake_quant(*t, programs=5, tile=16), x, s, z, d, 1, 0.5, g)
    b = run_lsq(lambda *t: tlsq.lsq_fake_quant(*t, programs=5, tile=16), x, s, z, d, 1, 0.5, g)
    c = run_lsq(lambda *t: tlsq.lsq_fake_quant(*t, programs=1), x, s, z, d, 1, 0.5, g)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # same device, same bits
    sum_close(a[2], c[2])
    plan = tlsq.row_plan(x, 1, tile=16, programs=5)
    assert plan.split > 1  # the two-stage path is exercised
    # its second stage ran in the last program, which left the ticket zero
    assert not bool(tlsq.launch_tickets(1, x.device).any())


def test_lsq_module_runs_triton_op():
    d = gpuquant.qint8_narrow
    w = torch.randn(6, 4, 3, 3, device=DEV)
    fq = gpuquant.quantization.LSQ(d, axis=0).to(DEV)
    ref = gpuquant.quantization.LSQ(d, axis=0).to(DEV)
    out = []
    for mod, backend in ((fq, "triton"), (ref, "reference")):
        ww = w.clone().requires_grad_()
        with backends.use(backend):
            y = mod(ww)
        y.square().sum().backward()
        out.append((y.detach(), ww.grad, mod.scale.grad))
    (y, gw, gs), (yr, gwr, gsr) = out
    assert torch.equal(y, yr) and torch.equal(gw, gwr)
    sum_close(gs, gsr)


def test_input_errors():
    x = torch.randn(4, 5, device=DEV)
    s, z = torch.ones(5, device=DEV), torch.zeros(5, device=DEV)
    with pytest.raises(ValueError, match="scale must have 4 value"):
        tlsq.lsq_fake_quant(x, s, z, -128, 127, 0, 1.0)
    with pytest.raises(TypeError, match="zero_point must be a float tensor"):
        tlsq.lsq_fake_quant(x, s, z.int(), -128, 127, 1, 1.0)
    with pytest.raises(ValueError, match="axis 3 out of range"):
        tlsq.tqt_fake_quant(x, s, -128, 127, 3)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        tlsq.tqt_fake_quant(x.int(), s, -128, 127, 1)


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter question only arises on CPU")
def test_cpu_without_explicit_triton_runs_the_definition():
    x = torch.randn(3, 4, requires_grad=True)
    s, z = torch.tensor(0.1, requires_grad=True), torch.tensor(0.0)
    with backends.use("reference"):
        y = tlsq.lsq_fake_quant(x, s, z, -128, 127, None, 1.0)
    assert "LSQFakeQuant" in type(y.grad_fn).__name__ and "LSQFunction" not in type(y.grad_fn).__name__
    y = tlsq.lsq_fake_quant(x, s, z, -128, 127, None, 1.0)  # fixture: use("triton")
    assert "LSQFunction" in type(y.grad_fn).__name__


def _same_or_both_nan(a, b, close=False):
    """Equal where finite (or close, for sums), NaN exactly where the other has NaN."""
    assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan()), (a, b)
    if close:
        sum_close(torch.nan_to_num(a), torch.nan_to_num(b))
    else:
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("axis", [None, 1])
def test_nan_learned_parameters_give_the_definitions_nans(axis):
    """A NaN zero point or scale of LSQ and a NaN log2_t of TQT (a NaN training step: the
    modules call the op unchecked) give what the torch definition gives: NaN outputs where
    the NaN qparam applies, and no gradient from there (every r there is NaN: neither inside,
    below nor above; TQT's log2_t gradient, a multiple of the NaN scale, is NaN), the other
    channels' as usual. The zero point's clamp and TQT's
    exponent clamp dropped the NaN on the GPU (max.f32): finite outputs and gradients from a
    zero point of qmin or a scale of 2^-126 / (qmax + 1) (the PTX checks in
    test_triton_ptx_fake_quant.py)."""
    d = gpuquant.qint8
    shape = (5, 3, 7)
    x = torch.randn(shape, device=DEV) * 1.5
    x[0, 0, 0] = float("nan")
    g = torch.randn(shape, device=DEV)
    nan = float("nan")
    cases = []
    s, z = params(shape, axis, d)
    if axis is None:
        cases += [(s, torch.tensor(nan, device=DEV)), (torch.tensor(nan, device=DEV), z)]
    else:
        zn, sn = z.clone(), s.clone()
        zn[1], sn[2] = nan, nan
        cases += [(s, zn), (sn, z)]
    for s, z in cases:
        ours = run_lsq(lambda *a: tlsq.lsq_fake_quant(*a, programs=3, tile=64), x, s, z, d,
                       axis, 0.37, g)
        defn = run_lsq(qfq._LSQFakeQuant.apply, x, s, z, d, axis, 0.37, g)
        bad = (s.isnan() | z.isnan()).reshape(-1)
        assert bool(ours[0].isnan().any())
        assert bool(torch.isfinite(ours[2]).all()) and bool(torch.isfinite(ours[3]).all())
        assert not bool(ours[2].reshape(-1)[bad].any()) and not bool(ours[3].reshape(-1)[bad].any())
        for a, b, close in zip(ours, defn, (False, False, True, True)):
            _same_or_both_nan(a, b.reshape(a.shape), close)
    lt = torch.full(() if axis is None else (shape[axis],), 0.8, device=DEV)
    lt.view(-1)[-1] = nan
    out = run_tqt(x, lt, d, axis, g)
    # (TQT's gradient is a multiple of the scale: NaN for the NaN log2_t's channel only)
    assert bool(out[0][0].isnan().any())
    assert torch.equal(out[0][2].isnan(), lt.isnan())
    for a, b, close in zip(out[0], out[1], (False, False, True)):
        _same_or_both_nan(a, b, close)


@pytest.mark.parametrize("axis", [None, 1])
def test_nan_inputs_give_no_gradient_on_every_backend(axis):
    """A NaN in x: the output NaN there, and no gradient from there, to x, the scale, the
    zero point or log2_t (as the straight-through rule: a NaN is not in [qmin, qmax]): the
    qparams' gradients are those of x with that element's dy zeroed. (The gradient had
    passed at NaN and the scale's became NaN: one NaN input poisoned the learned scale.)"""
    d = gpuquant.qint8
    shape = (4, 3, 6)
    x = torch.randn(shape, device=DEV) * 1.5
    g = torch.randn(shape, device=DEV)
    nanpos = torch.zeros(shape, dtype=torch.bool, device=DEV)
    nanpos[0, 1, 2] = nanpos[3, 0, 5] = True
    xn = x.masked_fill(nanpos, float("nan"))
    g0 = g.masked_fill(nanpos, 0.0)
    s, z = params(shape, axis, d)
    for fn in (lambda *a: tlsq.lsq_fake_quant(*a, programs=3, tile=64),
               qfq._LSQFakeQuant.apply):
        y, dx, ds, dz = run_lsq(fn, xn, s, z, d, axis, 0.37, g)
        _, dx0, ds0, dz0 = run_lsq(fn, x, s, z, d, axis, 0.37, g0)
        assert torch.equal(y.isnan(), nanpos)
        assert torch.equal(dx, dx0) and not bool(dx[nanpos].any())
        sum_close(ds, ds0)
        sum_close(dz, dz0)
    lt = torch.full(() if axis is None else (shape[axis],), 0.8, device=DEV)
    with_nan, without = run_tqt(xn, lt, d, axis, g), run_tqt(x, lt, d, axis, g0)
    for (y, dx, dl), (_, dx0, dl0) in zip(with_nan, without):
        assert torch.equal(y.isnan(), nanpos) and torch.equal(dx, dx0)
        sum_close(dl, dl0)


@pytest.mark.parametrize("log2_t", [127.5, 1000.0, -125.5, -130.0, -200.0])
def test_tqt_exponent_clamp_is_the_definitions(log2_t):
    """A learned log2_t past float32's exponent range (the module calls the op unchecked):
    the definition clamps ceil(log2_t) to [-126, 127] as the kernel builds the power of two,
    so both give the same outputs and gradients (the definition had given NaN at 127.5,
    and 0 where the kernel's smallest scale gave 1.17e-38 at -200)."""
    d = gpuquant.qint8
    x = torch.tensor([[0.3, -1.0, 2.0, 1e-39], [5e37, -3e38, 0.0, -1e-30]], device=DEV)
    g = torch.randn(x.shape, device=DEV)
    ours, defn = run_tqt(x, torch.tensor(log2_t, device=DEV), d, None, g)
    assert bool(torch.isfinite(ours[0]).all()) and bool(torch.isfinite(ours[2]).all())
    for a, b, close in zip(ours, defn, (False, False, True)):
        _same_or_both_nan(a, b, close)
