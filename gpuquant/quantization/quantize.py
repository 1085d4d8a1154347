"""Float -> QAT -> quantized conversion (MegEngine's ``quantize_qat`` / ``quantize``).

The conversion maps are derived from the class names: every name exported by
:mod:`gpuquant.nn.qat` that :mod:`gpuquant.nn` also exports maps the float class to the
QAT class, and likewise QAT -> :mod:`gpuquant.nn.quantized`.

Typical flows::

    # QAT
    model = quantize_qat(FloatNet(), ema_fakequant_qconfig)
    ...train...
    qmodel = quantize(model)                       # int8, inference only

    # post-training calibration
    model = quantize_qat(FloatNet().eval(), calibration_qconfig)
    with torch.no_grad():
        for x in calibration_batches: model(x)
    qmodel = quantize(model)
"""
from __future__ import annotations

import copy
import functools
from typing import Dict, Optional

import torch

from .. import nn as Float
from ..nn import qat as QAT
from ..nn import quantized as Quantized
from ..nn.module import Module
from ..nn.qat.module import QATModule, keep_producer_hook
from ..nn.quantized.module import QuantizedModule
from ..nn.quantized.stubs import DequantStub as QDequantStub
from .fake_quant import FakeQuantBase, _LearnedBase
from .hooks import carry_hooks
from .fx import (_PASS_MODULES, delete_unused_paths, is_eval_identity, needs_dropin,
                 prepare_plain)
from .observer import HistogramObserver, Observer, _RangeObserver
from .._checks import check_bool as _check_bool
from .qconfig import QConfig, ema_fakequant_qconfig

__all__ = ["quantize_qat", "quantize", "enable_fake_quant", "disable_fake_quant",
           "enable_observer", "disable_observer", "freeze_bn_stats", "set_bn_fold",
           "propagate_qconfig", "reset_qconfig",
           "get_qat_mapping", "get_quantized_mapping"]


def _derive(src_ns, dst_ns) -> Dict[type, type]:
    names = [n for n in dst_ns.__all__ if n in src_ns.__all__ and n != "Module"]
    return {getattr(src_ns, n): getattr(dst_ns, n) for n in names
            if isinstance(getattr(src_ns, n), type)}


_QAT_MAP = _derive(Float, QAT)
_QUANTIZED_MAP = _derive(QAT, Quantized)
_FLOAT_MAP = {q: f for f, q in _QAT_MAP.items()}  # QAT class -> its float class


def get_qat_mapping() -> Dict[type, type]:
    """float class -> QAT class (a copy; extend it and pass it as ``mapping``)."""
    return dict(_QAT_MAP)


def get_quantized_mapping() -> Dict[type, type]:
    """QAT class -> quantized class (a copy)."""
    return dict(_QUANTIZED_MAP)


def _check_mapping(mapping, default, method: str, arg: str) -> Dict[type, type]:
    if mapping is None:
        return default
    if not isinstance(mapping, dict):
        raise TypeError(f"{arg}: mapping must be a dict class -> class, got "
                        f"{type(mapping).__name__}")
    for k, v in mapping.items():
        if not isinstance(k, type) or not isinstance(v, type):
            raise TypeError(f"{arg}: mapping entries must be classes, got {k!r}: {v!r}")
        if not callable(getattr(v, method, None)):
            raise TypeError(f"{arg}: mapping maps {k.__name__} to {v.__name__}, which has no "
                            f"{method}(); supported targets: "
                            f"{sorted(c.__name__ for c in default.values())}")
    return mapping


def _check_module(module, fn: str) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {type(module).__name__}")


def _disabled(m) -> bool:
    return isinstance(m, Module) and m.quantize_disabled


def _where(name: str, m) -> str:
    return f"module {name or '<root>'!r} ({type(m).__name__})"


def _named(msg: str, name: str, m) -> str:
    """``msg`` prefixed with the module's name and class (:func:`_where`) unless it names the
    module already (its name; for the root, its class)."""
    if (repr(name) in msg) if name else (type(m).__name__ in msg):
        return msg
    return f"{_where(name, m)}: {msg}"


def _convert_children(m, name: str, convert, swaps: list):
    """``convert(child, qualified name)`` of each child of ``m`` (once for a module under two
    names of ``m``: one converted module for both); ``(m, child name, new child)`` appended
    to ``swaps`` where it returns another module. Returns ``m``."""
    done = {}
    for child_name, child in list(m._modules.items()):  # (named_children skips aliases)
        if child is None:
            continue
        if id(child) not in done:
            done[id(child)] = convert(child, f"{name}.{child_name}" if name else child_name)
        new = done[id(child)]
        if new is not child:
            swaps.append((m, child_name, new))
    return m


def _operand_qconfig(m, qc: QConfig) -> QConfig:
    """``qc`` as module ``m`` takes it: :func:`_as_weight_operand`'s for a QuantStub the
    drop-in trace put on a learned parameter (marked ``_param_operand``), else ``qc``."""
    return _as_weight_operand(qc) if m.__dict__.get("_param_operand") else qc


def _as_weight_operand(qc: QConfig) -> QConfig:
    """The qconfig of a QuantStub the drop-in trace put on a learned parameter used as an
    operand (a layer scale, ``x * self.gamma``): quantized as the weights are, per tensor
    (the qconfig's weight observer and fake quant with ``axis=None``: for the defaults a
    running min / max, symmetric ``qint8_narrow``, scale amax / 127). The activations'
    moving-average qint8 (amax / 127.5) mapped the largest magnitude to 127.5, rounded to
    128 and clamped, and a parameter that grew outran the moving average: either way the
    straight-through gradient was 0 there, step after step (a constant-initialised layer
    scale never trained). A qconfig without weight quantizers is kept as it is."""
    if qc.weight_observer is None and qc.weight_fake_quant is None:
        return qc

    def per_tensor(factory):
        if factory is None:
            return None
        axis = getattr(factory(), "axis", None)
        return functools.partial(factory, axis=None) if axis is not None else factory

    return qc._replace(act_observer=per_tensor(qc.weight_observer),
                       act_fake_quant=per_tensor(qc.weight_fake_quant))


def _refuse_parametrized(fn: str, name: str, m) -> None:
    """A module with a ``torch.nn.utils.parametrize`` parametrization (weight_norm,
    spectral_norm, orthogonal: its class is a generated ``Parametrized...`` subclass) has
    no mapping entry: say so, and how to go on, rather than 'pass mapping=...'."""
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(m):
        names = sorted(m.parametrizations.keys())
        raise TypeError(f"{fn}: module {name or '<root>'!r} ({type(m).__name__}) has "
                        f"parametrized {names} (torch.nn.utils.parametrize: weight_norm, "
                        f"spectral_norm, ...), which its QAT / int8 version cannot carry: "
                        f"call torch.nn.utils.parametrize.remove_parametrizations(module, "
                        f"{names[0]!r}) first, or keep it float with disable_quantize() "
                        f"(a parametrized inner conv of a fused ConvBn2d is supported)")


def _qconfig_of(m, name: str, inherited: QConfig) -> QConfig:
    """``m``'s own ``qconfig`` attribute (any torch.nn.Module may carry one), else
    ``inherited``."""
    qc = getattr(m, "qconfig", None)
    if qc is None:
        return inherited
    if not isinstance(qc, QConfig):
        raise TypeError(f"quantize_qat: {_where(name, m)} has a qconfig attribute of type "
                        f"{type(qc).__name__}; it must be a gpuquant.quantization.QConfig "
                        f"or None")
    return qc


def quantize_qat(module: torch.nn.Module, qconfig: QConfig = ema_fakequant_qconfig,
                 mapping: Optional[dict] = None, inplace: bool = True,
                 example_inputs=None) -> torch.nn.Module:
    """Replace every quantizable float module (``gpuquant.nn``) by its QAT version and give
    it observers and fake quants from ``qconfig``.

    A module whose ``qconfig`` attribute is set (a ``gpuquant.nn`` module or any
    ``torch.nn.Module`` container, e.g. a ``torch.nn.Sequential``) uses that one for itself
    and the modules under it; ``disable_quantize()`` keeps a module (and its subtree) float.

    QAT modules already in the model are kept (converting twice is a no-op) when their
    qconfig is the one they would get; to change the quantizers of a QAT model use
    :func:`propagate_qconfig` (fresh observers) or :func:`reset_qconfig` (carries the
    qparams over). QAT modules built directly, without a qconfig, get theirs here.

    Args:
        module: the float model (or a single gpuquant.nn module).
        qconfig: a :class:`QConfig`; ``calibration_qconfig`` for post-training calibration.
        mapping: float class -> QAT class (default: derived from the class names).
        inplace: convert ``module`` itself (True) or a deep copy.
        example_inputs: for a plain ``torch.nn`` model (one holding ``torch.nn.Conv2d`` /
            ``Linear`` layers that are not gpuquant modules, see
            :func:`gpuquant.quantization.fx.needs_dropin`): the positional inputs of one
            forward pass, run in eval mode to learn value kinds (optional, recommended). Such
            a model is traced, fused and stubbed first (:mod:`gpuquant.quantization.fx`) and
            returned as a ``torch.fx.GraphModule``. Ignored for models built from
            ``gpuquant.nn``.

    Returns:
        The QAT model (use the return value: a module passed alone is replaced, not changed).

    Raises:
        TypeError: not a module, a bad qconfig, mapping or inplace, a ``qconfig`` attribute
            that is not a QConfig, or a gpuquant float module whose class has no QAT version
            in the mapping (named in the message).
        ValueError: a QAT module already in the model has another qconfig than the one it
            would get (named in the message).

    Example:
        >>> qat_model = quantize_qat(gpuquant.models.resnet18(), ema_fakequant_qconfig)
    """
    _check_module(module, "quantize_qat")
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"quantize_qat: qconfig must be a gpuquant.quantization.QConfig, got "
                        f"{type(qconfig).__name__}")
    mapping = _check_mapping(mapping, _QAT_MAP, "from_float_module", "quantize_qat")
    _check_bool(inplace, "quantize_qat", "inplace")
    if not inplace:
        module = copy.deepcopy(module)
    if needs_dropin(module):  # plain torch.nn model: trace, fuse into gpuquant.nn, add stubs
        module = prepare_plain(module, example_inputs)

    # the whole tree is checked before the model is changed: (parent, child name, new child)
    # and (QAT module built directly, its qconfig); and the torch.nn pass-through modules
    # (Dropout, Flatten, ...) whose output keeps its input's producer
    swaps, unready, passes = [], [], []

    def convert(m, name: str, inherited: QConfig):
        if _disabled(m) or isinstance(m, QuantizedModule):
            return m
        if isinstance(m, QATModule):
            if not m.__dict__.get("_qat_ready", False):  # no quantizers yet
                unready.append((m, _qconfig_of(m, name, inherited)))
            elif m.qconfig != (m.qconfig if m.__dict__.get("_own_qconfig") else inherited):
                raise ValueError(
                    f"quantize_qat: {_where(name, m)} is already a QAT module with another "
                    f"qconfig; quantize_qat does not replace quantizers: call "
                    f"gpuquant.quantization.propagate_qconfig(model, qconfig) for fresh "
                    f"observers and fake quants, or reset_qconfig(model, qconfig) to carry the "
                    f"current qparams over")
            return m
        qc = _qconfig_of(m, name, inherited)
        if qc is inherited:
            qc = _operand_qconfig(m, qc)
        cls = mapping.get(type(m))
        if cls is not None:
            try:
                new = cls.from_float_module(m)
                if m.__dict__.get("_param_operand"):  # (propagate / reset_qconfig read it)
                    new.__dict__["_param_operand"] = True
                new.set_qconfig(qc)
            except (NotImplementedError, ValueError, TypeError) as e:
                kind = ValueError if isinstance(e, NotImplementedError) else type(e)
                raise kind(f"quantize_qat: {_where(name, m)}: {e}; keep it float with "
                           f"disable_quantize() (with stubs around it) or change it") from e
            if qc is not inherited:  # its own qconfig attribute: kept by a second call
                new.__dict__["_own_qconfig"] = True
            return new
        if isinstance(m, _PASS_MODULES) or is_eval_identity(m):
            passes.append(m)
        if isinstance(m, tuple(_QAT_MAP)):
            _refuse_parametrized("quantize_qat", name, m)
            raise TypeError(f"quantize_qat: module {name or '<root>'!r} of type "
                            f"{type(m).__name__} has no QAT version in the mapping; pass "
                            f"mapping={{{type(m).__name__}: ...}} or call disable_quantize() on it")
        return _convert_children(m, name, lambda c, n: convert(c, n, qc), swaps)

    out = convert(module, "", qconfig)
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    for m, qc in unready:
        m.set_qconfig(qc)
    for m in passes:
        # a training-mode dropout, or a flatten of a channels_last activation, writes a new
        # tensor: without the hook the module reading it lost its input's producer, and a
        # model trained without an eval pass (or in channels_last) failed to convert
        if keep_producer_hook not in m._forward_hooks.values():
            m.register_forward_hook(keep_producer_hook)
    return out


def quantize(module: torch.nn.Module, mapping: Optional[dict] = None,
             inplace: bool = True) -> torch.nn.Module:
    """Convert every QAT module to its integer version (int8 weights, int32 bias, fixed-point
    requantization); the model is put in eval mode.

    The QAT model must have run forward passes (calibration or training): observers need
    data, and each module's input qparams are those of the module that fed it then.

    Modules marked with ``disable_quantize()`` stay float; a QAT module marked after
    :func:`quantize_qat` goes back to its float class (its trained weights, no quantizers).

    Args:
        module: the QAT model.
        mapping: QAT class -> quantized class (default: derived from the class names).
        inplace: convert ``module`` itself (True) or a deep copy.

    Returns:
        The quantized model (use the return value).

    Raises:
        TypeError: a bad mapping or inplace, a QAT module whose class is not in the
            mapping, or one marked with ``disable_quantize()`` whose class has no known float
            class (named).
        ValueError: no QAT module in the model (call :func:`quantize_qat` first), a module
            not observed yet, one fed by a float op or by a module kept float, or one whose
            qparams are unusable (a learned scale trained past float32's range; named in
            the message). A failure leaves ``module`` unchanged.

    Example:
        >>> int8_model = quantize(qat_model)
    """
    _check_module(module, "quantize")
    mapping = _check_mapping(mapping, _QUANTIZED_MAP, "from_qat_module", "quantize")
    _check_bool(inplace, "quantize", "inplace")
    if not any(isinstance(m, (QATModule, QuantizedModule)) for m in module.modules()):
        raise ValueError(f"quantize: no QAT module found in the {type(module).__name__} "
                         f"model; convert it with gpuquant.quantization.quantize_qat(model, "
                         f"qconfig) and train or calibrate it first (a model from "
                         f"prepare_dynamic_qat converts with quantize_dynamic)")
    if not inplace:
        module = copy.deepcopy(module)

    def convert(m, name: str):
        if isinstance(m, QuantizedModule):
            return m
        if _disabled(m):
            return keep_float(m, name)
        if isinstance(m, QATModule):
            cls = mapping.get(type(m))
            if cls is None:
                _refuse_parametrized("quantize", name, m)
                raise TypeError(f"quantize: module {name or '<root>'!r} of type "
                                f"{type(m).__name__} has no quantized version in the mapping; "
                                f"pass mapping={{{type(m).__name__}: ...}} or call "
                                f"disable_quantize() on it")
            # a state no finite batch reached (qparams of scale eps), a learned value that
            # training drove to NaN or past float32 (qparams the int8 model cannot use)
            for o in m.modules():
                if isinstance(o, (_RangeObserver, HistogramObserver)) and o.has_observed \
                        and not o.recorded_finite():
                    raise ValueError(
                        f"quantize: module {name or '<root>'!r} ({type(m).__name__}): its "
                        f"{o._name()} kept no batch: every batch it saw held NaN / Inf "
                        f"(dropped without a host read under check_finite=False; "
                        f"nonfinite_batches = {int(o.nonfinite_batches)}); calibrate it on "
                        f"finite data")
                why = o._learned_problem() if isinstance(o, _LearnedBase) and \
                    o._initialized else None
                if why is not None:
                    raise ValueError(
                        f"quantize: module {name or '<root>'!r} ({type(m).__name__}): its "
                        f"{type(o).__name__}'s learned {why}: its training diverged there "
                        f"(NaN) or drove it past float32")
            try:
                new = cls.from_qat_module(m, name)
            except (ValueError, NotImplementedError) as e:
                raise ValueError(f"quantize: {_named(str(e), name, m)}") from e
            if new is not m:  # the user's forward (pre-)hooks, as torch.ao's convert
                carry_hooks(m, new, name, "quantize", backward=False)
            return new
        return _convert_children(m, name, convert, swaps)

    def keep_float(m, name: str):
        # disable_quantize() keeps m float; a QAT module in it was marked after quantize_qat
        # and goes back to its float class (it was left QAT in the int8 model, where its
        # float conv met the int8 activations: 'Input type (signed char) and bias type
        # (float) should be the same')
        if isinstance(m, QATModule):
            cls = _FLOAT_MAP.get(type(m))
            if cls is None:
                raise TypeError(f"quantize: {_where(name, m)} is marked with "
                                f"disable_quantize() but its QAT class has no known float "
                                f"class (known: {sorted(c.__name__ for c in _FLOAT_MAP)}); "
                                f"mark it before quantize_qat")
            return m.to_float_module(cls)
        return m if isinstance(m, QuantizedModule) else _convert_children(m, name, keep_float,
                                                                           swaps)

    # the QAT model's float dtype: its weights' (learned scales keep float32 under casts)
    float_dtype = next((p.dtype for m in module.modules()
                        if not isinstance(m, (FakeQuantBase, Observer))
                        for p in m.parameters(recurse=False) if p.is_floating_point()),
                       torch.float32)
    # every module converts before any is swapped in: a failure leaves the QAT model as it
    # was (trainable, convertible once fixed), as quantize_qat does
    swaps: list = []
    out = convert(module, "")
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    if isinstance(out, torch.fx.GraphModule):  # drop-in: the fused BatchNorms' own names
        delete_unused_paths(out)
    if float_dtype in (torch.float16, torch.bfloat16):  # cast before conversion: answer so
        for m in out.modules():
            if isinstance(m, QDequantStub):
                m.set_out_dtype(float_dtype)
    for m in out.modules():  # quantize_qat's pass-through hooks: no use on int8 tensors
        for k in [k for k, h in m._forward_hooks.items() if h is keep_producer_hook]:
            del m._forward_hooks[k]
            m._forward_hooks_with_kwargs.pop(k, None)
            m._forward_hooks_always_called.pop(k, None)
    return out.eval()


def _set_all(module, kind, method: str):
    _check_module(module, method)
    for m in module.modules():
        if isinstance(m, kind):
            getattr(m, "enable" if method.startswith("enable") else "disable")()
    return module


def _set_dynamic(module, enabled: bool):
    # the fake-quant Linears of prepare_dynamic_qat hold their switch themselves (no
    # FakeQuantBase inside): the model-wide switches skipped them, silently
    from ..nn.qat.linear_dynamic import DynamicConv1D, DynamicLinear
    for m in module.modules():
        if isinstance(m, (DynamicLinear, DynamicConv1D)):
            m.enable_fake_quant(enabled)
    return module


def enable_fake_quant(module: torch.nn.Module) -> torch.nn.Module:
    """Turn on every fake quant under ``module`` (the fake-quant Linears of
    ``prepare_dynamic_qat`` too); returns it."""
    return _set_dynamic(_set_all(module, FakeQuantBase, "enable_fake_quant"), True)


def disable_fake_quant(module: torch.nn.Module) -> torch.nn.Module:
    """Turn off every fake quant under ``module`` (QAT modules then compute in float; the
    fake-quant Linears of ``prepare_dynamic_qat`` compute as ``torch.nn.Linear``)."""
    return _set_dynamic(_set_all(module, FakeQuantBase, "disable_fake_quant"), False)


def enable_observer(module: torch.nn.Module) -> torch.nn.Module:
    """Turn on every observer under ``module``; returns it."""
    return _set_all(module, Observer, "enable_observer")


def disable_observer(module: torch.nn.Module) -> torch.nn.Module:
    """Turn off every observer under ``module`` (qparams stay fixed); returns it."""
    return _set_all(module, Observer, "disable_observer")


def freeze_bn_stats(module: torch.nn.Module, freeze: bool = True) -> torch.nn.Module:
    """Freeze (or, with ``freeze=False``, unfreeze) the BatchNorm statistics of every folded
    Conv+BN / Linear+BN QAT module under ``module``: training then uses the running
    statistics, as the int8 model will, and no batch statistics pass (the usual second half
    of QAT, Krishnamoorthi 2018); returns ``module``.

    Raises:
        TypeError: ``module`` is not a torch.nn.Module, or ``freeze`` is not a bool.
    """
    _check_module(module, "freeze_bn_stats")
    _check_bool(freeze, "freeze_bn_stats", "freeze")
    for m in _bn_folded(module):
        m.freeze_bn_stats(freeze)
    return module


def _bn_folded(module: torch.nn.Module):
    """The folded Conv+BN / Linear+BN QAT modules under ``module``."""
    from ..nn.qat.conv import BnFoldedModule
    return [m for m in module.modules() if isinstance(m, BnFoldedModule)]


def set_bn_fold(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Choose how every folded Conv+BN / Linear+BN QAT module under ``module`` trains with
    batch statistics; returns ``module``.

    ``"single"`` (the default): one convolution a layer, normalised with the batch statistics
    of the folded, fake-quantized convolution (torch.ao's and MegEngine's default form).
    ``"exact"``: a second, float convolution a layer gives the batch statistics of the float
    layer (Krishnamoorthi 2018, figure C.8): about twice the convolution work. Both equal
    the float model's BatchNorm when fake quantization is off, and both deploy the same
    folded weights; see :mod:`gpuquant.nn.qat.conv`.

    Raises:
        TypeError: ``module`` is not a torch.nn.Module.
        ValueError: ``mode`` is not "single" or "exact".
    """
    _check_module(module, "set_bn_fold")
    from ..nn.qat.conv import BN_FOLD_MODES
    if mode not in BN_FOLD_MODES:
        raise ValueError(f"set_bn_fold: mode must be one of {BN_FOLD_MODES}, got {mode!r}")
    for m in _bn_folded(module):
        m.set_bn_fold(mode)
    return module


def propagate_qconfig(module: torch.nn.Module, qconfig: QConfig) -> torch.nn.Module:
    """Give every QAT module under ``module`` fresh observers and fake quants from
    ``qconfig`` (their recorded statistics are dropped); returns the module.

    Raises:
        TypeError: ``qconfig`` is not a QConfig.
    """
    _check_module(module, "propagate_qconfig")
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"propagate_qconfig: qconfig must be a QConfig, got "
                        f"{type(qconfig).__name__}")
    for m in module.modules():
        if isinstance(m, QATModule) and not _disabled(m):
            m.set_qconfig(_operand_qconfig(m, qconfig))
    return module


def reset_qconfig(module: torch.nn.Module, qconfig: QConfig,
                  inplace: bool = True) -> torch.nn.Module:
    """Replace the observers and fake quants of every QAT module by ``qconfig``'s, carrying
    the current qparams over where the new ones take them (``set_qparams``, e.g.
    :class:`PassiveObserver`, and learned LSQ / TQT scales, which start from them; a learned
    fake quant of another dtype, or per-channel where they are per-tensor, initialises from
    its observer on the next forward instead). MegEngine's ``reset_qconfig``.

    Raises:
        TypeError: ``qconfig`` is not a QConfig, or ``inplace`` not a bool.
        ValueError: the qconfig quantizes activations per channel (nothing is changed).
    """
    _check_module(module, "reset_qconfig")
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"reset_qconfig: qconfig must be a QConfig, got {type(qconfig).__name__}")
    _check_bool(inplace, "reset_qconfig", "inplace")
    if any(isinstance(m, QATModule) and m.with_act and not _disabled(m)
           for m in module.modules()):
        # set_qconfig's check (quantize_qat, propagate_qconfig), before anything changes: a
        # per-channel activation quantizer failed later, inside the QAT forward, with a
        # shape error from the layer after a pooling
        for what in ("act_observer", "act_fake_quant"):
            factory = getattr(qconfig, what)
            axis = getattr(factory() if factory is not None else None, "axis", None)
            if axis is not None:
                raise ValueError(f"reset_qconfig: the qconfig's {what} is per channel "
                                 f"(axis={axis}); int8 activations are per tensor (the integer "
                                 f"ops and the QAT pooling take one scale): use a per-tensor "
                                 f"activation quantizer")
    if not inplace:
        module = copy.deepcopy(module)

    def make(factory, qparams):
        inst = factory() if factory is not None else None
        if inst is not None and qparams is not None and \
                callable(getattr(inst, "set_qparams", None)):
            if isinstance(inst, _LearnedBase) and (
                    qparams.dtype != inst.dtype or (qparams.axis is None) != (inst.axis is None)):
                return inst  # (cannot start from these: from its observer, as before)
            inst.set_qparams(qparams)
        return inst

    def current(get):
        try:
            return get()
        except ValueError:  # nothing observed yet: nothing to carry over
            return None

    for m in list(module.modules()):
        if not isinstance(m, QATModule) or _disabled(m):
            continue
        dev = m._device()
        qc = _operand_qconfig(m, qconfig)
        if m.with_weight:
            qp = current(m.get_weight_qparams)
            m.weight_observer = make(qc.weight_observer, qp)
            m.weight_fake_quant = make(qc.weight_fake_quant, qp)
        if m.with_act:
            qp = current(m.get_activation_qparams)
            m.act_observer = make(qc.act_observer, qp)
            m.act_fake_quant = make(qc.act_fake_quant, qp)
        m.qconfig = qc
        m.__dict__["_qat_ready"] = True
        m.__dict__.pop("_act_device", None)
        if dev is not None:
            for q in (m.weight_observer, m.weight_fake_quant, m.act_observer, m.act_fake_quant):
                if q is not None:
                    q.to(dev)
    return module
