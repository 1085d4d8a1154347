"""Fused fake-quant + straight-through estimator for QAT (Triton).

Ops (signatures of :mod:`gpuquant.backends.reference`, plus the fused QAT ops of
:mod:`.observer` and :mod:`.lsq`, merged into ``OPS`` at the bottom):

``fake_quant(x, scale, zero_point, qmin, qmax, axis) -> y``
    ``y = (clamp(rne(x * inv_scale) + zp, qmin, qmax) - zp) * scale`` in float32, returned in
    ``x``'s dtype (float32 / float16 / bfloat16); differentiable in ``x`` (STE: the gradient
    passes where ``qmin <= rne(x * inv_scale) + zp <= qmax``). Per-tensor (``axis`` None, 0-d
    ``scale``/``zero_point``) or per-channel along any ``axis`` (1-D ``scale``/``zero_point``).

Numerics (contract sections 1 and 4), bit-identical to ``torch.fake_quantize_per_*_affine``:

* ``inv_scale = 1 / scale`` in float32, correctly rounded: per-tensor in the kernel with
  ``tl.math.div_rn`` (``div.rn.f32``, once a program), per-channel with torch on the device
  (one tiny launch, no host sync; the fused observer writes it itself). Never Triton's ``/``
  (``div.full.f32``, approximate).
* ``rne`` (:func:`~.common.rne`) rounds half to even: compiled, ``cvt.rni.f32.f32``; under
  the interpreter (no ``libdevice.rint``) the add-and-subtract trick ``(|v| + 2^23) - 2^23``
  with the sign put back, exact for ``|v| < 2^23`` (larger ``|v|`` are integers already and
  pass through). So no clamp is needed before rounding (the STE mask sees the true
  ``rne(v) + zp``); inf stays inf. float32 -> bfloat16 likewise (:func:`~.common.to_bf16`:
  ``cvt.rn.bf16.f32`` compiled, on the bits interpreted).
* Every kernel launches with ``enable_fp_fusion=False``: products followed by sums
  (``zp + x * inv`` in LSQ, the moving average ``min + c * (m - min)``) must round twice, as
  the interpreter and PyTorch do, not once in an ``fma.rn.f32``. A CPU test compiles each
  kernel for sm_80 / sm_90 and checks the PTX (tests/backends/test_triton_ptx_fake_quant.py).
* NaN in gives NaN out; its gradient is 0 (the mask is false), as the reference backend.
* The backward computes ``grad * mask`` (not ``where``) in float32, so signs of zero and NaN
  gradients match PyTorch bit for bit (``torch.fake_quantize_*`` and the reference backend
  multiply: ``-g * 0 = -0.0``, ``inf * 0 = NaN``).

ReLU fused (``relu=True``: :func:`.observer.observe_fake_quant`, also with ``addend``): the
forward fake-quantizes ``relu(x)`` and folds ReLU's gradient into the same one-bit mask
(bit set iff ``x > 0`` and in range), and the backward (``_fq_bwd_kernel`` with RELU) writes
``where(bit, grad * 1, +0.0)``. The definition is ReLU's ``threshold_backward`` after the
fake quant's multiply, i.e. ``+0.0`` wherever ``relu(x) <= 0`` whatever the upstream
gradient (negative, +-inf, NaN), and ``grad * 0`` where the fake quant's own mask is false.
A zero bit cannot tell the two apart, so the backward gives ``+0.0`` for every zero bit:
bit for bit the definition at ReLU-dead positions (``x <= 0``, ``-0.0`` included: the common
case, which ``grad * mask`` got wrong: ``-0.0`` for negative and NaN for non-finite
``grad``) and at in-range positions. The one remaining difference, at positions the fake
quant clamps high (``rne(relu(x) * inv_scale) + zp > qmax``: possible when a moving-average
range lags the batch) and at NaN inputs (``relu(NaN) = NaN``, mask false): the definition
gives ``grad * 0`` there, i.e. ``-0.0`` where ``grad < 0`` and NaN where ``grad`` is +-inf
or NaN; the fused backward gives ``+0.0``. Equal as numbers for every finite gradient
(``-0.0 == +0.0``); only the sign of zero and the NaN of a non-finite upstream gradient
at those positions differ. (Telling them apart would take a second bit an element, +1/8
byte forward and backward, or recomputing from ``x``: see the table below.) Without ReLU the
backward stays ``grad * mask``, bit-identical to PyTorch.

Layout: any dense layout (contiguous, channels_last, any permutation) is processed in memory
order, without a copy; the channel of an element is ``(offset // stride[axis]) % C``, two
magic-number divisions (``mul.hi`` + shift) in uint32 after one int64 reduction a program.
Only non-dense inputs (slices with gaps, expanded tensors) are copied to contiguous first.
Offsets are int64 (``pid.to(tl.int64)``), so tensors over 2^31 elements index correctly.

What the backward keeps (bytes per element, E = element size, fwd + bwd; the minimum any
implementation must move is read x + write y + read grad + write grad_x = 4E):

=====================================  ================  ================  ============
choice                                 forward           backward          total (f32/bf16)
=====================================  ================  ================  ============
recompute the mask from x              2E                3E (x, g, gx)     20 / 10
save a uint8 mask                      2E + 1            2E + 1            18 / 10
save a bit mask (chosen)               2E + 1/8          2E + 1/8          16.25 / 8.25
=====================================  ================  ================  ============

The bit mask moves 19% fewer bytes than recomputing and keeps 1/8 byte an element alive
(instead of ``x``: 2 to 4 bytes). The backward then needs neither ``x`` nor the qparams, so
per-channel and per-tensor backward are the same kernel and run at the same speed. The
forward skips the mask (2E bytes) when no gradient is needed.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cdiv, once_differentiable_kernels, rne, to_dtype, to_f32
from .launch import launch

__all__ = ["fake_quant", "FakeQuantFunction", "dense_layout", "channel_view", "row_plan",
           "as_rows", "RowPlan", "auto_interpreter", "udiv_magic", "OPS", "KERNELS"]

# 4096 elements (16 a thread at 8 warps): memory-bound elementwise; not tuned on a GPU yet.
BLOCK = 4096
NUM_WARPS = 8
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LAUNCH = {"enable_fp_fusion": False}  # bit-exactness: no fma contraction (contract section 4)


# --------------------------------------------------------------------------- jitted helpers
_rne = rne  # the fake-quant family's name for it (its kernels' helpers import it from here)


@triton.jit
def _fq_math(x, inv, s, zp, qmin, qmax):
    """float32 ``x`` -> (fake-quantized float32 value, in-range mask). ``zp``, ``qmin`` and
    ``qmax`` are float32 holding integers."""
    r = _rne(x * inv) + zp
    q = tl.minimum(tl.maximum(r, qmin), qmax)
    y = (q - zp) * s
    y = tl.where(x != x, x, y)  # NaN in, NaN out
    inr = (r >= qmin) & (r <= qmax)
    return y, inr


@triton.jit
def _fq_relu(x, inv, s, zp, qmin, qmax, RELU: tl.constexpr):
    """:func:`_fq_math` of ``x``, or with RELU of ``relu(x)`` as torch computes it (NaN stays
    NaN) with ReLU's gradient (x > 0) folded into the in-range mask."""
    pos = x > 0  # (dead code without RELU)
    if RELU:
        x = tl.where(x < 0, 0.0, x)
    y, inr = _fq_math(x, inv, s, zp, qmin, qmax)
    if RELU:
        inr = inr & pos
    return y, inr


@triton.jit
def _store_mask(mask_ptr, inr, m, pid, nbytes_mask, BLOCK: tl.constexpr):
    """Pack a program's (BLOCK // 8, 8) in-range flags (masked by ``m``) into its bytes."""
    bits = _pack_bits(inr & m)
    boffs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(mask_ptr + boffs, bits, mask=boffs < nbytes_mask)


@triton.jit
def _udiv(n, m, l):
    """``n // d`` for uint32 ``0 <= n < 2^31`` with the host's magic numbers ``(m, l)`` of ``d``
    (:func:`udiv_magic`): one ``mul.hi`` and a shift instead of a ~20-instruction division."""
    return tl.umulhi(n << 1, m) >> l


@triton.jit
def _channel_of(pid, offs_local, period, stride_c, C, m_sc, l_sc, m_c, l_c,
                WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Channel index of the elements ``pid * BLOCK + offs_local`` of a dense tensor traversed
    in memory order: ``(offset // stride_c) % C``. ``period = stride_c * C``; the offset is
    reduced modulo the period once a program (int64), so per element it is two magic-number
    divisions in uint32, unless the period itself passes 2^31 - BLOCK (``WIDE``: int64)."""
    base = pid.to(tl.int64) * BLOCK
    if WIDE:
        off = base + offs_local
        return ((off // stride_c) % C).to(tl.int32)
    else:
        r0 = (base % period).to(tl.int32)
        loc = (r0 + offs_local).to(tl.uint32)
        # m arrives as the int32 bit pattern of a uint32 (a Python int >= 2^31 would be typed
        # int64 and turn umulhi 64-bit); l and C stay as passed (an argument equal to 1
        # arrives as a constexpr) and promote to uint32 against the uint32 tensors
        q1 = _udiv(loc, m_sc.to(tl.uint32, bitcast=True), l_sc)
        q2 = _udiv(q1, m_c.to(tl.uint32, bitcast=True), l_c)
        return (q1 - q2 * C).to(tl.int32)


def udiv_magic(d: int) -> Tuple[int, int]:
    """(m, l) with ``n // d == (umulhi(2 n, m)) >> l`` for every ``0 <= n < 2^31``:
    ``l = ceil(log2 d)``, ``m = ceil(2^(31 + l) / d)`` (Granlund-Montgomery; the error
    ``m d - 2^(31+l) < d <= 2^l`` keeps every 31-bit quotient exact; ``2^31 <= m < 2^32``)."""
    if not 1 <= d < 2 ** 31:
        raise ValueError(f"divisor must be in [1, 2^31), got {d}")
    l = (d - 1).bit_length()
    m = -(-(1 << (31 + l)) // d)
    return m, l


_to_out = to_dtype  # the family's name for it (float32 -> the output dtype, as torch rounds)


@triton.jit
def _block_offsets(pid, BLOCK: tl.constexpr):
    """A program's BLOCK elements as a (BLOCK // 8, 8) tile in memory order: element
    ``8 * i + j`` at [i, j], so the bit mask packs and unpacks along axis 1 with no reshape.
    Returns (the block's first element, int64; int32 offsets within the block): callers
    advance their pointers by the first once and index with the int32 offsets, so no
    per-element 64-bit arithmetic (tensors past 2^31 elements keep exact addresses)."""
    local = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    return pid.to(tl.int64) * BLOCK, local


@triton.jit
def _block_rem(numel, base, BLOCK: tl.constexpr):
    """How many of a block's elements exist (0..BLOCK, int32): one scalar, so the bounds
    test is an int32 compare per element."""
    return tl.minimum(numel - base, BLOCK).to(tl.int32)


@triton.jit
def _pack_bits(inr):
    """(BLOCK // 8, 8) int1 -> (BLOCK // 8,) uint8: element [i, j] in bit j of byte i."""
    sh = tl.arange(0, 8)
    return tl.sum(inr.to(tl.int32) << sh[None, :], axis=1).to(tl.uint8)


@triton.jit
def _unpack_bits(bytes_):
    """(BLOCK // 8,) uint8 -> (BLOCK // 8, 8) float32 0.0 / 1.0."""
    sh = tl.arange(0, 8)
    return ((bytes_.to(tl.int32)[:, None] >> sh[None, :]) & 1).to(tl.float32)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tqt_scale(log2_t, qmax):
    """TQT's power-of-two scale ``2**ceil(log2_t) / (qmax + 1)`` (float32, exact): the power
    of two is built from its exponent bits (exponent clamped to the normal range), the scale
    floored at 2**-126 (its reciprocal finite), as the torch definition."""
    c = tl.math.ceil(log2_t)
    # the GPU's ceil (cvt.rpi.ftz) flushes a subnormal input to 0: ceil of a positive one
    # is 1 (a negative one's is -0.0 either way)
    c = tl.where(log2_t > 0.0, tl.maximum(c, 1.0), c)
    e = tl.minimum(tl.maximum(c, -126.0), 127.0).to(tl.int32)
    p2 = ((e + 127) << 23).to(tl.float32, bitcast=True)
    # a NaN log2_t (a NaN step of the learned parameter) gives a NaN scale, as the
    # definition's exp2(ceil(NaN)) does: the GPU's clamp drops the NaN (e = -126, a finite
    # scale) and the interpreter's int cast of NaN is undefined
    s = tl.maximum(tl.math.div_rn(p2, qmax + 1.0), 1.1754943508222875e-38)  # 2**-126
    return tl.where(log2_t != log2_t, log2_t, s)


@triton.jit
def _learned_zp(zp, qmin, qmax):
    """LSQ's float zero point as the forward uses it, ``clamp(rne(zp), qmin, qmax)``, with a
    NaN kept as torch's clamp keeps it (then every output and the scale's gradient are NaN,
    as in the definition): the GPU's plain max / min would make it ``qmin``."""
    return tl.minimum(tl.maximum(_rne(zp), qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_qparams(scale_ptr, inv_ptr, zp_ptr, idx, qmin, qmax, QMODE: tl.constexpr,
                  HAVE_INV: tl.constexpr):
    """(scale, inv_scale, zero point as float32) at ``idx`` (0 for per-tensor).

    QMODE 0: ``scale`` f32 and ``zp`` i32 (fake_quant, observers);
    QMODE 1: ``zp`` f32, used as ``clamp(rne(zp), qmin, qmax)`` (LSQ's learnable zero point);
    QMODE 2: ``scale_ptr`` holds TQT's ``log2_t``; scale = ``_tqt_scale``, zero point 0.
    ``inv`` is loaded when HAVE_INV (per-channel, computed by torch), else ``div_rn``."""
    if QMODE == 2:
        s = _tqt_scale(tl.load(scale_ptr + idx), qmax)
        zp = s * 0.0
    else:
        s = tl.load(scale_ptr + idx)
        if QMODE == 1:
            zp = _learned_zp(tl.load(zp_ptr + idx), qmin, qmax)
        else:
            zp = tl.load(zp_ptr + idx).to(tl.float32)
    if HAVE_INV:
        inv = tl.load(inv_ptr + idx)
    else:
        inv = tl.math.div_rn(1.0, s)
    return s, inv, zp


@triton.jit
def _fq_fwd_kernel(
    # pointers
    x_ptr, y_ptr, mask_ptr, scale_ptr, inv_ptr, zp_ptr,
    # sizes
    numel, nbytes_mask, period, stride_c, C, m_sc, l_sc, m_c, l_c,
    # quantization range (float32 holding integers)
    qmin, qmax,
    # meta
    PER_CHANNEL: tl.constexpr, SAVE_MASK: tl.constexpr, WIDE: tl.constexpr,
    QMODE: tl.constexpr, BLOCK: tl.constexpr, C_INNER: tl.constexpr = 0,
    RELU: tl.constexpr = False, INV: tl.constexpr = True,
):
    """y = fake_quant(x) over a dense tensor in memory order; optional bit mask.

    ``RELU``: y = fake_quant(relu(x)) and the mask also zero where x <= 0 (ReLU's gradient,
    as ``threshold_backward`` gives it), saving ReLU's own pass forward and backward.

    x, y: same dtype (f32/f16/bf16), same strides. scale: f32 (TQT: log2_t), zp: i32 (LSQ:
    f32), one value or C values; inv: f32, C values (per-channel QMODE 0/1 only; with
    C_INNER and INV False the kernel divides the tile's C scales itself).
    mask: u8, ceil(numel / 8) bytes.

    ``C_INNER`` (per-channel, channels innermost in memory, C a power of two dividing
    BLOCK: channels_last activations): the block is a (BLOCK / C, C) tile whose columns are
    the channels, so each program loads the C qparams once and broadcasts them, where the
    general path computes a channel index and gathers three qparams for every element.
    """
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK
    rem = _block_rem(numel, base, BLOCK)
    x_ptr += base
    y_ptr += base
    if C_INNER > 0:
        rows = tl.arange(0, BLOCK // C_INNER)
        ch = tl.arange(0, C_INNER)
        offs = rows[:, None] * C_INNER + ch[None, :]
        m = offs < rem
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s, inv, zp = _load_qparams(scale_ptr, inv_ptr, zp_ptr, ch, qmin, qmax, QMODE,
                                   QMODE != 2 and INV)
        y, inr = _fq_relu(x, inv[None, :], s[None, :], zp[None, :], qmin, qmax, RELU)
        tl.store(y_ptr + offs, _to_out(y, y_ptr.dtype.element_ty), mask=m)
        # the tile in memory order is the (BLOCK // 8, 8) layout the bit packing reads
        inr = tl.reshape(inr & m, (BLOCK // 8, 8))
        m = tl.full((BLOCK // 8, 8), 1, tl.int1)
    else:
        _, offs = _block_offsets(pid, BLOCK)
        m = offs < rem
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            c = _channel_of(pid, offs, period, stride_c, C, m_sc, l_sc, m_c, l_c, WIDE, BLOCK)
            s, inv, zp = _load_qparams(scale_ptr, inv_ptr, zp_ptr, c, qmin, qmax, QMODE,
                                       QMODE != 2)
        else:
            s, inv, zp = _load_qparams(scale_ptr, inv_ptr, zp_ptr, 0, qmin, qmax, QMODE, False)
        y, inr = _fq_relu(x, inv, s, zp, qmin, qmax, RELU)
        tl.store(y_ptr + offs, _to_out(y, y_ptr.dtype.element_ty), mask=m)
    if SAVE_MASK:
        _store_mask(mask_ptr, inr, m, pid, nbytes_mask, BLOCK)


@triton.jit
def _fq_bwd_kernel(
    # pointers
    g_ptr, mask_ptr, gx_ptr,
    # sizes
    numel, nbytes_mask,
    # meta
    BLOCK: tl.constexpr, RELU: tl.constexpr = False,
):
    """grad_x = grad * mask (float32 math, so -0.0 and NaN match torch), memory order.
    RELU (the mask has ReLU's gradient folded in): ``where(mask, grad * 1, +0.0)``, ReLU's
    ``threshold_backward`` at dead positions whatever ``grad`` is (module docstring)."""
    pid = tl.program_id(0)
    base, offs = _block_offsets(pid, BLOCK)
    m = offs < _block_rem(numel, base, BLOCK)
    g_ptr += base
    gx_ptr += base
    boffs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    bytes_ = tl.load(mask_ptr + boffs, mask=boffs < nbytes_mask, other=0)
    keep = _unpack_bits(bytes_)
    g = to_f32(tl.load(g_ptr + offs, mask=m, other=0.0))
    gx = g * keep
    if RELU:
        gx = tl.where(keep != 0.0, gx, 0.0)  # +0.0 (not g * 0: -0.0 / NaN) where dead
    tl.store(gx_ptr + offs, _to_out(gx, gx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- layout helpers
# The launchers' layout arithmetic depends only on shapes and strides, which a training
# loop repeats every step: it is memoised (the host cost of a fake-quant call matters where a
# QAT step launches a few hundred of them). Keys hold sizes only, never tensors.
@functools.lru_cache(maxsize=4096)
def _dense(shape: tuple, stride: tuple) -> bool:
    dims = sorted((st, sz) for st, sz in zip(stride, shape) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def dense_layout(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage span exactly once (contiguous, channels_last, any
    permutation of dims): then memory order is a valid traversal of all its elements."""
    return _dense(tuple(t.shape), t.stride())


def _as_dense(t: torch.Tensor) -> torch.Tensor:
    return t if dense_layout(t) else t.contiguous()


def _flat_span(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (for passing to kernels).
    A compiled kernel takes only the data pointer, which is ``t``'s own: ``t`` itself
    there (a view costs the host a microsecond); the interpreter gets the view."""
    if INTERPRET:
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t


def channel_params(t: torch.Tensor, axis: Optional[int]) -> Tuple[int, int, int, bool]:
    """(period, stride_c, C, wide) for the memory-order channel formula of ``_channel_of``."""
    if axis is None or t.shape[axis] == 1:
        return 1, 1, 1, False
    C = t.shape[axis]
    sc = t.stride(axis)
    period = sc * C
    return period, sc, C, period + BLOCK >= 2 ** 31


def channel_view(t: torch.Tensor, axis: int) -> Optional[Tuple[int, int, int, int, int, int]]:
    """Describe ``t`` as (outer, C, inner) with strides (s_outer, s_c, s_inner), merging the
    dims before ``axis`` into one and those after into one where the strides allow (true for
    contiguous and channels_last tensors and (out, in, kh, kw) weights). None if they don't.

    Returns:
        (outer, C, inner, s_outer, s_c, s_inner) in elements.
    """
    def merge(shape, strides):
        pairs = [(sz, st) for sz, st in zip(shape, strides) if sz != 1]
        if not pairs:
            return 1, 0
        size, stride = pairs[-1]
        for sz, st in reversed(pairs[:-1]):
            if st != stride * size:
                return None
            size *= sz
        return size, stride
    shape, strides = list(t.shape), list(t.stride())
    o = merge(shape[:axis], strides[:axis])
    i = merge(shape[axis + 1:], strides[axis + 1:])
    if o is None or i is None:
        return None
    return o[0], shape[axis], i[0], o[1], strides[axis], i[1]


class RowPlan(NamedTuple):
    """A tensor seen as rows x channels for per-channel reductions: element (r, c) sits at
    ``(r // inner) * s_o + (r % inner) * s_i + c * s_c`` (``inner == 1`` when the rows have one
    stride, then ``r * s_o``). Programs form a (channel blocks, split) grid; program
    (cb, sp) walks row blocks ``sp * n_iter ... sp * n_iter + n_iter - 1`` of ``block_r`` rows
    and ``block_c`` channels, and writes one partial result a channel: the reduction is two
    fixed-order stages (deterministic, no atomics)."""
    rows: int
    C: int
    inner: int
    s_o: int
    s_i: int
    s_c: int
    block_r: int
    block_c: int
    split: int
    n_iter: int
    m_in: int = 0       # magic numbers of ``inner`` (int32 bit pattern of m) for ROWS32
    l_in: int = 0
    rows32: bool = False

    def kernel_args(self):
        """The plan's scalars in kernel-argument order (see ``_row_offsets``)."""
        return (self.rows, self.inner, self.s_o, self.s_i, self.m_in, self.l_in, self.C,
                self.s_c, self.n_iter, self.split)


def _npow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _programs_for(dev_type: str, index: Optional[int]) -> int:
    if dev_type == "cuda":
        dev = torch.device("cuda", index if index is not None else torch.cuda.current_device())
        return 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    return 4  # the interpreter: few, large programs are fastest


def _target_programs(device: torch.device) -> int:
    return _programs_for(device.type, device.index)


def row_plan(x: torch.Tensor, axis: Optional[int], tile: int = 2048,
             programs: Optional[int] = None) -> RowPlan:
    """The :class:`RowPlan` of a dense tensor ``x`` (per-tensor: one channel, rows in memory
    order). Call :func:`as_rows` first to get a tensor this describes."""
    want = programs if programs is not None else _target_programs(x.device)
    return _row_plan(_Layout(tuple(x.shape), x.stride()), axis, tile, want)


class _Layout(NamedTuple):
    """Shape and strides: what :func:`_row_plan` reads of a tensor (hashable, memoised)."""
    shape: tuple
    strides: tuple

    def stride(self, d=None):
        return self.strides if d is None else self.strides[d]

    def numel(self) -> int:
        return math.prod(self.shape)


@functools.lru_cache(maxsize=4096)
def _row_plan(x: "_Layout", axis: Optional[int], tile: int, want: int) -> RowPlan:
    if axis is None or x.shape[axis] == 1:
        rows, C, inner, s_o, s_i, s_c = x.numel(), 1, 1, 1, 0, 0
    elif _memory_order_rows(x, axis):
        # channel innermost (stride 1: row r at r * C) or outermost (each channel one
        # contiguous block: row r at r), whatever the other dims' order (channels_last weights)
        C, s_c = x.shape[axis], x.stride(axis)
        rows, inner, s_i = x.numel() // C, 1, 0
        s_o = C if s_c == 1 else 1
    else:
        outer, C, inner, s_o, s_c, s_i = channel_view(x, axis)
        if outer == 1 or s_o == inner * s_i:  # rows with a single stride
            rows, inner, s_o, s_i = outer * inner, 1, (s_i if inner > 1 else s_o), 0
        else:
            rows = outer * inner
    if s_c == 1 and C > 1:  # channels innermost (channels_last): tile across channels
        block_c = min(_npow2(C), 64)
        block_r = max(1, min(_npow2(rows), tile // block_c))
    else:
        block_r = max(1, min(_npow2(rows), tile))
        block_c = max(1, min(_npow2(C), tile // block_r))
    n_rb = cdiv(max(rows, 1), block_r)
    n_cb = cdiv(C, block_c)
    split = max(1, min(n_rb, cdiv(want, n_cb)))
    n_iter = cdiv(n_rb, split)
    split = cdiv(n_rb, n_iter)
    rows32 = inner > 1 and split * n_iter * block_r < 2 ** 31
    m_in, l_in = udiv_magic(inner) if rows32 else (2 ** 32, 0)
    return RowPlan(rows, C, inner, s_o, s_i, s_c, block_r, block_c, split, n_iter,
                   m_in - 2 ** 32, l_in, rows32)


def _memory_order_rows(x: torch.Tensor, axis: int) -> bool:
    """Dense ``x`` whose channel axis is innermost (stride 1) or outermost (stride * C ==
    numel) in memory: its rows can be walked in memory order."""
    C, sc = x.shape[axis], x.stride(axis)
    return dense_layout(x) and (sc == 1 or sc * C == x.numel())


def as_rows(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """``x`` itself when :func:`row_plan` can describe it without a copy, else a contiguous
    copy (non-dense tensors, dims around ``axis`` that do not merge)."""
    if not dense_layout(x):
        return x.contiguous()
    if axis is not None and x.shape[axis] != 1 and not _memory_order_rows(x, axis) \
            and channel_view(x, axis) is None:
        return x.contiguous()
    return x


@triton.jit
def _row_offsets(rb, plan_rows, inner, s_o, s_i, m_in, l_in, ROWS32: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """int64 element offsets (BLOCK_R,) of row block ``rb`` and the in-range mask. With
    ROWS32 (every row index of the grid below 2^31) ``r // inner`` is a magic-number division
    (``m_in``, ``l_in`` from :func:`udiv_magic`, m as its int32 bit pattern); else int64."""
    r = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < plan_rows
    if ROWS32:
        r32 = r.to(tl.uint32)
        q = _udiv(r32, m_in.to(tl.uint32, bitcast=True), l_in)
        off = q.to(tl.int64) * s_o + (r32 - q * inner).to(tl.int64) * s_i
    else:
        off = (r // inner) * s_o + (r % inner) * s_i
    return off, rm


def on_tensor_device(fn):
    """Decorator for launchers whose first argument is a tensor (or a list of them, as
    concat's): launch on that tensor's GPU (Triton launches on the current device and its
    stream), not on whichever device is current."""
    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        first = t if isinstance(t, torch.Tensor) else (t[0] if t else None)
        if (isinstance(first, torch.Tensor) and first.is_cuda
                and first.device.index != torch.cuda.current_device()):
            with torch.cuda.device(first.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)
    return wrapper


def _grid(n: int, block: int):
    return (cdiv(n, block),)


# --------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=4096)
def _channel_args(shape: tuple, stride: tuple, axis: Optional[int], block: int,
                  wide: Optional[bool], c_inner_ok: bool):
    """The forward kernel's channel arguments for a dense tensor of this layout:
    (period, stride_c, C, wide, m_sc, l_sc, m_c, l_c, c_inner)."""
    if axis is not None:
        period, sc, C, big = channel_params(_Layout(shape, stride), axis)
        wide = big or period + block >= 2 ** 31 if wide is None else wide
    else:
        period, sc, C, wide = 1, 1, 1, False
    (m_sc, l_sc), (m_c, l_c) = udiv_magic(min(sc, 2 ** 31 - 1)), udiv_magic(min(C, 2 ** 31 - 1))
    c_inner = C if (axis is not None and sc == 1 and not wide and C >= 8 and C & (C - 1) == 0
                    and block % C == 0 and c_inner_ok) else 0
    # m as int32 bit patterns (see _channel_of)
    return period, sc, C, wide, m_sc - 2 ** 32, l_sc, m_c - 2 ** 32, l_c, c_inner


@on_tensor_device
def fake_quant_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                       qmin: int, qmax: int, axis: Optional[int], save_mask: bool,
                       block: int = BLOCK, wide: Optional[bool] = None, qmode: int = 0,
                       inv: Optional[torch.Tensor] = None, c_inner_ok: bool = True,
                       relu: bool = False):
    """Launch the forward kernel. ``x`` dense; returns (y with x's strides, bit mask or None).

    ``qmode`` 0: int32 ``zero_point``; 1: float ``zero_point`` (LSQ, rounded and clamped in
    the kernel); 2: ``scale`` is TQT's ``log2_t`` and ``zero_point`` is ignored.
    ``wide`` forces the int64 channel arithmetic (tests); by default it is used only when
    ``stride[axis] * C`` passes 2^31. ``inv`` (per-channel): ``1 / scale`` already computed
    (the fused observer writes it), saving a launch. ``c_inner_ok`` False keeps the general
    per-element channel path where the tile path would apply (tests compare the two).
    ``relu``: fake-quantize ``relu(x)``, the mask zero where ``x <= 0`` too."""
    n = x.numel()
    y = torch.empty_like(x)  # preserves the strides of a dense tensor
    nbytes = (n + 7) // 8
    mask = torch.empty(nbytes if save_mask else 1, dtype=torch.uint8, device=x.device)
    if n == 0:
        return y, (mask if save_mask else None)
    per_channel = axis is not None
    if scale.dtype != torch.float32:  # (kernels read the data, never the autograd graph)
        scale = scale.float()
    if qmode == 2:
        zero_point = scale
    else:
        zp_dtype = torch.float32 if qmode == 1 else torch.int32
        if zero_point.dtype != zp_dtype:
            zero_point = zero_point.to(zp_dtype)
    period, sc, C, wide, m_sc, l_sc, m_c, l_c, c_inner = _channel_args(
        tuple(x.shape), x.stride(), axis, block, wide, c_inner_ok)
    have_inv = inv is not None
    if per_channel and not have_inv and not c_inner:
        # correctly rounded float32 division by torch, on the device (TQT: in the kernel;
        # the tile path divides its C values in the kernel with div_rn: the same bits)
        inv = scale if qmode == 2 else 1.0 / scale
        have_inv = True
    elif not have_inv:
        inv = scale  # unused pointer
    launch(_fq_fwd_kernel, _grid(n, block), _flat_span(x), _flat_span(y), mask, scale, inv,
           zero_point, n, nbytes, period, sc, C, m_sc, l_sc, m_c, l_c, float(qmin), float(qmax),
           PER_CHANNEL=per_channel, SAVE_MASK=save_mask, WIDE=wide, QMODE=qmode, BLOCK=block,
           C_INNER=c_inner, RELU=relu, INV=have_inv, num_warps=NUM_WARPS, **_LAUNCH)
    return y, (mask if save_mask else None)


@on_tensor_device
def fake_quant_backward(grad: torch.Tensor, mask: torch.Tensor, layout: tuple,
                        block: int = BLOCK, relu: bool = False) -> torch.Tensor:
    """grad_x in x's layout (``layout``: x's shape, strides, dtype and device, dense):
    ``grad * mask``; with ``relu`` (a mask with ReLU's gradient folded in) ``+0.0`` wherever
    the mask is 0. A gradient in another layout or dtype is copied into x's first (the
    usual one, x's own layout, is read as it is: no copy, no buffer)."""
    shape, stride, dtype, device = layout
    if grad.stride() != stride or grad.dtype != dtype:  # (x's strides: dense, as x was)
        grad = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(grad)
    n = grad.numel()
    gx = torch.empty_like(grad)
    if n == 0:
        return gx
    launch(_fq_bwd_kernel, _grid(n, block), _flat_span(grad), mask, _flat_span(gx), n,
           mask.numel(), BLOCK=block, RELU=relu, num_warps=NUM_WARPS, **_LAUNCH)
    return gx


class FakeQuantFunction(torch.autograd.Function):
    """Autograd wrapper: forward kernel (+ bit mask when a gradient is needed), backward
    kernel reading only the mask and the incoming gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, block=BLOCK, inv=None,
                relu=False):
        x = _as_dense(x)
        need = ctx.needs_input_grad[0]
        y, mask = fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, need, block,
                                     inv=inv, relu=relu)
        if need:
            save_mask(ctx, x, mask, block, relu=relu)
        return y

    @staticmethod
    @once_differentiable_kernels("fake quantization")
    def backward(ctx, grad):
        return (mask_backward(ctx, grad),) + (None,) * 8


def save_mask(ctx, x: torch.Tensor, mask: torch.Tensor, block: int = BLOCK,
              relu: bool = False) -> None:
    """Keep what a straight-through backward needs: the bit mask and x's layout (not x).
    ``relu``: the forward folded ReLU's gradient into the mask (the backward then gives
    ``+0.0`` at its zero bits, as ReLU's ``threshold_backward``)."""
    ctx.save_for_backward(mask)
    ctx.layout = (x.shape, x.stride(), x.dtype, x.device)
    ctx.block = block
    ctx.relu = relu


def mask_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """``grad * mask`` in x's layout, from what :func:`save_mask` kept (``+0.0`` at the
    zero bits of a ReLU-folded mask)."""
    (mask,) = ctx.saved_tensors
    return fake_quant_backward(grad, mask, ctx.layout, ctx.block, ctx.relu)


def auto_interpreter(x: torch.Tensor) -> bool:
    """True when ``x`` is a CPU tensor and the triton backend was not chosen explicitly: the
    interpreter checks kernels and is never auto-selected (PRIORITY -10 on CPU), but the
    registry's ``find_op`` returns any backend implementing an op that the reference backend
    lacks. The optional fused QAT ops (observe_fake_quant, lsq / tqt) use this to hand such
    calls back to the torch definition."""
    if x.device.type != "cpu":
        return False
    from ..registry import current
    return current() != "triton"


def _check(x, scale, zero_point, qmin, qmax, axis, fn):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{fn}: x must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.device != scale.device or x.device != zero_point.device:
        raise ValueError(f"{fn}: x, scale and zero_point must be on one device, got {x.device}, "
                         f"{scale.device}, {zero_point.device}")
    if not qmin <= qmax:
        raise ValueError(f"{fn}: need qmin <= qmax, got {qmin}, {qmax}")
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(f"{fn}: per-tensor needs one scale and zero point, got "
                             f"{scale.numel()} and {zero_point.numel()}")
    else:
        if not 0 <= axis < x.dim():
            raise ValueError(f"{fn}: axis {axis} out of range for {x.dim()}-d x; allowed "
                             f"[0, {x.dim() - 1}]")
        if scale.numel() != x.shape[axis] or zero_point.numel() != x.shape[axis]:
            raise ValueError(f"{fn}: x has {x.shape[axis]} channels along axis {axis}, scale "
                             f"{scale.numel()} and zero_point {zero_point.numel()} values")


def float32_exact(qmin: int, qmax: int) -> bool:
    """Whether the kernels' float32 arithmetic (``rne(x * inv) + zp``, the clamp) is exact
    for this integer range: every integer in it a float32 number (|q| <= 2^24). Not so for
    qint32, which these ops hand to the reference backend's definition."""
    return max(-int(qmin), int(qmax)) <= 1 << 24


def fake_quant(x, scale, zero_point, qmin, qmax, axis, *, block: int = BLOCK):
    """Fake-quantize ``x`` (see the module docstring); differentiable in ``x`` (STE).

    Args:
        x: float32 / float16 / bfloat16 tensor, any dense layout (others are copied).
        scale: float32, 0-d (per-tensor) or (C,) along ``axis``; on x's device.
        zero_point: int32 of the same shape as ``scale``.
        qmin, qmax: the integer range.
        axis: None (per-tensor) or the non-negative channel axis.
        block: elements a program (tests use small blocks to cover many programs).

    Raises:
        TypeError: x not a floating tensor of a supported dtype.
        ValueError: devices differ, bad axis, qparam shapes not matching.
    """
    _check(x, scale, zero_point, qmin, qmax, axis, "fake_quant")
    if not float32_exact(qmin, qmax):  # qint32: the reference's exact zero-point add
        from ..reference import fake_quant as exact
        return exact(x, scale, zero_point, qmin, qmax, axis)
    if axis is not None and x.shape[axis] == 1:
        axis = None  # one channel: per-tensor math, same bytes
    dim = 0 if axis is None else 1  # the kernels' qparams: 0-d or (C,) (no view if so)
    if scale.dim() != dim:
        scale = scale.reshape(-1 if dim else ())
    if zero_point.dim() != dim:
        zero_point = zero_point.reshape(-1 if dim else ())
    return FakeQuantFunction.apply(x, scale, zero_point, int(qmin), int(qmax), axis, block)


# kernels and the constexpr variants CI compiles to PTX (tests/backends/test_triton_ptx_*):
# each float code path once (SAVE_MASK=False and WIDE only drop / widen integer code)
KERNELS = {
    "_fq_fwd_kernel": (_fq_fwd_kernel, [
        dict(PER_CHANNEL=p, SAVE_MASK=True, WIDE=False, QMODE=qm, BLOCK=BLOCK, C_INNER=0)
        for qm in (0, 1, 2) for p in (False, True)
    ] + [dict(PER_CHANNEL=True, SAVE_MASK=False, WIDE=True, QMODE=0, BLOCK=BLOCK, C_INNER=0)]
      + [dict(PER_CHANNEL=True, SAVE_MASK=True, WIDE=False, QMODE=qm, BLOCK=BLOCK, C_INNER=64,
              INV=inv) for qm in (0, 1) for inv in (True, False)]
      + [dict(PER_CHANNEL=False, SAVE_MASK=True, WIDE=False, QMODE=0, BLOCK=BLOCK, C_INNER=0,
              RELU=True)]),
    "_fq_bwd_kernel": (_fq_bwd_kernel, [dict(BLOCK=BLOCK), dict(BLOCK=BLOCK, RELU=True)]),
}

OPS = {"fake_quant": fake_quant}

# the other QAT kernel families of this backend, merged here (they import this module)
from . import bn_act as _bn_act  # noqa: E402
from . import bn_fold as _bn_fold  # noqa: E402
from . import lsq as _lsq  # noqa: E402
from . import observer as _observer  # noqa: E402
from . import qat_layer as _qat_layer  # noqa: E402

for _fam in (_lsq, _observer, _bn_fold, _bn_act, _qat_layer):
    OPS.update(_fam.OPS)
    KERNELS.update(_fam.KERNELS)
