"""Triton kernels for dynamic (per-token) quantization of transformer Linears.

* ``_quantize_per_token_kernel``: one program a row; absmax, scale and the int8 row in one
  launch (the row is read once when it fits one block, K <= 16384; twice above);
* ``linear_dynamic``: the int8 tensor-core GEMM of :mod:`.gemm` (one GEMM kernel for the
  static and dynamic paths) in its ``"scaled"`` epilogue mode: int8 x int8 -> int32, then
  ``float(acc) * x_scale[m] * w_scale[n] + bias[n]`` written straight as bf16/fp16/fp32 (no
  int32 intermediate in memory);
* ``_linear_weight_only_kernel``: float activations times int8 weights converted to the
  activation dtype in registers, float32 accumulator, epilogue ``acc * w_scale[n] + bias[n]``
  (a float GEMM, so not part of the int8 kernel);
* ``_fake_quant_rows_kernel``: QAT for these modes (:mod:`gpuquant.nn.qat.linear_dynamic`):
  one program a row; the row's absmax scale, the fake quant and its straight-through bit
  mask in one launch (per-token activations, per-output-channel weights).

Numerics are those of :mod:`gpuquant.backends.reference_dynamic`, bit for bit for
``quantize_per_token`` and ``linear_dynamic``: divisions use ``tl.div_rn`` (IEEE; ``/`` is
``div.full.f32`` on the GPU), rounding half to even is :func:`~.common.rne` (``cvt.rni``
compiled), and every launch passes ``enable_fp_fusion=False`` so the epilogue's
``y * w_scale + bias`` rounds twice, as PyTorch does, instead of once in an FMA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..reference_dynamic import EPS
from .common import (LAUNCH_OPTS, arch_family, cdiv, last_to_finish, launch_tickets,
                     rne, sm_count, to_dtype, to_f32, tune_mode, tune_subset)
from .fake_quant import (_FLOATS, _fq_math, _pack_bits, auto_interpreter, mask_backward,
                         on_tensor_device, save_mask)
from .launch import launch
from .gemm import (OUT_SCALED, _config, _gemm_kernel, _with, align_k, gemm_grid,
                   grouped_tile, interpret_meta)
from . import gemm_sm90

__all__ = ["quantize_per_token", "linear_dynamic", "linear_weight_only", "fake_quant_rows",
           "OPS"]

_INF = tl.constexpr(float("inf"))
# no NaN module constant: Triton (3.6) checks that a kernel's globals are unchanged by
# comparing values, and NaN != NaN makes every launch after the first fail; the quiet NaN
# is bitcast from its bits inside the kernel instead
_QNAN_BITS = tl.constexpr(0x7FC00000)
_ONE_BLOCK_MAX_K = 16384


# --------------------------------------------------------------------------- per-token quantize
@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    K,
    # strides (rows; columns are contiguous)
    stride_xm, stride_qm,
    # scalars
    qmin, qmax, eps,
    # meta
    BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """x (M, K) float -> q (M, K) int8, scale (M,) float32; program ``m`` does row ``m``.
    A row holding NaN or Inf gets scale NaN and q = 0 (so a GEMM on it gives NaN)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        n_bad = tl.sum(tl.where(tl.abs(x) < _INF, 0, 1), axis=0)  # NaN compares false
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask = offs + k0 < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xk))
            bad += tl.where(tl.abs(xk) < _INF, 0, 1)
        absmax = tl.max(amax, axis=0)
        n_bad = tl.sum(bad, axis=0)
    row_ok = n_bad == 0
    scale = tl.maximum(tl.div_rn(absmax, qmax.to(tl.float32)), eps)
    inv = tl.div_rn(1.0, scale)
    nan = tl.full((), _QNAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    tl.store(scale_ptr + row, tl.where(row_ok, scale, nan))
    if ONE_BLOCK:
        v = x * inv
        r = rne(v)
        r = tl.minimum(tl.maximum(r, qmin.to(tl.float32)), qmax.to(tl.float32))
        r = tl.where(row_ok, r, 0.0)
        tl.store(q_row + offs, r.to(tl.int8), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = offs + k0 < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = xk * inv
            r = rne(v)
            r = tl.minimum(tl.maximum(r, qmin.to(tl.float32)), qmax.to(tl.float32))
            r = tl.where(row_ok, r, 0.0)
            tl.store(q_row + k0 + offs, r.to(tl.int8), mask=mask)


def _row_blocks(k: int, least: int = 1):
    """(one block?, BLOCK_K, num_warps) of a one-program-a-row kernel over ``k`` columns: the
    whole row in one block up to ``_ONE_BLOCK_MAX_K`` (at least ``least`` wide), with
    enough threads that a 16K row sits in registers (<= 64 floats a thread); else
    4096-wide chunks."""
    one_block = k <= _ONE_BLOCK_MAX_K
    block_k = max(least, triton.next_power_of_2(k)) if one_block else 4096
    return one_block, block_k, 4 if block_k <= 2048 else (8 if block_k <= 8192 else 16)


def quantize_per_token(x, qmin, qmax):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    one_block, block_k, num_warps = _row_blocks(k)
    launch(_quantize_per_token_kernel, (m,), x, q, scale, k, x.stride(0), q.stride(0), int(qmin),
           int(qmax), EPS, BLOCK_K=block_k, ONE_BLOCK=one_block, num_warps=num_warps,
           **LAUNCH_OPTS)
    return q, scale


# --------------------------------------------------------------------------- row fake quant
@triton.jit
def _fake_quant_rows_kernel(
    # pointers (y float32 (M, K) contiguous; mask: its bits in y's memory order)
    x_ptr, y_ptr, mask_ptr,
    # sizes and strides (x's columns are contiguous)
    K, stride_xm,
    # scalars (float32): the row scale's divisor, the quantized range, the scale's floor
    divisor, qmin, qmax, eps,
    # meta
    BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, SAVE_MASK: tl.constexpr,
):
    """Program ``m``: row ``m`` of x fake-quantized symmetrically with its own scale,
    ``max(max_k |x[m, k]| / divisor, eps)`` (a NaN anywhere in the row makes it NaN, as
    torch's ``amax`` does; an inf makes it inf, and the row's outputs NaN), then
    :func:`.fake_quant._fq_math` with zero point 0, ``inv = 1 / scale`` correctly rounded.
    The in-range bits go to ``mask`` in y's memory order (``K % 8 == 0``: a row's bits are
    whole bytes, no byte shared)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * K
    m_row = mask_ptr + row * (K // 8)
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        mask = offs < K
        x = to_f32(tl.load(x_row + offs, mask=mask, other=0.0))
        amax = tl.max(tl.abs(x), axis=0)
        n_nan = tl.sum(tl.where(x != x, 1, 0), axis=0)  # (the GPU's max drops NaN)
    else:
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        nans = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            xk = to_f32(tl.load(x_row + k0 + offs, mask=offs + k0 < K, other=0.0))
            acc = tl.maximum(acc, tl.abs(xk))
            nans += tl.where(xk != xk, 1, 0)
        amax = tl.max(acc, axis=0)
        n_nan = tl.sum(nans, axis=0)
    nan = tl.full((), _QNAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    amax = tl.where(n_nan > 0, nan, amax)
    scale = tl.maximum(tl.div_rn(amax, divisor), eps, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.div_rn(1.0, scale)
    # an infinite scale (an inf in the row): inv 0, and the definition's every output is NaN
    # (0 * inf, or clamp(rne(inf * 0)) = NaN at the infinities, which the clamp below, as
    # the GPU's max / min, would turn into qmin)
    finite = scale < _INF
    if ONE_BLOCK:
        y, inr = _fq_math(x, inv, scale, 0.0, qmin, qmax)
        y = tl.where(finite, y, nan)
        tl.store(y_row + offs, y, mask=mask)
        if SAVE_MASK:
            bits = _pack_bits(tl.reshape(inr & mask, (BLOCK_K // 8, 8)))
            boffs = tl.arange(0, BLOCK_K // 8)
            tl.store(m_row + boffs, bits, mask=boffs < K // 8)
    else:
        for k0 in range(0, K, BLOCK_K):
            mk = offs + k0 < K
            xk = to_f32(tl.load(x_row + k0 + offs, mask=mk, other=0.0))
            y, inr = _fq_math(xk, inv, scale, 0.0, qmin, qmax)
            y = tl.where(finite, y, nan)
            tl.store(y_row + k0 + offs, y, mask=mk)
            if SAVE_MASK:
                bits = _pack_bits(tl.reshape(inr & mk, (BLOCK_K // 8, 8)))
                boffs = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                tl.store(m_row + boffs, bits, mask=boffs < K // 8)


def fake_quant_rows_forward(x, divisor: float, qmin: float, qmax: float, eps: float,
                            save_mask: bool):
    """Launch :func:`_fake_quant_rows_kernel` on a (M, K) float ``x`` with contiguous columns
    and ``K % 8 == 0``: (y float32 (M, K) contiguous, the bit mask or None)."""
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.float32, device=x.device)
    mask = torch.empty((m * k // 8) if save_mask else 1, dtype=torch.uint8, device=x.device)
    if m == 0:
        return y, (mask if save_mask else None)
    one_block, block_k, num_warps = _row_blocks(k, least=8)  # (whole mask bytes)
    launch(_fake_quant_rows_kernel, (m,), x, y, mask, k, x.stride(0), float(divisor),
           float(qmin), float(qmax), float(eps), BLOCK_K=block_k, ONE_BLOCK=one_block,
           SAVE_MASK=save_mask, num_warps=num_warps, **LAUNCH_OPTS)
    return y, (mask if save_mask else None)


class _FakeQuantRows(torch.autograd.Function):
    """Forward: one launch (row scales, fake quant, bit mask); backward: the fake quant's
    mask kernel, the gradient then cast to x's dtype (the definition's ``.to(float32)``
    backward)."""

    @staticmethod
    def forward(ctx, x, divisor, qmin, qmax, eps):
        need = ctx.needs_input_grad[0]
        y, mask = fake_quant_rows_forward(x, divisor, qmin, qmax, eps, need)
        if need:
            save_mask(ctx, y, mask)
            ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gx = mask_backward(ctx, grad)
        return (gx if gx.dtype == ctx.x_dtype else gx.to(ctx.x_dtype)), None, None, None, None


def fake_quant_rows(x: torch.Tensor, divisor: float, qmin: int, qmax: int, eps: float):
    """Op ``fake_quant_rows``: each row of a 2-d float tensor fake-quantized symmetrically in
    float32 with the scale ``max(max|row| / divisor, eps)``, straight-through gradient: what
    :func:`gpuquant.nn.qat.linear_dynamic.fake_quant_per_token` (divisor qmax) and the
    per-output-channel weight fake quant (divisor ``(qmax - qmin) / 2``) compute from torch
    ops and :func:`gpuquant.functional.fake_quant`, bit for bit, in one pass of one launch
    instead of a cast, ``abs``, ``amax``, the scale's ops and the fake quant's own launch.
    None (the caller composes the definition) for what it does not take: a CPU tensor
    without ``use("triton")``, columns not contiguous, ``K % 8 != 0`` (a row's mask bits
    would share a byte with the next row's), an empty tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        return None
    if auto_interpreter(x) or x.numel() == 0 or x.shape[1] % 8 or x.stride(1) != 1:
        return None
    return _FakeQuantRows.apply(x, float(divisor), float(qmin), float(qmax), float(eps))


# --------------------------------------------------------------------------- W8A8 GEMM
def linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype):
    """The int8 GEMM of :mod:`.gemm` (shared with the static quantized Linear / conv) in its
    ``"scaled"`` epilogue mode: ``float(acc) * x_scale[m] * w_scale[n] + bias[n]`` stored
    straight as ``out_dtype`` (no int32 intermediate in memory)."""
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    xq, wq = align_k(xq, wq, wq)  # unaligned K: zero-padded (exact), see gemm.align_k
    k = xq.shape[1]
    family = arch_family(xq.device)
    has_bias = bias is not None
    if gemm_sm90.applies(family, xq, wq):  # (the same epilogue after an async main loop)
        return gemm_sm90.qgemm_sm90(xq, wq, x_scale, w_scale, x_scale, x_scale,
                                    bias if has_bias else out, out, 1.0, OUT_SCALED, has_bias,
                                    0, 0)
    kern = _gemm_kernel(family)
    meta = interpret_meta() if family == "interpret" else {}
    # _qgemm_kernel(X, W, BIAS, MULT, RSHIFT, EPI, RES, Y, ...): in the scaled mode MULT holds
    # the column (weight) scales, RSHIFT the row (token) scales, RES the float bias
    # (HAS_RES); BIAS and EPI are not read (any pointer will do)
    launch(kern, gemm_grid(m, n), xq, wq, x_scale, w_scale, x_scale, x_scale,
           bias if has_bias else out, out, m, n, k, xq.stride(0), xq.stride(1), wq.stride(0),
           wq.stride(1), out.stride(0), 0, 1.0,
           X_UINT8=False, OUT_MODE=OUT_SCALED, HAS_RES=has_bias, **meta, **LAUNCH_OPTS)
    return out


# --------------------------------------------------------------------------- weight-only GEMM
@triton.jit
def _linear_weight_only_kernel(
    # pointers (ws: float32 (SPLIT_K, M, N) partial sums and tick: int32 a tile, zero
    # between launches, used when SPLIT_K > 1)
    a_ptr, b_ptr, c_ptr, b_scale_ptr, bias_ptr, ws_ptr, tick_ptr,
    # sizes
    M, N, K, SPLIT_K,
    # strides: a (M, K), b = W (N, K) read as W^T, c (M, N)
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    # meta
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, GEMV: tl.constexpr = False,
    W_A: tl.constexpr = False,
):
    """c = (a @ b^T) * b_scale[n] (+ bias[n]): a float16/bfloat16/float32 (M, K), b int8
    (N, K) converted to a's dtype in registers (exact), float32 accumulator, c a's dtype.

    ``GEMV`` (configs with ``BLOCK_M`` 1, tried for one-row decode): no tensor cores; each
    program streams a (BLOCK_N, BLOCK_K) tile of W along K (its contiguous axis: 16-byte
    loads) and keeps ``w * a`` element-wise in float32, summed along K once at the end.
    With 16-bit activations the products are exact (int8 times a 16-bit float fits
    float32's mantissa), so an FMA accumulates each (the same rounding as a multiply and an
    add) and the int8 is converted by integer ops (:func:`_int8_to_f32`): ~4.5 full-rate
    SASS instructions an element, where ``I2F`` alone ran at 16 a cycle a multiprocessor (a
    quarter of the float rate: ~4 us of a 4096^2 layer on an H200, the likely reason these
    configs lost the tuning to the tensor-core tiles).

    ``W_A`` (prefill tiles): the tile is computed transposed, ``W @ a^T``, so the converted
    weight is the MMA's first operand. On sm_90 ``wgmma`` takes that operand from registers,
    where the converted second operand of ``a @ W^T`` has to be stored back to shared memory
    (a store, a proxy fence and a barrier every K step) and waited for with
    ``wgmma.wait_group 0``; transposed, the converted tile never leaves the registers and one
    ``wgmma`` group stays in flight (``wait_group 1``). The accumulator is transposed back
    once, for the epilogue.

    Split K (decode: few rows, so few column tiles to stream the weight with): program
    ``(tile, s)`` sums K block range ``s`` of ``SPLIT_K`` and stores the float32 partial in
    ``ws[s]``; the tile's last program to finish (a per-tile ticket, taken after a barrier
    and reset by that program) adds the partials in order s = 0, 1, ... (deterministic)
    and applies the epilogue: one launch. ``EVEN_K``: every split's range is whole
    BLOCK_Ks."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M / columns past N wrap around (loads stay in bounds); the store masks them
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    if GEMV:  # BLOCK_M 1: the program's row is pid_m
        acc = _gemv_tile(a_ptr + pid_m.to(tl.int64) * stride_am, b_ptr, offs_bn, k_lo, k_hi,
                         stride_ak, stride_bn, stride_bk, BLOCK_N, BLOCK_K)
    else:
        acc = _dot_tile(a_ptr, b_ptr, offs_am, offs_bn, k_lo, k_hi, stride_am, stride_ak,
                        stride_bn, stride_bk, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_A)
        if W_A:
            acc = tl.trans(acc)

    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT_K > 1:  # the partial sum; the tile's last program reduces and finishes
        mask = mask_m[:, None] & mask_n[None, :]
        idx = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + idx, acc, mask=mask)
        if last_to_finish(tick_ptr + tl.program_id(0), SPLIT_K):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # written by other multiprocessors: past L1
                acc += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0,
                               cache_modifier=".cg")
            _weight_only_epilogue(acc, offs_m, offs_n, mask_m, mask_n, c_ptr, b_scale_ptr,
                                  bias_ptr, stride_cm, stride_cn, HAS_BIAS)
    else:
        _weight_only_epilogue(acc, offs_m, offs_n, mask_m, mask_n, c_ptr, b_scale_ptr,
                              bias_ptr, stride_cm, stride_cn, HAS_BIAS)


@triton.jit
def _dot_tile(a_ptr, b_ptr, offs_am, offs_bn, k_lo, k_hi, stride_am, stride_ak, stride_bn,
              stride_bk, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, W_A: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32: a[rows, k_lo:k_hi] @ W[cols, k_lo:k_hi]^T on tensor
    cores (W converted to a's dtype in registers). ``W_A``: the transposed tile,
    (BLOCK_N, BLOCK_M) = W @ a^T, the converted W the MMA's first operand."""
    offs_k = tl.arange(0, BLOCK_K)
    if W_A:  # a^T (BLOCK_K, BLOCK_M), W (BLOCK_N, BLOCK_K)
        a_k = offs_k[:, None]
        b_k = offs_k[None, :]
        a_ptrs = a_ptr + offs_am[None, :] * stride_am + (k_lo + a_k) * stride_ak
        b_ptrs = b_ptr + offs_bn[:, None] * stride_bn + (k_lo + b_k) * stride_bk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # a (BLOCK_M, BLOCK_K), W^T (BLOCK_K, BLOCK_N)
        a_k = offs_k[None, :]
        b_k = offs_k[:, None]
        a_ptrs = a_ptr + offs_am[:, None] * stride_am + (k_lo + a_k) * stride_ak
        b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + (k_lo + b_k) * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = k_hi - k_lo - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=a_k < k_left, other=0)
            b = tl.load(b_ptrs, mask=b_k < k_left, other=0)
        # float32 activations, or the interpreter (it has no bfloat16 dot): an IEEE float32 dot
        prec: tl.constexpr = "ieee" if DOT_F32 else None
        if DOT_F32:
            a = a.to(tl.float32)
        w = b.to(a.dtype)
        if W_A:
            acc = tl.dot(w, a, acc, input_precision=prec)
        else:
            acc = tl.dot(a, w, acc, input_precision=prec)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _int8_to_f32(w):
    """int8 -> float32 exactly without ``I2F`` (a quarter-rate instruction on sm_80 / sm_90:
    16 a cycle a multiprocessor): the byte's offset-binary form ``w + 128`` (its bits with
    the top one flipped) as the low mantissa bits of 2^23, minus 2^23 + 128."""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32)
    return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _gemv_tile(a_row_ptr, b_ptr, offs_bn, k_lo, k_hi, stride_ak, stride_bn, stride_bk,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(1, BLOCK_N) float32: one row of a times W[cols, k_lo:k_hi]^T on the CUDA cores.
    Triton pipelines no plain load, so the loop loads K block ``kb + 1`` into registers
    before it computes block ``kb`` (two blocks of W in flight a thread, not one); masked
    by the K left, whole blocks or not (16-byte loads all the same)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = a_row_ptr + (k_lo + offs_k) * stride_ak
    w_ptrs = b_ptr + offs_bn[:, None] * stride_bn + (k_lo + offs_k)[None, :] * stride_bk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    n_k = tl.cdiv(k_hi - k_lo, BLOCK_K)
    x_next = tl.load(x_ptrs, mask=offs_k < k_hi - k_lo, other=0)
    w_next = tl.load(w_ptrs, mask=offs_k[None, :] < k_hi - k_lo, other=0)
    for kb in range(0, n_k):
        x = x_next
        w = w_next
        x_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_bk
        k_left = k_hi - k_lo - (kb + 1) * BLOCK_K  # <= 0 after the last block: no load
        x_next = tl.load(x_ptrs, mask=offs_k < k_left, other=0)
        w_next = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0)
        if x.dtype == tl.float32:  # products rounded: multiply, then add (no FMA)
            acc += w.to(tl.float32) * x[None, :]
        else:  # int8 x a 16-bit float is exact in float32: an FMA rounds as mul + add do
            acc = tl.fma(_int8_to_f32(w), x.to(tl.float32)[None, :], acc)
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _weight_only_epilogue(acc, offs_m, offs_n, mask_m, mask_n, c_ptr, b_scale_ptr, bias_ptr,
                          stride_cm, stride_cn, HAS_BIAS: tl.constexpr):
    """c[m, n] = acc * b_scale[n] (+ bias[n]) rounded once to c's dtype."""
    w_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        y = y + bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    out = to_dtype(y, c_ptr.dtype.element_ty)
    tl.store(c_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Autotuned per (M, N, K) on the
# GPU: decode (M <= 16) is memory-bound on W, so narrow N tiles give many programs streaming
# it (and K is split, see weight_only_split_k); prefill uses tensor-core tiles like the int8
# GEMM's (bf16 A: BLOCK_K 64 is 128-byte rows). Decode's deep pipelines (6 and 8 stages of a
# 16x64x128 tile, 72 / 96 KB of shared memory: 3 / 2 programs a multiprocessor) keep 40-56
# KB of W in flight a program where 4 stages keep 24: a decode step moves only ~120 KB a
# multiprocessor (4096^2 on 132), so what is in flight at once sets its time, not the
# bandwidth (bench/README.md NOTES).
_WO_TILES = [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 128, 1, 4, 6),
             (16, 64, 128, 1, 4, 8), (16, 64, 256, 1, 4, 3),
             (16, 128, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4),
             (64, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 3),
             (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3)]
# one-row decode also tries the CUDA-core form (GEMV, BLOCK_M 1; num_stages unused: no dot)
_WO_GEMV_TILES = [(1, 32, 256, 1, 4, 1), (1, 64, 256, 1, 8, 1), (1, 32, 512, 1, 8, 1)]
# prefill also tries the transposed form (W_A: the converted weight is the MMA's register
# operand). BLOCK_N is then wgmma's M: 64 rows a warpgroup. Compiled for sm_90 (Triton 3.6
# and 3.9), 256x128x64 on 8 warps issues ~250-300 SASS instructions a warp a K step for four
# m64n256k16 wgmma (~1000 tensor-core cycles), with a wgmma group in flight; the
# untransposed tile is ~190 but waits for its wgmma (wait_group 0) after converting W and
# storing it to shared memory, every K step. Largest first: quick tuning keeps the first.
_WO_W_A_TILES = [(256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
                 (64, 128, 64, 8, 4, 4)]
_WO_INTERPRET_TILE = (16, 32, 32, 4, 4, 1)  # one small tile: every tile is numpy work there
_SPLIT_MIN_K = 512  # no split leaves a program fewer K values than this


def weight_only_split_k(m: int, n: int, k: int, sms: int) -> int:
    """How many K ranges a weight-only GEMM is split into: 1 beyond 16 rows (prefill has
    tiles enough); else about 2 programs a multiprocessor with 64-wide column tiles
    (``2 * sms / tiles`` rounded to the nearest power of two: a 4096-wide layer has 64
    such tiles for 132 multiprocessors, split 4; an 11008-wide one 172, split 2), at most
    ``k // 512``. The partial sums cost ``split * m * n * 4`` bytes of workspace, written
    and read back through L2 by each tile's last program.

    Measured on an H100 (bench/README.md NOTES, "H100 lease"): at m = 1, n = k = 4096 split
    4 took 15.4 us against 16.0 (8, the former rule's 4 programs a multiprocessor) and 18.2
    (16); at n = 4096, k = 11008, 4 beat 8 on three of the four tiles."""
    if m > 16 or k < 2 * _SPLIT_MIN_K:
        return 1
    tiles = max(1, -(-n // 64))
    want = 2 * sms / tiles
    cap = max(1, k // _SPLIT_MIN_K)
    split = 1
    while split * 2 <= cap and split * 2 <= want * 2 ** 0.5:  # nearest power of two (log2)
        split *= 2
    return split


def weight_only_forms() -> list:
    """(tile, w_a) of every weight-only config the autotuner may pick, in its order: the
    plain tensor-core tiles, the one-row GEMV ones, the transposed (``W_A``) ones (also the
    forced configs the GPU test and probe run: :mod:`gpuquant.bench.warm`)."""
    return [(t, False) for t in _WO_TILES + _WO_GEMV_TILES] + \
        [(t, True) for t in _WO_W_A_TILES]


def _wo_config(t, w_a: bool = False):
    """An autotune config of a weight-only tile tuple (GEMV when ``BLOCK_M`` is 1; ``w_a``:
    the transposed tensor-core form)."""
    return _with(_config(t), GEMV=t[0] == 1, W_A=w_a)


def _wo_prune(configs, named_args, **kwargs):
    """No row tile far taller than M (decode never needs 128 rows); the GEMV form for one
    row only. Quick tuning keeps a GEMV config for one row and, for decode, a deep
    pipeline; the transposed (``W_A``) tiles are added to its picks (the largest that fits),
    never in place of a plain one."""
    m = named_args["M"]
    cap = max(16, triton.next_power_of_2(m))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and (m == 1 or
                                                                 not c.kwargs["GEMV"])]
    w_a = [c for c in keep if c.kwargs["W_A"]]
    kinds = (lambda c: c.kwargs["GEMV"],)
    if m <= 16:
        kinds += (lambda c: c.num_stages >= 6,)
    plain = tune_subset([c for c in keep if not c.kwargs["W_A"]] or configs[:1],
                        area=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], also=kinds)
    return plain + (w_a if tune_mode() == "full" else w_a[:1])


def _wo_even_k(a) -> bool:
    return a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0


_WO_KERNELS = {}
_WO_SPLITS: dict = {}  # (m, n, k, device) -> split: asked on every decode step


def _weight_only_kernel(interpret: bool):
    k = _WO_KERNELS.get(interpret)
    if k is None:
        heur = triton.heuristics({"EVEN_K": _wo_even_k})(_linear_weight_only_kernel)
        k = heur if interpret else triton.autotune(
            configs=[_wo_config(t, w_a) for t, w_a in weight_only_forms()],
            key=["M", "N", "K", "SPLIT_K", "HAS_BIAS"],  # the epilogue, as gemm.EPILOGUE_KEY
            prune_configs_by={"early_config_prune": _wo_prune})(heur)
        _WO_KERNELS[interpret] = k
    return k


def linear_weight_only(x, wq, w_scale, bias, split_k=None, tile=None, w_a=False):
    """The weight-only GEMM launcher; ``split_k`` overrides :func:`weight_only_split_k`,
    ``tile`` (one ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` tuple) the
    autotuner's choice (tests and tuning probes), ``w_a`` with it: that tile in the
    transposed form (``W_A``)."""
    m, k = x.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    interpret = arch_family(x.device) == "interpret"
    if split_k is None:
        key = (m, n, k, x.device)
        split = _WO_SPLITS.get(key)
        if split is None:
            if len(_WO_SPLITS) > 4096:
                _WO_SPLITS.clear()
            split = _WO_SPLITS[key] = weight_only_split_k(m, n, k, sm_count())
    else:
        split = int(split_k)
    if tile is not None and (len(tile) != 6 or tile[1] < 32 or not (
            tile[0] >= 16 or (tile[0] == 1 and m == 1))):
        raise ValueError(f"linear_weight_only: tile must be (BLOCK_M >= 16, or 1 for one "
                         f"row; BLOCK_N >= 32, BLOCK_K, GROUP_M, num_warps, num_stages), got "
                         f"{tile!r} for {m} row(s)")
    if w_a and (tile is None or tile[0] < 16):
        raise ValueError(f"linear_weight_only: w_a=True needs a tensor-core tile (BLOCK_M >= "
                         f"16), got tile={tile!r}")
    meta = {}
    if interpret or tile is not None:
        bm, bn, bk, gm, nw, ns = _WO_INTERPRET_TILE if tile is None else tile
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "GEMV": bm == 1,
                "W_A": bool(w_a)}
        if not interpret:
            meta.update(num_warps=nw, num_stages=ns)
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        # a ticket per output tile of the smallest tile any config uses
        tick = launch_tickets(cdiv(m, 16) * cdiv(n, 32), x.device)
    else:  # not read: any float32 pointer (the same specialization as a workspace)
        ws = tick = w_scale

    def grid(cfg):
        return (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), split)

    has_bias = bias is not None
    launch(_weight_only_kernel(interpret or tile is not None), grid, x, wq, out, w_scale,
           bias if has_bias else w_scale, ws, tick, m, n, k, split, x.stride(0), x.stride(1),
           wq.stride(0), wq.stride(1), out.stride(0), out.stride(1), HAS_BIAS=has_bias,
           DOT_F32=x.dtype == torch.float32 or interpret, **meta,
           **LAUNCH_OPTS)
    return out


OPS = {  # each on its input's GPU (a model on cuda:1 while cuda:0 is current)
    "quantize_per_token": on_tensor_device(quantize_per_token),
    "linear_dynamic": on_tensor_device(linear_dynamic),
    "linear_weight_only": on_tensor_device(linear_weight_only),
    "fake_quant_rows": on_tensor_device(fake_quant_rows),
}
