"""Cross-checking a backend against the NumPy oracle, per module or per op.

* :func:`verify` runs a model twice, on the backend under test and on ``"numpy"``, records
  every leaf module's output with forward hooks and reports, module by module in execution
  order, whether the bytes agree (and where they first do not).
* ``GPUQUANT_VERIFY=1`` in the environment checks every integer op call as it happens:
  :func:`gpuquant.backends.registry.get_op` wraps the chosen implementation with
  :func:`checked_op`, which also runs the NumPy op on CPU copies of the arguments and raises
  :class:`VerifyError` naming the op at the first difference.

Example:
    >>> report = gpuquant.backends.verify(qmodel, x)          # current backend vs numpy
    >>> report.ok, report.first_mismatch
    >>> print(report)
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import List, Optional

import torch

from . import registry

__all__ = ["verify", "VerifyReport", "ModuleCheck", "VerifyError", "checked_op", "enabled"]

ORACLE = "numpy"


class VerifyError(RuntimeError):
    """An op's output differs from the NumPy oracle's (raised under ``GPUQUANT_VERIFY=1``)."""


@dataclasses.dataclass
class ModuleCheck:
    """One recorded module output compared with the oracle's.

    ``name``: the module's qualified name (``"#k"`` appended for its k-th call after the
    first); ``kind``: its class name; ``shape`` / ``dtype``: of the tested output;
    ``equal``: identical values (and shape and dtype); ``max_abs_diff``: largest absolute
    difference (None where shapes or dtypes differ).
    """

    name: str
    kind: str
    shape: tuple
    dtype: str
    equal: bool
    max_abs_diff: Optional[float]


@dataclasses.dataclass
class VerifyReport:
    """Per-module comparison of one backend against the NumPy oracle."""

    backend: str
    modules: List[ModuleCheck]

    @property
    def ok(self) -> bool:
        return all(m.equal for m in self.modules)

    @property
    def first_mismatch(self) -> Optional[ModuleCheck]:
        return next((m for m in self.modules if not m.equal), None)

    @property
    def mismatches(self) -> List[ModuleCheck]:
        return [m for m in self.modules if not m.equal]

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (f"gpuquant verify: backend {self.backend!r} vs {ORACLE!r}: "
                + ("all {} module outputs identical".format(len(self.modules)) if self.ok else
                   f"{len(self.mismatches)} of {len(self.modules)} module outputs differ; first: "
                   f"{self.first_mismatch.name!r}"))
        w = max([len(m.name) for m in self.modules] + [6])
        lines = [head, f"  {'module':<{w}}  {'type':<18} {'shape':<20} {'dtype':<14} result"]
        for m in self.modules:
            res = "ok" if m.equal else (f"DIFF max |d| = {m.max_abs_diff:g}"
                                        if m.max_abs_diff is not None else "DIFF shape/dtype")
            lines.append(f"  {m.name:<{w}}  {m.kind:<18} {str(m.shape):<20} {m.dtype:<14} {res}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- comparison
def _to_cpu(obj):
    """Tensors (also inside lists, tuples, dicts and dataclasses such as Requant) on CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}

# Ops whose float outputs agree across backends to float32 rounding of their K-term sum, not
# bit for bit (docs/TRANSFORMERS.md): op -> K from its arguments. Everything else: bytes.
FLOAT_ACCUMULATING = {"linear_weight_only": lambda args: args[1].shape[-1]}


def float_tolerance(dtype: torch.dtype, k: int) -> float:
    """Relative tolerance (of the oracle's largest magnitude) for a float output that sums
    ``k`` products in another order: float32 rounding of each partial sum plus the output
    dtype's rounding, with a factor 4 of margin."""
    return 4.0 * (k * 2.0 ** -24 + torch.finfo(dtype).eps)


def _compare(a: torch.Tensor, b: torch.Tensor, rtol: Optional[float] = None):
    """(equal, max_abs_diff) of two tensors, compared on CPU: bit patterns for floats (-0.0
    and +0.0 differ, every NaN equals every NaN); with ``rtol`` (float outputs of the
    :data:`FLOAT_ACCUMULATING` kind) within ``rtol * max |b|`` instead."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, None
    if a.numel() == 0:
        return True, 0.0
    if a.dtype.is_floating_point:
        nan = a.isnan() & b.isnan()
        d = (a.double() - b.double()).abs().nan_to_num(0.0)
        if rtol is not None:
            bound = rtol * float(b.double().abs().nan_to_num(0.0).max())
            same = bool(((d <= bound) | nan).all()) and bool((a.isnan() == b.isnan()).all())
        elif a.dtype in _BITS:
            bits = _BITS[a.dtype]
            same = bool(((a.view(bits) == b.view(bits)) | nan).all())
        else:
            same = bool(((a == b) | nan).all())
    else:
        same = torch.equal(a, b)
        d = (a.long() - b.long()).abs()
    return same, float(d.max())


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


# ----------------------------------------------------------------------------- per module
def _record(model: torch.nn.Module, inputs, kw):
    """Run ``model`` and return [(name, kind, [output tensors on CPU])] in execution order."""
    from ..nn.quantized.module import QuantizedModule  # local: nn imports the backends
    records, handles, calls = [], [], {}
    # a quantized module is one integer op even when it holds others (the epilogue-fused
    # ConvAdd / ConvDequant run their parts inside one call: only the parent is called)
    leaves = [(n, m) for n, m in model.named_modules()
              if isinstance(m, QuantizedModule) or not any(True for _ in m.children())]
    if not leaves:
        leaves = [("", model)]

    def hook_for(name):
        def hook(mod, _inp, out):
            k = calls.get(name, 0)
            calls[name] = k + 1
            label = (name or "(model)") + (f"#{k + 1}" if k else "")
            records.append((label, type(mod).__name__, [t.detach().cpu().clone() for t in _tensors(out)]))
        return hook

    for name, mod in leaves:
        handles.append(mod.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad():
            final = model(*inputs, **kw)
    finally:
        for h in handles:
            h.remove()
    if leaves[0][1] is not model:
        records.append(("(output)", type(model).__name__, [t.detach().cpu().clone() for t in _tensors(final)]))
    return records


def _on_cpu(model: torch.nn.Module, inputs, kw):
    devs = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    devs |= {t.device.type for t in _tensors(list(inputs)) + _tensors(kw)}
    if devs <= {"cpu"}:
        return model, inputs, kw
    return copy.deepcopy(model).cpu(), _to_cpu(tuple(inputs)), _to_cpu(kw)


def verify(model: torch.nn.Module, *inputs, backend: Optional[str] = None, **kwargs) -> VerifyReport:
    """Run ``model`` on ``backend`` and on the NumPy oracle and compare every module's output.

    Every leaf module (one with no children) and every quantized module (an epilogue-fused
    module holds two) gets a forward hook; the model runs once on the
    backend under test and once inside ``use("numpy")`` (on CPU copies of the model and
    inputs when they live on a GPU), and the outputs are compared call by call, plus the
    model's final output. Users run this once on their own model and device before
    trusting a deployment.

    Args:
        model: a module whose integer ops dispatch through :mod:`gpuquant.backends`
            (e.g. a model converted with ``gpuquant.quantization.quantize``), in eval mode.
        *inputs, **kwargs: what ``model`` is called with.
        backend: the backend to test; None tests what runs now (``use`` / the
            ``GPUQUANT_BACKEND`` choice, else automatic selection for the inputs' device).

    Integer outputs are compared bit for bit, float ones by their bit patterns, except in a
    model holding weight-only Linears (float accumulation, not bit-exact across backends):
    there float outputs must agree within :func:`float_tolerance` of the largest
    ``in_features``.

    Returns:
        A :class:`VerifyReport`: ``.ok``, ``.first_mismatch`` (name, shape, max difference),
        ``.modules``; ``print(report)`` shows a table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown backend, one that cannot run here, the NumPy backend is not
            available, or QAT modules in the model (convert it first).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"verify: model must be a torch.nn.Module, got {type(model).__name__}")
    from ..nn.qat.module import QATModule
    qat = [n or "<root>" for n, m in model.named_modules() if isinstance(m, QATModule)]
    if qat:  # its fake quant has no NumPy (integer) form to compare with
        raise ValueError(f"verify: the model holds QAT modules ({qat[:3]}); verify compares "
                         f"a quantized model's integer ops: convert it with "
                         f"gpuquant.quantization.quantize first")
    registry.get_backend(ORACLE)  # raises with the list of available backends
    if backend is not None:
        with registry.use(backend):
            tested = _record(model, inputs, kwargs)
        name = backend
    else:
        tested = _record(model, inputs, kwargs)
        name = registry.current()
        if name is None:
            ts = _tensors(list(inputs)) + _tensors(kwargs)
            name = registry.auto_backend(ts[0] if ts else "cpu")
    m2, in2, kw2 = _on_cpu(model, inputs, kwargs)
    with registry.use(ORACLE):
        oracle = _record(m2, in2, kw2)
    # weight-only Linears accumulate in float (FLOAT_ACCUMULATING): from the first one on,
    # float outputs are compared to its rounding, not bit for bit
    from ..nn.quantized.linear_dynamic import WeightOnlyLinear
    k_float = max((m.in_features for m in model.modules() if isinstance(m, WeightOnlyLinear)),
                  default=None)
    checks = []
    for (label, kind, outs), (label2, _, outs2) in zip(tested, oracle):
        if label != label2 or len(outs) != len(outs2):
            checks.append(ModuleCheck(label, kind, (), "?", False, None))
            continue
        for i, (a, b) in enumerate(zip(outs, outs2)):
            rtol = float_tolerance(a.dtype, k_float) if k_float is not None and \
                a.dtype.is_floating_point else None
            eq, diff = _compare(a, b, rtol)
            checks.append(ModuleCheck(label + (f"[{i}]" if len(outs) > 1 else ""), kind,
                                      tuple(a.shape), str(a.dtype).replace("torch.", ""), eq, diff))
    if len(tested) != len(oracle):
        checks.append(ModuleCheck("(call sequence)", "-", (len(tested),), "-", False, None))
    return VerifyReport(name, checks)


# ----------------------------------------------------------------------------- per op
def enabled() -> bool:
    """Whether ``GPUQUANT_VERIFY`` asks for per-op checking (:func:`registry.verifying`)."""
    return registry.verifying()


def checked_op(op: str, fn, backend: str):
    """``fn`` wrapped to compare each call's result with the NumPy oracle's (on CPU copies).

    Ops the oracle does not implement (``fake_quant``, float-output dynamic ops) are
    returned unchanged.
    """
    oracle_mod = registry.get_backend(ORACLE)
    ref = oracle_mod.OPS.get(op)
    if ref is None:
        return fn

    def wrapper(*args, **kw):
        out = fn(*args, **kw)
        want = ref(*_to_cpu(args), **_to_cpu(kw))
        got_t, want_t = _tensors(out), _tensors(want)
        if len(got_t) != len(want_t):
            raise VerifyError(f"GPUQUANT_VERIFY: op {op!r} on backend {backend!r} returned "
                              f"{len(got_t)} tensors, the NumPy oracle {len(want_t)}")
        k_of = FLOAT_ACCUMULATING.get(op)
        for a, b in zip(got_t, want_t):
            rtol = float_tolerance(a.dtype, k_of(args)) if k_of is not None and \
                a.dtype.is_floating_point else None
            eq, diff = _compare(a, b, rtol)
            if not eq:
                where = ""
                if diff is not None:
                    idx = ((a.detach().cpu().long() - b.long()).abs() if not a.dtype.is_floating_point
                           else (a.detach().cpu().double() - b.double()).abs()).flatten().argmax()
                    where = f", max |diff| {diff:g}, largest at flat index {int(idx)}"
                raise VerifyError(
                    f"GPUQUANT_VERIFY: op {op!r} on backend {backend!r} differs from the NumPy "
                    f"oracle (output {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
                    f"{where})")
        return out

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", op)
    return wrapper
