"""Triton fake_quant (+ STE backward) against torch.fake_quantize_* and the reference backend.

On a CPU-only machine the kernels run through the Triton interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU machine the same tests run on the device. Bit-identical means
equal bit patterns (so -0.0 vs 0.0 and NaN payload positions count), not just ``==``.
"""
import pytest
import torch

import gpuquant
import gpuquant.backends as backends
from gpuquant.backends import reference as ref
from gpuquant.backends.triton import fake_quant as tfq

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [gpuquant.qint8, gpuquant.qint8_narrow, gpuquant.quint8, gpuquant.qint4, gpuquant.quint4]
SMALL = 64  # small blocks: many programs and a ragged tail even for small tensors


@pytest.fixture(autouse=True)
def _on_triton():
    """The triton backend explicitly: on CPU the fused QAT ops run the interpreter only then."""
    with backends.use("triton"):
        yield


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    iview = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return torch.equal(a.contiguous().view(iview[a.dtype]), b.contiguous().view(iview[b.dtype]))


def bits_equal_but_nan_payloads(a: torch.Tensor, b: torch.Tensor) -> bool:
    """:func:`bits_equal` with every NaN equal to every other: torch's own NaN bytes depend on
    the path (its vectorised CPU float -> bfloat16 conversion makes 0xFFFF, the scalar one
    0x7FC0, CUDA's 0x7FFF; float16 keeps a payload or quiets it)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and bits_equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def run_ours(x, scale, zp, d, axis, grad, block=SMALL):
    xx = x.detach().clone().requires_grad_()
    y = tfq.fake_quant(xx, scale, zp, d.qmin, d.qmax, axis, block=block)
    y.backward(grad)
    return y.detach(), xx.grad


def run_torch(x, scale, zp, d, axis, grad):
    xx = x.detach().clone().requires_grad_()
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xx, scale, zp, d.qmin, d.qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(xx, scale, zp, axis, d.qmin, d.qmax)
    y.backward(grad)
    return y.detach(), xx.grad


def run_ref(x, scale, zp, d, axis, grad):
    xx = x.detach().clone().requires_grad_()
    y = ref.fake_quant(xx, scale, zp, d.qmin, d.qmax, axis)
    y.backward(grad)
    return y.detach(), xx.grad


def qparams_for(d, c=None):
    shape = () if c is None else (c,)
    scale = (torch.rand(shape, device=DEV) * 0.2 + 0.005).float()
    lo, hi = d.qmin // 2, d.qmax // 2 + 1
    zp = torch.randint(lo, hi, shape, device=DEV, dtype=torch.int32)
    return scale, zp


def spread_input(shape, scale_max=0.2, qspan=256, device=DEV):
    """Values spanning well past the range, with exact ties and clamp edges mixed in."""
    x = torch.randn(shape, device=device) * scale_max * qspan / 3
    return x


# --------------------------------------------------------------------------- per-tensor
@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 5), (4, 3, 11, 13)])
def test_per_tensor_matches_torch_and_reference(d, shape):
    scale, zp = qparams_for(d)
    x = spread_input(shape, qspan=d.qmax - d.qmin)
    g = torch.randn(shape, device=DEV)
    y, gx = run_ours(x, scale, zp, d, None, g)
    yt, gxt = run_torch(x, scale, zp, d, None, g)
    yr, gxr = run_ref(x, scale, zp, d, None, g)
    assert bits_equal(y, yt) and bits_equal(gx, gxt)
    assert bits_equal(y, yr) and bits_equal(gx, gxr)


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_ties_and_clamp_edges(d):
    # scale a power of two: x * inv_scale is exact, so k + 0.5 are true ties (rne: to even)
    scale = torch.tensor(2.0 ** -5, device=DEV)
    zp = torch.tensor((d.qmin + d.qmax + 1) // 2 if d.qmin == 0 else 0, dtype=torch.int32,
                      device=DEV)
    z = int(zp)
    ks = torch.arange(d.qmin - z - 4, d.qmax - z + 5, dtype=torch.float32, device=DEV)
    vals = torch.cat([ks, ks + 0.5, ks - 0.5, ks + 0.49999997, ks - 0.49999997,
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30], device=DEV)])
    x = vals * float(scale)
    # near-ties that an fma (single rounding of x * inv + 2^23) would round the other way
    s2 = torch.tensor(0.1, device=DEV)
    x2 = (ks + 0.5) * 0.1
    g = torch.randn(x.shape, device=DEV)
    for xs, sc in ((x, scale), (x2, s2)):
        gg = g[: xs.numel()]
        y, gx = run_ours(xs, sc, zp, d, None, gg)
        yt, gxt = run_torch(xs, sc, zp, d, None, gg)
        assert bits_equal(y, yt), (xs[y != yt], y[y != yt], yt[y != yt])
        assert bits_equal(gx, gxt)
    # the edges: exactly qmin/qmax pass the gradient, one step beyond does not
    y, gx = run_ours(x, scale, zp, d, None, torch.ones_like(x))
    r = torch.round(x / scale) + z
    assert torch.equal(gx != 0, (r >= d.qmin) & (r <= d.qmax))


# --------------------------------------------------------------------------- per-channel
CASES = [
    # (shape, axis, memory format)
    ((7, 5), 0, None),
    ((7, 5), 1, None),
    ((3, 33, 7), 2, None),
    ((3, 33, 7), 1, None),
    ((2, 13, 5, 3), 1, torch.channels_last),   # NHWC activations: channel innermost
    ((17, 6, 3, 3), 0, None),                  # (out, in, kh, kw) weights
    ((17, 6, 3, 3), 0, torch.channels_last),
    ((5, 1, 4), 1, None),                      # one channel
]


@pytest.mark.parametrize("d", [gpuquant.qint8, gpuquant.quint8, gpuquant.qint4],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,fmt", CASES, ids=str)
def test_per_channel_matches_torch_and_reference(d, shape, axis, fmt):
    scale, zp = qparams_for(d, shape[axis])
    x = spread_input(shape, qspan=d.qmax - d.qmin)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    g = torch.randn(shape, device=DEV)
    y, gx = run_ours(x, scale, zp, d, axis, g)
    yt, gxt = run_torch(x, scale, zp, d, axis, g)
    yr, gxr = run_ref(x, scale, zp, d, axis, g)
    assert bits_equal(y, yt) and bits_equal(gx, gxt)
    assert bits_equal(y, yr) and bits_equal(gx, gxr)
    assert y.stride() == x.stride()  # no layout change, no hidden contiguous copy
    assert gx.stride() == x.stride()


def test_per_channel_other_layouts():
    d = gpuquant.qint8_narrow
    base = spread_input((6, 5, 7))
    g = torch.randn(6, 5, 7, device=DEV)
    for x in (base.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # dense, odd permutation
              base[:, :, ::2].contiguous(),                           # shapes change below
              torch.randn(6, 5, 14, device=DEV)[:, :, ::2] * 10):     # not dense: copied
        for axis in range(3):
            scale, zp = qparams_for(d, x.shape[axis])
            gg = g[..., : x.shape[2]].contiguous()
            y, gx = run_ours(x, scale, zp, d, axis, gg)
            yt, gxt = run_torch(x, scale, zp, d, axis, gg)
            assert bits_equal(y, yt) and bits_equal(gx, gxt)


def test_wide_channel_index_path():
    """The int64 channel arithmetic used once stride * C passes 2^31 gives the same result."""
    d = gpuquant.qint8
    x = spread_input((5, 9, 11)).contiguous(memory_format=torch.contiguous_format)
    scale, zp = qparams_for(d, 9)
    y1, _ = tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, 1, False, SMALL)
    y2, _ = tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, 1, False, SMALL, wide=True)
    yt = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, d.qmin, d.qmax)
    assert bits_equal(y1, yt) and bits_equal(y2, yt)


@pytest.mark.parametrize("c,shape", [(8, (3, 8, 5, 7)), (64, (2, 64, 3, 5)),
                                     (32, (1, 32, 1, 1)), (16, (5, 16, 9, 9))])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qmode", [0, 1, 2])
def test_channels_innermost_tile_path_equals_general_path(c, shape, dt, qmode):
    """channels_last activations with a power-of-two channel count take the (rows, C) tile
    path (qparams loaded once a program); it gives the general path's bytes: output and bit
    mask, every qparams mode (int zero point, LSQ's float zero point, TQT's log2_t), ragged
    tails (numel not a multiple of the block)."""
    d = gpuquant.qint8
    x = spread_input(shape).to(dt).contiguous(memory_format=torch.channels_last)
    scale, zp = qparams_for(d, c)
    if qmode == 1:
        zp = zp.float() + torch.rand(c, device=DEV) - 0.5
    elif qmode == 2:
        scale = torch.randn(c, device=DEV) - 3.0  # log2 thresholds
    block = 256 if x.numel() >= 256 else 64
    ys = [tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, 1, True, block, qmode=qmode,
                                 c_inner_ok=ok) for ok in (True, False)]
    (y1, m1), (y2, m2) = ys
    assert bits_equal(y1, y2) and torch.equal(m1, m2)
    assert y1.stride() == x.stride()
    if qmode != 2:  # the tile path divides the scales itself: torch's 1 / scale, bit for bit
        y3, m3 = tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, 1, True, block,
                                        qmode=qmode, inv=1.0 / scale)
        assert bits_equal(y1, y3) and torch.equal(m1, m3)
    if qmode == 0:
        yt = torch.fake_quantize_per_channel_affine(x.float(), scale, zp, 1, d.qmin, d.qmax)
        assert bits_equal(y1, yt.to(dt))


# --------------------------------------------------------------------------- dtypes, NaN
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [None, 1])
def test_half_dtypes_match_reference(dt, axis):
    d = gpuquant.qint8
    shape = (4, 9, 6, 5)
    x = spread_input(shape).to(dt).contiguous(memory_format=torch.channels_last)
    scale, zp = qparams_for(d, None if axis is None else 9)
    g = torch.randn(shape, device=DEV).to(dt)
    y, gx = run_ours(x, scale, zp, d, axis, g)
    yr, gxr = run_ref(x, scale, zp, d, axis, g)
    assert y.dtype == dt and gx.dtype == dt
    assert bits_equal(y, yr) and bits_equal(gx, gxr)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_nan_inf_and_signed_zero_gradients():
    d = gpuquant.qint8
    scale, zp = torch.tensor(0.1, device=DEV), torch.tensor(0, dtype=torch.int32, device=DEV)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1e9, 3e38, 0.04, -0.06],
                     device=DEV)
    g = torch.tensor([1.0, 1.0, 1.0, float("nan"), -2.0, 1.0, -3.0, float("inf")], device=DEV)
    y, gx = run_ours(x, scale, zp, d, None, g)
    yr, gxr = run_ref(x, scale, zp, d, None, g)
    assert torch.isnan(y[0]) and not torch.isnan(y[1:]).any()
    assert float(y[1]) == pytest.approx(12.7) and float(y[2]) == pytest.approx(-12.8)
    assert bits_equal(y, yr) and bits_equal(gx, gxr)  # includes -0.0 = -2 * 0 and NaN * 1
    assert gx[0] == 0 and torch.isnan(gx[3])


def test_no_grad_forward_skips_mask_and_matches():
    d = gpuquant.quint8
    x = spread_input((123,))
    scale, zp = qparams_for(d)
    y1, m1 = tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, None, False, SMALL)
    y2, m2 = tfq.fake_quant_forward(x, scale, zp, d.qmin, d.qmax, None, True, SMALL)
    assert m1 is None and m2.numel() == (123 + 7) // 8
    assert bits_equal(y1, y2)
    # bit i % 8 of byte i // 8 holds element i's in-range flag
    r = torch.round(x * (1.0 / scale)) + zp
    inr = ((r >= d.qmin) & (r <= d.qmax)).to(torch.int32)
    packed = torch.zeros(16 * 8, dtype=torch.int32, device=DEV)
    packed[:123] = inr
    expect = (packed.reshape(-1, 8) << torch.arange(8, device=DEV)).sum(1).to(torch.uint8)
    assert torch.equal(m2, expect)


def test_expanded_and_strided_incoming_gradient():
    d = gpuquant.qint8
    x = spread_input((2, 8, 3, 5)).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, zp = qparams_for(d, 8)
    y = tfq.fake_quant(x, scale, zp, d.qmin, d.qmax, 1, block=SMALL)
    y.sum().backward()  # the incoming gradient is an expanded (stride 0) tensor
    r = torch.round(x.detach() * (1.0 / scale).reshape(1, -1, 1, 1)) + zp.reshape(1, -1, 1, 1)
    mask = ((r >= d.qmin) & (r <= d.qmax)).float()
    assert torch.equal(x.grad, mask)
    assert x.grad.stride() == x.stride()
    # an incoming gradient in another layout (contiguous against x's channels_last) and in
    # x's own (read as it is)
    for g in (torch.randn(x.shape, device=DEV),
              torch.randn(x.shape, device=DEV).contiguous(memory_format=torch.channels_last)):
        y = tfq.fake_quant(x, scale, zp, d.qmin, d.qmax, 1, block=SMALL)
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g * mask) and gx.stride() == x.stride()


def test_empty_and_scalar():
    d = gpuquant.qint8
    scale, zp = qparams_for(d)
    e = torch.empty(0, 3, device=DEV, requires_grad=True)
    y = tfq.fake_quant(e, scale, zp, d.qmin, d.qmax, None)
    y.sum().backward()
    assert y.shape == (0, 3) and e.grad.shape == (0, 3)
    s = torch.tensor(0.33, device=DEV)
    y, _ = run_ours(s, scale, zp, d, None, torch.tensor(1.0, device=DEV))
    yt, _ = run_torch(s.reshape(1), scale, zp, d, None, torch.ones(1, device=DEV))
    assert bits_equal(y.reshape(1), yt)


# --------------------------------------------------------------------------- dispatch, errors
def test_functional_dispatches_to_triton():
    d = gpuquant.qint8_narrow
    x = spread_input((5, 7)).requires_grad_()
    qp = gpuquant.QParams(d, torch.rand(7) * 0.1 + 0.01, torch.zeros(7, dtype=torch.int32), axis=1)
    qp = qp.to(DEV)
    with backends.use("triton"):
        y = gpuquant.functional.fake_quant(x, qp)
    assert y.grad_fn is not None and "FakeQuantFunction" in type(y.grad_fn).__name__
    yt = torch.fake_quantize_per_channel_affine(x, qp.scale, qp.zero_point, 1, d.qmin, d.qmax)
    assert bits_equal(y.detach(), yt.detach())


def test_input_errors():
    x = torch.randn(4, 5, device=DEV)
    s, z = torch.ones(5, device=DEV), torch.zeros(5, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        tfq.fake_quant(x.double(), s, z, -128, 127, 1)
    with pytest.raises(ValueError, match="axis 2 out of range"):
        tfq.fake_quant(x, s, z, -128, 127, 2)
    with pytest.raises(ValueError, match="4 channels along axis 0"):
        tfq.fake_quant(x, s, z, -128, 127, 0)
    with pytest.raises(ValueError, match="per-tensor needs one scale"):
        tfq.fake_quant(x, s, z, -128, 127, None)
    with pytest.raises(ValueError, match="qmin <= qmax"):
        tfq.fake_quant(x, s, z, 5, -5, 1)


def every_half_value(dt, device=DEV):
    """All 65536 bit patterns of float16 / bfloat16 (NaNs of every payload and sign, both
    infinities and zeros, subnormals), in a shuffled order."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    return bits[torch.randperm(bits.numel())].view(dt).to(device)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_every_half_value_matches_reference(dt):
    """Every float16 / bfloat16 input through the forward and backward kernels, per tensor
    (flat) and per channel (channels_last, the channel-tile path), scales with exact ties
    (2^-3) and without (0.1): bit for bit the reference backend's (torch's ops on the same
    device; NaN bytes aside, which torch itself makes differently by path). Compiled, the
    kernels round with the hardware's ``cvt.rni`` and convert with its ``cvt.rn.bf16``,
    which the interpreter emulates; on a GPU (the gpu-marked test below runs this) this is
    what checks those instructions against torch's conversion. Under the interpreter it
    also covers the subnormal bfloat16 gradients that its own conversion gets wrong."""
    same = bits_equal_but_nan_payloads
    x, g = every_half_value(dt), every_half_value(dt)
    z = torch.tensor(3, dtype=torch.int32, device=DEV)
    for d in (gpuquant.qint8, gpuquant.quint8):
        for s in (2.0 ** -3, 0.1):
            sc = torch.tensor(s, device=DEV)
            y, gx = run_ours(x, sc, z, d, None, g, block=tfq.BLOCK)  # (few programs)
            yr, gxr = run_ref(x, sc, z, d, None, g)
            assert same(y, yr) and same(gx, gxr), (dt, d.name, s)
    xc = x.view(16, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    gc = g.view(16, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    sc = torch.rand(64, device=DEV) * 0.2 + 0.01
    sc[:8] = 2.0 ** -torch.arange(8, device=DEV, dtype=torch.float32)  # exact ties
    zc = torch.randint(-5, 6, (64,), dtype=torch.int32, device=DEV)
    y, gx = run_ours(xc, sc, zc, gpuquant.qint8, 1, gc, block=tfq.BLOCK)
    yr, gxr = run_ref(xc, sc, zc, gpuquant.qint8, 1, gc)
    assert same(y, yr) and same(gx, gxr), dt


@pytest.mark.gpu
def test_every_half_value_on_the_gpu():
    """The test above on the device: the compiled rounding and bfloat16 conversion."""
    for dt in (torch.bfloat16, torch.float16):
        test_every_half_value_matches_reference(dt)


@pytest.mark.gpu
def test_more_than_2_31_elements_on_gpu():
    """64-bit offsets: the elements past 2^31 (and the wide per-channel index) are right."""
    n = 2 ** 31 + 3001
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_().mul_(4).requires_grad_()
    s = torch.tensor(0.03, device="cuda")
    z = torch.tensor(3, dtype=torch.int32, device="cuda")
    y = tfq.fake_quant(x, s, z, -128, 127, None)
    tail = slice(n - 9000, n)
    xt = x.detach()[tail]
    assert bits_equal(y.detach()[tail], run_ref(xt, s, z, gpuquant.qint8, None, torch.ones_like(xt))[0])
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    r = torch.round(xt.float() * (1.0 / s)) + z
    assert torch.equal(gx[tail] != 0, (r >= -128) & (r <= 127))
    del y, gx
    w = x.detach()[: 2 * (2 ** 30 + 8)].reshape(2, -1)  # per-channel, axis 0: stride * C > 2^31
    sc = torch.tensor([0.02, 0.05], device="cuda")
    zc = torch.tensor([0, -4], dtype=torch.int32, device="cuda")
    yw, _ = tfq.fake_quant_forward(w, sc, zc, -128, 127, 0, False)
    for c in range(2):
        part = w[c, -5000:]
        want = run_ref(part, sc[c], zc[c], gpuquant.qint8, None, torch.ones_like(part))[0]
        assert bits_equal(yw[c, -5000:], want)


def test_udiv_magic_numbers_exact():
    """The magic-number division of the channel index: exact for every 31-bit numerator
    (random ones and those next to multiples of d), every divisor kind."""
    import numpy as np
    rng = np.random.default_rng(5)
    ns = np.concatenate([rng.integers(0, 2 ** 31, 4000, dtype=np.uint64),
                         np.array([0, 1, 2 ** 31 - 2, 2 ** 31 - 1], dtype=np.uint64)])
    divisors = [1, 2, 3, 7, 33, 64, 96, 1000, 2 ** 16 + 1, 2 ** 30, 2 ** 30 + 1, 2 ** 31 - 1]
    divisors += [int(d) for d in rng.integers(1, 2 ** 31 - 1, 40)]
    for d in divisors:
        m, l = tfq.udiv_magic(d)
        assert 2 ** 31 <= m < 2 ** 32
        k = np.arange(1, 2 ** 31 // d + 1, max(1, (2 ** 31 // d) // 50), dtype=np.uint64) * np.uint64(d)
        n = np.concatenate([ns, k, k - np.uint64(1)])
        n = n[n < 2 ** 31]
        q = (((n << np.uint64(1)) * np.uint64(m)) >> np.uint64(32)) >> np.uint64(l)
        assert np.array_equal(q, n // np.uint64(d)), d
    with pytest.raises(ValueError):
        tfq.udiv_magic(0)


def test_reduction_views_need_no_copy_for_qat_layouts():
    """Rows x channels views (observer, LSQ) of the QAT layouts are the tensors themselves."""
    cases = [((2, 6, 4, 4), 1, torch.channels_last), ((8, 5, 3, 3), 0, torch.channels_last),
             ((8, 5, 3, 3), 0, torch.contiguous_format), ((3, 7, 5), 1, torch.contiguous_format),
             ((3, 7), 1, torch.contiguous_format), ((3, 7), None, torch.contiguous_format)]
    for shape, axis, fmt in cases:
        x = torch.empty(shape, device=DEV).contiguous(memory_format=fmt) if len(shape) == 4 \
            else torch.empty(shape, device=DEV)
        assert tfq.as_rows(x, axis) is x, (shape, axis, fmt)
        plan = tfq.row_plan(x, axis)
        assert plan.rows * plan.C == x.numel()
    sliced = torch.empty(4, 10, device=DEV)[:, ::2]
    assert tfq.as_rows(sliced, 1) is not sliced  # not dense: copied


def test_double_backward_is_refused():
    d = gpuquant.qint8
    x = torch.randn(5, device=DEV, requires_grad=True)
    scale, zp = qparams_for(d)
    y = tfq.fake_quant(x, scale, zp, d.qmin, d.qmax, None)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|not differentiable|once_differentiable|does not require grad"):
        gx.sum().backward()


@pytest.mark.parametrize("axis", [None, 1])
def test_qint32_takes_the_exact_zero_point_add(axis):
    """qint32's zero points past 2^24 and its qmax are no float32 numbers: the op gives the
    reference's exact bytes (forward and gradient mask) instead of the float32 kernels'."""
    d = gpuquant.qint32
    c = 3
    shape = () if axis is None else (c,)
    scale = torch.full(shape, 1.0)
    zp = torch.full(shape, 123456789, dtype=torch.int32)
    if axis is not None:
        zp[1], zp[2] = d.qmax, d.qmin
    x = torch.cat([torch.tensor([1.0, 2.0, 123.5, -7.25, 3e9, -3e9]),
                   torch.randn(30) * 1e6]).reshape(-1, 1).expand(-1, c).contiguous()
    x = x if axis is not None else x[:, 0].contiguous()
    g = torch.randn(x.shape)
    y, gx = run_ours(x, scale, zp, d, axis, g)
    yr, gxr = run_ref(x, scale, zp, d, axis, g)
    assert bits_equal(y, yr) and bits_equal(gx, gxr)
    assert tfq.float32_exact(-(1 << 24), 1 << 24) and not tfq.float32_exact(d.qmin, d.qmax)


def test_fused_observer_declines_qint32():
    """The fused kernels' guard against a range float32 cannot hold; observers and fake
    quants refuse qint32 at construction, so it is set here by hand."""
    from gpuquant.backends.triton import observer as tobs
    from gpuquant.quantization import observer as O
    from gpuquant.quantization.fake_quant import FakeQuantize
    with backends.use("triton"):
        for d, taken in ((gpuquant.qint8, True), (gpuquant.qint32, False)):
            obs, fq = O.MinMaxObserver(check_finite=False), FakeQuantize()
            obs.dtype = fq.dtype = d
            y = tobs.observe_fake_quant(torch.randn(64), obs, fq)
            assert (y is not None) == taken
            assert tobs.device_pair_ok(obs, fq, torch.device("cpu")) == taken
