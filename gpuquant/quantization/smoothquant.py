"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then quantize
activations with one static scale per tensor.

For a Linear ``y = x W^T`` and a per-input-channel factor ``s``,
``y = (x / s) (W * s)^T`` is the same function; with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (clamped to [1e-5, 1e5]; 1 where a
                                                          channel is all zero)

(``max|X_j|`` over calibration data, ``max|W_j|`` over the output rows of every Linear that
reads the same input) the outlier channels of ``x`` shrink and ``W``'s columns grow, so both
quantize well with per-tensor activation / per-channel weight scales. ``alpha`` (default
0.5) sets how much moves; larger moves more.

The ``1 / s`` is folded into the LayerNorm / RMSNorm that feeds the Linears when ``fold``
names it (free at run time, the usual transformer case); otherwise the Linear becomes a
:class:`SmoothedLinear` that multiplies its input by ``1 / s`` (the quantized modules apply it
before quantizing).

Flow::

    absmax = calibrate_linear_inputs(model, calib_batches)
    smooth_quant(model, absmax, alpha=0.5, fold={"ln1": ["q", "k", "v"]})
    absmax = calibrate_linear_inputs(model, calib_batches)        # after smoothing
    quantize_static_linear(model, absmax)                         # StaticActLinear everywhere
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .._checks import unit_interval
from .._tensors import keep_dtype_of
from ..dtypes import qint8, qint8_narrow
from ..functional.dynamic import ACT_DTYPES, WEIGHT_DTYPES, _check_dtype, max_in_features
from ..nn.quantized.linear_dynamic import StaticActLinear, keep_off_torch_fast_path
from .dynamic import _wanted, check_model_args, computes_linear

__all__ = ["SmoothedLinear", "calibrate_linear_inputs", "smoothing_factors", "smooth_quant",
           "quantize_static_linear"]

_NDQ = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
_S_MIN, _S_MAX = 1e-5, 1e5


class SmoothedLinear(torch.nn.Linear):
    """``torch.nn.Linear`` whose input is first multiplied per channel by ``input_smoothing``
    (float32 buffer (in_features,), SmoothQuant's ``1 / s``; the weight holds ``W * s``).
    The factors stay float32 under ``model.half()`` / ``.to(torch.bfloat16)`` (up to 1e5:
    past float16's range), as the weight and bias follow the cast."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("input_smoothing", torch.ones(in_features, device=device))

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_dtype_of(fn, [self.input_smoothing]), recurse)

    def forward(self, x):
        xs = (x.to(torch.float32) * self.input_smoothing).to(x.dtype)
        return F.linear(xs, self.weight, self.bias)


def _linears(model, filter_fn=None):
    """Linears computing ``torch.nn.Linear``'s forward (or SmoothedLinear's): subclasses with
    their own forward (fused activations) are left alone. A Linear registered under several
    names comes once, at its first (:func:`_set` swaps every name)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not isinstance(m, _NDQ) and (
                computes_linear(m) or type(m).forward is SmoothedLinear.forward):
            if _wanted(m, name, torch.nn.Linear, filter_fn):
                yield name, m


def calibrate_linear_inputs(model: torch.nn.Module, data, filter_fn: Optional[Callable] = None
                            ) -> Dict[str, torch.Tensor]:
    """Per-input-channel ``max|x_j|`` of every Linear's input over calibration data.

    Args:
        model: the float model (run under ``torch.no_grad``, in its current mode).
        data: an iterable of inputs (a tensor, or a tuple of positional arguments), or a
            callable ``data(model)`` that runs the forward passes itself. Batches with no
            tokens (a Linear input of zero rows) add nothing.
        filter_fn: ``(module, name) -> bool``, which Linears to record.

    Returns:
        ``{qualified_name: float32 tensor (in_features,)}``.

    Raises:
        TypeError: model not a Module, data neither iterable nor callable, a batch that is
            a NumPy array, filter_fn not callable or not returning a bool.
        ValueError: the data produced NaN / Inf activations, or reached no Linear with at
            least one token.
    """
    check_model_args(model, filter_fn, None, "calibrate_linear_inputs")
    stats: Dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibrate_linear_inputs: {name!r} was called without its "
                                f"input tensor (positional or input=...), got "
                                f"{type(x).__name__}")
            x = x.detach()
            if x.numel() == 0:  # no tokens: nothing to record
                return
            a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"calibrate_linear_inputs: the input of {name!r} holds NaN or Inf")
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        return hook

    for name, m in _linears(model, filter_fn):
        hooks.append(m.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        with torch.no_grad():
            if callable(data):
                data(model)
            else:
                try:
                    it = iter(data)
                except TypeError:
                    raise TypeError(f"data must be an iterable of inputs or a callable, got "
                                    f"{type(data).__name__}") from None
                for i, batch in enumerate(it):
                    if type(batch).__module__ == "numpy":  # (a model taking one input of
                        # another kind, a dict say, gets it as it is)
                        raise TypeError(
                            f"calibrate_linear_inputs: batch {i} of data is a "
                            f"numpy.{type(batch).__name__}; each batch must be a tensor or a "
                            f"tuple of the model's positional arguments (convert with "
                            f"torch.from_numpy)")
                    model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    if not stats:
        raise ValueError("calibrate_linear_inputs: no Linear ran on the calibration data "
                         "(or every batch it saw had zero tokens)")
    return stats


def _check_absmax(a, what: str, in_features: Optional[int] = None) -> torch.Tensor:
    """``a``, checked: a 1-D float tensor (of ``in_features`` values when given), finite and
    >= 0 (a max |x| per input channel, as :func:`calibrate_linear_inputs` records it)."""
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise TypeError(f"{what} must be a float tensor (one max |x| per input channel, from "
                        f"calibrate_linear_inputs), got {getattr(a, 'dtype', type(a).__name__)}")
    want = "(K,)" if in_features is None else f"({in_features},)"
    if a.dim() != 1 or a.numel() == 0 or (in_features is not None and a.numel() != in_features):
        raise ValueError(f"{what} must have shape {want} (one value per input channel of the "
                         f"Linear), got shape {tuple(a.shape)}")
    bad = ~torch.isfinite(a.detach()) | (a.detach() < 0)
    if bool(bad.any()):
        raise ValueError(f"{what} must be finite and >= 0 (a max |x| per input channel), got "
                         f"{a.detach()[bad][:4].tolist()} at {int(bad.sum())} channel(s)")
    return a


def _absmax_of(act_absmax, name: str, lin, fn: str) -> torch.Tensor:
    """``act_absmax[name]``, checked against the Linear ``lin`` it was recorded for."""
    return _check_absmax(act_absmax[name], f"{fn}: act_absmax[{name!r}]", lin.in_features)


def _weight_input_absmax(act_absmax, name: str, lin, fn: str) -> torch.Tensor:
    """float32 ``max|x_j|`` of what ``lin``'s weight multiplies: ``act_absmax[name]`` (checked),
    times a SmoothedLinear's own ``|input_smoothing|`` (calibration records the input
    before the Linear's forward, so before that multiply)."""
    a = _absmax_of(act_absmax, name, lin, fn).to(torch.float32)
    smooth = getattr(lin, "input_smoothing", None)
    if smooth is not None:
        a = a * smooth.detach().abs().to(a.device)
    return a


def _check_absmax_dict(act_absmax, fn: str, model: torch.nn.Module) -> None:
    """A dict whose every key names a Linear of ``model`` (a misspelt name left that Linear
    unsmoothed or float, silently)."""
    if not isinstance(act_absmax, Mapping):
        raise TypeError(f"{fn}: act_absmax must be a dict {{linear name: tensor}} (from "
                        f"calibrate_linear_inputs), got {type(act_absmax).__name__}")
    known = {n for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, torch.nn.Linear)}
    unknown = [k for k in act_absmax if k not in known]
    if unknown:
        some = sorted(known)[:6]
        raise ValueError(f"{fn}: act_absmax names {unknown[:4]!r}, which "
                         f"{'is' if len(unknown) == 1 else 'are'} not a Linear of the model; "
                         f"its Linears: {some}{' ...' if len(known) > len(some) else ''} "
                         f"({len(known)} in all)")


def smoothing_factors(act_absmax: torch.Tensor, weights: Iterable[torch.Tensor],
                      alpha: float = 0.5) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (float32, (K,)) for Linears sharing an input.

    Raises:
        TypeError: act_absmax not a float tensor; alpha not a real number.
        ValueError: alpha outside [0, 1]; act_absmax not 1-D, negative or not finite; shapes
            that do not match.
    """
    alpha = unit_interval(alpha, "alpha", "smoothing_factors")
    ax = _check_absmax(act_absmax, "smoothing_factors: act_absmax").detach().to(torch.float32)
    wmax = None
    for w in weights:
        if w.shape[-1] != ax.shape[0]:
            raise ValueError(f"weight with {w.shape[-1]} input channels does not match "
                             f"{ax.shape[0]} activation channels")
        c = w.detach().to(torch.float32).abs().amax(dim=0).to(ax.device)
        wmax = c if wmax is None else torch.maximum(wmax, c)
    if wmax is None:
        raise ValueError("smoothing_factors needs at least one weight")
    s = ax.pow(alpha) / wmax.pow(1.0 - alpha)
    ok = (ax > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(_S_MIN, _S_MAX)


def _get(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"smooth_quant: no module named {name!r} in the model") from None


def _held_elsewhere(model, param, owner) -> bool:
    """Whether a module of ``model`` other than ``owner`` holds the Parameter ``param``."""
    return any(m is not owner and any(p is param for p in m._parameters.values())
               for m in model.modules())


def _set(model, name, new):
    """Put ``new`` in place of the module at ``name``, under every name that module has (a
    tied or repeated Linear stays one module)."""
    old = model.get_submodule(name)
    for m in list(model.modules()):
        for child_name, child in list(m._modules.items()):
            if child is old:
                setattr(m, child_name, new)


def smooth_quant(model: torch.nn.Module, act_absmax: Dict[str, torch.Tensor], alpha: float = 0.5,
                 fold: Optional[Dict[str, List[str]]] = None,
                 filter_fn: Optional[Callable] = None, inplace: bool = True) -> torch.nn.Module:
    """Apply SmoothQuant to the Linears recorded in ``act_absmax``.

    Args:
        model: the float model.
        act_absmax: from :func:`calibrate_linear_inputs`. For a Linear smoothed before
            (a :class:`SmoothedLinear`, recorded before its own input multiply) the factors
            are those of the input times that multiply, what its weight sees.
        alpha: migration strength in [0, 1] (0.5 is the paper's default; 0.75-0.85 for models
            with very large outliers).
        fold: ``{norm_name: [linear_name, ...]}``: Linears fed (only) by that LayerNorm /
            RMSNorm share one factor, folded into the norm's weight (and bias). Linears not
            named here become :class:`SmoothedLinear`. A folded Linear whose weight is tied
            to another module (an LM head to its embedding) takes its own scaled copy; the
            other module keeps its values.
        filter_fn: ``(module, name) -> bool``; False leaves that Linear alone. The Linears of
            one ``fold`` group share their norm's output, so it must answer False for all of
            them (the group, norm included, is left alone) or for none.
        inplace: modify ``model`` (default) or a deep copy.

    Returns:
        The smoothed model (same float function up to rounding).

    Raises:
        ValueError: alpha out of range; unknown names (in act_absmax: not a Linear of the
            model); a fold target that is not a norm with
            a weight; a fold group listing no Linear, or one that ``filter_fn`` excludes only
            in part (the message names the Linears and the norm); a fold group whose
            norm or Linears are parametrized (``torch.nn.utils.parametrize``); a Linear without
            calibration data; calibration data of the wrong shape (not ``(in_features,)``),
            negative or not finite. Every check is made before the model is changed.
        TypeError: model not a Module; act_absmax not a dict of float tensors; fold not a
            dict; filter_fn not callable or not returning a bool; inplace not a bool.
    """
    check_model_args(model, filter_fn, inplace, "smooth_quant")
    _check_absmax_dict(act_absmax, "smooth_quant", model)
    if fold is not None and not isinstance(fold, Mapping):
        raise TypeError(f"smooth_quant: fold must be a dict {{norm_name: [linear_name, ...]}} "
                        f"or None, got {type(fold).__name__}")
    alpha = unit_interval(alpha, "alpha", "smooth_quant")
    for name, lin in _linears(model, filter_fn):  # every entry checked before any change
        if name in act_absmax:
            _absmax_of(act_absmax, name, lin, "smooth_quant")
    fold = dict(fold or {})
    seen: Dict[str, str] = {}
    groups = []  # (norm name, Linear names) to fold, every one checked before any change
    for norm_name, lin_names in fold.items():  # a Linear has one input: one factor, one fold
        if isinstance(lin_names, str):
            raise TypeError(f"smooth_quant: fold[{norm_name!r}] must be a list of Linear "
                            f"names, got the string {lin_names!r}")
        lin_names = list(lin_names)
        if not lin_names:
            raise ValueError(f"smooth_quant: fold[{norm_name!r}] lists no Linear")
        for n in lin_names:
            if n in seen:
                raise ValueError(f"smooth_quant: Linear {n!r} is listed twice in fold (under "
                                 f"{seen[n]!r} and {norm_name!r}); its weight would be scaled "
                                 f"twice")
            seen[n] = norm_name
        norm = _get(model, norm_name)
        if getattr(norm, "weight", None) is None or not isinstance(
                norm, (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm))):
            raise ValueError(f"smooth_quant: fold target {norm_name!r} must be a LayerNorm or "
                             f"RMSNorm with an affine weight, got {type(norm).__name__}")
        lins = [_get(model, n) for n in lin_names]
        for n, lin in zip(lin_names, lins):
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"smooth_quant: {n!r} is not a Linear ({type(lin).__name__})")
        kept = [n for n, lin in zip(lin_names, lins) if _wanted(lin, n, torch.nn.Linear,
                                                                 filter_fn)]
        if not kept:  # filter_fn leaves the whole group alone
            continue
        if len(kept) != len(lin_names):
            left = [n for n in lin_names if n not in kept]
            raise ValueError(f"smooth_quant: filter_fn excludes {left} but keeps {kept} of the "
                             f"Linears fed by {norm_name!r} (fold[{norm_name!r}]): their one "
                             f"factor is folded into that norm, so every one of them is "
                             f"rescaled; exclude all of them (the group is left alone) or none")
        for n, lin in zip(lin_names, lins):
            if n not in act_absmax:
                raise ValueError(f"smooth_quant: no calibration data for {n!r}")
            _absmax_of(act_absmax, n, lin, "smooth_quant")
        for n, mod in [(norm_name, norm)] + list(zip(lin_names, lins)):
            if parametrize.is_parametrized(mod):  # (its weight: a new tensor each read)
                raise ValueError(f"smooth_quant: {n!r} ({type(mod).__name__}) in "
                                 f"fold[{norm_name!r}] has its tensors computed by a "
                                 f"torch.nn.utils.parametrize parametrization, so the factor "
                                 f"cannot be folded into them; remove it first "
                                 f"(parametrize.remove_parametrizations) or leave the group "
                                 f"out of fold")
        groups.append((norm_name, lin_names))
    if not inplace:
        model = copy.deepcopy(model)
    done = set()
    with torch.no_grad():
        for norm_name, lin_names in groups:
            norm = model.get_submodule(norm_name)
            lins = [model.get_submodule(n) for n in lin_names]
            ax = torch.stack([_weight_input_absmax(act_absmax, n, lin, "smooth_quant")
                              for n, lin in zip(lin_names, lins)]).amax(dim=0)
            s = smoothing_factors(ax, [lin.weight for lin in lins], alpha).to(norm.weight.device)
            # products in float32, then cast: s may pass fp16's range (up to 1e5)
            norm.weight.copy_((norm.weight.float() / s.float()).to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_((norm.bias.float() / s.float()).to(norm.bias.dtype))
            for lin in {id(lin): lin for lin in lins}.values():  # (one module, two names: once)
                w = (lin.weight.float() * s.float()).to(lin.weight.dtype)
                if _held_elsewhere(model, lin.weight, lin):
                    # tied (an LM head to its embedding): scaling it in place would rescale
                    # the other holder's values too; the Linear takes its own scaled copy
                    lin.weight = torch.nn.Parameter(w, requires_grad=lin.weight.requires_grad)
                else:
                    lin.weight.copy_(w)
            done.update(lin_names)
        for name, lin in list(_linears(model, filter_fn)):
            if name in done or name not in act_absmax:
                continue
            a = _weight_input_absmax(act_absmax, name, lin, "smooth_quant")
            s = smoothing_factors(a, [lin.weight], alpha).to(lin.weight.device)
            new = SmoothedLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                 device=lin.weight.device, dtype=lin.weight.dtype)
            new.weight.copy_((lin.weight.float() * s.float()).to(lin.weight.dtype))
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
            prev = getattr(lin, "input_smoothing", None)
            inv = 1.0 / s
            new.input_smoothing.copy_(inv if prev is None else prev * inv)
            new.train(lin.training)
            _set(model, name, new)
    return keep_off_torch_fast_path(model)  # the fused path would skip the 1/s multiply


def quantize_static_linear(model: torch.nn.Module, act_absmax: Dict[str, torch.Tensor],
                           dtype=qint8, filter_fn: Optional[Callable] = None,
                           inplace: bool = True, weight_dtype=qint8_narrow) -> torch.nn.Module:
    """Swap the calibrated Linears for :class:`~gpuquant.nn.quantized.linear_dynamic.
    StaticActLinear` (one activation scale per tensor: ``max(act_absmax) / 127``).

    Every Linear is converted before any is swapped in (an error leaves the model as it
    was); Transformer layers holding them are kept off torch's fused fast path
    (:func:`~gpuquant.nn.quantized.linear_dynamic.keep_off_torch_fast_path`).

    Raises:
        TypeError: model not a Module; act_absmax not a dict of float tensors; filter_fn not
            callable or not returning a bool; inplace not a bool.
        ValueError: unsupported dtype; in_features that could overflow int32; a name in
            act_absmax that is no Linear of the model; calibration data of the wrong shape
            (not ``(in_features,)``), negative or not finite.
    """
    check_model_args(model, filter_fn, inplace, "quantize_static_linear")
    _check_absmax_dict(act_absmax, "quantize_static_linear", model)
    ad = _check_dtype(dtype, ACT_DTYPES, "quantize_static_linear: dtype")
    wd = _check_dtype(weight_dtype, WEIGHT_DTYPES, "quantize_static_linear: weight_dtype")
    if not inplace:
        model = copy.deepcopy(model)
    k_max = max_in_features(ad, wd)
    swaps = []
    for name, lin in list(_linears(model, filter_fn)):
        if name not in act_absmax:
            continue
        if lin.in_features > k_max:
            raise ValueError(f"{name}: in_features={lin.in_features} could overflow the int32 "
                             f"accumulator; at most {k_max} fits")
        a = _weight_input_absmax(act_absmax, name, lin, "quantize_static_linear")
        q = StaticActLinear.from_float_module(lin, a.max(), ad, wd)
        if not name:
            return q
        swaps.append((name, q))
    for name, q in swaps:
        _set(model, name, q)
    return keep_off_torch_fast_path(model)
