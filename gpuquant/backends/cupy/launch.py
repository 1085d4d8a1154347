"""Host side of the CUDA kernels: operand preparation, launch plans, execution with CuPy.

A :class:`Launch` is computed with torch alone (it works on CPU tensors too: the CPU tests
run the very same plans through a host emulation of the kernels), then :func:`execute` runs
it on the GPU through CuPy on torch's current stream.

What the plan does on the host, once per call:
* activations to the kernels' layouts: (M, K) rows for linear, NHWC for conv (no copy when
  the input is already channels_last);
* weights to (N, K) rows, K contiguous (conv: (O, kh, kw, cg));
* ``bias_eff = bias - zp' * colsum(w)`` in int64 (zp' = zp_x for int8 inputs, zp_x - 128 for
  uint8 inputs, which the kernels read as x ^ 0x80): the zero-point correction that makes the
  s8 x s8 dot product equal sum((x - zp_x) * w) exactly;
* per-channel multiplier / shift vectors (a per-tensor Requant is broadcast);
* for the tensor-core tiers: K padded to a multiple of 16 (linear), channels padded to a
  multiple of 16 (ungrouped conv); grouped convs whose channels per group are not a multiple
  of 16 (depthwise) run the dp4a conv kernel whatever the tier.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch

from ..._tensors import version as _version
from . import loader

__all__ = ["Launch", "plan_linear", "plan_conv2d", "execute", "BLOCK_TILES", "GEMV_MAX_M"]

# (BM, BN) output tile of one thread block, per tier (see kernels/*_tile.cuh).
BLOCK_TILES = {"dp4a": (64, 64), "mma75": (128, 128), "mma80": (128, 128), "sm90": (128, 128),
               "wgmma": (128, 256)}
THREADS = 256
# linear with at most this many rows runs kernels/gemv_dp4a.cu (one warp per output column,
# GEMV_COLUMNS columns a block) on every tier: the GEMM tiles would be almost empty.
GEMV_MAX_M = 8
GEMV_COLUMNS = 8
_U8_XOR = -2139062144  # 0x80808080 as int32: uint8 x -> x - 128 as int8, four at a time


@dataclass
class Launch:
    """One kernel launch: ``gq_<family>_<tier>`` over ``grid`` with ``args`` (tensors and
    ints in the kernel's parameter order), then ``finish(out)`` gives the op's result."""

    family: str
    tier: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: tuple
    out: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)

    def __post_init__(self):
        gx, gy, gz = self.grid
        if not (gx < 2 ** 31 and gy <= 65535 and gz <= 65535):  # CUDA's grid limits
            raise ValueError(f"cupy backend op: the {self.family} kernel's grid {self.grid} is "
                             f"past CUDA's limits (x < 2^31, y and z <= 65535) for this shape; "
                             f"use the triton backend for it")

    @property
    def empty(self) -> bool:
        return self.out.numel() == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base (cp.async / 16-byte loads need it)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _act_params(x: torch.Tensor, x_zp: int):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"quantized activations must be torch.int8 or torch.uint8 tensors, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(x_zp, torch.Tensor) and x_zp.numel() == 1 and not x_zp.is_floating_point():
        x_zp = x_zp.item()
    if isinstance(x_zp, bool) or not isinstance(x_zp, int):
        raise TypeError(f"x_zp must be an int, got {type(x_zp).__name__} {x_zp!r}")
    lo, hi = (0, 255) if x.dtype == torch.uint8 else (-128, 127)
    if not lo <= x_zp <= hi:
        raise ValueError(f"x_zp {x_zp} is outside the {x.dtype} range [{lo}, {hi}]")
    if x.dtype == torch.uint8:
        return _U8_XOR, x_zp - 128
    return 0, x_zp


def _check_plan_args(x, w, bias, tier: str, x_dims, w_dims: int, op: str) -> None:
    """What a plan reads before it indexes anything: known tier, ranks, weight dtype, an
    int32 bias of one value an output, one device."""
    from .dispatch import TIERS
    if tier not in TIERS:
        raise ValueError(f"{op}: unknown gpuquant CUDA tier {tier!r}; allowed: {list(TIERS)}")
    if not isinstance(x, torch.Tensor) or x.dim() not in x_dims:
        raise ValueError(f"{op}: x must be a tensor with {' or '.join(map(str, x_dims))} "
                         f"dimensions, got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor, got {type(w).__name__}")
    _check_weight(w, w_dims)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.int32:
            raise TypeError(f"{op}: bias must be None or an int32 tensor, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.dim() != 1 or bias.shape[0] != w.shape[0]:
            raise ValueError(f"{op}: bias must have shape ({w.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    devices = {t.device for t in (x, w, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: x, weight and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")


# id(weight) -> (weakref to it, {layout key: (version key, (kernel-ready weight, colsum))}): a
# module's weight is re-laid out and summed once, not every call. Entries go when the weight
# tensor does (a weak reference); a weight already in the kernel's layout is cached as itself
# (a view: no second copy of every Linear weight on the GPU); an in-place change
# (``_version``) or a new storage (``.data =``) invalidates them. Inference tensors have no
# version counter: keyed on identity and storage, as every gpuquant cache (an in-place write
# to one under inference_mode is not seen; ``load_state_dict`` into a quantized module gives
# its inference-tensor buffers new storage, so a load is).
_WEIGHT_CACHE: dict = {}


def _prepared_weight(w: torch.Tensor, key, make):
    """``make() -> (w_ready, colsum)``, cached per weight tensor while it is unchanged."""
    version = (_version(w), w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.device)
    wid = id(w)
    entry = _WEIGHT_CACHE.get(wid)
    if entry is None or entry[0]() is not w:
        try:
            ref = weakref.ref(w, lambda _r, wid=wid: _WEIGHT_CACHE.pop(wid, None))
        except TypeError:  # not weak-referenceable: no cache
            return make()
        entry = _WEIGHT_CACHE[wid] = (ref, {})
    hit = entry[1].get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    w_ready, colsum = make()
    if w_ready._base is not None:
        # a view of w (already in the kernel's layout): a view's ``_base`` references w, which
        # would keep w alive through this cache and its weak reference would never fire; a
        # detached alias shares the storage without holding the tensor
        w_ready = w_ready.detach()
    entry[1][key] = (version, (w_ready, colsum))
    return w_ready, colsum


def _colsum(w2: torch.Tensor) -> torch.Tensor:
    return w2.reshape(w2.shape[0], -1).to(torch.int32).sum(dim=1, dtype=torch.int64)


# id(multiplier tensor) -> (weak references to it and to the shift tensor, their versions)
# once checked (by id: a tensor's == is elementwise, no dictionary key)
_CHECKED_RQ: dict = {}


def _check_requant(rq) -> None:
    """``Requant.check_values`` of the requantization the kernel reads (one made on the device,
    or edited in place, was not checked where it was made): once per (multiplier, shift)
    tensor pair and their in-place versions, so a layer pays the host read once (an edit
    through ``.data``, which has a version counter of its own, is not seen). An
    unchecked shift >= 63 had shifted a 64-bit value past its width (undefined in C++):
    bytes unlike NumPy's, with no error, where Triton raised."""
    m, r = rq.multiplier, rq.rshift
    key = (_version(m), _version(r))
    hit = _CHECKED_RQ.get(id(m))
    if hit is not None and hit[0]() is m and hit[1]() is r and hit[2] == key:
        return
    from ...functional.requant import Requant
    Requant.check_values(m.cpu(), r.cpu(), "cupy conv / linear epilogue")
    mid = id(m)
    _CHECKED_RQ[mid] = (weakref.ref(m, lambda _, mid=mid: _CHECKED_RQ.pop(mid, None)),
                        weakref.ref(r), key)


def _channel_params(colsum: torch.Tensor, bias, zp_eff: int, rq, n: int, device):
    """bias_eff (int64), multiplier and rshift (int32), each (n,) on ``device``."""
    _check_requant(rq)
    bias_eff = -int(zp_eff) * colsum
    if bias is not None:
        bias_eff = bias_eff + bias.to(device=device, dtype=torch.int64).reshape(-1)
    mult = rq.multiplier.to(device=device, dtype=torch.int32).reshape(-1)
    shift = rq.rshift.to(device=device, dtype=torch.int32).reshape(-1)
    if mult.numel() == 1:
        mult, shift = mult.expand(n), shift.expand(n)
    if mult.numel() != n:
        raise ValueError(f"requantization has {mult.numel()} channels, the op has {n} outputs")
    return bias_eff.contiguous(), mult.contiguous(), shift.contiguous()


def _check_weight(w: torch.Tensor, ndim: int) -> None:
    if w.dtype != torch.int8:
        raise TypeError(f"quantized weights must be torch.int8, got {w.dtype}")
    if w.dim() != ndim:
        raise ValueError(f"weight must have {ndim} dimensions, got shape {tuple(w.shape)}")


def _check_rows(m: int) -> None:
    if m >= 2 ** 31:
        raise ValueError(f"{m} output rows: the CUDA kernels index rows with int32 (< 2^31); "
                         f"split the batch")


def _pad_last(t: torch.Tensor, to: int) -> torch.Tensor:
    if t.shape[-1] == to:
        return t
    out = torch.zeros(t.shape[:-1] + (to,), dtype=t.dtype, device=t.device)
    out[..., :t.shape[-1]] = t
    return out


def _check_out_dtype(rq, op: str) -> None:
    """The kernels store one byte an output (``gq_epilogue``): 8-bit outputs only."""
    if rq.dtype.storage not in (torch.int8, torch.uint8):
        raise NotImplementedError(
            f"cupy backend op {op!r} writes 8-bit outputs only, got a requantization to "
            f"{rq.dtype.name}; use the triton or reference backend for it")


def plan_linear(x, x_zp, w, bias, rq, tier: str) -> Launch:
    """Plan ``linear(x, x_zp, w, bias, rq)`` (shapes as the reference backend) for ``tier``."""
    _check_out_dtype(rq, "linear")
    _check_plan_args(x, w, bias, tier, range(1, 64), 2, "linear")
    a_xor, zp_eff = _act_params(x, x_zp)
    k = x.shape[-1]
    n = w.shape[0]
    if w.shape[1] != k:  # (the prepared weight is cached by padded K: check it here)
        raise ValueError(f"linear: x has {k} features but the weight {tuple(w.shape)} takes "
                         f"{w.shape[1]}")
    lead = tuple(x.shape[:-1])
    m = 1
    for s in lead:
        m *= int(s)
    a = x.reshape(m, k)
    _check_rows(m)
    if m <= GEMV_MAX_M:                # a few rows: the warp-per-column kernel, any tier
        family, tier = "gemv", "dp4a"
        kp = k
    else:
        family = "gemm"
        kp = k if tier == "dp4a" else _cdiv(k, 16) * 16   # tensor-core tiers: K % 16 == 0

    def make():
        w2 = w.reshape(n, k)
        return _aligned(_pad_last(w2, kp)), _colsum(w2)
    w2, colsum = _prepared_weight(w, ("linear", kp), make)
    bias_eff, mult, shift = _channel_params(colsum, bias, zp_eff, rq, n, x.device)
    a, k = _aligned(_pad_last(a, kp)), kp
    out = torch.empty((m, n), dtype=rq.dtype.storage, device=x.device)
    args = (a, w2, bias_eff, mult, shift, out, m, n, k, a_xor, int(rq.zero_point),
            int(rq.qmin), int(rq.qmax))
    if family == "gemv":
        grid = (_cdiv(n, GEMV_COLUMNS), 1, 1)
    else:
        bm, bn = BLOCK_TILES[tier]
        grid = (_cdiv(m, bm), _cdiv(n, bn), 1)
    return Launch(family, tier, grid, (THREADS, 1, 1), args, out,
                  lambda o: o.reshape(lead + (n,)))


def _pair(v, name, minimum: int):
    """An int or a pair of ints, each >= ``minimum``, as a pair."""
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else \
        (tuple(v) if isinstance(v, (tuple, list)) else None)
    if t is not None and len(t) == 1:
        t = (t[0], t[0])
    if t is None or len(t) != 2 or any(isinstance(i, bool) or not isinstance(i, int)
                                       for i in t):
        raise ValueError(f"conv2d {name} must be an int or a pair of ints, got {v!r}")
    if min(t) < minimum:
        raise ValueError(f"conv2d {name} must be >= {minimum}, got {v!r}")
    return t


def plan_conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq, tier: str) -> Launch:
    """Plan ``conv2d`` (NCHW logical shapes, as the reference backend) for ``tier``.

    Grouped convs with channels per group not a multiple of 16 use the dp4a kernel.
    """
    _check_out_dtype(rq, "conv2d")
    _check_plan_args(x, w, bias, tier, (4,), 4, "conv2d")
    a_xor, zp_eff = _act_params(x, x_zp)
    (sh, sw), (ph, pw), (dh, dw) = (_pair(stride, "stride", 1), _pair(padding, "padding", 0),
                                    _pair(dilation, "dilation", 1))
    nimg, c, h, wd = (int(s) for s in x.shape)
    o, cg, kh, kw = (int(s) for s in w.shape)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d groups must be a positive int, got {groups!r}")
    og = o // groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d output would be empty ({ho}x{wo}) for input {h}x{wd}, kernel "
                         f"{kh}x{kw}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    if c % groups or o % groups or c // groups != cg:
        raise ValueError(f"conv2d weight {tuple(w.shape)} and groups={groups} do not fit an "
                         f"input of {c} channels")
    xh = x.permute(0, 2, 3, 1)                       # NHWC view (free for channels_last)
    cp = cg
    if tier != "dp4a" and cg % 16:
        if groups == 1:
            cp = _cdiv(cg, 16) * 16                  # tensor-core tiers: 16-channel chunks
        else:
            tier = "dp4a"                            # grouped / depthwise: the dp4a kernel

    def make():
        wr = w.permute(0, 2, 3, 1)                   # (O, kh, kw, cg)
        return _aligned(_pad_last(wr, cp)), _colsum(wr)
    wr, colsum = _prepared_weight(w, ("conv", cp), make)
    bias_eff, mult, shift = _channel_params(colsum, bias, zp_eff, rq, o, x.device)
    if cp != cg:
        xh, cg, c = _pad_last(xh, cp), cp, cp
    xh = _aligned(xh)
    kg = kh * kw * cg
    m = nimg * ho * wo
    _check_rows(m)
    out = torch.empty((nimg, ho, wo, o), dtype=rq.dtype.storage, device=x.device)
    bm, bn = BLOCK_TILES[tier]
    args = (xh, wr, bias_eff, mult, shift, out, m, og, kg, a_xor, int(rq.zero_point),
            int(rq.qmin), int(rq.qmax), h, wd, c, cg, ho, wo, kw, sh, sw, ph, pw, dh, dw,
            int(x_zp) & 0xFF)
    return Launch("conv", tier, (_cdiv(m, bm), _cdiv(og, bn), groups), (THREADS, 1, 1), args,
                  out, lambda t: t.permute(0, 3, 1, 2))


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol (``__cuda_stream__``: version 0,
    the handle), which CuPy 14's ``Stream.from_external`` takes."""
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def cupy_stream(cupy, ptr: int):
    """CuPy's view of the external stream ``ptr`` (torch's): ``Stream.from_external`` where
    CuPy has it (14: ``ExternalStream`` is deprecated and warned on every launch), else
    ``ExternalStream`` (CuPy 13)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr)


def execute(launch: Launch, capability) -> torch.Tensor:
    """Run a plan on its tensors' GPU with CuPy, on torch's current stream; returns the result."""
    if not launch.empty:
        import cupy
        import numpy as np
        dev = launch.out.device
        for a in launch.args:
            if isinstance(a, torch.Tensor) and a.device != dev:
                raise ValueError(f"all operands must be on {dev}, got one on {a.device}")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(idx):
            kern = loader.get_kernel(launch.family, launch.tier, capability, idx)
            # tensors as raw device pointers (8 bytes, what cuLaunchKernel reads for a pointer
            # parameter), ints as int32: no CuPy array wrappers on the hot path
            args = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(a)
                         for a in launch.args)
            stream = cupy_stream(cupy, torch.cuda.current_stream(dev).cuda_stream)
            smem = loader.dynamic_smem(launch.tier) if launch.family != "gemv" else 0
            with stream:
                kern(launch.grid, launch.block, args, shared_mem=smem)
    return launch.finish(launch.out)
