"""Fixed-point requantization inside Triton kernels (contract section 1, TFLite semantics).

These ``@triton.jit`` helpers are inlined into the GEMM / conv epilogues and the elementwise
kernels. They compute in int64 exactly what :func:`gpuquant.backends.reference.requantize`
computes: an optional saturating left shift, ``SaturatingRoundingDoublingHighMul`` (nudge by
+-2^30, division by 2^31 truncating toward zero) and ``RoundingDivideByPOT`` (round half away
from zero). Every operand is an integer tensor (or scalar) that broadcasts against ``x``;
nothing here touches floating point, so FMA contraction cannot change a result.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["multiply_by_quantized_multiplier", "requantize_values", "add_values",
           "requantize_i32", "mbqm_i32", "add_values_fast", "add_epi", "add_mode"]


@triton.jit
def multiply_by_quantized_multiplier(x, multiplier, rshift):
    """``x * multiplier * 2^-31 * 2^-rshift`` rounded as TFLite's MultiplyByQuantizedMultiplier.

    ``x``: integer tensor (any width; values as int64), ``multiplier`` int32 in [2^30, 2^31)
    or 0, ``rshift`` int32 (negative = left shift). Returns int64.
    """
    x = x.to(tl.int64)
    m = multiplier.to(tl.int64)
    s = rshift.to(tl.int64)
    left = tl.maximum(-s, 0)
    right = tl.maximum(s, 0)
    # saturating left shift (multiplier >= 1 is carried as a negative rshift)
    x = x << left
    x = tl.minimum(tl.maximum(x, -2147483648), 2147483647)
    # SaturatingRoundingDoublingHighMul: |x * m| < 2^62, exact in int64
    ab = x * m
    t = ab + tl.where(ab >= 0, 1073741824, -1073741823)
    hi = tl.where(t >= 0, t >> 31, -((-t) >> 31))
    hi = tl.where((x == -2147483648) & (m == -2147483648), 2147483647, hi)
    # RoundingDivideByPOT: round half away from zero
    mask = ((right * 0 + 1) << right) - 1
    remainder = hi & mask
    threshold = (mask >> 1) + (hi < 0).to(tl.int64)
    return (hi >> right) + (remainder > threshold).to(tl.int64)


@triton.jit
def requantize_values(acc, multiplier, rshift, zero_point, qmin, qmax):
    """``clamp(zero_point + mbqm(acc, multiplier, rshift), qmin, qmax)`` as int64."""
    y = multiply_by_quantized_multiplier(acc, multiplier, rshift) + zero_point
    return tl.minimum(tl.maximum(y, qmin), qmax)


@triton.jit
def add_values(a, b, shift_factor, a_zp, a_mult, a_rshift, b_zp, b_mult, b_rshift,
               o_mult, o_rshift, o_zp, o_qmin, o_qmax):
    """TFLite reference integer add of two quantized tensors (``AddParams``), as int64.

    ``shift_factor`` is ``2^left_shift``; the sum of the rescaled inputs is requantized with
    the output's (per-tensor) multiplier and clamped to ``[o_qmin, o_qmax]``.
    """
    va = (a.to(tl.int64) - a_zp) * shift_factor
    vb = (b.to(tl.int64) - b_zp) * shift_factor
    total = (multiply_by_quantized_multiplier(va, a_mult, a_rshift)
             + multiply_by_quantized_multiplier(vb, b_mult, b_rshift))
    return requantize_values(total, o_mult, o_rshift, o_zp, o_qmin, o_qmax)


@triton.jit
def requantize_i32(v, multiplier, rshift, zero_point, qmin, qmax, HAS_LSHIFT: tl.constexpr,
                   SAT: tl.constexpr = True):
    """:func:`requantize_values` for an int32 accumulator tile, in 32-bit arithmetic except
    one widening multiply (the GEMM / conv epilogue's fast form; same results).

    ``v`` int32 (BM, BN); ``multiplier``, ``rshift`` int32 per column (1, BN);
    ``HAS_LSHIFT``: some ``rshift`` < 0 (else the saturating left shift is skipped);
    ``SAT`` False: the caller knows ``v`` (after any left shift) is never -2^31, the one
    input whose doubling high multiply saturates (with a multiplier of -2^31), so the
    test and select an element are left out (same results).

    SaturatingRoundingDoublingHighMul is ``(x * m + 2^30) >> 31`` (arithmetic shift): for
    ``ab = x * m >= 0`` that is gemmlowp's ``(ab + 2^30) / 2^31``; for ``ab < 0`` gemmlowp
    computes ``trunc((ab + 1 - 2^30) / 2^31)`` = ``ceil(...)`` = ``floor((ab + 2^30) / 2^31)``,
    the same expression. ``x * m`` of two int32 is one ``mul.wide.s32``.
    """
    y = mbqm_i32(v, multiplier, rshift, HAS_LSHIFT, SAT)
    # clamp before adding the zero point: no int32 overflow for any y. The bounds are
    # scalars (or a column row): taken in 64 bits and cut to int32, so an int32 output
    # range with a zero point (qmax - zp > 2^31 - 1) does not wrap
    zp64 = zero_point.to(tl.int64)
    lo = tl.maximum(qmin.to(tl.int64) - zp64, -2147483648).to(tl.int32)
    hi = tl.minimum(qmax.to(tl.int64) - zp64, 2147483647).to(tl.int32)
    y = tl.minimum(tl.maximum(y, lo), hi)
    return y + zero_point


@triton.jit
def mbqm_i32(v, multiplier, rshift, HAS_LSHIFT: tl.constexpr, SAT: tl.constexpr = True,
             SMALL: tl.constexpr = False):
    """MultiplyByQuantizedMultiplier of int32 ``v`` in 32-bit arithmetic (see
    :func:`requantize_i32`, also for ``SAT``); int32 result.

    ``SMALL``: the caller knows |v| < 2^30 (and no left shift). Then the high product is
    below 2^30 too (a multiplier's magnitude is at most 2^31), no saturation applies, and
    the rounding division by 2^right (half away from zero) is one add and a shift:
    ``(hi + (2^right - 1) / 2 + (hi >= 0 and right > 0)) >> right``, which stays below
    2^31. For ``hi = q 2^right + rem`` both forms add 1 to ``q`` exactly when ``rem >=
    2^(right - 1) + (hi < 0)``."""
    if HAS_LSHIFT:
        left = tl.maximum(-rshift, 0).to(tl.int64)
        x = tl.minimum(tl.maximum(v.to(tl.int64) << left, -2147483648), 2147483647)
        x = x.to(tl.int32)
    else:
        x = v
    ab = x.to(tl.int64) * multiplier.to(tl.int64)
    hi = ((ab + 1073741824) >> 31).to(tl.int32)
    if SAT and not SMALL:
        hi = tl.where((x == -2147483648) & (multiplier == -2147483648), 2147483647, hi)
    # RoundingDivideByPOT (half away from zero); the mask per column, in int64 for rshift 31
    right = tl.maximum(rshift, 0)
    mask = ((right.to(tl.int64) * 0 + 1) << right.to(tl.int64)) - 1
    mask = mask.to(tl.int32)
    if SMALL:
        return (hi + (mask >> 1) + ((hi >= 0) & (right > 0)).to(tl.int32)) >> right
    remainder = hi & mask
    threshold = (mask >> 1) + (hi < 0).to(tl.int32)
    return (hi >> right) + (remainder > threshold).to(tl.int32)


@triton.jit
def add_values_fast(a, b, shift_factor, a_zp, a_mult, a_rshift, b_zp, b_mult, b_rshift,
                    o_mult, o_rshift, o_zp, o_qmin, o_qmax, MODE: tl.constexpr):
    """:func:`add_values` with a choice of arithmetic (same results).

    ``MODE`` 0: int64 (any AddParams); 1: int32, valid when the inputs are 8-bit,
    ``shift_factor <= 2^20``, 8-bit zero points and both input rshifts >= 0 (what
    ``make_add_params`` gives: left shift 20, input multipliers <= 1/2), so ``(x - zp) *
    2^20`` stays below 2^29 and the sum of the rescaled inputs below 2^30; 2: as 1 with
    the output's saturating left shift (output rshift < 0). The host picks the mode
    (:func:`add_mode`).
    """
    if MODE == 0:
        y = add_values(a, b, shift_factor, a_zp, a_mult, a_rshift, b_zp, b_mult, b_rshift,
                       o_mult, o_rshift, o_zp, o_qmin, o_qmax)
    else:
        # |va|, |vb| <= 383 * 2^20 < 2^29 (8-bit values less 8-bit zero points, shifted by
        # at most 20: add_mode): the short forms (SMALL); a term's magnitude is at most its
        # input's, so |total| < 2^30: never -2^31 (SAT False); only the output's left
        # shift (MODE 2) can make one. (The fused residual epilogues are the int8
        # resnet50's costliest kernels on an H200; with these, add_epi's 32-bit loads and
        # the requantization's own saturation test gone, the 128x128 GEMM tile's epilogue
        # went from 80 to 63.5 SASS instructions an output, sm_90, Triton 3.6, against
        # 25.6 without the add.)
        sf = shift_factor.to(tl.int32)
        va = (a.to(tl.int32) - a_zp.to(tl.int32)) * sf
        vb = (b.to(tl.int32) - b_zp.to(tl.int32)) * sf
        total = (mbqm_i32(va, a_mult.to(tl.int32), a_rshift.to(tl.int32), False, False, True)
                 + mbqm_i32(vb, b_mult.to(tl.int32), b_rshift.to(tl.int32), False, False,
                            True))
        y = requantize_i32(total, o_mult.to(tl.int32), o_rshift.to(tl.int32),
                           o_zp.to(tl.int32), o_qmin.to(tl.int32), o_qmax.to(tl.int32),
                           MODE == 2, MODE == 2)
    return y


@triton.jit
def add_epi(a, b, EPI, MODE: tl.constexpr):
    """:func:`add_values_fast` with the AddParams from ``EPI[3:15]`` (the int64 scalar block
    of the inference kernels, :mod:`.gemm`). Modes 1 and 2 read each value's low 32-bit
    word (the ``.to(tl.int32)`` they take anyway; little-endian): a 32-bit value that
    LLVM sees as such, so each rescaling multiply is one ``mad.wide.s32`` instead of a
    64-bit multiply-add of sign-extended operands."""
    if MODE == 0:
        E = EPI
        S: tl.constexpr = 1
    else:
        E = EPI.to(tl.pointer_type(tl.int32))
        S: tl.constexpr = 2
    return add_values_fast(a, b, tl.load(E + 3 * S), tl.load(E + 4 * S), tl.load(E + 5 * S),
                           tl.load(E + 6 * S), tl.load(E + 7 * S), tl.load(E + 8 * S),
                           tl.load(E + 9 * S), tl.load(E + 10 * S), tl.load(E + 11 * S),
                           tl.load(E + 12 * S), tl.load(E + 13 * S), tl.load(E + 14 * S), MODE)


def add_mode(p, out_rshift: int) -> int:
    """The arithmetic :func:`add_values_fast` may use for AddParams ``p`` (host side): the
    32-bit modes need |x - zp| 2^left_shift < 2^29 for every 8-bit x (zero points in
    [-128, 255], left shift <= 20, as ``make_add_params`` gives; hand-made parameters
    outside take the int64 mode) and input multipliers below 1."""
    small = p.left_shift <= 20 and all(-128 <= z <= 255 for z in (p.a_zero_point,
                                                                  p.b_zero_point))
    if small and p.a_rshift >= 0 and p.b_rshift >= 0:
        return 2 if out_rshift < 0 else 1
    return 0
