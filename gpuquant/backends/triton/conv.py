"""Quantized conv2d as an implicit GEMM over channels_last (NHWC) int8 / uint8 input.

GEMM view: rows = output pixels (M = N * Ho * Wo), columns = output channels of a group,
reduction K = KH * KW * Cg with the weight reordered once to (O, KH, KW, Cg) (memoised), so
every K tile is a run of contiguous input channels. Two loop shapes, picked per layer:

* taps outer, channels inner (``FLAT_K`` False, wide layers: every 3x3 / 1x1 of a ResNet):
  each K tile is BLOCK_K consecutive channels of one tap: one coalesced row load per output
  pixel (``EVEN_C``: channels a multiple of BLOCK_K, no channel mask). Two forms the
  autotuner times per layer (``PIPE_TAPS``): taps unrolled (``KH``, ``KW`` compile-time),
  a channel-block loop each; or one loop over (tap, channel block) that the compiler's
  software pipeline prefetches across taps. The pipelined form also comes with the tiles
  copied as 8-byte ``cp.async.ca`` (``L1_CACHE``: allocated in L1, where neighbouring taps
  read the same input rows again) instead of 16-byte ``cp.async.cg`` (L2 only);
* flat K (``FLAT_K`` True, grouped convolutions with few channels a group): the K index is
  split into (tap, channel) per element so tiles are not mostly padding.

Few-channel convolutions with one group (the 7x7 stem, C = 3) run as an explicit im2col and
the GEMM (:func:`_im2col_conv`).

Padding is read as the activation's zero point (its value contributes ``x - zp = 0``), so
the zero-point fold of :mod:`.gemm` stays exact at the borders. With zero point 0 (every
symmetric int8 activation) ``ZP_ZERO`` makes that a plain ``other=0``: the compiler's
asynchronous copy fills it, where any other value costs a pass of the A tile through
registers before the tensor cores read it. 1x1 stride-1 unpadded
convolutions go to the plain GEMM on the NHWC view; depthwise convolutions go to
:mod:`.depthwise`. The epilogue is :func:`.gemm.quant_epilogue`.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl
import torch

from .common import LAUNCH_OPTS, arch_family, cdiv, derived
from . import gemm as _gemm
from .launch import launch
from .gemm import (_OUT_MODES, _acc_per_thread, _tile_key, _with, epilogue_scalars,
                   epilogue_tensors, family_configs, grouped_tile, interpret_meta,
                   output_dtype, padded_k, prune_configs, qgemm, quant_epilogue,
                   residual_mode, with_light_tile)

__all__ = ["qconv2d", "conv_configs", "conv_out_size", "window_origin"]


@triton.jit
def window_origin(pix, Ho, Wo, stride_h, stride_w, pad_h, pad_w):
    """Output pixel index (image-major, then oh, ow) -> (image, top row, left column) of
    its input window (negative inside the padding)."""
    hw = Ho * Wo
    img = pix // hw
    rem = pix % hw
    ih0 = (rem // Wo) * stride_h - pad_h
    iw0 = (rem % Wo) * stride_w - pad_w
    return img, ih0, iw0


@triton.jit
def _load_act(ptrs, mask, x_zp, ZP_ZERO: tl.constexpr):
    """The activation tile, padding (masked) positions read as the zero point; with
    ``ZP_ZERO`` as a plain 0: the asynchronous copy's zero fill, no select in registers."""
    if ZP_ZERO:
        a = tl.load(ptrs, mask=mask, other=0)
    else:
        a = tl.load(ptrs, mask=mask, other=x_zp)
    return a


@triton.jit
def _k_tile(acc, a_rows, row_ok, w_tap, c0, offs_k, Cg, x_zp,
            EVEN_C: tl.constexpr, ZP_ZERO: tl.constexpr, X_UINT8: tl.constexpr):
    """acc += one K tile of a tap: channels c0 .. c0 + BLOCK_K of each output pixel's input
    pixel at ``a_rows`` (rows with ``row_ok`` False, inside the padding, read as the zero
    point) against the same channels of the tap's weight columns ``w_tap``."""
    c = c0 + offs_k
    if EVEN_C:
        a_mask = row_ok[:, None]
        b = tl.load(w_tap[None, :] + c[:, None])
    else:
        c_ok = c < Cg
        a_mask = row_ok[:, None] & c_ok[None, :]
        b = tl.load(w_tap[None, :] + c[:, None], mask=c_ok[:, None], other=0)
    a = _load_act(a_rows[:, None] + c[None, :], a_mask, x_zp, ZP_ZERO)
    if X_UINT8:
        a = a.to(tl.int8, bitcast=True) ^ -128
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit(do_not_specialize=["x_zp"])
def _qconv_kernel(
    # pointers
    X, W, BIAS, MULT, RSHIFT, EPI, RES, Y,
    # GEMM sizes: M output pixels, N output channels a group, K = KH * KW * Cg
    M, N, K,
    # geometry
    H, W_in, Ho, Wo, Cg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides (elements): x NHWC, weight rows (O, K), y / residual rows (pixels)
    stride_xn, stride_xh, stride_xw, stride_wo, stride_ym, stride_rm,
    # scalars
    x_zp, deq_scale,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr, EVEN_C: tl.constexpr,
    ZP_ZERO: tl.constexpr, PIPE_TAPS: tl.constexpr,
    X_UINT8: tl.constexpr, OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr = 1, RES_MODE: tl.constexpr = 0,
    RQ_MODE: tl.constexpr = 0, L1_CACHE: tl.constexpr = False,
):
    """X (Nb, H, W, C) int8/uint8 (strides given), W (O, KH*KW*Cg) int8 -> Y (M, O)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if L1_CACHE:
        # the same indices, seen by the compiler as runs of 8: the tiles' asynchronous
        # copies become 8-byte cp.async.ca (cached in L1) instead of 16-byte cp.async.cg
        # (L2 only: Triton 3.6 picks .cg for every 16-byte copy, whatever the load's
        # cache_modifier). A 3x3 layer reads each input pixel once a tap, 9 times; in L1
        # a tap's rows are mostly the previous tap's, one pixel or one row over.
        offs_k = (offs_k // 8) * 8 + offs_k % 8
    mask_m = offs_m < M
    mask_n = offs_n < N
    # output pixel -> (image, oh, ow) -> top-left input coordinate
    img, ih0, iw0 = window_origin(offs_m % M, Ho, Wo, stride_h, stride_w, pad_h, pad_w)
    x_img = X + img.to(tl.int64) * stride_xn + (g * Cg).to(tl.int64)
    oc = g * N + offs_n  # global output channel
    w_rows = W + (g * N + offs_n % N).to(tl.int64) * stride_wo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if FLAT_K:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            c = kk % Cg
            tap = kk // Cg
            ih = ih0[:, None] + (tap // KW)[None, :] * dil_h
            iw = iw0[:, None] + (tap % KW)[None, :] * dil_w
            ok = k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W_in)
            a = _load_act(x_img[:, None] + ih.to(tl.int64) * stride_xh + iw * stride_xw
                          + c[None, :], ok, x_zp, ZP_ZERO)
            b = tl.load(w_rows[None, :] + kk[:, None], mask=k_ok[:, None], other=0)
            if X_UINT8:
                a = a.to(tl.int8, bitcast=True) ^ -128
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    elif PIPE_TAPS:
        # one loop over (tap, channel block) pairs: the compiler's software pipeline
        # (num_stages) prefetches across taps, so a 64-channel 3x3 layer (one block a tap)
        # keeps num_stages - 1 tiles in flight; with ZP_ZERO every load is an async copy.
        # What depends on the row is computed once, before the loop: each output pixel's
        # window origin pointer and one bit a tap for "inside the image"; an iteration adds
        # the tap's (scalar) offset and tests a bit, instead of 4 bounds checks, a 64-bit
        # multiply-add and a division by the runtime block count per row.
        tl.static_assert(KH * KW <= 63, "PIPE_TAPS: at most 63 taps (one bit each)")
        row_base = x_img + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw
        if KH * KW <= 31:
            inside = tl.zeros((BLOCK_M,), dtype=tl.int32)
        else:
            inside = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for r in tl.static_range(KH):
            for s in tl.static_range(KW):
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W_in)
                inside = inside | (ok.to(inside.dtype) << (r * KW + s))
        tap = tl.zeros((), dtype=tl.int32)
        c0 = tl.zeros((), dtype=tl.int32)
        for t in range(0, KH * KW * tl.cdiv(Cg, BLOCK_K)):
            tap_r = tap // KW
            tap_off = (tap_r * dil_h).to(tl.int64) * stride_xh \
                + ((tap - tap_r * KW) * dil_w).to(tl.int64) * stride_xw
            row_ok = ((inside >> tap.to(inside.dtype)) & 1) != 0
            acc = _k_tile(acc, row_base + tap_off, row_ok, w_rows + tap * Cg, c0, offs_k, Cg,
                          x_zp, EVEN_C, ZP_ZERO, X_UINT8)
            c0 += BLOCK_K
            tap = tl.where(c0 >= Cg, tap + 1, tap)
            c0 = tl.where(c0 >= Cg, 0, c0)
    else:
        # taps unrolled (KH, KW compile-time), channel blocks a loop inside each: straight-line
        # code whose loads the compiler may issue ahead of the previous tap's dot, but each
        # tap's loop is pipelined on its own (with one block a tap, no async prefetch across
        # taps). The autotuner picks between this form and PIPE_TAPS per layer.
        for r in tl.static_range(KH):
            for s in tl.static_range(KW):
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W_in)
                a_rows = x_img + ih.to(tl.int64) * stride_xh + iw * stride_xw
                for c0 in range(0, Cg, BLOCK_K):
                    acc = _k_tile(acc, a_rows, row_ok, w_rows + (r * KW + s) * Cg, c0, offs_k,
                                  Cg, x_zp, EVEN_C, ZP_ZERO, X_UINT8)

    quant_epilogue(acc, offs_m, oc, mask_m, mask_n, BIAS, MULT, RSHIFT, EPI, deq_scale,
                   Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, EPI_SPLIT, RES_MODE, RQ_MODE)


# H, W_in not specialized: the bounds are compared as uint32 scalars (a 1 would arrive as an
# int constant, which has no .to)
@triton.jit(do_not_specialize=["x_zp", "H", "W_in"])
def _im2col_kernel(X, A, m0, M, K, Kp, H, W_in, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                   dil_h, dil_w, stride_xn, stride_xh, stride_xw, x_zp,
                   CG: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """A (M, Kp) = the patches of output pixels m0 .. m0 + M, one row a pixel, K = KH * KW *
    CG in (tap, channel) order; padding and columns K .. Kp read as the zero point.

    The source offset of element (pixel, column) is a per-pixel base (image, window origin;
    int64) plus a per-column offset (tap row, tap column, channel; int32: the caller checks
    that a window spans fewer than 2^31 bytes), and the padding test compares the window
    origin plus the column's tap displacement, unsigned (a negative row or column wraps past
    the bound). A thread holds one pixel and many columns of the tile, so the column terms
    are per element too: they come from two divisions by compile-time constants (the tap
    row, then the tap column within it), not four plus 64-bit multiplications."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    img, ih0, iw0 = window_origin(m0 + rows, Ho, Wo, stride_h, stride_w, pad_h, pad_w)
    row_ok = rows < M
    base = img.to(tl.int64) * stride_xn + ih0.to(tl.int64) * stride_xh \
        + iw0.to(tl.int64) * stride_xw  # per row (outside the image in the padding: masked)
    r = kk // (KW * CG)  # tap row; KW, CG compile-time: divisions by constants
    j = kk - r * (KW * CG)
    s = j // CG  # tap column
    dh = r * dil_h
    dw = s * dil_w
    # dh * stride_xh + dw * stride_xw + (j - s * CG), the scalar factors once a program
    col = r * (dil_h * stride_xh) + s * (dil_w * stride_xw - CG) + j
    ih = (ih0[:, None] + dh[None, :]).to(tl.uint32, bitcast=True)
    iw = (iw0[:, None] + dw[None, :]).to(tl.uint32, bitcast=True)
    ok = (row_ok[:, None] & (kk < K)[None, :]) & (ih < H.to(tl.uint32)) \
        & (iw < W_in.to(tl.uint32))
    v = tl.load(X + (base[:, None] + col[None, :]), mask=ok, other=x_zp)
    tl.store(A + rows.to(tl.int64)[:, None] * Kp + kk[None, :], v,
             mask=row_ok[:, None] & (kk < Kp)[None, :])


# --------------------------------------------------------------------------- configs
# Implicit GEMM tiles: the A tile is a gather (one row a pixel), so fewer stages than the
# plain GEMM pay off; N of a ResNet layer is 64..2048, K per tap a multiple of 64.
_CONV_TILES = {
    "sm90": [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
             (256, 64, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
             (64, 64, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3), (32, 64, 64, 8, 4, 4)],
    "sm80": [(128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
             (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4),
             (32, 64, 64, 8, 4, 4)],
    "sm89": [(128, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
             (64, 64, 64, 8, 4, 4), (32, 64, 64, 8, 4, 4)],
}
_CONV_TILES["generic"] = _CONV_TILES["sm89"]


def conv_configs(family: str):
    """Autotune configs of the implicit-GEMM conv kernel for an architecture family: every
    tile in both tap-loop forms (``PIPE_TAPS`` False: taps unrolled; True: one pipelined
    loop over (tap, channel block)), the pipelined form also with its tiles copied through
    L1 (``L1_CACHE``), and the tiles holding >= 128 accumulators a thread also with the
    requantizing epilogue in two column halves (``EPI_SPLIT`` 2, as the GEMM's: see
    :func:`.gemm.prune_gemm_configs`). :func:`prune_conv_configs` keeps one form where the
    forms are the same code."""
    tiles = family_configs(_CONV_TILES, family)
    out = [_with(c, PIPE_TAPS=pipe, EPI_SPLIT=1, L1_CACHE=False) for pipe in (False, True)
           for c in tiles]
    if family != "interpret":
        out += [_with(c, L1_CACHE=True) for c in out if c.kwargs["PIPE_TAPS"]]
        out += [_with(c, EPI_SPLIT=2) for c in out if _acc_per_thread(c) >= 128]
    return out


def prune_conv_configs(configs, named_args, family=None, **kwargs):
    """The GEMM's tile pruning (shape, quick subset) on the unrolled-form, whole-epilogue
    configs; then, when the layer has a tap loop (more than one tap and not ``FLAT_K``),
    the pipelined twin of every kept tile, and that twin again with its tiles copied
    through L1 (``L1_CACHE``, where one exists): the autotuner times all three (which is
    faster depends on the layer: with one channel block a tap only the pipelined form
    prefetches across taps; see bench/README.md NOTES; at most 63 taps: one bit each);
    then, for int8 / float outputs, the split-epilogue twin of each of those that has
    one."""
    def key(c):
        kw = c.kwargs
        return (_tile_key(c), kw.get("PIPE_TAPS", False), kw.get("L1_CACHE", False),
                kw.get("EPI_SPLIT", 1))
    index = {key(c): c for c in configs}
    whole = [c for c in configs if key(c)[1:] == (False, False, 1)]
    kept = with_light_tile(whole, named_args, prune_configs(whole, named_args, family),
                           **kwargs)
    if not kwargs.get("FLAT_K") and 1 < kwargs.get("KH", 1) * kwargs.get("KW", 1) <= 63:
        pipelined = [index[(_tile_key(c), True, False, 1)] for c in kept]
        kept = kept + pipelined + [index[k] for k in ((_tile_key(c), True, True, 1)
                                                      for c in pipelined) if k in index]
    if kwargs.get("OUT_MODE") in (0, 1):
        kept = kept + [index[k] for k in ((*key(c)[:3], 2) for c in kept) if k in index]
    return kept


# The loop form the interpreter runs (it has no autotuner); the tests run both, and the
# pipelined form with and without L1_CACHE.
INTERPRET_PIPE_TAPS = False
INTERPRET_L1_CACHE = False

_TUNED = {}


def _conv_kernel(family: str):
    k = _TUNED.get(family)
    if k is None:
        heur = triton.heuristics({"EVEN_C": lambda a: a["Cg"] % a["BLOCK_K"] == 0})(
            _qconv_kernel)
        k = heur if family == "interpret" else triton.autotune(
            configs=conv_configs(family),
            key=["M", "N", "K", "Cg", "KH", "KW", "stride_h", "ZP_ZERO", *_gemm.EPILOGUE_KEY],
            prune_configs_by={"early_config_prune": functools.partial(prune_conv_configs,
                                                                      family=family)})(heur)
        _TUNED[family] = k
    return k


# --------------------------------------------------------------------------- launcher
def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _pair(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def reordered_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, Cg, KH, KW) -> (O, KH * KW * Cg) int8 contiguous, memoised on ``w``."""
    return derived("conv_w", (w,), (str(w.device),),
                   lambda: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous())


def qconv2d(x, x_zp: int, w, bias, stride, padding, dilation, groups, rq, *,
            out_mode: str = "quant", residual=None, add_params=None, deq_scale: float = 1.0,
            deq_zero_point: int = 0) -> torch.Tensor:
    """Fused quantized conv2d (internal launcher; inputs validated by the caller).

    ``x`` (Nb, C, H, W) int8/uint8 (channels_last memory preferred; other layouts are copied),
    ``w`` (O, C / groups, KH, KW) int8. Returns (Nb, O, Ho, Wo) in channels_last memory.
    """
    from .depthwise import is_depthwise, qdepthwise2d  # local: depthwise imports this module
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    nb, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if is_depthwise(x, w, groups):
        return qdepthwise2d(x, x_zp, w, bias, (sh, sw), (ph, pw), (dh, dw), rq,
                            out_mode=out_mode, residual=residual, add_params=add_params,
                            deq_scale=deq_scale, deq_zero_point=deq_zero_point)
    x = x.contiguous(memory_format=torch.channels_last)
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(wd, kw, sw, pw, dw)
    mode = _OUT_MODES[out_mode]
    dev = x.device
    m = nb * ho * wo
    # (M, O) rows = NHWC memory; y is its (N, O, Ho, Wo) channels_last view (cheaper than
    # allocating channels_last and re-viewing it as rows: ~2 us a call)
    y2d = torch.empty((m, o), dtype=output_dtype(mode, rq, add_params), device=dev)
    y = y2d.view(nb, ho, wo, o).permute(0, 3, 1, 2)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    r2d = None if residual is None else residual.permute(0, 2, 3, 1).reshape(m, o)
    if (kh, kw, sh, sw, ph, pw, groups) == (1, 1, 1, 1, 0, 0, 1):
        # 1x1 fast path: the NHWC activation is already the GEMM's (M, K) operand
        x2d = x.permute(0, 2, 3, 1).reshape(m, c)
        qgemm(x2d, x_zp, w.reshape(o, c), bias, rq, w_src=w, out_mode=out_mode,
              residual=r2d, add_params=add_params, deq_scale=deq_scale,
              deq_zero_point=deq_zero_point, out=y2d)
        return y
    if groups == 1 and cg < 64:
        return _im2col_conv(x, x_zp, w, bias, (kh, kw, sh, sw, ph, pw, dh, dw), rq, y, y2d,
                            r2d, out_mode=out_mode, add_params=add_params,
                            deq_scale=deq_scale, deq_zero_point=deq_zero_point)
    w2d = reordered_weight(w)
    b, mult, rsh, rq_mode = epilogue_tensors(w, w2d, bias, rq, x_zp, x.dtype, dev,
                                             foldable=mode in (_gemm.OUT_QUANT, _gemm.OUT_FLOAT))
    epi = epilogue_scalars(rq, add_params, dev, deq_zero_point)
    og = o // groups
    k = kh * kw * cg
    family = arch_family(dev)
    kern = _conv_kernel(family)
    flat_k = cg < 64
    meta = {} if family != "interpret" else \
        {**interpret_meta(m, og, k if flat_k else cg),
         "PIPE_TAPS": INTERPRET_PIPE_TAPS and kh * kw <= 63,
         "L1_CACHE": INTERPRET_L1_CACHE, "EPI_SPLIT": _gemm.INTERPRET_EPI_SPLIT}
    res = r2d if r2d is not None else y2d
    res_mode = residual_mode(add_params) if residual is not None else 0
    if m >= conv_sm90.MIN_M and conv_sm90.applies(family, x, w, x_zp, groups):
        # the sm_90 Gluon main loop (opt-in; one wgmma group kept in flight)
        conv_sm90.qconv_sm90(x, w2d, kh, kw, (c, h, wd, ho, wo, sh, sw, ph, pw, dh, dw), b,
                             mult, rsh, epi, res, y2d, deq_scale, mode, residual is not None,
                             res_mode, rq_mode)
        return y
    grid = lambda META: (cdiv(m, META["BLOCK_M"]) * cdiv(og, META["BLOCK_N"]),
                         groups)
    xs = x.stride()
    launch(kern, grid, x, w2d, b, mult, rsh, epi, res, y2d, m, og, k, h, wd, ho, wo, cg, sh, sw,
           ph, pw, dh, dw, xs[0], xs[2], xs[3], w2d.stride(0), y2d.stride(0), res.stride(0),
           int(x_zp), float(deq_scale), KH=kh, KW=kw, FLAT_K=flat_k, ZP_ZERO=int(x_zp) == 0,
           X_UINT8=x.dtype == torch.uint8, OUT_MODE=mode, HAS_RES=residual is not None,
           RES_MODE=res_mode, RQ_MODE=rq_mode, **meta, **LAUNCH_OPTS)
    return y


# The patch matrix of a few-channel layer is built in chunks of at most this many bytes (the
# L2 of an H100 is 50 MB: the GEMM reads a chunk soon after it is written).
IM2COL_BYTES = 32 * 2 ** 20
# The im2col tile (pixels, columns; Kp is a multiple of 16). The kernel is bound by its
# integer index math (the H200's ncu: 66% of issue slots, math-pipe throttle; 50 us a 32 MB
# chunk of the stem, 4 chunks). Its layout gives each thread whole columns of rows, so the
# column terms (two divisions by constants and the offsets) are shared by the rows a thread
# holds and the row terms by its columns: 512 x 16 holds 4 x 16, and ptxas (sm_90, Triton
# 3.6) counts 18 instructions an element against 28 for 64 x 64 (1 x 32), and no
# shared-memory layout change before the stores. The stem's time on the H200 did not move
# (0.3025 -> 0.301 ms, bench/README.md NOTES): fewer instructions, same speed.
IM2COL_TILE = (512, 16)


def _im2col_conv(x, x_zp, w, bias, geom, rq, y, y2d, r2d, **epilogue):
    """A conv with few channels (the 7x7 stem, C = 3) as an explicit im2col and the GEMM.

    In the implicit GEMM such a layer gathers one byte per (pixel, tap, channel) with a
    division per element, and its K tiles are mostly padding; its patch matrix is small
    (M x K bytes, K = 147 for the stem) and the GEMM over it runs at the GEMM's speed. The
    patch rows are padded to a multiple of 16 bytes with the zero point against zero weight
    columns (exact), and built in chunks of :data:`IM2COL_BYTES` output-pixel rows."""
    kh, kw, sh, sw, ph, pw, dh, dw = geom
    _, c, h, wd = x.shape
    ho, wo = y.shape[2], y.shape[3]
    m, k = y2d.shape[0], kh * kw * c
    kp = padded_k(k)
    xs = x.stride()
    span = (kh - 1) * dh * xs[2] + (kw - 1) * dw * xs[3] + c
    if span >= 2 ** 31:  # the kernel's per-column offsets are int32
        raise ValueError(f"qconv2d: a {kh}x{kw} window (dilation {dh}x{dw}) of this input spans "
                         f"{span} bytes; the few-channel path takes fewer than 2^31")
    w2d = derived("conv_w_kpad", (w,), (kp, str(w.device)),
                  lambda: torch.nn.functional.pad(reordered_weight(w), (0, kp - k)))
    rows = max(1, min(m, IM2COL_BYTES // kp))
    a = torch.empty((rows, kp), dtype=x.dtype, device=x.device)
    bm, bk = IM2COL_TILE
    for m0 in range(0, m, rows):
        r = min(rows, m - m0)
        launch(_im2col_kernel, (cdiv(r, bm), cdiv(kp, bk)), x, a, m0, r, k, kp, h, wd, ho, wo,
               sh, sw, ph, pw, dh, dw, xs[0], xs[2], xs[3], int(x_zp), CG=c, KW=kw,
               BLOCK_M=bm, BLOCK_K=bk, **LAUNCH_OPTS)
        qgemm(a[:r], x_zp, w2d, bias, rq, w_src=w, out=y2d[m0:m0 + r],
              residual=None if r2d is None else r2d[m0:m0 + r], **epilogue)
    return y


from . import conv_sm90  # noqa: E402 (it imports this module's window_origin)
