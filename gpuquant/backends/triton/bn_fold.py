"""Folded Conv+BN training in few launches (Triton): ops ``bn_fold_weight`` and
``bn_normalize_train``, the fused forms of :func:`gpuquant.nn.qat.bn_train.fold_weight` and
:func:`gpuquant.nn.qat.bn_train.normalize_train` (the definitions, and the formulas).

Written out with PyTorch ops, a layer's per-channel arithmetic (the fold factor, the
per-channel epsilon, the running-statistics update, their gradients) is about 45 launches on
vectors of C values, each costing the host a launch and the GPU a few microseconds even in a
CUDA graph: for resnet50, more GPU time than its 53 BatchNorms take in the float step. Here:

* ``bn_fold_weight``: forward one kernel (a program per output channel: fold factor ``t``,
  ``W``, ``E`` and the folded weight row); backward one kernel (the row's gradient and the
  gamma gradient, whose row reduction ``sum(grad_w_fold * w)`` it computes in the same pass);
* ``bn_normalize_train``: forward the statistics pass (``torch.batch_norm_stats`` on CUDA),
  one program that finishes them (variance, ``1 / sqrt(var + E)``, the running-statistics
  update in place, ``num_batches_tracked``) and the normalising pass (``batch_norm`` in eval
  form); backward PyTorch's fused batch-norm backward and one multiply for ``E``'s gradient.

Float32 throughout; each operation rounded on its own (fusion off, ``div_rn`` / ``sqrt_rn``),
so results agree with the definitions to float32 rounding (not bit for bit: autograd
orders the gradient arithmetic differently). Returns None (the caller runs the definition)
for layouts it does not take: a weight whose output-channel rows are not contiguous blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._tensors import batch_norm_eps0
from .common import last_to_finish, module_tickets, once_differentiable_kernels, to_f32
from .fake_quant import (_LAUNCH, _TL_DTYPE, _fq_math, _npow2, _to_out, auto_interpreter,
                         on_tensor_device)
from .launch import launch
from .observer import (_INF, _NINF, _observer_consts, _supported_observer, _update_state,
                       device_pair_ok, mark_observed, observer_state)

__all__ = ["bn_fold_weight", "bn_fold_observe_fake_quant", "bn_fold_frozen_observe_fake_quant",
           "observe_rows_fake_quant", "bn_normalize_train", "OPS", "KERNELS"]

_ROW_BLOCK = 1024


# --------------------------------------------------------------------------- kernels
@triton.jit
def _fold_factor(g, rv, eps, min_gamma):
    """(t, sign, sigma) of one channel, each operation rounded as torch rounds it."""
    sigma = tl.sqrt_rn(rv + eps)
    sgn = tl.where(g < 0, -1.0, 1.0)
    # NaN gamma stays NaN, as torch's clamp keeps it (the GPU's plain max would drop it)
    t = tl.math.div_rn(sgn * tl.maximum(tl.abs(g), min_gamma, propagate_nan=tl.PropagateNan.ALL),
                       sigma)
    return t, sgn, sigma


@triton.jit
def _fold_fwd_kernel(w_ptr, gamma_ptr, rv_ptr, wf_ptr, t_ptr, W_ptr, E_ptr, sigma_ptr,
                     L, eps, min_gamma,
                     # FQ only: qparams out f32 (C,), observer min / max f32 (C,), its
                     # nonfinite_batches i64 (1,), ticket i32 (2,) (zero between launches)
                     qs_ptr, qz_ptr, min_ptr, max_ptr, bad_ptr, tick_ptr, C,
                     c_ema, q_eps, qmin, qmax, half_range, zp_sym,
                     # FROZEN only: beta, running mean, conv bias (HAS_B) in; folded bias out
                     beta_ptr, rm_ptr, b_ptr, bf_ptr,
                     BLOCK: tl.constexpr, FQ: tl.constexpr = False,
                     OBSERVE: tl.constexpr = False, EMA: tl.constexpr = False,
                     SYMMETRIC: tl.constexpr = True, FROZEN: tl.constexpr = False,
                     HAS_B: tl.constexpr = False, FOLD: tl.constexpr = True,
                     OUT: tl.constexpr = tl.float32):
    """Program c: t, W = gamma * sign, E = eps * t * t, sigma, and w_fold[c] = w[c] * t.
    ``wf`` is written in OUT (float32, or the convolution's autocast dtype: the float32
    value rounded to nearest even, as ``.to(dtype)`` rounds it, in the same pass).

    FROZEN (running statistics: eval, or frozen BatchNorm): t = gamma / sigma as it is (no
    clamp), and the folded bias ``beta + (b - running_mean) * t`` to ``bf`` (W, E not
    written), as ``BnFoldedModule.folded_weight_bias`` computes them.

    FOLD False (with FQ): no BatchNorm, t = 1 (``w * 1`` is ``w``, NaN and -0 included):
    the per-channel observe + fake quant of a weight in one launch; nothing but ``wf``,
    the state and ``qs`` / ``qz`` is written.

    FQ: ``wf_ptr`` gets ``fake_quant(w[c] * t)`` instead, with the channel's qparams from its
    per-channel observer state, updated first from this row's min / max when OBSERVE (the
    arithmetic of :mod:`.observer`, so the state and the bytes equal the unfused path's);
    the qparams go to ``qs`` / ``qz`` for the backward. Non-finite rows leave their state
    and add 1 to ``bad`` once a launch: each program ORs its flag into ``tick[1]`` and takes
    a ticket from ``tick[0]``; the last one adds the flag and zeroes both."""
    c = tl.program_id(0)
    if not FOLD:
        t = 1.0
    elif FROZEN:
        g = tl.load(gamma_ptr + c)
        sigma = tl.sqrt_rn(tl.load(rv_ptr + c) + eps)
        t = tl.math.div_rn(g, sigma)
        if HAS_B:
            bm = tl.load(b_ptr + c) - tl.load(rm_ptr + c)
        else:
            bm = 0.0 - tl.load(rm_ptr + c)
        tl.store(bf_ptr + c, tl.load(beta_ptr + c) + bm * t)
    else:
        g = tl.load(gamma_ptr + c)
        t, sgn, sigma = _fold_factor(g, tl.load(rv_ptr + c), eps, min_gamma)
        tl.store(W_ptr + c, g * sgn)
        tl.store(E_ptr + c, (eps * t) * t)
    if FOLD:
        tl.store(t_ptr + c, t)
        tl.store(sigma_ptr + c, sigma)
    base = c.to(tl.int64) * L
    if FQ:
        old_min = tl.load(min_ptr + c)
        old_max = tl.load(max_ptr + c)
        if OBSERVE:
            vmin = tl.full((BLOCK,), _INF, tl.float32)
            vmax = tl.full((BLOCK,), _NINF, tl.float32)
            for off in range(0, L, BLOCK):
                i = off + tl.arange(0, BLOCK)
                m = i < L
                wf = tl.load(w_ptr + base + i, mask=m, other=0.0) * t
                nan = wf != wf
                vmin = tl.minimum(vmin, tl.where(m, tl.where(nan, _NINF, wf), _INF))
                vmax = tl.maximum(vmax, tl.where(m, tl.where(nan, _INF, wf), _NINF))
            mn = tl.min(vmin, axis=0)
            mx = tl.max(vmax, axis=0)
            ok = (tl.abs(mn) < _INF) & (tl.abs(mx) < _INF)
        else:  # a frozen observer: qparams of the state as it is
            mn = old_min
            mx = old_max
            ok = c < 0
        new_min, new_max, s, zp, ok = _update_state(mn, mx, ok, old_min, old_max, c_ema,
                                                    q_eps, qmin, qmax, half_range, zp_sym, EMA,
                                                    SYMMETRIC)
        inv = tl.math.div_rn(1.0, s)
        tl.store(qs_ptr + c, s)
        tl.store(qz_ptr + c, zp)
        for off in range(0, L, BLOCK):
            i = off + tl.arange(0, BLOCK)
            m = i < L
            wf = tl.load(w_ptr + base + i, mask=m, other=0.0) * t
            y, _ = _fq_math(wf, inv, s, zp, qmin, qmax)
            tl.store(wf_ptr + base + i, _to_out(y, OUT), mask=m)
        if OBSERVE:
            tl.store(min_ptr + c, new_min)
            tl.store(max_ptr + c, new_max)
            tl.atomic_or(tick_ptr + 1, 1, mask=~ok)  # only the rare non-finite rows
            if last_to_finish(tick_ptr, C):
                anybad = tl.atomic_xchg(tick_ptr + 1, 0)
                tl.store(bad_ptr, tl.load(bad_ptr) + anybad.to(tl.int64))
    else:
        for off in range(0, L, BLOCK):
            i = off + tl.arange(0, BLOCK)
            m = i < L
            w = tl.load(w_ptr + base + i, mask=m, other=0.0)
            tl.store(wf_ptr + base + i, _to_out(w * t, OUT), mask=m)


@triton.jit
def _fold_bwd_kernel(gwf_ptr, w_ptr, gamma_ptr, t_ptr, sigma_ptr, gW_ptr, gE_ptr, gw_ptr, gg_ptr,
                     L, eps, min_gamma, qs_ptr, qz_ptr, qmin, qmax,
                     # FROZEN only: grad of the folded bias, running mean, conv bias (HAS_B)
                     # in; grads of beta and of the conv bias out
                     gbf_ptr, rm_ptr, b_ptr, gbeta_ptr, gb_ptr,
                     NEED_W: tl.constexpr, BLOCK: tl.constexpr, FQ: tl.constexpr = False,
                     FROZEN: tl.constexpr = False, HAS_B: tl.constexpr = False,
                     FOLD: tl.constexpr = True):
    """Program c: grad_w[c] = grad_w_fold[c] * t and
    grad_gamma = (sum(grad_w_fold[c] * w[c]) + grad_E * 2 eps t) * dt/dgamma + grad_W * sign,
    dt/dgamma = 1 / sigma where min_gamma <= |gamma| (gamma != 0), else 0 (clamp, abs).
    FQ: ``gwf_ptr`` holds the gradient of the fake-quantized weight; the straight-through
    mask (in range of the forward's qparams ``qs`` / ``qz``) is recomputed from w * t.
    FROZEN (t = gamma / sigma, folded bias ``beta + (b - mean) t``): grad_gamma =
    (sum(grad_w_fold * w) + grad_bf * (b - mean)) / sigma, grad_beta = grad_bf,
    grad_b = grad_bf * t. FOLD False (with FQ): t = 1, only grad_w (the masked gradient)."""
    c = tl.program_id(0)
    if FOLD:
        t = tl.load(t_ptr + c)
    else:
        t = 1.0
    s = t  # the qparams (FQ), defined on every path for the compiler
    zp = t
    inv = t
    if FQ:
        s = tl.load(qs_ptr + c)
        zp = tl.load(qz_ptr + c)
        inv = tl.math.div_rn(1.0, s)
    base = c.to(tl.int64) * L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, L, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < L
        gwf = to_f32(tl.load(gwf_ptr + base + i, mask=m, other=0.0))  # (bf16: exact)
        w = tl.load(w_ptr + base + i, mask=m, other=0.0)
        if FQ:  # grad * mask as the fake quant's backward computes it
            _, inr = _fq_math(w * t, inv, s, zp, qmin, qmax)
            gwf = gwf * inr.to(tl.float32)
        acc += gwf * w
        if NEED_W:
            tl.store(gw_ptr + base + i, gwf * t, mask=m)
    if not FOLD:
        pass
    elif FROZEN:
        gbf = tl.load(gbf_ptr + c)
        if HAS_B:
            bm = tl.load(b_ptr + c) - tl.load(rm_ptr + c)
            tl.store(gb_ptr + c, gbf * t)
        else:
            bm = 0.0 - tl.load(rm_ptr + c)
        tl.store(gbeta_ptr + c, gbf)
        tl.store(gg_ptr + c, tl.math.div_rn(tl.sum(acc, axis=0) + gbf * bm,
                                            tl.load(sigma_ptr + c)))
    else:
        g = tl.load(gamma_ptr + c)
        sgn = tl.where(g < 0, -1.0, 1.0)
        live = (tl.abs(g) >= min_gamma) & (g != 0)
        gt = tl.sum(acc, axis=0) + tl.load(gE_ptr + c) * ((2.0 * eps) * t)
        dt = tl.where(live, tl.math.div_rn(gt, tl.load(sigma_ptr + c)), 0.0)
        tl.store(gg_ptr + c, dt + tl.load(gW_ptr + c) * sgn)


@triton.jit
def count_batch(nbt_ptr, momentum, CUMULATIVE: tl.constexpr):
    """num_batches_tracked += 1; returns the running statistics' lerp factor: ``momentum``,
    or 1 / num_batches_tracked when CUMULATIVE (BatchNorm's momentum None)."""
    nbt = tl.load(nbt_ptr) + 1
    tl.store(nbt_ptr, nbt)
    if CUMULATIVE:
        return tl.math.div_rn(1.0, nbt.to(tl.float32))
    else:
        return momentum


@triton.jit
def running_update(mean, var, c, cm, t_ptr, b_ptr, rm_ptr, rv_ptr, f, unbias,
                   HAS_BIAS: tl.constexpr):
    """BatchNorm's running-statistics update for channels ``c`` (mask ``cm``) of the folded
    layer: the float layer's mean ``mean / t + bias`` and unbiased variance
    ``var / t^2 * unbias``, lerped in with factor ``f`` (momentum or 1 / batches)."""
    t = tl.load(t_ptr + c, mask=cm, other=1.0)
    m_new = tl.math.div_rn(mean, t)
    if HAS_BIAS:
        m_new = m_new + tl.load(b_ptr + c, mask=cm, other=0.0)
    v_new = tl.math.div_rn(var, t * t) * unbias
    rm = tl.load(rm_ptr + c, mask=cm, other=0.0)
    rv = tl.load(rv_ptr + c, mask=cm, other=0.0)
    tl.store(rm_ptr + c, _lerp(rm, m_new, f), mask=cm)
    tl.store(rv_ptr + c, _lerp(rv, v_new, f), mask=cm)


@triton.jit
def _lerp(a, b, f):
    """``torch.lerp(a, b, f)``'s formula: from the nearer end, so ``f = 1`` (momentum 1, or
    the first batch of a cumulative average) gives ``b`` exactly, not ``a + (b - a)``."""
    d = b - a
    return tl.where(f < 0.5, a + f * d, b - d * (1.0 - f))


@triton.jit
def _stats_finish_kernel(mean_ptr, s_ptr, E_ptr, W_ptr, t_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr,
                         var_eps_ptr, invstd_ptr, k_ptr, C, momentum, unbias,
                         FROM_INVSTD: tl.constexpr, HAS_BIAS: tl.constexpr,
                         CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program. ``s`` holds the biased variance, or (FROM_INVSTD) ``batch_norm_stats``'s
    1 / sqrt(var) with eps 0 (0 where var is 0). Writes var + E, 1 / sqrt(var + E) and
    k = -W / (2 (var + E)) (d y / d E = k * xhat); updates the running statistics with
    mean / t + bias and var / t^2 * n / (n - 1) as BatchNorm does (lerp; momentum or, when
    CUMULATIVE, 1 / num_batches_tracked), and num_batches_tracked += 1."""
    f = count_batch(nbt_ptr, momentum, CUMULATIVE)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
        s = tl.load(s_ptr + c, mask=cm, other=1.0)
        if FROM_INVSTD:  # (a NaN batch's NaN invstd gives a NaN var, as torch.var_mean,
            # not 0: finite running statistics; the CUDA-only path the interpreter never runs)
            var = tl.where(s > 0, tl.math.div_rn(1.0, s * s), tl.where(s == 0, 0.0, s))
        else:
            var = s
        ve = var + tl.load(E_ptr + c, mask=cm, other=1.0)
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(ve))
        tl.store(var_eps_ptr + c, ve, mask=cm)
        tl.store(invstd_ptr + c, inv, mask=cm)
        tl.store(k_ptr + c, -0.5 * tl.load(W_ptr + c, mask=cm, other=0.0) * (inv * inv), mask=cm)
        running_update(mean, var, c, cm, t_ptr, b_ptr, rm_ptr, rv_ptr, f, unbias, HAS_BIAS)


# --------------------------------------------------------------------------- autograd
def _rows_contiguous(w: torch.Tensor) -> bool:
    """Whether each output channel's elements (dimension 0) are one contiguous block."""
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        return True
    return w.is_contiguous()


def _fq_args(observer, C: int, t: torch.Tensor, qs=None, qz=None):
    """The fused weight kernel's fake-quant arguments: (qs, qz, positional args, (qmin, qmax),
    constexprs); ``observer`` None: no fake quant (``t`` fills the unused pointers). ``qs``,
    ``qz``: where the qparams go (None: new tensors)."""
    if observer is None:
        return t, t, (t, t, t, t, t, t, C, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0), \
            dict(FQ=False)
    if qs is None:
        qs, qz = torch.empty(C, dtype=torch.float32, device=t.device), \
            torch.empty(C, dtype=torch.float32, device=t.device)
    consts = _observer_consts(observer)
    meta = dict(FQ=True, OBSERVE=observer.enabled, EMA=_supported_observer(observer),
                SYMMETRIC=observer.symmetric)
    state = observer_state(observer)
    tick = module_tickets(observer, state[0].device)
    return qs, qz, (qs, qz, *state, tick, C) + consts, consts[2:4], meta


def _dense_grad(g, like):
    """``g`` in ``like``'s layout (zeros for an absent gradient); a gradient may arrive
    expanded (stride 0, e.g. from a sum) or in another layout."""
    if g is None:
        return torch.zeros_like(like)
    if g.stride() != like.stride():
        return torch.empty_like(like).copy_(g)
    return g


FOLD_VECTORS = 6  # t, W, E, sigma and the qparams (scale, zero point): float32 (C,) each


def pad16(n: int) -> int:
    """``n`` float32 elements rounded up to a multiple of 16 bytes: vectors placed one after
    another at these steps in one buffer keep the 16-byte alignment Triton specializes on."""
    return (n + 3) & ~3


def fold_vectors(buf: torch.Tensor, C: int) -> tuple:
    """(t, W, E, sigma, scale, zero point): the fold's float32 (C,) vectors in ``buf``
    (:data:`FOLD_VECTORS` x :func:`pad16` (C) elements at least), each 16-byte aligned."""
    return buf.as_strided((FOLD_VECTORS, C), (pad16(C), 1)).unbind(0)


def fold_forward(w, gamma, running_var, eps, min_gamma, observer=None, out_dtype=None,
                 out=None):
    """The training fold's forward launch (and, given an observer, its observe + fake
    quant): ``(wf, t, W, E, saved)``; ``saved`` is what :func:`fold_backward` needs. ``wf``
    in ``out_dtype`` (default w's): ``wf.to(out_dtype)``'s bytes without the cast's launch.
    ``out``: ``(wf, buf)`` to write into (``buf`` as :func:`fold_vectors` reads it), else
    new tensors."""
    C = w.shape[0]
    L = w.numel() // C
    if out is None:
        wf = torch.empty_like(w, dtype=out_dtype)
        buf = torch.empty(FOLD_VECTORS * pad16(C), dtype=torch.float32, device=w.device)
    else:
        wf, buf = out
    t, W, E, sigma, qs, qz = fold_vectors(buf, C)
    qs, qz, qargs, qmm, fq = _fq_args(observer, C, t, qs, qz)
    launch(_fold_fwd_kernel, (C,), w, gamma, running_var, wf, t, W, E, sigma, L,
           float(eps), float(min_gamma), *qargs, t, t, t, t,
           BLOCK=min(_ROW_BLOCK, _npow2(L)), OUT=_TL_DTYPE[wf.dtype], num_warps=4, **fq,
           **_LAUNCH)
    return wf, t, W, E, ((sigma, qs, qz), (L, float(eps), float(min_gamma),
                                           observer is not None) + tuple(qmm))


def fold_backward(gwf, gW, gE, w, gamma, t, saved, need_w: bool):
    """The training fold's backward launch: ``(grad_w or None, grad_gamma)`` from the
    gradients of ``wf`` (in any layout and floating dtype, or None: read as float32, so a
    bfloat16 gradient needs no cast first), ``W`` and ``E`` (None: zero)."""
    (sigma, qs, qz), (L, eps, min_gamma, fq, qmin, qmax) = saved
    gwf = _dense_grad(gwf, w)
    gw = torch.empty_like(w) if need_w else gwf  # unused pointer without NEED_W
    gg = torch.empty_like(gamma, dtype=torch.float32)
    launch(_fold_bwd_kernel, (w.shape[0],), gwf, w, gamma, t, sigma,
           _dense_grad(gW, t).float(), _dense_grad(gE, t).float(), gw, gg, L, eps,
           min_gamma, qs, qz, qmin, qmax, t, t, t, t, t, NEED_W=need_w,
           BLOCK=min(_ROW_BLOCK, _npow2(L)), FQ=fq, num_warps=4, **_LAUNCH)
    return (gw if need_w else None), gg.to(gamma.dtype)


class _FoldWeight(torch.autograd.Function):
    """Fold (and, given an observer, observe + fake-quantize) in one launch forward and
    one backward: the training form (batch statistics, :func:`_fold_factor`)."""

    @staticmethod
    def forward(ctx, w, gamma, running_var, eps, min_gamma, observer=None):
        wf, t, W, E, saved = fold_forward(w, gamma, running_var, eps, min_gamma, observer)
        ctx.save_for_backward(w, gamma, t, *saved[0])
        ctx.consts = saved[1]
        ctx.mark_non_differentiable(t)
        ctx.set_materialize_grads(False)  # no zero-fill launch for t's (absent) gradient
        return wf, t, W, E

    @staticmethod
    @once_differentiable_kernels("batch-norm weight fold (training)")
    def backward(ctx, gwf, _gt, gW, gE):
        w, gamma, t, sigma, qs, qz = ctx.saved_tensors
        gw, gg = fold_backward(gwf, gW, gE, w, gamma, t, ((sigma, qs, qz), ctx.consts),
                               ctx.needs_input_grad[0])
        return gw, gg, None, None, None, None


class _FoldWeightFrozen(torch.autograd.Function):
    """The running-statistics fold (eval / frozen BatchNorm) + observe + fake quant of the
    weight, and the folded bias, in one launch forward and one backward."""

    @staticmethod
    def forward(ctx, w, gamma, beta, bias, running_mean, running_var, eps, observer):
        C = w.shape[0]
        L = w.numel() // C
        f32 = dict(dtype=torch.float32, device=w.device)
        wf = torch.empty_like(w)
        t, sigma, bf = (torch.empty(C, **f32) for _ in range(3))
        qs, qz, qargs, qmm, fq = _fq_args(observer, C, t)
        b = bias.detach() if bias is not None else t
        launch(_fold_fwd_kernel, (C,), w, gamma.detach(), running_var, wf, t, t, t, sigma, L,
               float(eps), 0.0, *qargs, beta.detach(), running_mean, b, bf,
               BLOCK=min(_ROW_BLOCK, _npow2(L)), FROZEN=True, HAS_B=bias is not None,
               num_warps=4, **fq, **_LAUNCH)
        ctx.save_for_backward(w, gamma, t, sigma, qs, qz, running_mean, b)
        ctx.consts = (L, float(eps), bias is not None) + tuple(qmm)
        ctx.set_materialize_grads(False)
        return wf, bf

    @staticmethod
    @once_differentiable_kernels("batch-norm weight fold (frozen statistics)")
    def backward(ctx, gwf, gbf):
        w, gamma, t, sigma, qs, qz, running_mean, b = ctx.saved_tensors
        L, eps, has_b, qmin, qmax = ctx.consts
        need_w = ctx.needs_input_grad[0]
        gwf = _dense_grad(gwf, w)
        gw = torch.empty_like(w) if need_w else gwf
        out = torch.empty(3 * t.numel(), dtype=torch.float32, device=t.device)
        gg, gbeta, gb = out[:t.numel()], out[t.numel():2 * t.numel()], out[2 * t.numel():]
        launch(_fold_bwd_kernel, (w.shape[0],), gwf, w, gamma.detach(), t, sigma, t, t, gw,
               gg, L, eps, 0.0, qs, qz, qmin, qmax, _dense_grad(gbf, t).float(), running_mean,
               b, gbeta, gb, NEED_W=need_w, BLOCK=min(_ROW_BLOCK, _npow2(L)), FQ=True,
               FROZEN=True, HAS_B=has_b, num_warps=4, **_LAUNCH)
        return ((gw if need_w else None), gg.to(gamma.dtype), gbeta, gb if has_b else None,
                None, None, None, None)


class _ObserveRows(torch.autograd.Function):
    """Per-channel observe + fake quant of a weight whose output-channel rows are
    contiguous blocks (no BatchNorm): one launch forward, one backward (the mask
    recomputed from ``w``)."""

    @staticmethod
    def forward(ctx, w, observer):
        C = w.shape[0]
        L = w.numel() // C
        wf = torch.empty_like(w)
        one = torch.empty(1, dtype=torch.float32, device=w.device)  # unused pointers
        qs, qz, qargs, qmm, fq = _fq_args(observer, C, one)
        launch(_fold_fwd_kernel, (C,), w, one, one, wf, one, one, one, one, L, 0.0, 0.0,
               *qargs, one, one, one, one, BLOCK=min(_ROW_BLOCK, _npow2(L)), FOLD=False,
               num_warps=4, **fq, **_LAUNCH)
        ctx.save_for_backward(w, qs, qz)
        ctx.consts = (L,) + tuple(qmm)
        return wf

    @staticmethod
    @once_differentiable_kernels("weight observe + fake quantization")
    def backward(ctx, gwq):
        w, qs, qz = ctx.saved_tensors
        L, qmin, qmax = ctx.consts
        gwq = _dense_grad(gwq, w)
        gw = torch.empty_like(w)
        launch(_fold_bwd_kernel, (w.shape[0],), gwq, w, qs, qs, qs, qs, qs, gw, qs, L, 0.0, 0.0,
               qs, qz, qmin, qmax, qs, qs, qs, qs, qs, NEED_W=True,
               BLOCK=min(_ROW_BLOCK, _npow2(L)), FQ=True, FOLD=False, num_warps=4, **_LAUNCH)
        return gw, None


def observe_rows_fake_quant(w: torch.Tensor, observer) -> Optional[torch.Tensor]:
    """``fake_quant(observer(w))`` for a supported per-channel observer along dimension 0
    of a float32 weight whose rows are contiguous blocks, in one launch (a program a
    channel: min / max, state update, fake quant) and one backward launch; None for what
    it does not take. The caller (:func:`.observer.observe_fake_quant`) has checked the
    observer / fake-quant pair."""
    if (w.dtype != torch.float32 or w.dim() < 2 or w.numel() == 0 or not _rows_contiguous(w)
            or observer.min_val.numel() != w.shape[0]):
        return None
    return _ObserveRows.apply(w, observer)


class _NormalizeTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, W, beta, E, t, bias, running_mean, running_var, nbt, momentum):
        C = z.shape[1]
        n = z.numel() // C
        f32 = dict(dtype=torch.float32, device=z.device)
        if z.is_cuda:  # Welford in float32, any dtype and layout (SyncBatchNorm's kernel)
            mean, s = torch.batch_norm_stats(z, 0.0)
        else:          # the interpreter (tests)
            s, mean = torch.var_mean(z.float(), dim=(0,) + tuple(range(2, z.dim())),
                                     correction=0)
        var_eps, invstd, k = (torch.empty(C, **f32) for _ in range(3))
        block_c = min(_npow2(C), 1024)
        launch(_stats_finish_kernel, (1,), mean, s, E, W, t, bias if bias is not None else mean,
               running_mean, running_var, nbt, var_eps, invstd, k, C,
               0.0 if momentum is None else float(momentum), n / (n - 1), FROM_INVSTD=z.is_cuda,
               HAS_BIAS=bias is not None, CUMULATIVE=momentum is None, BLOCK_C=block_c,
               num_warps=4, **_LAUNCH)
        # (z - mean) / sqrt(var + E) * W + beta: eval-form batch_norm, eps 0 (mixed dtypes)
        y = batch_norm_eps0(z, mean, var_eps, W, beta)
        ctx.save_for_backward(z, W, mean, invstd, k)
        return y

    @staticmethod
    @once_differentiable_kernels("batch-norm (training)")  # (E's second-order terms: none)
    def backward(ctx, gy):
        z, W, mean, invstd, k = ctx.saved_tensors
        need_z, need_w, need_b, need_e = ctx.needs_input_grad[:4]
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, z, W, None, None, mean, invstd, True, 0.0, [need_z, need_w or need_e, need_b])
        ge = k * gw if need_e else None
        return (gz, gw if need_w else None, gb, ge) + (None,) * 6


# --------------------------------------------------------------------------- ops
@on_tensor_device
def bn_fold_weight(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor,
                   eps: float, min_gamma: float):
    """Fused :func:`gpuquant.nn.qat.bn_train.fold_weight`; None for what it does not take."""
    if auto_interpreter(w):  # the interpreter only when chosen with use("triton")
        return None
    if (w.dtype != torch.float32 or gamma.dtype != torch.float32 or w.dim() < 2
            or running_var.dtype != torch.float32 or w.shape[0] != gamma.numel()
            or w.numel() == 0 or not _rows_contiguous(w)):
        return None
    return _FoldWeight.apply(w, gamma, running_var, eps, min_gamma, None)


def _weight_pair_ok(w: torch.Tensor, observer, fake_quant) -> bool:
    """Whether the fused weight kernel reproduces ``fake_quant(observer(w_fold))``: a plain
    enabled FakeQuantize of the observer's dtype, a MinMax / moving-average observer per
    output channel (axis 0) without host hooks, enabled, or disabled with qparams to give."""
    if not device_pair_ok(observer, fake_quant, w.device):
        return False
    if observer.axis is None or observer._resolve_axis(w) != 0:
        return False
    C = w.shape[0]
    if observer.enabled and observer._buffers["min_val"].numel() == 0:
        # first batch: size the state, as the observer does
        observer._prepare_state(torch.empty(C, dtype=torch.float32, device=w.device))
    return observer._buffers["min_val"].numel() == C


@on_tensor_device
def bn_fold_observe_fake_quant(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor,
                               eps: float, min_gamma: float, observer, fake_quant):
    """:func:`bn_fold_weight`, then ``fake_quant(observer(w_fold))`` with the observer's new
    qparams, in one launch (one program an output channel: the row's min / max, the state
    update, the fake quant) and one backward launch (the straight-through mask recomputed
    from ``w * t``, then the fold's gradients): ``(w_fq, t, W, E)``, or None for what it does
    not take (the caller then folds and fake-quantizes in separate steps)."""
    if auto_interpreter(w):
        return None
    if (w.dtype != torch.float32 or gamma.dtype != torch.float32 or w.dim() < 2
            or running_var.dtype != torch.float32 or w.shape[0] != gamma.numel()
            or w.numel() == 0 or not _rows_contiguous(w)):
        return None
    if not _weight_pair_ok(w, observer, fake_quant):
        return None
    mark_observed(observer)
    return _FoldWeight.apply(w, gamma, running_var, eps, min_gamma, observer)


@on_tensor_device
def bn_fold_frozen_observe_fake_quant(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                      bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                                      running_var: torch.Tensor, eps: float, observer,
                                      fake_quant):
    """The running-statistics fold of ``BnFoldedModule.folded_weight_bias`` (eval, frozen
    BatchNorm: ``t = gamma / sigma``), then ``fake_quant(observer(w * t))``, in one launch:
    ``(w_fq, folded bias)``, or None for what it does not take."""
    if auto_interpreter(w):
        return None
    vecs = (gamma, beta, running_mean, running_var) + ((bias,) if bias is not None else ())
    if (w.dtype != torch.float32 or w.dim() < 2 or w.numel() == 0 or not _rows_contiguous(w)
            or any(v.dtype != torch.float32 or v.numel() != w.shape[0] or v.dim() != 1
                   or v.device != w.device for v in vecs)):
        return None
    if not _weight_pair_ok(w, observer, fake_quant):
        return None
    mark_observed(observer)
    return _FoldWeightFrozen.apply(w, gamma, beta.contiguous(), bias, running_mean.contiguous(),
                                   running_var.contiguous(), eps, observer)


@on_tensor_device
def bn_normalize_train(z: torch.Tensor, W, beta, E, t, bn, bias=None) -> Optional[torch.Tensor]:
    """Fused :func:`gpuquant.nn.qat.bn_train.normalize_train` (local batch statistics); None
    for what it does not take."""
    if auto_interpreter(z):
        return None
    if (z.dim() < 2 or z.numel() == 0 or bn.running_mean.dtype != torch.float32
            or any(v.dtype != torch.float32 for v in (W, beta, E, t))):
        return None
    b = bias.detach().float() if bias is not None else None
    return _NormalizeTrain.apply(z, W, beta, E, t, b, bn.running_mean, bn.running_var,
                                 bn.num_batches_tracked, bn.momentum)


KERNELS = {
    "_fold_fwd_kernel": (_fold_fwd_kernel, [dict(BLOCK=_ROW_BLOCK)] + [
        dict(BLOCK=_ROW_BLOCK, FQ=True, OBSERVE=o, EMA=e, SYMMETRIC=s)
        for o, e, s in ((True, False, True), (True, True, False), (False, False, True))] + [
        dict(BLOCK=_ROW_BLOCK, FQ=True, OBSERVE=True, FROZEN=True, HAS_B=b)
        for b in (False, True)] + [dict(BLOCK=_ROW_BLOCK, FQ=True, OBSERVE=True, FOLD=False)] + [
        # the one-node layer's form under bf16 autocast: the weight written in bfloat16
        dict(BLOCK=_ROW_BLOCK, FQ=True, OBSERVE=True, EMA=False, SYMMETRIC=True,
             OUT=tl.bfloat16)]),
    "_fold_bwd_kernel": (_fold_bwd_kernel, [dict(NEED_W=True, BLOCK=_ROW_BLOCK),
                                            dict(NEED_W=True, BLOCK=_ROW_BLOCK, FQ=True),
                                            dict(NEED_W=True, BLOCK=_ROW_BLOCK, FQ=True,
                                                 FROZEN=True, HAS_B=True),
                                            dict(NEED_W=True, BLOCK=_ROW_BLOCK, FQ=True,
                                                 FOLD=False)]),
    "_stats_finish_kernel": (_stats_finish_kernel, [
        dict(FROM_INVSTD=fi, HAS_BIAS=hb, CUMULATIVE=cu, BLOCK_C=1024)
        for fi, hb, cu in ((True, False, False), (False, True, True))]),
}

OPS = {"bn_fold_weight": bn_fold_weight, "bn_fold_observe_fake_quant": bn_fold_observe_fake_quant,
       "bn_fold_frozen_observe_fake_quant": bn_fold_frozen_observe_fake_quant,
       "bn_normalize_train": bn_normalize_train}
