"""Fused observer + fake-quant for QAT (Triton): op ``observe_fake_quant``.

``observe_fake_quant(x, observer, fake_quant) -> y or None``
    Records ``x`` in ``observer`` and fake-quantizes it with the qparams that result, leaving
    the observer's state, its qparams and ``y`` exactly as
    ``fake_quant(observer(x), observer.get_qparams())`` would (the definition in
    :func:`gpuquant.quantization.fake_quant.apply_fake_quant_with_observer`). Returns None for
    pairs it does not handle (the caller then runs the definition): handled are an enabled
    :class:`MinMaxObserver` / :class:`ExponentialMovingAverageObserver` (and their Sync
    variants), per-tensor or per-channel, with an enabled plain :class:`FakeQuantize` of the
    same dtype; on CPU tensors (the interpreter) only under ``gpuquant.backends.use("triton")``.

Float32 weights observed per output channel (rows contiguous) take one launch, a program a
channel (:func:`.bn_fold.observe_rows_fake_quant`). Other observers without host hooks
(``check_finite=False``, not distributed), per tensor or per channel with the channels
outermost in memory, take two launches: ``_observe_partial_kernel`` (partial min / max; the
last of its programs to finish, by the observer's ticket, reduces the partials, updates the
state and writes the qparams) and ``_observe_fq_kernel`` (the fake quant with those
qparams; per channel, each element's channel from its offset). Otherwise (host hooks,
channels not outermost: activations per channel), three:

Passes (no host synchronisation when the observer has ``check_finite=False``):

1. ``_minmax_partial_kernel``: one read of ``x``: per (row split, channel) minimum and
   maximum (NaN counts as -inf / +inf, as the observer maps it), any axis and layout
   (rows x channels tiles, :func:`.fake_quant.row_plan`).
2. ``_observer_update_kernel``: one tiny program: reduces the partials, checks finiteness,
   applies the MinMax or moving-average update to the observer's ``min_val`` / ``max_val``
   buffers in place, and computes scale and zero point with ``torch.ao``'s formulas, each
   operation rounded as the torch code rounds it (fusion off, ``div_rn``), so the qparams
   are bit-identical to the unfused observer's.
3. the fake_quant kernel of :mod:`.fake_quant` (reads the new qparams from the device).

Memory traffic: read x twice, write y (+ the 1/8-byte-an-element mask when a gradient is
needed): the minimum for "observe, then quantize with the result" (the qparams of a batch
depend on all of it). Sync observers (distributed) run their all_reduce between 1 and 2; an
observer with ``check_finite=True`` does its one host read (the raise on NaN / Inf) there too.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, cdiv, last_to_finish, module_tickets,
                     once_differentiable_kernels)
from .fake_quant import (_FLOATS, _LAUNCH, BLOCK, NUM_WARPS, FakeQuantFunction, _block_offsets,
                         _flat_span, _fq_relu, _Layout, _npow2, _rne, _row_offsets, _row_plan,
                         _store_mask, _target_programs, _to_out, _udiv, as_rows,
                         auto_interpreter, dense_layout, float32_exact, mask_backward,
                         on_tensor_device, row_plan, save_mask, udiv_magic)
from . import launch as _launch
from ...qparams import _SYM_SPAN as _SYM_SPAN_F
from .launch import launch, recording

__all__ = ["observe_fake_quant", "observer_step", "mark_observed", "OPS", "KERNELS"]

_EPS = float(torch.finfo(torch.float32).eps)
_INF = tl.constexpr(float("inf"))  # module constants: no float() calls inside kernels
_SYM_SPAN = tl.constexpr(_SYM_SPAN_F)  # the definition's bound (gpuquant.qparams)
_NINF = tl.constexpr(float("-inf"))
# How torch divides a tensor by a Python float on the device the kernel stands for: on CUDA
# as ``a * fl32(1 / b)`` (PyTorch's div_true_kernel_cuda, "may lose one bit"), on the CPU
# exactly. The observers' definition (torch.ao's _calculate_qparams) divides by
# ``float(qmax - qmin)`` that way, so compiled kernels (GPU) multiply by the reciprocal and
# the interpreter (CPU tensors) divides: each matches torch on its own device bit for bit.
_RECIP_DIV = tl.constexpr(not INTERPRET)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _partial_minmax(x_ptr, part_ptr, rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
                    x2_ptr, ROWS32: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr, RELU: tl.constexpr, ADD: tl.constexpr):
    """This program's (row split, channel block) min and max of x (of relu(x) when RELU; of
    x + x2 rounded to x's dtype when ADD; NaN as -inf / +inf, as the observer maps it),
    stored to part f32 (2, split, C): [0] minima, [1] maxima."""
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    coff = (c.to(tl.int64) * s_c)[None, :]
    vmin = tl.full((BLOCK_R, BLOCK_C), _INF, tl.float32)
    vmax = tl.full((BLOCK_R, BLOCK_C), _NINF, tl.float32)
    for it in range(0, n_iter):
        roff, rm = _row_offsets(sp * n_iter + it, rows, inner, s_o, s_i, m_in, l_in, ROWS32,
                                BLOCK_R)
        m = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + roff[:, None] + coff, mask=m, other=0.0).to(tl.float32)
        if ADD:  # the sum as torch's add rounds it to the dtype
            x2 = tl.load(x2_ptr + roff[:, None] + coff, mask=m, other=0.0).to(tl.float32)
            x = _to_out(x + x2, x_ptr.dtype.element_ty).to(tl.float32)
        if RELU:
            x = tl.where(x < 0, 0.0, x)  # NaN stays NaN, as torch's relu
        nan = x != x
        vmin = tl.minimum(vmin, tl.where(m, tl.where(nan, _NINF, x), _INF))
        vmax = tl.maximum(vmax, tl.where(m, tl.where(nan, _INF, x), _NINF))
    base = sp.to(tl.int64) * C + c
    tl.store(part_ptr + base, tl.min(vmin, axis=0), mask=cm)
    tl.store(part_ptr + split * C + base, tl.max(vmax, axis=0), mask=cm)


@triton.jit
def _minmax_partial_kernel(
    # pointers: x (any float dtype), part f32 (2, split, C): [0] minima, [1] maxima
    x_ptr, part_ptr,
    # row plan (see fake_quant.RowPlan)
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    # meta
    ROWS32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    RELU: tl.constexpr = False,
):
    """Per (row split, channel block) min and max of x (of relu(x) when RELU): the first
    pass of :func:`observer_step` (observers with host hooks between the passes)."""
    _partial_minmax(x_ptr, part_ptr, rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
                    x_ptr, ROWS32, BLOCK_R, BLOCK_C, RELU, False)


@triton.jit
def _observe_partial_kernel(
    # pointers: x (any float dtype), part f32 (2 split + 2) C, observer min / max f32 (C,),
    # its nonfinite_batches i64 (1,), the observer's ticket i32 (zero between launches)
    x_ptr, part_ptr, min_ptr, max_ptr, bad_ptr, tick_ptr,
    # row plan (see fake_quant.RowPlan)
    rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
    # observer constants (float32)
    c_ema, eps, qmin, qmax, half_range, zp_sym,
    # ADD: a second input of x's dtype and layout, x + x2 observed
    x2_ptr,
    # meta
    ROWS32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    RELU: tl.constexpr, ADD: tl.constexpr, EMA: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_CF: tl.constexpr,
):
    """The observer's whole update in one launch: each program its partial min / max
    (:func:`_partial_minmax`); the last program to finish (the observer's ticket,
    :func:`.common.last_to_finish`) reduces the partials, updates the state in place, adds
    a batch with any non-finite channel to ``bad`` and writes each channel's scale and
    zero point (float32) to ``part[2 split C + c]`` / ``part[(2 split + 1) C + c]``, the
    arithmetic of ``_observer_update_kernel`` (:func:`_update_channels`).
    ``_observe_fq_kernel`` then only reads the qparams: no per-program reduction of the
    partials, no state snapshot."""
    _partial_minmax(x_ptr, part_ptr, rows, inner, s_o, s_i, m_in, l_in, C, s_c, n_iter, split,
                    x2_ptr, ROWS32, BLOCK_R, BLOCK_C, RELU, ADD)
    if last_to_finish(tick_ptr, tl.num_programs(0) * tl.num_programs(1)):
        _update_channels(part_ptr, part_ptr, part_ptr, part_ptr, min_ptr, max_ptr,
                         part_ptr + 2 * split * C, part_ptr, part_ptr + (2 * split + 1) * C,
                         bad_ptr, split, C, c_ema, eps, qmin, qmax, half_range, zp_sym, True,
                         False, EMA, SYMMETRIC, BLOCK_S, BLOCK_CF, False)


@triton.jit
def _reduce_partials(part_ptr, split, C, c, cm, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(min, max) over the ``split`` partials of channels ``c`` (mask ``cm``) in part f32
    (2, split, C)."""
    vmin = tl.full((BLOCK_S, BLOCK_C), _INF, tl.float32)
    vmax = tl.full((BLOCK_S, BLOCK_C), _NINF, tl.float32)
    for s0 in range(0, split, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        m = (sp < split)[:, None] & cm[None, :]
        off = sp.to(tl.int64)[:, None] * C + c[None, :]
        # past L1: the last program of a launch reads the other programs' stores
        vmin = tl.minimum(vmin, tl.load(part_ptr + off, mask=m, other=_INF,
                                        cache_modifier=".cg"))
        vmax = tl.maximum(vmax, tl.load(part_ptr + split * C + off, mask=m, other=_NINF,
                                        cache_modifier=".cg"))
    return tl.min(vmin, axis=0), tl.max(vmax, axis=0)


@triton.jit
def _update_state(mn, mx, ok, old_min, old_max, c_ema, eps, qmin, qmax, half_range, zp_sym,
                  EMA: tl.constexpr, SYMMETRIC: tl.constexpr):
    """The observer update (MinMax or moving average; batches with ``ok`` False leave the
    state) and torch.ao's ``_calculate_qparams`` of the new state, operation by operation:
    (new_min, new_max, scale, zero point as float32, ok). The returned ``ok`` is also False
    where the state the batch would leave gives no finite float32 scale (a moving average
    that overflows; affine, ``max(max, 0) - min(min, 0)`` past float32; symmetric, twice
    the magnitude past float32: a quantized range QParams refuses): that batch is
    dropped and counted, as the observers' ``_finite_mask`` does with check_finite off."""
    # NaN: the batch's mn / mx never are (NaN maps to -inf / +inf); a state may be (a loaded
    # state_dict). The definition's torch.min / torch.max keep it, so a MinMax state that
    # is NaN stays NaN (every batch dropped and counted) and gives NaN qparams; the GPU's
    # plain min.f32 / max.f32 would drop it (a fresh range from the next batch, a scale of
    # eps), hence PropagateNan.ALL (min.NaN / max.NaN, as the interpreter's NumPy does)
    if EMA:  # (a NaN state counts as fresh, as the definition's isfinite test has it)
        fresh = ~((tl.abs(old_min) < _INF) & (tl.abs(old_max) < _INF))
        new_min = tl.where(fresh, mn, old_min + c_ema * (mn - old_min))
        new_max = tl.where(fresh, mx, old_max + c_ema * (mx - old_max))
    else:
        new_min = tl.minimum(mn, old_min, propagate_nan=tl.PropagateNan.ALL)
        new_max = tl.maximum(mx, old_max, propagate_nan=tl.PropagateNan.ALL)
    fits = (tl.abs(new_min) < _INF) & (tl.abs(new_max) < _INF)
    if SYMMETRIC:  # the quantized range scale * (qmax - qmin) finite: amax * (2 + 2**-21)
        fits = fits & (tl.maximum(-new_min, new_max) * _SYM_SPAN < _INF)
    else:
        fits = fits & (tl.abs(tl.maximum(new_max, 0.0) - tl.minimum(new_min, 0.0)) < _INF)
    ok = ok & fits
    new_min = tl.where(ok, new_min, old_min)
    new_max = tl.where(ok, new_max, old_max)
    # _calculate_qparams' torch.min / torch.max keep a NaN state's NaN through to the scale
    # (max.NaN on the GPU); the zero point's clamp keeps the plain max / min: a NaN one
    # becomes qmin, as torch's on CUDA (round(NaN).to(int64) is 0 there, then qmin - 0)
    min_neg = tl.minimum(new_min, 0.0, propagate_nan=tl.PropagateNan.ALL)
    max_pos = tl.maximum(new_max, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if SYMMETRIC:
        max_pos = tl.maximum(-min_neg, max_pos, propagate_nan=tl.PropagateNan.ALL)
        if _RECIP_DIV:
            scale = tl.maximum(max_pos * tl.math.div_rn(1.0, half_range), eps,
                               propagate_nan=tl.PropagateNan.ALL)
        else:
            scale = tl.maximum(tl.math.div_rn(max_pos, half_range), eps,
                               propagate_nan=tl.PropagateNan.ALL)
        zp = tl.zeros_like(scale) + zp_sym  # (not scale * 0: NaN for a NaN scale)
    else:
        if _RECIP_DIV:
            scale = tl.maximum((max_pos - min_neg) * tl.math.div_rn(1.0, qmax - qmin), eps,
                               propagate_nan=tl.PropagateNan.ALL)
        else:
            scale = tl.maximum(tl.math.div_rn(max_pos - min_neg, qmax - qmin), eps,
                               propagate_nan=tl.PropagateNan.ALL)
        zp = qmin - _rne(tl.math.div_rn(min_neg, scale))
        zp = tl.minimum(tl.maximum(zp, qmin), qmax)
    return new_min, new_max, scale, zp, ok


@triton.jit
def _observe_fq_kernel(
    # pointers: x, y (same dtype and strides, dense), mask u8, qparams f32: scale (C,) then
    # zero point (C,)
    x_ptr, y_ptr, mask_ptr, q_ptr,
    # sizes; channels (PER_CHANNEL): element offset // L, C channels, L = m_l / l_l magic
    numel, nbytes_mask, C, m_l, l_l,
    # the dtype's range (float32)
    qmin, qmax,
    # ADD: a second input (x's dtype and layout): y = fake_quant(x + x2)
    x2_ptr,
    # meta
    RELU: tl.constexpr, SAVE_MASK: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK: tl.constexpr, ADD: tl.constexpr = False,
):
    """y = fake_quant(x) (of relu(x) when RELU, of x + x2 when ADD) with the qparams
    ``_observe_partial_kernel`` left (per tensor; per channel with the channels outermost
    in memory), and the bit mask."""
    pid = tl.program_id(0)
    base, local = _block_offsets(pid, BLOCK)
    offs = base + local
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:  # the sum as torch's add rounds it to the dtype
        x2 = tl.load(x2_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = _to_out(x + x2, x_ptr.dtype.element_ty).to(tl.float32)
    if PER_CHANNEL:
        loc = offs.to(tl.uint32)  # numel < 2^31 on this path
        ch = _udiv(loc, m_l.to(tl.uint32, bitcast=True), l_l).to(tl.int32)
        ch = tl.where(m, ch, 0)
        s = tl.load(q_ptr + ch)
        zpf = tl.load(q_ptr + C + ch)
    else:
        s = tl.load(q_ptr)
        zpf = tl.load(q_ptr + 1)
    inv = tl.math.div_rn(1.0, s)
    y, inr = _fq_relu(x, inv, s, zpf, qmin, qmax, RELU)
    tl.store(y_ptr + offs, _to_out(y, y_ptr.dtype.element_ty), mask=m)
    if SAVE_MASK:
        _store_mask(mask_ptr, inr, m, pid, nbytes_mask, BLOCK)


@triton.jit
def _update_channels(part_ptr, mn_ptr, mx_ptr, ok_ptr, min_ptr, max_ptr, scale_ptr, inv_ptr,
                     zp_ptr, bad_ptr, split, C, c_ema, eps, qmin, qmax, half_range, zp_sym,
                     FROM_PARTIALS: tl.constexpr, HAVE_OK: tl.constexpr, EMA: tl.constexpr,
                     SYMMETRIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                     WRITE_INV: tl.constexpr):
    """In one program, every channel: batch min / max from the partials (FROM_PARTIALS) or
    from ``mn`` / ``mx``; ``ok`` (u8) given (HAVE_OK) or computed, and then ``bad[0] +=
    any(!ok)`` (i64); ``min`` / ``max`` (f32, C) updated in place; ``scale`` (f32), ``inv =
    1 / scale`` (f32, WRITE_INV) and the zero point (in ``zp_ptr``'s type: int32, or float32)
    written."""
    bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        if FROM_PARTIALS:
            mn, mx = _reduce_partials(part_ptr, split, C, c, cm, BLOCK_S, BLOCK_C)
        else:
            mn = tl.load(mn_ptr + c, mask=cm, other=0.0)
            mx = tl.load(mx_ptr + c, mask=cm, other=0.0)
        if HAVE_OK:
            ok = tl.load(ok_ptr + c, mask=cm, other=0) != 0
        else:
            ok = (tl.abs(mn) < _INF) & (tl.abs(mx) < _INF)
        old_min = tl.load(min_ptr + c, mask=cm, other=0.0)
        old_max = tl.load(max_ptr + c, mask=cm, other=0.0)
        new_min, new_max, scale, zp, ok = _update_state(
            mn, mx, ok, old_min, old_max, c_ema, eps, qmin, qmax, half_range, zp_sym, EMA,
            SYMMETRIC)
        if not HAVE_OK:
            bad = tl.maximum(bad, (cm & ~ok).to(tl.int32))
        tl.store(min_ptr + c, new_min, mask=cm)
        tl.store(max_ptr + c, new_max, mask=cm)
        tl.store(scale_ptr + c, scale, mask=cm)
        if WRITE_INV:
            tl.store(inv_ptr + c, tl.math.div_rn(1.0, scale), mask=cm)
        tl.store(zp_ptr + c, zp.to(zp_ptr.dtype.element_ty), mask=cm)
    if not HAVE_OK:
        tl.store(bad_ptr, tl.load(bad_ptr) + tl.max(bad, axis=0).to(tl.int64))


@triton.jit
def _observer_update_kernel(
    # pointers
    part_ptr, mn_ptr, mx_ptr, ok_ptr, min_ptr, max_ptr, scale_ptr, inv_ptr, zp_ptr, bad_ptr,
    # sizes
    split, C,
    # observer constants (float32)
    c_ema, eps, qmin, qmax, half_range, zp_sym,
    # meta
    FROM_PARTIALS: tl.constexpr, HAVE_OK: tl.constexpr, EMA: tl.constexpr,
    SYMMETRIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: :func:`_update_channels`, with ``inv = 1 / scale`` (for the per-channel
    fake_quant: no separate launch) and the zero point as int32."""
    _update_channels(part_ptr, mn_ptr, mx_ptr, ok_ptr, min_ptr, max_ptr, scale_ptr, inv_ptr,
                     zp_ptr, bad_ptr, split, C, c_ema, eps, qmin, qmax, half_range, zp_sym,
                     FROM_PARTIALS, HAVE_OK, EMA, SYMMETRIC, BLOCK_S, BLOCK_C, True)


@triton.jit
def _minmax_reduce_kernel(
    # pointers: part f32 (2, split, C) -> mn, mx f32 (C,)
    part_ptr, mn_ptr, mx_ptr,
    # sizes
    split, C,
    # meta
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Second stage for observers with hooks (Sync all_reduce, finiteness check) between
    the batch min/max and the update."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mn, mx = _reduce_partials(part_ptr, split, C, c, cm, BLOCK_S, BLOCK_C)
    tl.store(mn_ptr + c, mn, mask=cm)
    tl.store(mx_ptr + c, mx, mask=cm)


# --------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _observer_kinds():
    """{observer class: EMA or not} for the classes this path reproduces exactly (not their
    subclasses: a subclass may override the update or the qparams)."""
    from ...quantization import observer as obs_mod
    return {obs_mod.MinMaxObserver: False, obs_mod.SyncMinMaxObserver: False,
            obs_mod.ExponentialMovingAverageObserver: True,
            obs_mod.SyncExponentialMovingAverageObserver: True}


def _supported_observer(observer) -> Optional[bool]:
    """True (EMA), False (MinMax) for the observer classes this path reproduces, else None."""
    return _observer_kinds().get(type(observer))


@functools.lru_cache(maxsize=None)
def _fake_quantize_class():
    from ...quantization.fake_quant import FakeQuantize
    return FakeQuantize


def device_pair_ok(observer, fake_quant, device) -> bool:
    """Whether a fused kernel can stand for ``fake_quant(observer(x))`` on ``device``: an
    enabled plain FakeQuantize of the observer's dtype, a MinMax / moving-average observer
    (not a subclass) without host hooks (``check_finite`` off, not distributed), its state
    on ``device``, enabled or (frozen) with qparams to give. The axis is the caller's."""
    if observer is None or fake_quant is None:
        return False
    if type(fake_quant) is not _fake_quantize_class() or not fake_quant.enabled:
        return False
    dtype = observer.dtype
    if _supported_observer(observer) is None or dtype != fake_quant.dtype:
        return False
    if not float32_exact(dtype.qmin, dtype.qmax):
        return False
    # the state buffer read from _buffers: Module.__getattr__ costs more than the rest here
    if (observer.check_finite or observer._buffers["min_val"].device != device
            or not _plain_reduce(observer)):
        return False
    return observer.enabled or observer.has_observed


@functools.lru_cache(maxsize=None)
def _base_reduce(cls) -> bool:
    """Whether observer class ``cls`` keeps the base class's (no-op) ``_reduce``."""
    from ...quantization import observer as obs_mod
    return cls._reduce is obs_mod.Observer._reduce


def observer_state(observer):
    """(min_val, max_val, nonfinite_batches): a supported observer's state buffers, read from
    ``_buffers`` (each ``Module.__getattr__`` costs the per-call host path ~0.5 us)."""
    b = observer._buffers
    return b["min_val"], b["max_val"], b["nonfinite_batches"]


def observer_signature(o) -> tuple:
    """(a supported observer's settings and flags, the addresses of its state and
    tickets): what a replayed launch of it derives from (:func:`.launch.replays`)."""
    b, d = o._buffers, o.__dict__
    tk = d.get("_gpuquant_tickets")
    return (o, o.enabled, d.get("_observed"), getattr(o, "momentum", None), o.dtype,
            o.symmetric, o.check_finite, o.axis), \
        (b["min_val"].data_ptr(), b["max_val"].data_ptr(), b["nonfinite_batches"].data_ptr(),
         tk.data_ptr() if tk is not None else None)


def mark_observed(observer) -> None:
    """What an enabled observer's own update sets (``has_observed``), for the fused kernels
    that update its state; written to its ``__dict__`` (``Module.__setattr__`` costs the host
    more than the rest of the flag's handling)."""
    if observer.enabled and not observer.__dict__.get("_observed"):
        observer.__dict__["_observed"] = True


def _plain_reduce(observer) -> bool:
    """Whether the observer's ``_reduce`` hook is a no-op here (not distributed)."""
    if _base_reduce(type(observer)):
        return True
    from ...quantization import observer as obs_mod
    return obs_mod._dist_world(getattr(observer, "group", None)) <= 1


@on_tensor_device
def observer_step(x: torch.Tensor, observer, axis: Optional[int], programs: Optional[int] = None,
                  tile: int = 2048, relu: bool = False):
    """Record ``x`` (``relu(x)`` when ``relu``; dense, :func:`as_rows`-shaped) in a supported
    ``observer`` and return its new (scale, zero_point, 1 / scale) device tensors. Raises what
    the observer raises (NaN / Inf with ``check_finite``, channel-count mismatch) before
    touching its state."""
    ema = _supported_observer(observer)
    plan = row_plan(x, axis, tile=tile, programs=programs)
    dev = x.device
    part = torch.empty((2, plan.split, plan.C), dtype=torch.float32, device=dev)
    launch(_minmax_partial_kernel, (cdiv(plan.C, plan.block_c), plan.split), x, part,
           *plan.kernel_args(), ROWS32=plan.rows32, BLOCK_R=plan.block_r,
           BLOCK_C=plan.block_c, RELU=relu, num_warps=4, **_LAUNCH)
    per_channel = axis is not None
    shape = (plan.C,) if per_channel else ()
    fresh = per_channel and observer.min_val.shape != shape  # first batch, or a mismatch
    if fresh and observer.min_val.numel():
        observer._prepare_state(torch.empty(shape, dtype=torch.float32, device=dev))  # raises
    elif observer.min_val.device != dev and not fresh:
        raise ValueError(f"{observer._name()}: state is on {observer.min_val.device} but the "
                         f"input is on {dev}; move the observer with .to()")
    fused = not observer.check_finite and _plain_reduce(observer)
    block_c = min(_npow2(plan.C), 256)
    block_s = max(1, min(_npow2(plan.split), 2048 // block_c))
    if fused:
        mn = mx = ok = part  # unused pointers
    else:
        mn = torch.empty(shape, dtype=torch.float32, device=dev)
        mx = torch.empty(shape, dtype=torch.float32, device=dev)
        launch(_minmax_reduce_kernel, (cdiv(plan.C, block_c),), part, mn, mx, plan.split, plan.C,
               BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4, **_LAUNCH)
        mn, mx = observer._reduce(mn, mx)
        ok = observer._finite_mask(mn, mx).to(torch.uint8)  # raises on NaN/Inf if asked
    if fresh:  # size the per-channel state (+-inf) only once nothing can refuse the batch
        observer._prepare_state(torch.empty(shape, dtype=torch.float32, device=dev))
    scale = torch.empty(shape, dtype=torch.float32, device=dev)
    inv = torch.empty(shape, dtype=torch.float32, device=dev)
    zp = torch.empty(shape, dtype=torch.int32, device=dev)
    launch(_observer_update_kernel, (1,), part, mn, mx, ok, observer.min_val, observer.max_val,
           scale, inv, zp, observer.nonfinite_batches, plan.split, plan.C,
           *_observer_consts(observer), FROM_PARTIALS=fused, HAVE_OK=not fused, EMA=ema,
           SYMMETRIC=observer.symmetric, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4, **_LAUNCH)
    observer._observed = True
    return scale, zp, inv


def _observer_consts(observer):
    """(c_ema, eps, qmin, qmax, half range, symmetric zero point) as the kernels take them."""
    d = observer.dtype
    ema = _supported_observer(observer)
    return (1.0 - observer.momentum if ema else 0.0, _EPS, float(d.qmin), float(d.qmax),
            float(d.qmax - d.qmin) / 2, float(0 if d.signed else (d.qmax + d.qmin + 1) // 2))


class _TwoLaunchShape(NamedTuple):
    """What :class:`_ObserveTwoLaunch`'s launches derive from the input's layout, once per
    layout (:func:`_two_launch_shape`): the partial min / max plan's grid, scalars and
    constexprs, the partials' size and where the qparams follow them, the fake quant's
    grid, the channel period's magic numbers and the mask's bytes."""
    C: int
    part_numel: int
    qparams_at: int
    partial_grid: tuple
    plan_args: tuple
    partial_meta: dict
    fq_grid: tuple
    n: int
    nbytes: int
    m_l: int
    l_l: int


@functools.lru_cache(maxsize=1024)
def _two_launch_shape(shape: tuple, strides: tuple, axis, tile: int,
                      programs: int) -> _TwoLaunchShape:
    plan = _row_plan(_Layout(shape, strides), axis, tile, programs)
    C = plan.C
    m_l, l_l = udiv_magic(strides[axis] if axis is not None else 1)
    n = math.prod(shape)
    block_c = min(_npow2(C), 256)
    return _TwoLaunchShape(
        C, (2 * plan.split + 2) * C, 2 * plan.split * C, (cdiv(C, plan.block_c), plan.split),
        plan.kernel_args(),
        dict(ROWS32=plan.rows32, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
             BLOCK_S=max(1, min(_npow2(plan.split), 1024 // block_c)), BLOCK_CF=block_c),
        (cdiv(n, BLOCK),), n, (n + 7) // 8, m_l - 2 ** 32, l_l)


class _ObserveTwoLaunch(torch.autograd.Function):
    """Observe + fake quant in two launches: ``_observe_partial_kernel`` (partial min / max;
    its last program updates the state and writes the qparams), then ``_observe_fq_kernel``;
    the backward is the fake quant's (mask only). Per tensor, or per channel with the
    channels outermost in memory (weights). With ``x2`` (same dtype and strides) the input
    is ``x + x2``, never written out; both get the gradient."""

    @staticmethod
    def forward(ctx, x, observer, axis, relu, programs, tile, x2=None, plan=None):
        need = ctx.needs_input_grad[0] or (x2 is not None and ctx.needs_input_grad[6])
        add = x2 is not None
        y = torch.empty_like(x)
        if plan is not None and plan.fwd:  # a replay (plan.fwd None: record this call)
            part = torch.empty(plan.part, dtype=torch.float32, device=x.device)
            mask = torch.empty(plan.mask, dtype=torch.uint8, device=x.device)
            b = (x.data_ptr(), part.data_ptr(), y.data_ptr(), mask.data_ptr()) + \
                ((x2.data_ptr(),) if add else ())
            if not (b[0] | b[-1]) & 15:  # inputs aligned as recorded (else: generic)
                stream = _launch.current_stream()
                plan.fwd[0](stream, b)
                plan.fwd[1](stream, b)
                plan = _REPLAYED
        if plan is not _REPLAYED:
            with recording(plan is not None and plan.fwd is None) as rec:
                sh = _two_launch_shape(tuple(x.shape), x.stride(), axis, tile, programs)
                part = torch.empty(sh.part_numel, dtype=torch.float32, device=x.device)
                mn, mx, bad = observer_state(observer)
                consts = _observer_consts(observer)
                launch(_observe_partial_kernel, sh.partial_grid, x, part, mn, mx,
                       bad, module_tickets(observer, x.device), *sh.plan_args, *consts,
                       x2 if add else x, RELU=relu, ADD=add,
                       EMA=_supported_observer(observer), SYMMETRIC=observer.symmetric,
                       num_warps=4, **sh.partial_meta, **_LAUNCH)
                mask = torch.empty(sh.nbytes if need else 1, dtype=torch.uint8,
                                   device=x.device)
                launch(_observe_fq_kernel, sh.fq_grid, _flat_span(x), _flat_span(y), mask,
                       part[sh.qparams_at:], sh.n, sh.nbytes, sh.C, sh.m_l, sh.l_l,
                       consts[2], consts[3], _flat_span(x2 if add else x), RELU=relu,
                       SAVE_MASK=need, PER_CHANNEL=axis is not None, BLOCK=BLOCK, ADD=add,
                       num_warps=NUM_WARPS, **_LAUNCH)
            if rec is not None:
                plan.fwd = _launch.replays(rec, (x, part, y, mask) + ((x2,) if add else ()),
                                           set(observer_signature(observer)[1]), 2)
                plan.part, plan.mask = part.numel(), mask.numel()
        if need:
            save_mask(ctx, x, mask, relu=relu)  # +0.0 where ReLU is dead (fake_quant.py)
        ctx.add = add
        return y

    @staticmethod
    @once_differentiable_kernels("observe + fake quantization")
    def backward(ctx, grad):
        g = mask_backward(ctx, grad)
        return (g,) + (None,) * 5 + ((g,) if ctx.add else (None,)) + (None,)


class _FqPlan:
    """A per-tensor observe + fake quant call's replay (:func:`.launch.replays`): ``fwd``
    None until recorded, False where not replayable, else its two launches; the partials'
    and the mask's sizes; the programs the call resolved."""
    __slots__ = ("fwd", "part", "mask", "programs")

    def __init__(self, programs: int):
        self.fwd, self.part, self.mask, self.programs = None, 0, 0, programs


_REPLAYED = object()
_MAX_FQ_PLANS = 8


def _fq_signature(x, observer, fake_quant, relu, addend, programs, tile) -> tuple:
    """What a per-tensor observe + fake quant call's checks and two launches derive from
    (the grad mode and the inputs' requires_grad decide the mask), with the addresses of
    the observer's state and tickets; the inputs' own addresses are the call's."""
    settings, ptrs = observer_signature(observer)
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, relu, programs, tile,
            None if addend is None else (addend.shape, addend.stride(), addend.dtype,
                                         addend.device, addend.requires_grad),
            torch.is_grad_enabled(), settings, fake_quant, fake_quant.enabled,
            fake_quant.dtype) + ptrs


def _replayed_fake_quant(x, observer, fake_quant, relu, addend, programs, tile):
    """The call replayed where its signature has a replayable plan, else None."""
    plans = observer.__dict__.get("_gpuquant_fq_plans")
    if plans is None:
        return None
    plan = plans.get(_fq_signature(x, observer, fake_quant, relu, addend, programs, tile))
    if not plan or not _plain_reduce(observer):  # (distributed: the world may change)
        return None
    mark_observed(observer)
    return _ObserveTwoLaunch.apply(x, observer, None, relu, plan.programs, tile, addend,
                                   plan)


def _recorded_fake_quant(x, observer, fake_quant, relu, addend, programs, tile):
    """The generic two-launch call, recorded for replays under its signature."""
    plan = _FqPlan(programs or _two_launch_programs(x.device))
    y = _ObserveTwoLaunch.apply(x, observer, None, relu, plan.programs, tile, addend, plan)
    if plan.fwd is not None:
        plans = observer.__dict__.get("_gpuquant_fq_plans")
        if plans is None:
            plans = observer.__dict__["_gpuquant_fq_plans"] = _launch.PlanCache()
        if len(plans) >= _MAX_FQ_PLANS:
            plans.clear()
        plans[_fq_signature(x, observer, fake_quant, relu, addend, programs, tile)] = plan
    return y


def _two_launch_axis(x: torch.Tensor, observer, axis):
    """(True, axis for the kernels) where :class:`_ObserveTwoLaunch` takes this call: an
    observer without host hooks, sized state, per tensor or channels outermost in memory
    (each channel one contiguous block, as weights), offsets within 32 bits; else (False,
    None)."""
    if observer.check_finite or not _plain_reduce(observer) \
            or observer.min_val.device != x.device:
        return False, None
    if axis is None or x.shape[axis] == 1:
        return observer.min_val.numel() == 1, None
    C = x.shape[axis]
    ok = (observer.min_val.numel() == C and x.stride(axis) * C == x.numel()
          and dense_layout(x) and x.numel() < 2 ** 31 - BLOCK)
    return ok, axis


def _two_launch_programs(device) -> int:
    """Partial min / max programs of the two-launch path: twice the usual count, 8 a
    multiprocessor (4 warps each, 2048-element tiles: 32 KB of 16-byte loads in flight a
    multiprocessor, 64 KB with an addend). All resident at once while the kernel keeps to
    64 registers a thread (56 on sm_90, Triton 3.6 and 3.9; the last program's reduction is
    sized for that, ``BLOCK_S * BLOCK_CF <= 1024``), so no second partial wave. Partials
    cost only that last program, once (the fake-quant programs read the qparams it
    wrote)."""
    return 2 * _target_programs(device)


def observe_fake_quant(x: torch.Tensor, observer, fake_quant, *, relu: bool = False,
                       addend: Optional[torch.Tensor] = None, programs: Optional[int] = None,
                       tile: int = 2048) -> Optional[torch.Tensor]:
    """Observe, then fake-quantize with the observer's new qparams: in one kernel for
    float32 weights per output channel (rows contiguous; :func:`.bn_fold.observe_rows_fake_quant`),
    two per tensor or with other channels-outermost layouts, three otherwise (host hooks,
    channels not outermost), each without host hooks where the observer has none.

    Args:
        x: float32 / float16 / bfloat16 tensor on this backend's device.
        observer: the observer of the QConfig (may be None).
        fake_quant: the fake-quant module (may be None).
        relu: observe and fake-quantize ``relu(x)``, with ReLU's gradient folded into the
            fake quant's mask: no ReLU pass of its own, forward or backward.
        addend: observe and fake-quantize ``x + addend`` (the sum rounded to the dtype as
            torch's add rounds it, never written out; both get the gradient). Taken for
            per-tensor observers when ``addend`` has x's shape, dtype and strides (a dense
            layout); else None.
        programs, tile: reduction partition (tests; defaults from the device).

    Returns:
        ``y`` (differentiable in ``x``, STE) or None where this pair is not handled.

    Raises:
        ValueError: what the observer raises (NaN / Inf input with ``check_finite``, a channel
            count that differs from its state, axis out of range).
    """
    if observer is None or fake_quant is None or not isinstance(x, torch.Tensor):
        return None
    if auto_interpreter(x):  # the interpreter only when chosen with use("triton")
        return None
    replay = _launch.replays_on()
    if replay:  # a per-tensor call seen before with this signature: its launches again
        y = _replayed_fake_quant(x, observer, fake_quant, relu, addend, programs, tile)
        if y is not None:
            return y
    if type(fake_quant) is not _fake_quantize_class() or not fake_quant.enabled \
            or not observer.enabled:
        return None
    if _supported_observer(observer) is None or observer.dtype != fake_quant.dtype:
        return None
    if not float32_exact(observer.dtype.qmin, observer.dtype.qmax):
        return None
    if x.dtype not in _FLOATS or x.numel() == 0:
        return None
    axis = observer._resolve_axis(x)
    d = observer.dtype
    if addend is not None:
        if (axis is not None or not isinstance(addend, torch.Tensor)
                or addend.shape != x.shape or addend.dtype != x.dtype
                or addend.device != x.device or addend.stride() != x.stride()
                or not dense_layout(x)):
            return None
        two, kaxis = _two_launch_axis(x, observer, None)
        if not two:
            return None
        mark_observed(observer)
        if replay:
            return _recorded_fake_quant(x, observer, fake_quant, relu, addend, programs, tile)
        return _ObserveTwoLaunch.apply(x, observer, None, relu,
                                       programs or _two_launch_programs(x.device), tile, addend)
    if axis is not None and observer.min_val.numel() == 0 and not observer.check_finite \
            and observer.min_val.device == x.device:
        # first batch: size the per-channel state (+-inf) as the observer does, so that this
        # batch takes the fused path too
        observer._prepare_state(torch.empty(x.shape[axis], dtype=torch.float32, device=x.device))
    xr = as_rows(x, axis)
    two, kaxis = _two_launch_axis(xr, observer, axis)
    if two:
        mark_observed(observer)
        if kaxis == 0 and not relu and programs is None:  # weights: one program a channel
            from .bn_fold import observe_rows_fake_quant
            y = observe_rows_fake_quant(xr, observer)
            if y is not None:
                return _in_layout_of(y, x)
        if replay and kaxis is None and xr is x:
            return _recorded_fake_quant(x, observer, fake_quant, relu, None, programs, tile)
        return _in_layout_of(_ObserveTwoLaunch.apply(
            xr, observer, kaxis, relu, programs or _two_launch_programs(x.device), tile), x)
    with torch.no_grad():
        scale, zp, inv = observer_step(xr.detach(), observer, axis, programs, tile, relu)
    if axis is not None and x.shape[axis] == 1:
        scale, zp, inv, axis = scale.reshape(()), zp.reshape(()), None, None
    return _in_layout_of(FakeQuantFunction.apply(xr, scale, zp, d.qmin, d.qmax, axis, BLOCK,
                                                 inv if axis is not None else None, relu), x)


def _in_layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in dense ``x``'s strides (a layout the kernels' row plan cannot take, e.g.
    channels_last per channel along the last axis, ran on a contiguous copy), as the
    reference's element-wise ops give it; ``y`` itself otherwise."""
    if y.stride() == x.stride() or not dense_layout(x):
        return y
    out = torch.empty_strided(x.shape, x.stride(), dtype=y.dtype, device=y.device)
    return out.copy_(y)


KERNELS = {
    "_minmax_partial_kernel": (_minmax_partial_kernel, [
        dict(ROWS32=False, BLOCK_R=2048, BLOCK_C=1), dict(ROWS32=True, BLOCK_R=32, BLOCK_C=64,
                                                          RELU=True)]),
    "_observe_partial_kernel": (_observe_partial_kernel, [
        dict(ROWS32=False, BLOCK_R=2048, BLOCK_C=1, RELU=True, ADD=True, EMA=True,
             SYMMETRIC=True, BLOCK_S=1024, BLOCK_CF=1),
        dict(ROWS32=False, BLOCK_R=1024, BLOCK_C=2, RELU=False, ADD=False, EMA=False,
             SYMMETRIC=False, BLOCK_S=8, BLOCK_CF=256)]),
    "_observer_update_kernel": (_observer_update_kernel, [
        dict(FROM_PARTIALS=fp, HAVE_OK=not fp, EMA=e, SYMMETRIC=s, BLOCK_S=8, BLOCK_C=256)
        for fp, e, s in ((True, False, True), (True, True, False), (False, True, True))]),
    "_minmax_reduce_kernel": (_minmax_reduce_kernel, [dict(BLOCK_S=8, BLOCK_C=256)]),
    "_observe_fq_kernel": (_observe_fq_kernel, [
        dict(RELU=True, SAVE_MASK=True, PER_CHANNEL=False, BLOCK=BLOCK),
        dict(RELU=True, SAVE_MASK=True, PER_CHANNEL=False, BLOCK=BLOCK, ADD=True),
        dict(RELU=False, SAVE_MASK=True, PER_CHANNEL=True, BLOCK=BLOCK)]),
}

OPS = {"observe_fake_quant": observe_fake_quant}
