"""Drop-in QAT for plain ``torch.nn`` models: trace, fuse, swap, stub (torch.fx).

:func:`~gpuquant.quantization.quantize_qat` calls :func:`prepare_plain` whenever
:func:`needs_dropin` says the model holds a ``torch.nn.Conv2d`` or ``torch.nn.Linear`` that
is not a :mod:`gpuquant.nn` module; the result is made of :mod:`gpuquant.nn` float modules
and goes through the usual float -> QAT flow. Steps:

1. **Trace** with ``torch.fx`` (``torch.nn`` layers, subclasses of ``Conv2d`` / ``Linear`` /
   ``BatchNorm1d`` / ``BatchNorm2d`` keeping their forward, :mod:`gpuquant.nn` fused modules
   and modules marked with :func:`disable_quantize` are leaves). A submodule whose forward
   cannot be traced (data-dependent control flow, ...) becomes a leaf that stays float; a
   failure in the model's own ``forward`` raises, saying where and how to proceed. The model
   is traced in train and in eval mode: a submodule whose ops differ (``if self.training:``,
   which one trace would freeze) becomes a float leaf; the model's own forward raises.
   Dropout function calls (``F.dropout(x, p, self.training)``: fx froze the mode flag) become
   ``nn.Dropout`` modules, which follow ``train()`` / ``eval()``. timm's ``BatchNormAct2d`` /
   ``SyncBatchNormAct`` (``timm.layers.norm_act``: batch norm, then children ``drop`` and
   ``act``) are leaves, each call then made three: the module as a plain ``BatchNorm2d`` /
   ``SyncBatchNorm`` (the same tensors, at its path), its ``drop`` and its ``act`` (an
   ``nn.Identity`` left out), which fuse and swap as any BatchNorm and activation do (a
   hooked or disabled one stays whole).
2. **Functionalize** in-place ops (``+=``, ``relu_``, ``inplace=True``): later uses of the
   mutated value read the op's result, so every op can be swapped for a module. An in-place
   write to a value that shares memory with another value still read afterwards (a view,
   basic indexing, split...: ``F.relu(y[:, :4], inplace=True)``, ``z = y[:, 4:]; z += 1``)
   is refused (``ValueError`` naming the op and line): fx records values, not memory.
3. **Fuse and swap** (the new modules carry the same ``Parameter`` and BatchNorm buffer
   objects): Conv2d [-> BatchNorm2d] [-> ReLU | ReLU6] (modules, ``F.relu``,
   ``torch.relu``, ``.relu()``) into ``Conv2d`` / ``ConvRelu2d`` / ``ConvBn2d`` /
   ``ConvBnRelu2d`` / the ReLU6 forms; Linear [-> BatchNorm1d] [-> ReLU] likewise;
   tensor ``+`` / ``torch.add`` / ``.add`` [-> ReLU] into ``Elemwise("add" | "add_relu")``,
   tensor ``*`` into ``Elemwise("mul")``; ``torch.cat`` into ``Concat``; max / average /
   adaptive-average pooling (modules and ``F.*``) into the pooling modules, and
   ``x.mean((2, 3))`` into ``AdaptiveAvgPool2d(1)`` (+ ``flatten``); other activations
   into ``Activation(kind)`` (one a call site, never fused into the layer before: its own
   output quantizer): ``nn.SiLU`` / ``Hardswish`` / ``Hardsigmoid`` / ``Sigmoid`` / ``Tanh``
   / ``GELU`` / ``Mish`` / ``ELU`` (alpha 1) / ``Softplus`` (beta 1, threshold 20) /
   ``LeakyReLU`` (exact types), the ``F.`` functions of those names, ``torch.sigmoid`` /
   ``torch.tanh`` and ``.sigmoid()`` / ``.tanh()`` (and their in-place forms); other
   arguments (``F.elu(x, 0.5)``) stay float, the warning says why; nearest-neighbour resizes
   into ``Upsample`` (one a call site; the output keeps the input's qparams):
   ``nn.Upsample`` in mode ``"nearest"`` / ``"nearest-exact"`` and ``nn.UpsamplingNearest2d``
   (exact types, not hooked), ``F.interpolate`` in those modes with constant ``size`` /
   ``scale_factor`` (``F.upsample`` / ``F.upsample_nearest`` trace as ``F.interpolate``), on
   4-D inputs: by the example run's shapes, else when ``size`` / ``scale_factor`` is an
   ``(h, w)`` pair or the input comes from a swapped conv / pool / Upsample (through
   ``Activation``, ``Concat``, ``Elemwise``). Interpolating modes, ``align_corners``,
   ``antialias``, other ranks and a size computed in forward (``size=c.shape[-2:]``: a
   constant would tie the model to the example's input size) stay float, the warning says
   why. A fusion needs the intermediate value to have a single user; a module called at
   several places gets one new module per call site (``conv_1``, ``conv_2``: own output
   qparams, shared weights).
4. **Stub**: every value is quantized (made by a quantized op), float, or not a float tensor.
   Ops that only re-view their input (``flatten``, ``view``, ``reshape``, ``squeeze``,
   ``permute``, indexing, ``split``, ``detach``, ``Dropout``, ``Identity``, ...) keep their
   input's kind and work on int8 tensors unchanged. A ``QuantStub`` goes where a float value feeds a
   quantized op (the model's inputs), a ``DequantStub`` where a quantized value feeds a float
   op or the output. Float ops other than those are the unsupported parts: they stay float,
   and one :class:`DropInWarning` names them all.

``example_inputs`` (recommended) run once through the traced graph in eval mode without
gradients (BatchNorm statistics untouched) to learn which values are float tensors; without
them a few rules (``.size()``, ``.shape``, ``len`` give non-tensors) stand in.
"""
from __future__ import annotations

import ast
import copy
import inspect
import linecache
import math
import operator
import os
import sys
import traceback
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import nn as gnn
from ..nn.module import Module
from ..nn.qat.module import QATModule, keep_producer, keep_producer_hook
from ..functional.integer import _NEAREST_MODES
from ..nn.quantized.conv import _explicit_padding
from ..nn.quantized.module import QuantizedModule
from .._tensors import version as _version

__all__ = ["needs_dropin", "prepare_plain", "disable_quantize", "DropInWarning",
           "keep_producer", "is_eval_identity", "is_pass_module"]

# classes of gpuquant.nn that are single ops (leaves); QAT / quantized versions subclass them
_GNN_LEAVES = tuple(getattr(gnn, n) for n in gnn.__all__ if n != "Module")
_GNN_QUANT_OPS = tuple(c for c in _GNN_LEAVES if c not in (gnn.QuantStub, gnn.DequantStub))


class DropInWarning(UserWarning):
    """Parts of a plain model that stay float after drop-in conversion (one warning a model)."""


def _is_disabled(m: torch.nn.Module) -> bool:
    return getattr(m, "quantize_disabled", False) is True


def disable_quantize(module: torch.nn.Module, value: bool = True) -> torch.nn.Module:
    """Keep ``module`` (any ``torch.nn.Module``, plain or gpuquant) and everything under it
    float through :func:`~gpuquant.quantization.quantize_qat` and
    :func:`~gpuquant.quantization.quantize`, as :meth:`gpuquant.nn.Module.disable_quantize`
    does for gpuquant modules. Drop-in conversion traces it as a leaf (it is not traced into,
    so it may hold untraceable code) and surrounds it with dequantize / quantize stubs.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module`` or ``value`` not a bool.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"disable_quantize: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    if not isinstance(value, bool):
        raise TypeError(f"disable_quantize: value must be a bool, got {type(value).__name__} "
                        f"({value!r})")
    for m in module.modules():
        m.quantize_disabled = value
    return module


def _same_forward(m: torch.nn.Module, base: type) -> bool:
    """``m`` is a ``base`` whose forward is ``base``'s own (a subclass may compute otherwise;
    for ``Conv2d`` also its ``_conv_forward``, which that forward calls)."""
    if not isinstance(m, base) or type(m).forward is not base.forward:
        return False
    return not issubclass(base, torch.nn.Conv2d) or \
        type(m)._conv_forward is torch.nn.Conv2d._conv_forward


def _is_bn(m: torch.nn.Module, bn_type: type) -> bool:
    """``m`` is a ``bn_type`` (BatchNorm2d after a conv, BatchNorm1d after a Linear) keeping
    its forward, or a ``torch.nn.SyncBatchNorm`` (``convert_sync_batchnorm`` before
    ``quantize_qat``): the fused QAT module computes its statistics over the global batch
    (:func:`gpuquant.distributed.syncs_batch_stats`)."""
    return _same_forward(m, bn_type) or type(m) is torch.nn.SyncBatchNorm


def _hooked(m: torch.nn.Module) -> Optional[str]:
    """Why ``m`` must stay the module it is: the hooks or parametrizations it carries
    (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``, a user's hooks) run only
    when ``m`` itself is called or its weight read, and a fused or swapped module computes
    without it (a pruned conv folded with its BatchNorm would train a stale weight). None
    when it carries none."""
    def names(hooks):
        return ", ".join(sorted({getattr(h, "__name__", type(h).__name__) for h in hooks}))
    what = []
    if torch.nn.utils.parametrize.is_parametrized(m):
        what.append(f"parametrizations of {', '.join(m.parametrizations)}")
    for kind, hooks in (("forward pre-hooks", m._forward_pre_hooks.values()),
                        ("forward hooks", [h for h in m._forward_hooks.values()
                                           if h is not keep_producer_hook]),
                        ("backward hooks", list(m._backward_pre_hooks.values())
                         + list(m._backward_hooks.values()))):
        if hooks:
            what.append(f"{kind} ({names(hooks)})")
    if not what:
        return None
    return (f"carries {'; '.join(what)}, which a fused or int8 module would skip; remove "
            f"them to quantize it")


def delete_unused_paths(gm: torch.fx.GraphModule) -> None:
    """Delete the submodule names the graph does not use (:func:`unused_paths`)."""
    for p in unused_paths(gm):
        gm.delete_submodule(p)


def unused_paths(gm: torch.fx.GraphModule) -> list:
    """The submodule names the graph does not use: neither called nor read, nor inside such
    a module, nor a parent of one (outermost only: a dead parent takes its children along).
    ``GraphModule.delete_all_unused_submodules`` misses a second name of a used module
    (``named_modules`` yields each module once): a BatchNorm fused into a conv stays at its
    own path, and once the fused module is converted to int8 it holds float tensors nothing
    runs (saved, and in ``state_dict``)."""
    used = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = node.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    dead = [p for p, _ in gm.named_modules(remove_duplicate=False)
            if p and p not in used
            and not any(p.startswith(c + ".") for c in called)]
    return [p for p in dead if not any(p.startswith(d + ".") for d in dead)]


def needs_dropin(model: torch.nn.Module) -> bool:
    """Whether ``model`` needs drop-in conversion: it holds a ``torch.nn.Conv2d`` or
    ``torch.nn.Linear`` (or a subclass keeping their forward) that is not a gpuquant module,
    outside gpuquant modules (whose own parts are theirs) and outside disabled subtrees.

    Models built from :mod:`gpuquant.nn` (``gpuquant.models``) return False and take the
    module-swapping path unchanged.
    """
    def walk(m) -> bool:
        if _is_disabled(m) or isinstance(m, (QATModule, QuantizedModule, _GNN_LEAVES)):
            return False
        if not isinstance(m, Module) and (_same_forward(m, torch.nn.Conv2d)
                                          or _same_forward(m, torch.nn.Linear)):
            return True
        return any(walk(c) for c in m.children())
    return walk(model)


# ---------------------------------------------------------------------------------- tracing
# plain layers the fusion reads as modules: their subclasses keeping the forward are leaves
# too (fx's own rule only knows classes defined in torch.nn)
_LEAF_BASES = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


# timm's BatchNorm + drop + activation modules (timm.layers.norm_act): their forward is the
# base class's batch norm on their own parameters and buffers, then ``self.drop(x)``, then
# ``self.act(x)``. Recognised by module and class name only (timm is no dependency)
_NORM_ACT_CLASSES = {"BatchNormAct2d": torch.nn.BatchNorm2d,
                     "SyncBatchNormAct": torch.nn.SyncBatchNorm}


def _is_norm_act(m: torch.nn.Module) -> bool:
    """``m`` is a timm ``BatchNormAct2d`` / ``SyncBatchNormAct`` (their base class's batch
    norm, then children ``drop`` and ``act``)."""
    t = type(m)
    base = _NORM_ACT_CLASSES.get(t.__name__)
    return base is not None and t.__module__.startswith("timm.") and isinstance(m, base)


def _shared_state_copy(m: torch.nn.Module, cls: type, children: bool) -> torch.nn.Module:
    """A ``cls`` module holding ``m``'s own parameter and buffer dicts (so the same tensors,
    also after ``.to(device)`` puts new buffers in them or a buffer is reassigned: one
    BatchNorm under two objects) and copies of its other dicts and sets (its children's
    dict, or none when not ``children``)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v
                         for k, v in m.__dict__.items()})
    for name in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
        new.__dict__[name] = m.__dict__[name]
    if not children:
        new.__dict__["_modules"] = type(m._modules)()
    return new


def _norm_act_view(m: torch.nn.Module) -> torch.nn.Module:
    """A plain ``BatchNorm2d`` (``SyncBatchNorm``) that is the timm module ``m``'s batch
    norm, with its ``drop`` / ``act`` children (a child replaced there stays in ``m``); the
    state_dict keys under its path stay the same."""
    view = _shared_state_copy(m, _NORM_ACT_CLASSES[type(m).__name__], children=True)
    view.__dict__["_dropin_norm_act"] = True
    return view


def _bn_alone(bn: torch.nn.Module) -> torch.nn.Module:
    """The BatchNorm of a norm_act view (:func:`_norm_act_view`) to fold into a fused
    module: the view without its ``drop`` / ``act`` children, which run as their own
    nodes."""
    return _shared_state_copy(bn, type(bn), children=False)


def _expand_norm_act(gm: fx.GraphModule) -> None:
    """Each call of a timm ``BatchNormAct2d`` / ``SyncBatchNormAct`` (a tracer leaf) ->
    three calls: the module as a plain BatchNorm (:func:`_norm_act_view`, put at its path),
    then its ``drop`` and ``act`` children (an unhooked ``nn.Identity`` is left out), which
    fuse and swap as any BatchNorm and activation do. Left whole (a float leaf, warned) when
    disabled, hooked (its hooks would not run), called with other than one positional
    argument, holding other children, or when a child is known by a second name."""
    calls: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    named = dict(gm.named_modules(remove_duplicate=False))
    for path, nodes in calls.items():
        m = named.get(path)
        if m is None or not _is_norm_act(m) or _is_disabled(m) or _hooked(m) is not None or \
                any(len(n.args) != 1 or n.kwargs for n in nodes) or \
                not set(m._modules) <= {"drop", "act"}:
            continue
        children = [(k, c) for k, c in m._modules.items() if c is not None]
        if any(sum(x is c for x in named.values()) != 1 for _, c in children):
            continue
        owner_path, _, leaf = path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if owner is not gm and type(owner) is not torch.nn.Module:
            continue  # (fx's own containers only: never a user's module)
        setattr(owner, leaf, _norm_act_view(m))
        steps = [k for k in ("drop", "act") if k in m._modules and m._modules[k] is not None
                 and not (type(m._modules[k]) is torch.nn.Identity and
                          _hooked(m._modules[k]) is None)]
        for n in nodes:
            users, last = list(n.users), n
            for k in steps:
                with gm.graph.inserting_after(last):
                    new = gm.graph.call_module(f"{path}.{k}", (last,))
                new.meta = dict(n.meta)
                stack = dict(n.meta.get("nn_module_stack") or {})
                stack[f"{path}.{k}"] = (f"{path}.{k}", type(m._modules[k]))
                new.meta["nn_module_stack"] = stack
                last = new
            for u in users:
                u.replace_input_with(n, last)
    gm.recompile()


def _grad_modes():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))


class _GradModeError(RuntimeError):
    """An op traced under another grad / autocast mode than the trace began in."""


class _StateWriteError(RuntimeError):
    """An in-place op traced on a parameter or buffer of the model (module state)."""


class _Tracer(fx.Tracer):
    """Leaves: torch.nn layers (and subclasses of Conv2d, Linear, BatchNorm1d/2d keeping
    their forward), gpuquant ops, disabled modules and submodules whose forward failed to
    trace (those are recorded in ``fallbacks``). An op traced inside ``torch.no_grad()``,
    ``set_grad_enabled``, ``inference_mode`` or ``autocast`` fails the trace of its module:
    fx records no mode, so the converted model would have computed it with the caller's
    (a stop-gradient silently gone)."""

    def __init__(self):
        super().__init__()
        self.fallbacks: Dict[str, str] = {}   # module path -> why it could not be traced
        self.erased: set = set()              # nodes taken by a rollback
        self.reported: set = set()            # ids of parameters a trace wrote in place
        self.copies: dict = {}                # id -> copy of each buffer, during a trace
        self.modes = _grad_modes()
        self.buffer_reads: set = set()        # buffers a traced forward read (their values)
        self._buffer_names: dict = {}

    def trace(self, root, concrete_args=None):
        self.modes = _grad_modes()
        self.copies = {}
        # (persistent ones: a non-persistent buffer, an index table, is no state to load)
        self._buffer_names = {id(b): f"{path}.{n}" if path else n
                              for path, mod in root.named_modules()
                              for n, b in mod._buffers.items()
                              if b is not None and n not in mod._non_persistent_buffers_set}
        saved = _state_of(root, "", self.copies)
        try:
            graph = super().trace(root, concrete_args)
        finally:
            written = _undo_proxies(saved, self.reported, self.copies)
            self.copies = {}
        if written:
            raise _StateWriteError(_assigned(written))
        return graph

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # a rollback may have erased the get_attr node of a cached parameter proxy: forget it
        for k in [k for k, p in parameter_proxy_cache.items() if p.node in self.erased]:
            del parameter_proxy_cache[k]
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if out is attr_val and isinstance(attr_val, torch.Tensor):
            # fx hands a buffer's value to the forward: what it computes from it becomes a
            # constant of the graph (prepare_plain warns)
            name = self._buffer_names.get(id(attr_val))
            if name is not None:
                self.buffer_reads.add(name)
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind not in ("placeholder", "output") and _grad_modes() != self.modes:
            raise _GradModeError(
                "torch.fx records no torch.no_grad() / set_grad_enabled / inference_mode / "
                "autocast block: the converted model would run this op in the caller's mode "
                "(for a stop-gradient write .detach() on what the block computes)")
        if _looks_inplace(kind, target, kwargs, self.root) and args:
            state = _state_written(args[0])
            if state is not None:
                raise _StateWriteError(
                    f"in-place write to the model's parameter / buffer '{state}' in forward: "
                    f"torch.fx records values, not memory, so the converted model would "
                    f"never store the update")
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # where in-place ops (and augmented assignments, which fx records out of place)
        # happen: functionalize checks them and names the line when it cannot
        aug = kind == "call_function" and target in _AUG_OPS and args and \
            isinstance(args[0], fx.Node)
        if aug or _looks_inplace(kind, target, kwargs, self.root):
            frame = _user_frame()
            if frame is not None:
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                node.meta["dropin_src"] = (frame.f_code.co_filename, frame.f_lineno, line)
                if aug and _augmented(line, _AUG_OPS[target], frame, args[0]):
                    node.meta["dropin_augmented"] = True
        return node

    def is_leaf_module(self, m, qualname: str) -> bool:
        if _is_disabled(m) or qualname in self.fallbacks:
            return True
        if isinstance(m, Module):
            return isinstance(m, (_GNN_LEAVES, QATModule, QuantizedModule))
        if any(_same_forward(m, base) for base in _LEAF_BASES) or _is_norm_act(m) or \
                _EVAL_IDENTITY.get(m, False):  # (probed before the trace)
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        # attribute proxies (``t.values``) make their node on first use: make them now, so a
        # rollback cannot take a node that outside code still refers to
        fx.node.map_aggregate((args, kwargs),
                              lambda a: a.node if isinstance(a, fx.Proxy) else a)
        last = self.graph._root.prev
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        saved = _state_of(m, qualname, self.copies)
        try:
            out = super().call_module(m, forward, args, kwargs)
            written = _undo_proxies(saved, self.reported, self.copies)
            if written:
                raise _StateWriteError(_assigned(written))
            return out
        except Exception as e:  # noqa: BLE001 -- not hidden: the module stays float, warned
            _undo_proxies(saved, self.reported, self.copies)
            # roll the partial trace back, then record the module as one float leaf
            while self.graph._root.prev is not last:
                self.erased.add(self.graph._root.prev)
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.fallbacks[qualname] = f"{type(e).__name__}: {_first_line(e)}{_where(e)}"
            return super().call_module(m, forward, args, kwargs)


# augmented assignments fx records as the plain operator (a Proxy has no ``__iadd__``)
_AUG_OPS = {operator.add: ast.Add, operator.sub: ast.Sub, operator.mul: ast.Mult,
            operator.truediv: ast.Div, operator.floordiv: ast.FloorDiv, operator.mod: ast.Mod,
            operator.pow: ast.Pow, operator.matmul: ast.MatMult, operator.and_: ast.BitAnd,
            operator.or_: ast.BitOr, operator.xor: ast.BitXor, operator.lshift: ast.LShift,
            operator.rshift: ast.RShift}


def _looks_inplace(kind, target, kwargs, root) -> bool:
    """A cheap test at trace time: the node may write its first argument in place."""
    if kind == "call_method":
        return isinstance(target, str) and target.endswith("_") and not target.endswith("__")
    if kind == "call_function":
        return target in _INPLACE_FNS or kwargs.get("inplace", False) is True
    if kind == "call_module":
        try:
            return getattr(root.get_submodule(target), "inplace", False) is True
        except AttributeError:
            return False
    return False


def _state_written(a) -> Optional[str]:
    """The parameter or buffer (``get_attr`` target) that value ``a`` is, or a view of (the
    result of an in-place op is its input), else None. fx's own constants
    (``torch.zeros(3)`` made in forward) are no state."""
    while isinstance(a, fx.Node):
        if a.op == "get_attr":
            return None if a.target.startswith("_tensor_constant") else a.target
        if a.op == "call_function" and a.target is operator.getitem:
            view = len(a.args) > 1 and _index_kind(a.args[1]) != "advanced"
        elif a.op == "call_function" and a.target is getattr:
            view = len(a.args) > 1 and a.args[1] in _VIEW_ATTRS
        else:
            view = a.op in ("call_function", "call_method") and (
                a.target in _VIEW_FNS or a.target in _VIEW_METHODS or
                _looks_inplace(a.op, a.target, a.kwargs, None))
        if not view or not a.args:
            return None
        a = a.args[0]
    return None


def _state_of(m: torch.nn.Module, path: str, copies: dict) -> list:
    """What :func:`_undo_proxies` restores: the attributes, buffers and parameters of ``m``
    and the modules under it, with each tensor's in-place version; ``copies`` (the trace's:
    id -> tensor) gets a copy of each buffer not copied yet, so a model's buffers are copied
    once a trace, at its root, however deep the modules traced into."""
    saved = []
    for name, sm in m.named_modules(remove_duplicate=False):
        where = f"{path}.{name}" if path and name else path or name
        for store in (sm.__dict__, sm._buffers, sm._parameters):
            tensors = {}
            if store is not sm.__dict__:
                for k, t in store.items():
                    if isinstance(t, torch.Tensor) and not torch.nn.parameter.is_lazy(t) \
                            and _version(t) >= 0:
                        tensors[k] = _version(t)
                        if store is sm._buffers and id(t) not in copies:
                            copies[id(t)] = t.detach().clone()
            saved.append((where, store, dict(store), tensors))
    return saved


def _undo_proxies(saved: list, reported: set, copies: dict) -> List[str]:
    """Put back what a trace assigned a traced value (an fx Proxy) to (``self.mu = ...`` in
    forward: fx runs the assignment once, records nothing, and leaves the Proxy in the
    model), and the values of buffers it wrote in place with untraced arguments
    (``self.mu.mul_(0.9)``, ``self.steps += 1``: fx runs them on the real tensor and records
    no node); returns the names of those that held a value before (state the converted model
    would never update; new attributes are caches, dropped). A parameter written in place
    is named too (its values are not restored: no copy of the weights is kept). A buffer
    whose version moved but whose values equal the copy is not named (a view of another
    buffer written and restored shares its version counter; an enclosing module sees what a
    traced submodule restored); a parameter is named once (``reported``: ids)."""
    written = []
    for path, store, before, tensors in saved:
        for k in [k for k, v in store.items() if isinstance(v, fx.Proxy)]:
            if k in before and not isinstance(before[k], fx.Proxy):
                written.append(f"{path}.{k}" if path else k)
                store[k] = before[k]
            elif k not in before:
                del store[k]
        for k, ver in tensors.items():
            t = store.get(k)
            if t is not before[k] or _version(t) == ver or id(t) in reported:
                continue
            copy_ = copies.get(id(t))
            if copy_ is None:  # a parameter
                reported.add(id(t))
            elif torch.equal(t, copy_):
                continue
            else:
                with torch.no_grad():
                    t.copy_(copy_)
            written.append(f"{path}.{k}" if path else k)
    return written


def _assigned(written: List[str]) -> str:
    return (f"assigns a traced value to, or writes in place, the model's "
            f"{', '.join(repr(w) for w in written)} in forward: torch.fx records values, not "
            f"memory, so the converted model would never store it")


def _user_frame():
    """The innermost frame outside torch and this file (the model code being traced)."""
    torch_dir = os.path.dirname(torch.__file__)
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith(torch_dir) or
                             f.f_code.co_filename == __file__):
        f = f.f_back
    return f


def _augmented(line: str, op: type, frame, first: fx.Node) -> bool:
    """Whether ``line`` is ``name op= ...`` with ``name`` bound to the proxy of ``first``:
    the operator node is an in-place update of ``first``, not a new value."""
    try:
        stmt = ast.parse(line).body
    except SyntaxError:
        return False
    names = [a.target.id for a in stmt if isinstance(a, ast.AugAssign) and
             isinstance(a.op, op) and isinstance(a.target, ast.Name)]
    values = [frame.f_locals.get(name) for name in names]
    return any(isinstance(v, fx.Proxy) and v.node is first for v in values)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def _where(e: BaseException) -> str:
    """`` (file:line: source)`` of the innermost frame of ``e`` outside torch, if any."""
    torch_dir = os.path.dirname(torch.__file__)
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if not fr.filename.startswith(torch_dir) and fr.filename != __file__:
            src = f": {fr.line.strip()}" if fr.line else ""
            return f" (at {fr.filename}:{fr.lineno}{src})"
    return ""


def _concrete_args(model: torch.nn.Module, example_inputs: Optional[tuple]) -> Dict[str, object]:
    """Check ``example_inputs`` against ``model.forward``'s signature; the parameters with a
    constant default (``None``, a bool, int, float or str) that they do not supply (all of
    them without example inputs) are traced at their default (torch.fx ``concrete_args``), so
    ``if residual is not None:`` takes the branch of the usual call ``model(x)``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    n = 0
    if example_inputs is not None:
        try:
            sig.bind(*example_inputs)
        except TypeError as e:
            raise TypeError(f"quantize_qat: example_inputs hold {len(example_inputs)} "
                            f"value(s), which {type(model).__name__}.forward{sig} does not take "
                            f"({e}); give one value per positional parameter of forward") \
                from None
        n = len(example_inputs)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in positional][n:] + \
        [p for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    return {p.name: p.default for p in params
            if p.default is None or type(p.default) in (bool, int, float, str)}


_HOW_TO_PROCEED = ("move the untraceable code (e.g. control flow on tensor values) into a "
                   "submodule, which is then kept float automatically, or mark that submodule "
                   "with gpuquant.quantization.fx.disable_quantize(submodule) (gpuquant "
                   "modules: submodule.disable_quantize()); wrap a free function with "
                   "torch.fx.wrap; or build the model from gpuquant.nn modules.")


def _frozen_buffers(graph: fx.Graph, fallbacks: Dict[str, str]) -> List[str]:
    """The buffers a traced forward computed with, where the graph holds computed constants
    (``_tensor_constant*``: fx ran the arithmetic on the buffers' values): the persistent
    ones read, less the modules kept whole (float leaves run eagerly and read them at each
    call) and the buffers the graph uses as they are (fx makes a buffer passed to an op a
    get_attr of it: live). A heuristic: a buffer read only for its shape beside an unrelated
    constant is named too, and one both used as it is and computed with, or turned into a
    Python number (``.item()``), is not."""
    targets = {n.target for n in graph.nodes if n.op == "get_attr"}
    if not any(t.startswith("_tensor_constant") for t in targets):
        return []

    def kept(name):
        return name in targets or any(name == f or name.startswith(f + ".")
                                      for f in fallbacks if f)
    return sorted(n for n in getattr(graph, "_gq_buffer_reads", ()) if not kept(n))


def _trace_graph(model: torch.nn.Module, concrete_args, leaves: Dict[str, str],
                 mode: str = "") -> Tuple[fx.Graph, Dict[str, str]]:
    """One fx trace; ``leaves``: module paths traced as float leaves from the start."""
    tracer = _Tracer()
    tracer.fallbacks.update(leaves)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
        graph._gq_buffer_reads = tracer.buffer_reads  # (read by prepare_plain)
    except Exception as e:  # noqa: BLE001 -- re-raised with where and what to do
        raise ValueError(
            f"quantize_qat: torch.fx cannot trace the forward of the model itself "
            f"({type(model).__name__}, module path '<root>'){mode}: {type(e).__name__}: "
            f"{_first_line(e)}{_where(e)}. How to proceed: {_HOW_TO_PROCEED}") from e
    return graph, tracer.fallbacks


def _node_scope(n: fx.Node) -> str:
    """The path of the module whose forward made ``n`` ('' for the model's own)."""
    paths = [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]
    if n.op == "call_module" and paths and paths[-1] == n.target:
        paths.pop()  # a leaf's call belongs to its caller
    return paths[-1] if paths else ""


def _mode_signature(graph: fx.Graph, wiring: bool) -> List[Tuple[str, str, str]]:
    """(scope, key, label) for each node, to compare the traces of the two modes. The mode
    flag of the dropout functions is left out of the key (those become modules that follow
    the mode); without ``wiring`` an argument node is only '%' in the key (shift-invariant:
    an op added elsewhere does not change the entries of other scopes)."""
    index: Dict[fx.Node, int] = {}
    out = []
    for i, n in enumerate(graph.nodes):
        index[n] = i
        args, kwargs = list(n.args), dict(n.kwargs)
        if n.op == "call_function" and n.target in _DROPOUT_FNS:
            flag = _DROPOUT_FNS[n.target][1][2]
            if len(args) > 2:
                args[2] = "<mode>"
            if flag in kwargs:
                kwargs[flag] = "<mode>"
        ref = (lambda a: f"%{index[a]}") if wiring else (lambda a: "%")
        args, kwargs = fx.node.map_arg((tuple(args), kwargs), ref)
        target = n.target
        if n.op == "get_attr" and target.startswith("_tensor_constant"):
            target = "_tensor_constant"  # each trace names its constants anew
        label = {"call_method": f".{n.target}()", "call_module": f"module '{n.target}'",
                 "call_function": _fn_name(n.target) if callable(n.target) else str(n.target)
                 }.get(n.op, n.op)
        out.append((_node_scope(n), repr((n.op, target, args, kwargs)), label))
    return out


def _mode_dependent_scope(a: fx.Graph, b: fx.Graph) -> Optional[Tuple[str, str]]:
    """For the traces ``a`` and ``b`` of the two modes: None if they agree, else the deepest
    module path whose own ops differ ('' for the model's own forward) and the first
    differing ops (labels, ``a``'s then ``b``'s)."""
    wa, wb = _mode_signature(a, True), _mode_signature(b, True)
    if [k for _, k, _ in wa] == [k for _, k, _ in wb]:
        return None
    sa, sb = _mode_signature(a, False), _mode_signature(b, False)
    scopes = sorted({s for s, _, _ in sa + sb}, key=lambda s: (-s.count(".") - 1 if s else 0, s))
    for scope in scopes:  # deepest first
        own_a = [e for e in sa if e[0] == scope]
        own_b = [e for e in sb if e[0] == scope]
        if [e[1] for e in own_a] != [e[1] for e in own_b]:
            break
    else:  # the same ops, wired differently (``return p if self.training else q``)
        scope, own_a, own_b = None, wa, wb
    k = next((i for i, (x, y) in enumerate(zip(own_a, own_b)) if x[1] != y[1]),
             min(len(own_a), len(own_b)))
    la = own_a[k][2] if k < len(own_a) else "nothing"
    lb = own_b[k][2] if k < len(own_b) else "nothing"
    if scope is None:
        scope = (own_a[k] if k < len(own_a) else own_b[k])[0]
    return scope, f"{la} against {lb}"


def _trace(model: torch.nn.Module, concrete_args: Optional[Dict[str, object]] = None
           ) -> Tuple[fx.GraphModule, Dict[str, str]]:
    # fx runs the forward once, so ``if self.training:`` is frozen at the mode of the trace:
    # trace in the other mode too; a submodule whose ops differ becomes a float leaf (it
    # then follows train() / eval() as it runs eagerly), the model's own forward is refused
    leaves: Dict[str, str] = {}
    other = "eval" if model.training else "train"
    _probe_eval_identities(model)
    while True:
        graph, fallbacks = _trace_graph(model, concrete_args, leaves)
        modes = {m: m.training for m in model.modules()}
        attrs = set(model.__dict__)
        try:
            model.train(other == "train")
            graph_other, fallbacks_other = _trace_graph(model, concrete_args, leaves,
                                                        f" in {other} mode")
        finally:
            for m, mode in modes.items():
                m.training = mode
            for name in set(model.__dict__) - attrs:  # fx stores the trace's constants there
                delattr(model, name)
        # a submodule untraceable in one mode only: a float leaf in both, then compare
        once = {k: v for k, v in {**fallbacks_other, **fallbacks}.items()
                if (k in fallbacks) != (k in fallbacks_other)}
        if once:
            leaves.update(once)
            continue
        diff = _mode_dependent_scope(graph, graph_other)
        if diff is None:
            break
        scope, ops = diff
        op = f"first differing op: {ops} in {'train' if other == 'eval' else 'eval'} / {other} mode"
        if scope == "" or scope in leaves:
            raise ValueError(
                f"quantize_qat: the forward of the model itself ({type(model).__name__}, "
                f"module path '{scope or '<root>'}') computes differently in train and eval "
                f"mode (e.g. it reads self.training; {op}): torch.fx records "
                f"one mode only, and the converted model would run it in both. How to "
                f"proceed: for dropout use nn.Dropout or F.dropout(x, p, self.training); "
                f"for outputs returned in training only (GoogLeNet / Inception's auxiliary "
                f"classifiers) build the model without them (aux_logits=False); "
                f"{_HOW_TO_PROCEED}")
        leaves[scope] = ("its forward computes differently in train and eval mode (reads "
                         "self.training), which a torch.fx trace would freeze")
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    for n in graph.nodes:  # fx names a concrete parameter's placeholder ``residual_1``
        if n.op == "placeholder" and concrete_args and n.target not in params and \
                n.target.rpartition("_")[0] in concrete_args:
            n.target = n.target.rpartition("_")[0]  # keep the model's signature
            n.meta["dropin_concrete"] = True
    _default_checks(graph, type(model).__name__)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    # the model's class name, as gpuquant.save records it: GraphModule.__deepcopy__ (and so
    # quantize(inplace=False)) gives the copy the class name "GraphModule", meta survives
    gm.meta[ROOT_NAME_KEY] = type(model).__name__
    gm.training = model.training
    return gm, fallbacks


ROOT_NAME_KEY = "gpuquant_root_name"


def root_name(model) -> str:
    """The class name a saved model is known by: a drop-in model's (prepare_plain) original
    class name, kept in its GraphModule ``meta`` through deep copies; else the type's."""
    if isinstance(model, fx.GraphModule):
        name = getattr(model, "meta", {}).get(ROOT_NAME_KEY)
        if isinstance(name, str):
            return name
    return type(model).__name__


_SPECIALIZED = " has been specialized to have value "


def traced_at_default(value, default, name: str, model: str) -> None:
    """The converted forward's check of a parameter traced at its default (``concrete_args``):
    fx's own is a bare ``AssertionError``.

    Raises:
        ValueError: ``value`` is not ``default``, naming the parameter and the way out.
    """
    if default is None:
        ok = value is None
    else:
        ok = not isinstance(value, torch.Tensor) and value == default
    if not ok:
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else repr(value)
        raise ValueError(f"{model}.forward: parameter {name!r} was fixed at its default "
                         f"{default!r} when the model was converted (traced with torch.fx "
                         f"concrete_args), got {shown}; to keep it an input, give it in "
                         f"example_inputs to quantize_qat")


def _default_checks(graph: fx.Graph, model: str) -> None:
    """Replace fx's checks of the parameters traced at their default (``torch._assert(x ==
    default, ...)``, ``_assert_is_none(x, ...)``) by :func:`traced_at_default`."""
    for n in list(graph.nodes):
        msg = n.args[1] if n.op == "call_function" and len(n.args) == 2 else None
        if not isinstance(msg, str) or _SPECIALIZED not in msg:
            continue
        name = msg.partition(_SPECIALIZED)[0]
        cond = n.args[0]
        if n.target is torch._assert and isinstance(cond, fx.Node) and \
                cond.target is operator.eq and len(cond.users) == 1:
            value, default = cond.args
        elif getattr(n.target, "__name__", "") == "_assert_is_none":
            value, default = cond, None
        else:
            continue
        with graph.inserting_before(n):
            graph.call_function(traced_at_default, (value, default, name, model))
        graph.erase_node(n)
        if default is not None:
            graph.erase_node(cond)


# ------------------------------------------------------------------ what a value is (kinds)
_Q, _F, _O = "quantized", "float", "other"   # value kinds; _O: not a float tensor

_META_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride",
                 "is_contiguous", "__len__", "data_ptr", "element_size", "is_floating_point"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad",
               "is_quantized", "names"}
# meta reads whose answer an int8 tensor gives differently (its dtype, its integers): they
# read the dequantized value
_VALUE_META_METHODS = {"item", "tolist", "is_floating_point", "element_size"}
_VALUE_META_ATTRS = {"dtype"}
_CONTAINER_METHODS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes", "sort",
                      "topk", "max", "min", "median", "mode", "kthvalue", "unique"}
_CONTAINER_FNS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.sort,
                  torch.topk}


class _Kinds:
    """Whether each node is a float tensor, a tuple of them, or something else; from the
    example run's metadata where there is one, else from the op."""

    def __init__(self, has_meta: bool):
        self.has_meta = has_meta

    def _meta(self, n: fx.Node):
        return n.meta.get("tensor_meta", None)

    def is_float_tensor(self, n) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if self.has_meta and "dropin_ran" in n.meta:
            tm = self._meta(n)
            return isinstance(tm, TensorMetadata) and tm.dtype.is_floating_point
        return self._guess(n) == "tensor"

    def is_container(self, n) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if self.has_meta and "dropin_ran" in n.meta:
            tm = self._meta(n)
            return tm is not None and not isinstance(tm, TensorMetadata)
        return self._guess(n) == "container"

    def _guess(self, n: fx.Node) -> str:
        if n.op == "placeholder" and n.meta.get("dropin_concrete"):
            return "other"
        if n.op == "call_method":
            if n.target in _META_METHODS:
                return "other"
            if n.target in _CONTAINER_METHODS and not (n.target in ("max", "min")
                                                       and len(n.args) + len(n.kwargs) == 1):
                return "container"
        if n.op == "call_function":
            if n.target is getattr:
                return "other" if n.args[1] in _META_ATTRS else "tensor"
            if n.target is len:
                return "other"
            if n.target in _CONTAINER_FNS:
                return "container"
            if n.target is operator.getitem:
                src = n.args[0]
                return "tensor" if isinstance(src, fx.Node) and self._guess(src) in (
                    "tensor", "container") else "other"
            if getattr(n.target, "__module__", None) == "_operator":
                nodes = [a for a in _node_args(n)]
                if nodes and all(self._guess(a) == "other" for a in nodes):
                    return "other"
        return "tensor"


def _node_args(n: fx.Node) -> List[fx.Node]:
    out: List[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a) or a)
    return out


def _node_text(gm: fx.GraphModule, n: fx.Node) -> str:
    """Node ``n`` of ``gm`` for messages: the module it calls, or the function / method and
    the module whose forward calls it."""
    if n.op == "call_module":
        return f"module '{n.target}' ({type(gm.get_submodule(n.target)).__name__})"
    if n.op in ("call_function", "call_method"):
        what = f".{n.target}()" if n.op == "call_method" else _fn_name(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        scope = list(stack.values())[-1][0] if stack else ""
        return f"{what} in '{scope or '<root>'}'"
    return f"node {n.name!r} ({n.op})"


class _RanNode(fx.Interpreter):
    """Hands :class:`ShapeProp` the result of the node :class:`_ShapeProp` just ran."""

    def run_node(self, n: fx.Node):
        ran = self.__dict__.pop("_ran", None)
        if ran is not None and ran[0] is n:
            return ran[1]
        return super().run_node(n)


class _ShapeProp(ShapeProp, _RanNode):
    """``ShapeProp`` whose failing node raises its own error, unprinted: ShapeProp.run_node
    prints the whole traceback to stderr (``traceback.print_exc``) before re-raising it as
    a ``RuntimeError`` naming only the node, and quantize_qat raises a ValueError of its own.
    Each node runs once, here; ShapeProp records its metadata (its ``super().run_node`` is
    :class:`_RanNode`'s). ``failed``: the node that raised, or None."""

    failed: Optional[fx.Node] = None

    def run_node(self, n: fx.Node):
        if self.fake_mode is None:  # (fake tensors: ShapeProp's own path)
            self.failed = n
            self._ran = (n, fx.Interpreter.run_node(self, n))
            self.failed = None
        return super().run_node(n)


def _propagate(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``example_inputs`` through ``gm`` (eval, no grad) recording shapes and dtypes."""
    modes = {m: m.training for m in gm.modules()}
    # a float leaf may update its own buffers (a running mean) even in eval mode, in place
    # or by assigning new tensors
    buffers = [(m._buffers, {k: (b, b.clone()) for k, b in m._buffers.items()
                             if b is not None and not torch.nn.parameter.is_lazy(b)})
               for m in gm.modules()]
    prop = _ShapeProp(gm)
    try:
        gm.eval()
        with torch.no_grad():
            prop.propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001 -- re-raised with context
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else
                  t if isinstance(t, (int, float, bool, str, type(None))) else type(t).__name__
                  for t in example_inputs]
        at = f" at {_node_text(gm, prop.failed)}" if prop.failed is not None else ""
        raise ValueError(f"quantize_qat: example_inputs (shapes {shapes}) do not run through "
                         f"the traced model{at}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for store, before in buffers:
                for k, (b, v) in before.items():
                    store[k] = b
                    if not torch.equal(b, v):
                        b.copy_(v)
    for n in gm.graph.nodes:
        n.meta["dropin_ran"] = True


# --------------------------------------------------------------------------- op recognition
_RELU_FNS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_INPLACE_FNS = {torch.relu_: torch.relu, F.relu_: F.relu, torch.sigmoid_: torch.sigmoid,
                torch.tanh_: torch.tanh, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu}

# pointwise activations other than ReLU / ReLU6 -> gnn.Activation (one module a call site;
# never fused into the layer before: each gets its own output quantizer). Modules by exact
# type (a subclass may compute otherwise); functions -> (kind, the parameters after the
# input, in order; ``inplace`` False once functionalized); tensor methods -> kind
_ACT_MODULES = (torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Sigmoid,
                torch.nn.Tanh, torch.nn.GELU, torch.nn.Mish, torch.nn.ELU, torch.nn.Softplus,
                torch.nn.LeakyReLU)
_ACT_FNS = {
    F.silu: ("silu", ("inplace",)),
    F.hardswish: ("hardswish", ("inplace",)),
    F.hardsigmoid: ("hardsigmoid", ("inplace",)),
    torch.sigmoid: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()),
    F.tanh: ("tanh", ()),
    F.gelu: ("gelu", ("approximate",)),
    F.mish: ("mish", ("inplace",)),
    F.elu: ("elu", ("alpha", "inplace")),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
}
_ACT_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _activation_args(kind: str, params: dict):
    """``(kind, negative_slope)`` of the :class:`gpuquant.nn.Activation` computing ``kind``
    with the given arguments (the torch function's or module's: ``approximate``, ``alpha``,
    ``beta``, ``threshold``, ``negative_slope``, ``inplace``), or a str saying why none
    does."""
    for k, v in params.items():
        if isinstance(v, fx.Node):
            return f"{k} is a traced value, the int8 form takes a constant"
    if params.get("inplace", False) is not False:
        return (f"inplace={params['inplace']!r}: an in-place call not rewritten out of "
                f"place (the int8 form takes inplace=False, or inplace=True by keyword)")
    slope = 0.01
    if kind == "gelu":
        approximate = params.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            return f"approximate={approximate!r}: the int8 form takes 'none' or 'tanh'"
        kind = "gelu" if approximate == "none" else "gelu_tanh"
    elif kind == "elu":
        alpha = params.get("alpha", 1.0)
        if not _is_number(alpha) or alpha != 1.0:
            return f"alpha={alpha!r}: the int8 form takes alpha 1.0 only"
    elif kind == "softplus":
        beta, threshold = params.get("beta", 1), params.get("threshold", 20)
        if not _is_number(beta) or beta != 1 or not _is_number(threshold) or threshold != 20:
            return (f"beta={beta!r}, threshold={threshold!r}: the int8 form takes beta 1 and "
                    f"threshold 20 only")
    elif kind == "leaky_relu":
        slope = params.get("negative_slope", 0.01)
        if not _is_number(slope) or not math.isfinite(slope):
            return f"negative_slope={slope!r}: the int8 form takes a finite number"
    return kind, float(slope)


def _is_pair(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2


def _upsample_args(params: dict):
    """The keyword arguments of the :class:`gpuquant.nn.Upsample` computing a resize with
    the given arguments (``F.interpolate``'s or ``torch.nn.Upsample``'s: ``size``,
    ``scale_factor``, ``mode``, ``align_corners``, ``recompute_scale_factor``,
    ``antialias``), or a str saying why none does."""
    for k, v in params.items():
        traced: List[fx.Node] = []
        fx.node.map_aggregate(v, lambda a: traced.append(a) if isinstance(a, fx.Node) else a)
        if not traced:
            continue
        if k == "size":
            return ("size is computed in forward (e.g. from another tensor's .shape): the int8 "
                    "Upsample takes a constant size, and fixing the traced one would tie the "
                    "model to the example's input size; use a constant scale_factor, or "
                    "accept it float")
        return f"{k} is a traced value, the int8 Upsample takes a constant"
    mode = params.get("mode", "nearest")
    if mode not in _NEAREST_MODES:
        corners = params.get("align_corners")
        corners = f", align_corners={corners!r}" if corners is not None else ""
        return (f"mode={mode!r}{corners} interpolates: the int8 Upsample copies codes, modes "
                f"'nearest' and 'nearest-exact' only")
    if params.get("align_corners") is not None:
        return (f"align_corners={params['align_corners']!r}: the int8 Upsample takes None "
                f"(torch refuses it in mode {mode!r})")
    if params.get("antialias", False) is not False:
        return (f"antialias={params['antialias']!r}: the int8 Upsample takes False (torch "
                f"refuses it in mode {mode!r})")
    kw = {k: params.get(k) for k in ("size", "scale_factor", "recompute_scale_factor")}
    kw["mode"] = mode
    try:
        gnn.Upsample(**kw)
    except (TypeError, ValueError) as e:
        return str(e)
    return kw


def _module_activation(m: torch.nn.Module):
    """:func:`_activation_args` of an activation module of :data:`_ACT_MODULES`."""
    kind = {torch.nn.SiLU: "silu", torch.nn.Hardswish: "hardswish",
            torch.nn.Hardsigmoid: "hardsigmoid", torch.nn.Sigmoid: "sigmoid",
            torch.nn.Tanh: "tanh", torch.nn.GELU: "gelu", torch.nn.Mish: "mish",
            torch.nn.ELU: "elu", torch.nn.Softplus: "softplus",
            torch.nn.LeakyReLU: "leaky_relu"}[type(m)]
    names = {"gelu": ("approximate",), "elu": ("alpha",), "softplus": ("beta", "threshold"),
             "leaky_relu": ("negative_slope",)}.get(kind, ())
    # (``inplace``: functionalize made the module out of place where that was needed)
    return _activation_args(kind, {k: getattr(m, k) for k in names})


def _activation_of(n: fx.Node, modules) -> Optional[str]:
    """'relu' / 'relu6' when node ``n`` applies exactly that to its single tensor input."""
    if n.op == "call_module":
        m = modules[n.target]
        if len(n.args) == 1 and not n.kwargs and _hooked(m) is None:
            if type(m) is torch.nn.ReLU:
                return "relu"
            if type(m) is torch.nn.ReLU6:
                return "relu6"
        return None
    if n.op == "call_function" and n.target in _RELU_FNS and len(n.args) == 1 and \
            set(n.kwargs) <= {"inplace"}:
        return _RELU_FNS[n.target]
    if n.op == "call_method" and n.target == "relu" and len(n.args) == 1 and not n.kwargs:
        return "relu"
    return None


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


_ADD_FNS = {operator.add, torch.add}
_MUL_FNS = {operator.mul, torch.mul}
_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
_PASS_FNS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
             torch.transpose, torch.split, torch.chunk, torch.unbind, torch.tensor_split,
             torch.detach, operator.getitem}
_PASS_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "split", "chunk", "unbind", "tensor_split", "view_as",
                 "reshape_as", "expand", "expand_as", "unflatten", "movedim", "detach"}
_PASS_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity, torch.nn.Dropout,
                 torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                 torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)

# dropout functions -> (module doing the same, argument names, default of the mode flag).
# fx records the mode flag (``self.training``) as the constant it had when traced; the module
# follows model.train() / eval() instead, and the int8 model (eval) drops it
_F_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_DROPOUT_FNS = {
    F.dropout: (torch.nn.Dropout, _F_DROPOUT_ARGS, True),
    F.dropout1d: (torch.nn.Dropout1d, _F_DROPOUT_ARGS, True),
    F.dropout2d: (torch.nn.Dropout2d, _F_DROPOUT_ARGS, True),
    F.dropout3d: (torch.nn.Dropout3d, _F_DROPOUT_ARGS, True),
    F.alpha_dropout: (torch.nn.AlphaDropout, _F_DROPOUT_ARGS, False),
    F.feature_alpha_dropout: (torch.nn.FeatureAlphaDropout, _F_DROPOUT_ARGS, False),
    torch.dropout: (torch.nn.Dropout, ("input", "p", "train"), None),
    torch.alpha_dropout: (torch.nn.AlphaDropout, ("input", "p", "train"), None),
    torch.feature_alpha_dropout: (torch.nn.FeatureAlphaDropout, ("input", "p", "train"), None),
}

_POOL_FN_PARAMS = {
    F.max_pool2d: (gnn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                   "return_indices")),
    F.avg_pool2d: (gnn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                   "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool2d: (gnn.AdaptiveAvgPool2d, ("output_size",)),
}
# resizes -> gnn.Upsample (nearest modes only; one module a call site). Modules by exact
# type (a subclass may compute otherwise; one outside torch.nn is traced into, its
# F.interpolate swapped); UpsamplingBilinear2d is listed to say why it stays float.
# F.upsample / F.upsample_nearest trace as F.interpolate (its __torch_function__ dispatch)
_UPSAMPLE_MODULES = (torch.nn.Upsample, torch.nn.UpsamplingNearest2d,
                     torch.nn.UpsamplingBilinear2d)
_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners",
                     "recompute_scale_factor", "antialias")
# swapped ops whose output is an image, (N, C, H, W) (or (C, H, W) unbatched, which the QAT
# Upsample refuses loudly): without example_inputs an Upsample after them is swapped
_IMAGE_OPS = (gnn.Conv2d, gnn.ConvRelu2d, gnn.ConvRelu62d, gnn.ConvBn2d, gnn.ConvBnRelu2d,
              gnn.ConvBnRelu62d, gnn.MaxPool2d, gnn.AvgPool2d, gnn.AdaptiveAvgPool2d,
              gnn.Upsample)
# modules drop-in conversion may fuse or swap: kept as they are when they carry hooks
_HOOK_CHECKED = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm,
                 torch.nn.ReLU, torch.nn.ReLU6, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
                 torch.nn.AdaptiveAvgPool2d, torch.nn.Upsample) + _ACT_MODULES
_POOL_MODULES = {torch.nn.MaxPool2d: gnn.MaxPool2d, torch.nn.AvgPool2d: gnn.AvgPool2d,
                 torch.nn.AdaptiveAvgPool2d: gnn.AdaptiveAvgPool2d}
_POOL_ARGS = {gnn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices",
                              "ceil_mode"),
              gnn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode",
                              "count_include_pad", "divisor_override"),
              gnn.AdaptiveAvgPool2d: ("output_size",)}


def _fn_name(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional") or target in _POOL_FN_PARAMS or \
            (mod == "torch._C._nn" and getattr(F, name, None) is target):  # F.gelu
        return f"F.{name}"
    return f"torch.{name}" if mod.startswith("torch") or not mod else f"{mod}.{name}"

# pass-through ops that may write a new tensor (a reshape of a non-contiguous view, dropout
# while training): their output loses the QAT producer tag unless it is carried over
_MAY_COPY_FNS = {torch.flatten, torch.reshape}
_MAY_COPY_METHODS = {"flatten", "reshape", "view", "contiguous", "reshape_as"}
_EVAL_IDENTITY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _one_input(m: torch.nn.Module) -> bool:
    """``m.forward`` takes exactly one argument (a pass-through has one input)."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _probe_eval_identities(model: torch.nn.Module) -> None:
    """:func:`is_eval_identity` of every module of ``model``, before a trace: the probe
    calls forwards, which must not happen inside an fx trace (fx patches module calls
    there), so the tracer only reads the cache."""
    for m in model.modules():
        is_eval_identity(m)


def is_eval_identity(m: torch.nn.Module) -> bool:
    """Whether ``m`` is a training-only regularizer: a torch.nn module without parameters or
    buffers (not a gpuquant module, not one of torch.nn's own layers, without hooks) whose
    forward in eval mode returns its input itself: drop path / stochastic depth (timm's
    ``DropPath``, torchvision's ``StochasticDepth``, whose function is ``torch.fx.wrap``-ped),
    DropBlock. The drop-in and ``quantize_qat`` treat it as they treat ``nn.Dropout``: a
    pass-through that keeps its input's producer (it scales or zeroes values while
    training; the int8 model, always in eval, runs it as the identity on the int8 tensor).

    Probed by calling the forward once, in eval mode and without gradients, on a small
    tensor on the ``meta`` device (no data, no computation): ``out is x``. The training
    flags are set directly and every submodule's attributes restored afterwards (a forward
    that stores its input or counts its calls keeps nothing from the probe). Cached per
    module.

    Raises:
        TypeError: ``m`` is not a ``torch.nn.Module``."""
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"is_eval_identity: m must be a torch.nn.Module, got "
                        f"{type(m).__name__}")
    hit = _EVAL_IDENTITY.get(m)
    if hit is not None:
        return hit
    ok = False
    if not isinstance(m, (Module, QATModule, QuantizedModule)) and \
            not type(m).__module__.startswith("torch.") and _hooked(m) is None and \
            next(iter(m.parameters()), None) is None and \
            next(iter(m.buffers()), None) is None and _one_input(m):
        saved = {sub: dict(sub.__dict__) for sub in m.modules()}
        try:
            for sub in saved:
                sub.training = False
            x = torch.empty(2, 4, 4, 4, device="meta")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ok = m(x) is x
        except Exception:  # noqa: BLE001 -- a forward that cannot run so: not an identity
            ok = False
        finally:
            for sub, d in saved.items():
                sub.__dict__.clear()
                sub.__dict__.update(d)
    _EVAL_IDENTITY[m] = ok
    return ok


def is_pass_module(m: torch.nn.Module) -> bool:
    """A module the drop-in passes int8 tensors through (``nn.Dropout``, ``Flatten``,
    ``Identity``, ...; training-only regularizers, :func:`is_eval_identity`).

    Raises:
        TypeError: ``m`` is not a ``torch.nn.Module``."""
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"is_pass_module: m must be a torch.nn.Module, got "
                        f"{type(m).__name__}")
    return type(m) in _PASS_MODULES or is_eval_identity(m)


_MAY_COPY_MODULES = tuple(m for m in _PASS_MODULES if m not in (torch.nn.Unflatten,
                                                                 torch.nn.Identity))


# ops whose result may share memory with their first argument (in-place writes through
# them reach it): the pass-through ops and a few more
_VIEW_FNS = _PASS_FNS | {torch.narrow, torch.select, torch.movedim, torch.moveaxis,
                         torch.swapaxes, torch.swapdims, torch.t, torch.diagonal,
                         torch.split_with_sizes}
_VIEW_METHODS = _PASS_METHODS | {"narrow", "select", "t", "swapaxes", "swapdims",
                                 "moveaxis", "diagonal", "unfold", "as_strided",
                                 "split_with_sizes", "to", "type", "type_as", "float"}
_VIEW_ATTRS = {"T", "mT", "H", "mH", "data", "real", "imag"}


def _index_kind(idx) -> str:
    """'basic' (ints, slices, None, ...: a view), 'advanced' (lists, tensors, bools: a copy)
    or 'unknown' (a traced value, which may be a tensor)."""
    kind = "basic"
    for p in idx if isinstance(idx, tuple) else (idx,):
        if p is None or p is Ellipsis or isinstance(p, slice):
            continue
        if isinstance(p, bool) or not isinstance(p, (int, fx.Node)):
            return "advanced"
        if isinstance(p, fx.Node):
            kind = "unknown"
    return kind


def _may_copy(n: fx.Node, modules) -> bool:
    if n.op == "call_function" and n.target is operator.getitem:
        return len(n.args) > 1 and _index_kind(n.args[1]) != "basic"  # x[[0, 2]], x[mask]
    if n.op == "call_function":
        return n.target in _MAY_COPY_FNS
    if n.op == "call_method":
        return n.target in _MAY_COPY_METHODS
    return n.op == "call_module" and (type(modules[n.target]) in _MAY_COPY_MODULES or
                                      is_eval_identity(modules[n.target]))


def _is_pass(n: fx.Node, modules) -> bool:
    if n.op == "call_function":
        return n.target in _PASS_FNS
    if n.op == "call_method":
        return n.target in _PASS_METHODS
    if n.op == "call_module":
        return is_pass_module(modules[n.target])
    return False


# -------------------------------------------------------------------------------- rewriting
class _Rewriter:
    def __init__(self, gm: fx.GraphModule, fallbacks: Dict[str, str], kinds: _Kinds):
        self.gm, self.graph, self.kinds = gm, gm.graph, kinds
        self.fallbacks = fallbacks
        self.modules = dict(gm.named_modules())
        self.used_names = set(self.modules)
        self.site_count: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.site_count[n.target] = self.site_count.get(n.target, 0) + 1
        self.erased: set = set()
        self.quantized: set = set()            # nodes that are quantized ops
        self.reasons: Dict[fx.Node, str] = {}  # why a module node stays float
        self.alone: Dict[str, torch.nn.Module] = {}  # norm_act path -> its folded BatchNorm

    # ------------------------------------------------------------------ naming, installing
    def _scope(self, n: fx.Node) -> str:
        """The module path where ``n`` ran, if new modules may go there: only the plain
        containers GraphModule made for traced-through modules (never a user's module)."""
        if n.op == "call_module":
            path = n.target.rpartition(".")[0]
        else:
            stack = n.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
        owner = self.gm
        for part in path.split(".") if path else []:
            owner = owner._modules.get(part)
            if owner is None:
                break
            if type(owner) is not torch.nn.Module:
                return ""
        return path

    def _free(self, name: str) -> bool:
        leaf = name.rpartition(".")[2]
        return name not in self.used_names and not hasattr(fx.GraphModule, leaf)

    def _module_site_name(self, target: str) -> str:
        """A module called once is replaced at its own path; one called at several sites (one
        QAT module a site, each with its own output qparams) gets ``path_1``, ``path_2``..."""
        if self.site_count[target] == 1:
            return target
        return self._unique(target)

    def _unique(self, name: str) -> str:
        k, cand = 1, name
        while not self._free(cand):
            cand, k = f"{name}_{k}", k + 1
        self.used_names.add(cand)
        return cand

    def _is_parameter(self, target: Optional[str]) -> bool:
        """Whether the ``get_attr`` target is an ``nn.Parameter`` of the traced model."""
        if target is None:
            return False
        owner, _, leaf = target.rpartition(".")
        try:
            m = self.gm.get_submodule(owner) if owner else self.gm
        except AttributeError:
            return False
        return leaf in m._parameters

    def _set_module(self, name: str, module: torch.nn.Module) -> str:
        parent, _, leaf = name.rpartition(".")
        owner = self.gm
        for part in parent.split(".") if parent else []:
            child = owner._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                owner.add_module(part, child)
            owner = child
        setattr(owner, leaf, module)
        self.modules[name] = module
        self.used_names.add(name)
        return name

    # ------------------------------------------------------------------ 0. dropout calls
    def dropout_modules(self) -> None:
        """``F.dropout(x, p, self.training)`` (and the other dropout functions) -> an
        ``nn.Dropout(p)`` module node (``Dropout1d`` ... as fits). fx traced the mode flag as
        a constant; the module starts in that mode (the same float computation) and then
        follows ``train()`` / ``eval()``, so the eval QAT model and the int8 model do not
        drop (as for ``nn.Dropout``). A call whose ``p`` or mode is not a constant stays a
        float op (warned)."""
        for n in list(self.graph.nodes):
            if n.op != "call_function" or n.target not in _DROPOUT_FNS:
                continue
            cls, names, default = _DROPOUT_FNS[n.target]
            if len(n.args) > len(names) or not n.args or \
                    any(k not in names[1:] for k in n.kwargs):
                continue
            kw = dict(zip(names, n.args))
            if any(k in kw for k in n.kwargs):
                continue
            kw.update(n.kwargs)
            p, mode = kw.get("p", 0.5), kw.get(names[2], default)
            inplace = kw.get("inplace", False)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or \
                    not isinstance(mode, bool) or not isinstance(inplace, bool) or \
                    not 0 <= p <= 1:
                continue
            new = cls(float(p), inplace=inplace)
            new.training = mode
            name = self._new_name(n, cls.__name__.lower())
            self._set_module(name, new)
            with self.graph.inserting_before(n):
                node = self.graph.call_module(name, (kw["input"],))
            node.meta = dict(n.meta)
            n.replace_all_uses_with(node)
            self.graph.erase_node(n)
            self.site_count[name] = 1

    # ------------------------------------------------------------------ keyword calls
    def positional_calls(self) -> None:
        """``self.fc(input=x)`` -> ``self.fc(x)`` for ``torch.nn`` layers (and subclasses
        keeping their forward), so keyword calls fuse and swap like positional ones."""
        for n in self.graph.nodes:
            if n.op != "call_module" or not n.kwargs:
                continue
            m = self.modules[n.target]
            if _is_disabled(m) or n.target in self.fallbacks or isinstance(m, Module) or not (
                    type(m).__module__.startswith("torch.nn.") or
                    any(_same_forward(m, base) for base in _LEAF_BASES)):
                continue
            try:
                bound = inspect.signature(m.forward).bind(*n.args, **n.kwargs)
            except TypeError:
                continue
            args = []
            for p in inspect.signature(m.forward).parameters.values():
                if p.name not in bound.arguments or p.kind not in (
                        inspect.Parameter.POSITIONAL_ONLY,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD):
                    break
                args.append(bound.arguments[p.name])
            if len(args) == len(bound.arguments):
                n.args, n.kwargs = tuple(args), {}

    # ------------------------------------------------------------------ 1. in-place ops
    def functionalize(self) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for n in list(self.graph.nodes):
            mutated = self._inplace_target(n)
            if mutated is None:
                continue
            self._check_no_alias(n, mutated, order)
            for user in list(mutated.users):
                if user is not n and order[user] > order[n]:
                    user.replace_input_with(mutated, n)
            if n.meta.get("dropin_augmented"):
                continue  # ``y += x``: fx recorded it out of place already
            if n.op == "call_method":
                n.target = n.target[:-1]
            elif n.op == "call_function" and n.target in _INPLACE_FNS:
                n.target = _INPLACE_FNS[n.target]
            elif n.op == "call_function":
                n.kwargs = {**n.kwargs, "inplace": False}
            elif n.op == "call_module":
                m = copy.copy(self.modules[n.target])
                m.inplace = False
                self._set_module(n.target, m)

    def _inplace_target(self, n: fx.Node) -> Optional[fx.Node]:
        first = n.args[0] if n.args else None
        if not isinstance(first, fx.Node):
            return None
        if n.meta.get("dropin_augmented"):  # ``y += x`` on a tensor (ints are rebound)
            return first if self._is_tensor(first) else None
        if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__") \
                and hasattr(torch.Tensor, n.target[:-1]):
            return first
        if n.op == "call_function" and (n.target in _INPLACE_FNS or
                                        n.kwargs.get("inplace", False) is True):
            return first
        if n.op == "call_module":
            m = self.modules[n.target]
            if getattr(m, "inplace", False) is True and type(m).__module__.startswith("torch.nn"):
                return first
        return None

    def _is_tensor(self, n: fx.Node) -> bool:
        if self.kinds.has_meta and "dropin_ran" in n.meta:
            return isinstance(n.meta.get("tensor_meta"), TensorMetadata)
        return self.kinds._guess(n) == "tensor"

    def _view_of(self, n: fx.Node) -> Optional[fx.Node]:
        """The value ``n`` may share memory with, when ``n`` is a view-like op (a view,
        basic indexing, split, ``.to`` / ``.float()`` that may return their input...)."""
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            return None
        if n.op == "call_function" and n.target is operator.getitem:
            if self.kinds.is_container(src):  # an element of split(x): a view of x
                return src if self._view_of(src) is not None else None
            return src if _index_kind(n.args[1] if len(n.args) > 1 else None) != \
                "advanced" else None
        if n.op == "call_function":
            if n.target is getattr:
                return src if n.args[1] in _VIEW_ATTRS else None
            return src if n.target in _VIEW_FNS else None
        if n.op == "call_method":
            return src if n.target in _VIEW_METHODS else None
        if n.op == "call_module":
            return src if is_pass_module(self.modules[n.target]) else None
        return None

    def _check_no_alias(self, n: fx.Node, target: fx.Node, order) -> None:
        """Raise when in-place op ``n`` writes ``target`` while another value made before
        ``n`` shares its memory (a view of it, or what it is a view of) and is read after
        ``n``: functionalizing rewires later reads of ``target`` only, the graph would lose
        the write."""
        at = order[n]
        group, todo = {target}, [target]
        while todo:
            a = todo.pop()
            near = [self._view_of(a)] + [u for u in a.users if self._view_of(u) is a]
            for b in near:
                if isinstance(b, fx.Node) and b not in group and order.get(b, at) < at:
                    group.add(b)
                    todo.append(b)
        for other in group - {target}:
            late = [u for u in other.users
                    if u is not n and order.get(u, -1) > at and not self._is_meta(u)]
            if late:
                src = n.meta.get("dropin_src")
                where = f" (at {src[0]}:{src[1]}: {src[2]})" if src else ""
                raise ValueError(
                    f"quantize_qat: in-place {self._describe_inplace(n)}{where} writes "
                    f"'{target.name}', which shares memory with '{other.name}' (a view, "
                    f"indexing, split... of the same tensor), and '{other.name}' is read "
                    f"after the write (by '{late[0].name}'): torch.fx records values, not "
                    f"memory, so the converted graph would lose the write. Write it out of "
                    f"place (e.g. y = torch.cat([F.relu(y[:, :4]), y[:, 4:]], 1)), or move "
                    f"that code into a submodule marked with "
                    f"gpuquant.quantization.fx.disable_quantize(submodule).")

    def _describe_inplace(self, n: fx.Node) -> str:
        if n.meta.get("dropin_augmented"):
            sym = {operator.add: "+=", operator.sub: "-=", operator.mul: "*=",
                   operator.truediv: "/="}.get(n.target, f"{_fn_name(n.target)} (augmented)")
            return f"'{sym}'"
        if n.op == "call_method":
            return f"'.{n.target}()'"
        if n.op == "call_module":
            return f"module '{n.target}' ({type(self.modules[n.target]).__name__}, inplace=True)"
        if n.target in _INPLACE_FNS:
            return f"'{_fn_name(n.target)}'"
        return f"'{_fn_name(n.target)}(..., inplace=True)'"

    # ------------------------------------------------------------------ 2. fusion and swaps
    def fuse(self) -> None:
        for n in list(self.graph.nodes):
            if n in self.erased or n.op not in ("call_module", "call_function", "call_method"):
                continue
            if n.op == "call_module":
                self._swap_module(n)
            elif n.op == "call_function" and n.target in _POOL_FN_PARAMS:
                self._swap_pool_fn(n)
            elif (n.op == "call_method" and n.target == "mean") or \
                    (n.op == "call_function" and n.target is torch.mean):
                self._swap_spatial_mean(n)
            elif (n.op == "call_function" and n.target in _ACT_FNS) or \
                    (n.op == "call_method" and n.target in _ACT_METHODS):
                self._swap_activation_call(n)
            elif n.op == "call_function" and n.target is F.interpolate:
                self._swap_interpolate(n)
            else:
                self._swap_elemwise(n)
        # a folded norm_act whose children run nowhere now (fused, or Identity): its path
        # holds the folded BatchNorm itself, a second name of it as a plain BatchNorm's is
        # (quantize drops such names); else the view stays there, holding the children
        called = {n.target for n in self.graph.nodes if n.op == "call_module"}
        for path, bn in self.alone.items():
            if not any(t == path or t.startswith(path + ".") for t in called):
                self._set_module(path, bn)

    def _swap_module(self, n: fx.Node) -> None:
        m = self.modules[n.target]
        if _is_disabled(m) or n.target in self.fallbacks:
            return
        if isinstance(m, _GNN_LEAVES) or isinstance(m, (QATModule, QuantizedModule)):
            if isinstance(m, _GNN_QUANT_OPS):
                self.quantized.add(n)
            return
        why = _hooked(m) if isinstance(m, _HOOK_CHECKED) else None
        if why is not None:
            self.reasons[n] = why
            return
        if (_same_forward(m, torch.nn.Conv2d) or _same_forward(m, torch.nn.Linear)) and \
                not isinstance(m, Module) and self._parameters_read(n):
            return
        if _same_forward(m, torch.nn.Conv2d) and not isinstance(m, Module):
            if m.padding_mode != "zeros":
                self.reasons[n] = f"padding_mode={m.padding_mode!r} has no int8 form"
                return
            try:
                _explicit_padding(m)
            except NotImplementedError:
                self.reasons[n] = (f"padding='same' with kernel_size={m.kernel_size}, "
                                   f"dilation={m.dilation} pads asymmetrically: no int8 form")
                return
            self._fuse_linear_like(n, m, torch.nn.BatchNorm2d, "conv")
        elif _same_forward(m, torch.nn.Linear) and not isinstance(m, Module):
            self._fuse_linear_like(n, m, torch.nn.BatchNorm1d, "linear")
        elif type(m) in _POOL_MODULES:
            cls = _POOL_MODULES[type(m)]
            if getattr(m, "return_indices", False):
                self.reasons[n] = "return_indices=True has no int8 form"
                return
            new = cls(**{k: getattr(m, k) for k in _POOL_ARGS[cls]})
            new.training = m.training
            self._replace(n, [n], new, n.args[:1], self._module_site_name(n.target))
        elif type(m) in _ACT_MODULES:
            if len(n.args) != 1 or n.kwargs or not self.kinds.is_float_tensor(n.args[0]):
                return
            act = _module_activation(m)
            if isinstance(act, str):
                self.reasons[n] = act
                return
            new = gnn.Activation(*act)
            new.training = m.training
            qc = m.__dict__.get("qconfig")  # the module's own qconfig governs its swap
            if qc is not None:
                new.qconfig = qc
            self._replace(n, [n], new, n.args, self._module_site_name(n.target))
        elif type(m) in _UPSAMPLE_MODULES:
            if len(n.args) != 1 or n.kwargs or not self.kinds.is_float_tensor(n.args[0]):
                return
            params = {k: getattr(m, k) for k in _INTERPOLATE_ARGS[1:-1]}
            self._swap_upsample(n, n.args[0], params,
                                lambda: self._module_site_name(n.target), m)

    def _parameters_read(self, n: fx.Node) -> bool:
        """Whether the forward also reads the layer's parameters directly (``self.fc.weight``,
        a weight shared with a functional op) where the layer would be swapped in place: the
        fused module there has them elsewhere, the int8 one holds int8 weights. The layer
        then stays float (warned)."""
        if self.site_count[n.target] != 1:  # swapped per call site: the original stays
            return False
        prefix = n.target + "."
        read = sorted({g.target[len(prefix):] for g in self.graph.nodes
                       if g.op == "get_attr" and g.target.startswith(prefix)})
        if read:
            self.reasons[n] = (f"its {', '.join(read)} also read directly by the forward, "
                               f"and the int8 layer there holds them as integers")
        return bool(read)

    def _fuse_linear_like(self, n: fx.Node, m, bn_type, kind: str) -> None:
        if len(n.args) != 1 or n.kwargs:
            return
        chain, bn, act = [n], None, None
        nxt = _single_user(n)
        if nxt is not None and nxt.op == "call_module" and \
                _is_bn(self.modules[nxt.target], bn_type) and nxt.args == (n,) and \
                not nxt.kwargs and self._foldable(self.modules[nxt.target], m, nxt, kind):
            bn = self.modules[nxt.target]
            if bn.__dict__.get("_dropin_norm_act", False):
                if nxt.target not in self.alone:
                    self.alone[nxt.target] = _bn_alone(bn)
                bn = self.alone[nxt.target]
            chain.append(nxt)
            nxt = _single_user(nxt)
        if nxt is not None and nxt.args[:1] == (chain[-1],):
            act = _activation_of(nxt, self.modules)
            if act is not None:
                chain.append(nxt)
        if kind == "conv":
            cls = {(False, None): gnn.Conv2d, (False, "relu"): gnn.ConvRelu2d,
                   (False, "relu6"): gnn.ConvRelu62d, (True, None): gnn.ConvBn2d,
                   (True, "relu"): gnn.ConvBnRelu2d, (True, "relu6"): gnn.ConvBnRelu62d}
        else:
            if act == "relu6":  # no LinearRelu6: fuse without the activation
                chain.pop()
                act = None
            cls = {(False, None): gnn.Linear, (False, "relu"): gnn.LinearRelu,
                   (True, None): gnn.LinearBn1d, (True, "relu"): gnn.LinearBnRelu1d}
        cls = cls[(bn is not None, act)]
        if bn is None:
            new = cls.__new__(cls)
            new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v
                                 for k, v in m.__dict__.items()})
        else:
            new = cls.__new__(cls)
            torch.nn.Module.__init__(new)
            setattr(new, kind, m)
            new.bn = bn
            new.training = m.training
            qc = getattr(m, "qconfig", None)  # the layer's own qconfig governs the fused one
            if qc is not None:
                new.qconfig = qc
        self._replace(n, chain, new, n.args, self._module_site_name(n.target))

    def _foldable(self, bn, m, bn_node: fx.Node, kind: str) -> bool:
        out = m.out_channels if kind == "conv" else m.out_features
        if _hooked(bn) is not None:
            return False
        if not bn.track_running_stats or bn.running_var is None or bn.num_features != out:
            return False
        if kind == "linear" and self.kinds.has_meta and "dropin_ran" in bn_node.meta:
            tm = bn_node.meta.get("tensor_meta")
            return tm is not None and len(tm.shape) == 2  # LinearBn1d takes (N, features)
        return True

    def _swap_pool_fn(self, n: fx.Node) -> None:
        cls, names = _POOL_FN_PARAMS[n.target]
        if not n.args:
            return
        kw = dict(zip(names, n.args[1:]))
        for k, v in n.kwargs.items():
            if k not in names:
                return
            kw[k] = v
        if any(isinstance(a, fx.Node) for a in _node_args_of(kw)) or kw.get("return_indices"):
            return
        new = cls(**kw)
        self._replace(n, [n], new, n.args[:1], self._new_name(n, cls.__name__.lower()))

    def _swap_activation_call(self, n: fx.Node) -> None:
        """``F.silu(x)``, ``torch.sigmoid(x)``, ``x.tanh()``, ``F.leaky_relu(x, 0.2)``... ->
        ``Activation(kind)``; other arguments (``F.elu(x, 0.5)``) stay float, with the reason
        in the warning."""
        if n.op == "call_method":
            if len(n.args) != 1 or n.kwargs:
                return
            kind, params = _ACT_METHODS[n.target], {}
        else:
            kind, names = _ACT_FNS[n.target]
            names = ("input",) + names
            if not n.args or len(n.args) > len(names) or \
                    any(k not in names or k == "input" for k in n.kwargs):
                return
            params = dict(zip(names[1:], n.args[1:]))
            if any(k in params for k in n.kwargs):
                return
            params.update(n.kwargs)
        if not self.kinds.is_float_tensor(n.args[0]):
            return
        act = _activation_args(kind, params)
        if isinstance(act, str):
            self.reasons[n] = act
            return
        self._replace(n, [n], gnn.Activation(*act), n.args[:1], self._new_name(n, act[0]))

    def _swap_interpolate(self, n: fx.Node) -> None:
        """``F.interpolate(x, size, scale_factor, mode="nearest" | "nearest-exact", ...)``
        with constant arguments (positional or keyword; fx records ``F.upsample`` and
        ``F.upsample_nearest`` as this call too) -> ``Upsample``; other arguments stay float,
        with the reason in the warning (:func:`_upsample_args`)."""
        names = _INTERPOLATE_ARGS
        if not n.args or len(n.args) > len(names) or \
                any(k not in names or k == "input" for k in n.kwargs):
            return
        params = dict(zip(names, n.args))
        if any(k in params for k in n.kwargs):
            return
        params.update(n.kwargs)
        x = params.pop("input")
        if not self.kinds.is_float_tensor(x):
            return
        self._swap_upsample(n, x, params, lambda: self._new_name(n, "upsample"), None)

    def _swap_upsample(self, n: fx.Node, x: fx.Node, params: dict, name,
                       m: Optional[torch.nn.Module]) -> None:
        """Node ``n`` resizing ``x`` with ``params`` (module ``m``'s, or a function's) ->
        ``Upsample`` at ``name()`` (called only then: it reserves the name), when the
        arguments have an int8 form and ``x`` is 4-D: by the example run's shapes; without
        them, when a pair ``size`` / ``scale_factor`` (one entry a spatial dim) or the op
        making ``x`` (:meth:`_image_valued`) says so. Else the reason goes to the warning."""
        kw = _upsample_args(params)
        if isinstance(kw, str):
            self.reasons[n] = kw
            return
        tm = x.meta.get("tensor_meta") if self.kinds.has_meta and "dropin_ran" in x.meta \
            else None
        if isinstance(tm, TensorMetadata):
            if len(tm.shape) != 4:
                self.reasons[n] = (f"a {len(tm.shape)}-D input {tuple(tm.shape)}: the int8 "
                                   f"Upsample takes 4-D (N, C, H, W)")
                return
        elif not self._image_valued(x, {}) and not _is_pair(
                kw["size"] if kw["size"] is not None else kw["scale_factor"]):
            self.reasons[n] = ("the input's rank is unknown without example_inputs (the int8 "
                               "Upsample takes 4-D only; a 3-D input is a 1-D resize): give "
                               "example_inputs to quantize_qat, or a (h, w) pair as size / "
                               "scale_factor")
            return
        new = gnn.Upsample(**kw)
        if m is not None:
            new.training = m.training
            qc = m.__dict__.get("qconfig")  # the module's own qconfig governs its swap
            if qc is not None:
                new.qconfig = qc
        self._replace(n, [n], new, (x,), name())

    def _image_valued(self, x: fx.Node, memo: Dict[fx.Node, bool]) -> bool:
        """Whether ``x`` is made by a swapped image op (:data:`_IMAGE_OPS`: 4-D, or 3-D
        unbatched, which the QAT ``Upsample`` refuses with a clear error), directly or
        through an ``Activation``, a ``Concat`` of such a value or an ``Elemwise`` of two."""
        if x in memo:
            return memo[x]
        memo[x] = False  # (a graph has no cycles; this only bounds the walk)
        if x.op != "call_module" or x not in self.quantized:
            return False
        mod = self.modules[x.target]
        ins = [a for a in _node_args(x) if self.kinds.is_float_tensor(a)]
        if isinstance(mod, _IMAGE_OPS):
            out = True
        elif isinstance(mod, (gnn.Activation, gnn.Concat)):
            out = any(self._image_valued(a, memo) for a in ins)
        elif isinstance(mod, gnn.Elemwise):
            out = bool(ins) and all(self._image_valued(a, memo) for a in ins)
        else:
            out = False
        memo[x] = out
        return out

    def _swap_spatial_mean(self, n: fx.Node) -> None:
        """``x.mean((2, 3), keepdim)`` of a 4-D tensor (global average pooling) ->
        ``AdaptiveAvgPool2d(1)``, then ``torch.flatten(., 1)`` unless keepdim."""
        names = ("input", "dim", "keepdim")
        kw = dict(zip(names, n.args))
        for k, v in n.kwargs.items():
            if k not in names or k in kw:
                return
            kw[k] = v
        dims, keep = kw.get("dim"), kw.get("keepdim", False)
        if not isinstance(dims, (list, tuple)) or sorted(dims) not in ([2, 3], [-2, -1]) or \
                not isinstance(keep, bool) or not self.kinds.is_float_tensor(kw["input"]):
            return
        tm = kw["input"].meta.get("tensor_meta") if self.kinds.has_meta else None
        if (tm is not None and len(tm.shape) != 4) or (tm is None and min(dims) < 0):
            return
        new = self._replace(n, [n], gnn.AdaptiveAvgPool2d(1), (kw["input"],),
                            self._new_name(n, "mean"))
        if not keep:
            with self.graph.inserting_after(new):
                flat = self.graph.call_function(torch.flatten, (new, 1))
            flat.meta = dict(new.meta)
            new.replace_all_uses_with(flat)
            flat.args = (new, 1)
            # the pool's output keeps its 1x1 dims: not the recorded (N, C) metadata
            new.meta = {k: v for k, v in new.meta.items()
                        if k not in ("tensor_meta", "dropin_ran")}

    def _swap_elemwise(self, n: fx.Node) -> None:
        t = n.target
        if n.op == "call_function" and t in _CAT_FNS:
            tensors = n.args[0] if n.args else n.kwargs.get("tensors")
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            extra = set(n.kwargs) - {"tensors", "dim"}
            if not isinstance(tensors, (list, tuple)) or not tensors or extra or \
                    isinstance(dim, fx.Node) or \
                    not all(self.kinds.is_float_tensor(a) for a in tensors):
                return
            self._replace(n, [n], gnn.Concat(), (list(tensors), dim), self._new_name(n, "cat"))
            return
        method = None
        if (n.op == "call_function" and t in _ADD_FNS) or (n.op == "call_method" and t == "add"):
            method = "add"
        elif (n.op == "call_function" and t in _MUL_FNS) or (n.op == "call_method" and t == "mul"):
            method = "mul"
        if method is None or len(n.args) != 2 or n.kwargs or \
                not all(self.kinds.is_float_tensor(a) for a in n.args):
            return
        chain = [n]
        nxt = _single_user(n)
        if method == "add" and nxt is not None and nxt.args[:1] == (n,) and \
                _activation_of(nxt, self.modules) == "relu":
            chain.append(nxt)
            method = "add_relu"
        self._replace(n, chain, gnn.Elemwise(method), tuple(n.args), self._new_name(n, method))

    def _new_name(self, n: fx.Node, base: str) -> str:
        scope = self._scope(n)
        return self._unique(f"{scope}.{base}" if scope else base)

    def _replace(self, head: fx.Node, chain: List[fx.Node], module, args,
                 name: str) -> fx.Node:
        """Put ``module`` at ``name`` and one call_module node in place of ``chain``."""
        self._set_module(name, module)
        last = chain[-1]
        with self.graph.inserting_before(head):
            new = self.graph.call_module(name, tuple(args))
        new.meta = dict(last.meta)
        if "nn_module_stack" in head.meta:
            new.meta["nn_module_stack"] = head.meta["nn_module_stack"]
        last.replace_all_uses_with(new)
        for old in reversed(chain):
            self.graph.erase_node(old)
            self.erased.add(old)
        self.quantized.add(new)
        return new

    # ------------------------------------------------------------------ 3. stubs
    def stub(self) -> List[str]:
        """Insert the stubs; returns the float parts to warn about."""
        kind: Dict[fx.Node, str] = {}
        quant_of: Dict[fx.Node, fx.Node] = {}
        dequant_of: Dict[fx.Node, fx.Node] = {}
        warn: List[str] = []

        def tensor_kind(a: fx.Node, src_kind: str) -> str:
            if self.kinds.is_float_tensor(a) or self.kinds.is_container(a):
                return src_kind
            return _O

        def converted(a, src: str, dst: str, stub, tag: str, cache: dict):
            """``a`` as a ``dst``-kind value: through one ``stub`` module per source node
            (shared by every consumer) when ``a`` is a ``src``-kind float tensor."""
            if not isinstance(a, fx.Node) or kind.get(a) != src or \
                    not self.kinds.is_float_tensor(a):
                return a
            if a not in cache:
                with self.graph.inserting_after(a):
                    name = self._stub_name(a, tag)
                    module = stub()
                    if stub is gnn.QuantStub and self._is_parameter(_state_written(a)):
                        # a learned operand (a layer scale): quantized as a weight is
                        module.__dict__["_param_operand"] = True
                    self._set_module(name, module)
                    node = self.graph.call_module(name, (a,))
                node.meta = dict(a.meta)
                kind[node] = dst
                cache[a] = node
            return cache[a]

        def as_quantized(a):
            return converted(a, _F, _Q, gnn.QuantStub, "quant", quant_of)

        def as_float(a):
            return converted(a, _Q, _F, gnn.DequantStub, "dequant", dequant_of)

        def rewrite_inputs(n: fx.Node, fn) -> None:
            n.args = fx.node.map_arg(n.args, fn)
            n.kwargs = fx.node.map_arg(n.kwargs, fn)

        for n in list(self.graph.nodes):
            if n in kind:  # a stub inserted just now
                continue
            if n.op == "placeholder":
                kind[n] = tensor_kind(n, _F)
            elif n.op == "get_attr":
                kind[n] = tensor_kind(n, _F)
            elif n.op == "output":
                rewrite_inputs(n, as_float)
            elif n in self.quantized:
                rewrite_inputs(n, as_quantized)
                kind[n] = _Q
            elif n.op == "call_module" and isinstance(self.modules[n.target], gnn.QuantStub) \
                    and not _is_disabled(self.modules[n.target]):
                rewrite_inputs(n, as_float)
                kind[n] = _Q
            elif n.op == "call_module" and isinstance(self.modules[n.target], gnn.DequantStub) \
                    and not _is_disabled(self.modules[n.target]):
                rewrite_inputs(n, as_quantized)
                kind[n] = _F
            elif self._is_meta(n):  # sizes, shapes, devices: read from int8 tensors alike
                if (n.op == "call_method" and n.target in _VALUE_META_METHODS) or \
                        (n.op == "call_function" and n.target is getattr and
                         n.args[1] in _VALUE_META_ATTRS):
                    rewrite_inputs(n, as_float)  # y.dtype, y[0, 0].item(): the float value's
                kind[n] = _O
            elif self._passes_through(n, kind):
                src = n.args[0]
                if n.op == "call_method" and n.target == "view" and kind.get(src) == _Q:
                    n.target = "reshape"  # int8 activations are channels_last: view may fail
                kind[n] = tensor_kind(n, kind.get(src, _O))
                if kind[n] == _Q and _may_copy(n, self.modules) and \
                        self.kinds.is_float_tensor(n):
                    with self.graph.inserting_after(n):
                        kept = self.graph.call_function(keep_producer, (n, src))
                    kept.meta = dict(n.meta)
                    n.replace_all_uses_with(kept)
                    kept.args = (n, src)
                    kind[kept] = _Q
            else:  # a float op
                ins = [a for a in _node_args(n) if kind.get(a, _O) != _O]
                rewrite_inputs(n, as_float)
                kind[n] = tensor_kind(n, _F)
                deliberate = n.op == "call_module" and _is_disabled(self.modules[n.target])
                if ins and not self._structural(n) and not deliberate:
                    warn.append(self._describe(n))
        for node in quant_of.values():
            if self._reaches_concat(node):
                # a concatenated parameter (a class token) keeps the activations' quantizers:
                # the int8 Concat takes one dtype, and weights' may be another (qint8_narrow)
                self.gm.get_submodule(node.target).__dict__.pop("_param_operand", None)
        return warn

    def _reaches_concat(self, node: fx.Node) -> bool:
        """Whether ``node``'s value reaches a ``Concat``, directly or through ops that are
        no module (reshapes, expands, indexing: they keep its dtype)."""
        seen, todo = set(), list(node.users)
        while todo:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module":
                if isinstance(self.gm.get_submodule(u.target), gnn.Concat):
                    return True
            elif u.op in ("call_function", "call_method"):
                todo.extend(u.users)
        return False

    def _passes_through(self, n: fx.Node, kind) -> bool:
        if not _is_pass(n, self.modules) or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        src = n.args[0]
        if n.op == "call_function" and n.target is operator.getitem:
            return kind.get(src, _O) != _O
        if kind.get(src, _O) == _Q and self.kinds.is_container(n):
            # a tuple of int8 tensors is fine where it is only indexed
            return all(u.op == "call_function" and u.target is operator.getitem
                       for u in n.users)
        return True

    @staticmethod
    def _is_meta(n: fx.Node) -> bool:
        if n.op == "call_method":
            return n.target in _META_METHODS
        if n.op == "call_function":
            return n.target is len or (n.target is getattr and n.args[1] in _META_ATTRS)
        return False

    @staticmethod
    def _structural(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target in (operator.getitem, getattr)

    def _stub_name(self, a: fx.Node, base: str) -> str:
        if a.op == "placeholder" and base == "quant":
            ph = [p for p in self.graph.nodes if p.op == "placeholder" and
                  not p.meta.get("dropin_concrete")]
            name = "quant" if len(ph) == 1 else f"quant_{a.name}"
            return self._unique(name)
        if base == "dequant" and all(u.op == "output" for u in a.users):
            return self._unique("dequant")
        return self._new_name(a, base)

    def _describe(self, n: fx.Node) -> str:
        if n.op == "call_module":
            m = self.modules[n.target]
            why = self.fallbacks.get(n.target) or self.reasons.get(n)
            why = f"not traceable, kept whole: {why}" if n.target in self.fallbacks else \
                (why or "no int8 version")
            return f"module '{n.target}' ({type(m).__name__}: {why})"
        scope = self._scope_any(n)
        what = f".{n.target}()" if n.op == "call_method" else _fn_name(n.target)
        why = f" ({self.reasons[n]})" if n in self.reasons else ""
        return f"{what} in '{scope or '<root>'}'{why}"

    @staticmethod
    def _scope_any(n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        return list(stack.values())[-1][0] if stack else ""


def _node_args_of(d: dict) -> List[object]:
    out: List[object] = []
    fx.node.map_aggregate(list(d.values()), lambda a: out.append(a) or a)
    return out


def _check_example_inputs(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        for i, t in enumerate(example_inputs):
            if type(t).__module__ == "numpy":
                raise TypeError(f"quantize_qat: example_inputs[{i}] is a numpy."
                                f"{type(t).__name__}, not a torch.Tensor; pass "
                                f"torch.from_numpy(...)")
        return tuple(example_inputs)
    raise TypeError(f"quantize_qat: example_inputs must be a tuple of the model's positional "
                    f"inputs (or one tensor), got {type(example_inputs).__name__}")


def _carry_qconfigs(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Copy the ``qconfig`` attributes of the model and of its traced-through containers onto
    the GraphModule and the plain containers it rebuilt at the same paths (fx keeps leaf
    modules, so theirs stay), where :func:`quantize_qat` finds and inherits them: the modules
    the rewrite puts in a container's path (fused layers, functional ops made modules, stubs
    inside it) get that container's qconfig, as in a ``gpuquant.nn`` model."""
    for name, m in model.named_modules():
        qc = m.__dict__.get("qconfig")
        if qc is None:
            continue
        target = gm
        for part in name.split(".") if name else []:
            target = target._modules.get(part)
            if target is None:
                break
        if target is not None and target is not m and "qconfig" not in target.__dict__:
            target.qconfig = qc


def prepare_plain(model: torch.nn.Module, example_inputs=None) -> fx.GraphModule:
    """Turn a plain ``torch.nn`` model into a ``torch.fx.GraphModule`` of
    :mod:`gpuquant.nn` float modules with quantize / dequantize stubs, ready for
    :func:`~gpuquant.quantization.quantize_qat` (which calls this for plain models).

    The returned module computes what ``model`` computes (bit for bit in float, as the fused
    float modules run the same ops) and shares its ``Parameter`` and buffer objects.
    ``print(gm.code)`` shows the rewritten forward.

    Args:
        model: the float model (``torch.nn.Module``); its own ``forward`` must be traceable by
            ``torch.fx``; submodules that are not stay float whole.
        example_inputs: optional tuple of positional inputs (or one tensor) for one forward
            pass in eval mode without gradients, to learn which values are float tensors.
            Parameters of ``forward`` with a constant default (``None``, bool, int, float,
            str) that they do not supply (without them: all such parameters) are traced at
            their default (``concrete_args``; the result raises ``ValueError`` when called
            with another value).

    Returns:
        The rewritten ``GraphModule`` (class name: the model's).

    Raises:
        TypeError: ``model`` is not a module, or bad ``example_inputs`` (not a tuple, or a
            count ``forward`` does not take).
        ValueError: the model's own forward cannot be traced (the message gives the fx error,
            where it happened and how to proceed), an in-place op writes through a view of a
            value read afterwards (the op and its line), or ``example_inputs`` do not run.

    Warns:
        DropInWarning: once, naming every part that stays float for want of an int8 form or
            because it could not be traced.

    Example:
        >>> gm = prepare_plain(torchvision_style_resnet18(), example_inputs=(x,))
        >>> print(gm.code)   # the fused, stubbed graph quantize_qat would convert
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prepare_plain: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    example_inputs = _check_example_inputs(example_inputs)
    concrete = _concrete_args(model, example_inputs)
    if _Tracer().is_leaf_module(model, "") and not _is_disabled(model):
        model = torch.nn.Sequential(model)  # a lone layer: trace it as the call of a leaf
        concrete = {}
    gm, fallbacks = _trace(model, concrete)
    _expand_norm_act(gm)
    frozen = _frozen_buffers(gm.graph, fallbacks)
    _carry_qconfigs(model, gm)
    if example_inputs is not None:
        _propagate(gm, example_inputs)
    rw = _Rewriter(gm, fallbacks, _Kinds(example_inputs is not None))
    rw.dropout_modules()
    rw.positional_calls()
    rw.functionalize()
    rw.fuse()
    warn = rw.stub()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if frozen:
        warnings.warn(f"quantize_qat: {type(model).__name__}'s forward computes with the "
                      f"values of its buffers {frozen[:6]}{' ...' if len(frozen) > 6 else ''} "
                      f"(a torchvision FrozenBatchNorm2d's statistics, a fixed table): torch.fx "
                      f"computed with them at conversion and the converted model holds the "
                      f"results as constants, without those buffers. Load pretrained values "
                      f"into the float model before quantize_qat (load_state_dict on the "
                      f"converted one leaves them out), or mark such a module with "
                      f"disable_quantize() to keep it computing.", DropInWarning, stacklevel=3)
    if warn:
        warnings.warn(f"quantize_qat: {len(warn)} part(s) of {type(model).__name__} stay float "
                      f"(dequantized before, quantized after): " + "; ".join(warn) +
                      ". Accept it, replace them with ops gpuquant quantizes, or mark "
                      "deliberate float parts with disable_quantize().", DropInWarning,
                      stacklevel=3)
    return gm
