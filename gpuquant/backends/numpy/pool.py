"""Integer max / average / adaptive-average pooling on NHWC int8 / uint8 NumPy arrays (loops
over the kernel taps only; every tap is one strided view of the padded input). The torch ops
wrapping them are in :mod:`.ops`."""
from __future__ import annotations

import numpy as np


def _pair(v, default=None):
    if v is None or (isinstance(v, (tuple, list)) and len(v) == 0):
        return default
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else tuple(int(t) for t in v)
    return int(v), int(v)


def _out_len(n, k, s, p, d, ceil_mode):
    """PyTorch's pooling_output_shape."""
    num = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _padded(a: np.ndarray, ph, pw, need_h, need_w, fill, dtype):
    n, h, w, c = a.shape
    hp, wp = max(need_h, h + 2 * ph), max(need_w, w + 2 * pw)
    if (ph, pw) == (0, 0) and (hp, wp) == (h, w) and a.dtype == dtype:
        return a
    buf = np.full((n, hp, wp, c), fill, dtype=dtype)
    buf[:, ph:ph + h, pw:pw + w, :] = a
    return buf


def _taps(buf, kh, kw, sh, sw, dh, dw, ho, wo):
    for i in range(kh):
        for j in range(kw):
            yield buf[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw, :]


def max_pool2d_nhwc(xa, kernel_size, stride, padding, dilation, ceil_mode):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride, (kh, kw))
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, h, w, c = xa.shape
    ho, wo = _out_len(h, kh, sh, ph, dh, ceil_mode), _out_len(w, kw, sw, pw, dw, ceil_mode)
    # padding stands for -inf, clamped to the dtype's minimum: what a window entirely in
    # the padding (dilation, ceil_mode) gives, and never above a real element
    fill = np.iinfo(xa.dtype).min
    buf = _padded(xa, ph, pw, (ho - 1) * sh + dh * (kh - 1) + 1, (wo - 1) * sw + dw * (kw - 1) + 1,
                  fill, xa.dtype)
    out = None
    for tap in _taps(buf, kh, kw, sh, sw, dh, dw, ho, wo):
        if out is None:
            out = np.array(tap, copy=True)
        else:
            np.maximum(out, tap, out=out)
    return out


def _round_div(num: np.ndarray, den) -> np.ndarray:
    """Division rounding half away from zero (TFLite average pool)."""
    q = (np.abs(num) + den // 2) // den
    return np.where(num < 0, -q, q)


def _counts(n_out, n_in, k, s, p, include_pad):
    start = np.arange(n_out) * s - p
    end = np.minimum(start + k, n_in + p)
    if include_pad:
        return end - start
    return np.minimum(end, n_in) - np.maximum(start, 0)


def avg_pool2d_nhwc(xa, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    divisor_override, qmin, qmax):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride, (kh, kw))
    ph, pw = _pair(padding)
    n, h, w, c = xa.shape
    ho, wo = _out_len(h, kh, sh, ph, 1, ceil_mode), _out_len(w, kw, sw, pw, 1, ceil_mode)
    xd = np.subtract(xa, int(zero_point), dtype=np.int32)
    buf = _padded(xd, ph, pw, (ho - 1) * sh + kh, (wo - 1) * sw + kw, 0, np.int32)
    sums = np.zeros((n, ho, wo, c), dtype=np.int64)
    for tap in _taps(buf, kh, kw, sh, sw, 1, 1, ho, wo):
        sums += tap
    if divisor_override:
        den = np.int64(int(divisor_override))
    else:
        rc = _counts(ho, h, kh, sh, ph, count_include_pad)
        cc = _counts(wo, w, kw, sw, pw, count_include_pad)
        den = (rc[:, None] * cc[None, :]).astype(np.int64)[None, :, :, None]
    y = _round_div(sums, den) + int(zero_point)
    return np.clip(y, qmin, qmax).astype(xa.dtype)


def adaptive_avg_pool2d_nhwc(xa, zero_point, output_size, qmin, qmax):
    oh, ow = _pair(output_size)
    n, h, w, c = xa.shape
    xd = np.subtract(xa, int(zero_point), dtype=np.int64)
    # integral image with a leading zero row and column
    s = np.zeros((n, h + 1, w + 1, c), dtype=np.int64)
    np.cumsum(xd, axis=1, out=s[:, 1:, 1:, :])
    np.cumsum(s[:, 1:, 1:, :], axis=2, out=s[:, 1:, 1:, :])
    i, j = np.arange(oh), np.arange(ow)
    h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
    w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
    hh0, hh1, ww0, ww1 = h0[:, None], h1[:, None], w0[None, :], w1[None, :]
    tot = s[:, hh1, ww1] - s[:, hh0, ww1] - s[:, hh1, ww0] + s[:, hh0, ww0]
    cnt = ((h1 - h0)[:, None] * (w1 - w0)[None, :])[None, :, :, None]
    y = _round_div(tot, cnt) + int(zero_point)
    return np.clip(y, qmin, qmax).astype(xa.dtype)


def nearest_source_index(in_size: int, out_size: int, scale_factor, exact: bool) -> np.ndarray:
    """The input index each output index of a nearest-neighbour resize reads: gpuquant's
    definition, torch's float32 formula (ATen's ``nearest_neighbor_compute_source_index`` /
    ``..._exact_...``): the scale is ``float32(1 / scale_factor)`` when a scale factor is
    given, else ``float32(in) / float32(out)``; ``min(floor(o * scale), in - 1)``, with
    ``o + 0.5`` for ``nearest-exact``. torch's CUDA kernel computes this; its CPU kernel
    (``nearest`` mode) sometimes copies instead when the output size equals the input's
    and halves when it is twice (torch 2.13: along the height, and along narrow widths):
    the same pixels whenever the factor is exactly 1 or 2 or the sizes decide, other
    pixels at factors such as 1.0001 or 2.0168. int64, ``out_size`` entries."""
    o = np.arange(out_size, dtype=np.int64)
    if scale_factor is not None and scale_factor > 0:
        scale = np.float32(1.0 / float(scale_factor))
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    of = o.astype(np.float32)
    if exact:
        of = of + np.float32(0.5)
    return np.minimum(np.floor(of * scale).astype(np.int64), in_size - 1)


def gather_hw_nhwc(xa: np.ndarray, ih: np.ndarray, iw: np.ndarray) -> np.ndarray:
    """``y[n, i, j, c] = x[n, ih[i], iw[j], c]`` on an NHWC array."""
    return np.take(np.take(xa, ih, axis=1), iw, axis=2)
