"""QConfig: which observer and fake quant a QAT module builds for its weight and activation.

A :class:`QConfig` holds *factories* (classes or ``functools.partial``), never instances:
every module calls them to get its own observers. Weight observers of the presets are
per-channel along ``axis=0`` (conv / linear weights are ``(out, in, ...)``); a module with
another weight layout calls the factory with ``axis=...``, which overrides the partial's.

Presets (decisions, with the reason):

* ``ema_fakequant_qconfig`` (the default of ``quantize_qat``): weights per-channel symmetric
  ``qint8_narrow`` MinMax, activations symmetric ``qint8`` moving average (momentum 0.9),
  :class:`FakeQuantize` for both. Symmetric int8 activations (zero point 0), as MegEngine's
  default and TensorRT use: the integer kernels then need no zero-point correction and
  feed the int8 tensor-core instructions directly; QAT recovers the bit lost on
  non-negative (post-ReLU) tensors.
* ``min_max_fakequant_qconfig``: the same with a MinMax activation observer.
* ``sync_ema_fakequant_qconfig``: activations use
  :class:`SyncExponentialMovingAverageObserver` (batch ranges all-reduced across data-parallel
  processes); weights keep plain MinMax because DDP weights are identical on every process.
* ``ema_lowbit_fakequant_qconfig``: 4 bits: weights per-channel symmetric ``qint4``,
  activations *affine* ``quint4`` moving average (with 16 levels the sign bit a symmetric
  signed range spends on non-negative activations costs too much accuracy).
* ``calibration_qconfig``: post-training calibration: weights per-channel MinMax, activations
  :class:`HistogramObserver` (MSE-optimal clipping range), and *no* fake quant (None, as
  MegEngine's): calibration records the statistics of the float network, then ``quantize``
  converts. Run it in eval mode.
* ``tqt_qconfig``: :class:`TQT` (power-of-two scales) for weights (per-channel) and
  activations, initialised from MinMax / moving-average observers.
* ``lsq_qconfig``: :class:`LSQ` for weights (per-channel) and activations, initialised from
  MinMax / moving-average observers.
* ``passive_qconfig``: :class:`PassiveObserver` (scales set by hand or imported) with
  :class:`FakeQuantize`; weights per-channel ``qint8_narrow``, activations ``qint8``.
"""
from __future__ import annotations

import inspect
from collections import namedtuple
from functools import partial

import torch.nn as nn

from ..dtypes import qint4, qint8, qint8_narrow, quint4
from .fake_quant import LSQ, TQT, FakeQuantize
from .observer import (ExponentialMovingAverageObserver, HistogramObserver, MinMaxObserver,
                       PassiveObserver, SyncExponentialMovingAverageObserver)

__all__ = ["QConfig", "min_max_fakequant_qconfig", "ema_fakequant_qconfig",
           "sync_ema_fakequant_qconfig", "ema_lowbit_fakequant_qconfig", "calibration_qconfig",
           "tqt_qconfig", "lsq_qconfig", "passive_qconfig"]

_FIELDS = ("weight_observer", "act_observer", "weight_fake_quant", "act_fake_quant")


class QConfig(namedtuple("QConfig", _FIELDS)):
    """``QConfig(weight_observer, act_observer, weight_fake_quant, act_fake_quant)``.

    Each field is a factory returning a module (a class or a ``functools.partial`` of one),
    or None for "none" (no observer / no fake quantization there).

    Raises:
        TypeError: a field holds an instance (an ``nn.Module`` or anything not callable);
            the message names the field.

    Example:
        >>> qc = QConfig(weight_observer=partial(MinMaxObserver, dtype=qint8_narrow, axis=0),
        ...              act_observer=partial(ExponentialMovingAverageObserver, momentum=0.95),
        ...              weight_fake_quant=partial(FakeQuantize, dtype=qint8_narrow),
        ...              act_fake_quant=FakeQuantize)
    """

    __slots__ = ()

    def __deepcopy__(self, memo):
        # immutable: a copied model shares its QConfig (a partial's arguments, e.g. a
        # torch.distributed process group, may not be copyable; and quantize_qat compares
        # qconfigs, whose partials compare by identity)
        return self

    def __new__(cls, weight_observer=None, act_observer=None, weight_fake_quant=None,
                act_fake_quant=None):
        values = (weight_observer, act_observer, weight_fake_quant, act_fake_quant)
        for name, v in zip(_FIELDS, values):
            if v is None:
                continue
            if isinstance(v, nn.Module):
                raise TypeError(f"QConfig.{name} must be a factory (a class or functools.partial), "
                                f"got an instance of {type(v).__name__}; pass e.g. "
                                f"partial({type(v).__name__}, ...) instead so that every module "
                                f"gets its own")
            if not callable(v):
                raise TypeError(f"QConfig.{name} must be a factory (a class or functools.partial) "
                                f"or None, got {type(v).__name__} ({v!r})")
        return super().__new__(cls, *values)

    def without_host_reads(self) -> "QConfig":
        """This QConfig with ``check_finite=False`` on both observers: a training step then
        reads nothing back to the host (on CUDA, each non-finite check is one scalar read,
        a stall of the launch queue), so the whole QAT step can be captured in a CUDA graph
        (README, "Triton QAT kernels"). A NaN / Inf batch is then skipped and counted by
        the observer instead of raising.

        Raises:
            TypeError: an observer factory that takes no ``check_finite`` argument.
        """
        def off(name):
            f = getattr(self, name)
            if f is None:
                return None
            try:
                inspect.signature(f).bind_partial(check_finite=False)
            except (TypeError, ValueError):
                raise TypeError(f"QConfig.without_host_reads: {name} ({f!r}) takes no "
                                f"check_finite argument") from None
            return partial(f, check_finite=False)
        return self._replace(weight_observer=off("weight_observer"),
                             act_observer=off("act_observer"))

    @classmethod
    def _make(cls, iterable) -> "QConfig":
        # namedtuple's _make (and so _replace, the usual way to tweak a preset:
        # ema_fakequant_qconfig._replace(act_observer=...)) bypassed the checks of __new__
        return cls(*iterable)


# --------------------------------------------------------------------------- presets
_w_minmax = partial(MinMaxObserver, dtype=qint8_narrow, symmetric=True, axis=0)
_w_fq = partial(FakeQuantize, dtype=qint8_narrow)

min_max_fakequant_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(MinMaxObserver, dtype=qint8, symmetric=True),
    weight_fake_quant=_w_fq,
    act_fake_quant=partial(FakeQuantize, dtype=qint8))

ema_fakequant_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=qint8,
                         symmetric=True),
    weight_fake_quant=_w_fq,
    act_fake_quant=partial(FakeQuantize, dtype=qint8))

sync_ema_fakequant_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(SyncExponentialMovingAverageObserver, momentum=0.9, dtype=qint8,
                         symmetric=True),
    weight_fake_quant=_w_fq,
    act_fake_quant=partial(FakeQuantize, dtype=qint8))

ema_lowbit_fakequant_qconfig = QConfig(
    weight_observer=partial(MinMaxObserver, dtype=qint4, symmetric=True, axis=0),
    act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=quint4,
                         symmetric=False),
    weight_fake_quant=partial(FakeQuantize, dtype=qint4),
    act_fake_quant=partial(FakeQuantize, dtype=quint4))

calibration_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(HistogramObserver, dtype=qint8, symmetric=True, mode="mse"),
    weight_fake_quant=None,
    act_fake_quant=None)

tqt_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=qint8,
                         symmetric=True),
    weight_fake_quant=partial(TQT, dtype=qint8_narrow, axis=0),
    act_fake_quant=partial(TQT, dtype=qint8))

lsq_qconfig = QConfig(
    weight_observer=_w_minmax,
    act_observer=partial(ExponentialMovingAverageObserver, momentum=0.9, dtype=qint8,
                         symmetric=True),
    weight_fake_quant=partial(LSQ, dtype=qint8_narrow, axis=0),
    act_fake_quant=partial(LSQ, dtype=qint8))

passive_qconfig = QConfig(
    weight_observer=partial(PassiveObserver, dtype=qint8_narrow, axis=0),
    act_observer=partial(PassiveObserver, dtype=qint8),
    weight_fake_quant=_w_fq,
    act_fake_quant=partial(FakeQuantize, dtype=qint8))
