"""Dynamic quantization of transformers: ``quantize_dynamic`` (the name PyTorch users know)
and ``prepare_dynamic_qat`` (fine-tune for that serving mode).

``quantize_dynamic`` swaps every matching ``torch.nn.Linear`` for
:class:`gpuquant.nn.quantized.linear_dynamic.DynamicLinear` (W8A8: per-token int8
activations, per-channel int8 weights, int32 accumulation, float output) or, with
``weight_only=True``, :class:`~gpuquant.nn.quantized.linear_dynamic.WeightOnlyLinear`.

What is and is not swapped:

* ``torch.nn.Linear`` and subclasses that keep its forward (HuggingFace ``nn.Linear`` layers,
  ``gpuquant.nn.Linear``), any leading dimensions; QAT
  :class:`gpuquant.nn.qat.linear_dynamic.DynamicLinear` convert with their own mode and
  dtypes; SmoothQuant's :class:`~gpuquant.quantization.smoothquant.SmoothedLinear` keeps its
  input smoothing. Linear subclasses with their own forward (``gpuquant.nn.LinearRelu``...)
  stay float (logged): a plain quantized Linear would drop what their forward adds.
* ``torch.nn.MultiheadAttention`` is replaced as a whole by
  :class:`~gpuquant.nn.quantized.linear_dynamic.DynamicMultiheadAttention` (its forward reads
  ``in_proj_weight`` and ``out_proj.weight`` directly, so swapping ``out_proj`` alone would be
  ignored, which is why PyTorch types it ``NonDynamicallyQuantizableLinear``). MHAs with
  ``kdim``/``vdim`` != ``embed_dim``, ``add_bias_kv`` / ``add_zero_attn``, or a subclass's
  own forward stay float (logged). ``prepare_dynamic_qat`` swaps the same MHAs for the QAT
  :class:`gpuquant.nn.qat.linear_dynamic.DynamicMultiheadAttention`, which
  ``quantize_dynamic`` converts with its projections' own mode and dtypes.
* HuggingFace ``Conv1D`` (GPT-2 style: a Linear with its weight stored transposed) is
  swapped too when ``torch.nn.Linear`` is requested (recognised by its ``nf`` / ``nx``
  attributes and weight shape; ``transformers`` is never imported).
* Not swapped: a lone ``NonDynamicallyQuantizableLinear`` outside an MHA; embeddings, norms,
  the attention matmuls themselves.
* Modules under a ``gpuquant.nn.Module`` with ``disable_quantize()`` stay float.

Every module is checked and converted before any is swapped in: an error (a NaN / Inf
weight, a Linear too wide for the int32 accumulator, each naming the module) leaves the model
as it was, ``inplace`` or not. ``torch.nn.TransformerEncoderLayer`` / ``TransformerEncoder``
holding converted modules are kept off torch's fused fast path
(:func:`~gpuquant.nn.quantized.linear_dynamic.keep_off_torch_fast_path`).
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Callable, Optional

import torch
from torch.nn.utils import parametrize

from ..dtypes import qint8, qint8_narrow
from ..functional.dynamic import ACT_DTYPES, WEIGHT_DTYPES, _check_dtype, max_in_features
from ..nn.attention import AttentionOverProjections
from ..nn.qat.linear_dynamic import DynamicConv1D as QATConv1D
from ..nn.qat.linear_dynamic import is_hf_conv1d as _is_hf_conv1d
from ..nn.qat.linear_dynamic import DynamicLinear as QATDynamicLinear
from ..nn.qat.linear_dynamic import DynamicMultiheadAttention as QATDynamicMHA
from ..nn.qat.linear_dynamic import weight_not_a_parameter
from .hooks import carry_hooks
from ..nn.quantized.linear_dynamic import (DynamicLinear, DynamicMultiheadAttention,
                                           WeightOnlyLinear, _Int8WeightLinear,
                                           keep_off_torch_fast_path)

__all__ = ["quantize_dynamic", "prepare_dynamic_qat"]

log = logging.getLogger("gpuquant.quantization")

_NDQ = torch.nn.modules.linear.NonDynamicallyQuantizableLinear


def _as_linear(conv1d) -> torch.nn.Linear:
    """The ``torch.nn.Linear`` computing what a HuggingFace ``Conv1D`` computes."""
    w = conv1d.weight
    lin = torch.nn.Linear(conv1d.nx, conv1d.nf, bias=conv1d.bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if conv1d.bias is not None:
        lin.bias = torch.nn.Parameter(conv1d.bias.detach().clone())
    return lin


def computes_linear(mod) -> bool:
    """Whether ``mod``'s forward is ``torch.nn.Linear``'s function: its own, or
    ``gpuquant.nn.Linear``'s without an activation."""
    from ..nn.linear import Linear as GnnLinear
    forward = type(mod).forward
    return forward is torch.nn.Linear.forward or (
        forward is GnnLinear.forward and getattr(mod, "activation", None) == "none")


def _custom_forward(mod) -> bool:
    """A Linear subclass with its own forward (a fused ReLU, say): swapping it for a plain
    quantized Linear would change what it computes, so it stays float (and is logged)."""
    from .smoothquant import SmoothedLinear  # (smoothquant imports this module)
    return not computes_linear(mod) and not isinstance(mod, (QATDynamicLinear, SmoothedLinear))


def check_model_args(model, filter_fn, inplace, fn: str) -> None:
    """The model, ``filter_fn`` and ``inplace`` (None: the entry point has none) of the
    Linear-converting entry points (this module's and :mod:`.smoothquant`'s)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if inplace is not None and not isinstance(inplace, bool):
        raise TypeError(f"{fn}: inplace must be a bool, got {type(inplace).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: filter_fn must be callable (module, name) -> bool or None, got "
                        f"{type(filter_fn).__name__}")


def _check_common(model, modules, filter_fn, inplace, fn: str):
    if inplace is None:  # (required here)
        raise TypeError(f"{fn}: inplace must be a bool, got NoneType")
    check_model_args(model, filter_fn, inplace, fn)
    if isinstance(modules, type):
        modules = (modules,)
    if not isinstance(modules, (tuple, list, set, frozenset)) or not modules:
        raise TypeError(f"{fn}: modules must be a non-empty tuple of module classes, got "
                        f"{modules!r}")
    allowed = (torch.nn.Linear, torch.nn.MultiheadAttention)
    for cls in modules:
        if not isinstance(cls, type) or not issubclass(cls, allowed):
            raise ValueError(f"{fn}: modules may name torch.nn.Linear (and subclasses) or "
                             f"torch.nn.MultiheadAttention only, got {cls!r}")
        if issubclass(cls, _NDQ):  # (it would select nothing: a lone one is never swapped)
            raise ValueError(f"{fn}: modules names {cls.__name__}, a MultiheadAttention's "
                             f"out_proj, which is quantized with its attention module only: "
                             f"name torch.nn.MultiheadAttention (or torch.nn.Linear) instead")
    return tuple(modules)


def _wanted(mod, name, modules, filter_fn) -> bool:
    if not isinstance(mod, modules):
        return False
    if filter_fn is None:
        return True
    keep = filter_fn(mod, name)
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.numel() == 1:
        keep = bool(keep)
    elif type(keep).__module__ == "numpy" and type(keep).__name__ in ("bool_", "bool"):
        keep = bool(keep)  # (NumPy's bool scalar)
    if not isinstance(keep, bool):
        raise TypeError(f"filter_fn must return a bool, returned "
                        f"{type(keep).__module__}.{type(keep).__name__} for {name!r}")
    return keep


def _mha_selected(mod, name: str, modules, filter_fn, fn: str) -> bool:
    """Whether ``quantize_dynamic`` / ``prepare_dynamic_qat`` (``fn``) convert the
    ``torch.nn.MultiheadAttention`` ``mod``: ``modules`` names ``torch.nn.Linear`` (its
    projections are Linears) or an MHA class it is, ``filter_fn`` keeps it, and the dynamic
    attention takes its configuration (else it stays float, logged)."""
    if not (torch.nn.Linear in modules or isinstance(mod, modules)):
        return False
    if filter_fn is not None and not _wanted(mod, name, (torch.nn.MultiheadAttention,),
                                             filter_fn):
        return False
    why = DynamicMultiheadAttention.supports(mod)
    if why is not None:
        log.warning("%s: %s (MultiheadAttention) stays float: %s", fn, name, why)
        return False
    return True


def _named(make, name: str, fn: str = "prepare_dynamic_qat"):
    """``make()``, its ValueError (the int32 bound, an empty Linear) naming the module."""
    try:
        return make()
    except ValueError as e:
        raise ValueError(f"{fn}: {name or 'model'}: {e}") from None


def _check_initialized(mod, name: str, fn: str) -> None:
    """Refuse a lazy Linear (``torch.nn.LazyLinear``) not yet run, naming the module."""
    if isinstance(mod._parameters.get("weight"), torch.nn.parameter.UninitializedParameter):
        raise ValueError(f"{fn}: {name or 'model'} ({type(mod).__name__}) is lazy and not yet "
                         f"initialized (in_features unknown); run one forward pass first")


def _check_finite_weights(mod, name: str, fn: str) -> None:
    """A float weight with NaN / Inf has no int8 value: refuse it, naming the module."""
    weights = ([mod.in_proj_weight, mod.out_proj.weight]
               if isinstance(mod, torch.nn.MultiheadAttention) else
               [mod.in_proj.weight, mod.out_proj.weight] if isinstance(mod, QATDynamicMHA)
               else [mod.weight])
    for w in weights:
        if not bool(torch.isfinite(w.detach()).all()):
            raise ValueError(f"{fn}: {name or 'model'} ({type(mod).__name__}): its weight holds "
                             f"NaN or Inf, which have no int8 value; fix the weights or exclude "
                             f"it with filter_fn")


def _walk(model, convert, modules, filter_fn, fn: str):
    """Decide on a child before descending into it; build every replacement first and swap
    them in only when all succeeded, so an error leaves ``model`` as it was. A module
    registered under several names (tied, or ``[layer] * n``) is converted once, at its
    first name, and that one replacement goes to every name (the tie is kept). A root
    marked ``disable_quantize()`` is left as it is, subtree included, as under a parent.
    A replacement takes the hooks of the module it replaces (:func:`~gpuquant.quantization.hooks.carry_hooks`)."""
    swaps = []
    done = {}  # id(child) -> its replacement, or None (kept, and descended into once)

    def replace(mod, name):
        new = convert(mod, name)
        if new is not None and new is not mod:
            carry_hooks(mod, new, name, fn)
        return new

    def visit(parent, prefix):
        for cname, child in list(parent._modules.items()):  # every name, aliases included
            if child is None:
                continue
            name = f"{prefix}.{cname}" if prefix else cname
            if id(child) in done:
                if done[id(child)] is not None:
                    swaps.append((parent, cname, done[id(child)]))
                continue
            if getattr(child, "quantize_disabled", False):
                continue
            new = done[id(child)] = replace(child, name)
            if new is not None:
                swaps.append((parent, cname, new))
            elif not isinstance(child, (_Int8WeightLinear, AttentionOverProjections)):
                visit(child, name)
    if getattr(model, "quantize_disabled", False):  # (as a child's flag, below)
        return model
    root = replace(model, "")
    if root is not None:
        return root
    visit(model, "")
    for parent, cname, new in swaps:
        setattr(parent, cname, new)
    if not swaps:
        done_before = sum(isinstance(m, (_Int8WeightLinear, DynamicMultiheadAttention))
                          for m in model.modules())
        if done_before:  # (a second call on the model a first one converted in place)
            warnings.warn(f"{fn}: nothing to swap: {done_before} module(s) of the model are "
                          f"int8 already (quantize_dynamic converts in place); to compare "
                          f"modes, start each from a copy of the float model "
                          f"(copy.deepcopy(model), or inplace=False)", stacklevel=3)
    return model


def quantize_dynamic(model: torch.nn.Module, dtype=qint8, modules=(torch.nn.Linear,),
                     inplace: bool = True, filter_fn: Optional[Callable] = None,
                     weight_only: bool = False, weight_dtype=qint8_narrow) -> torch.nn.Module:
    """Swap Linears for int8 dynamic (W8A8) or weight-only quantized Linears.

    Args:
        model: any ``torch.nn.Module`` (a bare Linear is converted and returned).
        dtype: activation dtype, ``gpuquant.qint8`` (default; ``torch.qint8`` is read as it)
            or ``qint8_narrow`` (or their names).
        modules: classes to swap: ``torch.nn.Linear`` (subclasses included) and/or
            ``torch.nn.MultiheadAttention``. With ``torch.nn.Linear`` the MHAs are converted
            too (their projections are Linears).
        inplace: modify ``model`` (default) or a deep copy.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; False keeps that module float.
        weight_only: int8 weights with float activations instead of W8A8.
        weight_dtype: ``gpuquant.qint8_narrow`` (default) or ``qint8``.

    Returns:
        The converted model (in eval mode for the swapped modules).

    Raises:
        TypeError: model is not a Module; filter_fn not callable or not returning a bool.
        ValueError: ``modules`` names a non-Linear class or MHA's out_proj type
            (``NonDynamicallyQuantizableLinear``); an unsupported dtype; a Linear whose
            ``in_features`` could overflow the int32 accumulator, or a weight holding NaN or
            Inf (the message names the module; nothing is swapped).

    Example:
        >>> qmodel = quantize_dynamic(model.eval(), filter_fn=lambda m, n: "lm_head" not in n)
    """
    fn = "quantize_dynamic"
    modules = _check_common(model, modules, filter_fn, inplace, fn)
    ad = _check_dtype(dtype, ACT_DTYPES, f"{fn}: dtype")
    wd = _check_dtype(weight_dtype, WEIGHT_DTYPES, f"{fn}: weight_dtype")
    if not isinstance(weight_only, bool):
        raise TypeError(f"{fn}: weight_only must be a bool, got {type(weight_only).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    # torch.nn.Linear itself named: MHA projections and HF Conv1D (Linears in all but name)
    # are wanted too; a subclass named alone selects that subclass only
    linear_wanted = torch.nn.Linear in modules
    k_max = max_in_features(ad, wd)

    def convert(mod, name):
        if linear_wanted and (isinstance(mod, QATConv1D) or _is_hf_conv1d(mod)):
            if filter_fn is not None and not _wanted(mod, name, (torch.nn.Module,), filter_fn):
                return None
            if not isinstance(mod, QATConv1D):
                return linear(_as_linear(mod), name)
            _check_finite_weights(mod, name, fn)  # (prepare_dynamic_qat's: its own dtypes)
            lin = _as_linear(mod)
            if mod.weight_only:
                return WeightOnlyLinear.from_float_module(lin, mod.weight_dtype)
            return DynamicLinear.from_float_module(lin, mod.act_dtype, mod.weight_dtype)
        if isinstance(mod, QATDynamicMHA):  # (prepare_dynamic_qat's: its own mode, dtypes)
            if not (linear_wanted or torch.nn.MultiheadAttention in modules):
                return None
            if filter_fn is not None and not _wanted(mod, name, (QATDynamicMHA,), filter_fn):
                return None
            _check_finite_weights(mod, name, fn)
            return DynamicMultiheadAttention.from_qat_module(mod)
        if isinstance(mod, torch.nn.MultiheadAttention):
            if not _mha_selected(mod, name, modules, filter_fn, fn):
                return None
            if not weight_only and mod.embed_dim > k_max:
                raise ValueError(f"{fn}: {name}: embed_dim={mod.embed_dim} could overflow the "
                                 f"int32 accumulator; at most {k_max} fits")
            _check_finite_weights(mod, name, fn)
            return DynamicMultiheadAttention.from_float_module(mod, ad, wd, weight_only)
        if isinstance(mod, _NDQ) or not _wanted(mod, name, modules, filter_fn):
            return None
        if _custom_forward(mod):
            log.warning("quantize_dynamic: %s (%s) stays float: its forward is not "
                        "torch.nn.Linear's", name, type(mod).__name__)
            return None
        if isinstance(mod, QATDynamicLinear):
            _check_finite_weights(mod, name, fn)
            cls = WeightOnlyLinear if mod.weight_only else DynamicLinear
            return cls.from_qat_module(mod)
        return linear(mod, name)

    def linear(mod, name):
        _check_initialized(mod, name, fn)
        if not weight_only and mod.in_features > k_max:
            raise ValueError(f"{fn}: {name or 'model'}: in_features={mod.in_features} could "
                             f"overflow the int32 accumulator ({ad.name} x {wd.name}); at most "
                             f"{k_max} fits (exclude it with filter_fn, or use weight_only=True)")
        _check_finite_weights(mod, name, fn)
        if weight_only:
            return _named(lambda: WeightOnlyLinear.from_float_module(mod, wd), name, fn)
        return _named(lambda: DynamicLinear.from_float_module(mod, ad, wd), name, fn)

    return keep_off_torch_fast_path(_walk(model, convert, modules, filter_fn, fn))


def prepare_dynamic_qat(model: torch.nn.Module, dtype=qint8, modules=(torch.nn.Linear,),
                        inplace: bool = True, filter_fn: Optional[Callable] = None,
                        weight_only: bool = False,
                        weight_dtype=qint8_narrow) -> torch.nn.Module:
    """Swap Linears for :class:`gpuquant.nn.qat.linear_dynamic.DynamicLinear` (per-token
    activation fake-quant + per-channel weight fake-quant, STE) to fine-tune a model for the
    mode :func:`quantize_dynamic` serves; the swapped modules share the original parameters.
    ``quantize_dynamic`` on the result converts them. ``torch.nn.MultiheadAttention`` modules
    that ``quantize_dynamic`` would convert become the QAT
    :class:`gpuquant.nn.qat.linear_dynamic.DynamicMultiheadAttention` (fake-quantized packed
    in-projection and out-projection, sharing the MHA's parameters), and HuggingFace
    ``Conv1D`` layers (GPT-2) :class:`gpuquant.nn.qat.linear_dynamic.DynamicConv1D`.
    Arguments as :func:`quantize_dynamic` (parametrized Linears, e.g. ``weight_norm``, and
    pruned ones (``torch.nn.utils.prune``), whose weight is no parameter to share, are left
    as they are, logged).

    Raises:
        TypeError, ValueError: as :func:`quantize_dynamic`.
    """
    fn = "prepare_dynamic_qat"
    modules = _check_common(model, modules, filter_fn, inplace, fn)
    ad = _check_dtype(dtype, ACT_DTYPES, f"{fn}: dtype")
    wd = _check_dtype(weight_dtype, WEIGHT_DTYPES, f"{fn}: weight_dtype")
    if not inplace:
        model = copy.deepcopy(model)

    def convert(mod, name):
        if torch.nn.Linear in modules and _is_hf_conv1d(mod):  # (as quantize_dynamic)
            if filter_fn is not None and not _wanted(mod, name, (torch.nn.Module,), filter_fn):
                return None
            return _named(lambda: QATConv1D.from_float_module(mod, ad, wd, weight_only), name)
        if isinstance(mod, torch.nn.MultiheadAttention):
            if not _mha_selected(mod, name, modules, filter_fn, fn):
                return None
            return _named(lambda: QATDynamicMHA.from_float_module(mod, ad, wd, weight_only),
                          name)
        if isinstance(mod, (_NDQ, QATDynamicLinear)) or not _wanted(mod, name, modules, filter_fn):
            return None
        if _custom_forward(mod):
            log.warning("prepare_dynamic_qat: %s (%s) stays float: its forward is not "
                        "torch.nn.Linear's", name, type(mod).__name__)
            return None
        if parametrize.is_parametrized(mod):
            log.warning("prepare_dynamic_qat: %s (%s) stays float: its weight is computed by "
                        "a torch.nn.utils.parametrize parametrization, not a parameter the "
                        "QAT Linear could share", name, type(mod).__name__)
            return None
        _check_initialized(mod, name, fn)
        if weight_not_a_parameter(mod) is not None:
            log.warning("prepare_dynamic_qat: %s (%s) stays float: its weight is computed at "
                        "each forward (torch.nn.utils.prune?), not a parameter the QAT Linear "
                        "could share", name, type(mod).__name__)
            return None
        return _named(lambda: QATDynamicLinear.from_float_module(mod, ad, wd, weight_only), name)

    return keep_off_torch_fast_path(_walk(model, convert, modules, filter_fn, fn))
