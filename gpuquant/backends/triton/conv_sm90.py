"""An sm_90 main loop for the int8 implicit-GEMM convolution: the GEMM's Gluon loop
(:mod:`.gemm_sm90`: one asynchronous int8 ``wgmma`` group kept in flight, which Triton's
``tl.dot`` never does) with the activation tile gathered, not loaded by TMA.

The Triton conv kernel (:func:`.conv._qconv_kernel`) drains the tensor cores every K step
(``wgmma.wait_group 0``), as the GEMM did, and its 3x3 layers are a third of the resnet50
convolutions' time (bench NOTES). Here each K step is one tap (r, s) and one block of
``BLOCK_K`` input channels:

* the activation tile, ``BLOCK_M`` output pixels x ``BLOCK_K`` channels of their input pixel
  under the tap, is gathered with ``cp.async`` (16 bytes a thread a row; a pixel in the
  padding is masked, and the copy's zero fill is its value: only for a zero point of 0,
  gpuquant's default symmetric int8 activations) into a ring of ``STAGES`` swizzled
  shared-memory buffers, one commit group a stage;
* the weight tile, ``BLOCK_N`` output channels x the same ``BLOCK_K`` columns of the
  (O, KH * KW * C) reordered weight, comes by TMA with one mbarrier a stage (``C`` a
  multiple of ``BLOCK_K``, so a block never straddles two taps);
* a stage is consumed after its copies landed (``wait_group``, then a proxy fence and a
  CTA barrier: ``wgmma`` reads shared memory through the async proxy), by an asynchronous
  ``warpgroup_mma``; ``warpgroup_mma_wait(1)`` frees the stage the step before read, which
  the copies of step ``kt + STAGES - 1`` then refill;
* the epilogue is the Triton kernel's (:func:`.gemm.quant_epilogue`), on the accumulator's
  MMA layout, its columns split in two where the whole tile spills (as the GEMM's).

Taken by :func:`.conv.qconv2d` when :func:`applies`: the sm_90 path switched on
(:func:`.gemm_sm90.enabled`: ``GPUQUANT_SM90_GEMM=gluon`` or ``gemm_sm90.use()``), int8
activations with zero point 0, ``groups`` 1, channels a multiple of 64, at least
``gemm_sm90.MIN_M`` output pixels; any kernel size, stride, padding and dilation. Tuned per
problem as the GEMM is (:func:`.gemm_sm90.pick`; :func:`force` fixes a config, the GPU
tests' way). Compiled and checked on the CPU (Gluon has no interpreter); its bytes are the
GPU tests' to check.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .common import LAUNCH_OPTS, cdiv
from .gemm_sm90 import (AVAILABLE, GROUP_M, MIN_M, STATS, _TUNED, _Choices, _descriptor,
                        enabled, epi_split, pick, shared_layouts)
from .launch import launch

__all__ = ["CONFIGS", "applies", "force", "qconv_sm90"]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES), in quick tuning's order: 64 channels a
# step (every resnet50 3x3 layer takes it), two CTAs a multiprocessor (64 KiB); one CTA on
# two warpgroups; 128 channels a step (C a multiple of 128); a 64-column tile for narrow
# layers
CONFIGS = [
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 128, 4, 3),
    (128, 64, 64, 4, 6),
]
_TUNED["sm90-conv"] = _Choices()
_local = threading.local()

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                  mbarrier, tma,
                                                                  warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .conv import window_origin
    from .gemm import grouped_tile
    from .gemm_sm90 import _instr_n, _tma_load, _warps_per_cta, mma_epilogue

    # names that moved between Triton 3.6 (the GPU machines) and 3.9 (CI)
    _cp_async = getattr(async_copy, "async_load", None) or \
        async_copy.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

    @gluon.constexpr_function
    def _gather_layout(block_k, num_warps):
        # 16 bytes a thread along the channels, the rest of a warp down the pixels
        lanes_k = block_k // 16
        return gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[32 // lanes_k,
                                                                           lanes_k],
                                warps_per_cta=[num_warps, 1], order=[1, 0])

    @gluon.constexpr_function
    def _a_layout(block_m, block_k):
        return gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8)

    @gluon.jit
    def _gather(a_stage, row_base, ih0, iw0, row_in, kt, offs_k, C, H, W_in, stride_xh,
                stride_xw, dil_h, dil_w, KW: gl.constexpr, BK: gl.constexpr):
        """Issue the cp.async copies of K step ``kt``'s activation tile into ``a_stage`` (no
        commit): tap ``kt // (C // BK)``, channels from ``(kt % (C // BK)) * BK``."""
        blocks = C // BK
        tap = kt // blocks
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        ok = row_in & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W_in)
        off = (r * dil_h).to(gl.int64) * stride_xh + (s * dil_w).to(gl.int64) * stride_xw \
            + (kt - tap * blocks) * BK
        ptrs = row_base[:, None] + off + offs_k[None, :]
        _cp_async(a_stage, ptrs, mask=ok[:, None])  # (broadcast: whole 16-byte rows)

    @gluon.jit
    def _qconv_sm90_kernel(X, w_desc, BIAS, MULT, RSHIFT, EPI, RES, Y, M, N, C, H, W_in,
                           Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                           stride_xn, stride_xh, stride_xw, stride_ym, stride_rm, deq_scale,
                           KH: gl.constexpr, KW: gl.constexpr, BM: gl.constexpr,
                           OUT_MODE: gl.constexpr, HAS_RES: gl.constexpr,
                           RES_MODE: gl.constexpr, RQ_MODE: gl.constexpr,
                           STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr,
                           EPI_SPLIT: gl.constexpr):
        """X (Nb, H, W, C) int8 (strides given, zero point 0), the weight (O, KH*KW*C) int8
        through ``w_desc`` -> Y (M, O) rows, M = Nb * Ho * Wo; the epilogue arguments as
        :func:`.conv._qconv_kernel`'s."""
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        pid_m, pid_n = grouped_tile(gl.program_id(0), M, N, BM, BN, GROUP)  # (.gemm's order)
        off_m = pid_m * BM
        off_n = pid_n * BN

        gather: gl.constexpr = _gather_layout(BK, num_warps)
        offs_gm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, gather))
        offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, gather))
        row_in = offs_gm < M
        img, ih0, iw0 = window_origin(offs_gm % M, Ho, Wo, stride_h, stride_w, pad_h, pad_w)
        row_base = X + img.to(gl.int64) * stride_xn + ih0.to(gl.int64) * stride_xh \
            + iw0.to(gl.int64) * stride_xw

        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BM, num_warps),
            instr_shape=[16, _instr_n(BM, BN, num_warps), 32])
        a_ring = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], _a_layout(BM, BK))
        b_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        k_tiles = KH * KW * (C // BK)

        for i in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 steps in flight
            pred = i < k_tiles
            if pred:
                _gather(a_ring.index(i), row_base, ih0, iw0, row_in, i, offs_k, C, H, W_in,
                        stride_xh, stride_xw, dil_h, dil_w, KW, BK)
            async_copy.commit_group()
            mbarrier.expect(ready.index(i), w_desc.block_type.nbytes, pred=pred)
            _tma_load(w_desc, [off_n, i * BK], ready.index(i), b_ring.index(i), pred=pred)

        acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma)
        for kt in range(k_tiles):
            s = kt % STAGES
            async_copy.wait_group(STAGES - 2)  # this thread's copies of step kt landed
            fence_async_shared()  # (generic-proxy writes, read by wgmma's async proxy)
            _cta_barrier()  # every thread's
            mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
            acc = warpgroup_mma(a_ring.index(s), b_ring.index(s).permute((1, 0)), acc,
                                is_async=True)
            acc, _a, _b = warpgroup_mma_wait(num_outstanding=1,
                                             deps=(acc, a_ring.index(s), b_ring.index(s)))
            nxt = kt + STAGES - 1
            ns = nxt % STAGES
            pred = nxt < k_tiles
            if pred:  # into the stage step kt - 1's group read (done: one group in flight)
                _gather(a_ring.index(ns), row_base, ih0, iw0, row_in, nxt, offs_k, C, H,
                        W_in, stride_xh, stride_xw, dil_h, dil_w, KW, BK)
            async_copy.commit_group()  # (empty past the end: the group count stays)
            mbarrier.expect(ready.index(ns), w_desc.block_type.nbytes, pred=pred)
            _tma_load(w_desc, [off_n, nxt * BK], ready.index(ns), b_ring.index(ns), pred=pred)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        async_copy.wait_group(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        mma_epilogue(acc, off_m, off_n, M, N, BIAS, MULT, RSHIFT, EPI, deq_scale, Y,
                     stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, RES_MODE, RQ_MODE,
                     EPI_SPLIT)


@contextlib.contextmanager
def force(config):
    """Within the block (this thread) every convolution taking this path runs ``config``
    (one of :data:`CONFIGS`), untuned: the GPU tests' forced configs. A config whose
    ``BLOCK_K`` does not divide a layer's channels is refused there (ValueError)."""
    if config is not None and tuple(config) not in CONFIGS:
        raise ValueError(f"config must be one of conv_sm90.CONFIGS {CONFIGS}, got {config!r}")
    prev = getattr(_local, "config", None)
    _local.config = None if config is None else tuple(config)
    try:
        yield
    finally:
        _local.config = prev


def applies(family: str, x: torch.Tensor, w: torch.Tensor, x_zp: int, groups: int) -> bool:
    """Whether this convolution runs here: switched on, sm_90, int8 channels_last ``x``
    (16-byte aligned, channels a multiple of 64) with zero point 0 (the copies' zero fill is
    the padding), ``groups`` 1, at least ``MIN_M`` output pixels (the caller checks the
    output size)."""
    if family != "sm90" or not enabled() or groups != 1 or int(x_zp) != 0:
        return False
    if x.dtype != torch.int8 or w.dtype != torch.int8 or x.dim() != 4:
        return False
    c = x.shape[1]
    return c % 64 == 0 and x.stride(1) == 1 and x.data_ptr() % 16 == 0 and \
        x.stride(2) % 16 == 0 and x.stride(0) % 16 == 0


def _launch(cfg, x, w2d, geom, rest, meta):
    STATS["launches"] += 1
    bm, bn, bk, warps, stages = cfg
    n = w2d.shape[0]
    _, lb = shared_layouts(bm, bn, bk)
    wd = _descriptor(w2d, n, w2d.shape[1], [bn, bk], lb)
    m = rest[6]
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    launch(_qconv_sm90_kernel, grid, x, wd, *rest, *geom, BM=bm, STAGES=stages, GROUP=GROUP_M,
           num_warps=warps, **meta, **LAUNCH_OPTS)


def qconv_sm90(x, w2d, kh: int, kw: int, geom, b, mult, rsh, epi, res, y2d, deq_scale: float,
               out_mode: int, has_res: bool, res_mode: int, rq_mode: int) -> None:
    """``y2d = epilogue(conv(x, w))`` with :func:`.conv.qconv2d`'s epilogue tensors
    (internal: the caller checked :func:`applies`). ``geom``: (C, H, W, Ho, Wo, stride_h,
    stride_w, pad_h, pad_w, dil_h, dil_w); ``w2d`` (O, KH * KW * C) int8 in (tap, channel)
    column order."""
    c = geom[0]
    m, n = y2d.shape
    xs = x.stride()
    rest = (b, mult, rsh, epi, res, y2d, m, n)
    geom = tuple(geom) + (xs[0], xs[2], xs[3], y2d.stride(0), res.stride(0), float(deq_scale))
    meta = {"KH": kh, "KW": kw, "OUT_MODE": out_mode, "HAS_RES": has_res,
            "RES_MODE": res_mode, "RQ_MODE": rq_mode,
            "EPI_SPLIT": epi_split(out_mode, rq_mode, has_res)}
    fits = [cf for cf in CONFIGS if c % cf[2] == 0]
    cfg = getattr(_local, "config", None)
    if cfg is not None and c % cfg[2]:
        raise ValueError(f"conv_sm90: forced config {cfg} needs channels a multiple of "
                         f"{cfg[2]}, got {c}")
    if cfg is None:
        key = (m, n, c, kh, kw) + tuple(geom[:11]) + (out_mode, has_res, res_mode, rq_mode,
                                                       y2d.dtype, b.dtype)
        cfg = pick(_TUNED["sm90-conv"].cache, key, fits,
                   lambda cf: _launch(cf, x, w2d, geom, rest, meta), x.is_cuda,
                   has_res and res.data_ptr() == y2d.data_ptr())
    _launch(cfg, x, w2d, geom, rest, meta)


def signature(config, form: str = "relu_folded", kh: int = 3, kw: int = 3):
    """(signature, constexprs) of :func:`_qconv_sm90_kernel` for ``config``, a ``kh`` x
    ``kw`` kernel and one of :data:`.gemm_sm90.EPILOGUE_FORMS` but the scaled one: what the
    launcher specializes for aligned tensors and sizes, for compiling without a GPU
    (:func:`.inspect_ptx.compile_gluon`)."""
    from .gemm_sm90 import EPILOGUE_FORMS
    bm, bn, bk, warps, stages = config
    out_mode, rq_mode, has_res, res_mode, y = EPILOGUE_FORMS[form]
    if out_mode == 3:
        raise ValueError("the scaled (W8A8) epilogue is the dynamic Linear's, not a conv's")
    _, lb = shared_layouts(bm, bn, bk)
    folded = rq_mode >= 2
    sig = {"X": "*i8", "w_desc": f"tensordesc<i8[{bn}, {bk}],{lb!r}>",
           "BIAS": "*i64" if folded else "*i32", "MULT": "*i32",
           "RSHIFT": "*i64" if folded else "*i32", "EPI": "*i64",
           "RES": "*i8" if has_res else y, "Y": y}
    sig.update({name: "i32" for name in (
        "M", "N", "C", "H", "W_in", "Ho", "Wo", "stride_h", "stride_w", "pad_h", "pad_w",
        "dil_h", "dil_w", "stride_xn", "stride_xh", "stride_xw", "stride_ym", "stride_rm")})
    sig["deq_scale"] = "fp32"
    const = {"KH": kh, "KW": kw, "BM": bm, "OUT_MODE": out_mode, "HAS_RES": has_res,
             "RES_MODE": res_mode, "RQ_MODE": rq_mode, "STAGES": stages, "GROUP": GROUP_M,
             "num_warps": warps, "EPI_SPLIT": epi_split(out_mode, rq_mode, has_res)}
    return sig, const
