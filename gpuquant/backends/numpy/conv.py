"""Exact int8 convolution: im2col by stride tricks + float32 BLAS, a 1x1 fast path and a
dedicated depthwise path. Layout NHWC throughout (the channels_last memory of the input).

* General path: the input is padded with its zero point (int8 / uint8); ``sliding_window_view``
  gives the ``(N, Ho, Wo, kh, kw, C)`` patches without a copy; output rows are processed in
  tiles whose im2col buffer (1-byte, then float32 ``x - zp``) stays under ``_TILE_BYTES``, so
  memory is bounded for any image size.
  Groups run as one batched matmul ``(G, rows, K/G) @ (G, K/G, O/G)``.
* 1x1, no padding: the (strided) input itself is the im2col matrix.
* Depthwise (one input channel per group): a sum over the ``kh*kw`` taps of shifted views
  times per-channel weights, exact in float32 for up to 513 taps.

Products are exact integers; see :mod:`.gemm` for the block rule that keeps float32 sums
exact and :mod:`.fixed_point` for the requantization.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from .fixed_point import Params, requant_fast
from .gemm import PackedWeight, block_xmax, exact_matmul, norm_fits, to_f32

# im2col tile: 4 MiB of float32 (fits L3 with the weights; BLAS still sees >= ~256 rows).
_TILE_BYTES = 4 << 20
_DW_MAX_TAPS = 513  # 513 * 255 * 128 < 2^24


def _pair(v):
    if isinstance(v, (tuple, list)):
        return tuple(int(t) for t in v)
    return int(v), int(v)


def _pack_conv(w: np.ndarray, groups: int) -> PackedWeight:
    o, cg, kh, kw = w.shape
    wn = np.ascontiguousarray(w).reshape(groups, o // groups, cg, kh, kw)
    # (G, kh, kw, Cg, Og) -> (G, K, Og): the im2col column order (kh, kw, C)
    return PackedWeight(wn.transpose(0, 3, 4, 2, 1).reshape(groups, kh * kw * cg, o // groups))


def _pack_dw(w: np.ndarray) -> np.ndarray:
    o, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o, kh, kw).transpose(1, 2, 0),
                                dtype=np.float32)


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _padded_float(xa: np.ndarray, zp: int, ph: int, pw: int) -> np.ndarray:
    n, h, w, c = xa.shape
    if ph == 0 and pw == 0:
        return np.subtract(xa, np.float32(zp), dtype=np.float32)
    xf = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=np.float32)
    np.subtract(xa, np.float32(zp), out=xf[:, ph:ph + h, pw:pw + w, :], dtype=np.float32)
    return xf


def _uncached(kind, build):
    return build()


def conv2d_nhwc(xa: np.ndarray, zp: int, w: np.ndarray, b, stride, padding, dilation,
                groups: int, p: Params, cached=_uncached) -> np.ndarray:
    """Integer convolution on NumPy arrays.

    Args:
        xa: int8 / uint8 NHWC input; zp: its zero point.
        w: int8 ``(O, C / groups, kh, kw)`` weight array.
        b: None or int64 ``(O,)`` bias.
        stride, padding, dilation: ints or pairs; groups: int.
        p: the output requantization (per output channel or per tensor).
        cached: ``cached(kind, build)`` returns the prepacked weight form ``kind`` (the torch
            op keys it by the weight tensor; the default builds it on every call).

    Returns:
        NHWC ``(N, Ho, Wo, O)`` array of ``p.np_dtype``.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    g = int(groups)
    n, h, wd, c = xa.shape
    o, cg, kh, kw = w.shape
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(wd, kw, sw, pw, dw)
    zp = int(zp)
    out = np.empty((n, ho, wo, o), dtype=p.np_dtype)
    if out.size == 0:
        return out

    if cg == 1 and g == c and kh * kw <= _DW_MAX_TAPS:
        wt = cached("dw", lambda: _pack_dw(w))                    # (kh, kw, O)
        _depthwise(xa, zp, wt, b, p, out, (sh, sw), (ph, pw), (dh, dw))
        return out

    pwk = cached(f"conv_g{g}", lambda: _pack_conv(w, g))
    xmax = block_xmax(xa, zp, pwk)  # no pass over the input where the dtype range is exact
    rows_out = out.reshape(n * ho * wo, o)
    sq = _row_sq_bound(xa, zp, kh * kw, pwk, xmax)
    if kh == 1 and kw == 1 and ph == 0 and pw == 0 and g == 1:
        # 1x1 fast path: the (strided) input is the im2col matrix
        src = xa[:, ::sh, ::sw, :][:, :ho, :wo, :]
        step = max(1, _TILE_BYTES // max(1, wo * c * 4))
        buf = np.empty((min(step, n * ho) * wo, c), dtype=np.float32)
        for l0 in range(0, n * ho, step):
            l1 = min(l0 + step, n * ho)
            r = 0
            seg = l0  # convert the (strided) rows straight into the float32 tile
            while seg < l1:
                img, h0 = divmod(seg, ho)
                h1 = min(ho, h0 + (l1 - seg))
                rows = (h1 - h0) * wo
                to_f32(src[img, h0:h1], zp, out=buf[r:r + rows].reshape(h1 - h0, wo, c))
                r += rows
                seg += h1 - h0
            a = buf[:r]
            requant_fast(exact_matmul(a, pwk, xmax, sq), p, rows_out[l0 * wo:l1 * wo], b)
        return out

    # im2col in the input's own 1-byte dtype (4x less memory traffic than float32), padded
    # with the zero point, then one conversion pass to float32 (x - zp) per tile, or (zero
    # point 0) straight into the float32 tile
    # Few channels (a first layer: C = 3): a kernel row is a run of only kw*C values, and
    # the 1-byte copy of such short runs plus the conversion pass costs more than copying
    # float32 runs from a float32 (x - zp) copy of the (small) input: conv1 of ResNet-18
    # at 224x224: 0.62 vs 0.88 ms an image. Many channels: the 1-byte im2col stays.
    direct = g == 1 and c < 16
    xp = _padded_float(xa, zp, ph, pw) if direct else _padded_int(xa, zp, ph, pw)
    kg = kh * kw * cg
    og = o // g
    win = patches(xp, kh, kw, (sh, sw), (dh, dw), ho, wo)
    if g > 1:
        win = win.reshape(n, ho, wo, kh, kw, g, cg).transpose(5, 0, 1, 2, 3, 4, 6)
    # tile over lines (image, output row): each line is Wo output pixels
    line_bytes = wo * kh * kw * c * 4
    step = max(1, _TILE_BYTES // max(1, line_bytes))
    rows_max = min(step, n * ho) * wo
    buf32 = np.empty((g, rows_max, kg), dtype=np.float32)
    # zero point 0 (every post-ReLU layer): x - zp is x, so the patch copy converts to
    # float32 on the way (exact) and the 1-byte tile and its conversion pass go away:
    # 1-4% a 3x3 layer of ResNet-18 (warm, one core), 1.5% over the 11 layers at batch 1
    cast = not direct and zp == 0
    buf8 = buf32 if direct or cast else np.empty((g, rows_max, kg), dtype=xa.dtype)
    for l0 in range(0, n * ho, step):
        l1 = min(l0 + step, n * ho)
        r = 0
        seg = l0  # segments: runs of output rows inside one image
        while seg < l1:
            img, h0 = divmod(seg, ho)
            h1 = min(ho, h0 + (l1 - seg))
            rows = (h1 - h0) * wo
            if g == 1:
                np.copyto(buf8[0, r:r + rows].reshape((h1 - h0,) + win.shape[2:]), win[img, h0:h1])
            else:
                np.copyto(buf8[:, r:r + rows].reshape(g, h1 - h0, wo, kh, kw, cg),
                          win[:, img, h0:h1])
            r += rows
            seg += h1 - h0
        a = buf32[:, :r] if direct or cast else to_f32(buf8[:, :r], zp, out=buf32[:, :r])
        acc = exact_matmul(a[0] if g == 1 else a, pwk, xmax, sq)
        if g > 1:  # (G, rows, Og) -> (rows, G*Og)
            acc = acc.transpose(1, 0, 2).reshape(r, g * og)
        requant_fast(acc, p, rows_out[l0 * wo:l1 * wo], b)
    return out


def _row_sq_bound(xa: np.ndarray, zp: int, taps: int, pwk: PackedWeight, xmax: int):
    """An upper bound of every im2col row's ``||x - zp||^2``, or None where the GEMM needs
    none (one block anyway) or it would not help: a row holds ``taps`` pixels (padding
    adds zeros), each at most the largest per-pixel ``sum_c (x - zp)^2``, summed over the
    input (``taps`` times fewer values than the tile's row sums; squares are exact in
    float32, their sum is within ``C 2^-24`` relative, covered by the margin)."""
    if len(pwk.blocks(xmax)) == 1 or xa.size == 0:
        return None
    xf = to_f32(xa, zp)
    c = xa.shape[-1]
    bound = taps * float(np.einsum("...c,...c->...", xf, xf).max()) * (1.0 + c * 2.0 ** -22)
    return bound if norm_fits(bound, pwk) else None


def patches(xp: np.ndarray, kh, kw, stride, dilation, ho, wo) -> np.ndarray:
    """Zero-copy im2col view of a padded NHWC array, column order (kh, kw, C).

    With ``dilation_w == 1`` a kernel row's ``kw * C`` values are one contiguous run of the
    input, so the view is ``(N, Ho, Wo, kh, kw * C)`` with a unit-stride last axis and
    copying it moves long runs (C alone is 3 for a first layer, where this copy takes
    0.46 ms for 112x112 patches of 7x7x3 on one EPYC core);
    otherwise it is the ``(N, Ho, Wo, kh, kw, C)`` view of ``sliding_window_view``.
    """
    n, hp, wp, c = xp.shape
    (sh, sw), (dh, dw) = stride, dilation
    if dw == 1 and xp.flags.c_contiguous:
        s0, s1, s2, s3 = xp.strides
        return as_strided(xp, (n, ho, wo, kh, kw * c), (s0, s1 * sh, s2 * sw, s1 * dh, s3),
                          writeable=False)
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2))
    win = win[:, ::sh, ::sw, :, ::dh, ::dw][:, :ho, :wo]              # (N, Ho, Wo, C, kh, kw)
    return win.transpose(0, 1, 2, 4, 5, 3)


def _padded_int(xa: np.ndarray, zp: int, ph: int, pw: int) -> np.ndarray:
    if ph == 0 and pw == 0:
        return xa
    n, h, w, c = xa.shape
    xp = np.full((n, h + 2 * ph, w + 2 * pw, c), zp, dtype=xa.dtype)
    xp[:, ph:ph + h, pw:pw + w, :] = xa
    return xp


def _depthwise(xa, zp, wt, b, p, out, stride, padding, dilation):
    sh, sw = stride
    dh, dw = dilation
    n, ho, wo, o = out.shape
    c = xa.shape[3]
    mult = o // c
    kh, kw, _ = wt.shape
    xf = _padded_float(xa, zp, *padding)
    acc = np.zeros((n, ho, wo, c, mult), dtype=np.float32)
    tmp = np.empty_like(acc)
    for i in range(kh):          # loop over the kernel taps only
        for j in range(kw):
            tap = xf[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw, :]
            np.multiply(tap[..., None], wt[i, j].reshape(c, mult), out=tmp)
            acc += tmp
    requant_fast(acc.reshape(n, ho, wo, o), p, out, b)
