"""Depthwise quantized conv2d (groups == in_channels) on CUDA cores, NHWC.

An implicit GEMM would give each group a K of KH * KW (9 for a 3x3) and one output column
(tensor-core tiles of 16 x 8 x 32 mostly padding), so depthwise layers get their own
kernel: a program owns BLOCK_P output pixels x BLOCK_C channels, walks the (unrolled) taps
and accumulates ``(x - zp) * w`` in int32, reading each tap as contiguous channel vectors of
the channels_last input. Channel multipliers > 1 (O = C * m) are handled (input channel
``o // m``). The epilogue is the GEMM's (:func:`.gemm.quant_epilogue`).
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from .common import LAUNCH_OPTS, arch_family, cdiv, derived, tune_subset
from .launch import launch
from .conv import window_origin
from .gemm import (EPILOGUE_KEY, _OUT_MODES, OUT_FLOAT, OUT_QUANT, epilogue_scalars,
                   epilogue_tensors, output_dtype, quant_epilogue, residual_mode)

__all__ = ["qdepthwise2d", "is_depthwise", "depthwise_configs"]


@triton.jit(do_not_specialize=["x_zp"])
def _qdepthwise_kernel(
    # pointers
    X, W, BIAS, MULT, RSHIFT, EPI, RES, Y,
    # sizes
    M, O, H, W_in, Ho, Wo, CH_MULT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides (elements)
    stride_xn, stride_xh, stride_xw, stride_xc, stride_ym, stride_rm,
    # scalars
    x_zp, deq_scale,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RES_MODE: tl.constexpr = 0,
    RQ_MODE: tl.constexpr = 0,
):
    """X (Nb, H, W, C) int8/uint8, W (KH*KW, O) int8 (a tap's weights contiguous) ->
    Y (M = Nb*Ho*Wo, O)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < M
    mask_c = offs_c < O
    img, ih0, iw0 = window_origin(offs_p, Ho, Wo, stride_h, stride_w, pad_h, pad_w)
    x_img = X + img.to(tl.int64) * stride_xn
    ic = (offs_c // CH_MULT).to(tl.int64) * stride_xc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W_in)
            x = tl.load((x_img + ih.to(tl.int64) * stride_xh + iw * stride_xw)[:, None]
                        + ic[None, :], mask=ok[:, None] & mask_c[None, :], other=x_zp)
            wt = tl.load(W + (r * KW + s) * O + offs_c, mask=mask_c, other=0)
            acc += (x.to(tl.int32) - x_zp) * wt.to(tl.int32)[None, :]
    quant_epilogue(acc, offs_p, offs_c, mask_p, mask_c, BIAS, MULT, RSHIFT, EPI, deq_scale,
                   Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, 1, RES_MODE, RQ_MODE)


_DW_TILES = [(32, 64, 4), (64, 64, 4), (16, 128, 4), (128, 32, 4), (64, 128, 8)]
_INTERPRET_DW = (16, 32, 4)


def depthwise_configs(family: str):
    """Autotune configs (BLOCK_P, BLOCK_C, num_warps) of the depthwise kernel."""
    tiles = [_INTERPRET_DW] if family == "interpret" else tune_subset(_DW_TILES)
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=nw, num_stages=2)
            for p, c, nw in tiles]


_TUNED = {}


def _dw_kernel(family: str):
    k = _TUNED.get(family)
    if k is None:
        k = _qdepthwise_kernel if family == "interpret" else triton.autotune(
            configs=depthwise_configs(family),
            key=["M", "O", "KH", "KW", "stride_h", *EPILOGUE_KEY])(_qdepthwise_kernel)
        _TUNED[family] = k
    return k


def is_depthwise(x: torch.Tensor, w: torch.Tensor, groups: int) -> bool:
    """One input channel a group (groups == C, w of shape (C * m, 1, KH, KW)), C > 1."""
    c = x.shape[1]
    return groups == c and c > 1 and w.shape[1] == 1


def qdepthwise2d(x, x_zp, w, bias, stride, padding, dilation, rq, *, out_mode="quant",
                 residual=None, add_params=None, deq_scale=1.0, deq_zero_point=0):
    """Depthwise conv launcher (internal; stride/padding/dilation as int pairs)."""
    x = x.contiguous(memory_format=torch.channels_last)
    nb, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    mode = _OUT_MODES[out_mode]
    dev = x.device
    y = torch.empty((nb, o, ho, wo), dtype=output_dtype(mode, rq, add_params), device=dev,
                    memory_format=torch.channels_last)
    m = nb * ho * wo
    if y.numel() == 0:
        return y
    y2d = y.permute(0, 2, 3, 1).reshape(m, o)
    r2d = y2d
    if residual is not None:
        r2d = residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) \
            .reshape(m, o)
    w_taps = derived("dw_w", (w,), (str(dev),),
                     lambda: w.reshape(o, kh * kw).t().contiguous())  # (KH*KW, O)
    b, mult, rsh, rq_mode = epilogue_tensors(w, w.reshape(o, kh * kw), bias, rq, int(x_zp),
                                             x.dtype, dev, fold_zero_point=False,
                                             foldable=mode in (OUT_QUANT, OUT_FLOAT))
    epi = epilogue_scalars(rq, add_params, dev, deq_zero_point)
    family = arch_family(dev)
    kern = _dw_kernel(family)
    meta = {}
    if family == "interpret":
        p, cb, _ = _INTERPRET_DW  # larger blocks for larger layers: fewer interpreted ops
        meta = {"BLOCK_P": p if m <= 64 else 64, "BLOCK_C": cb if o <= 32 else 64}
    grid = lambda META: (cdiv(m, META["BLOCK_P"]), cdiv(o, META["BLOCK_C"]))
    xs = x.stride()
    launch(kern, grid, x, w_taps, b, mult, rsh, epi, r2d, y2d, m, o, h, wd, ho, wo, o // c, sh, sw,
           ph, pw, dh, dw, xs[0], xs[2], xs[3], xs[1], y2d.stride(0), r2d.stride(0), int(x_zp),
           float(deq_scale), KH=kh, KW=kw, OUT_MODE=mode, HAS_RES=residual is not None,
           RES_MODE=residual_mode(add_params) if residual is not None else 0,
           RQ_MODE=rq_mode, **meta, **LAUNCH_OPTS)
    return y
