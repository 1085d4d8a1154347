"""gpuquant.functional quantize / dequantize / fake_quant against PyTorch's fake-quant ops
(contract section 1): bit-identical forward and backward for float32, every dtype, .5 ties,
both clamp edges, awkward shapes, per-channel on several axes, half-precision inputs, and
every validation path."""
import pytest
import torch

import gpuquant
from gpuquant import QParams
from gpuquant.dtypes import ALL_DTYPES
from gpuquant.functional import dequantize, fake_quant, quantize

DTYPES = list(ALL_DTYPES)
SHAPES = [(1,), (7,), (33,), (3, 41), (123,), (5, 7, 13), (2, 3, 431), (2500,)]


def _rand_scale(n=None):
    shape = () if n is None else (n,)
    return (10.0 ** (torch.rand(shape) * 3 - 3)).float()  # 1e-3 .. 1


def _rand_zp(dtype, n=None):
    lo, hi = dtype.qmin, dtype.qmax
    if dtype.name == "qint32":  # keep |q| small enough for float32 integers (< 2^24)
        lo, hi = -1000, 1000
    shape = () if n is None else (n,)
    return torch.randint(lo, hi + 1, shape, dtype=torch.int32)


def _span(dtype):
    return float(min(dtype.qmax - dtype.qmin, 4000))


def _inputs(shape, scale, zp, dtype, axis=None):
    """Values spread past both clamp edges, with exact .5 ties mixed in."""
    ndim = len(shape)

    def b(t):
        if axis is None:
            return t
        s = [1] * ndim
        s[axis] = -1
        return t.reshape(s)

    s = b(scale)
    z = b(zp.float())
    span = _span(dtype)
    center = (dtype.qmin + dtype.qmax) / 2 if span < 4000 else 0.0
    # levels from ~20% below qmin to ~20% above qmax
    levels = (torch.rand(shape) - 0.5) * span * 1.4 + center - z
    x = (levels * s).float()
    # exact ties: x with fl(x * inv) == k + 0.5; pick among float32 neighbours of (k+.5)/inv
    inv = 1.0 / s
    k = torch.floor(levels) + 0.5
    cand = (k.double() / inv.double()).float()
    for c in (cand, torch.nextafter(cand, cand + 1), torch.nextafter(cand, cand - 1)):
        hit = (c * inv) == k
        tie_mask = hit & (torch.rand(shape) < 0.5)
        x = torch.where(tie_mask, c, x)
    return x


def _ties(x, scale, axis):
    s = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    v = x * (1.0 / s)
    return int(((v - torch.floor(v)) == 0.5).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fake_quant_per_tensor_matches_torch(dtype, shape):
    scale, zp = _rand_scale(), _rand_zp(dtype)
    x = _inputs(shape, scale, zp, dtype)
    qp = QParams(dtype, scale, zp)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = fake_quant(xa, qp)
    ref = torch.fake_quantize_per_tensor_affine(xb, float(scale), int(zp), dtype.qmin, dtype.qmax)
    assert y.dtype == torch.float32
    assert torch.equal(y, ref)
    g = torch.randn(shape)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    # the inputs really reach both clamp edges (and the gradient mask has zeros)
    if x.numel() >= 100 and dtype.name != "qint32":
        assert bool((xb.grad == 0).any()) and bool((xb.grad != 0).any())


def test_inputs_contain_exact_ties():
    dtype = gpuquant.qint8
    scale, zp = _rand_scale(), _rand_zp(dtype)
    x = _inputs((4000,), scale, zp, dtype)
    assert _ties(x, scale, None) > 500
    y = fake_quant(x, QParams(dtype, scale, zp))
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), -128, 127))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", [((6, 5, 3, 3), 0), ((4, 9, 7), 1), ((3, 8, 11), -1),
                                        ((123, 1), 0), ((1, 33), 1), ((17,), 0)], ids=str)
def test_fake_quant_per_channel_matches_torch(dtype, shape, axis):
    ax = axis % len(shape)
    c = shape[ax]
    scale, zp = _rand_scale(c), _rand_zp(dtype, c)
    x = _inputs(shape, scale, zp, dtype, ax)
    qp = QParams(dtype, scale, zp, axis=axis)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = fake_quant(xa, qp)
    ref = torch.fake_quantize_per_channel_affine(xb, scale, zp, ax, dtype.qmin, dtype.qmax)
    assert torch.equal(y, ref)
    g = torch.randn(shape)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("fdtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [gpuquant.qint8, gpuquant.quint8, gpuquant.qint4], ids=lambda d: d.name)
@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quant_half_inputs_use_float32_math(fdtype, dtype, axis):
    shape = (5, 7, 19)
    c = shape[1]
    scale = _rand_scale(None if axis is None else c)
    zp = _rand_zp(dtype, None if axis is None else c)
    x = _inputs(shape, scale, zp, dtype, axis).to(fdtype)
    qp = QParams(dtype, scale, zp, axis=axis)
    xa = x.clone().requires_grad_(True)
    y = fake_quant(xa, qp)
    xf = x.float().requires_grad_(True)
    if axis is None:
        ref = torch.fake_quantize_per_tensor_affine(xf, float(scale), int(zp), dtype.qmin, dtype.qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(xf, scale, zp, axis, dtype.qmin, dtype.qmax)
    assert y.dtype == fdtype
    assert torch.equal(y, ref.to(fdtype))
    g = torch.randn(shape)
    y.backward(g.to(fdtype))
    ref.backward(g)
    assert xa.grad.dtype == fdtype
    assert torch.equal(xa.grad, xf.grad.to(fdtype))


def test_fake_quant_nan_in_nan_out():
    x = torch.tensor([0.3, float("nan"), -2.0])
    y = fake_quant(x, QParams(gpuquant.qint8, 0.1, 0))
    assert torch.isnan(y[1]) and not torch.isnan(y[[0, 2]]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_quantize_dequantize_round_trip(dtype, axis):
    shape = (6, 33)
    c = None if axis is None else shape[axis]
    scale, zp = _rand_scale(c), _rand_zp(dtype, c)
    x = _inputs(shape, scale, zp, dtype, None if axis is None else axis % 2)
    qp = QParams(dtype, scale, zp, axis=axis)
    q = quantize(x, qp)
    assert q.dtype == dtype.storage and q.shape == x.shape
    assert int(q.min()) >= dtype.qmin and int(q.max()) <= dtype.qmax
    # integers by the contract's formula, computed independently in float64
    s = scale.double() if axis is None else scale.double().reshape([-1 if d == axis % 2 else 1 for d in range(2)])
    z = zp.double() if axis is None else zp.double().reshape(s.shape)
    inv = (1.0 / s.float()).double()  # inv_scale = 1.0f / scale in float32
    prod = (x.double() * inv).float().double()  # the product rounded to float32
    expect = (torch.round(prod) + z).clamp(dtype.qmin, dtype.qmax)
    assert torch.equal(q.to(torch.int64), expect.to(torch.int64))
    dq = dequantize(q, qp)
    assert dq.dtype == torch.float32
    assert torch.equal(dq, fake_quant(x, qp))
    # quantizing the dequantized values gives the same integers back
    assert torch.equal(quantize(dq, qp), q)


def test_quantize_validation_errors():
    qp = QParams(gpuquant.qint8, 0.1, 0)
    with pytest.raises(TypeError, match="float32"):
        quantize(torch.arange(4), qp)
    with pytest.raises(TypeError, match="QParams"):
        quantize(torch.randn(4), 0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0], qp)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([1.0, float("nan")]), qp)
    pc = QParams(gpuquant.qint8, torch.full((3,), 0.1), torch.zeros(3, dtype=torch.int32), axis=2)
    with pytest.raises(ValueError, match="axis 2 out of range"):
        quantize(torch.randn(3, 4), pc)
    with pytest.raises(ValueError, match="channels"):
        quantize(torch.randn(4, 5, 6), pc)
    with pytest.raises(ValueError, match="axis"):
        fake_quant(torch.randn(3), pc)


def test_dequantize_validation_errors():
    qp = QParams(gpuquant.quint8, 0.1, 3)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(4, dtype=torch.int8), qp)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(4), qp)
    with pytest.raises(TypeError, match="QParams"):
        dequantize(torch.zeros(4, dtype=torch.uint8), None)
    pc = QParams(gpuquant.qint8, torch.full((5,), 0.1), torch.zeros(5, dtype=torch.int32), axis=0)
    with pytest.raises(ValueError, match="channels"):
        dequantize(torch.zeros(4, 5, dtype=torch.int8), pc)
    with pytest.raises(ValueError, match="out of range"):
        dequantize(torch.zeros(5, dtype=torch.int8),
                   QParams(gpuquant.qint8, torch.full((5,), 0.1), torch.zeros(5, dtype=torch.int32), axis=-2))


@pytest.mark.parametrize("dtype", [gpuquant.qint4, gpuquant.quint4, gpuquant.qint8_narrow])
def test_dequantize_refuses_values_outside_a_narrow_dtype(dtype):
    info = torch.iinfo(dtype.storage)
    zp = (dtype.qmin + dtype.qmax) // 2
    qp = QParams(dtype, 0.1, zp)
    q = torch.randint(dtype.qmin, dtype.qmax + 1, (3, 17), dtype=torch.int64)
    ok = dequantize(q.to(dtype.storage), qp)  # in range: as before
    assert torch.equal(ok, (q - zp).float() * qp.scale)
    outside = list(range(info.min, dtype.qmin)) + list(range(dtype.qmax + 1, info.max + 1))
    v = outside[int(torch.randint(0, len(outside), ()))]
    q[1, int(torch.randint(0, 17, ()))] = v
    with pytest.raises(ValueError, match=fr"q holds \[{v}\] \(at 1 position\(s\)\), outside "
                                         fr"{dtype.name}'s range"):
        dequantize(q.to(dtype.storage), qp)


def test_fake_quant_validation_errors():
    qp = QParams(gpuquant.qint8, 0.1, 0)
    with pytest.raises(TypeError, match="float32"):
        fake_quant(torch.zeros(3, dtype=torch.float64), qp)
    with pytest.raises(TypeError, match="QParams"):
        fake_quant(torch.zeros(3), (0.1, 0))


def _backends():
    """Every backend that runs quantize / dequantize here (triton through the interpreter)."""
    return [b for b in ("reference", "numpy", "triton") if b in gpuquant.backends.available()]


@pytest.mark.parametrize("axis", [None, 0])
def test_quantize_qint32_exact_on_every_backend(axis):
    """qint32: no wrap past 2^31 - 1 (a float32 clamp would give 2^31 and wrap to INT32_MIN)
    and zero points beyond 2^24 added exactly; the same bytes on every backend."""
    qint32 = gpuquant.qint32
    x = (torch.rand(4, 37) - 0.5) * 8e9
    x[:, :6] = torch.tensor([3e9, 2.2e9, 2.0 ** 31, -3e9, float("inf"), -float("inf")])
    x[1, 6:] = torch.randint(-10 ** 6, 10 ** 6, (31,)).float() + 0.5  # ties
    if axis is None:
        scale, zp = torch.tensor(1.0), torch.randint(10 ** 8, 2 * 10 ** 8, ())
    else:
        scale = torch.tensor([1.0, 0.5, 0.25, 2.0])
        zp = torch.tensor([int(torch.randint(10 ** 8, 2 * 10 ** 8, ())), -987654321,
                           qint32.qmax, qint32.qmin])
    qp = QParams(qint32, scale, zp, axis=axis)
    shape = [-1, 1] if axis is not None else []
    r = torch.round(x * (1.0 / scale).reshape(shape)).double()  # rne of the float32 product
    want = (r + zp.double().reshape(shape)).clamp(qint32.qmin, qint32.qmax).to(torch.int32)
    if axis is None:
        assert want[0, :6].tolist() == [qint32.qmax] * 3 + [qint32.qmin, qint32.qmax, qint32.qmin]
    for b in _backends():
        with gpuquant.backends.use(b):
            q = quantize(x, qp)
            assert torch.equal(q, want), b
            # (q - zp) in exact integers, one rounding to float32
            d = dequantize(q, qp)
            assert torch.equal(d, (q.long() - zp.long().reshape(shape)).float()
                               * scale.reshape(shape)), b
    with gpuquant.backends.use("numpy"):
        one = quantize(torch.tensor([1.0]), QParams(qint32, 1.0, 123456789))
    assert one.tolist() == [123456790]


def test_quantize_dequantize_0d_on_every_backend():
    qp = QParams(gpuquant.qint8, float(torch.rand(()) * 0.1 + 0.01), int(torch.randint(-9, 9, ())))
    x = torch.randn(()) * 2
    with gpuquant.backends.use("reference"):
        want_q, want_dq = quantize(x, qp), dequantize(quantize(x, qp), qp)
    assert want_q.shape == () and want_dq.shape == ()
    for b in _backends():
        with gpuquant.backends.use(b):
            q = quantize(x, qp)
            assert q.shape == () and q.dtype == torch.int8 and torch.equal(q, want_q), b
            dq = dequantize(q, qp)
            assert dq.shape == () and dq.dtype == torch.float32 and torch.equal(dq, want_dq), b
