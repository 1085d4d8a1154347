"""Training-mode BatchNorm of a folded Conv+BN / Linear+BN QAT layer and its output's
observe + fake quant, fused (Triton): op ``bn_normalize_observe_fake_quant``.

The definition (:func:`gpuquant.nn.qat.bn_train.normalize_train`, then
:func:`gpuquant.quantization.fake_quant.apply_fake_quant_with_observer` with the module's
per-tensor activation observer) passes over the convolution output ``z`` five times: batch
statistics, normalisation (writes ``y``), the observer's min / max of ``relu(y)``, the fake
quant (reads ``y``, writes the output); two PyTorch launches and four Triton ones. Here
two launches and two passes over ``z``:

1. ``_bn_stats_kernel``: one read of ``z``: per (row split, channel) count-weighted mean,
   sum of squared deviations (a Welford pair per element slot, merged with Chan's formula
   at the end) and min / max. Its last program to finish (a ticket, taken after a barrier,
   reset by that program) then runs ``_bn_finish``: the batch mean and variance per
   channel (the splits merged in a fixed order), ``a = W / sqrt(var + E)``, the running
   statistics, and the observer's batch min / max *without another pass*:
   ``y = (z - mean) * a + beta`` (each operation rounded, ``a >= 0``), the rounding to
   ``z``'s dtype and ReLU / ReLU6 are all non-decreasing in ``z``, so the smallest /
   largest output of channel c is ``y(min z_c)`` / ``y(max z_c)``, bit for bit. The
   observer update and qparams are those of :mod:`.observer` (same jitted arithmetic);
2. ``_bn_apply_kernel``: reads ``z``, writes ``fake_quant(act(y))``.

Nothing is saved but ``z`` and per-channel vectors. The straight-through mask (the fake
quant's range and the activation's gradient) is a function of ``z`` alone per channel, and
a monotone one: ``y`` and the fake quant's integer are non-decreasing in ``z`` (``a > 0``),
so "live" and "in range" each hold on an interval of ``z``. The forward's apply kernel finds
those intervals' bounds per channel by bisection over the float32 order (exact; 32 steps
a bound, run by one program per channel block), and the backward compares ``z`` with them
wherever it needs ``g = grad_y * mask``: ~2 comparisons an element where recomputing the
normalisation, rounding, activation and fake quant took ~20 instructions (the gradient-sum
kernel's sm_90 loop, bf16, ReLU: 40.5 -> 16.7 SASS instructions an element, 96-100
registers as before; the elementwise backward ~56 -> ~28 with its setup, 72-80 registers).
If a channel of the layer breaks the argument (``a <= 0``: gamma = 0, as zero-initialised
residual BatchNorms start; a non-finite mean, beta or qparams), a flag the forward lowers
sends both backward kernels down the recompute path, in a loop of its own (two loops, so
neither holds the other's registers).
The backward is batch norm's backward of ``g``, fused:

1. ``_bn_bwd_reduce_kernel``: reads ``grad_y`` and ``z``: per (split, channel) ``sum(g)``
   and ``sum(g * xhat)``; its last program runs ``_bn_bwd_finish``: the gradients of
   ``beta``, ``W`` and ``E`` and the two per-channel means the last pass needs;
2. ``_bn_apply_kernel`` (BWD): reads ``grad_y`` and ``z``, writes
   ``grad_z = (g - mean(g) - xhat * mean(g * xhat)) * W / sqrt(var + E)``.

Per layer: 2 launches forward (the definition: 6) and 2 backward (4); activation-sized
passes (read or write) 3 forward (7) and 5 backward (8). The tickets are per BatchNorm
module (int32 (2,), zero between launches; concurrent launches for one module on two
streams would share them: not supported).

Exact where it can be: the output bytes and the observer's state equal the definition's
applied to this normalisation (``(z - mean) * a + beta`` in float32, rounded to ``z``'s
dtype); the batch statistics agree with ``torch.var_mean``, and the gradients with
``native_batch_norm_backward`` of the definition's straight-through gradient, to float32
rounding (their sum order differs). Returns None (the caller runs the definition) for
what it does not take: synchronised BatchNorm, per-channel or hooked activation observers,
other fake-quant classes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .bn_fold import _dense_grad, count_batch, running_update
from .common import cdiv, last_to_finish, module_tickets, once_differentiable_kernels
from .fake_quant import (_FLOATS, _LAUNCH, _TL_DTYPE, _Layout, _fq_relu, _npow2, _rne,
                         _row_offsets, _row_plan, _target_programs, _to_out, as_rows,
                         auto_interpreter, on_tensor_device)
from .launch import launch
from .observer import (_INF, _NINF, _observer_consts, _supported_observer, _update_state,
                       device_pair_ok, mark_observed, observer_state)

__all__ = ["bn_normalize_observe_fake_quant", "bn_act_forward", "bn_act_backward", "OPS",
           "KERNELS"]

_TILE = 2048       # elements a tile (rows x channels)
_ACTS = {"none": 0, "relu": 1, "relu6": 2}
_FINISH_BLOCK = 2048  # split x channel partials a finishing step (4 warps)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _bn_stats_kernel(
    z_ptr, part_ptr,
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    # the layer's tickets i32 (2,) (this kernel takes the first), zero between launches;
    # then :func:`_bn_finish`'s arguments, its four per-channel outputs and the qparams in
    # one f32 (8 C + 3,) vector (see _vec_parts; the apply kernel writes the mask bounds)
    tick_ptr, W_ptr, beta_ptr, E_ptr, t_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr,
    vec_ptr, min_ptr, max_ptr, bad_ptr,
    rows_per_split, momentum, unbias, c_ema, q_eps, qmin, qmax, half_range, zp_sym,
    ROWS32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    OUT: tl.constexpr, ACT: tl.constexpr, OBSERVE: tl.constexpr, EMA: tl.constexpr,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, CUMULATIVE: tl.constexpr,
    FIN_S: tl.constexpr, FIN_C: tl.constexpr,
):
    """Program (cb, sp): over its row blocks, per channel the mean, the sum of squared
    deviations M2 and min / max (no NaN test: a NaN makes the channel's mean NaN, see the
    loop); written to part f32 (4, split, C).
    Each element slot of the (BLOCK_R, BLOCK_C) tile keeps its own Welford pair across the
    loop (element-wise work only: no cross-thread reduction a row block), merged with
    Chan's formula once at the end. The last program to finish (a ticket taken after a
    barrier; it resets the ticket) runs :func:`_bn_finish` over all partials: no second
    launch."""
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    coff = (c.to(tl.int64) * s_c)[None, :]
    n_r = tl.zeros((BLOCK_R,), tl.float32)  # values each row slot has seen
    mean_2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    m2_2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    vmin = tl.full((BLOCK_R, BLOCK_C), _INF, tl.float32)
    vmax = tl.full((BLOCK_R, BLOCK_C), _NINF, tl.float32)
    for it in range(0, n_iter):
        roff, rm = _row_offsets(sp * n_iter + it, rows, inner, s_o, s_i, m_in, l_in, ROWS32,
                                BLOCK_R)
        m = rm[:, None] & cm[None, :]
        x = tl.load(z_ptr + roff[:, None] + coff, mask=m, other=0.0).to(tl.float32)
        n_r = n_r + rm.to(tl.float32)
        w = tl.where(rm, tl.math.div_rn(1.0, tl.maximum(n_r, 1.0)), 0.0)[:, None]
        delta = x - mean_2
        mean_2 = mean_2 + delta * w  # (a row slot past the rows keeps its 0 and count 0)
        m2_2 = m2_2 + tl.where(m, delta * (x - mean_2), 0.0)
        # no NaN test: a NaN makes the channel's mean NaN (and an inf its M2: inf - inf),
        # so every output of it is NaN and _bn_finish's observer sees a non-finite batch
        # whatever min / max hold (minimum drops NaN on the GPU, keeps it in the interpreter)
        vmin = tl.minimum(vmin, tl.where(m, x, _INF))
        vmax = tl.maximum(vmax, tl.where(m, x, _NINF))
    n_2 = tl.broadcast_to(n_r[:, None], (BLOCK_R, BLOCK_C))
    _, mean_a, m2_a = tl.reduce((n_2, mean_2, m2_2), 0, _chan_merge)
    vmin = tl.min(vmin, axis=0)
    vmax = tl.max(vmax, axis=0)
    base = sp.to(tl.int64) * C + c
    plane = split * C
    tl.store(part_ptr + base, mean_a, mask=cm)
    tl.store(part_ptr + plane + base, m2_a, mask=cm)
    tl.store(part_ptr + 2 * plane + base, vmin, mask=cm)
    tl.store(part_ptr + 3 * plane + base, vmax, mask=cm)
    if last_to_finish(tick_ptr, tl.num_programs(0) * tl.num_programs(1)):
        _bn_finish(part_ptr, W_ptr, beta_ptr, E_ptr, t_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr,
                   vec_ptr, vec_ptr + C, vec_ptr + 2 * C, vec_ptr + 3 * C, min_ptr, max_ptr,
                   bad_ptr, vec_ptr + 4 * C,
                   rows, rows_per_split, split, C, momentum, unbias,
                   c_ema, q_eps, qmin, qmax, half_range, zp_sym,
                   OUT, ACT, OBSERVE, EMA, SYMMETRIC, HAS_BIAS, CUMULATIVE, FIN_S, FIN_C)


@triton.jit
def _chan_merge(n1, mean1, m2_1, n2, mean2, m2_2):
    """Two (count, mean, M2) Welford pairs merged (Chan et al.); empty ones are neutral."""
    n = n1 + n2
    delta = mean2 - mean1
    w = tl.math.div_rn(n2, tl.maximum(n, 1.0))
    return n, mean1 + delta * w, m2_1 + m2_2 + (delta * delta) * (n1 * w)


@triton.jit
def _act_of(z, mean, a, beta, OUT: tl.constexpr, ACT: tl.constexpr):
    """The normalised output as the fake quant sees it: ``(z - mean) * a + beta`` rounded to
    the output dtype and read back as float32, then ACT 1 ReLU, 2 ReLU6 (NaN stays NaN, as
    torch's relu / relu6 keep it)."""
    return _act(_to_out((z - mean) * a + beta, OUT).to(tl.float32), ACT)


@triton.jit
def _act(y, ACT: tl.constexpr):
    """ACT 0 none, 1 ReLU, 2 ReLU6 of float32 ``y`` (NaN stays NaN, as torch's keep it)."""
    if ACT >= 1:
        y = tl.where(y < 0, 0.0, y)
    if ACT == 2:
        y = tl.where(y > 6.0, 6.0, y)
    return y


@triton.jit
def _bn_finish(
    # partials f32 (4, split, C); per channel f32 (C,): W, beta, E, t, bias (HAS_BIAS)
    part_ptr, W_ptr, beta_ptr, E_ptr, t_ptr, b_ptr,
    # BatchNorm running statistics f32 (C,), num_batches_tracked i64 (1,)
    rm_ptr, rv_ptr, nbt_ptr,
    # out f32 (C,): mean, 1 / sqrt(var + E), a = W / sqrt(var + E), k = -W / (2 (var + E))
    mean_ptr, invstd_ptr, a_ptr, k_ptr,
    # observer state f32 (1,) each, its nonfinite_batches i64 (1,); out qparams f32 (2,)
    min_ptr, max_ptr, bad_ptr, q_ptr,
    # sizes: rows (values a channel), rows a split, splits, channels
    rows, rows_per_split, split, C, momentum, unbias,
    # observer constants
    c_ema, q_eps, qmin, qmax, half_range, zp_sym,
    OUT: tl.constexpr, ACT: tl.constexpr, OBSERVE: tl.constexpr, EMA: tl.constexpr,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Run by the statistics kernel's last program: batch statistics from the partials
    (one pass over them, shifted by split 0's mean, fixed order), the per-channel vectors,
    the running statistics (as BatchNorm: lerp with momentum or 1 / num_batches_tracked;
    mean / t + bias, var / t^2 * n / (n - 1)), and the per-tensor observer of the output, whose batch
    min / max are the outputs of each channel's extreme inputs (module docstring)."""
    f = count_batch(nbt_ptr, momentum, CUMULATIVE)
    gmin = tl.full((BLOCK_C,), _INF, tl.float32)
    gmax = tl.full((BLOCK_C,), _NINF, tl.float32)
    plane = split * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        # one pass over the partials, shifted by split 0's mean (|mean - shift| is about
        # sigma / sqrt(split 0's count), so S2 / n - dbar^2 cancels nothing that matters):
        # dbar = sum(n_s (mean_s - shift)) / n, var = sum(M2_s + n_s (mean_s - shift)^2) / n
        # - dbar^2, mean = shift + dbar
        shift = tl.load(part_ptr + c, mask=cm, other=0.0, cache_modifier=".cg")
        acc1 = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        zmin = tl.full((BLOCK_S, BLOCK_C), _INF, tl.float32)
        zmax = tl.full((BLOCK_S, BLOCK_C), _NINF, tl.float32)
        for s0 in range(0, split, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            m = (sp < split)[:, None] & cm[None, :]
            cnt = tl.minimum(tl.maximum(rows - sp * rows_per_split, 0),
                             rows_per_split).to(tl.float32)[:, None]
            off = sp.to(tl.int64)[:, None] * C + c[None, :]
            d = tl.load(part_ptr + off, mask=m, other=0.0, cache_modifier=".cg") - shift[None, :]
            m2 = tl.load(part_ptr + plane + off, mask=m, other=0.0, cache_modifier=".cg")
            acc1 += tl.where(m, cnt * d, 0.0)
            acc2 += tl.where(m, m2 + cnt * (d * d), 0.0)
            zmin = tl.minimum(zmin, tl.load(part_ptr + 2 * plane + off, mask=m, other=_INF,
                                            cache_modifier=".cg"))
            zmax = tl.maximum(zmax, tl.load(part_ptr + 3 * plane + off, mask=m, other=_NINF,
                                            cache_modifier=".cg"))
        n_f = rows.to(tl.float32)
        dbar = tl.math.div_rn(tl.sum(acc1, axis=0), n_f)
        mean = shift + dbar
        # (NaN propagates, as in torch: the GPU's plain max would drop it and give a NaN
        # batch a variance of 0, hence finite running statistics)
        var = tl.maximum(tl.math.div_rn(tl.sum(acc2, axis=0), n_f) - dbar * dbar, 0.0,
                         propagate_nan=tl.PropagateNan.ALL)
        W = tl.load(W_ptr + c, mask=cm, other=0.0)
        beta = tl.load(beta_ptr + c, mask=cm, other=0.0)
        ve = var + tl.load(E_ptr + c, mask=cm, other=1.0)
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(ve))
        a = inv * W
        tl.store(mean_ptr + c, mean, mask=cm)
        tl.store(invstd_ptr + c, inv, mask=cm)
        tl.store(a_ptr + c, a, mask=cm)
        tl.store(k_ptr + c, -0.5 * W * (inv * inv), mask=cm)
        running_update(mean, var, c, cm, t_ptr, b_ptr, rm_ptr, rv_ptr, f, unbias, HAS_BIAS)
        if OBSERVE:
            lo = _act_of(tl.min(zmin, axis=0), mean, a, beta, OUT, ACT)
            hi = _act_of(tl.max(zmax, axis=0), mean, a, beta, OUT, ACT)
            gmin = tl.minimum(gmin, tl.where(cm, tl.where(lo != lo, _NINF, lo), _INF))
            gmax = tl.maximum(gmax, tl.where(cm, tl.where(hi != hi, _INF, hi), _NINF))
    old_min = tl.load(min_ptr)
    old_max = tl.load(max_ptr)
    if OBSERVE:
        mn = tl.min(gmin, axis=0)
        mx = tl.max(gmax, axis=0)
        ok = (tl.abs(mn) < _INF) & (tl.abs(mx) < _INF)
    else:  # a frozen observer: the qparams of its state
        mn = old_min
        mx = old_max
        ok = tl.program_id(0) < 0
    new_min, new_max, s, zp, ok = _update_state(mn, mx, ok, old_min, old_max, c_ema, q_eps,
                                                qmin, qmax, half_range, zp_sym, EMA, SYMMETRIC)
    if OBSERVE:
        tl.store(min_ptr, new_min)
        tl.store(max_ptr, new_max)
        tl.store(bad_ptr, tl.load(bad_ptr) + (~ok).to(tl.int64))
    tl.store(q_ptr, s)
    tl.store(q_ptr + 1, zp)
    tl.store(q_ptr + 2 + 4 * C, 1.0)  # the mask bounds' flag (the apply kernel lowers it)


@triton.jit
def _fq_act(z, mean, a, beta, inv, s, zp, qmin, qmax, OUT: tl.constexpr, ACT: tl.constexpr):
    """(fake_quant(act(y)), the fake quant's in-range mask, the activation's live mask) of
    z's normalised output ``y``. The backward is the definition's chain: ``g * in_range``
    (the fake quant's multiply), then the activation's ``where(live, ., 0)`` (torch's
    threshold / hardtanh backward: 0 < y for ReLU, not (y <= 0 or y >= 6) for ReLU6, so an
    inf or NaN upstream gradient at a dead position gives 0, not NaN). Without an
    activation the live mask is the in-range one and is not used."""
    y = _act_of(z, mean, a, beta, OUT, 0)
    if ACT == 2:
        live = ~((y <= 0.0) | (y >= 6.0))
    elif ACT == 1:
        live = y > 0
    yq, inr = _fq_relu(_act(y, ACT), inv, s, zp, qmin, qmax, False)
    if ACT == 0:
        live = inr
    return yq, inr, live


@triton.jit
def _act_grad(g, inr, live, ACT: tl.constexpr):
    """The straight-through gradient of fake_quant(act(y)) for upstream ``g`` (float32)."""
    g = g * inr.to(tl.float32)
    if ACT != 0:
        g = tl.where(live, g, 0.0)
    return g


@triton.jit
def _channel_params(vec_ptr, beta_ptr, c, cm, C):
    """(mean, a, beta) of channels ``c`` as (1, BLOCK_C) rows, and the per-tensor
    (scale, zero point, 1 / scale), from the statistics kernel's vector (mean at 0, a at
    2 C, the qparams at 4 C)."""
    mean = tl.load(vec_ptr + c, mask=cm, other=0.0)[None, :]
    a = tl.load(vec_ptr + 2 * C + c, mask=cm, other=0.0)[None, :]
    beta = tl.load(beta_ptr + c, mask=cm, other=0.0)[None, :]
    s = tl.load(vec_ptr + 4 * C)
    return mean, a, beta, s, tl.load(vec_ptr + 4 * C + 1), tl.math.div_rn(1.0, s)


@triton.jit
def _key_value(k):
    """The float32 of an order key (int64 holding an int32): keys order the non-NaN floats
    as their values, -0.0 just below +0.0 (``bits ^ 0x7FFFFFFF`` for negative floats)."""
    k32 = k.to(tl.int32)
    return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)


@triton.jit
def _mask_preds(x, mean, a, beta, inv, zp, qmin, qmax, OUT: tl.constexpr,
                ACT: tl.constexpr):
    """The four monotone predicates the straight-through mask of ``z = x`` is made of
    (:func:`_fq_act`): ``y > 0`` and ``y < 6`` of the normalised output ``y`` (ReLU / ReLU6
    liveness), ``r >= qmin`` and ``r <= qmax`` of the fake quant's unclamped integer
    ``r = rne(act(y) / s) + zp``. With ``a > 0`` and everything else finite, ``y`` and ``r``
    are non-decreasing in ``x`` (each float operation rounds monotonically), so the first
    and third go false -> true along the floats and the others true -> false."""
    y = _act_of(x, mean, a, beta, OUT, 0)
    r = _rne(_act(y, ACT) * inv) + zp
    return y > 0, y < 6.0, r >= qmin, r <= qmax


@triton.jit
def _mask_thresholds(mean, a, beta, s, zp, inv, qmin, qmax, OUT: tl.constexpr,
                     ACT: tl.constexpr):
    """Per channel (vectors): the straight-through mask as comparisons of ``z`` itself,
    ``(live_lo, live_hi, inr_lo, inr_hi, regular)``: for every non-NaN ``z``,
    ``y(z) > 0 <=> z >= live_lo``, ``y(z) < 6 <=> z <= live_hi``, and the fake quant's
    in-range test ``<=> inr_lo <= z <= inr_hi`` (``-inf`` / ``+inf``: always; NaN: never).
    Found by bisection over the float32 order keys (32 steps a bound: exact, as each
    predicate is monotone, :func:`_mask_preds`), so the backward's two passes compare
    instead of recomputing the normalisation and the fake quant per element. Valid where
    ``regular`` (1.0): ``a > 0``, mean, a, beta, the scale, its inverse and the zero point
    finite, and with an activation ``inr_lo <= live_lo`` (the backward then tests only the
    upper in-range bound); one irregular channel (0.0) sends the layer's backward down the
    recompute path."""
    lo_f = tl.zeros_like(mean).to(tl.int64) - 2139095041  # key of -inf
    hi_f = lo_f * 0 + 2139095040  # key of +inf
    p = _mask_preds(_key_value(lo_f), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)
    q = _mask_preds(_key_value(hi_f), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)
    # (lo, hi) of the four searches: predicate false / true at the ends of the rising ones
    # (0, 2), true / false at the ends of the falling ones (1, 3)
    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3 = lo_f, hi_f, lo_f, hi_f, lo_f, hi_f, lo_f, hi_f
    for _ in range(32):
        m0 = (lo0 + hi0) >> 1
        m1 = (lo1 + hi1) >> 1
        m2 = (lo2 + hi2) >> 1
        m3 = (lo3 + hi3) >> 1
        t0 = _mask_preds(_key_value(m0), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)[0]
        t1 = _mask_preds(_key_value(m1), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)[1]
        t2 = _mask_preds(_key_value(m2), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)[2]
        t3 = _mask_preds(_key_value(m3), mean, a, beta, inv, zp, qmin, qmax, OUT, ACT)[3]
        hi0 = tl.where(t0, m0, hi0)
        lo0 = tl.where(t0, lo0, m0)
        lo1 = tl.where(t1, m1, lo1)
        hi1 = tl.where(t1, hi1, m1)
        hi2 = tl.where(t2, m2, hi2)
        lo2 = tl.where(t2, lo2, m2)
        lo3 = tl.where(t3, m3, lo3)
        hi3 = tl.where(t3, hi3, m3)
    nan = (lo_f * 0 + 0x7FC00000).to(tl.int32).to(tl.float32, bitcast=True)  # (a NaN
    # global would fail Triton's check that globals are unchanged: NaN != NaN)
    live_lo = tl.where(p[0], _NINF, tl.where(q[0], _key_value(hi0), nan))
    live_hi = tl.where(q[1], _INF, tl.where(p[1], _key_value(lo1), nan))
    inr_lo = tl.where(p[2], _NINF, tl.where(q[2], _key_value(hi2), nan))
    inr_hi = tl.where(q[3], _INF, tl.where(p[3], _key_value(lo3), nan))
    ok_c = (tl.abs(mean) < _INF) & (tl.abs(beta) < _INF) & (a > 0) & (a < _INF)
    if ACT != 0:  # the backward then tests only the upper in-range bound (fewer registers)
        ok_c = ok_c & (inr_lo <= live_lo)
    ok_q = (s > 0) & (s < _INF) & (inv > 0) & (inv < _INF) & (tl.abs(zp) < _INF)  # scalars
    return live_lo, live_hi, inr_lo, inr_hi, tl.where(ok_q, ok_c.to(tl.float32), 0.0)


@triton.jit
def _load_thresholds(vec_ptr, c, cm, C):
    """The (1, BLOCK_C) rows of :func:`_mask_thresholds`' bounds the forward's apply kernel
    stored at ``4 C + 2`` of the statistics vector, and whether every channel of the layer
    has them (a scalar at ``8 C + 2``: no reduction across the tile's threads)."""
    t_ptr = vec_ptr + 4 * C + 2
    live_lo = tl.load(t_ptr + c, mask=cm, other=0.0)[None, :]
    live_hi = tl.load(t_ptr + C + c, mask=cm, other=0.0)[None, :]
    inr_lo = tl.load(t_ptr + 2 * C + c, mask=cm, other=0.0)[None, :]
    inr_hi = tl.load(t_ptr + 3 * C + c, mask=cm, other=0.0)[None, :]
    regular = tl.load(t_ptr + 4 * C) > 0
    return live_lo, live_hi, inr_lo, inr_hi, regular


@triton.jit
def _st_grad(g, z, mean, a, beta, inv, s, zp, qmin, qmax, live_lo, live_hi, inr_lo, inr_hi,
             regular, OUT: tl.constexpr, ACT: tl.constexpr):
    """The backward's straight-through gradient of upstream ``g`` (float32) at ``z``
    (:func:`_act_grad` of :func:`_fq_act`'s masks). Where every channel of the layer is
    regular the masks are comparisons of ``z`` with :func:`_mask_thresholds`' bounds (NaN
    ``z``: never in range; live only for ReLU6, whose ``not (y <= 0 or y >= 6)`` holds for
    NaN), else recomputed from ``z``. The gradient, not the masks, leaves the branch: one
    float a value where two predicates would be packed into and out of bit registers."""
    if regular:
        if ACT == 1:  # (regular: inr_lo <= live_lo, so where live, z >= inr_lo holds)
            gs = _act_grad(g, z <= inr_hi, z >= live_lo, ACT)
        elif ACT == 2:
            gs = _act_grad(g, z <= inr_hi, (z != z) | ((z >= live_lo) & (z <= live_hi)), ACT)
        else:
            inr = (z >= inr_lo) & (z <= inr_hi)
            gs = _act_grad(g, inr, inr, ACT)
    else:
        _, inr, live = _fq_act(z, mean, a, beta, inv, s, zp, qmin, qmax, OUT, ACT)
        gs = _act_grad(g, inr, live, ACT)
    return gs


def apply_grid(ep, C: int) -> tuple:
    """``_bn_apply_kernel``'s grid: (row blocks, channel blocks). One row block a program, so
    the row blocks go on axis 0 (up to 2^31 - 1): a channels_last ResNet stem at batch 168+
    has more than 65535 of them, CUDA's limit on axes 1 and 2."""
    return (ep.split, cdiv(C, ep.block_c))


@triton.jit
def _bn_apply_bwd(z_ptr, y_ptr, g_ptr, off, m, c, cm, C, vec_ptr, beta_ptr, out_ptr, qmin,
                  qmax, REGULAR: tl.constexpr, ACT: tl.constexpr):
    """The apply kernel's backward tile: ``(g - mean(g) - (z - mean) * proj) * a`` of the
    straight-through gradient (:func:`_st_grad`, its path fixed by REGULAR), ``proj =
    mean(g * xhat) / sqrt(var + E)`` (so ``(z - mean) * proj = xhat * mean(g * xhat)``;
    PyTorch's elementwise backward has the same four per-channel factors)."""
    mean, a, beta, s, zp, inv = _channel_params(vec_ptr, beta_ptr, c, cm, C)
    mg = tl.load(out_ptr + 3 * C + c, mask=cm, other=0.0)[None, :]
    proj = tl.load(out_ptr + 4 * C + c, mask=cm, other=0.0)[None, :]
    live_lo, live_hi, inr_lo, inr_hi, _ = _load_thresholds(vec_ptr, c, cm, C)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = _st_grad(tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32), z, mean, a, beta,
                 inv, s, zp, qmin, qmax, live_lo, live_hi, inr_lo, inr_hi, REGULAR,
                 z_ptr.dtype.element_ty, ACT)
    gz = ((g - mg) - (z - mean) * proj) * a
    tl.store(y_ptr + off, _to_out(gz, y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_apply_kernel(
    z_ptr, y_ptr, g_ptr,
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    # the statistics kernel's f32 vector (mean, 1 / sqrt(var + E), a, k, qparams); beta f32
    # (C,); BWD: the reduce kernel's f32 (5 C,) outputs, the gradient's mean at 3 C and
    # proj = mean(g * xhat) / sqrt(var + E) at 4 C
    vec_ptr, beta_ptr, out_ptr, qmin, qmax,
    BWD: tl.constexpr, ACT: tl.constexpr, ROWS32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (row block, cb). Forward: y = fake_quant(act((z - mean) * a + beta)) with
    the per-tensor qparams q. BWD: the batch-norm input gradient of the straight-through
    gradient ``g = grad_y * mask`` (the mask from the forward's bounds, or recomputed from
    z), to ``y_ptr`` (z's layout): ``(g - mean(g) - xhat * mean(g * xhat)) * a``,
    ``xhat = (z - mean) / sqrt(var + E)``."""
    rb = tl.program_id(0)  # row blocks on axis 0 (up to 2^31 - 1; axis 1 stops at 65535)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    roff, rm = _row_offsets(rb, rows, inner, s_o, s_i, m_in, l_in, ROWS32, BLOCK_R)
    off = roff[:, None] + (c.to(tl.int64) * s_c)[None, :]
    m = rm[:, None] & cm[None, :]
    if BWD:  # (a branch a program, each path loading and holding only what it uses)
        if tl.load(vec_ptr + 8 * C + 2) > 0:
            _bn_apply_bwd(z_ptr, y_ptr, g_ptr, off, m, c, cm, C, vec_ptr, beta_ptr, out_ptr,
                          qmin, qmax, True, ACT)
        else:
            _bn_apply_bwd(z_ptr, y_ptr, g_ptr, off, m, c, cm, C, vec_ptr, beta_ptr, out_ptr,
                          qmin, qmax, False, ACT)
    else:
        mean, a, beta, s, zp, inv = _channel_params(vec_ptr, beta_ptr, c, cm, C)
        z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
        yq, _, _ = _fq_act(z, mean, a, beta, inv, s, zp, qmin, qmax, z_ptr.dtype.element_ty,
                           ACT)
        tl.store(y_ptr + off, _to_out(yq, y_ptr.dtype.element_ty), mask=m)
        if rb == 0:  # the backward's mask bounds of these channels (vectors, not rows)
            live_lo, live_hi, inr_lo, inr_hi, regular = _mask_thresholds(
                tl.load(vec_ptr + c, mask=cm, other=0.0),
                tl.load(vec_ptr + 2 * C + c, mask=cm, other=0.0),
                tl.load(beta_ptr + c, mask=cm, other=0.0), s, zp, inv, qmin, qmax,
                z_ptr.dtype.element_ty, ACT)
            t_ptr = vec_ptr + 4 * C + 2
            tl.store(t_ptr + c, live_lo, mask=cm)
            tl.store(t_ptr + C + c, live_hi, mask=cm)
            tl.store(t_ptr + 2 * C + c, inr_lo, mask=cm)
            tl.store(t_ptr + 3 * C + c, inr_hi, mask=cm)
            # the layer's flag: 1 from the statistics kernel, 0 if a channel is irregular
            tl.atomic_min(t_ptr + 4 * C, tl.min(tl.where(cm, regular, 1.0), axis=0))


@triton.jit
def _bwd_sums(acc_g, acc_gx, rb, z_ptr, g_ptr, rows, inner, s_o, s_i, m_in, l_in, coff, cm,
              mean, a, beta, inv, s, zp, qmin, qmax, live_lo, live_hi, inr_lo, inr_hi,
              REGULAR: tl.constexpr, ACT: tl.constexpr, ROWS32: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """One row block of the gradient sums: ``acc_g += g``, ``acc_gx += g * (z - mean)`` of
    the straight-through gradient (:func:`_st_grad`, its path fixed by REGULAR); times
    1 / sqrt(var + E) after the loop, as PyTorch's reduction does."""
    roff, rm = _row_offsets(rb, rows, inner, s_o, s_i, m_in, l_in, ROWS32, BLOCK_R)
    m = rm[:, None] & cm[None, :]
    z = tl.load(z_ptr + roff[:, None] + coff, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + roff[:, None] + coff, mask=m, other=0.0).to(tl.float32)
    g = tl.where(m, _st_grad(g, z, mean, a, beta, inv, s, zp, qmin, qmax, live_lo, live_hi,
                             inr_lo, inr_hi, REGULAR, z_ptr.dtype.element_ty, ACT), 0.0)
    return acc_g + g, acc_gx + g * tl.where(m, z - mean, 0.0)


@triton.jit
def _bn_bwd_reduce_kernel(
    z_ptr, g_ptr, part_ptr,
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    vec_ptr, beta_ptr, qmin, qmax,
    # the layer's tickets i32 (2,) (this kernel takes the second), zero between launches;
    # :func:`_bn_bwd_finish`'s outputs f32 (5 C,): grad W, grad beta, grad E, co (2 C)
    tick_ptr, out_ptr,
    ACT: tl.constexpr, ROWS32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    FIN_S: tl.constexpr, FIN_C: tl.constexpr,
):
    """Program (cb, sp): per channel, over its row blocks, sum(g) and sum(g * xhat) of the
    straight-through gradient ``g = grad_y * mask`` (mask recomputed from z); written to
    part f32 (2, split, C). The last program to finish runs :func:`_bn_bwd_finish`."""
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    coff = (c.to(tl.int64) * s_c)[None, :]
    mean, a, beta, s, zp, inv = _channel_params(vec_ptr, beta_ptr, c, cm, C)
    live_lo, live_hi, inr_lo, inr_hi, regular = _load_thresholds(vec_ptr, c, cm, C)
    acc_g = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # per element slot: one sum at the end
    acc_gx = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    # two loops, not a branch an iteration: each holds only its own path's values (registers)
    if regular:
        for it in range(0, n_iter):
            acc_g, acc_gx = _bwd_sums(acc_g, acc_gx, sp * n_iter + it, z_ptr, g_ptr, rows,
                                      inner, s_o, s_i, m_in, l_in, coff, cm, mean, a, beta, inv,
                                      s, zp, qmin, qmax, live_lo, live_hi, inr_lo, inr_hi,
                                      True, ACT, ROWS32, BLOCK_R)
    else:
        for it in range(0, n_iter):
            acc_g, acc_gx = _bwd_sums(acc_g, acc_gx, sp * n_iter + it, z_ptr, g_ptr, rows,
                                      inner, s_o, s_i, m_in, l_in, coff, cm, mean, a, beta, inv,
                                      s, zp, qmin, qmax, live_lo, live_hi, inr_lo, inr_hi,
                                      False, ACT, ROWS32, BLOCK_R)
    base = sp.to(tl.int64) * C + c
    tl.store(part_ptr + base, tl.sum(acc_g, axis=0), mask=cm)
    invstd = tl.load(vec_ptr + C + c, mask=cm, other=0.0)
    tl.store(part_ptr + split * C + base, tl.sum(acc_gx, axis=0) * invstd, mask=cm)
    if last_to_finish(tick_ptr + 1, tl.num_programs(0) * tl.num_programs(1)):
        _bn_bwd_finish(part_ptr, vec_ptr + 3 * C, vec_ptr + C, out_ptr, out_ptr + C,
                       out_ptr + 2 * C, out_ptr + 3 * C, rows, split, C, FIN_S, FIN_C)


@triton.jit
def _bn_bwd_finish(
    part_ptr, k_ptr, invstd_ptr, gW_ptr, gb_ptr, gE_ptr, co_ptr, rows, split, C,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Run by the reduce kernel's last program: per channel sum(g) (beta's gradient),
    sum(g * xhat) (W's), k times it (E's: k = -W / (2 (var + E))), and for the apply pass
    mean(g) and mean(g * xhat) / sqrt(var + E)."""
    n_f = rows.to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc_g = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        acc_gx = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for s0 in range(0, split, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            m = (sp < split)[:, None] & cm[None, :]
            off = sp.to(tl.int64)[:, None] * C + c[None, :]
            acc_g += tl.load(part_ptr + off, mask=m, other=0.0, cache_modifier=".cg")
            acc_gx += tl.load(part_ptr + split * C + off, mask=m, other=0.0,
                              cache_modifier=".cg")
        sg = tl.sum(acc_g, axis=0)
        sgx = tl.sum(acc_gx, axis=0)
        tl.store(gb_ptr + c, sg, mask=cm)
        tl.store(gW_ptr + c, sgx, mask=cm)
        tl.store(gE_ptr + c, tl.load(k_ptr + c, mask=cm, other=0.0) * sgx, mask=cm)
        tl.store(co_ptr + c, tl.math.div_rn(sg, n_f), mask=cm)
        tl.store(co_ptr + C + c, tl.math.div_rn(sgx, n_f) *
                 tl.load(invstd_ptr + c, mask=cm, other=0.0), mask=cm)


# --------------------------------------------------------------------------- launchers
class _Shape(NamedTuple):
    """What a layer's two launch pairs derive from ``z``'s shape, strides and device, once
    per layout (:func:`_shape_of`): the statistics plan's scalars, grid and constexprs, the
    elementwise plan's (one row block a program), the partial sums' split, the finishing
    blocks, the running statistics' row count and unbiasing factor."""
    C: int
    split: int
    stats_grid: tuple
    stats_args: tuple
    stats_meta: dict
    apply_grid: tuple
    apply_args: tuple
    apply_meta: dict
    fin_meta: dict
    rows_walked: int
    unbias: float


@functools.lru_cache(maxsize=1024)
def _shape_of(shape: tuple, strides: tuple, device: torch.device) -> _Shape:
    layout = _Layout(shape, strides)
    sp = _row_plan(layout, 1, _TILE, _target_programs(device))
    ep = _row_plan(layout, 1, _TILE, 2 ** 40)
    C, rows = sp.C, sp.rows
    fin_c = min(_npow2(C), 256)
    return _Shape(
        C, sp.split, (cdiv(C, sp.block_c), sp.split), sp.kernel_args(),
        dict(ROWS32=sp.rows32, BLOCK_R=sp.block_r, BLOCK_C=sp.block_c),
        apply_grid(ep, C), ep.kernel_args(),
        dict(ROWS32=ep.rows32, BLOCK_R=ep.block_r, BLOCK_C=ep.block_c),
        dict(FIN_S=max(1, min(_npow2(sp.split), _FINISH_BLOCK // fin_c)), FIN_C=fin_c),
        sp.n_iter * sp.block_r, rows / (rows - 1) if rows > 1 else float("inf"))


def _shape(z: torch.Tensor) -> _Shape:
    """:func:`_shape_of` of ``z`` (dense, :func:`as_rows`' layout along axis 1): the plans,
    grids and constexprs of a layer's launches, memoised per layout (deriving them each
    call was about a third of the launchers' host time)."""
    return _shape_of(tuple(z.shape), z.stride(), z.device)


def _vec_parts(vec: torch.Tensor, C: int):
    """(mean, 1 / sqrt(var + E), a, k, qparams, the backward's mask bounds) views of the
    statistics vector (the bounds (4, C): :func:`_mask_thresholds`' first four outputs;
    then the layer's flag: 1.0 where every channel's bounds hold)."""
    return (vec[:C], vec[C:2 * C], vec[2 * C:3 * C], vec[3 * C:4 * C], vec[4 * C:4 * C + 2],
            vec[4 * C + 2:8 * C + 2].view(4, C), vec[8 * C + 2:])


def vec_numel(C: int) -> int:
    """The float32 elements of :func:`bn_act_forward`'s statistics vector."""
    return 8 * C + 3


def part_numel(z: torch.Tensor, backward: bool = False) -> int:
    """The float32 elements of the partial sums :func:`bn_act_forward` (or, ``backward``,
    :func:`bn_act_backward`) reduces ``z``'s channels through."""
    return _part_len(_shape(z), backward)


def _part_len(sh: _Shape, backward: bool) -> int:
    return (2 if backward else 4) * sh.split * sh.C


def bn_act_forward(z, W, beta, E, t, bias, running_mean, running_var, nbt, momentum,
                   observer, act: int, tick: torch.Tensor, out=None):
    """The forward's two launches (``act`` 0 none, 1 ReLU, 2 ReLU6; ``tick`` the layer's
    int32 (2,) tickets, zero between launches). ``z`` dense with :func:`as_rows`'s layout
    along axis 1. Returns ``(y, vec)``, ``vec`` f32 (:func:`vec_numel`,) holding mean,
    1 / sqrt(var + E), a, k and the qparams (:func:`_vec_parts`); updates the running
    statistics, ``nbt`` and the observer's state in place. ``out``: ``(partial sums
    (:func:`part_numel`,), vec, y)`` to use, else new tensors."""
    sh = _shape(z)
    C = sh.C
    if out is None:
        part = torch.empty(_part_len(sh, False), dtype=torch.float32, device=z.device)
        vec = torch.empty(vec_numel(C), dtype=torch.float32, device=z.device)
        y = None
    else:
        part, vec, y = out
    consts = _observer_consts(observer)
    launch(_bn_stats_kernel, sh.stats_grid, z, part, *sh.stats_args,
           tick, W, beta, E, t, bias if bias is not None else W, running_mean, running_var,
           nbt, vec, *observer_state(observer),
           sh.rows_walked, 0.0 if momentum is None else float(momentum), sh.unbias, *consts,
           OUT=_TL_DTYPE[z.dtype], ACT=act, OBSERVE=observer.enabled,
           EMA=_supported_observer(observer), SYMMETRIC=observer.symmetric,
           HAS_BIAS=bias is not None, CUMULATIVE=momentum is None, num_warps=4,
           **sh.stats_meta, **sh.fin_meta, **_LAUNCH)
    if y is None:
        y = torch.empty_like(z)
    launch(_bn_apply_kernel, sh.apply_grid, z, y, z, *sh.apply_args,
           vec, beta, vec, *consts[2:4], BWD=False, ACT=act, num_warps=4,
           **sh.apply_meta, **_LAUNCH)
    return y, vec


def bn_act_backward(gy, z, vec, beta, qmin, qmax, act: int, tick: torch.Tensor, bufs=None):
    """The batch-norm backward of the straight-through gradient ``grad_y * mask`` (the mask
    recomputed from ``z``): ``(grad_z, grad_W, grad_beta, grad_E)`` in two launches (per
    channel sums with the finishing program, the elementwise pass); ``vec`` and ``tick``
    as :func:`bn_act_forward` had them. PyTorch's ``native_batch_norm_backward`` given
    ``grad_y * mask`` agrees to float32 rounding. ``bufs``: ``(partial sums
    (:func:`part_numel` backward), float32 (5 C,), grad_z)`` to use, else new tensors."""
    gy = _dense_grad(gy, z)
    sh = _shape(z)
    C = sh.C
    if bufs is None:
        part = torch.empty(_part_len(sh, True), dtype=torch.float32, device=z.device)
        out = torch.empty(5 * C, dtype=torch.float32, device=z.device)  # W, beta, E, co (2C)
        gz = None
    else:
        part, out, gz = bufs
    launch(_bn_bwd_reduce_kernel, sh.stats_grid, z, gy, part, *sh.stats_args, vec, beta,
           qmin, qmax, tick, out, ACT=act, num_warps=4, **sh.stats_meta, **sh.fin_meta,
           **_LAUNCH)
    if gz is None:
        gz = torch.empty_like(z)
    launch(_bn_apply_kernel, sh.apply_grid, z, gz, gy, *sh.apply_args,
           vec, beta, out, qmin, qmax, BWD=True, ACT=act, num_warps=4,
           **sh.apply_meta, **_LAUNCH)
    return gz, out[:C], out[C:2 * C], out[2 * C:3 * C]


class _BnActTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, W, beta, E, t, bias, running_mean, running_var, nbt, momentum,
                observer, act, tick):
        y, vec = bn_act_forward(z, W, beta, E, t, bias, running_mean, running_var, nbt,
                                momentum, observer, act, tick)
        ctx.save_for_backward(z, beta, vec, tick)
        ctx.consts = (float(observer.dtype.qmin), float(observer.dtype.qmax), act)
        return y

    @staticmethod
    @once_differentiable_kernels("batch-norm + activation (training)")
    def backward(ctx, gy):
        z, beta, vec, tick = ctx.saved_tensors
        qmin, qmax, act = ctx.consts
        gz, gW, gb, gE = bn_act_backward(gy, z, vec, beta, qmin, qmax, act, tick)
        need = ctx.needs_input_grad
        return (gz if need[0] else None, gW if need[1] else None, gb if need[2] else None,
                gE if need[3] else None) + (None,) * 9


def _act_pair_ok(z: torch.Tensor, observer, fake_quant) -> bool:
    """A per-tensor MinMax / moving-average observer without host hooks (enabled, or
    disabled with qparams to give) and an enabled plain FakeQuantize of its dtype."""
    return (device_pair_ok(observer, fake_quant, z.device) and observer.axis is None
            and observer._buffers["min_val"].numel() == 1)


# --------------------------------------------------------------------------- op
@on_tensor_device
def bn_normalize_observe_fake_quant(z: torch.Tensor, W, beta, E, t, bn, bias, observer,
                                    fake_quant, activation: str = "none") -> Optional[torch.Tensor]:
    """``fake_quant(observer(act(normalize_train(z, ...))))`` (module docstring) for
    ``activation`` "none", "relu" or "relu6"; updates ``bn``'s running statistics and the
    observer. None for what it does not take."""
    if auto_interpreter(z):
        return None
    if activation not in _ACTS or not _act_pair_ok(z, observer, fake_quant):
        return None
    if (z.dim() < 2 or z.dtype not in _FLOATS or z.numel() == 0 or z.shape[1] < 1
            or z.numel() // z.shape[1] < 2 or bn.running_mean.dtype != torch.float32
            or bn.running_var.dtype != torch.float32
            or any(v.dtype != torch.float32 for v in (W, beta, E, t))):
        return None
    from ...distributed import syncs_batch_stats
    if syncs_batch_stats(bn):
        return None
    zr = as_rows(z, 1)
    b = bias.detach().float().contiguous() if bias is not None else None
    mark_observed(observer)
    y = _BnActTrain.apply(zr, W.contiguous(), beta.contiguous(), E.contiguous(), t.contiguous(), b,
                          bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                          observer, _ACTS[activation],
                          module_tickets(bn, bn.running_mean.device))
    return y


_PLAN = dict(ROWS32=False, BLOCK_R=32, BLOCK_C=64)
_FIN = dict(OUT=tl.bfloat16, ACT=1, OBSERVE=True, EMA=True, SYMMETRIC=True, HAS_BIAS=False,
            CUMULATIVE=False, FIN_S=8, FIN_C=256)
KERNELS = {
    "_bn_stats_kernel": (_bn_stats_kernel, [
        {**_PLAN, **_FIN},
        {**_PLAN, **_FIN, "OUT": tl.float32, "ACT": 0, "EMA": False, "SYMMETRIC": False,
         "HAS_BIAS": True, "CUMULATIVE": True},
        dict(ROWS32=True, BLOCK_R=2048, BLOCK_C=1, **{**_FIN, "OUT": tl.float16, "ACT": 2,
                                                       "OBSERVE": False})]),
    "_bn_apply_kernel": (_bn_apply_kernel, [dict(BWD=b, ACT=r, **_PLAN)
                                            for b in (False, True) for r in (1, 2)]),
    "_bn_bwd_reduce_kernel": (_bn_bwd_reduce_kernel, [dict(ACT=r, FIN_S=8, FIN_C=256, **_PLAN)
                                                      for r in (0, 2)]),
}

OPS = {"bn_normalize_observe_fake_quant": bn_normalize_observe_fake_quant}
