"""int8 x int8 -> int32 GEMM on tensor cores with the requantizing epilogue fused.

``y[m, n] = epilogue(sum_k (x[m, k] - zp_x) * w[n, k] + bias[n])`` for ``x`` int8 or uint8
(M, K) and ``w`` int8 (N, K) (K contiguous for both: the layout int8 MMA wants, ``row.col``
for ``mma.sync`` and K-major shared-memory tiles for ``wgmma``).

Zero point. The MMA multiplies int8 by int8, so the activation's zero point is not
subtracted in the inner loop; instead, with ``x' = x - shift`` the int8 operand (``shift``
= 128 for uint8 activations, flipped by an xor of the top bit after a bitcast, 0 for int8),
``sum (x - zp) w = sum x' w + (shift - zp) * colsum(w)`` and the second term is folded into
the bias once per (weight, zero point) (a device vector, int32 when it fits, memoised).
The dot product of ``x'`` stays within the caller's int32 worst-case bound
(``|x'| <= 128 <= max|x - zp|``), so ``mma ... satfinite`` never saturates, and the
epilogue adds the folded bias: the result is the exact accumulator the contract defines.

Epilogue (:func:`quant_epilogue`, shared with the conv kernels): + bias, per-channel
fixed-point requantization (:mod:`.fixed_point`) with the activation folded into the clamp,
optionally the contract's integer add of a residual tensor, and the output as int8 / uint8,
as float32 (``(y - zp) * scale``, the dequantized value) or as the bare int32 accumulator.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl
import torch

from .common import (LAUNCH_OPTS, arch_family, cdiv, derived, scalar_int, sm_count,
                     to_dtype, tune_mode, tune_subset)
from .launch import launch
from ...functional.requant import Requant
from .fixed_point import (_E_AM, _E_AS, _E_AZP, _E_BM, _E_BS, _E_BZP, _E_DZP, _E_F_SH, _E_FA_C,
                          _E_FA_DM, _E_FA_K, _E_FA_M, _E_FA_S, _E_FB_C, _E_FB_DM, _E_FB_K,
                          _E_FB_M, _E_FB_S, _E_FO_C0, _E_FO_RC, _E_LEN, _E_OM, _E_OQMAX,
                          _E_OQMIN, _E_OS, _E_OZP, _E_QMAX, _E_QMIN, _E_SHIFT, _E_ZP, add_epi,
                          add_mode, requantize_folded, requantize_i32, round_constants)

__all__ = ["qgemm", "gemm_configs", "epilogue_tensors", "OUT_QUANT", "OUT_FLOAT", "OUT_INT32",
           "OUT_SCALED"]

OUT_QUANT, OUT_FLOAT, OUT_INT32, OUT_SCALED = 0, 1, 2, 3
_OUT_MODES = {"quant": OUT_QUANT, "float": OUT_FLOAT, "int32": OUT_INT32, "scaled": OUT_SCALED}

# EPI: the int64 vector of the epilogue's scalars; its slots (_E_*) are defined beside the
# kernels that read them (.fixed_point)

# The requantization's arithmetic (RQ_MODE, decided on the host: epilogue_tensors):
# 0 general with the saturating left shift behind a uniform branch, 1 general without it
# (no rshift is negative), 2 folded (.fixed_point.requantize_folded: every rshift >= 1).
# 3 folded for a clamp at or above the zero point (a fused ReLU: requantize_folded's SIGNED
# False, the rounding constant in the bias's addend).
RQ_LSHIFT, RQ_PLAIN, RQ_FOLDED, RQ_FOLDED_RELU = 0, 1, 2, 3


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row blocks share their
    column (W) tiles while those are in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _residual_add(y, r, EPI, MODE: tl.constexpr):
    return add_epi(y, r, EPI, MODE).to(tl.int32)  # within the output's clamp range


@triton.jit
def quant_epilogue(acc, offs_m, offs_n, mask_m, mask_n,
                   # per-channel vectors and the scalar block
                   BIAS, MULT, RSHIFT, EPI, deq_scale,
                   # output and residual
                   Y, stride_ym, RES, stride_rm,
                   OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr, EPI_SPLIT: tl.constexpr = 1,
                   RES_MODE: tl.constexpr = 0, RQ_MODE: tl.constexpr = 0):
    """:func:`_quant_epilogue_tile` on the whole tile, or (``EPI_SPLIT`` 2) on each half of
    its columns in turn."""
    if EPI_SPLIT == 2:
        bm: tl.constexpr = acc.shape[0]
        bn: tl.constexpr = acc.shape[1]
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (bm, 2, bn // 2)), (0, 2, 1)))
        n0, n1 = tl.split(tl.permute(tl.reshape(offs_n, (2, bn // 2)), (1, 0)))
        k0, k1 = tl.split(tl.permute(tl.reshape(mask_n, (2, bn // 2)), (1, 0)))
        _quant_epilogue_tile(a0, offs_m, n0, mask_m, k0, BIAS, MULT, RSHIFT, EPI, deq_scale,
                             Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, RES_MODE, RQ_MODE)
        _quant_epilogue_tile(a1, offs_m, n1, mask_m, k1, BIAS, MULT, RSHIFT, EPI, deq_scale,
                             Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, RES_MODE, RQ_MODE)
    else:
        _quant_epilogue_tile(acc, offs_m, offs_n, mask_m, mask_n, BIAS, MULT, RSHIFT, EPI,
                             deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES,
                             RES_MODE, RQ_MODE)


@triton.jit
def _quant_epilogue_tile(acc, offs_m, offs_n, mask_m, mask_n, BIAS, MULT, RSHIFT, EPI,
                         deq_scale, Y, stride_ym, RES, stride_rm,
                         OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr, RES_MODE: tl.constexpr,
                         RQ_MODE: tl.constexpr):
    """Store ``epilogue(acc + bias)`` at ``Y[offs_m * stride_ym + offs_n]``.

    ``acc``: int32 (BM, BN); ``offs_n``: global output channels (index BIAS/MULT/RSHIFT,
    which hold :data:`EPI_PAD` columns past the last: read without a mask, so the compiler
    zeroes no registers for masked-off lanes, 1.25 instructions an output on the 128x128
    tile). The accumulator plus bias fits int32 (the caller refuses shapes that could
    overflow). ``RQ_MODE`` (:func:`epilogue_tensors`, decided on the host) is the
    requantization's arithmetic: 2 and 3 (every rshift >= 1, the usual case), the folded
    form (:func:`.fixed_point.requantize_folded`: BIAS holds ``bias * multiplier + 2^30``
    and RSHIFT the shift with its rounding constant, both int64; 3 for a ReLU clamp, its
    rounding without the sign term); 0 and 1, the 32-bit form
    (:func:`.fixed_point.requantize_i32`, BIAS int32 or int64, MULT int32) with the
    saturating left shift compiled behind a uniform branch that tiles without a negative
    rshift skip (0) or left out (1: the host knows no rshift is negative). ``RES_MODE`` is
    the residual add's arithmetic (:func:`.fixed_point.add_mode`).
    """
    mask = mask_m[:, None] & mask_n[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if OUT_MODE == 2:
        tl.store(y_ptrs, _plus_bias(acc, BIAS, offs_n), mask=mask)
    else:
        mult = tl.load(MULT + offs_n)
        rsh = tl.load(RSHIFT + offs_n)
        zp = tl.load(EPI + _E_ZP).to(tl.int32)
        lo = tl.load(EPI + _E_QMIN).to(tl.int32)
        hi = tl.load(EPI + _E_QMAX).to(tl.int32)
        if RQ_MODE >= 2:
            c0 = tl.load(BIAS + offs_n)
            y = requantize_folded(acc, c0[None, :], mult[None, :], rsh[None, :], zp, lo, hi,
                                  RQ_MODE == 2)
        else:
            v = _plus_bias(acc, BIAS, offs_n)
            # SAT False: a Requant's multipliers are in [0, 2^31) (Requant checks them),
            # never the -2^31 whose doubling high multiply saturates
            if RQ_MODE == 0:
                if tl.min(rsh, axis=0) < 0:
                    y = requantize_i32(v, mult[None, :], rsh[None, :], zp, lo, hi, True, False)
                else:
                    y = requantize_i32(v, mult[None, :], rsh[None, :], zp, lo, hi, False,
                                       False)
            else:
                y = requantize_i32(v, mult[None, :], rsh[None, :], zp, lo, hi, False, False)
        if HAS_RES:
            r = tl.load(RES + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :],
                        mask=mask, other=0)
            y = _residual_add(y, r, EPI, RES_MODE)
        if OUT_MODE == 1:
            tl.store(y_ptrs, (y - tl.load(EPI + _E_DZP)).to(tl.float32) * deq_scale, mask=mask)
        else:
            tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _plus_bias(acc, BIAS, offs_n):
    """``acc + bias`` as int32 (BIAS int32, or int64 when a folded bias does not fit)."""
    bias = tl.load(BIAS + offs_n)
    if BIAS.dtype.element_ty == tl.int64:
        v = (acc.to(tl.int64) + bias[None, :]).to(tl.int32)
    else:
        v = acc + bias[None, :]
    return v


@triton.jit
def scaled_epilogue(acc, offs_m, offs_n, mask_m, mask_n, COL_SCALE, ROW_SCALE, FBIAS, Y,
                    stride_ym, HAS_BIAS: tl.constexpr):
    """OUT_MODE 3, "scaled" (dynamic W8A8, :mod:`.dynamic`): store
    ``float(acc) * ROW_SCALE[m] * COL_SCALE[n] (+ FBIAS[n])`` (float32, each step rounded:
    launched without FMA) as Y's float dtype, rounded half to even (bfloat16: torch's
    conversion on the kernel's device, :func:`~.common.to_dtype`)."""
    rs = tl.load(ROW_SCALE + offs_m, mask=mask_m, other=0.0)
    cs = tl.load(COL_SCALE + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * rs[:, None]
    y = y * cs[None, :]
    if HAS_BIAS:
        y = y + tl.load(FBIAS + offs_n, mask=mask_n, other=0.0)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    out = to_dtype(y, Y.dtype.element_ty)
    tl.store(y_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _qgemm_kernel(
    # pointers
    X, W, BIAS, MULT, RSHIFT, EPI, RES, Y,
    # sizes
    M, N, K,
    # strides (elements)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_rm,
    # dequantized output scale (OUT_MODE 1)
    deq_scale,
    # meta-parameters
    X_UINT8: tl.constexpr, OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr = 1, RES_MODE: tl.constexpr = 0,
    RQ_MODE: tl.constexpr = 0, PERSISTENT: tl.constexpr = 0,
):
    """X (M, K) int8/uint8, W (N, K) int8 -> Y (M, N) int8/uint8, float32 or int32.

    ``PERSISTENT`` 0: one program a tile; n > 0: :func:`_persistent_tiles`, launched with
    at most n programs a multiprocessor (:func:`gemm_grid`)."""
    if PERSISTENT > 0:
        _persistent_tiles(X, W, BIAS, MULT, RSHIFT, EPI, RES, Y, M, N, K, stride_xm,
                          stride_xk, stride_wn, stride_wk, stride_ym, stride_rm, deq_scale,
                          X_UINT8, OUT_MODE, HAS_RES, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
                          GROUP_M, EPI_SPLIT, RES_MODE, RQ_MODE)
        return
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _tile_acc(X, W, pid_m, pid_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                    X_UINT8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OUT_MODE == 3:  # scaled float: MULT / RSHIFT / RES carry column / row scales, bias
        scaled_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, MULT, RSHIFT, RES, Y,
                        stride_ym, HAS_RES)
    else:
        quant_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, BIAS, MULT, RSHIFT, EPI,
                       deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, EPI_SPLIT,
                       RES_MODE, RQ_MODE)


@triton.jit
def _tile_acc(X, W, pid_m, pid_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
              X_UINT8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int32 accumulator of tile (pid_m, pid_n): its K loop."""
    offs_k = tl.arange(0, BLOCK_K)
    # rows / columns past the edge load a valid row (modulo) and are masked at the store
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    x_ptrs = X + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0)  # zero weights: no contribution
        if X_UINT8:
            a = a.to(tl.int8, bitcast=True) ^ -128  # x - 128, exactly, as int8
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _persistent_tiles(X, W, BIAS, MULT, RSHIFT, EPI, RES, Y, M, N, K, stride_xm, stride_xk,
                      stride_wn, stride_wk, stride_ym, stride_rm, deq_scale,
                      X_UINT8: tl.constexpr, OUT_MODE: tl.constexpr, HAS_RES: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr,
                      RES_MODE: tl.constexpr, RQ_MODE: tl.constexpr):
    """The GEMM as a persistent program: tiles pid, pid + programs, ... in one flattened
    loop (``tl.range(..., flatten=True)``), so the software pipeline issues the next
    tile's first copies before this tile's epilogue, where one program a tile waits for
    its loads after the previous program's epilogue. The epilogue's tile index is carried
    apart from the loads' (as Triton's persistent matmul tutorial does)."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    nprog = tl.num_programs(0)
    tile_e = tl.program_id(0) - nprog
    for tile in tl.range(tl.program_id(0), num_tiles, nprog, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tile_acc(X, W, pid_m, pid_n, M, N, K, stride_xm, stride_xk, stride_wn,
                        stride_wk, X_UINT8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        tile_e += nprog
        em, en = grouped_tile(tile_e, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = em * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = en * BLOCK_N + tl.arange(0, BLOCK_N)
        if OUT_MODE == 3:
            scaled_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, MULT, RSHIFT, RES,
                            Y, stride_ym, HAS_RES)
        else:
            quant_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, BIAS, MULT, RSHIFT,
                           EPI, deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES,
                           EPI_SPLIT, RES_MODE, RQ_MODE)


# --------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per architecture family.
# int8 tiles are 1 byte an element: BLOCK_K 128 gives 128-byte rows (full swizzle).
# Shared memory per stage: (BLOCK_M + BLOCK_N) * BLOCK_K bytes; limits 227 KB (sm_90),
# 163 KB (sm_80), 99 KB (sm_86 / sm_89).
_GEMM_TILES = {
    "sm90": [(128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4),
             (128, 128, 128, 8, 4, 3),
             (128, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
             (32, 64, 256, 8, 4, 4), (16, 64, 256, 1, 4, 4)],
    "sm80": [(128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4),
             (128, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
             (32, 64, 128, 8, 4, 4), (16, 64, 256, 1, 4, 3)],
    "sm89": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 3),
             (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4),
             (16, 64, 256, 1, 4, 3)],
}
_GEMM_TILES["generic"] = _GEMM_TILES["sm89"]

_SMEM_HALF_SM90 = 113 * 1024  # half of an sm_90 multiprocessor's 227 KB


def two_ctas_sm90(c) -> bool:
    """Whether an sm_90 config runs two CTAs a multiprocessor: one warpgroup (4 warps, a
    wgmma tile of >= 64 rows: even at 255 registers a thread two fit the register file)
    and at most half the shared memory for its pipeline stages.

    Why it matters: Triton makes no int8 wgmma asynchronous across loop iterations (its
    MMAv3 pipeliner keeps a dot in flight only with a float32 accumulator:
    WGMMAPipeline.cpp, "rule 2.1"), so every K step ends in ``wgmma.wait_group 0`` (the
    sm_90 PTX of the GEMM and conv kernels says so; fp16 gets ``wait_group 1``). With one CTA
    a multiprocessor (the 8-warp tiles: 144-206 registers a thread, ptxas, Triton 3.6) the
    tensor cores idle through every drain; a second CTA can issue its MMAs then. Quick
    tuning times one such tile next to the large ones (:func:`prune_configs`)."""
    kw = c.kwargs
    smem = c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"]
    return c.num_warps == 4 and kw["BLOCK_M"] >= 64 and smem <= _SMEM_HALF_SM90


# One small config under the interpreter: every tile costs numpy work there.
INTERPRET_TILE = (32, 32, 32, 4, 4, 1)


def _config(t):
    bm, bn, bk, gm, nw, ns = t
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=nw, num_stages=ns)


def family_configs(tiles: dict, family: str):
    """Configs of ``tiles[family]`` (one tile per config); the interpreter's one tile for
    ``"interpret"``."""
    if family == "interpret":
        return [_config(INTERPRET_TILE)]
    if family not in tiles:
        raise ValueError(f"unknown architecture family {family!r}; known: "
                         f"{sorted(tiles)} and 'interpret'")
    return [_config(t) for t in tiles[family]]


def gemm_configs(family: str):
    """Autotune configs of the GEMM kernel for an architecture family: every tile with its
    epilogue on the whole tile (``EPI_SPLIT`` 1), and the tiles holding >= 128 accumulators
    a thread again with the requantizing epilogue in two column halves (``EPI_SPLIT`` 2;
    :func:`prune_gemm_configs` keeps those for the requantizing output modes only)."""
    base = [_with(c, EPI_SPLIT=1) for c in family_configs(_GEMM_TILES, family)]
    if family == "interpret":
        return base
    return base + [_with(c, EPI_SPLIT=2) for c in base if _acc_per_thread(c) >= 128]


def _with(c, **kwargs):
    return triton.Config({**c.kwargs, **kwargs}, num_warps=c.num_warps,
                         num_stages=c.num_stages)


def _acc_per_thread(c) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


def _tile_key(c) -> tuple:
    kw = c.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], c.num_warps,
            c.num_stages)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _tile_area(c) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]


def _fits(c, m: int, n: int) -> bool:
    """Whether a tile is not far larger than an (m, n) problem (M = 1 never needs 128 rows)."""
    return (c.kwargs["BLOCK_M"] <= max(32, _next_pow2(m))
            and c.kwargs["BLOCK_N"] <= max(64, _next_pow2(n)))


def _programs(c, m: int, n: int) -> int:
    return cdiv(m, c.kwargs["BLOCK_M"]) * cdiv(n, c.kwargs["BLOCK_N"])


def prune_configs(configs, named_args, family=None, **kwargs):
    """Drop tiles far larger than the problem (M = 1 never needs 128 rows), then keep the
    quick subset of the rest under ``GPUQUANT_TRITON_TUNE=quick`` (:func:`.common.tune_subset`;
    on sm_90 with a tile that runs two CTAs a multiprocessor, :func:`two_ctas_sm90`)."""
    m, n = named_args["M"], named_args["N"]
    keep = [c for c in configs if _fits(c, m, n)]
    return tune_subset(keep or configs[-1:], area=_tile_area,
                       programs=lambda c: _programs(c, m, n), min_programs=sm_count(),
                       also=two_ctas_sm90 if family == "sm90" else None)


def fit_k(configs, k: int) -> list:
    """The configs fitted to a short reduction (the 1x1 convolutions of a ResNet: K = 64 to
    256): BLOCK_K at most K rounded up to a power of two (>= 32: one int8 MMA step), so no
    K tile is half padding; and no more pipeline stages than K tiles + 1 (with one or two K
    tiles the extra stages' shared memory only lowers how many CTAs share a multiprocessor,
    the only overlap such a kernel has). Order kept, duplicates dropped."""
    out, seen = [], set()
    for c in configs:
        bk = min(c.kwargs["BLOCK_K"], max(32, _next_pow2(k)))
        ns = min(c.num_stages, max(2, cdiv(k, bk) + 1))
        if (bk, ns) != (c.kwargs["BLOCK_K"], c.num_stages):
            c = triton.Config({**c.kwargs, "BLOCK_K": bk}, num_warps=c.num_warps,
                              num_stages=ns)
        key = (_tile_key(c), c.kwargs.get("EPI_SPLIT", 1))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def with_light_tile(configs, named_args, kept, **kwargs):
    """``kept`` plus, under quick tuning of a residual-add epilogue (``HAS_RES``), the
    largest tile of ``configs`` holding at most 64 accumulators a thread that fits the
    problem, when none of ``kept`` is one.

    Why: read from ptxas (sm_90, Triton 3.6, the int8 requantizing output), the fused
    residual add's epilogue spills 0.3-11 KB a thread on the tiles quick tuning picks first
    (128x256 and 256x128 of 8 warps, whole or split epilogue; 128x128 of 4 warps) and
    none on 128x128 of 8 warps or 128x64 of 4 warps in its two fixed-arithmetic modes.
    On the H100 lease quick tuning gave the residual 1x1 convolutions of resnet50 batch 64
    16-row tiles, the smallest, the only spill-free tile it timed."""
    if not kwargs.get("HAS_RES") or tune_mode() != "quick":
        return kept
    if any(_acc_per_thread(c) <= 64 and _tile_area(c) >= 64 * 64 for c in kept):
        return kept
    m, n = named_args["M"], named_args["N"]
    light = sorted((c for c in configs if _acc_per_thread(c) <= 64 and _fits(c, m, n)),
                   key=_tile_area, reverse=True)
    if not light:
        return kept
    pick = next((c for c in light if _programs(c, m, n) >= sm_count()), light[-1])
    return kept + [pick]


# Programs a multiprocessor for a persistent config (PERSISTENT): its 4-warp light tiles
# hold 178 registers a thread (128x64, sm_90, Triton 3.6), so two CTAs fit the register file
PERSISTENT_CTAS = 2
# Reductions up to this long get a persistent twin: with a few K steps a tile, a program's
# epilogue and its successor's first copies are a large part of its time and the flattened
# loop overlaps them (resnet50's 1x1 convolutions: K = 64 ... 1024)
PERSISTENT_MAX_K = 1024


def gemm_grid(m: int, n: int):
    """The GEMM kernel's grid for a config: a program a tile, or for a persistent config at
    most PERSISTENT programs a multiprocessor, each looping over its tiles."""
    def grid(META):
        tiles = cdiv(m, META["BLOCK_M"]) * cdiv(n, META["BLOCK_N"])
        per_sm = META.get("PERSISTENT", 0)
        return (tiles if not per_sm else min(tiles, per_sm * sm_count()),)
    return grid


def with_persistent(kept, fitted, named_args):
    """``kept`` plus the persistent twin (``PERSISTENT``) of the largest 4-warp tile of
    ``fitted`` holding at most 64 accumulators a thread that fits the problem, when the
    reduction is short (<= PERSISTENT_MAX_K) and the problem has at least 2 tiles a
    program to loop over.

    Why: a 1x1 convolution of resnet50 at batch 64 (M = 200704, N = 64, K = 256: 1568
    tiles of 128x64 with two K steps each) ran at ~45% of the copy bandwidth on the H200
    with one program a tile: its requantizing epilogue (~1350 SASS instructions a thread,
    ~21 an output) and the next program's loads do not overlap within a multiprocessor.
    The flattened loop issues the next tile's copies before the epilogue (sm_90 PTX). Its
    light tiles take ~178 registers instead of ~128 (2 CTAs an SM instead of 3); the
    larger tiles spilled (128x128 of 4 warps: 150 STL). Which wins is the GPU's to say."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    if k > PERSISTENT_MAX_K:
        return kept
    light = sorted((c for c in fitted if c.num_warps == 4 and _acc_per_thread(c) <= 64
                    and c.kwargs.get("EPI_SPLIT", 1) == 1 and c.kwargs["BLOCK_M"] >= 64
                    and _fits(c, m, n)), key=_tile_area, reverse=True)
    if not light or _programs(light[0], m, n) < 2 * PERSISTENT_CTAS * sm_count():
        return kept
    return kept + [_with(light[0], PERSISTENT=PERSISTENT_CTAS)]


def prune_gemm_configs(configs, named_args, family=None, **kwargs):
    """:func:`fit_k` to the problem's K, then :func:`prune_configs` on the whole-tile
    epilogue configs, then, for the requantizing output modes (int8 / float out), the
    split-epilogue twin of each tile kept that has one: the autotuner times both.

    Why the twin: read from the sm_90 SASS (ptxas), a 128x256 tile of 8 warps holds 128
    accumulators a thread plus the per-column bias, multiplier and shift of its 64
    columns; its requantizing epilogue spilled 160 registers to local memory under Triton
    3.6 (143 under 3.9). Requantizing each column half in turn spills none under 3.6 (59
    under 3.9) and stores straight from the MMA layout, byte-wide: which is faster is the
    GPU's to say."""
    fitted = fit_k(configs, named_args["K"])
    whole = [c for c in fitted if c.kwargs.get("EPI_SPLIT", 1) == 1]
    kept = with_light_tile(whole, named_args, prune_configs(whole, named_args, family),
                           **kwargs)
    if kwargs.get("OUT_MODE") in (0, 1):
        twins = {_tile_key(c): c for c in fitted if c.kwargs.get("EPI_SPLIT", 1) == 2}
        kept = kept + [twins[_tile_key(c)] for c in kept if _tile_key(c) in twins]
    return with_persistent(kept, fitted, named_args)


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# The epilogue form and the tile loop the interpreter runs (it has no autotuner); the tests
# run both of each.
INTERPRET_EPI_SPLIT = 1
INTERPRET_PERSISTENT = 0

_TUNED = {}

# The epilogue's compile-time choices, in every int8 kernel's autotune key beside the shape
# (the tensors' dtypes are in it already). Without them a 1x1 convolution with a fused
# residual add reused the tile timed for the same shape without one: in resnet50, layer1's
# downsample (no residual) runs before its first block's last conv (the same M, N, K, with
# the residual), and that 256x128 tile of 8 warps, spill-free without the add, spills 303
# registers a thread with it (ptxas, sm_90, Triton 3.6); 128x128 of 4 warps spills 265 with
# the saturating left shift and 1 without.
EPILOGUE_KEY = ("HAS_RES", "RES_MODE", "RQ_MODE")


def _gemm_kernel(family: str):
    """The launchable kernel for a family: autotuned on the GPU, plain under the interpreter."""
    k = _TUNED.get(family)
    if k is None:
        heur = triton.heuristics({"EVEN_K": _even_k})(_qgemm_kernel)
        if family == "interpret":
            k = heur
        else:
            prune = functools.partial(prune_gemm_configs, family=family)
            k = triton.autotune(configs=gemm_configs(family),
                                key=["M", "N", "K", *EPILOGUE_KEY],
                                prune_configs_by={"early_config_prune": prune})(heur)
        _TUNED[family] = k
    return k


def interpret_meta(m: int = 0, n: int = 0, k: int = 0):
    """The interpreter's tile: 32 a side for small problems, up to 64 rows and 128 columns /
    reduction for larger ones (the interpreter's cost is per tile operation, not per
    element: a network's 512-channel layers run 16x fewer dots)."""
    bm, bn, bk, gm, nw, ns = INTERPRET_TILE

    def side(d, cap):
        return bm if d <= 32 else (64 if d < 128 else cap)
    return {"BLOCK_M": side(m, 64), "BLOCK_N": side(n, 128), "BLOCK_K": side(k, 128),
            "GROUP_M": gm}


# --------------------------------------------------------------------------- parameters
def _colsum_bias(w2d: torch.Tensor, bias, x_zp: int, shift: int) -> torch.Tensor:
    """(N,) = bias + (shift - x_zp) * sum_k w[n, k] (the folded zero point): int32 when every
    value fits (then the epilogue adds in int32), else int64."""
    b = torch.zeros(w2d.shape[0], dtype=torch.int64, device=w2d.device) if bias is None \
        else bias.to(device=w2d.device, dtype=torch.int64)
    if shift != x_zp:
        b = b + (shift - x_zp) * w2d.to(torch.int64).sum(dim=1)
    return _narrow_bias(b)


def _narrow_bias(b: torch.Tensor) -> torch.Tensor:
    if b.numel() == 0 or (int(b.min()) >= -2 ** 31 and int(b.max()) < 2 ** 31):
        return b.to(torch.int32).contiguous()
    return b.contiguous()


# The per-column epilogue tensors run this many columns past the last output channel (the
# widest BLOCK_N / BLOCK_C of the GEMM, conv and depthwise tiles), zeros: the kernels read a
# tile's columns without a mask
EPI_PAD = 256


def epilogue_tensors(w_src, w2d, bias, rq, x_zp: int, x_dtype, device, fold_zero_point=True,
                     foldable=True):
    """Device tensors of the epilogue and its requantization mode, memoised on (weight, bias,
    rq) identity and version: ``(bias, multiplier, rshift, rq_mode)``.

    ``rq_mode`` (the kernels' ``RQ_MODE``): :data:`RQ_FOLDED` where ``foldable`` (an int8
    or dequantized output: the bare int32 output needs the plain bias), every rshift is >=
    1 and :func:`_folded_fits` holds; then the three tensors are ``bias * multiplier +
    2^30`` (int64), the multiplier (int32) and ``rshift | 2^(rshift - 1) << 32`` (int64)
    (:func:`.fixed_point.requantize_folded`); :data:`RQ_FOLDED_RELU` for such a layer
    whose clamp starts at or above its zero point, with ``2^(rshift - 1) 2^31`` added to
    the first and ``rshift - 1`` (int64) as the third. Otherwise :data:`RQ_LSHIFT` or
    :data:`RQ_PLAIN` (no rshift negative) and bias (N,) int32 (int64 where a folded zero
    point makes it overflow), multiplier and rshift (N,) int32. Deciding reads the
    requantization's multipliers, shifts and the bias's bound on the host once (memoised),
    and checks the multipliers and shifts (ValueError outside make_requant's range).

    ``fold_zero_point`` False (depthwise kernel: it subtracts the zero point itself) keeps
    the plain bias. Each tensor holds :data:`EPI_PAD` zeros past its N columns.
    """
    n, k = w2d.shape
    shift = 128 if x_dtype == torch.uint8 else 0
    mult_t = None if rq is None else rq.multiplier
    rsh_t = None if rq is None else rq.rshift
    # (the ReLU test reads the Requant's ints, which two Requants sharing tensors may not
    # share: it is in the memo key)
    relu_clamp = rq is not None and rq.qmin >= rq.zero_point

    def make():
        if fold_zero_point:
            b = _colsum_bias(w2d, bias, x_zp, shift)
        else:
            b = torch.zeros(n, dtype=torch.int32, device=device) if bias is None \
                else bias.to(device=device, dtype=torch.int32).contiguous()
        if rq is None:
            z = torch.zeros(n, dtype=torch.int32, device=device)
            return b, z, z, RQ_PLAIN
        m = rq.multiplier.to(device=device, dtype=torch.int32).reshape(-1).expand(n).contiguous()
        s = rq.rshift.to(device=device, dtype=torch.int32).reshape(-1).expand(n).contiguous()
        # (checked again: a Requant made on the device, or edited in place, was not checked
        # where it was made)
        m_host, s_host = m.cpu(), s.cpu()
        Requant.check_values(m_host, s_host, "triton conv / linear epilogue")
        if foldable and n > 0:
            # |x - zp| <= 255 for the depthwise kernel's operand, |x'| <= 128 for the MMA's
            acc_max = k * (128 if fold_zero_point else 255) * 128 \
                + int(b.to(torch.int64).abs().max())
            if _folded_fits(m_host, s_host, acc_max):
                c0, rc = folded_tensors(b, m, s, relu_clamp)
                return c0, m, rc, (RQ_FOLDED_RELU if relu_clamp else RQ_FOLDED)
        return b, m, s, (RQ_LSHIFT if left_shift(rq) else RQ_PLAIN)

    def padded():
        *ts, mode = make()
        return (*(torch.nn.functional.pad(t, (0, EPI_PAD)) for t in ts), mode)

    return derived("epilogue", (w_src, bias, mult_t, rsh_t),
                   (x_zp, shift, fold_zero_point, foldable, relu_clamp, n, k, str(device)),
                   padded)


def folded_tensors(bias: torch.Tensor, mult: torch.Tensor, rshift: torch.Tensor, relu: bool):
    """The folded requantization's per-column ``(c0, rc)`` (int64) for an int32 / int64
    bias and int32 multipliers and rshifts >= 1 (:func:`.fixed_point.requantize_folded`):
    ``c0 = bias * m + 2^30`` and ``rc = rshift | 2^(rshift - 1) << 32``; for a ReLU clamp
    (``relu``: its SIGNED False) ``2^(rshift - 1) 2^31`` in ``c0`` and ``rc = rshift - 1``."""
    c0 = bias.to(torch.int64) * mult.to(torch.int64) + (1 << 30)
    s64 = rshift.to(torch.int64)
    c = (1 << s64) >> 1
    if relu:
        return (c0 + (c << 31)).contiguous(), (s64 - 1).contiguous()
    return c0.contiguous(), (s64 | (c << 32)).contiguous()


def _folded_fits(mult: torch.Tensor, rshift: torch.Tensor, acc_max: int) -> bool:
    """Whether the folded requantization is exact for these (CPU) multipliers and shifts
    and accumulators up to ``acc_max`` in magnitude: every rshift >= 1, and the rounding's
    ``|hi| + 2^(rshift - 1)`` below 2^31, where ``|hi| <= (acc_max m + 2^30) / 2^31``."""
    if mult.numel() == 0 or int(rshift.min()) < 1:
        return False
    m, r = mult.to(torch.int64), rshift.to(torch.int64)
    acc_max = min(acc_max, 2 ** 31)
    hi = (acc_max * m + (1 << 30)) >> 31
    return bool((hi + ((1 << r) >> 1) < 2 ** 31).all())


def epilogue_scalars(rq, add_params, device, deq_zero_point: int = 0) -> torch.Tensor:
    """The EPI int64 vector (see the ``_E_*`` indices), memoised by value. A plain conv /
    linear (no add) is keyed on the 4 ints that decide it, without building the vector."""
    if add_params is None and rq is not None:
        key = ("rq", int(rq.zero_point), int(rq.qmin), int(rq.qmax), int(deq_zero_point))
    else:
        key = _epi_values(rq, add_params, deq_zero_point)
    return derived("epi", (), (key, str(device)),
                   lambda: torch.tensor(_epi_values(rq, add_params, deq_zero_point),
                                        dtype=torch.int64, device=device))


def _epi_values(rq, add_params, deq_zero_point: int) -> tuple:
    vals = [0] * _E_LEN
    if rq is not None:
        vals[_E_ZP], vals[_E_QMIN], vals[_E_QMAX] = rq.zero_point, rq.qmin, rq.qmax
    if add_params is not None:
        p = add_params
        vals[_E_SHIFT] = 1 << p.left_shift
        vals[_E_AZP], vals[_E_AM], vals[_E_AS] = p.a_zero_point, p.a_multiplier, p.a_rshift
        vals[_E_BZP], vals[_E_BM], vals[_E_BS] = p.b_zero_point, p.b_multiplier, p.b_rshift
        om, ors = scalar_int(p.out.multiplier), scalar_int(p.out.rshift)
        vals[_E_OM], vals[_E_OS] = om, ors
        vals[_E_OZP], vals[_E_OQMIN], vals[_E_OQMAX] = p.out.zero_point, p.out.qmin, p.out.qmax
        mode = add_mode(p, ors)
        if mode != 0:  # the folded modes' constants (.fixed_point.fast_add_terms)
            ls = p.left_shift
            vals[_E_F_SH] = 31 - ls
            if mode != 2:  # the output's folded requantization (mode 2: the general one)
                c = round_constants(ors)[0]
                if mode >= 8:  # (.fixed_point.requantize_folded's SIGNED False)
                    vals[_E_FO_RC], vals[_E_FO_C0] = ors - 1, (1 << 30) + (c << 31)
                else:
                    vals[_E_FO_RC], vals[_E_FO_C0] = ors | (c << 32), 1 << 30
            for zp, m, r, (k, mi, ci, di, si), exact in (
                    (p.a_zero_point, p.a_multiplier, p.a_rshift,
                     (_E_FA_K, _E_FA_M, _E_FA_C, _E_FA_DM, _E_FA_S), mode % 8 == 3),
                    (p.b_zero_point, p.b_multiplier, p.b_rshift,
                     (_E_FB_K, _E_FB_M, _E_FB_C, _E_FB_DM, _E_FB_S), mode % 8 == 4)):
                if exact:  # (x - zp) 2^e as x * 2^e + (-zp 2^e)
                    e = ls - 1 - r
                    vals[mi], vals[k] = 1 << e, -zp << e
                else:
                    vals[k], vals[mi] = (1 << (30 - ls)) - zp * m, m
                    vals[ci], vals[di] = round_constants(r)
                    vals[si] = r
    vals[_E_DZP] = deq_zero_point
    return tuple(int(v) for v in vals)


def left_shift(rq) -> bool:
    """Whether an epilogue needs the saturating left shift: False only where the host knows
    no rshift is negative."""
    return rq is not None and rq.may_left_shift()


def residual_mode(add_params) -> int:
    """The arithmetic of an integer add with these params (:func:`.fixed_point.add_mode`)."""
    if add_params is None:
        return 0
    return add_mode(add_params, scalar_int(add_params.out.rshift))


def output_dtype(out_mode: int, rq, add_params):
    if out_mode == OUT_INT32:
        return torch.int32
    if out_mode == OUT_FLOAT:
        return torch.float32
    return (add_params.out if add_params is not None else rq).dtype.storage


# --------------------------------------------------------------------------- K alignment
def padded_k(k: int) -> int:
    """The reduction length the GEMM runs for ``k``: ``k`` itself when a multiple of 16, else
    rounded up to 16 (k < 1024) or 128 (larger k, where the padding is under 13%)."""
    if k % 16 == 0:
        return k
    step = 16 if k < 1024 else 128
    return -(-k // step) * step


def align_k(x2d: torch.Tensor, w2d: torch.Tensor, w_key: torch.Tensor):
    """``(x2d, w2d)`` with rows 16-byte aligned, zero-padded along K where they are not.

    The kernel's loads along K are contiguous, but the compiler knows a row's start is
    16-byte aligned only when the row stride is a multiple of 16 (Triton's specialization);
    otherwise every load is a single byte (a 4093-long K ran 10x slower than 4096 on an
    H200). Zero weight columns add nothing, whatever the padded activations hold, so the
    result is exact; the padded weight is memoised on ``w_key`` (the module's weight)."""
    k = x2d.shape[1]
    if x2d.stride(0) % 16 == 0 and w2d.stride(0) % 16 == 0 and k % 16 == 0:
        return x2d, w2d
    kp = padded_k(k)

    def aligned(t):  # a padded copy, or (K already a multiple of 16) a dense one
        return torch.nn.functional.pad(t, (0, kp - k)) if kp != k else t.contiguous()
    if kp != k or w2d.stride(0) % 16 != 0:
        w2d = derived("w_kpad", (w_key,), (kp, str(w2d.device)), lambda: aligned(w2d))
    if kp != k or x2d.stride(0) % 16 != 0:
        x2d = aligned(x2d)
    return x2d, w2d


# --------------------------------------------------------------------------- launcher
def qgemm(x2d: torch.Tensor, x_zp: int, w2d: torch.Tensor, bias, rq, *, w_src=None,
          out_mode: str = "quant", residual=None, add_params=None, deq_scale: float = 1.0,
          deq_zero_point: int = 0, out=None) -> torch.Tensor:
    """Launch the fused GEMM: ``x2d`` (M, K) int8/uint8, ``w2d`` (N, K) int8 -> (M, N).

    Internal launcher (inputs already validated by :mod:`gpuquant.functional`); ``w_src`` is
    the tensor whose identity keys the memoised epilogue tensors (the module's weight).
    ``residual`` (M, N) with ``add_params``: fused integer add after requantization.
    ``out_mode``: "quant", "float" (dequantized with ``deq_scale``/``deq_zero_point``) or
    "int32" (bare accumulator, ``rq`` may be None).
    """
    mode = _OUT_MODES[out_mode]
    m, k = x2d.shape
    n = w2d.shape[0]
    dev = x2d.device
    b, mult, rsh, rq_mode = epilogue_tensors(w2d if w_src is None else w_src, w2d, bias, rq,
                                             x_zp, x2d.dtype, dev,
                                             foldable=mode in (OUT_QUANT, OUT_FLOAT))
    epi = epilogue_scalars(rq, add_params, dev, deq_zero_point)
    if out is None:
        out = torch.empty((m, n), dtype=output_dtype(mode, rq, add_params), device=dev)
    if m == 0 or n == 0:
        return out
    has_res = residual is not None
    if has_res and residual.shape[1] > 1 and residual.stride(1) != 1:
        residual = residual.contiguous()  # the kernel reads rows with unit column stride
    res = residual if has_res else out
    x2d, w2d = align_k(x2d, w2d, w2d if w_src is None else w_src)
    k = x2d.shape[1]
    family = arch_family(dev)
    res_mode = residual_mode(add_params) if has_res else 0
    if gemm_sm90.applies(family, x2d, w2d):
        return gemm_sm90.qgemm_sm90(x2d, w2d, b, mult, rsh, epi, res, out, deq_scale, mode,
                                    has_res, res_mode, rq_mode)
    kern = _gemm_kernel(family)
    meta = {} if family != "interpret" else \
        {**interpret_meta(m, n, k), "EPI_SPLIT": INTERPRET_EPI_SPLIT,
         "PERSISTENT": INTERPRET_PERSISTENT}
    launch(kern, gemm_grid(m, n), x2d, w2d, b, mult, rsh, epi, res, out, m, n, k, x2d.stride(0),
           x2d.stride(1), w2d.stride(0), w2d.stride(1), out.stride(0), res.stride(0),
           float(deq_scale), X_UINT8=x2d.dtype == torch.uint8, OUT_MODE=mode, HAS_RES=has_res,
           RES_MODE=res_mode, RQ_MODE=rq_mode, **meta, **LAUNCH_OPTS)
    return out


# the sm_90 Gluon main loop calls this module's epilogues: imported once they exist
from . import gemm_sm90  # noqa: E402
