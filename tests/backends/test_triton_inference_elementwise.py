"""Triton quantize / dequantize / requantize / add / mul / lookup / concat / gather / pooling
kernels == the NumPy oracle and the reference backend, byte for byte (interpreter on CPU,
device on GPU)."""
from __future__ import annotations

import pytest
import torch

from _triton_inference_util import (ORACLES, TRITON, assert_same, check_op, cpu, dev,
                                    poison, rand_act)  # noqa: F401
from gpuquant import qint8, quint8
from gpuquant.functional.requant import make_add_params, make_requant

pytestmark = pytest.mark.usefixtures("poison")
CL = torch.channels_last


def _i32(v):
    return torch.as_tensor(v, dtype=torch.int32)


# --------------------------------------------------------------------------- float boundary
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_dequantize(axis, layout):
    x = torch.randn(3, 5, 7, 6) * 4
    x[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 1e9, -3e7])  # clamp, |v| > 2^22
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    if axis is None:
        scale, zp = torch.tensor(0.03), _i32(3)
    else:
        c = x.shape[axis]
        scale = torch.rand(c) * 0.05 + 0.01
        zp = torch.randint(100, 156, (c,), dtype=torch.int32)
    for qmin, qmax, dt in ((-128, 127, torch.int8), (0, 255, torch.uint8)):
        zpd = zp if dt == torch.uint8 else zp - (128 if axis is not None else 0)
        q = check_op("quantize", (x, scale, zpd, qmin, qmax, axis, dt), f"quantize {dt}")
        check_op("dequantize", (cpu(q), scale, zpd, axis), f"dequantize {dt}")


def test_quantize_ties_round_half_even_and_half_inputs():
    scale = torch.tensor(0.25)  # power of two: x * inv exact, ties survive
    x = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * 0.25
    q = check_op("quantize", (x, scale, _i32(0), -128, 127, None, torch.int8), "ties")
    assert torch.equal(q.cpu().float(), torch.round(x / 0.25))  # half to even
    xh = (torch.randn(4, 33) * 3).half()
    check_op("quantize", (xh, torch.tensor(0.021), _i32(-4), -128, 127, None, torch.int8), "fp16")
    xb = (torch.randn(4, 33) * 3).bfloat16()
    check_op("quantize", (xb, torch.tensor(0.021), _i32(7), -127, 127, None, torch.int8), "bf16")


@pytest.mark.parametrize("axis", [None, 1])
def test_quantize_qint32_clamps_and_adds_the_zero_point_exactly(axis):
    """qint32: values past the range (and +-inf) clamp to INT32_MAX / INT32_MIN (a float32
    clamp at 2^31 - 1 would round to 2^31 and wrap), and zero points beyond 2^24 are added
    exactly (not in float32)."""
    imin, imax = -2 ** 31, 2 ** 31 - 1
    x = torch.randn(4, 6, 33) * 3e9
    x[0, 0, :6] = torch.tensor([3e9, 2.2e9, 2.0 ** 31, -3e9, float("inf"), -float("inf")])
    x[1] = torch.randint(-2 ** 20, 2 ** 20, (6, 33)).float() + 0.5  # ties, small values
    sign = torch.randint(0, 2, (6, 33)).float() * 2 - 1  # ties in [2^22, 2^23): float32
    x[2] = sign * (torch.randint(2 ** 22, 2 ** 23, (6, 33)).float() + 0.5)  # has halves there
    if axis is None:
        scale, zp = torch.tensor(1.0), _i32(123456789)
    else:
        scale = torch.tensor([1.0, 0.5, 0.25, 2.0, 1.0, 1.0])
        zp = torch.tensor([123456789, -987654321, imax, imin, 0, 16777217], dtype=torch.int32)
    q = check_op("quantize", (x, scale, zp, imin, imax, axis, torch.int32), f"qint32 {axis}")
    # the contract's formula in exact arithmetic: rne of the float32 product, then integers
    shape = [1, -1, 1] if axis is not None else []
    inv = (1.0 / scale).reshape(shape)
    r = torch.round(x * inv).double()
    want = (r + zp.double().reshape(shape)).clamp(imin, imax).to(torch.int64)
    assert torch.equal(q.cpu().to(torch.int64), want)
    if axis is None:
        assert q[0, 0, :6].tolist() == [imax, imax, imax, imin, imax, imin]
    check_op("dequantize", (cpu(q), scale, zp, axis), f"qint32 dequantize {axis}")
    # q - zp leaves the int32 range: formed in int64 (int32 would wrap)
    dq = check_op("dequantize", (_i32([imax, 0, imin]), torch.tensor(1.0), _i32(-2 ** 30), None),
                  "qint32 dequantize past int32")
    assert dq.cpu().tolist() == [3.0 * 2 ** 30, 2.0 ** 30, -(2.0 ** 30)]


def test_quantize_dequantize_0d():
    x = torch.tensor(1.53)
    q = check_op("quantize", (x, torch.tensor(0.1), _i32(3), -128, 127, None, torch.int8), "0-d")
    assert q.shape == () and int(q) == 18
    dq = check_op("dequantize", (q.cpu(), torch.tensor(0.1), _i32(3), None), "0-d dequantize")
    assert dq.shape == () and dq.dtype == torch.float32


@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize(per_channel):
    acc = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 6, 4, 5), dtype=torch.int32)
    acc[0, 0, 0, :2] = torch.tensor([-2 ** 31, 2 ** 31 - 1], dtype=torch.int32)
    acc[1] //= 2 ** 20  # small accumulators: multipliers >= 1 do not saturate
    if per_channel:
        rq = make_requant(1.0, torch.rand(6, dtype=torch.float64) * 3 + 0.05, 0.5, 4, qint8)
        assert (rq.rshift < 0).any()
        check_op("requantize", (acc, rq, 1), "requantize per-channel")
        check_op("requantize", (acc.contiguous(memory_format=CL), rq, 1), "requantize CL")
    else:
        for real in (1e-12, 0.001, 3.7):  # flushed-to-zero, plain, left shift
            rq = make_requant(real, 1.0, 1.0, 100, quint8, "relu6")
            check_op("requantize", (acc, rq), f"requantize per-tensor {real}")
        # int64 accumulators beyond the int32 range take the int64 path
        check_op("requantize", (acc.long() * 3, rq), "requantize int64 acc")


# --------------------------------------------------------------------------- add / mul / concat
@pytest.mark.parametrize("dtypes", [(torch.int8, torch.int8, qint8),
                                    (torch.uint8, torch.int8, quint8)],
                         ids=["s8s8", "u8s8"])
def test_add_and_mul(dtypes):
    da, db, dout = dtypes
    a = rand_act((2, 5, 7, 6), da).contiguous(memory_format=CL)
    b = rand_act((2, 5, 7, 6), db)  # a different layout
    zpa = 131 if da == torch.uint8 else 3
    for act in ("none", "relu"):
        p = make_add_params(0.05, zpa, 0.02, -7, 0.06, 10 if dout is qint8 else 140, dout, act)
        check_op("add", (a, b, p), f"add {act}")
    check_op("add", (a, b[:, :, :1, :], p), "add broadcast")
    rq = make_requant(0.05 * 0.02, 1.0, 0.07, 100 if dout is quint8 else -2, dout)
    check_op("mul", (a, zpa, b, -7, rq), "mul")


@pytest.mark.parametrize("xdt,tdt", [(torch.int8, torch.int8), (torch.uint8, torch.int8),
                                     (torch.int8, torch.uint8)], ids=["s8s8", "u8s8", "s8u8"])
def test_lookup(xdt, tdt):
    """The activations' table lookup: every code (the table's ends included), channels_last
    and strided inputs, an empty one."""
    x = rand_act((3, 7, 5, 11), xdt)
    x.view(-1)[:256] = (torch.arange(256) - (128 if xdt == torch.int8 else 0)).to(xdt)
    x = x.contiguous(memory_format=CL)
    table = rand_act((256,), tdt)
    check_op("lookup", (x, table), "lookup channels_last")
    check_op("lookup", (x[:, ::2, 1:], table), "lookup strided")
    check_op("lookup", (rand_act((1030,), xdt), table), "lookup flat")
    check_op("lookup", (rand_act((0, 3), xdt), table), "lookup empty")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_gather_hw(dtype):
    """Nearest resizes' row / column gather (index tables from the host): channels_last,
    NCHW and strided inputs, channels past a block, an index table that repeats and skips."""
    ih = torch.tensor([0, 0, 1, 3, 4, 4, 2], dtype=torch.int64)
    iw = torch.tensor([5, 1, 1, 0], dtype=torch.int64)
    x = rand_act((2, 70, 5, 6), dtype)
    check_op("gather_hw", (x.contiguous(memory_format=CL), ih, iw), "gather channels_last")
    check_op("gather_hw", (x, ih, iw), "gather nchw")
    check_op("gather_hw", (x[:, 1::2], ih, iw), "gather strided")
    check_op("gather_hw", (x[:0], ih, iw), "gather empty")


def test_concat():
    a = rand_act((2, 5, 7, 6), torch.uint8).contiguous(memory_format=CL)
    b = rand_act((2, 3, 7, 6), torch.uint8)
    c = rand_act((2, 1, 7, 6), torch.uint8).contiguous(memory_format=CL)
    rqs = [make_requant(0.05, 1.0, 0.1, 128, quint8), None,
           make_requant(0.3, 1.0, 0.1, 128, quint8)]
    y = check_op("concat", ([a, b, c], [3, 128, 250], rqs, 1, torch.uint8), "concat dim 1")
    assert y.is_contiguous(memory_format=CL)
    check_op("concat", ([a, a], [3, 7], [None, rqs[0]], 0, torch.uint8), "concat dim 0")
    m1, m2 = rand_act((4, 9), torch.int8), rand_act((4, 2), torch.int8)
    rq = make_requant(0.2, 1.0, 0.1, -5, qint8)
    check_op("concat", ([m1, m2], [0, 1], [rq, None], -1, torch.int8), "concat 2-D")


# --------------------------------------------------------------------------- pooling
MAX_CASES = [(3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, None, 0, 1, False),
             ((3, 2), (2, 1), (1, 0), (2, 1), True)]


@pytest.mark.parametrize("args", MAX_CASES, ids=[str(i) for i in range(len(MAX_CASES))])
def test_max_pool2d(args):
    x = rand_act((2, 5, 9, 8), torch.int8).contiguous(memory_format=CL)
    check_op("max_pool2d", (x, *args), f"max_pool2d {args}")


# (H, W), kernel, stride, padding, dilation, ceil_mode with windows entirely in the padding
PAD_WINDOW_CASES = [((1, 5), (2, 2), (1, 3), (1, 0), (2, 1), False),
                    ((2, 1), (2, 2), (3, 3), (1, 0), (3, 2), True),
                    ((1, 1), (1, 2), (3, 2), (0, 1), (2, 2), True),
                    ((2, 9), (2, 2), (1, 1), (1, 1), (3, 3), True),
                    ((6, 1), (1, 2), (2, 2), (0, 1), (1, 2), True),
                    ((1, 6), (2, 1), (2, 3), (1, 0), (2, 2), False)]


def _max_pool_vs_torch(x, k, s, p, d, ceil):
    """check_op of max_pool2d, and its bytes == torch's float max pool with -inf (a window
    without an input element) clamped to the dtype's minimum; returns whether it had one."""
    want = torch.nn.functional.max_pool2d(x.float(), k, s, p, d, ceil)
    got = check_op("max_pool2d", (x, k, s, p, d, ceil), f"max_pool2d {k, s, p, d, ceil}")
    assert torch.equal(got.cpu(), want.clamp(min=torch.iinfo(x.dtype).min).to(x.dtype))
    return bool(torch.isinf(want).any())


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_max_pool2d_windows_in_the_padding(dtype):
    """Dilation and ceil_mode can place a whole window in the padding: every backend gives
    the dtype's minimum there (torch's float max pool: -inf)."""
    for hw, k, s, p, d, ceil in PAD_WINDOW_CASES:
        x = rand_act((2, 5) + hw, dtype).contiguous(memory_format=CL)
        assert _max_pool_vs_torch(x, k, s, p, d, ceil)
    for _ in range(30):  # random small geometries (some have such a window)
        h, w = (int(v) for v in torch.randint(1, 5, (2,)))
        k, d, s = (tuple(int(v) for v in torch.randint(1, 4, (2,))) for _ in range(3))
        p = tuple(int(torch.randint(0, kk // 2 + 1, ())) for kk in k)
        ceil = bool(torch.randint(0, 2, ()))
        eff = [dd * (kk - 1) + 1 for dd, kk in zip(d, k)]
        if any(n + 2 * pp + (ss - 1 if ceil else 0) < e
               for n, pp, ss, e in zip((h, w), p, s, eff)):
            continue  # no output: refused by gpuquant.functional
        _max_pool_vs_torch(rand_act((2, 3, h, w), dtype), k, s, p, d, ceil)


AVG_CASES = [(3, 2, (1, 1), False, True, None), (3, 2, (1, 1), True, False, None),
             (2, 2, (0, 0), False, True, None), (3, 2, (1, 1), True, True, None),
             ((3, 2), (2, 1), (1, 0), True, False, 5)]


@pytest.mark.parametrize("args", AVG_CASES, ids=[str(i) for i in range(len(AVG_CASES))])
def test_avg_pool2d(args):
    x = rand_act((2, 5, 7, 6), torch.uint8).contiguous(memory_format=CL)
    check_op("avg_pool2d", (x, 131, *args, 0, 255), f"avg_pool2d {args}")
    xs = rand_act((1, 3, 7, 6), torch.int8)
    check_op("avg_pool2d", (xs, -20, *args, -100, 100), f"avg_pool2d int8 clamp {args}")


@pytest.mark.parametrize("size", [(1, 1), (3, 4), (5, 2)])
def test_adaptive_avg_pool2d(size):
    x = rand_act((2, 37, 7, 5), torch.int8).contiguous(memory_format=CL)
    check_op("adaptive_avg_pool2d", (x, -3, size, -128, 127), f"adaptive {size}")


def test_add_32_bit_modes_at_the_extremes():
    """The folded add modes (the inputs' zero points and nudges in one multiply-add, the
    one-add rounding division, exact power-of-two terms, an output ReLU's rounding without
    the sign term, the AddParams read as 32-bit words) at their bounds: every int8 value
    against every uint8 value, zero points at both ends of the 8-bit ranges, input
    multipliers just below 1 and rshifts 0 (no rounding) to 31, exact terms with shifts 0
    to 19 (and 20, one past: not exact), exact ties of the rounding division of both signs,
    the output with and without a left shift and a ReLU; alone and fused into a conv's
    epilogue, bytes equal to the oracles. Parameters past the 32-bit bounds (left shift 21,
    a zero point outside [-128, 255]) take the int64 mode."""
    import dataclasses

    from gpuquant.backends.triton.common import scalar_int
    from gpuquant.backends.triton.fixed_point import add_mode
    from gpuquant.functional.requant import AddParams
    a = torch.arange(-128, 128, dtype=torch.int8).repeat(256).view(8, 32, 16, 16)
    b = torch.arange(0, 256, dtype=torch.uint8).repeat_interleave(256).view(8, 32, 16, 16)
    a, b = a.contiguous(memory_format=CL), b.contiguous(memory_format=CL)
    cases = []
    # (zero points, a's (multiplier, rshift), b's, the mode for an output rshift >= 1)
    for (za, zb), (ma, ra), (mb, rb), kind in (
            ((-128, 255), (2 ** 31 - 1, 0), (2 ** 31 - 1, 0), 1),
            ((255, -128), (2 ** 30 + 7, 3), (2 ** 31 - 5, 31), 1),
            ((-128, -128), (2 ** 31 - 1, 1), (2 ** 30, 17), 4),   # b exact: x 2^2
            ((-128, 255), (2 ** 30, 0), (2 ** 31 - 1, 5), 3),     # a exact: x 2^19
            ((0, 3), (2 ** 31 - 1, 2), (2 ** 30, 19), 4),         # b exact: x 2^0
            ((5, 7), (2 ** 30, 0), (2 ** 30, 0), 1),              # both exact, no rshift
            # ties: 2^19 (x - zp) / 2^20 is k + 1/2 for odd x - zp (rshift 20: not exact)
            ((3, 0), (2 ** 30, 20), (2 ** 30, 20), 1)):
        for out_scale, act in ((2.0 ** 21 * 0.7, "none"), (2.0 ** 21 * 0.7, "relu"),
                               (3e-3, "none")):  # output rshift >= 1, and < 0 (mode 2)
            out = make_requant(1.0, 1.0, out_scale, 5, qint8, act)
            p = AddParams(20, za, ma, ra, zb, mb, rb, out)
            mode = 2 if scalar_int(out.rshift) < 1 else kind + (8 if act == "relu" else 0)
            cases.append((p, mode))
    for p, mode in cases:
        assert add_mode(p, scalar_int(p.out.rshift)) == mode, p
        check_op("add", (a, b, p), f"add extremes {p}")
    p = cases[0][0]
    for wide in (dataclasses.replace(p, left_shift=21), dataclasses.replace(p, a_zero_point=256)):
        assert add_mode(wide, scalar_int(wide.out.rshift)) == 0
    # fused: the conv's own output against every uint8 residual value
    rq = make_requant(0.02, torch.rand(6, dtype=torch.float64) * 0.01 + 0.001, 0.05, 3, qint8)
    x = rand_act((2, 64, 16, 16), torch.int8).contiguous(memory_format=CL)
    w = torch.randint(-127, 128, (6, 64, 3, 3), dtype=torch.int8)
    r = torch.arange(0, 256, dtype=torch.uint8).repeat(12).view(2, 6, 16, 16)
    r = r.contiguous(memory_format=CL)
    args = (x, 1, w, None, (1, 1), (1, 1), (1, 1), 1, rq)
    for p, _ in cases:
        got = TRITON["conv2d_add"](*dev(args), dev(r), p)
        for oname, ops in ORACLES:
            assert_same(got, ops["add"](ops["conv2d"](*args), r, p), f"conv2d_add {oname}")


def test_add_arithmetic_modes():
    """make_add_params' parameters take the folded paths (modes 1, 3, 4 and their ReLU
    forms 9, 11, 12; mode 2 with an output left shift); hand-made ones outside its bounds
    (left shift 24, an input multiplier >= 1) the int64 path; every mode gives the
    reference's bytes, alone and fused into a conv."""
    import dataclasses

    from gpuquant.backends.triton.fixed_point import add_mode
    from gpuquant.functional.requant import quantize_multiplier
    a = rand_act((2, 6, 5, 4), torch.int8).contiguous(memory_format=CL)
    b = rand_act((2, 6, 5, 4), torch.uint8).contiguous(memory_format=CL)
    base = make_add_params(0.05, 3, 0.04, 130, 0.06, -2, qint8, "relu")
    big_out = make_add_params(0.05, 3, 0.04, 130, 2e-8, -2, qint8)  # output rshift < 0
    ma, sa = quantize_multiplier(1.7)  # an input multiplier >= 1: rshift < 0
    wide = dataclasses.replace(base, left_shift=24)
    neg_in = dataclasses.replace(base, a_multiplier=int(ma), a_rshift=int(sa))
    # the folded modes: a's scale the larger (a's term an exact shift), b's, equal scales
    # (both exact, neither rounded: the general folded form); + 8 with the output ReLU
    cases = {"fast_a_exact_relu": (base, 11),
             "fast_a_exact": (make_add_params(0.05, 3, 0.04, 130, 0.06, -2, qint8), 3),
             "fast_b_exact_relu": (make_add_params(0.03, 3, 0.04, 130, 0.06, -2, qint8,
                                                   "relu"), 12),
             "fast_equal": (make_add_params(0.04, 3, 0.04, 130, 0.06, -2, qint8), 1),
             "fast_equal_relu": (make_add_params(0.04, 3, 0.04, 130, 0.06, -2, qint8,
                                                 "relu"), 9),
             "fast_out_lshift": (big_out, 2), "shift24": (wide, 0), "input_lshift": (neg_in, 0)}
    from gpuquant.backends.triton.common import scalar_int
    for name, (p, mode) in cases.items():
        assert add_mode(p, scalar_int(p.out.rshift)) == mode, name
        check_op("add", (a, b, p), f"add {name}")
    # fused into the epilogue (conv output = a): every arithmetic path (a compile-time choice
    # of the kernel), through the GEMM (5 channels: im2col), the implicit-GEMM conv (64
    # channels) and the depthwise kernel
    rq = make_requant(0.02, torch.rand(6, dtype=torch.float64) * 0.01 + 0.001, 0.05, 3, qint8)
    convs = {c: (rand_act((2, c, 5, 4), torch.int8).contiguous(memory_format=CL),
                 torch.randint(-127, 128, (6, c // g, 3, 3), dtype=torch.int8), g)
             for c, g in ((5, 1), (64, 1), (6, 6))}
    for c, (x, w, g) in convs.items():
        args = (x, 1, w, None, (1, 1), (1, 1), (1, 1), g, rq)
        for name, (p, _) in cases.items():
            got = TRITON["conv2d_add"](*dev(args), dev(b), p)
            for oname, ops in ORACLES:
                assert_same(got, ops["add"](ops["conv2d"](*args), b, p),
                            f"conv2d_add C={c} {name} {oname}")
