"""Kernel launches with a memoised launch plan: Triton's own launch path, once per plan.

``kernel[grid](*args, **meta)`` through Triton's ``Autotuner`` / ``Heuristics`` wrappers and
``JITFunction.run`` costs the host about 50 us a launch on the development CPU (measured with
a stand-in driver, :mod:`.standin`): the autotuner's key and argument dicts,
the binder's specialization of every argument, the cache-key hash, the global-value check.
A quantized network or a QAT step is dozens to hundreds of launches, so that is most of
an eager batch-1 forward and of a QAT step's host time.

:func:`launch` runs Triton's path the first time it sees a *plan key* and keeps what that
launch resolved: the compiled kernel, the chosen autotune config, the heuristics' values,
the constexpr and default arguments in signature order. Later calls with the same key call
the compiled kernel's launcher directly, with the argument list Triton would pass, except
that each tensor is its data pointer (an int): the launcher then skips, per pointer
argument, a ``data_ptr()`` call and a ``cuPointerGetAttribute`` driver call.

The plan key holds everything Triton specializes or tunes on: each positional argument's
value (ints, bools, None, strings), type (floats are never specialized), dtype and 16-byte
alignment (tensors), or base dtype, block shape and shared layout (Gluon's TMA tensor
descriptors, passed to the launcher as they are: it encodes them), the keyword
meta-parameters, the kernel and the device. The grid is recomputed every call (a callable
grid sees the plan's meta-parameters, as Triton's does). A plan is only made when every
argument after the positional ones is a compile-time constant (else Triton's path runs
every time).

Replays, one level up: :func:`recording` lets a caller see the launches a piece of code makes
as the launcher gets them, and :func:`replays` turns them into calls of the launchers with
the same arguments but for the addresses of the call's new tensors. A caller that can tell
by a cheap signature that its next call makes the same launches (the QAT layer,
:mod:`.qat_layer`; the observe + fake quant of activations, :mod:`.observer`) replays them,
skipping its checks and the launch path. ``REPLAYS = False`` turns them off.

Under the interpreter (``TRITON_INTERPRET=1``) and with ``GPUQUANT_TRITON_FAST_LAUNCH=0``
every call takes Triton's path. CI checks on the CPU, with a stand-in CUDA driver and the
kernels compiled for sm_90, that both paths hand the launcher the same arguments.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import threading

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .common import INTERPRET

try:  # Triton >= 3.4 (the launch hooks live in knobs); older releases take Triton's path
    from triton import knobs
except ImportError:  # pragma: no cover - Triton 3.6 (GPU machines) and 3.9 (CI) have it
    knobs = None

__all__ = ["launch", "ENABLED", "clear_plans", "recording", "replays", "replays_on",
           "current_stream", "PlanCache", "REPLAYS"]

ENABLED = knobs is not None and \
    os.environ.get("GPUQUANT_TRITON_FAST_LAUNCH", "1") not in ("", "0")

_PLANS: dict = {}
_NO_PLAN = object()  # a key whose launches always take Triton's path
_MAX_PLANS = 4096  # plans are per exact shape: a workload of ever-new shapes starts over


def clear_plans() -> None:
    _PLANS.clear()


class _Recording(threading.local):
    out = None  # the open recording of this thread (autograd runs a CUDA backward on its
    # own device thread), or None


_REC = _Recording()


@contextlib.contextmanager
def recording(on: bool = True):
    """Within (``on``; else it yields None and records nothing): each :func:`launch` of
    this thread appends ``(plan, grid, launcher arguments, tensor mask)`` to the list
    yielded, once it has launched: the plan that
    launch used or made (``(compiled, tail, meta, kern)``; None where Triton's path runs
    every time, e.g. under the interpreter), the grid resolved, the arguments as the
    plan hands them to the launcher (tensors as their data pointers) and which of them were
    tensors. What a caller replays a fixed sequence of launches from
    (:mod:`.qat_layer`'s layer plans)."""
    if not on:
        yield None
        return
    prev = _REC.out
    _REC.out = out = []
    try:
        yield out
    finally:
        _REC.out = prev


_Tensor = torch.Tensor
_KEYERS: dict = {}  # tuple of the positional arguments' classes -> that signature's keyer


def _make_keyer(types: tuple):
    """A function of the positional arguments giving (what Triton specializes on, the
    arguments as the launcher takes them), for one tuple of argument classes: tensors'
    dtype, device kind and 16-byte alignment, ints' and other values (bool, None, str) by
    value, floats nothing (never specialized; their class is in the key already). In the
    launcher's arguments each tensor is its data pointer, a Python int: the launcher takes
    an int as the address itself, where for a tensor it calls ``data_ptr()`` and then the
    driver's ``cuPointerGetAttribute`` (one driver call per pointer argument per launch,
    Triton 3.6 and 3.9). The pointer is read once, for both. The device kind in the key
    keeps that check's purpose: a CPU tensor never matches a plan made for CUDA tensors, so
    it takes Triton's path, which refuses it. Generated once per signature with fixed
    indices: no per-argument type dispatch at launch time (the launch path's largest host
    cost)."""
    key, vals = [], []
    for i, t in enumerate(types):
        if issubclass(t, _Tensor):
            key.append(f"a[{i}].dtype, a[{i}].is_cuda, not (p{i} := a[{i}].data_ptr()) & 15")
            vals.append(f"p{i}")
        elif _is_descriptor(t):  # what Triton specializes a TMA descriptor on; passed as is
            key.append(f"a[{i}].base.dtype, a[{i}].base.is_cuda, tuple(a[{i}].block_shape), "
                       f"a[{i}].layout")
            vals.append(f"a[{i}]")
        else:
            if t is not float:
                key.append(f"a[{i}]")
            vals.append(f"a[{i}]")
    src = "lambda a: ((" + "".join(k + ", " for k in key) + "), (" + \
        "".join(v + ", " for v in vals) + "))"
    return eval(src)  # noqa: S307


def _is_descriptor(t) -> bool:
    """A host-side TMA tensor descriptor class (Gluon's ``TensorDescriptor``: base tensor,
    block shape, shared layout), which Triton specializes on its base's dtype, its block
    shape and its layout only, and whose launcher builds the ``CUtensorMap`` itself."""
    fields = getattr(t, "__dataclass_fields__", None)
    return fields is not None and {"base", "block_shape", "layout"} <= fields.keys()


def _args_key(args) -> tuple:
    """(key, launcher arguments): what Triton specializes on, per positional argument
    (:func:`_make_keyer`), with the arguments' classes (the keyer itself stands for them,
    one per class tuple), and the arguments with tensors as their data pointers."""
    types = tuple(map(type, args))
    keyer = _KEYERS.get(types)
    if keyer is None:
        if len(_KEYERS) >= _MAX_PLANS:
            _KEYERS.clear()
        keyer = _KEYERS[types] = _make_keyer(types)
    key, vals = keyer(args)
    return (keyer, key), vals


def launch(kern, grid, *args, **meta):
    """``kern[grid](*args, **meta)``, through a memoised plan after the first call per key.

    ``kern``: a ``@triton.jit`` function, possibly wrapped by ``triton.autotune`` /
    ``triton.heuristics``; runtime arguments positional, compile-time ones as keywords."""
    if INTERPRET or not ENABLED:
        compiled = kern[grid](*args, **meta)
        if _REC.out is not None:
            _REC.out.append((None, None, None, None))
        return compiled
    drv = driver.active
    dev = drv.get_current_device()
    args_key, ptr_args = _args_key(args)
    key = (id(kern), dev, args_key, tuple(meta.items()))
    plan = _PLANS.get(key)
    if plan is None:
        compiled = kern[grid](*args, **meta)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan = _make_plan(kern, compiled, args, meta)
        if _REC.out is not None:
            _record(plan, grid, args, ptr_args)
        return compiled
    if plan is _NO_PLAN:
        compiled = kern[grid](*args, **meta)
        if _REC.out is not None:
            _REC.out.append((None, None, None, None))
        return compiled
    compiled, tail, full_meta, _ = plan
    g = grid(full_meta) if callable(grid) else grid
    stream = drv.get_current_stream(dev)
    hooks = knobs.runtime
    enter, leave = _hook(hooks.launch_enter_hook), _hook(hooks.launch_exit_hook)
    compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata,
                 None if enter is None else compiled.launch_metadata(g, stream, *args, *tail),
                 enter, leave, *ptr_args, *tail)
    if _REC.out is not None:
        _record(plan, g, args, ptr_args)
    return compiled


def _record(plan, grid, args, ptr_args) -> None:
    """Append one launch to the open recording: (None, ...) for a launch that always takes
    Triton's path; else the plan, the grid resolved and the launcher's arguments."""
    if plan is _NO_PLAN:
        _REC.out.append((None, None, None, None))
        return
    g = grid(plan[2]) if callable(grid) else grid
    _REC.out.append((plan, g, ptr_args, [isinstance(a, _Tensor) for a in args]))


def _hook(h):
    """A launch hook, or None where there is nothing to call. Triton 3.6 / 3.9 keep an
    empty ``HookChain`` there (never None): its launcher then builds the launch metadata
    and calls both chains from C on every launch, for nothing."""
    if h is None or not getattr(h, "calls", True):
        return None
    return h


def _make_plan(kern, compiled, args, meta):
    """(compiled kernel, the values of every parameter after the positional ones in
    signature order, the meta-parameters a callable grid reads, the kernel: kept alive, so
    its id in the key is never another's), or _NO_PLAN."""
    needed = ("run", "function", "packed_metadata", "launch_metadata")
    if not all(hasattr(compiled, a) for a in needed):
        return _NO_PLAN
    full = dict(meta)
    fn = kern
    while not isinstance(fn, JITFunction):  # Autotuner / Heuristics wrappers, outside in
        named = {**dict(zip(fn.arg_names, args)), **full}
        config = getattr(fn, "best_config", None)
        if config is not None:  # the autotuner: the config it chose for this call
            full.update(config.all_kwargs())
        values = getattr(fn, "values", None)
        if isinstance(values, dict) and config is None:  # heuristics
            for name, heur in values.items():
                full[name] = heur(named)
        fn = fn.fn
    params = list(inspect.signature(fn.fn).parameters.values())
    tail = []
    for i, p in enumerate(params[len(args):], start=len(args)):
        if not fn.params[i].is_constexpr:
            return _NO_PLAN  # a runtime argument passed by keyword: no fixed tail
        if p.name in full:
            tail.append(full[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return _NO_PLAN
    scalars = {n: a for n, a in zip(fn.arg_names, args) if not isinstance(a, torch.Tensor)}
    return compiled, tuple(tail), {**scalars, **full}, kern  # no tensor kept alive


REPLAYS = True  # callers' replays (below) where launch plans are on; False: off


def replays_on() -> bool:
    """Replays apply: compiled kernels with launch plans and no launch hooks (a profiler's
    hooks see each launch through Triton's path)."""
    if not (REPLAYS and ENABLED) or INTERPRET:
        return False
    rt = knobs.runtime
    return _hook(rt.launch_enter_hook) is None and _hook(rt.launch_exit_hook) is None


def current_stream():
    """The current device's current stream, as a launch takes it."""
    drv = driver.active
    return drv.get_current_stream(drv.get_current_device())


def replays(records, slots, fixed, n: int):
    """The ``n`` recorded launches (:func:`recording`) as functions ``(stream,
    pointers)`` calling each compiled kernel's launcher as the launch plan did, with every
    tensor argument rewritten as an offset into one of ``slots`` (the step's tensors, in
    order: ``pointers`` are their addresses at replay) or, failing that, kept as a constant
    if it is in ``fixed`` (addresses the signature pins). False where that is not possible:
    another number of launches, a launch without a plan (Triton's path), a pointer in
    neither, a slot not 16-byte aligned (Triton specializes on alignment), an argument of
    another kind."""
    if len(records) != n:
        return False
    spans = []
    for k, v in enumerate(slots):
        p = v.data_ptr()
        if p & 15:
            return False
        spans.append((p, p + v.numel() * v.element_size(), k))
    out = []
    for plan, grid, args, mask in records:
        if plan is None:
            return False
        compiled, tail = plan[0], plan[1]
        consts, items = [], []
        for a, is_tensor in zip(args, mask):
            if is_tensor:
                at = next(((k, a - lo) for lo, hi, k in spans if lo <= a < hi), None)
                if at is not None:
                    items.append(f"b[{at[0]}] + {at[1]}" if at[1] else f"b[{at[0]}]")
                    continue
                if a not in fixed:
                    return False
            elif not isinstance(a, (int, float, bool, type(None))):
                return False
            items.append(f"K[{len(consts)}]")
            consts.append(a)
        for a in tail:
            items.append(f"K[{len(consts)}]")
            consts.append(a)
        g = (tuple(grid) + (1, 1))[:3]
        src = (f"lambda stream, b: run({g[0]}, {g[1]}, {g[2]}, stream, fn, md, None, None, "
               f"None, {', '.join(items)})")
        out.append(eval(src, {"run": compiled.run, "fn": compiled.function,  # noqa: S307
                              "md": compiled.packed_metadata, "K": tuple(consts)}))
    return tuple(out)


class PlanCache(dict):
    """A module's replay plans by signature, kept in its ``__dict__``: never copied or
    pickled with the module (they hold compiled kernels and addresses)."""

    def __deepcopy__(self, memo):
        return PlanCache()

    def __reduce__(self):
        return PlanCache, ()
