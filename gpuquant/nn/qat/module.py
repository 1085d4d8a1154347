"""QATModule: the base of the fake-quant modules, and the record of who feeds whom.

A QAT module owns up to four quantization submodules, built from a
:class:`gpuquant.quantization.QConfig` by :meth:`QATModule.set_qconfig`:
``weight_observer`` / ``weight_fake_quant`` (per output channel by default) and
``act_observer`` / ``act_fake_quant`` (its output).

Input qparams. A quantized module needs the qparams of the int8 tensor it receives: those of
the module that produced it. gpuquant learns them while the QAT model runs: each QAT
module tags the storage of the tensor it returns with itself (pooling passes the tag of its
input through), and each QAT module notes the tag of its inputs. Views share their
storage, so ``torch.flatten``, ``.view``, ``.reshape`` (when it is a view), slicing and
``permute`` keep the tag; an op that writes a new tensor (``x * 2``, ``torch.cat`` outside a
``Concat``, a float module, ``.contiguous()`` / ``flatten`` of a tensor whose layout forces a
copy) drops it, and converting a module whose input came from such an op raises, naming the
module. In-place ops keep the tag while changing the values: do not modify activations in
place between quantized modules (use the fused modules, ``Elemwise``). ``quantize`` needs at
least one forward pass of the QAT model (calibration or training; again after loading a
QAT ``state_dict`` into a fresh model), which it needs anyway for the observers.
"""
from __future__ import annotations

import copy
import weakref
from typing import List, Optional

import torch

from ...qparams import QParams
from ..._compile import EagerUnderCompile, eager_under_compile
from ..module import Module

__all__ = ["QATModule", "tag_output", "source_of", "keep_producer", "keep_producer_hook"]

# storage of a tensor produced by a QAT module -> (that module, the tensor's version then)
# (weak on the storage)
_PRODUCERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _storage(x):
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, wrappers)
        return None


def _version(x: torch.Tensor):
    try:
        return x._version  # shared by a tensor and its views
    except RuntimeError:  # inference tensors (torch.inference_mode) keep no version counter
        return None


def check_tensor_input(module, x) -> None:
    """Refuse an ``x`` that is not a tensor, naming ``module``'s class and what ``x`` is.

    Raises:
        TypeError: not a tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(module).__name__}: x must be a torch.Tensor, got "
                        f"{type(x).__module__}.{type(x).__name__}")


def check_image_input(module, x) -> None:
    """Refuse what no int8 image op takes, before any state is touched: not a tensor, or
    neither 4-D ``(N, C, H, W)`` nor 3-D unbatched ``(C, H, W)`` (shapes only: no device
    sync).

    Raises:
        TypeError: not a tensor. ValueError: naming ``module`` and the shape.
    """
    check_tensor_input(module, x)
    if x.dim() not in (3, 4):
        raise ValueError(f"{type(module).__name__}: x must be 4-D (N, C, H, W) or 3-D "
                         f"unbatched (C, H, W), got shape {tuple(x.shape)}")


def tag_output(y: torch.Tensor, source: Optional["QATModule"]) -> torch.Tensor:
    """Record that ``y`` (and every view of it) carries ``source``'s output qparams."""
    st = _storage(y)
    if st is not None and source is not None:
        _PRODUCERS[st] = (source, _version(y))
    return y


def _entry(x):
    """``x``'s storage's (producer, version when tagged), or None."""
    st = _storage(x)
    return None if st is None else _PRODUCERS.get(st)


def restore_entry(x, entry) -> None:
    """Put back ``entry`` (an :func:`_entry` taken earlier) as ``x``'s storage's tag."""
    st = _storage(x)
    if st is None:
        return
    if entry is None:
        _PRODUCERS.pop(st, None)
    else:
        _PRODUCERS[st] = entry


def _producer(x) -> Optional["QATModule"]:
    entry = _entry(x)
    return None if entry is None else entry[0]


def source_of(x: torch.Tensor) -> Optional["QATModule"]:
    """The QAT module whose output qparams ``x`` carries, or None; None too where model code
    changed it in place since (``F.relu(y, inplace=True)``, ``y.mul_(2)``, ``y[:, 0] = 0``):
    the int8 model would run that op on the integers, so it is a float op like any other."""
    entry = _entry(x)
    if entry is None or entry[1] != _version(x):
        return None
    return entry[0]


@eager_under_compile  # called from model code and drop-in graphs: its table is no guard
def keep_producer(y, x):
    """``y``, recorded as carrying the qparams of the QAT module that produced ``x`` (what
    the int8 model sees: the same integers re-viewed, dropout being the identity there), so
    :func:`~gpuquant.quantization.quantize` finds the input qparams of the module that reads
    ``y``. For model code whose reshapes or dropouts of quantized values may copy (a
    channels_last flatten, training-mode dropout); a no-op on int8 tensors and where ``x``
    has no QAT producer. An in-place dropout's output counts as ``x``'s producer's too."""
    src = _producer(x)
    if src is not None and isinstance(y, torch.Tensor) and y.is_floating_point():
        tag_output(y, src)
    return y


def keep_producer_hook(module, args, output):
    """Forward hook of the pass-through modules of a QAT model (``torch.nn.Dropout``,
    ``Flatten``, ...; :func:`~gpuquant.quantization.quantize_qat` registers it): their output
    carries the qparams of their input's producer (:func:`keep_producer`). A training-mode
    dropout or a flatten of a channels_last tensor writes a new tensor, whose module reading
    it could not be converted otherwise."""
    if args:
        return keep_producer(output, args[0])
    return None


def _make(factory, what: str):
    if factory is None:
        return None
    if isinstance(factory, torch.nn.Module):
        raise TypeError(f"QConfig.{what} must be a factory (a class or functools.partial), got an "
                        f"instance of {type(factory).__name__}")
    return factory()


# the id of the autograd graph task running (-1 outside backward); None where torch has none
_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


class QATModule(EagerUnderCompile, Module):
    """Base of the QAT modules (``gpuquant.nn.qat``).

    Class attributes ``with_weight`` / ``with_act`` say which quantizers the module has.
    Subclasses implement ``forward`` with :meth:`apply_quant_weight`,
    :meth:`apply_quant_activation` and :meth:`_note_inputs`.
    """

    with_weight = True
    with_act = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_qat()

    def _init_qat(self) -> None:
        self.weight_observer = None
        self.weight_fake_quant = None
        self.act_observer = None
        self.act_fake_quant = None
        self.__dict__["_input_sources"] = []
        self.__dict__["_qat_ready"] = False

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_float_module(cls, float_module: Module) -> "QATModule":
        """The QAT version of ``float_module``, sharing its parameters and buffers (without
        quantizers: :func:`~gpuquant.quantization.quantize_qat` calls :meth:`set_qconfig`)."""
        qat = cls.__new__(cls)
        for k, v in float_module.__dict__.items():
            qat.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set)) else v
        qat._init_qat()
        return qat

    #: what _init_qat, set_qconfig and forward add to the float module's attributes
    QAT_STATE = ("weight_observer", "weight_fake_quant", "act_observer", "act_fake_quant",
                 "_input_sources", "_qat_ready", "_own_qconfig", "_act_device")

    def to_float_module(self, float_cls: type) -> Module:
        """The inverse of :meth:`from_float_module`: a ``float_cls`` module (the float class
        this QAT class stands for) sharing this module's parameters, buffers and inner
        modules, without the quantizers and QAT state; the qconfig only where it was the
        module's own. :func:`~gpuquant.quantization.quantize` uses it for a QAT module
        marked with ``disable_quantize()``."""
        m = float_cls.__new__(float_cls)
        drop = set(self.QAT_STATE)
        if not self.__dict__.get("_own_qconfig", False):
            drop.add("qconfig")
        for k, v in self.__dict__.items():
            if k not in drop:
                m.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set)) else v
        for k in self.QAT_STATE:
            m._modules.pop(k, None)  # (a copy of this module's dict)
        return m

    def set_qconfig(self, qconfig) -> "QATModule":
        """Build fresh observers and fake quants from ``qconfig``'s factories.

        Raises:
            TypeError: ``qconfig`` is not a QConfig-like namedtuple of factories.
            ValueError: quantizers the int8 modules cannot take, refused before a training
                run rather than at ``quantize()`` after it: per-channel activation ones;
                weight ones that are unsigned, asymmetric or per channel along another axis
                than the output channels' (:meth:`_check_weight_quantizers`).
        """
        for f in ("weight_observer", "act_observer", "weight_fake_quant", "act_fake_quant"):
            if not hasattr(qconfig, f):
                raise TypeError(f"qconfig must be a gpuquant.quantization.QConfig, got "
                                f"{type(qconfig).__name__} (no field {f!r})")
        self.qconfig = qconfig
        self.__dict__["_qat_ready"] = True
        self.__dict__.pop("_act_device", None)
        dev = self._device()
        if self.with_weight:
            self.weight_observer = _make(qconfig.weight_observer, "weight_observer")
            self.weight_fake_quant = _make(qconfig.weight_fake_quant, "weight_fake_quant")
            self._check_weight_quantizers()
        if self.with_act:
            self.act_observer = _make(qconfig.act_observer, "act_observer")
            self.act_fake_quant = _make(qconfig.act_fake_quant, "act_fake_quant")
            for m in (self.act_observer, self.act_fake_quant):
                if getattr(m, "axis", None) is not None:  # before a training run, not after
                    raise ValueError(
                        f"{type(self).__name__}: the qconfig's activation "
                        f"{'observer' if m is self.act_observer else 'fake quant'} is per "
                        f"channel (axis={m.axis}); int8 activations are per tensor (the "
                        f"integer ops and the QAT pooling take one scale): use a per-tensor "
                        f"activation observer")
        if dev is not None:
            for m in (self.weight_observer, self.weight_fake_quant, self.act_observer,
                      self.act_fake_quant):
                if m is not None:
                    m.to(dev)
        return self

    def _check_weight_quantizers(self) -> None:
        """Refuse, before a training run rather than at ``quantize()`` after it, weight
        quantizers the int8 layers cannot take: unsigned or 16/32-bit storage, asymmetric
        (a zero point), per channel along another axis than the output channels'.

        Raises:
            ValueError: naming the quantizer and what the int8 layers take.
        """
        inner = self._inner() if hasattr(self, "_inner") else self
        w = getattr(inner, "weight", None)
        for m, what in ((self.weight_observer, "observer"), (self.weight_fake_quant,
                                                            "fake quant")):
            if m is None:
                continue
            why = None
            if m.dtype.storage != torch.int8:
                why = f"dtype {m.dtype.name} (int8 layers take signed int8-storage weights: " \
                      f"qint8, qint8_narrow, qint4)"
            elif getattr(m, "symmetric", True) is False:
                why = "asymmetric (int8 layers take symmetric weights: zero point 0)"
            else:
                axis = getattr(m, "axis", None)
                if axis is not None and isinstance(w, torch.Tensor) and w.dim() and \
                        axis % w.dim() != 0:
                    why = f"per channel along axis {axis} (int8 layers take per-tensor or " \
                          f"per-output-channel weights: axis 0)"
            if why is not None:
                raise ValueError(f"{type(self).__name__}: the qconfig's weight {what} is {why}")

    def _device(self):
        for p in self.parameters(recurse=True):
            return p.device
        for b in self.buffers(recurse=True):
            return b.device
        return None

    # ------------------------------------------------------------------ forward helpers
    def _begin_forward(self) -> None:
        """The checks every QAT forward begins with (shapes and flags only: no device sync):
        the module has its quantizers, and it is not a forward recomputed during backward
        (``torch.utils.checkpoint``) while it updates state.

        Raises:
            RuntimeError: no qconfig set; a recomputed forward whose observers or
                BatchNorm statistics update (:meth:`_refuse_recompute`).
        """
        if not self.__dict__.get("_qat_ready", False) and (self.with_weight or self.with_act):
            raise RuntimeError(f"{type(self).__name__} has no quantizers: build QAT models with "
                               f"gpuquant.quantization.quantize_qat(model, qconfig) or call "
                               f"set_qconfig(qconfig)")
        if _GRAPH_TASK is not None and _GRAPH_TASK() != -1:  # (observers record in eval too)
            self._refuse_recompute()

    def _refuse_recompute(self) -> None:
        """Refuse a forward run inside backward (activation checkpointing recomputes the
        forward there) when it updates state: an enabled observer's range (observers record
        in eval mode too: calibration), a training BatchNorm's running statistics. The
        recomputation would read the state the first forward left (the moving average, the
        folded running variance), give other activations than the first forward and so
        other gradients, and update the state a second time; torch's checkpoint compares
        only shapes and dtypes, so it would pass silently."""
        from ...quantization.observer import Observer
        live = [f"observer {n or type(m).__name__!r}" for n, m in self.named_modules()
                if isinstance(m, Observer) and m.enabled]
        bn = getattr(self, "bn", None)
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and self.training and \
                bn.training and not getattr(self, "bn_frozen", False):
            live.append("BatchNorm statistics")
        if live:
            raise RuntimeError(
                f"{type(self).__name__}: a forward ran during backward (activation "
                f"checkpointing recomputes it) while its state updates ({', '.join(live)}): "
                f"the recomputation would see the state the first forward changed, giving "
                f"other gradients, and update it twice. Do not checkpoint QAT blocks, or "
                f"freeze them first (gpuquant.quantization.disable_observer(model) and "
                f"freeze_bn_stats(model)), after which recomputation is exact")

    def apply_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        from ...quantization.fake_quant import apply_fake_quant_with_observer
        return apply_fake_quant_with_observer(w, self.weight_fake_quant, self.weight_observer)

    def apply_quant_activation(self, y: torch.Tensor, activation: str = "none",
                               addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Observe and fake-quantize the output ``activation(y)`` (``"none"``, ``"relu"``,
        ``"relu6"``), or ``activation(y + addend)``; tags it as this module's output. A ReLU
        and the addend go to the fused observe + fake-quant op, which folds them into its
        own passes where it can."""
        from ...quantization.fake_quant import apply_fake_quant_with_observer
        from ..conv import apply_activation
        relu = activation == "relu"
        if activation not in ("none", "relu"):
            if addend is not None:
                y, addend = y + addend, None
            y = apply_activation(y, activation)
        if self.__dict__.get("_act_device") != y.device:
            # modules without parameters (stubs, Elemwise, Concat) cannot tell their device
            # when the qconfig is set: their quantizers follow the first activation
            for m in (self.act_observer, self.act_fake_quant):
                if m is not None:
                    m.to(y.device)
            self.__dict__["_act_device"] = y.device
        y = apply_fake_quant_with_observer(y, self.act_fake_quant, self.act_observer, relu,
                                           addend)
        return tag_output(y, self)

    def apply_quant_bias(self, b: Optional[torch.Tensor], x: torch.Tensor):
        """``b`` on the int8 model's bias grid: ``rne(b / (s_x * s_w[c])) * s_x * s_w[c]``
        with ``s_x`` the scale of ``x``'s producer and ``s_w`` this module's (folded) weight
        scales, the rounding done as conversion does it (float64); straight-through
        gradient (MegEngine's ``apply_quant_bias``). Without it QAT added the float bias and
        an int8 layer whose bias unit is coarser than its output step (cancelling inputs, a
        zero-initialised BatchNorm weight, an LSQ weight scale far above the weights) came
        out several steps from the QAT model.

        In training too (frozen-BatchNorm training then equals eval, as ``freeze_bn_stats``
        promises; a BatchNorm-folded layer training on batch statistics never gets here).
        It costs ~30 small ops a layer (the two qparams and the rounding): 9% more host
        time in a frozen-BatchNorm step on the dev CPU. ``b`` unchanged where the int8
        model's bias is not defined yet: no bias, no quantized producer, or the input's or
        weight's fake quant off (float behaviour). Call after :meth:`apply_quant_weight`
        (this call's weight scale)."""
        fq = self.weight_fake_quant
        if b is None or fq is None or not fq.enabled:
            return b
        src = source_of(x)
        if src is None or not src.act_fake_quant_enabled():
            return b
        w_qp = self.get_weight_qparams()
        if w_qp.per_channel:  # per output channel (axis 0) only: conversion refuses others
            weight = self._inner().weight if hasattr(self, "_inner") else self.weight
            if w_qp.resolve_axis(weight.dim()) != 0:
                return b
        unit = src.get_activation_qparams().scale.double().reshape(()) * \
            w_qp.scale.double().reshape(-1)
        q = (torch.round(b.detach().double() / unit) * unit).to(b.dtype)
        return b + (q - b).detach()

    def _note_inputs(self, *xs) -> None:
        """Record the producers of this call's inputs (one slot per input)."""
        slots: List[list] = self.__dict__.setdefault("_input_sources", [])
        while len(slots) < len(xs):
            slots.append([])
        for slot, x in zip(slots, xs):
            src = source_of(x)
            if not any(s is src for s in slot):
                slot.append(src)

    # ------------------------------------------------------------------ qparams
    @staticmethod
    def _qparams_of(observer, fake_quant, what: str, owner: str) -> QParams:
        if fake_quant is not None:
            qp = fake_quant.get_qparams()
            if qp is not None:
                return qp
        if observer is None:
            raise ValueError(f"{owner} has no {what} observer (and no learned {what} qparams): "
                             f"its QConfig leaves {what} unquantized")
        if not getattr(observer, "has_observed", True):
            raise ValueError(f"{owner}: the {what} observer has not observed any data; run "
                             f"forward passes (calibration or training) before quantize()")
        return observer.get_qparams()

    def get_weight_qparams(self) -> QParams:
        """QParams of the (folded) weight: learned ones (LSQ, TQT) or the observer's.

        Raises:
            ValueError: no weight quantizer, or nothing observed yet.
        """
        if not self.with_weight:
            raise ValueError(f"{type(self).__name__} has no weight")
        return self._qparams_of(self.weight_observer, self.weight_fake_quant, "weight",
                                type(self).__name__)

    def get_activation_qparams(self) -> QParams:
        """QParams of the output activation.

        Raises:
            ValueError: no activation quantizer, or nothing observed yet.
        """
        if not self.with_act:
            raise ValueError(f"{type(self).__name__} has no activation quantizer")
        return self._qparams_of(self.act_observer, self.act_fake_quant, "activation",
                                type(self).__name__)

    def act_fake_quant_enabled(self) -> bool:
        """Whether this module's output is fake-quantized (on the integer grid)."""
        fq = self.act_fake_quant
        return fq is not None and fq.enabled

    def input_qparams(self, name: str = "") -> List[QParams]:
        """The qparams of each input, from the QAT modules that produced them.

        Args:
            name: the module's name in the model, for error messages.

        Raises:
            ValueError: the module never ran, an input was not produced by a quantized
                module, or an input slot saw producers with different qparams.
        """
        who = f"module {name!r} ({type(self).__name__})" if name else type(self).__name__
        slots = self.__dict__.get("_input_sources", [])
        if not slots:
            raise ValueError(f"{who} has not run yet: run forward passes of the QAT model "
                             f"(calibration or training) before quantize(). A model restored "
                             f"with load_state_dict needs one too (it records who feeds each "
                             f"module); to keep the restored ranges, call "
                             f"gpuquant.quantization.disable_observer(model) first")
        out = []
        for i, slot in enumerate(slots):
            # a None next to real producers comes from a training-mode pass through an op
            # that is the identity in eval mode (Dropout): the int8 model sees the producer
            if any(s is not None for s in slot):
                slot = [s for s in slot if s is not None]
            kept_float = [s for s in slot if s is not None and s.quantize_disabled]
            if kept_float:
                raise ValueError(f"input {i} of {who} comes from a "
                                 f"{type(kept_float[0]).__name__} marked with "
                                 f"disable_quantize(), which stays float in the int8 model: "
                                 f"put a gpuquant.nn.QuantStub after it (and a DequantStub "
                                 f"before it), or call disable_quantize() on this module too")
            if not slot or any(s is None for s in slot):
                raise ValueError(f"input {i} of {who} was not produced by a quantized module "
                                 f"(it came from a float op, or model code changed it in "
                                 f"place, or the model's input): put a "
                                 f"gpuquant.nn.QuantStub before it, or call disable_quantize() "
                                 f"on it. If it is a quantized module's output that model code "
                                 f"copied (torch.flatten / reshape of a channels_last tensor, a "
                                 f"functional dropout in training mode), pass it through "
                                 f"gpuquant.nn.qat.module.keep_producer(y, x) or a torch.nn "
                                 f"module (nn.Flatten, nn.Dropout)")
            qps = [s.get_activation_qparams() for s in slot]
            if any(q != qps[0] for q in qps[1:]):
                raise ValueError(f"input {i} of {who} comes from {len(qps)} producers with "
                                 f"different qparams ({qps}); use one module instance per call "
                                 f"site")
            out.append(qps[0])
        return out
