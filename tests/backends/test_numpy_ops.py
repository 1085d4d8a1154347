"""The NumPy backend is bit-exact: against the independent int64 model (tests only) and
against the reference backend, through the validated functional front-end."""
import numpy as np
import pytest
import torch

import gpuquant.backends as backends
import gpuquant.functional.integer as qf
from gpuquant.dtypes import get_dtype, qint8, quint8
from gpuquant.functional.requant import Requant, make_add_params, make_requant

import int64_reference as ref

NP = backends.get_backend("numpy")


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _act(shape, dtype):
    lo, hi = (-128, 127) if dtype == torch.int8 else (0, 255)
    return _cl(torch.randint(lo, hi + 1, shape, dtype=torch.int32).to(dtype))


def _requant(channels, out_dtype, shifts=None, zp=None):
    """Random per-channel fixed-point params; ``shifts`` is the pool rshifts are drawn from."""
    shifts = shifts if shifts is not None else [-2, 0, 1, 4, 7, 9, 11, 13, 17, 24]
    m = torch.randint(2 ** 30, 2 ** 31, (channels,), dtype=torch.int64)
    s = torch.tensor(np.random.choice(shifts, channels), dtype=torch.int64)
    if channels >= 3:  # the edge multipliers: exact power of two and TFLite's flush to zero
        m[0], m[1], s[1] = 2 ** 30, 0, 0
    lo, hi = out_dtype.qmin, out_dtype.qmax
    zp = int(np.random.randint(lo, hi + 1)) if zp is None else zp
    return Requant(m.to(torch.int32), s.to(torch.int32), zp, lo, hi, out_dtype)


def _both(fn, *args, **kw):
    """The op on the numpy and the reference backend (same inputs)."""
    with backends.use("numpy"):
        a = fn(*args, **kw)
    with backends.use("reference"):
        b = fn(*args, **kw)
    return a, b


def _assert_exact(got, want_np, ref_out):
    assert got.dtype == ref_out.dtype and got.shape == ref_out.shape
    assert torch.equal(got, ref_out), f"numpy != reference: {int((got.int() - ref_out.int()).abs().max())}"
    assert np.array_equal(got.numpy(), want_np), "numpy != int64 model"


CONV_CASES = [
    # N, C, H, W, O, kernel, stride, padding, dilation, groups, x dtype, x zp
    (1, 3, 9, 9, 5, 3, 1, 1, 1, 1, torch.uint8, 0),
    (2, 7, 8, 6, 9, 3, 2, 1, 1, 1, torch.int8, -5),
    (1, 4, 1, 1, 6, 1, 1, 0, 1, 1, torch.uint8, 255),        # 1x1 image, extreme zp
    (1, 4, 1, 1, 6, 3, 1, 1, 1, 1, torch.uint8, 0),          # 1x1 image, 3x3 kernel
    (2, 8, 7, 7, 8, 3, 1, 2, 2, 8, torch.uint8, 128),        # depthwise, dilation 2
    (1, 6, 9, 9, 12, 3, 2, 1, 1, 6, torch.int8, 3),          # depthwise, multiplier 2
    (2, 6, 7, 5, 4, 3, 1, 1, 1, 2, torch.uint8, 17),         # groups 2
    (1, 6, 9, 9, 4, 3, 1, 2, 2, 2, torch.uint8, 9),          # groups 2, dilation 2
    (2, 12, 5, 6, 8, 3, 2, 1, 1, 4, torch.int8, -20),        # groups 4, stride 2
    (1, 8, 4, 4, 6, 1, 1, 0, 1, 2, torch.int8, 0),           # grouped 1x1
    (1, 16, 6, 6, 8, 1, 2, 0, 1, 1, torch.uint8, 0),         # 1x1 stride 2
    (1, 4, 3, 3, 5, 1, 1, 1, 1, 1, torch.int8, 127),         # 1x1 with padding
    (1, 130, 5, 5, 3, 3, 1, 1, 1, 1, torch.uint8, 0),        # K = 1170: several float32 blocks
    (1, 5, 11, 13, 7, (3, 5), (2, 1), (1, 2), (1, 2), 1, torch.int8, -128),
    (3, 33, 5, 4, 17, 5, 1, 2, 1, 1, torch.uint8, 200),
    (3, 17, 6, 5, 9, 3, 2, 1, 1, 1, torch.int8, 0),          # zp 0, C >= 16: cast im2col
    (2, 32, 5, 5, 8, 3, 1, 1, 1, 2, torch.uint8, 0),         # the same, grouped
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_exact(case, bias):
    n, c, h, w, o, k, s, p, d, g, xdt, zp = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = _act((n, c, h, w), xdt)
    wt = torch.randint(-128, 128, (o, c // g, kh, kw), dtype=torch.int8)
    b = torch.randint(-100000, 100000, (o,), dtype=torch.int32) if bias else None
    rq = _requant(o, quint8 if o % 2 else qint8)
    got, want = _both(qf.conv2d, x, zp, wt, b, s, p, d, g, rq)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    acc = ref.conv2d_acc(x.numpy(), zp, wt.numpy(), None if b is None else b.numpy(),
                         pair(s), pair(p), pair(d), g)
    m, sh, ozp, lo, hi, dt = ref.rq_args(rq)
    model = ref.requantize(acc, m, sh, ozp, lo, hi, axis=1, dtype=dt)
    _assert_exact(got, model, want)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_conv2d_tiles_and_realistic_multipliers(monkeypatch):
    """Tiny tiles (segments spanning images) and the multipliers real layers produce, with
    few channels (float32 patches of a float32 input) and many (patches cast on the copy)."""
    from gpuquant.backends.numpy import conv
    monkeypatch.setattr(conv, "_TILE_BYTES", 3000)
    for c in (12, 20):
        x = _act((3, c, 10, 9), torch.uint8)
        wt = torch.randint(-127, 128, (20, c, 3, 3), dtype=torch.int8)
        b = torch.randint(-3000, 3000, (20,), dtype=torch.int32)
        rq = make_requant(0.02, torch.rand(20) * 0.004 + 1e-4, 0.07, 5, quint8, "relu")
        w1 = torch.randint(-127, 128, (20, c, 1, 1), dtype=torch.int8)  # 1x1, strided rows
        for w, pad, zp in ((wt, 1, 0), (w1, 0, 7)):
            for stride in (1, 2):
                got, want = _both(qf.conv2d, x, zp, w, b, stride, pad, 1, 1, rq)
                acc = ref.conv2d_acc(x.numpy(), zp, w.numpy(), b.numpy(), (stride,) * 2,
                                     (pad, pad), (1, 1), 1)
                _assert_exact(got, ref.requantize(acc, *ref.rq_args(rq)[:5], axis=1,
                                                  dtype=np.uint8), want)


@pytest.mark.parametrize("shape,k,xdt,zp", [
    ((1,), 1, torch.int8, 0), ((7,), 33, torch.uint8, 255), ((2, 3), 123, torch.int8, -128),
    ((5,), 1500, torch.uint8, 0), ((2, 1, 4), 2049, torch.int8, 127)])
def test_linear_exact(shape, k, xdt, zp):
    x = _act(shape[:-1] + (k,) if len(shape) > 1 else (k,), xdt) if False else \
        _act(tuple(shape) + (k,), xdt)
    n = 11
    wt = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    b = torch.randint(-50000, 50000, (n,), dtype=torch.int32)
    rq = _requant(n, qint8)
    got, want = _both(qf.linear, x, zp, wt, b, rq)
    model = ref.requantize(ref.linear_acc(x.numpy(), zp, wt.numpy(), b.numpy()),
                           *ref.rq_args(rq)[:5], axis=-1, dtype=np.int8)
    _assert_exact(got, model, want)


def test_linear_per_tensor_and_repeated_calls():
    """The prepacked weight cache follows in-place weight updates."""
    x = _act((4, 64), torch.uint8)
    wt = torch.randint(-127, 128, (9, 64), dtype=torch.int8)
    rq = make_requant(0.05, 0.01, 0.3, 3, quint8)
    for _ in range(2):
        got, want = _both(qf.linear, x, 3, wt, None, rq)
        model = ref.requantize(ref.linear_acc(x.numpy(), 3, wt.numpy(), None),
                               *ref.rq_args(rq)[:5], dtype=np.uint8)
        _assert_exact(got, model, want)
        wt.mul_(-1).clamp_(-127, 127)


def _requant_in_few_rows(fp, acc, p, dt):
    """requant_fast on 1..4 rows at a time: the GEMV form of the folded path (no scratch
    arrays), used for a fused ReLU or a zero rounding offset."""
    out = np.empty(acc.shape, dt)
    r0, step = 0, 1
    while r0 < len(acc):
        fp.requant_fast(acc[r0:r0 + step], p, out[r0:r0 + step])
        r0, step = r0 + step, step % 4 + 1
    return out


@pytest.mark.parametrize("shift", [-5, -1, 0, 1, 2, 6, 10, 11, 15, 23, 31])
def test_fast_requant_at_every_threshold(shift, monkeypatch):
    """Accumulators right at and around every output step, through the float32 fast path
    (the int64 fallback is disabled here; flagged elements go through the exact fix-up)."""
    from gpuquant.backends.numpy import fixed_point as fp
    flagged = []
    fixup = fp._fixup
    monkeypatch.setattr(fp, "requant_int64", None)  # the fast path must not fall back
    monkeypatch.setattr(fp, "_fixup", lambda *a: (flagged.append(len(a[-1])), fixup(*a)))
    m = np.array([2 ** 30, 2 ** 30 + 1, 1518500250, 2 ** 31 - 1, 1234567891], dtype=np.int64)
    sh = np.full(m.shape, shift)
    for zp, lo, hi in ((3, -128, 127), (5, 5, 127)):  # plain, and a fused ReLU (lo = zp)
        p = fp.Params(m, sh, zp, lo, hi, np.int8)
        # exact step positions by bisection on the int64 model, per channel
        lo_a = np.full((256, m.size), -(2 ** 31), dtype=np.int64)
        hi_a = np.full((256, m.size), 2 ** 31 - 1, dtype=np.int64)
        target = np.arange(-128, 128)[:, None]
        for _ in range(33):
            mid = (lo_a + hi_a) // 2
            up = ref.requantize(mid, m, sh, zp, -128, 127, dtype=np.int64) >= target
            hi_a = np.where(up, mid, hi_a)
            lo_a = np.where(up, lo_a, mid + 1)
        steps = hi_a[1:]  # the first row is the bottom of the range, not a step
        acc = np.concatenate([steps + dlt for dlt in range(-3, 4)]).astype(np.float64)
        want = ref.requantize(acc.astype(np.int64), m, sh, zp, lo, hi)
        out = np.empty(acc.shape, np.int8)
        fp.requant_fast(acc, p, out)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(_requant_in_few_rows(fp, acc, p, np.int8), want)
    # exact ties exist for the power-of-two multiplier; they must have been flagged
    assert shift <= 0 or sum(flagged) > 0


def test_requantize_op_exact():
    acc = torch.randint(-(2 ** 31), 2 ** 31 - 1, (3, 7, 5, 2), dtype=torch.int64).to(torch.int32)
    acc = _cl(acc)
    rq = _requant(7, quint8)
    got, want = _both(lambda a: NP.OPS["requantize"](a, rq, 1) if backends.current() == "numpy"
                      else backends.get_backend("reference").OPS["requantize"](a, rq, 1), acc)
    model = ref.requantize(acc.numpy(), *ref.rq_args(rq)[:5], axis=1, dtype=np.uint8)
    _assert_exact(got, model, want)


@pytest.mark.parametrize("dts", [(torch.int8, torch.int8, qint8), (torch.uint8, torch.int8, quint8)])
def test_add_mul_exact(dts):
    a = _act((2, 5, 3, 4), dts[0])
    b = _act((2, 5, 3, 4), dts[1])
    za = 0 if dts[0] == torch.int8 else 200
    params = make_add_params(0.031, za, 0.0077, -3, 0.05, 7, dts[2], "relu")
    got, want = _both(qf.add, a, b, params)
    _assert_exact(got, ref.add(a.numpy(), b.numpy(), params), want)
    rq = make_requant(0.031 * 0.0077, 1.0, 0.02, 1, dts[2])
    got, want = _both(qf.mul, a, za, b, -3, rq)
    _assert_exact(got, ref.mul(a.numpy(), za, b.numpy(), -3, rq), want)


def test_concat_exact():
    xs = [_act((2, c, 3, 3), torch.uint8) for c in (3, 1, 4)]
    zps = [0, 77, 255]
    rqs = [None, make_requant(0.05, 1.0, 0.04, 0, quint8), make_requant(0.002, 1.0, 0.04, 0, quint8)]
    for dim in (1, 2, -1):
        parts = xs if dim == 1 else [x[:, :1].contiguous(memory_format=torch.channels_last) for x in xs]
        got, want = _both(qf.concat, parts, zps, rqs, dim, quint8)
        model = np.concatenate(
            [x.numpy() if r is None else
             ref.requantize(x.numpy().astype(np.int64) - z, *ref.rq_args(r)[:5], dtype=np.uint8)
             for x, z, r in zip(parts, zps, rqs)], axis=dim)
        _assert_exact(got, model, want)


POOL_CASES = [  # kernel, stride, padding, dilation, ceil_mode, H, W
    (2, 2, 0, 1, False, 8, 8), (3, 2, 1, 1, False, 7, 9), (3, 2, 1, 1, True, 8, 6),
    ((3, 2), (2, 1), (1, 0), (2, 1), True, 9, 5), (1, 1, 0, 1, False, 1, 1), (3, 3, 1, 1, True, 5, 7),
    # windows entirely in the padding (dilation; ceil_mode): max pool gives the dtype's min
    ((2, 2), (1, 3), (1, 0), (2, 1), False, 1, 5), ((1, 2), (3, 2), (0, 1), (2, 2), True, 1, 1),
    # ceil_mode: a window past the padded input by up to stride - 1 still has an output
    (4, 3, 1, 1, True, 1, 1)]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("xdt", [torch.int8, torch.uint8])
def test_pooling_exact(case, xdt):
    k, s, p, d, ceil, h, w = case
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    x = _act((2, 3, h, w), xdt)
    got, want = _both(qf.max_pool2d, x, k, s, p, d, ceil)
    _assert_exact(got, ref.max_pool2d(x.numpy(), pair(k), pair(s), pair(p), pair(d), ceil), want)
    zp = 5 if xdt == torch.int8 else 250
    lo, hi = (-128, 127) if xdt == torch.int8 else (0, 255)
    for include_pad, div in ((True, None), (False, None), (True, 3)):
        got, want = _both(qf.avg_pool2d, x, zp, k, s, p, ceil, include_pad, div)
        model = ref.avg_pool2d(x.numpy(), zp, pair(k), pair(s), pair(p), ceil, include_pad, div,
                               lo, hi)
        _assert_exact(got, model, want)


@pytest.mark.parametrize("hw,out", [((7, 7), (1, 1)), ((5, 9), (3, 4)), ((1, 1), (2, 3)),
                                    ((6, 6), (6, 6))])
def test_adaptive_avg_pool_exact(hw, out):
    x = _act((2, 4) + hw, torch.uint8)
    got, want = _both(qf.adaptive_avg_pool2d, x, 9, out, 0, 200)
    _assert_exact(got, ref.adaptive_avg_pool2d(x.numpy(), 9, out, 0, 200), want)


def test_quantize_dequantize_match_reference():
    from gpuquant.functional import dequantize, quantize
    from gpuquant.qparams import QParams
    x = torch.randn(3, 6, 5, 4) * 3
    x[0, 0, 0, :2] = torch.tensor([float("inf"), -float("inf")])
    for qp in (QParams(quint8, 0.037, 111), QParams(qint8, torch.rand(6) * 0.05 + 0.01,
                                                    torch.zeros(6, dtype=torch.int32), axis=1)):
        q, qr = _both(quantize, x, qp)
        assert torch.equal(q, qr)
        dq, dqr = _both(dequantize, q, qp)
        assert torch.equal(dq, dqr)
    # ties at .5 round to even on both
    t = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]) * 0.25
    q, qr = _both(quantize, t, QParams(qint8, 0.25, 0))
    assert torch.equal(q, qr) and q.tolist() == [0, 2, 2, 0, -2]


def test_numpy_is_the_cpu_default_for_integer_ops():
    assert backends.auto_backend("cpu") in ("numpy",) or "numpy" not in backends.available()
    assert backends.get_op("conv2d", torch.zeros(1)) is NP.OPS["conv2d"]


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    x = _act((1, 4, 5, 5), torch.uint8)
    w = torch.randint(-127, 128, (3, 4, 3, 3), dtype=torch.int8)
    rq = make_requant(0.1, 0.01, 0.2, 0, quint8)
    with backends.use("numpy"):
        with pytest.raises(TypeError, match="int8 or uint8"):
            qf.conv2d(x.float(), 0, w, None, 1, 1, 1, 1, rq)
        with pytest.raises(TypeError, match="weight must be a 4-D int8"):
            qf.conv2d(x, 0, w.to(torch.int16), None, 1, 1, 1, 1, rq)
        with pytest.raises(TypeError, match="weight must be a 2-D int8"):
            qf.linear(x[0, 0], 0, w[:, 0, 0].float(), None, rq)
        big_k = 70000  # 70000 * 255 * 127 >= 2^31
        xl = torch.zeros(1, big_k, dtype=torch.uint8)
        wl = torch.full((2, big_k), 127, dtype=torch.int8)
        with pytest.raises(ValueError, match="int32 accumulator could overflow.*k=70000"):
            qf.linear(xl, 0, wl, None, make_requant(0.1, 0.01, 0.2, 0, quint8))


def test_check_accumulator_range():
    from gpuquant.functional.integer import check_accumulator_range
    assert check_accumulator_range(9, torch.int8, 0, 127, 10) == 9 * 128 * 127 + 10
    assert check_accumulator_range(3, quint8, 255, torch.tensor([[-128, 5]], dtype=torch.int16)) \
        == 3 * 255 * 128
    # a large k fits when the actual weights are small (scanned only then; int8 -128 counted)
    small = torch.tensor([-1, 1], dtype=torch.int8)
    assert check_accumulator_range(10 ** 6, torch.int8, 0, small) == 10 ** 6 * 128
    with pytest.raises(ValueError, match="overflow"):
        check_accumulator_range(10 ** 6, torch.int8, 0, torch.tensor([-128, 1], dtype=torch.int8))
    limit = (2 ** 31 - 1) // (255 * 128)
    check_accumulator_range(limit, (0, 255), 0)
    with pytest.raises(ValueError, match=f"at most k={limit} fits"):
        check_accumulator_range(limit + 1, (0, 255), 0)
    with pytest.raises(ValueError, match="bias"):
        check_accumulator_range(1, torch.int8, 0, 1, 2 ** 31)
    with pytest.raises(TypeError, match="torch.int8 or torch.uint8"):
        check_accumulator_range(4, torch.float32, 0)
    with pytest.raises(TypeError, match="w must be an integer tensor"):
        check_accumulator_range(4, torch.int8, 0, torch.ones(3))
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        check_accumulator_range(0, torch.int8, 0)


def test_fast_requant_dense_random_both_fixup_paths(monkeypatch):
    """Random accumulators plus exact multiples of 2^rshift (ties for M = 2^30), per channel
    and per tensor; the fix-up runs both its Python-int and its int64 NumPy form."""
    from gpuquant.backends.numpy import fixed_point as fp
    counts = []
    fixup = fp._fixup
    monkeypatch.setattr(fp, "_fixup", lambda *a: (counts.append(len(a[-1])), fixup(*a)))
    m = np.array([2 ** 30, 2 ** 30 + 1, 1518500250, 2 ** 31 - 1, 1234567891], dtype=np.int64)
    for shift, zp, lo, hi, dt in [(0, 3, -128, 127, np.int8), (1, 0, 0, 255, np.uint8),
                                  (6, 200, 0, 255, np.uint8), (11, -7, -100, 90, np.int8),
                                  (23, 3, -128, 127, np.int8)]:
        acc = np.random.randint(-2 ** 21, 2 ** 21, (9000, 5)).astype(np.float64)
        acc[:100] = np.arange(-50, 50)[:, None] * 2 ** shift
        for mm, sh in ((m, np.full(5, shift)), (m[0], shift)):
            p = fp.Params(mm, sh, zp, lo, hi, dt)
            want = ref.requantize(acc.astype(np.int64), mm, sh, zp, lo, hi, dtype=dt)
            out = np.empty(acc.shape, dt)
            fp.requant_fast(acc, p, out)
            np.testing.assert_array_equal(out, want)
            small = acc[:400].astype(np.float32)  # |acc| < 2^24: a float32 GEMM's output
            np.testing.assert_array_equal(_requant_in_few_rows(fp, small, p, dt), want[:400])
    assert any(0 < n <= 24 for n in counts) and any(n > 24 for n in counts)


@pytest.mark.parametrize("kind", ["worst_case", "sparse", "uniform"])
def test_exact_matmul_blocks(kind, monkeypatch):
    """The float32 block rule: worst-case data needs several K blocks (summed in float64);
    real-looking data passes the Cauchy-Schwarz test in one block; both are exact."""
    from gpuquant.backends.numpy import gemm
    k, n = 3000, 7
    if kind == "worst_case":
        x = np.full((5, k), 255, dtype=np.int64)
        w = np.where(np.random.rand(k, n) < 0.5, -128, 127).astype(np.int64)
    elif kind == "sparse":
        x = np.random.randint(0, 256, (5, k)) * (np.random.rand(5, k) < 0.05)
        w = np.random.randint(-128, 128, (k, n))
    else:
        x = np.random.randint(-255, 256, (5, k))
        w = np.random.randint(-128, 128, (k, n))
    pw = gemm.PackedWeight(w.astype(np.int8)[None])
    calls = []
    matmul = np.matmul
    monkeypatch.setattr(gemm.np, "matmul", lambda *a, **kw: (calls.append(1), matmul(*a, **kw))[1])
    got = gemm.exact_matmul(x.astype(np.float32), pw, int(np.abs(x).max()))
    monkeypatch.undo()
    assert np.array_equal(got.astype(np.int64), x @ w)
    assert (len(calls) > 1) == (kind != "sparse")


def test_packed_weights_on_huge_pages_are_exact_copies():
    """Float32 weights of one huge page (2 MiB on x86-64) and more start on a huge-page
    boundary (Linux), smaller ones are plain arrays; either way an exact, writable,
    C-contiguous copy."""
    import mmap
    from gpuquant.backends.numpy import gemm
    for shape in [(3, 5), (1024, 700), (700, 1024)]:
        a = np.random.randint(-128, 128, shape).astype(np.int8)
        for src in (a, a.T):
            h = gemm.huge_page_array(src, np.float32)
            assert h.dtype == np.float32 and h.flags.c_contiguous and h.flags.writeable
            assert np.array_equal(h, src)
            if h.nbytes >= gemm._HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                assert h.ctypes.data % gemm._HUGE_PAGE == 0


def test_block_xmax_scans_the_data_only_when_the_dtype_range_needs_blocks():
    from gpuquant.backends.numpy import gemm
    x = np.array([[0, 3, 1]], dtype=np.uint8)
    small = gemm.PackedWeight(np.full((1, 3, 2), -128, np.int8))
    assert gemm.block_xmax(x, 0, small) == 255 and gemm.block_xmax(x, 200, small) == 200
    wide = gemm.PackedWeight(np.full((1, 3000, 2), 127, np.int8))  # 255 * 381000 > 2^24
    assert gemm.block_xmax(x, 0, wide) == 3
    assert gemm.block_xmax(x.view(np.int8), -5, wide) == 8


@pytest.mark.parametrize("k,pad,groups", [(3, 1, 1), (3, 0, 1), (1, 0, 1), (3, 1, 4)])
def test_conv2d_accepts_nchw_contiguous_input(k, pad, groups):
    """Inputs in plain NCHW memory (not channels_last) give the same bytes."""
    x = torch.randint(0, 256, (2, 8, 7, 6), dtype=torch.int32).to(torch.uint8)  # contiguous NCHW
    w = torch.randint(-127, 128, (8, 8 // groups, k, k), dtype=torch.int8)
    rq = _requant(8, quint8)
    got, want = _both(qf.conv2d, x, 11, w, None, 1, pad, 1, groups, rq)
    acc = ref.conv2d_acc(x.numpy(), 11, w.numpy(), None, (1, 1), (pad, pad), (1, 1), groups)
    _assert_exact(got, ref.requantize(acc, *ref.rq_args(rq)[:5], axis=1, dtype=np.uint8), want)


# ------------------------------------------------------------------- edge shapes and ranges
def _backends():
    """Every backend that runs here (triton on CPU through the interpreter)."""
    return [b for b in ("reference", "numpy", "triton") if b in backends.available()]


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil,hw", [
    (7, None, 0, 1, False, (5, 5)),           # kernel larger than the input
    ((3, 6), 1, (1, 2), 1, False, (4, 1)),    # W: 1 + 2 * 2 < 6
    (3, 1, 1, 3, False, (4, 4)),              # dilated kernel 7 > 4 + 2
    (4, 2, 1, 1, True, (1, 1)),               # ceil_mode: 1 + 2 + (2 - 1) = 4 is enough...
    (5, 2, 1, 1, True, (1, 1)),               # ... 5 is not
    (2, 2, 1, 1, False, (0, 4)),              # an empty spatial dimension
])
def test_pool_window_without_output_raises_on_every_backend(kernel, stride, padding, dilation,
                                                            ceil, hw):
    x = _act((2, 3) + hw, torch.int8)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    k, p, d = pair(kernel), pair(padding), pair(dilation)
    s = k if stride is None else pair(stride)
    fits = all(n > 0 and n + 2 * pp + (ss - 1 if ceil else 0) >= dd * (kk - 1) + 1
               for n, kk, ss, pp, dd in zip(hw, k, s, p, d))
    for b in _backends():
        with backends.use(b):
            if fits:  # the ceil_mode case that still has one output: torch's own shape
                want = torch.nn.functional.max_pool2d(x.float(), k, s, p, d, ceil)
                assert qf.max_pool2d(x, kernel, stride, padding, dilation, ceil).shape == \
                    want.shape
                continue
            with pytest.raises(ValueError, match=r"max_pool2d: padded input .* is smaller than "
                                                 r"the (dilated )?kernel"):
                qf.max_pool2d(x, kernel, stride, padding, dilation, ceil)
            if dilation == 1:
                with pytest.raises(ValueError, match=r"avg_pool2d: padded input .* is smaller "
                                                     r"than the kernel"):
                    qf.avg_pool2d(x, 3, kernel, stride, padding, ceil)


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (0, 0, 3, 3)])
def test_pool_input_without_channels_raises_on_every_backend(shape):
    """A max / average pool of an input with no channels is refused (as by torch's pools)
    on every backend alike; the reference backend crashed in torch while the NumPy and
    Triton ones returned an empty tensor. An empty batch still pools."""
    x = _act(shape, torch.int8)
    for b in _backends():
        with backends.use(b):
            with pytest.raises(ValueError, match=r"max_pool2d: x has no channels"):
                qf.max_pool2d(x, 2, 2, 1, 1, True)
            with pytest.raises(ValueError, match=r"avg_pool2d: x has no channels"):
                qf.avg_pool2d(x, 3, 2, 2, 1, True, False)
            empty_batch = _act((0, 3) + shape[2:], torch.int8)
            assert qf.max_pool2d(empty_batch, 2).shape == (0, 3) + tuple(
                n // 2 for n in shape[2:])
            assert qf.avg_pool2d(empty_batch, 3, 2).shape == (0, 3) + tuple(
                n // 2 for n in shape[2:])


@pytest.mark.parametrize("big", [2 ** 31, 2 ** 63])
def test_geometry_past_int32_refused_on_every_backend(big):
    """Strides / dilations past 2^31 - 1 are a ValueError on every backend (found by
    review): torch's pools (the reference) raised a RuntimeError or TypeError, NumPy
    returned a result, Triton's conv an interpreter error for a stride of 2^31. At
    2^31 - 1 every backend gives the same bytes."""
    x = _act((2, 3, 6, 6), torch.int8)
    w = torch.ones(4, 3, 1, 1, dtype=torch.int8)
    rq = _requant(4, qint8)
    calls = {"max_pool2d stride": lambda s: qf.max_pool2d(x, 2, s, 1, 1, True),
             "max_pool2d dilation": lambda d: qf.max_pool2d(x, 1, 1, 0, d),
             "avg_pool2d stride": lambda s: qf.avg_pool2d(x, 0, 2, s),
             "conv2d stride": lambda s: qf.conv2d(x, 0, w, None, s, 0, 1, 1, rq),
             "conv2d dilation": lambda d: qf.conv2d(x, 0, w, None, 1, 0, d, 1, rq)}
    for what, call in calls.items():
        outs = []
        for b in _backends():
            with backends.use(b):
                with pytest.raises(ValueError, match=rf"{what.replace(' ', ': ')} must be at "
                                                     rf"most 2\^31 - 1"):
                    call(big)
                outs.append(call(2 ** 31 - 1))
        assert all(torch.equal(o, outs[0]) for o in outs), what


def test_requant_and_pool_clamp_ranges_are_checked():
    with pytest.raises(ValueError, match=r"zero point 300 is outside the qint8 range \[-128, 127\]"):
        make_requant(0.1, 0.01, 0.2, 300, qint8)
    with pytest.raises(ValueError, match=r"zero point -1 is outside the quint8 range \[0, 255\]"):
        make_requant(0.1, 0.01, 0.2, -1, quint8, "relu6")
    with pytest.raises(ValueError, match=r"zero point 300 is outside"):
        make_add_params(0.1, 0, 0.1, 0, 0.2, 300, qint8, "relu")
    m, s = torch.tensor(2 ** 30, dtype=torch.int32), torch.tensor(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"clamp \[qmin, qmax\] = \[10, -10\].*\[-128, 127\]"):
        Requant(m, s, 0, 10, -10, qint8)
    with pytest.raises(ValueError, match=r"clamp \[qmin, qmax\] = \[-1, 255\].*\[0, 255\]"):
        Requant(m, s, 0, -1, 255, quint8)
    # a clamp without the zero point (no activation makes one; the int32 epilogues clamp
    # y - zp first, which would wrap for qint32 far from it)
    with pytest.raises(ValueError, match=r"must contain the zero point 2147483647"):
        Requant(m, s, 2 ** 31 - 1, -2 ** 31, -2 ** 30, get_dtype("qint32"))
    with pytest.raises(ValueError, match=r"\[0, 40\] must contain the zero point -3"):
        Requant(m, s, -3, 0, 40, qint8)


@pytest.mark.parametrize("fields,err,msg", [
    ({"a_rshift": 32}, ValueError, r"a_multiplier must be in \[0, 2\^31\) and a_rshift in "
                                   r"\[-30, 31\].*got 1073741824 and 32"),
    ({"b_multiplier": -5}, ValueError, r"b_multiplier must be in \[0, 2\^31\)"),
    ({"left_shift": -1}, ValueError, r"left_shift must be in \[0, 24\].*got -1"),
    ({"left_shift": 25}, ValueError, r"left_shift must be in \[0, 24\]"),
    ({"a_zero_point": 0.5}, TypeError, r"a_zero_point must be an int, got 0.5"),
    ({"left_shift": True}, TypeError, r"left_shift must be an int"),
    ({"out": "x"}, TypeError, r"out must be a Requant"),
])
def test_hand_built_add_params_are_checked(fields, err, msg):
    """AddParams outside make_add_params' ranges (where the backends' 32- / 64-bit forms
    part ways) are refused, as Requant's are."""
    from gpuquant.functional import AddParams, make_add_params
    good = make_add_params(0.1, 3, 0.2, -4, 0.3, 5, qint8, "relu")
    kw = {f: getattr(good, f) for f in ("left_shift", "a_zero_point", "a_multiplier",
                                         "a_rshift", "b_zero_point", "b_multiplier",
                                         "b_rshift", "out")}
    kw["a_multiplier"] = 2 ** 30
    AddParams(**kw)
    with pytest.raises(err, match=msg):
        AddParams(**{**kw, **fields})
    rq = make_requant(0.1, 0.01, 0.2, 127, qint8, "relu6")  # zp at the top: clamp [127, 127]
    assert (rq.qmin, rq.qmax) == (127, 127)
    x = _act((1, 4, 5, 5), torch.int8)
    for b in _backends():
        with backends.use(b):
            with pytest.raises(ValueError, match=r"avg_pool2d: the output clamp \[qmin, qmax\] "
                                                 r"= \[10, -10\].*\[-128, 127\]"):
                qf.avg_pool2d(x, 0, 2, qmin=10, qmax=-10)
            with pytest.raises(ValueError, match=r"adaptive_avg_pool2d: the output clamp .*"
                                                 r"\[0, 300\].*\[-128, 127\]"):
                qf.adaptive_avg_pool2d(x, 0, 2, qmin=0, qmax=300)
            got = qf.avg_pool2d(x, 0, 2, qmin=-10, qmax=10)  # a valid narrow clamp
            assert int(got.min()) >= -10 and int(got.max()) <= 10


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_empty_batch_with_fused_activation(activation, per_channel):
    """N = 0 through linear and conv2d (the fused-ReLU requant path reduces over the
    output): an empty output of the right shape on every backend."""
    w_scale = torch.rand(9, dtype=torch.float64) * 0.01 + 1e-3 if per_channel else 0.01
    rq = make_requant(0.05, w_scale, 0.1, 3, qint8, activation)
    w = torch.randint(-127, 128, (9, 10), dtype=torch.int8)
    wc = torch.randint(-127, 128, (9, 10, 3, 3), dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (9,), dtype=torch.int32)
    for b in _backends():
        with backends.use(b):
            for n in (0, 2, 0):  # an empty batch also after a non-empty one (cached plans)
                x = _act((n, 10), torch.int8)
                y = qf.linear(x, -4, w, bias, rq)
                assert y.shape == (n, 9) and y.dtype == torch.int8
                with backends.use("reference"):
                    assert torch.equal(y, qf.linear(x, -4, w, bias, rq))
                xc = _act((n, 10, 5, 4), torch.int8)
                y = qf.conv2d(xc, -4, wc, bias, 1, 1, 1, 1, rq)
                assert y.shape == (n, 9, 5, 4) and y.dtype == torch.int8
                with backends.use("reference"):
                    assert torch.equal(y, qf.conv2d(xc, -4, wc, bias, 1, 1, 1, 1, rq))


def test_graph_capture_is_refused_clearly():
    """torch.jit.trace would record a NumPy op's result as a constant; torch.compile would
    trace NumPy calls on fake tensors: both refused with a clear error."""
    import gpuquant.functional as GF
    from gpuquant import QParams, backends, qint8
    x = torch.randn(2, 3)
    qp = QParams(qint8, 0.1, 0)

    def f(t):
        return GF.quantize(t, qp)
    with backends.use("numpy"):
        with pytest.raises(NotImplementedError, match="cannot be recorded by torch.jit.trace"):
            torch.jit.trace(f, (x,), check_trace=False)
        assert torch.equal(f(x), f(x))  # eager is unaffected


def test_pool_bounds_are_integers_and_relu6_tiny_scales():
    """Pool clamp bounds given as non-integers are refused, never truncated; a ReLU6 whose
    6 / scale overflows float32 leaves the dtype's top as the clamp (it raised); make_requant
    names a bad out_scale."""
    from gpuquant import functional as GF
    x = torch.zeros(1, 3, 5, 5, dtype=torch.int8)
    with pytest.raises(ValueError, match="avg_pool2d: qmin must be an integer, got 1.5"):
        GF.avg_pool2d(x, 0, 2, qmin=1.5)
    with pytest.raises(TypeError, match="adaptive_avg_pool2d: qmax must be an int, got True"):
        GF.adaptive_avg_pool2d(x, 0, 1, qmax=True)
    with pytest.raises(ValueError, match="divisor_override must be None or a positive int "
                                         "below 2\\^63, got True"):
        GF.avg_pool2d(x, 0, 2, divisor_override=True)
    assert GF.avg_pool2d(x, 0, 2, qmin=2.0).min() == 2  # an integral float is that integer
    rq = make_requant(1e-38, 1.0, 1e-38, 3, qint8, "relu6")
    assert (rq.qmin, rq.qmax) == (3, 127)
    with pytest.raises(ValueError, match="make_requant: out_scale must be a finite float > 0, "
                                         "got 'x'"):
        make_requant(0.1, 1.0, "x", 0, qint8)


def test_make_requant_takes_numpy_scales():
    import numpy as np
    from gpuquant.functional import make_add_params
    a = make_requant(0.1, torch.tensor([0.02]), np.float32(0.05), 0, qint8)
    b = make_requant(0.1, torch.tensor([0.02]), np.array(0.05), 0, qint8)
    c = make_requant(0.1, torch.tensor([0.02]), 0.05, 0, qint8)
    assert torch.equal(b.multiplier, c.multiplier)  # (np.float32(0.05) is another number)
    assert a.multiplier.dtype == torch.int32 and int(a.rshift) == int(c.rshift)
    assert make_add_params(0.1, 0, 0.1, 0, np.float32(0.2), 0, qint8).left_shift == 20


@pytest.mark.parametrize("divisor", [2 ** 63, 2 ** 64])
def test_avg_pool_divisor_override_past_int64_refused_on_every_backend(divisor):
    """A divisor_override beyond int64 (torch refuses it too) is a ValueError on every
    backend; Triton had read 2^63 as a negative divisor and returned 127 everywhere, NumPy
    raised an OverflowError, the reference gave -128 (found by review). 2^63 - 1 pools."""
    x = _act((2, 3, 6, 6), torch.int8)
    for b in _backends():
        with backends.use(b):
            with pytest.raises(ValueError, match=r"divisor_override must be None or a "
                                                 r"positive int below 2\^63"):
                qf.avg_pool2d(x, -128, 3, 1, 1, False, True, divisor)
            assert bool((qf.avg_pool2d(x, -128, 3, 1, 1, False, True, 2 ** 63 - 1)
                         == -128).all())


def test_make_add_params_takes_numpy_input_scales():
    """The input scales as NumPy reals too (as the output scale and make_requant's): an
    np.float32 a_scale was refused as "must be a finite float > 0, got 0.1" (found by
    review); the parameters equal those of the same float."""
    import numpy as np
    from gpuquant.functional import make_add_params
    want = make_add_params(float(np.float32(0.1)), 3, float(np.float32(0.2)), -4, 0.3, 5, qint8)
    for a in (np.float32(0.1), np.array(0.1, dtype=np.float32)):
        got = make_add_params(a, 3, np.float32(0.2), -4, 0.3, 5, qint8)
        assert (got.a_multiplier, got.a_rshift) == (want.a_multiplier, want.a_rshift)
        assert (got.b_multiplier, got.b_rshift) == (want.b_multiplier, want.b_rshift)
        assert torch.equal(got.out.multiplier, want.out.multiplier)
    for bad in (0.0, float("nan"), np.float32(-1.0), True, "x"):
        with pytest.raises(ValueError, match=r"make_add_params: b_scale must be a finite "
                                             r"float > 0"):
            make_add_params(0.1, 0, bad, 0, 0.3, 0, qint8)


def test_make_requant_checks_each_scale():
    """Two negative scales multiply to a positive multiplier: the layer's sign flipped
    silently (found by review); a NaN weight scale among per-channel ones is named."""
    with pytest.raises(ValueError, match=r"make_requant: in_scale must be finite and > 0, "
                                         r"got \[-0\.1"):
        make_requant(-0.1, -0.02, 0.05, 0, qint8)
    with pytest.raises(ValueError, match=r"make_requant: w_scale must be finite and > 0, "
                                         r"got \[nan\]"):
        make_requant(0.1, torch.tensor([0.02, float("nan"), 0.03]), 0.05, 0, qint8)
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        make_requant(0.1, 0.0, 0.05, 0, qint8)
