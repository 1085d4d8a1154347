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

from .common import INTERPRET

__all__ = ["multiply_by_quantized_multiplier", "requantize_values", "add_values",
           "requantize_i32", "mbqm_i32", "round_shift", "requantize_folded", "fast_add_terms",
           "add_epi", "add_mode", "exact_term", "round_constants", "mad_wide"]

# the interpreter runs no inline PTX (mad_wide)
_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRET)

# The EPI vector of the inference kernels (gemm._epi_values fills it; int64 slots, one
# loaded once a program, so changing a zero point never recompiles a kernel): the output's
# zero point and clamp, an add's AddParams (add_values' int64 mode), the dequantized
# output's zero point, then the add's folded constants (fast_add_terms: the inputs'
# mad.wide addends, the output's rshift with its rounding constant, each input's
# multiplier, rounding constants and rshift, the funnel shift 31 - left_shift, the
# output's 64-bit requantization addend). 32-bit values are read as their slot's low word.
(_E_ZP, _E_QMIN, _E_QMAX, _E_SHIFT, _E_AZP, _E_AM, _E_AS, _E_BZP, _E_BM, _E_BS,
 _E_OM, _E_OS, _E_OZP, _E_OQMIN, _E_OQMAX, _E_DZP,
 _E_FA_K, _E_FB_K, _E_FO_RC, _E_FA_M, _E_FA_C, _E_FA_DM, _E_FA_S,
 _E_FB_M, _E_FB_C, _E_FB_DM, _E_FB_S, _E_F_SH, _E_FO_C0) = (tl.constexpr(i) for i in range(29))
_E_LEN = 29


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
def mbqm_i32(v, multiplier, rshift, HAS_LSHIFT: tl.constexpr, SAT: tl.constexpr = True):
    """MultiplyByQuantizedMultiplier of int32 ``v`` in 32-bit arithmetic (see
    :func:`requantize_i32`, also for ``SAT``); int32 result."""
    if HAS_LSHIFT:
        left = tl.maximum(-rshift, 0).to(tl.int64)
        x = tl.minimum(tl.maximum(v.to(tl.int64) << left, -2147483648), 2147483647)
        x = x.to(tl.int32)
    else:
        x = v
    ab = x.to(tl.int64) * multiplier.to(tl.int64)
    hi = ((ab + 1073741824) >> 31).to(tl.int32)
    if SAT:
        hi = tl.where((x == -2147483648) & (multiplier == -2147483648), 2147483647, hi)
    # RoundingDivideByPOT (half away from zero); the mask per column, in int64 for rshift 31
    right = tl.maximum(rshift, 0)
    mask = ((right.to(tl.int64) * 0 + 1) << right.to(tl.int64)) - 1
    mask = mask.to(tl.int32)
    remainder = hi & mask
    threshold = (mask >> 1) + (hi < 0).to(tl.int32)
    return (hi >> right) + (remainder > threshold).to(tl.int32)


@triton.jit
def round_shift(hi, c, dm, rshift, ANY_SHIFT: tl.constexpr = True):
    """RoundingDivideByPOT(hi, rshift) (half away from zero) as one add and a shift:
    ``(hi + c + ((hi >> 31) & dm)) >> rshift`` with the host's constants ``c = 2^(rshift
    - 1)``, ``dm = -1`` for rshift >= 1 and ``c = dm = 0`` for rshift 0
    (:func:`round_constants`); ``ANY_SHIFT`` False: the caller knows rshift >= 1 and
    ``dm`` is not used (one instruction fewer). Exact while ``hi + c`` fits int32.

    For ``hi = q 2^r + rem`` (0 <= rem < 2^r) the reference adds 1 to ``q`` exactly when
    ``rem > 2^(r-1) - 1 + (hi < 0)``; ``(rem + 2^(r-1) - (hi < 0)) >> r`` is 1 exactly then
    (``hi >> 31`` is -1 for a negative ``hi``, 0 else)."""
    s = hi >> 31
    if ANY_SHIFT:
        s = s & dm
    return (hi + c + s) >> rshift


@triton.jit
def mad_wide(a, b, c):
    """``a * b + c`` for int32 ``a``, ``b`` and int64 ``c`` (broadcast together), exactly,
    as an inline ``mad.wide.s32``. ptxas (sm_90) still makes three SASS instructions of it
    (no signed IMAD.WIDE takes a register addend), but written as Triton arithmetic LLVM
    sometimes misses that both factors are 32-bit and multiplies 64 by 64 bits: the fused
    residual epilogue's 128x128 tile took 44.8 SASS instructions an output that way, 38.8
    with this. The interpreter, which runs no PTX, takes the same arithmetic in int64."""
    if _INTERPRETED:
        r = a.to(tl.int64) * b.to(tl.int64) + c
    else:
        r = tl.inline_asm_elementwise("mad.wide.s32 $0, $1, $2, $3;", "=l,r,r,l",
                                      [a.to(tl.int32), b.to(tl.int32), c.to(tl.int64)],
                                      dtype=tl.int64, is_pure=True, pack=1)
    return r


@triton.jit
def requantize_folded(acc, c0, multiplier, rc, zero_point, qmin, qmax,
                      SIGNED: tl.constexpr = True):
    """:func:`requantize_values` of ``acc + bias`` for rshifts >= 1 (the "folded" form;
    same results), in about seven integer instructions an element before the zero point
    and the clamp.

    ``acc`` int32 (BM, BN), the accumulator without its bias; per column (1, BN) or
    scalar: ``c0`` int64 ``bias * multiplier + 2^30``, ``multiplier`` int32 in [0, 2^31),
    ``rc`` int64 ``rshift | 2^(rshift - 1) << 32`` with rshift in [1, 31]. The host makes
    them (:func:`gemm.epilogue_tensors`) and checks that ``|hi| + 2^(rshift - 1)`` below
    fits int32 for every accumulator the layer can produce.

    ``SaturatingRoundingDoublingHighMul(x, m)`` is ``(x m + 2^30) >> 31`` (see
    :func:`requantize_i32`; no saturation: multipliers are in [0, 2^31)), and with ``x =
    acc + bias``, ``x m + 2^30 = acc m + c0``: the bias and the nudge are the 64-bit
    addend (:func:`mad_wide`), then the high word (a funnel shift) is rounded by
    :func:`round_shift`. ``|q| < 2^30`` (rshift >= 1), so ``q + zero_point`` cannot
    overflow and the clamp follows it.

    ``SIGNED`` False, for a clamp whose lower bound is at least the zero point (ReLU,
    ReLU6): every ``hi < 0`` rounds to some ``q <= 0`` and is clamped to ``qmin`` whatever
    the tie rule, so the rounding is ``(hi + 2^(rshift - 1)) >> rshift``, and the host
    folds the constant into ``c0`` (``+ 2^(rshift - 1) 2^31``); ``(z >> 31) >> rshift``
    is then the 64-bit sum's high word shifted by ``rshift - 1``, which ``rc`` holds: three
    instructions fewer."""
    z = mad_wide(acc, multiplier, c0)
    if SIGNED:
        q = round_shift((z >> 31).to(tl.int32), (rc >> 32).to(tl.int32), 0, rc.to(tl.int32),
                        False)
    else:  # the high word: no funnel shift
        q = (z >> 32).to(tl.int32) >> rc.to(tl.int32)
    q = q + zero_point
    return tl.minimum(tl.maximum(q, qmin), qmax)


@triton.jit
def fast_add_terms(a, b, EPI, EXACT: tl.constexpr = 0):
    """The sum of an integer add's two rescaled inputs, ``mbqm((a - a_zp) 2^ls, a_mult,
    a_rshift) + mbqm((b - b_zp) 2^ls, b_mult, b_rshift)``, from the folded constants at
    ``EPI[_E_FA_K:_E_FO_C0]`` (:func:`gemm._epi_values`; valid for 8-bit inputs, 8-bit zero points,
    ls <= 20 and rshifts >= 0: :func:`add_mode`).

    ``(x - zp) 2^ls m + 2^30 = 2^ls ((x - zp) m + 2^(30 - ls))``, so the doubling high
    multiply is ``(x m + k) >> (31 - ls)`` with ``k = 2^(30 - ls) - zp m`` (int64): one
    ``mad.wide.s32`` holding the zero point and the nudge, then a funnel shift and
    :func:`round_shift`. ``|x - zp| m < 383 2^31``, so each term is below 2^29 in magnitude
    and their sum below 2^30. The 32-bit constants are read as the low words of their
    int64 slots (little-endian): values LLVM sees as 32-bit.

    ``EXACT`` 1 (2): input a's (b's) multiplier is 2^30 (a real 0.5: ``make_add_params``
    gives it to the input of the larger scale) and its rshift r <= ls - 1. Then the term is
    exactly ``(x - zp) 2^(ls - 1 - r)``: ``(x - zp) 2^ls 2^30 + 2^30`` over 2^31 floors
    to ``(x - zp) 2^(ls - 1)``, a multiple of 2^r, so no rounding is left: one multiply-add
    (its constants in the term's multiplier and addend slots), and the other term's rshift
    is >= 1 (its real multiplier is below 0.5), so its rounding needs no mask."""
    return (_add_term(a, EPI, _E_FA_K, _E_FA_M, EXACT == 1, EXACT == 0)
            + _add_term(b, EPI, _E_FB_K, _E_FB_M, EXACT == 2, EXACT == 0))


@triton.jit
def _add_term(x, EPI, K: tl.constexpr, M: tl.constexpr, EXACT: tl.constexpr,
              ANY_SHIFT: tl.constexpr):
    """One input's term of :func:`fast_add_terms`: its 64-bit addend at ``EPI[K]``, its
    multiplier, rounding constants and rshift in the low words of ``EPI[M:M + 4]``, the
    funnel shift at ``EPI[_E_F_SH]``."""
    E = EPI.to(tl.pointer_type(tl.int32))
    if EXACT:
        t = x.to(tl.int32) * tl.load(E + 2 * M) + tl.load(E + 2 * K)
    else:
        h = mad_wide(x, tl.load(E + 2 * M), tl.load(EPI + K))
        h = h >> tl.load(E + 2 * _E_F_SH).to(tl.int64)
        t = round_shift(h.to(tl.int32), tl.load(E + 2 * (M + 1)), tl.load(E + 2 * (M + 2)),
                        tl.load(E + 2 * (M + 3)), ANY_SHIFT)
    return t


@triton.jit
def add_epi(a, b, EPI, MODE: tl.constexpr):
    """TFLite's integer add of ``a`` and ``b`` (8-bit values of one shape) with the
    AddParams in the EPI vector (the int64 scalar block of the inference kernels,
    :mod:`.gemm`); int32 results within the output's clamp range.

    ``MODE`` (:func:`add_mode`, the host's choice): 0, :func:`add_values` in int64 (any
    AddParams, ``EPI[_E_SHIFT:_E_DZP]``); 1, :func:`fast_add_terms` and the output's requantization
    as :func:`requantize_folded` (an output rshift >= 1, the usual case); 2,
    :func:`fast_add_terms` and :func:`requantize_i32` with its saturating left shift (any
    other output rshift); 3 and 4, mode 1 with input a's (3) or b's (4) term exact
    (``fast_add_terms``' ``EXACT``: what ``make_add_params`` gives unless the scales are
    equal); modes 1, 3 and 4 plus 8 (9, 11, 12): the output's clamp is at or above its zero
    point (a fused ReLU), so its rounding drops the sign term (:func:`requantize_folded`'s
    ``SIGNED``). (The fused residual epilogue is the int8 resnet50's costliest kernel on an
    H200: its general form took 80 SASS instructions an output on the 128x128 GEMM tile,
    sm_90, Triton 3.6.)"""
    if MODE == 0:
        y = add_values(a, b, tl.load(EPI + _E_SHIFT), tl.load(EPI + _E_AZP),
                       tl.load(EPI + _E_AM), tl.load(EPI + _E_AS), tl.load(EPI + _E_BZP),
                       tl.load(EPI + _E_BM), tl.load(EPI + _E_BS), tl.load(EPI + _E_OM),
                       tl.load(EPI + _E_OS), tl.load(EPI + _E_OZP), tl.load(EPI + _E_OQMIN),
                       tl.load(EPI + _E_OQMAX))
    else:
        KIND: tl.constexpr = MODE % 8
        total = fast_add_terms(a, b, EPI, 1 if KIND == 3 else (2 if KIND == 4 else 0))
        E = EPI.to(tl.pointer_type(tl.int32))
        zp = tl.load(E + 2 * _E_OZP)
        lo = tl.load(E + 2 * _E_OQMIN)
        hi = tl.load(E + 2 * _E_OQMAX)
        if KIND == 2:
            y = requantize_i32(total, tl.load(E + 2 * _E_OM), tl.load(E + 2 * _E_OS), zp, lo,
                               hi, True, True)
        else:
            y = requantize_folded(total, tl.load(EPI + _E_FO_C0), tl.load(E + 2 * _E_OM),
                                  tl.load(EPI + _E_FO_RC), zp, lo, hi, MODE < 8)
    return y


def add_mode(p, out_rshift: int) -> int:
    """The arithmetic :func:`add_epi` may use for AddParams ``p`` (host side): the folded
    modes need |x - zp| 2^left_shift < 2^29 for every 8-bit x (zero points in [-128, 255],
    left shift <= 20, as ``make_add_params`` gives; hand-made parameters outside take the
    int64 mode) and input multipliers below 1 (rshifts >= 0); modes 1, 3 and 4 also an
    output rshift >= 1, and 3 (4) an exact a (b) term and a b (a) rshift >= 1; + 8: an
    output clamp at or above the zero point (:func:`add_epi`)."""
    small = p.left_shift <= 20 and all(-128 <= z <= 255 for z in (p.a_zero_point,
                                                                  p.b_zero_point))
    if not (small and p.a_rshift >= 0 and p.b_rshift >= 0):
        return 0
    if out_rshift < 1:
        return 2
    relu = 8 if p.out.qmin >= p.out.zero_point else 0
    if exact_term(p.a_multiplier, p.a_rshift, p.left_shift) and p.b_rshift >= 1:
        return 3 + relu
    if exact_term(p.b_multiplier, p.b_rshift, p.left_shift) and p.a_rshift >= 1:
        return 4 + relu
    return 1 + relu


def exact_term(multiplier: int, rshift: int, left_shift: int) -> bool:
    """Whether an add input's rescaling is an exact shift (:func:`fast_add_terms`'
    ``EXACT``): multiplier 2^30 and ``0 <= rshift <= left_shift - 1``."""
    return multiplier == 1 << 30 and 0 <= rshift <= left_shift - 1


def round_constants(rshift: int) -> tuple:
    """``(c, dm)`` of :func:`round_shift` for a right shift >= 0."""
    return (1 << rshift) >> 1, (-1 if rshift > 0 else 0)
