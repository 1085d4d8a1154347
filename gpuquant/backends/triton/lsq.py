"""LSQ and TQT fake quantization with the scale (threshold) gradient fused into the backward.

Ops (signatures and gradients as defined in :mod:`gpuquant.quantization.fake_quant`, whose
torch code is the definition):

``lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor) -> y``
    ``scale`` float32 (0-d, or (C,) along ``axis``), ``zero_point`` float32 of the same shape
    (the forward uses ``clamp(rne(zero_point), qmin, qmax)``); differentiable in ``x``,
    ``scale`` and ``zero_point`` (torch's ``_fake_quantize_learnable_*`` gradients).
``tqt_fake_quant(x, log2_t, qmin, qmax, axis) -> y``
    power-of-two scale ``2**ceil(log2_t) / (qmax + 1)``, zero point 0; differentiable in
    ``x`` and ``log2_t``.

Kernels:

* forward: the fake_quant kernel of :mod:`.fake_quant` (QMODE 1: float zero point rounded in
  the kernel; QMODE 2: scale built from ``log2_t`` in the kernel), writing ``y`` only;
  ``x`` is saved, since the scale gradient needs it anyway.
* backward: one launch, one pass over ``x`` and ``grad``: writes ``grad_x`` and, per (row
  split, channel), a partial sum of the scale (and zero point) gradient; the last program
  to finish (a ticket, :func:`.common.launch_tickets`) adds the partials of each channel in
  a fixed order. Bytes: read x + grad, write grad_x (3E an element) plus ``split x C``
  floats. The reduction is deterministic (the same partition and order every call on a
  device; the atomics only elect the program that finishes).

Per-channel along any axis and channels_last without a copy (rows x channels tiles, see
:func:`.fake_quant.row_plan`); float32 / float16 / bfloat16 ``x``; math in float32 with
fusion off (every product rounded as torch rounds it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (cdiv, last_to_finish, launch_tickets, once_differentiable_kernels,
                     to_f32)
from .fake_quant import (_LAUNCH, _learned_zp, _npow2, _rne, _row_offsets, _to_out,
                         _tqt_scale, as_rows, auto_interpreter, fake_quant_forward,
                         on_tensor_device, row_plan)
from .launch import launch

__all__ = ["lsq_fake_quant", "tqt_fake_quant", "OPS", "KERNELS"]

_LN2 = tl.constexpr(0.6931471805599453)  # math.log(2.0), as the torch definition uses


# --------------------------------------------------------------------------- kernels
@triton.jit
def _learned_bwd_kernel(
    # pointers
    x_ptr, g_ptr, gx_ptr, scale_ptr, zp_ptr, part_ptr,
    # row plan (see fake_quant.RowPlan)
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    # quantization
    qmin, qmax, grad_factor,
    # the sums out f32 (K, C); a ticket i32 (1,), zero between launches
    out_ptr, tick_ptr,
    # meta
    MODE: tl.constexpr, ROWS32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    FIN_S: tl.constexpr, FIN_C: tl.constexpr,
):
    """grad_x and per-(split, channel) partial sums of the qparam gradients; the last
    program to finish (a ticket taken after a barrier, reset by that program) sums the
    partials of every channel in a fixed order into ``out``: one launch.

    MODE 1 (LSQ): ``scale`` f32, ``zp`` f32 (rounded, clamped); partials ``part[0, sp, c]`` of
    d scale and ``part[1, sp, c]`` of d zero_point. MODE 2 (TQT): ``scale_ptr`` = log2_t;
    ``part[0, sp, c]`` of d log2_t (``((dy * inner) * s) * ln 2`` element by element, the
    torch definition's order).
    x, g, gx share strides; part: f32 (2, split, C).
    """
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if MODE == 2:
        s = _tqt_scale(tl.load(scale_ptr + c, mask=cm, other=0.0), qmax)
        zp = s * 0.0
    else:
        s = tl.load(scale_ptr + c, mask=cm, other=1.0)
        zp = _learned_zp(tl.load(zp_ptr + c, mask=cm, other=0.0), qmin, qmax)
    inv = tl.math.div_rn(1.0, s)
    s2 = s[None, :]
    inv2 = inv[None, :]
    zp2 = zp[None, :]
    coff = (c.to(tl.int64) * s_c)[None, :]
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for it in range(0, n_iter):
        roff, rm = _row_offsets(sp * n_iter + it, rows, inner, s_o, s_i, m_in, l_in, ROWS32,
                                BLOCK_R)
        off = roff[:, None] + coff
        m = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        dy = to_f32(tl.load(g_ptr + off, mask=m, other=0.0))
        if MODE == 2:
            v = x * inv2
            r = _rne(v)
        else:
            r = _rne(zp2 + x * inv2)  # torch's learnable kernels: rne(zp + x * inv)
        # a NaN r (a NaN x) is neither inside, below nor above: no gradient from there
        below = r < qmin
        above = r > qmax
        inside = (r >= qmin) & (r <= qmax)
        dx = dy * inside.to(tl.float32)
        tl.store(gx_ptr + off, _to_out(dx, gx_ptr.dtype.element_ty), mask=m)
        if MODE == 2:
            inn = tl.where(inside, r - v, tl.where(below, qmin, tl.where(above, qmax, 0.0)))
            d = ((dy * inn) * s2) * _LN2
            acc_s += tl.where(m, d, 0.0)
        else:
            xfq = (tl.minimum(tl.maximum(r, qmin), qmax) - zp2) * s2
            ds_in = ((dy * (xfq - x)) * inv2) * grad_factor
            ds_out = tl.where(below, dy * (qmin - zp2),
                              tl.where(above, dy * (qmax - zp2), 0.0)) * grad_factor
            ds = tl.where(inside, ds_in, ds_out)
            dz = tl.where(below | above, ((dy * -1.0) * s2) * grad_factor, 0.0)
            acc_s += tl.where(m, ds, 0.0)
            acc_z += tl.where(m, dz, 0.0)
    base = sp.to(tl.int64) * C + c
    tl.store(part_ptr + base, tl.sum(acc_s, axis=0), mask=cm)
    if MODE == 1:
        tl.store(part_ptr + split * C + base, tl.sum(acc_z, axis=0), mask=cm)
    if last_to_finish(tick_ptr, tl.num_programs(0) * tl.num_programs(1)):
        _sum_partials(part_ptr, out_ptr, split, C, 2 if MODE == 1 else 1, FIN_S, FIN_C)


@triton.jit
def _sum_partials(part_ptr, out_ptr, split, C, K, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[k, c] = sum over sp of part[k, sp, c] (f32 (K, split, C) -> (K, C)), in a fixed
    order; the partials were written by other multiprocessors, so read past L1."""
    for k in range(0, K):
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
            base = k * split * C
            for s0 in range(0, split, BLOCK_S):
                sp = s0 + tl.arange(0, BLOCK_S)
                m = (sp < split)[:, None] & cm[None, :]
                acc += tl.load(part_ptr + base + sp.to(tl.int64)[:, None] * C + c[None, :],
                               mask=m, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + k * C + c, tl.sum(acc, axis=0), mask=cm)


# --------------------------------------------------------------------------- launchers


@on_tensor_device
def learned_backward(x: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                     zero_point: Optional[torch.Tensor], qmin: int, qmax: int,
                     axis: Optional[int], grad_factor: float, mode: int,
                     programs: Optional[int] = None, tile: int = 2048):
    """(grad_x in x's layout, d scale-or-log2_t (C,), d zero_point (C,) or None).
    ``x`` must already be :func:`as_rows`-shaped."""
    if grad.stride() != x.stride():
        g2 = torch.empty_like(x, dtype=grad.dtype)
        g2.copy_(grad)
        grad = g2
    gx = torch.empty_like(x)
    plan = row_plan(x, axis, tile=tile, programs=programs)
    K = 2 if mode == 1 else 1
    part = torch.empty((K, plan.split, plan.C), dtype=torch.float32, device=x.device)
    sums = torch.empty((K, plan.C), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        sums.zero_()
    else:
        zp = zero_point.detach().float() if mode == 1 else scale
        fin_c = min(_npow2(plan.C), 128)
        launch(_learned_bwd_kernel, (cdiv(plan.C, plan.block_c), plan.split), x, grad, gx,
               scale.detach().float(), zp, part, *plan.kernel_args(), float(qmin), float(qmax),
               float(grad_factor), sums, launch_tickets(1, x.device), MODE=mode,
               ROWS32=plan.rows32, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
               FIN_S=max(1, min(_npow2(plan.split), 2048 // fin_c)), FIN_C=fin_c, num_warps=4,
               **_LAUNCH)
    dz = sums[1] if mode == 1 else None
    return gx, sums[0], dz


class LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor, plan_args=(None, 2048)):
        x = as_rows(x, axis)
        y, _ = fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, False, qmode=1)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis, grad_factor, plan_args)
        return y

    @staticmethod
    @once_differentiable_kernels("LSQ fake quantization")
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis, g, plan_args = ctx.args
        gx, ds, dz = learned_backward(x, grad, scale, zero_point, qmin, qmax, axis, g, 1,
                                      *plan_args)
        ds = ds.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[1] else None
        dz = dz.reshape(zero_point.shape).to(zero_point.dtype) if ctx.needs_input_grad[2] \
            else None
        return gx, ds, dz, None, None, None, None, None


class TQTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log2_t, qmin, qmax, axis, plan_args=(None, 2048)):
        x = as_rows(x, axis)
        y, _ = fake_quant_forward(x, log2_t, None, qmin, qmax, axis, False, qmode=2)
        ctx.save_for_backward(x, log2_t)
        ctx.args = (qmin, qmax, axis, plan_args)
        return y

    @staticmethod
    @once_differentiable_kernels("TQT fake quantization")
    def backward(ctx, grad):
        x, log2_t = ctx.saved_tensors
        qmin, qmax, axis, plan_args = ctx.args
        gx, dl, _ = learned_backward(x, grad, log2_t, None, qmin, qmax, axis, 1.0, 2, *plan_args)
        dl = dl.reshape(log2_t.shape).to(log2_t.dtype) if ctx.needs_input_grad[1] else None
        return gx, dl, None, None, None, None


def _check(x, params, qmin, qmax, axis, fn):
    """The public functions' argument checks (:mod:`gpuquant.quantization.fake_quant`), for
    callers of this op itself; returns the axis, non-negative."""
    from ...quantization.fake_quant import _check_learned_args
    return _check_learned_args(fn, x, params, qmin, qmax, axis)


def lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor, *, programs=None,
                   tile=2048):
    """LSQ fake quantization (see the module docstring).

    Args:
        x: float32 / float16 / bfloat16, any layout.
        scale: float32, positive; 0-d (axis None) or (C,).
        zero_point: float32 of scale's shape.
        qmin, qmax: the integer range.
        axis: None or the non-negative channel axis.
        grad_factor: the LSQ gradient scale (Python float).
        programs, tile: programs the reduction aims for and elements a tile (tests; by
            default 4 per SM on the GPU and 2048).

    Raises:
        TypeError: x or qparams of the wrong dtype.
        ValueError: bad axis or range, shapes or devices that do not match.
    """
    axis = _check(x, {"scale": scale, "zero_point": zero_point}, qmin, qmax, axis,
                  "lsq_fake_quant")
    if auto_interpreter(x):  # CPU without use("triton"): the torch definition, not the interpreter
        from ...quantization.fake_quant import _LSQFakeQuant
        return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)
    return LSQFunction.apply(x, scale, zero_point, int(qmin), int(qmax), axis,
                             float(grad_factor), (programs, tile))


def tqt_fake_quant(x, log2_t, qmin, qmax, axis, *, programs=None, tile=2048):
    """TQT fake quantization (see the module docstring).

    Args:
        x: float32 / float16 / bfloat16, any layout.
        log2_t: float32 learned log2 threshold; 0-d (axis None) or (C,).
        qmin, qmax: the integer range.
        axis: None or the non-negative channel axis.

    Raises:
        TypeError, ValueError: as :func:`lsq_fake_quant`.
    """
    axis = _check(x, {"log2_t": log2_t}, qmin, qmax, axis, "tqt_fake_quant")
    if auto_interpreter(x):  # CPU without use("triton"): the torch definition, not the interpreter
        from ...quantization.fake_quant import _TQTFakeQuant
        return _TQTFakeQuant.apply(x, log2_t, qmin, qmax, axis)
    return TQTFunction.apply(x, log2_t, int(qmin), int(qmax), axis, (programs, tile))


KERNELS = {
    "_learned_bwd_kernel": (_learned_bwd_kernel, [
        dict(MODE=m, ROWS32=r32, BLOCK_R=br, BLOCK_C=bc, FIN_S=16, FIN_C=128)
        for m, r32, br, bc in ((1, False, 2048, 1), (1, True, 32, 64), (2, False, 32, 64))
    ]),
}

OPS = {"lsq_fake_quant": lsq_fake_quant, "tqt_fake_quant": tqt_fake_quant}
