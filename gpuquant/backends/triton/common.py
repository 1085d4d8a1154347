"""Plumbing shared by the inference kernel families: architecture families, launch options,
and a memo of tensors derived from parameters (device copies, reordered weights, folded
bias) so that a quantized network runs with no host round trip after its first call."""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..._tensors import version as _version

__all__ = ["INTERPRET", "COMPILED", "LAUNCH_OPTS", "arch_family", "bf16_rne", "to_bf16",
           "to_dtype", "to_f32", "rne", "derived", "scalar_int", "scalar_float", "ARCH_FAMILIES", "tune_subset",
           "TUNE_MODES", "cdiv", "triton_cache_dir"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Kernels compiled for the GPU (not run by the interpreter): where the interpreter lacks an
# instruction (libdevice.rint) or differs from it (its float32 -> bfloat16 cast truncates),
# a kernel takes the hardware's one instruction when compiled and an exact emulation
# under the interpreter, through the two helpers below.
COMPILED = tl.constexpr(not INTERPRET)

# Every inference kernel launches with FP contraction off: the integer kernels do not care,
# and the float ones (quantize: x * inv_scale, then the interpreter's rounding trick's add)
# depend on separate roundings (contract section 4).
LAUNCH_OPTS = {"enable_fp_fusion": False}

# compute capability (major, minor) -> family whose autotune configs apply; the one place
# where the architecture is decided.
ARCH_FAMILIES = {(8, 0): "sm80", (8, 6): "sm86", (8, 7): "sm80", (8, 9): "sm89",
                 (9, 0): "sm90"}


TUNE_MODES = ("full", "quick")


def tune_mode() -> str:
    """``GPUQUANT_TRITON_TUNE``: "full" (default) or "quick"; anything else is an error."""
    mode = os.environ.get("GPUQUANT_TRITON_TUNE", "full").strip().lower() or "full"
    if mode not in TUNE_MODES:
        raise ValueError(f"GPUQUANT_TRITON_TUNE must be one of {TUNE_MODES}, got {mode!r}")
    return mode


def tune_subset(configs: list, area=None, programs=None, min_programs: int = 0,
                also=None) -> list:
    """The autotune configs to try: all of them, or with ``GPUQUANT_TRITON_TUNE=quick`` three.

    Quick: the configs ordered by ``area(config)`` (largest tile first; list order without
    ``area``); the largest whose grid ``programs(config)`` reaches ``min_programs`` (about
    one wave on the GPU: larger tiles leave multiprocessors idle), its larger neighbour
    (or its smaller one), and the smallest tile. Without ``programs``: the two largest and
    the smallest. On a fresh GPU machine every config is compiled before it is timed (~5 s
    for a 3x3 conv config), which is most of a short benchmark run (``bench.lease`` sets
    quick). The inference kernels apply it after their shape pruning, so a 64-channel layer
    gets three tiles 64 wide. ``also(config)``: a second kind of config worth a try (the
    GEMM's tiles that run two CTAs a multiprocessor); quick adds the largest of them that
    reaches ``min_programs`` (or the largest) when none is picked. A tuple of such
    predicates: one config for each kind none picked so far has. Read at each call."""
    if tune_mode() == "full" or len(configs) <= 3:
        return list(configs)
    ordered = sorted(configs, key=area, reverse=True) if area is not None else list(configs)

    def first_full(cands):
        return next((j for j in cands if programs is None or programs(ordered[j]) >= min_programs),
                    cands[-1] if cands else None)
    i = first_full(list(range(len(ordered))))
    other = i - 1 if i > 0 else i + 1
    picked = {other, i, len(ordered) - 1}
    for kind in (() if also is None else also if isinstance(also, tuple) else (also,)):
        if not any(kind(ordered[j]) for j in picked):
            j = first_full([j for j, c in enumerate(ordered) if kind(c)])
            if j is not None:
                picked.add(j)
    return [ordered[j] for j in sorted(picked)]


_SMS: dict = {}


def sm_count(device=None) -> int:
    """Multiprocessors of the current CUDA device (132 without one: an H100 / H200)."""
    if not torch.cuda.is_available() or INTERPRET:
        return 132
    idx = torch.cuda.current_device() if device is None else device
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


_FAMILY: dict = {}  # (device type, index) -> family: asked on every launch


def arch_family(device: torch.device) -> str:
    """Family of ``device`` ("interpret" under TRITON_INTERPRET, else sm80/sm86/sm89/sm90 or
    "generic" for other GPUs)."""
    if INTERPRET or device.type != "cuda":
        return "interpret"
    if device.index is None:  # "the current device": not cached
        return _family_of(device)
    key = (device.type, device.index)
    fam = _FAMILY.get(key)
    if fam is None:
        fam = _FAMILY[key] = _family_of(device)
    return fam


def _family_of(device: torch.device) -> str:
    cc = torch.cuda.get_device_capability(device)
    fam = ARCH_FAMILIES.get(cc)
    if fam is None:
        fam = "sm90" if cc >= (9, 0) and cc < (10, 0) else "generic"
    return "sm89" if fam == "sm86" else fam  # sm86: sm89's shared memory (99 KB), its tiles


class _DerivedCache:
    """Values derived from source tensors, keyed on the sources' identity and version.

    A hit requires every source to be the very same live tensor (weak references) at the
    same version, storage, shape and strides, so an in-place update of a weight, a
    ``.data =`` reassignment or a freed-and-reused id never returns stale data.
    """

    def __init__(self, maxsize: int = 4096):
        self._d: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.maxsize = maxsize

    def __call__(self, tag: str, sources: Sequence[Optional[torch.Tensor]], extra: tuple,
                 make: Callable[[], object]):
        # identity and version, and the storage, shape and strides: ``w.data = new`` keeps
        # the first two and changes the others
        key = (tag,) + tuple(None if t is None else (id(t), _version(t), t.data_ptr(),
                                                     tuple(t.shape), t.stride(), t.dtype)
                             for t in sources) + extra
        hit = self._d.get(key)
        if hit is not None:
            refs, value = hit
            if all((r is None) if t is None else (r is not None and r() is t)
                   for r, t in zip(refs, sources)):
                self._d.move_to_end(key)
                return value
        value = _unpinned(make(), sources)
        # an entry dies with any of its sources (no reordered weights of dead layers kept)
        drop = lambda _ref, key=key, d=self._d: d.pop(key, None)  # noqa: E731
        refs = tuple(None if t is None else weakref.ref(t, drop) for t in sources)
        self._d[key] = (refs, value)
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return value

    def clear(self) -> None:
        self._d.clear()


def _unpinned(value, sources):
    """``value`` holding no reference to a source tensor: a derived value that is a source
    itself (``t.to(device)`` on the device already) or a view (``_base``) of one (a
    channels_last weight's (O, KH*KW*C) reorder is a view) would keep that source alive
    through the cache, so its weak reference never fired and freed layers' weights stayed
    in memory. A detached alias shares the storage without referencing the tensor."""
    if isinstance(value, torch.Tensor):
        if value._base is not None or any(value is t for t in sources):
            return value.detach()
        return value
    if isinstance(value, tuple):
        return tuple(_unpinned(v, sources) for v in value)
    return value


derived = _DerivedCache()


def _scalar(v, cast, tag: str):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"expected a single value, got a tensor of shape {tuple(v.shape)}")
        if v.device.type == "cpu":
            return cast(v.item())
        return derived(tag, (v,), (), lambda: cast(v.item()))
    return cast(v)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints for grids and plans (``triton.cdiv`` is a constexpr
    function: ~2 us a call from Python, a launcher makes several)."""
    return -(-a // b)


def scalar_int(v) -> int:
    """A Python int from an int or a one-element tensor; a GPU tensor is read once and
    memoised (the read synchronises; later calls with the same tensor do not)."""
    return _scalar(v, int, "scalar")


def scalar_float(v) -> float:
    """:func:`scalar_int` for a float (a scale)."""
    return _scalar(v, float, "scalar_f")


_TICKETS: dict = {}  # device -> int32 zeros, grown on demand


def _zero_tickets(n: int, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("gpuquant: a kernel with launch tickets (split-K weight-only GEMM, "
                           "LSQ / TQT backward, the fused QAT batch norm, weight and observer "
                           "kernels) "
                           "ran for the first time inside CUDA-graph capture; run it once "
                           "before capturing (a warm-up step), so that its tickets exist")
    return torch.zeros(n, dtype=torch.int32, device=device)


def launch_tickets(n: int, device) -> torch.Tensor:
    """At least ``n`` int32 tickets on ``device``, zero between launches, for kernels whose
    last program to finish (a ticket taken after a barrier, reset by that program) does the
    final step of a reduction: the split-K weight-only GEMM (a ticket a tile), the LSQ / TQT
    backward. Shared by the launches on a device, which run in stream order; two such
    launches running concurrently on two streams of one device are not supported.

    Raises:
        RuntimeError: first needed inside CUDA-graph capture (allocate before capturing)."""
    key = torch.device(device)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        t = _zero_tickets(max(n, 1024), key)
        _TICKETS[key] = t
    return t


@triton.jit
def last_to_finish(tick_ptr, n):
    """In a kernel: whether this program is the last of ``n`` to get here, by the int32
    ticket at ``tick_ptr`` (zero between launches: :func:`launch_tickets`,
    :func:`module_tickets`). A barrier first, so that every thread's stores precede the
    ticket; the acquire-release atomic then orders the other programs' stores before the
    last one's loads (read them past L1: ``cache_modifier=".cg"``). The last program resets
    the ticket for the next launch."""
    tl.debug_barrier()
    last = tl.atomic_add(tick_ptr, 1) == n - 1
    tl.atomic_xchg(tick_ptr, 0, mask=last)
    return last


def module_tickets(owner, device) -> torch.Tensor:
    """``owner``'s own two int32 tickets on ``device`` (a BatchNorm: its statistics and
    gradient-sum kernels; an observer: the fused weight kernel's non-finite count, the
    two-launch observe + fake quant's state update), zero
    between launches; kept in the object, not its state_dict. Raises as
    :func:`launch_tickets` does."""
    device = torch.device(device)
    tk = owner.__dict__.get("_gpuquant_tickets")
    if tk is None or tk.device != device:
        tk = _zero_tickets(2, device)
        owner.__dict__["_gpuquant_tickets"] = tk
    return tk


@contextlib.contextmanager
def triton_cache_dir(path: str):
    """Triton's cache directory is ``path`` within (``TRITON_CACHE_DIR``, read at each
    compile), then as it was."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def once_differentiable_kernels(what: str):
    """Decorator for the backward of a fused QAT Function whose gradients come from Triton
    kernels (constants to autograd). Under ``create_graph=True`` (grad mode is on in a
    backward only then) the gradients are computed as usual but carry a node that raises
    if a second backward reaches it, naming ``what`` and the way out, as torch's
    ``once_differentiable`` does, except that it does so whatever the incoming gradient
    (torch's attaches the node only when that requires grad, so a gradient penalty whose
    ``grad_outputs`` are constants got its second-order terms dropped silently). A
    ``create_graph=True`` backward that never differentiates through it runs."""
    msg = (f"{what}: double backward (create_graph=True, e.g. a gradient penalty) through "
           f"gpuquant's fused Triton QAT kernels is not supported (their gradients are not "
           f"differentiable); run that step with gpuquant.backends.use('reference')")

    def deco(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch.no_grad():
                outs = backward(ctx, *grads)
            single = not isinstance(outs, tuple)
            outs = (outs,) if single else outs
            err = torch._C._functions.DelayedError(msg.encode(), len(outs))

            def alias(v):  # (an input that requires grad gives the outputs a grad_fn)
                if isinstance(v, torch.Tensor):
                    v = v.detach()
                    v.requires_grad = True
                return v
            wrapped = err(*[alias(v) for v in outs])
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            return wrapped[0] if single else tuple(wrapped)
        return wrapper
    return deco


@triton.jit
def bf16_rne(y):
    """float32 -> bfloat16 rounding half to even on the bits, as torch's conversion: NaN
    becomes 0x7FC0 (the bit trick alone would carry a NaN's payload into the exponent or
    the sign: the GPU's canonical NaN 0x7FFFFFFF gave -0.0), Inf stays Inf. The
    interpreter's own conversion truncates."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    bits = tl.where(y != y, 0x7FC0, bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_bf16(y):
    """float32 -> bfloat16 as torch converts on the device the kernel runs for. Compiled:
    ``cvt.rn.bf16.f32``, torch's own conversion on CUDA (``__float2bfloat16``: half to
    even, NaN 0x7FFF), one instruction (ptxas packs some pairs into one). Interpreted:
    :func:`bf16_rne` on the bits, as torch's scalar CPU conversion (NaN 0x7FC0)."""
    if COMPILED:
        return y.to(tl.bfloat16)
    else:
        return bf16_rne(y)


@triton.jit
def to_dtype(y, OUT: tl.constexpr):
    """float32 ``y`` -> ``OUT`` (a float dtype), rounding half to even as torch converts on
    the kernel's device: bfloat16 through :func:`to_bf16`, the others by the cast (exact
    in the interpreter too)."""
    if OUT == tl.bfloat16:
        return to_bf16(y)
    else:
        return y.to(OUT)


@triton.jit
def to_f32(x):
    """float16 / bfloat16 / float32 ``x`` as float32, exactly. Interpreted, a bfloat16 goes
    through its bits: Triton's interpreter normalises a subnormal bfloat16 as if float32's
    exponent range started above it (its exponent clamps at zero: 0x0024 became 0x0010),
    which matters where a value passes through unchanged (a gradient). Compiled, a shift."""
    if COMPILED:
        return x.to(tl.float32)
    elif x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def rne(v):
    """Round float32 ``v`` half to even (exact for every value: |v| >= 2^23 is an integer
    already, inf and NaN pass). Compiled: ``cvt.rni.f32.f32``, one instruction. Interpreted
    (where ``libdevice.rint`` is missing): ``(|v| + 2^23) - 2^23`` with the sign put back,
    which needs FP contraction off around it (the kernels launch so)."""
    if COMPILED:
        return libdevice.rint(v)
    else:
        a = tl.abs(v)
        r = (a + 8388608.0) - 8388608.0
        r = tl.where(v < 0, -r, r)
        return tl.where(a < 8388608.0, r, v)
