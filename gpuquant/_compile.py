"""gpuquant's quantization modules under ``torch.compile``: run eagerly, at a graph break.

Observers, fake quantizers, QAT modules and quantized modules keep Python state that
changes every call (observer ranges, LSQ's first-call initialisation, host-side flags),
validate their inputs with Python comparisons, and launch Triton / CuPy / NumPy kernels
through their own launch paths, none of which TorchDynamo can trace (on a QAT resnet it
stopped with an internal error). Under ``torch.compile`` each such module's ``forward``
therefore runs eagerly as one opaque call: Dynamo breaks the graph there and compiles the
code around it (the user's float layers, the loss), and the results are the eager
model's.

How, at no cost to eager calls: the class's ``forward`` becomes a thin wrapper that
Dynamo never inlines (``_torchdynamo_disable``, as ``torch.compiler.disable`` marks its
wrappers) and never compiles as a frame of its own (its code object is marked SKIP, as
``torch._dynamo.skip`` does). The wrapper asks whether a Dynamo frame callback is active
(one C call): if not (eager), it runs the forward itself; if so (a compiled region's code
calling the module after its graph break), it runs the forward through
``torch.compiler.disable``, so no frame inside it is compiled. ``torch.compiler.disable``
on every forward would cost ~1 us a call even when nothing is compiled (dev CPU): ~40% of
an int8 resnet50's batch-1 forward on the H100 host.

Relies on two private entry points of ``torch._C._dynamo.eval_frame``
(``get_eval_frame_callback``, ``set_code_exec_strategy`` or the older ``skip_code``);
where a torch lacks them the forward is ``torch.compiler.disable``'s wrapper itself
(correct, ~1 us a call slower).

A QAT step's host time is removed by CUDA graphs (``torch.cuda.make_graphed_callables``,
README "Fused QAT kernels"), not by ``torch.compile``.
"""
from __future__ import annotations

import functools
import inspect

import torch

__all__ = ["EagerUnderCompile", "eager_under_compile"]


def _frame_hooks():
    """(callback getter, mark-code-skipped function), or None where this torch lacks them."""
    try:
        from torch._C._dynamo import eval_frame as ef
    except ImportError:  # pragma: no cover - torch without Dynamo's C part
        return None
    get = getattr(ef, "get_eval_frame_callback", None)
    if get is None:  # pragma: no cover - torch < 2.3
        return None
    if hasattr(ef, "set_code_exec_strategy"):  # torch >= 2.6
        strategy = ef._FrameExecStrategy(ef._FrameAction.SKIP, ef._FrameAction.DEFAULT)
        return get, lambda code: ef.set_code_exec_strategy(code, strategy)
    if hasattr(ef, "skip_code"):  # pragma: no cover - torch 2.3 - 2.5
        return get, ef.skip_code
    return None  # pragma: no cover


_HOOKS = _frame_hooks()


def _call_text(sig: inspect.Signature, defaults: str):
    """(parameter list, argument list) of a signature as source text, defaults referenced
    as ``<defaults>[name]``: a wrapper with the forward's own signature passes its arguments on
    without packing them into ``*args`` / ``**kwargs`` (half the wrapper's cost)."""
    params, args = [], []
    kinds = [p.kind for p in sig.parameters.values()]
    for p in sig.parameters.values():
        d = "" if p.default is inspect.Parameter.empty else f"={defaults}[{p.name!r}]"
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            args.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}")
            args.append(f"**{p.name}")
        elif p.kind is p.KEYWORD_ONLY:
            if p.VAR_POSITIONAL not in kinds and "*" not in params:
                params.append("*")
            params.append(p.name + d)
            args.append(f"{p.name}={p.name}")
        else:
            params.append(p.name + d)
            args.append(p.name)
    n_pos_only = kinds.count(inspect.Parameter.POSITIONAL_ONLY)
    if n_pos_only:
        params.insert(n_pos_only, "/")
    return ", ".join(params), ", ".join(args)


def _free_name(name: str, sig: inspect.Signature) -> str:
    while name in sig.parameters:
        name += "_"
    return name


def eager_under_compile(fwd):
    """``fwd`` (a function or method) as a wrapper that runs it eagerly under
    ``torch.compile`` and as itself otherwise (module docstring); idempotent."""
    if getattr(fwd, "_gq_eager", False):
        return fwd
    if _HOOKS is None:  # pragma: no cover - see the module docstring
        wrapped = torch.compiler.disable(fwd, recursive=True)
        wrapped._gq_eager = True
        return wrapped
    disabled = []  # made on first use under a compiled region (imports torch._dynamo)

    def slow():
        if not disabled:
            disabled.append(torch.compiler.disable(fwd, recursive=True))
        return disabled[0]
    _HOOKS[1](slow.__code__)  # nor this one (it was compiled once per class)

    sig = inspect.signature(fwd)
    # the body's own names, none a parameter's (a parameter named _fwd shadowed it)
    active, call, slow_name, defaults = (_free_name(n, sig) for n in ("_active", "_fwd",
                                                                      "_slow", "_d"))
    params, args = _call_text(sig, defaults)
    src = (f"def forward({params}):\n"
           f"    if {active}() is None:\n"
           f"        return {call}({args})\n"
           f"    return {slow_name}()({args})\n")
    scope = {active: _HOOKS[0], call: fwd, slow_name: slow,
             defaults: {p.name: p.default for p in sig.parameters.values()}}
    code = compile(src, f"<gpuquant eager forward of {fwd.__qualname__}>", "exec")
    exec(code, scope)  # noqa: S102
    forward = functools.wraps(fwd)(scope["forward"])
    _HOOKS[1](forward.__code__)  # Dynamo never compiles this frame on its own
    forward._gq_eager = True
    forward._torchdynamo_disable = True
    forward._torchdynamo_disable_msg = ("gpuquant's quantization modules run eagerly under "
                                        "torch.compile (gpuquant/_compile.py)")
    return forward


class EagerUnderCompile:
    """Mixin: every class defining ``forward`` below it runs that forward eagerly under
    ``torch.compile`` (module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # its own forward, or one a mixin ahead of it in the MRO brought; never torch's
        # placeholder (set on a base such as QATModule it would hide the forward of a class
        # that comes after it in a subclass's MRO)
        fwd = getattr(cls, "forward", None)
        if (callable(fwd) and fwd is not torch.nn.Module.forward
                and not getattr(fwd, "_gq_eager", False)):
            cls.forward = eager_under_compile(fwd)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this on every submodule first: refuse with a word
        on what works (TorchScript failed deep inside its compiler, naming no module)."""
        raise NotImplementedError(
            f"torch.jit.script: {type(self).__name__} (gpuquant) cannot be scripted: "
            f"gpuquant's QAT and int8 modules are Python (observers, host-side checks, "
            f"Triton / NumPy kernels); use torch.compile (they run eagerly inside it), and to "
            f"deploy gpuquant.export.to_onnx or gpuquant.save / gpuquant.load")


def uncompiled(model):
    """The module ``torch.compile(model)`` wraps (its ``_orig_mod``), else ``model``: what
    saving and export describe (the same modules and parameters, without the wrapper's
    ``_orig_mod.`` prefix)."""
    import torch
    opt = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    cls = getattr(opt, "OptimizedModule", None)
    return model._orig_mod if cls is not None and isinstance(model, cls) else model
