"""A slow, plain int64 model of the integer ops, written from the TFLite / gemmlowp
definitions for the tests only. It shares no code with the NumPy backend or the reference
backend: convolution is a literal sum over kernel taps and input channels, fixed-point
arithmetic follows gemmlowp's C code (truncating division, explicit nudges), pooling loops
over output pixels. Inputs and outputs are NumPy arrays in NCHW (logical) order.
"""
from __future__ import annotations

import numpy as np

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


# ----------------------------------------------------------------------------- gemmlowp
def _trunc_div_pow2(t: np.ndarray, bits: int) -> np.ndarray:
    """C-style ``t / 2^bits`` (rounds toward zero) on int64."""
    mag = np.abs(t) >> bits
    return np.where(t < 0, -mag, mag)


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    b = np.broadcast_to(np.asarray(b, dtype=np.int64), a.shape)
    overflow = (a == I32_MIN) & (b == I32_MIN)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    res = _trunc_div_pow2(ab + nudge, 31)
    return np.where(overflow, np.int64(I32_MAX), res)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    e = np.broadcast_to(np.asarray(exponent, dtype=np.int64), x.shape)
    mask = (np.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + np.where(x < 0, 1, 0)
    return (x >> e) + np.where(remainder > threshold, 1, 0)


def multiply_by_quantized_multiplier(x, multiplier, rshift) -> np.ndarray:
    """``rshift`` > 0 divides, < 0 multiplies (saturating to int32 first)."""
    x = np.asarray(x, dtype=np.int64)
    rshift = np.broadcast_to(np.asarray(rshift, dtype=np.int64), x.shape)
    left = np.where(rshift < 0, -rshift, 0)
    right = np.where(rshift > 0, rshift, 0)
    x = np.clip(x * (np.int64(1) << left), I32_MIN, I32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)


def requantize(acc, multiplier, rshift, zero_point, qmin, qmax, axis=None, dtype=np.int8):
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(rshift, dtype=np.int64)
    if m.ndim == 1 and axis is not None:
        shape = [1] * acc.ndim
        shape[axis] = -1
        m, s = m.reshape(shape), s.reshape(shape)
    y = multiply_by_quantized_multiplier(acc, m, s) + zero_point
    return np.clip(y, qmin, qmax).astype(dtype)


def rq_args(rq):
    """(multiplier, rshift, zero_point, qmin, qmax, numpy dtype) of a Requant."""
    dt = np.int8 if rq.dtype.qmin < 0 else np.uint8
    return (rq.multiplier.numpy().astype(np.int64), rq.rshift.numpy().astype(np.int64),
            rq.zero_point, rq.qmin, rq.qmax, dt)


# ----------------------------------------------------------------------------- conv, linear
def conv2d_acc(x, x_zp, w, bias, stride, padding, dilation, groups):
    """int64 accumulators (N, O, Ho, Wo) by a literal sum over taps and channels."""
    x = np.asarray(x, dtype=np.int64) - int(x_zp)
    w = np.asarray(w, dtype=np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.int64)  # zero = the zero point
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    og = o // groups
    acc = np.zeros((n, o, ho, wo), dtype=np.int64)
    for oc in range(o):
        gi = oc // og
        for ci in range(cg):
            plane = xp[:, gi * cg + ci]
            for i in range(kh):
                for j in range(kw):
                    patch = plane[:, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                                  j * dw:j * dw + sw * (wo - 1) + 1:sw]
                    acc[:, oc] += patch * w[oc, ci, i, j]
    if bias is not None:
        acc += np.asarray(bias, dtype=np.int64).reshape(1, -1, 1, 1)
    return acc


def linear_acc(x, x_zp, w, bias):
    x = np.asarray(x, dtype=np.int64) - int(x_zp)
    w = np.asarray(w, dtype=np.int64)
    acc = np.zeros(x.shape[:-1] + (w.shape[0],), dtype=np.int64)
    for k in range(x.shape[-1]):  # one rank-1 update per input feature
        acc += x[..., k:k + 1] * w[:, k]
    if bias is not None:
        acc += np.asarray(bias, dtype=np.int64)
    return acc


# ----------------------------------------------------------------------------- elementwise
def add(a, b, p):
    def scaled(v, zp, m, s):
        return multiply_by_quantized_multiplier((np.asarray(v, np.int64) - zp) << p.left_shift, m, s)
    total = scaled(a, p.a_zero_point, p.a_multiplier, p.a_rshift) + \
        scaled(b, p.b_zero_point, p.b_multiplier, p.b_rshift)
    m, s, zp, lo, hi, dt = rq_args(p.out)
    return requantize(total, m, s, zp, lo, hi, dtype=dt)


def mul(a, a_zp, b, b_zp, rq):
    prod = (np.asarray(a, np.int64) - a_zp) * (np.asarray(b, np.int64) - b_zp)
    m, s, zp, lo, hi, dt = rq_args(rq)
    return requantize(prod, m, s, zp, lo, hi, dtype=dt)


# ----------------------------------------------------------------------------- pooling
def _pool_len(n, k, s, p, d, ceil_mode):
    span = n + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def max_pool2d(x, k, s, p, d, ceil_mode):
    x = np.asarray(x)
    n, c, h, w = x.shape
    ho, wo = _pool_len(h, k[0], s[0], p[0], d[0], ceil_mode), _pool_len(w, k[1], s[1], p[1], d[1], ceil_mode)
    out = np.empty((n, c, ho, wo), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            rows = [i * s[0] - p[0] + a * d[0] for a in range(k[0])]
            cols = [j * s[1] - p[1] + b * d[1] for b in range(k[1])]
            rows = [r for r in rows if 0 <= r < h]
            cols = [q for q in cols if 0 <= q < w]
            # a window entirely in the padding: -inf clamped to the dtype's minimum
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].max(
                axis=(2, 3), initial=np.iinfo(x.dtype).min)
    return out


def _div_round_away(num, den):
    q = (abs(num) + den // 2) // den
    return np.where(num < 0, -q, q)


def avg_pool2d(x, zp, k, s, p, ceil_mode, count_include_pad, divisor_override, qmin, qmax):
    x = np.asarray(x)
    xd = x.astype(np.int64) - zp
    n, c, h, w = x.shape
    ho, wo = _pool_len(h, k[0], s[0], p[0], 1, ceil_mode), _pool_len(w, k[1], s[1], p[1], 1, ceil_mode)
    out = np.empty((n, c, ho, wo), dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * s[0] - p[0], j * s[1] - p[1]
            r1, c1 = min(r0 + k[0], h + p[0]), min(c0 + k[1], w + p[1])
            pad_area = (r1 - r0) * (c1 - c0)
            rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
            total = xd[:, :, rr0:rr1, cc0:cc1].sum(axis=(2, 3))
            if divisor_override:
                den = divisor_override
            elif count_include_pad:
                den = pad_area
            else:
                den = (rr1 - rr0) * (cc1 - cc0)
            out[:, :, i, j] = _div_round_away(total, den)
    return np.clip(out + zp, qmin, qmax).astype(x.dtype)


def adaptive_avg_pool2d(x, zp, output_size, qmin, qmax):
    x = np.asarray(x)
    xd = x.astype(np.int64) - zp
    n, c, h, w = x.shape
    oh, ow = output_size
    out = np.empty((n, c, oh, ow), dtype=np.int64)
    for i in range(oh):
        r0, r1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
        for j in range(ow):
            c0, c1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
            total = xd[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
            out[:, :, i, j] = _div_round_away(total, (r1 - r0) * (c1 - c0))
    return np.clip(out + zp, qmin, qmax).astype(x.dtype)
