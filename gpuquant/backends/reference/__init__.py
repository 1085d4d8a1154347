"""The reference backend: plain torch, the readable definition of every op.

Every other backend implements the same ops with the same signatures and gives the same
bytes. Integer ops compute in int64 (convolution through float64, exact for every int8
product sum that fits int32) so the arithmetic can be read off directly.

Op signatures (all tensors are torch tensors; quantized activations are int8 / uint8 in
the float model's logical shape, NCHW for images, channels_last memory preferred):

quantize(x, scale, zero_point, qmin, qmax, axis, out_dtype) -> int tensor
dequantize(q, scale, zero_point, axis) -> float32 tensor
fake_quant(x, scale, zero_point, qmin, qmax, axis) -> x.dtype tensor, differentiable (STE)
requantize(acc, rq, axis) -> rq.dtype.storage tensor        (acc int32, channel ``axis``)
conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq) -> (N, O, Ho, Wo)
linear(x, x_zp, w, bias, rq) -> (..., N)
add(a, b, params: AddParams) -> tensor          (TFLite integer add)
mul(a, a_zp, b, b_zp, rq) -> tensor             (TFLite integer mul)
concat(xs, zero_points, rqs, dim, out_dtype) -> tensor  (rqs[i] None: copy as is)
max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode) -> tensor
avg_pool2d(x, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
           divisor_override, qmin, qmax) -> tensor
adaptive_avg_pool2d(x, zero_point, output_size, qmin, qmax) -> tensor

``scale`` is a float32 tensor (0-d, or 1-D along ``axis``), ``zero_point`` int32 likewise,
``bias`` int32 (O,) or None, ``rq`` a :class:`gpuquant.functional.requant.Requant`.
Input checking happens in :mod:`gpuquant.functional`; backends may assume valid input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...functional.requant import INT32_MAX, INT32_MIN, AddParams, Requant

NAME = "reference"
DEVICES = frozenset({"cpu", "cuda"})
PRIORITY = 0


def is_available():
    return True, ""


# --------------------------------------------------------------------------- float side
def _bcast(t: torch.Tensor, axis, ndim: int) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _quant_core(x, scale, zero_point, qmin, qmax, axis):
    """``(r, clamp(r, qmin, qmax))`` with ``r = rne(x * inv_scale) + zero_point``: the
    product and its rounding in float32; the add and the clamp exact, in float32 for ranges
    within +-2^24 and in float64 beyond (qint32's zero points and qmax = 2^31 - 1 are not
    float32 numbers)."""
    inv = _bcast(1.0 / scale.float(), axis, x.dim())
    r = torch.round(x.float() * inv)  # rne
    if max(-qmin, qmax) > 2 ** 24:
        r = r.double()
    r = r + _bcast(zero_point, axis, x.dim()).to(r.dtype)
    return r, r.clamp(qmin, qmax)


def quantize(x, scale, zero_point, qmin, qmax, axis, out_dtype):
    _, q = _quant_core(x, scale, zero_point, qmin, qmax, axis)
    return q.to(out_dtype)


def dequantize(q, scale, zero_point, axis):
    zp = _bcast(zero_point, axis, q.dim())
    s = _bcast(scale.float(), axis, q.dim())
    return (q.to(torch.int64) - zp).to(torch.float32) * s  # int64: qint32 q - zp may not fit


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        r, q = _quant_core(x, scale, zero_point, qmin, qmax, axis)
        zp = _bcast(zero_point, axis, x.dim()).to(q.dtype)
        s = _bcast(scale.float(), axis, x.dim())
        y = (q - zp).to(torch.float32) * s  # the integer q - zp (exact), as dequantize
        y = torch.where(torch.isnan(x), x.float(), y)  # NaN in, NaN out
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quant(x, scale, zero_point, qmin, qmax, axis):
    return _FakeQuant.apply(x, scale, zero_point, qmin, qmax, axis)


# --------------------------------------------------------------------------- fixed point
def srdhm(a: torch.Tensor, b) -> torch.Tensor:
    """SaturatingRoundingDoublingHighMul on int64 tensors holding int32 values."""
    a = a.to(torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30, device=a.device),
                        torch.tensor(1 - (1 << 30), device=a.device))
    t = ab + nudge
    hi = torch.where(t >= 0, t >> 31, -((-t) >> 31))  # C division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX, device=a.device), hi)


def rdbpot(x: torch.Tensor, exponent) -> torch.Tensor:
    """RoundingDivideByPOT (round half away from zero) on int64 tensors, exponent >= 0."""
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(acc, multiplier, rshift):
    """int64-held int32 ``acc`` times (multiplier, rshift), TFLite semantics."""
    acc = acc.to(torch.int64)
    rshift = torch.as_tensor(rshift, dtype=torch.int64, device=acc.device)
    left = torch.clamp(-rshift, min=0)
    x = torch.clamp(acc * (torch.ones_like(left) << left), INT32_MIN, INT32_MAX)
    x = srdhm(x, multiplier)
    return rdbpot(x, torch.clamp(rshift, min=0))


def requantize(acc, rq: Requant, axis=None):
    m = rq.multiplier.to(acc.device)
    s = rq.rshift.to(acc.device)
    if rq.per_channel:
        m, s = _bcast(m, axis, acc.dim()), _bcast(s, axis, acc.dim())
    y = multiply_by_quantized_multiplier(acc, m, s) + rq.zero_point
    return y.clamp(rq.qmin, rq.qmax).to(rq.dtype.storage)


# --------------------------------------------------------------------------- integer ops
def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq: Requant):
    xd = x.to(torch.float64) - float(x_zp)
    acc = F.conv2d(xd, w.to(torch.float64), None, stride, padding, dilation, groups)
    acc = acc.round().to(torch.int64)  # exact: |acc| < 2^31 checked by the caller
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(1, -1, 1, 1)
    return _channels_last(requantize(acc, rq, axis=1))


def linear(x, x_zp, w, bias, rq: Requant):
    xd = x.to(torch.float64) - float(x_zp)
    acc = (xd @ w.to(torch.float64).t()).round().to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return requantize(acc, rq, axis=acc.dim() - 1)


def add(a, b, p: AddParams):
    def scaled(x, zp, m, s):
        v = (x.to(torch.int64) - zp) * (1 << p.left_shift)
        return multiply_by_quantized_multiplier(v, m, s)
    total = scaled(a, p.a_zero_point, p.a_multiplier, p.a_rshift) + \
        scaled(b, p.b_zero_point, p.b_multiplier, p.b_rshift)
    return _channels_last(requantize(total, p.out))


def mul(a, a_zp, b, b_zp, rq: Requant):
    prod = (a.to(torch.int64) - a_zp) * (b.to(torch.int64) - b_zp)
    return _channels_last(requantize(prod, rq))


def lookup(x, table):
    idx = x.to(torch.int64) + (128 if x.dtype == torch.int8 else 0)
    return _channels_last(table[idx])


def concat(xs, zero_points, rqs, dim, out_dtype):
    parts = []
    for x, zp, rq in zip(xs, zero_points, rqs):
        if rq is None:
            parts.append(x.to(out_dtype))
        else:
            parts.append(requantize(x.to(torch.int64) - zp, rq))
    return _channels_last(torch.cat(parts, dim))


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
    y = F.max_pool2d(x.to(torch.float32), kernel_size, stride, padding, dilation, ceil_mode)
    # a window entirely in the padding is -inf: clamped to the dtype's minimum
    return _channels_last(y.clamp(min=torch.iinfo(x.dtype).min).to(x.dtype))


def _round_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Integer division rounding half away from zero (TFLite average pool)."""
    half = den // 2
    q_pos = (num + half) // den
    q_neg = -((-num + half) // den)
    return torch.where(num >= 0, q_pos, q_neg)


def avg_pool2d(x, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override, qmin, qmax):
    xd = x.to(torch.float64) - zero_point  # an int, or a 0-d device tensor (QAT: no host read)
    ones = torch.ones_like(xd[:1, :1])
    # window sums (exact in float64) and the divisor torch's AvgPool2d would use
    sums = F.avg_pool2d(xd, kernel_size, stride, padding, ceil_mode, True, 1)
    if divisor_override:
        den = torch.full_like(sums[:1, :1], float(divisor_override))
    elif count_include_pad:
        # padding counts, positions past the input added by ceil_mode do not: torch's own
        # divisor is (real elements in the window) / (its average of ones)
        real = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, True, 1)
        den = real / F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, True)
    else:
        den = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, True, 1)
    y = _round_div(sums.round().to(torch.int64), den.round().to(torch.int64)) + zero_point
    return _channels_last(y.clamp(qmin, qmax).to(x.dtype))


def gather_hw(x, ih, iw):
    """``y[n, c, i, j] = x[n, c, ih[i], iw[j]]`` (nearest-neighbour resizes)."""
    return _channels_last(x.index_select(2, ih).index_select(3, iw))


def adaptive_avg_pool2d(x, zero_point, output_size, qmin, qmax):
    n, c, h, w = x.shape
    oh, ow = output_size
    xd = x.to(torch.int64) - zero_point
    out = torch.empty((n, c, oh, ow), dtype=torch.int64, device=x.device)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            s = xd[:, :, h0:h1, w0:w1].sum(dim=(2, 3))
            out[:, :, i, j] = _round_div(s, (h1 - h0) * (w1 - w0))
    return _channels_last((out + zero_point).clamp(qmin, qmax).to(x.dtype))


OPS = {
    "quantize": quantize, "dequantize": dequantize, "fake_quant": fake_quant,
    "requantize": requantize, "conv2d": conv2d, "linear": linear, "add": add, "mul": mul,
    "lookup": lookup, "concat": concat, "max_pool2d": max_pool2d, "avg_pool2d": avg_pool2d,
    "adaptive_avg_pool2d": adaptive_avg_pool2d, "gather_hw": gather_hw,
}

# dynamic (per-token) quantization ops for transformers: defined in their own file
from ..reference_dynamic import OPS as _DYNAMIC_OPS  # noqa: E402

OPS.update(_DYNAMIC_OPS)
