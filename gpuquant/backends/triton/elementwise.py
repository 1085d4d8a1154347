"""Triton kernels for the rest of a quantized network: quantize, dequantize, requantize,
add, mul, table lookup, concat, nearest resize, max / average / adaptive-average pooling
(contract section 1, the semantics of :mod:`gpuquant.backends.reference`, bit for bit).

Elementwise kernels walk the dense storage of their operands (contiguous or channels_last),
the channel of a flat offset being ``(offset // stride[axis]) % size[axis]``; pooling
kernels read NHWC (a program owns a block of output pixels x a block of channels) and
write channels_last. Per-tensor parameters travel as small device tensors (memoised), never
as host reads, so a network runs without host round trips. The float kernels (quantize,
dequantize) launch with FP contraction off: ``x * inv_scale`` is rounded on its own before
it is rounded half to even (:func:`~.common.rne`: ``cvt.rni`` compiled, an exact add-and-
subtract emulation under the interpreter).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl
import torch

from .common import INTERPRET, LAUNCH_OPTS, cdiv, derived, scalar_int
from .launch import launch
from .fixed_point import add_epi, requantize_i32, requantize_values
from .conv import window_origin
from .fake_quant import _rne
from .gemm import epilogue_scalars, residual_mode

__all__ = ["OPS"]

_BLOCK = 1024


# --------------------------------------------------------------------------- kernels
@triton.jit
def _channel(offs, stride_c, C, PER_CHANNEL: tl.constexpr):
    if PER_CHANNEL:
        return (offs // stride_c) % C
    else:
        return offs * 0


@triton.jit
def _quantize_kernel(X, INV, ZP, Y, numel, stride_c, C, qmin, qmax,
                     PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """Y = clamp(rne(X * INV) + ZP, qmin, qmax); X float, INV float32, ZP int32, qmin /
    qmax integers."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ch = _channel(offs, stride_c, C, PER_CHANNEL)
    x = tl.load(X + offs, mask=mask, other=0).to(tl.float32)
    inv = tl.load(INV + ch, mask=mask, other=1.0)
    zp = tl.load(ZP + ch, mask=mask, other=0)
    v = x * inv
    # round half to even, exact for every float32 (|v| in [2^22, 2^23) has halves too:
    # qint32's range reaches them)
    r = _rne(v)
    # the add and the clamp in int64, exact for qint32 too (its zero points and 2^31 - 1 are
    # not float32 numbers); r beyond +-2^32 clamps to the same bound whatever the zero point
    r = tl.minimum(tl.maximum(r, -4294967296.0), 4294967296.0)
    q = tl.minimum(tl.maximum(r.to(tl.int64) + zp, qmin), qmax)
    tl.store(Y + offs, q.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(Q, S, ZP, Y, numel, stride_c, C,
                       PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """Y = float32(Q - ZP) * S."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ch = _channel(offs, stride_c, C, PER_CHANNEL)
    q = tl.load(Q + offs, mask=mask, other=0)
    s = tl.load(S + ch, mask=mask, other=1.0)
    zp = tl.load(ZP + ch, mask=mask, other=0)
    if Q.dtype.element_ty == tl.int32:  # qint32: q - zp may leave the int32 range
        d = q.to(tl.int64) - zp
    else:
        d = q.to(tl.int32) - zp
    tl.store(Y + offs, d.to(tl.float32) * s, mask=mask)


@triton.jit
def _requantize_kernel(A, MULT, RSHIFT, RQV, Y, numel, stride_c, C,
                       PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """Y = requant(A) with multiplier / rshift per channel (or RQV[0], RQV[1])."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(A + offs, mask=mask, other=0)
    if PER_CHANNEL:
        ch = (offs // stride_c) % C
        m = tl.load(MULT + ch, mask=mask, other=0)
        s = tl.load(RSHIFT + ch, mask=mask, other=0)
    else:
        m = tl.load(RQV + 0)
        s = tl.load(RQV + 1)
    if A.dtype.element_ty == tl.int32:  # the usual accumulator: 32-bit arithmetic
        y = _requant_i32(a, m.to(tl.int32), s.to(tl.int32), RQV, PER_CHANNEL)
    else:
        y = requantize_values(a, m, s, tl.load(RQV + 2), tl.load(RQV + 3), tl.load(RQV + 4))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _requant_i32(v, m, s, RQV, PER_CHANNEL: tl.constexpr):
    """requantize_i32 with the left shift taken only where some rshift < 0 (uniform
    branch); RQV[2:5] = zero point, qmin, qmax."""
    zp = tl.load(RQV + 2).to(tl.int32)
    lo = tl.load(RQV + 3).to(tl.int32)
    hi = tl.load(RQV + 4).to(tl.int32)
    if PER_CHANNEL:
        neg = tl.min(s, axis=0) < 0
    else:
        neg = s < 0
    if neg:
        y = requantize_i32(v, m, s, zp, lo, hi, True)
    else:
        y = requantize_i32(v, m, s, zp, lo, hi, False)
    return y


@triton.jit
def _add_kernel(A, B, EPI, Y, numel, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """TFLite integer add of two same-layout tensors; EPI as in :mod:`.gemm`; MODE: the
    arithmetic (:func:`.fixed_point.add_epi`: folded for make_add_params' params)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(A + offs, mask=mask, other=0)
    b = tl.load(B + offs, mask=mask, other=0)
    y = add_epi(a, b, EPI, MODE)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["a_zp", "b_zp"])
def _mul_kernel(A, B, RQV, Y, numel, a_zp, b_zp, BLOCK: tl.constexpr):
    """Y = requant((A - a_zp) * (B - b_zp)), per-tensor RQV = [mult, rshift, zp, qmin, qmax]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(A + offs, mask=mask, other=0).to(tl.int32)
    b = tl.load(B + offs, mask=mask, other=0).to(tl.int32)
    prod = (a - a_zp) * (b - b_zp)  # |prod| <= 255 * 255: int32
    y = _requant_i32(prod, tl.load(RQV + 0).to(tl.int32), tl.load(RQV + 1).to(tl.int32), RQV,
                     False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _lookup_kernel(X, T, Y, numel, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    """Y = T[X + OFFSET]: every code through a 256-entry table (OFFSET 128 for int8, 0 for
    uint8, so every storage value indexes inside it)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0).to(tl.int32)
    tl.store(Y + offs, tl.load(T + (x + OFFSET), mask=mask, other=0), mask=mask)


@triton.jit
def _gather_hw_kernel(X, IH, IW, Y, M, C, OH, OW, stride_xn, stride_xc, stride_xh, stride_xw,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y[n, i, j, :] = X[n, IH[i], IW[j], :] (NHWC output rows ``(n * OH + i) * OW + j``;
    X strided): a nearest-neighbour resize copies codes."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < M
    cm = cols < C
    j = rows % OW
    t = rows // OW
    i = t % OH
    n = t // OH
    ih = tl.load(IH + i, mask=rm, other=0)
    iw = tl.load(IW + j, mask=rm, other=0)
    src = n * stride_xn + ih * stride_xh + iw * stride_xw
    m = rm[:, None] & cm[None, :]
    v = tl.load(X + (src[:, None] + cols.to(tl.int64)[None, :] * stride_xc), mask=m, other=0)
    tl.store(Y + (rows[:, None] * C + cols[None, :]), v, mask=m)


@triton.jit(do_not_specialize=["x_zp"])
def _copy4d_kernel(X, Y, RQV, numel, D1, D2, D3,
                   sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, x_zp,
                   REQUANT: tl.constexpr, BLOCK: tl.constexpr):
    """Strided 4-D copy X -> Y (a slice of the concat output), optionally requantized:
    ``Y = requant(X - x_zp)`` with the per-tensor RQV."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    i3 = offs % D3
    t = offs // D3
    i2 = t % D2
    t = t // D2
    i1 = t % D1
    i0 = t // D1
    x = tl.load(X + i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3, mask=mask, other=0)
    if REQUANT:
        y = _requant_i32(x.to(tl.int32) - x_zp, tl.load(RQV + 0).to(tl.int32),
                         tl.load(RQV + 1).to(tl.int32), RQV, False)
    else:
        y = x
    tl.store(Y + i0 * sy0 + i1 * sy1 + i2 * sy2 + i3 * sy3, y.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _pool_kernel(X, Y, M, C, H, W, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 stride_xn, stride_xh, stride_xw, stride_xc, stride_ym,
                 zero_point, divisor, qmin, qmax,
                 KH: tl.constexpr, KW: tl.constexpr, IS_MAX: tl.constexpr,
                 COUNT_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Max or average pooling, NHWC; Y rows are output pixels (M = N * Ho * Wo). Max: a
    window without an input element gives ``qmin`` (the storage dtype's minimum)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < M
    mask_c = offs_c < C
    img, hs, ws = window_origin(offs_p, Ho, Wo, stride_h, stride_w, pad_h, pad_w)
    x_img = X + img.to(tl.int64) * stride_xn
    cofs = offs_c.to(tl.int64) * stride_xc
    if IS_MAX:
        acc = tl.full((BLOCK_P, BLOCK_C), -2147483648, tl.int32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            ih = hs + r * dil_h
            iw = ws + s * dil_w
            ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            m2 = ok[:, None] & mask_c[None, :]
            x = tl.load((x_img + ih.to(tl.int64) * stride_xh + iw * stride_xw)[:, None]
                        + cofs[None, :], mask=m2, other=0).to(tl.int32)
            if IS_MAX:
                acc = tl.maximum(acc, tl.where(m2, x, -2147483648))
            else:
                acc += tl.where(m2, x - zero_point, 0)
    if IS_MAX:
        y = tl.maximum(acc, qmin)  # no element (a window in the padding): -inf -> qmin
    else:
        # torch's AvgPool2d divisor: the window clipped to the padded input, or to the input
        he = tl.minimum(hs + KH, H + pad_h)
        we = tl.minimum(ws + KW, W + pad_w)
        if COUNT_PAD:
            den = (he - hs) * (we - ws)
        else:
            den = (tl.minimum(he, H) - tl.maximum(hs, 0)) * (tl.minimum(we, W) - tl.maximum(ws, 0))
        den = tl.where(divisor > 0, divisor, den)  # divisor_override
        den = tl.maximum(den, 1)[:, None]  # (past-the-end rows are masked at the store)
        half = den // 2
        y = tl.where(acc >= 0, (acc + half) // den, -((half - acc) // den)) + zero_point
        y = tl.minimum(tl.maximum(y, qmin), qmax)
    y_ptrs = Y + offs_p[:, None].to(tl.int64) * stride_ym + offs_c[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _adaptive_avg_kernel(X, Y, C, H, W, OH, OW, stride_xn, stride_xh, stride_xw, stride_xc,
                         stride_ym, zero_point, qmin, qmax, BLOCK_C: tl.constexpr):
    """Adaptive average pooling, one output pixel a program (windows differ in size)."""
    pix = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    img = pix // (OH * OW)
    i = (pix // OW) % OH
    j = pix % OW
    h0 = (i * H) // OH
    h1 = ((i + 1) * H + OH - 1) // OH
    w0 = (j * W) // OW
    w1 = ((j + 1) * W + OW - 1) // OW
    base = X + img.to(tl.int64) * stride_xn + offs_c.to(tl.int64) * stride_xc
    acc = tl.zeros((BLOCK_C,), tl.int64)
    for hh in range(h0, h1):
        for ww in range(w0, w1):
            x = tl.load(base + hh * stride_xh + ww * stride_xw, mask=mask_c, other=0)
            acc += x.to(tl.int64) - zero_point
    den = ((h1 - h0) * (w1 - w0)).to(tl.int64)
    half = den // 2
    y = tl.where(acc >= 0, (acc + half) // den, -((half - acc) // den)) + zero_point
    y = tl.minimum(tl.maximum(y, qmin), qmax)
    tl.store(Y + pix.to(tl.int64) * stride_ym + offs_c, y.to(Y.dtype.element_ty), mask=mask_c)


# --------------------------------------------------------------------------- helpers
def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its storage is dense (contiguous or channels_last), else a dense copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def _grid(n: int):
    return (cdiv(n, _BLOCK),)


def _on(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """A flat device copy of a parameter tensor, memoised on its identity and version."""
    if t.device == device and t.dtype == dtype and t.is_contiguous():
        return t.reshape(-1)
    return derived("param", (t,), (str(device), dtype),
                   lambda: t.to(device=device, dtype=dtype).reshape(-1).contiguous())


def _inv_scale(scale: torch.Tensor, device) -> torch.Tensor:
    """float32 ``1 / scale`` (IEEE division in torch, as the reference), memoised."""
    return derived("inv", (scale,), (str(device),),
                   lambda: (1.0 / scale.float()).to(device).reshape(-1).contiguous())


def _rq_vector(rq, device) -> torch.Tensor:
    """int64 [multiplier, rshift, zero_point, qmin, qmax] of a per-tensor Requant (the
    multiplier entries are unused when the kernel reads per-channel vectors)."""
    if rq.per_channel:
        m = s = 0
    else:
        m, s = scalar_int(rq.multiplier), scalar_int(rq.rshift)
    key = (m, s, int(rq.zero_point), int(rq.qmin), int(rq.qmax))
    return derived("rqv", (), (key, str(device)),
                   lambda: torch.tensor(key, dtype=torch.int64, device=device))


def _axis_info(t: torch.Tensor, axis):
    if axis is None:
        return 1, 1, False
    axis = axis % t.dim()
    return t.stride(axis), t.shape[axis], True


# --------------------------------------------------------------------------- ops
def quantize(x, scale, zero_point, qmin, qmax, axis, out_dtype):
    x = _dense(x)
    y = torch.empty_like(x, dtype=out_dtype)
    if x.numel() == 0:
        return y
    stride_c, c, per_ch = _axis_info(x, axis)
    launch(_quantize_kernel, _grid(x.numel()), x, _inv_scale(scale, x.device),
           _on(zero_point, x.device, torch.int32), y, x.numel(), stride_c, c, int(qmin),
           int(qmax), PER_CHANNEL=per_ch, BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def dequantize(q, scale, zero_point, axis):
    q = _dense(q)
    y = torch.empty_like(q, dtype=torch.float32)
    if q.numel() == 0:
        return y
    stride_c, c, per_ch = _axis_info(q, axis)
    launch(_dequantize_kernel, _grid(q.numel()), q, _on(scale, q.device, torch.float32),
           _on(zero_point, q.device, torch.int32), y, q.numel(), stride_c, c, PER_CHANNEL=per_ch,
           BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def requantize(acc, rq, axis=None):
    acc = _dense(acc)
    y = torch.empty_like(acc, dtype=rq.dtype.storage)
    if acc.numel() == 0:
        return y
    dev = acc.device
    per_ch = rq.per_channel
    if per_ch:
        stride_c, c, _ = _axis_info(acc, acc.dim() - 1 if axis is None else axis)
        mult, rsh = _on(rq.multiplier, dev, torch.int32), _on(rq.rshift, dev, torch.int32)
    else:
        stride_c, c = 1, 1
        mult = rsh = _rq_vector(rq, dev)  # unused pointers
    launch(_requantize_kernel, _grid(acc.numel()), acc, mult, rsh, _rq_vector(rq, dev), y,
           acc.numel(), stride_c, c, PER_CHANNEL=per_ch, BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def _same_layout(a, b):
    if a.shape != b.shape:
        a, b = torch.broadcast_tensors(a, b)
    return _channels_last(a), _channels_last(b)


def add(a, b, p):
    a, b = _same_layout(a, b)
    y = torch.empty_like(a, dtype=p.out.dtype.storage)
    if a.numel() == 0:
        return y
    launch(_add_kernel, _grid(a.numel()), a, b, epilogue_scalars(None, p, a.device), y, a.numel(),
           MODE=residual_mode(p), BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def mul(a, a_zp, b, b_zp, rq):
    if rq.per_channel:
        raise NotImplementedError("triton mul: per-channel requantization of a product is "
                                  "not supported (use a per-tensor Requant)")
    a, b = _same_layout(a, b)
    y = torch.empty_like(a, dtype=rq.dtype.storage)
    if a.numel() == 0:
        return y
    launch(_mul_kernel, _grid(a.numel()), a, b, _rq_vector(rq, a.device), y, a.numel(),
           scalar_int(a_zp), scalar_int(b_zp), BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def lookup(x, table):
    x = _channels_last(x)
    y = torch.empty_like(x, dtype=table.dtype)
    if x.numel() == 0:
        return y
    launch(_lookup_kernel, _grid(x.numel()), x, table.contiguous(), y, x.numel(),
           OFFSET=128 if x.dtype == torch.int8 else 0, BLOCK=_BLOCK, **LAUNCH_OPTS)
    return y


def gather_hw(x, ih, iw):
    n, c, oh, ow = int(x.shape[0]), int(x.shape[1]), int(ih.shape[0]), int(iw.shape[0])
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    bc = 32 if INTERPRET else min(128, triton.next_power_of_2(c))
    bm = 16 if INTERPRET else max(1, 4096 // bc)
    m = n * oh * ow
    xs = x.stride()
    launch(_gather_hw_kernel, (cdiv(m, bm), cdiv(c, bc)), x, ih, iw, y, m, c, oh, ow,
           xs[0], xs[1], xs[2], xs[3], BLOCK_M=bm, BLOCK_C=bc, **LAUNCH_OPTS)
    return y


def _as4d(t: torch.Tensor):
    shape, strides = list(t.shape), list(t.stride())
    while len(shape) < 4:
        shape.insert(0, 1)
        strides.insert(0, 0)
    return shape, strides


def concat(xs, zero_points, rqs, dim, out_dtype):
    xs = list(xs)
    nd = xs[0].dim()
    if nd > 4:  # (outer, dim, inner) views of contiguous copies: a concat is a copy
        d = dim % nd
        outer = math.prod(int(v) for v in xs[0].shape[:d])
        inner = math.prod(int(v) for v in xs[0].shape[d + 1:])
        y = concat([x.contiguous().reshape(outer, int(x.shape[d]), inner) for x in xs],
                   zero_points, rqs, 1, out_dtype)
        return y.reshape(xs[0].shape[:d] + (y.shape[1],) + xs[0].shape[d + 1:])
    dim = dim % nd
    shape = list(xs[0].shape)
    shape[dim] = sum(int(x.shape[dim]) for x in xs)
    dev = xs[0].device
    out = torch.empty(shape, dtype=out_dtype, device=dev,
                      memory_format=torch.channels_last if nd == 4 else torch.contiguous_format)
    off = 0
    for x, zp, rq in zip(xs, zero_points, rqs):
        n = int(x.shape[dim])
        part = out.narrow(dim, off, n)
        off += n
        if x.numel() == 0:
            continue
        (_, d1, d2, d3), sx = _as4d(x)
        _, sy = _as4d(part)
        rqv = _rq_vector(rq, dev) if rq is not None else out
        if rq is not None and rq.per_channel:
            raise NotImplementedError("triton concat: per-tensor requantization only")
        launch(_copy4d_kernel, _grid(x.numel()), x, part, rqv, x.numel(), d1, d2, d3, *sx, *sy,
               scalar_int(zp), REQUANT=rq is not None, BLOCK=_BLOCK, **LAUNCH_OPTS)
    return out


def _pair(v, default=None):
    if v is None or (isinstance(v, (tuple, list)) and len(v) == 0):
        return default
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1] if len(v) > 1 else v[0]))
    return (int(v), int(v))


def _pool_out(size, k, s, p, d, ceil_mode):
    """torch's pooling output size (ceil mode: the last window must start inside)."""
    num = size + 2 * p - d * (k - 1) - 1
    out = (num + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


_POOL_TILE = (16, 32) if INTERPRET else (32, 64)


def _pool(x, kernel_size, stride, padding, dilation, ceil_mode, is_max, zero_point=0,
          divisor=0, count_pad=True, qmin=0, qmax=0):
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    x = x.contiguous(memory_format=torch.channels_last)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride, (kh, kw))
    ph, pw = _pair(padding, (0, 0))
    dh, dw = _pair(dilation, (1, 1))
    n, c, h, w = x.shape
    ho, wo = _pool_out(h, kh, sh, ph, dh, ceil_mode), _pool_out(w, kw, sw, pw, dw, ceil_mode)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    m = n * ho * wo
    if y.numel() > 0:
        y2d = y.permute(0, 2, 3, 1).reshape(m, c)
        bp, bc = _POOL_TILE
        xs = x.stride()
        launch(_pool_kernel, (cdiv(m, bp), cdiv(c, bc)), x, y2d, m, c, h, w, ho, wo, sh, sw, ph,
               pw, dh, dw, xs[0], xs[2], xs[3], xs[1], y2d.stride(0), int(zero_point),
               int(divisor), int(qmin), int(qmax), KH=kh, KW=kw, IS_MAX=is_max,
               COUNT_PAD=bool(count_pad), BLOCK_P=bp, BLOCK_C=bc, **LAUNCH_OPTS)
    return y[0] if squeeze else y


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool(x, kernel_size, stride, padding, dilation, ceil_mode, True,
                 qmin=torch.iinfo(x.dtype).min)


def avg_pool2d(x, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override, qmin, qmax):
    return _pool(x, kernel_size, stride, padding, 1, ceil_mode, False,
                 zero_point=scalar_int(zero_point), divisor=int(divisor_override or 0),
                 count_pad=count_include_pad, qmin=qmin, qmax=qmax)


def adaptive_avg_pool2d(x, zero_point, output_size, qmin, qmax):
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    if isinstance(output_size, (tuple, list)):
        oh, ow = output_size
    else:
        oh = ow = output_size
    oh, ow = (h if oh is None else int(oh)), (w if ow is None else int(ow))
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    if y.numel() > 0:
        y2d = y.permute(0, 2, 3, 1).reshape(n * oh * ow, c)
        bc = 32 if INTERPRET else 128
        xs = x.stride()
        launch(_adaptive_avg_kernel, (n * oh * ow, cdiv(c, bc)), x, y2d, c, h, w, oh, ow, xs[0],
               xs[2], xs[3], xs[1], y2d.stride(0), scalar_int(zero_point), int(qmin), int(qmax),
               BLOCK_C=bc, **LAUNCH_OPTS)
    return y[0] if squeeze else y


OPS = {
    "quantize": quantize, "dequantize": dequantize, "requantize": requantize, "add": add,
    "mul": mul, "lookup": lookup, "concat": concat, "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "adaptive_avg_pool2d": adaptive_avg_pool2d, "gather_hw": gather_hw,
}
