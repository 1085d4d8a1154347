"""Observers: ``nn.Module``s that record statistics of the tensors passing through them and
turn them into :class:`gpuquant.QParams`.

Conventions (all observers):

* Calling an observer records the tensor whenever the observer is enabled, in train *and*
  eval mode (calibration runs in eval mode), and returns its input unchanged. ``enable()`` /
  ``disable()`` switch recording; ``enabled`` says which. Empty tensors are ignored.
* Arguments ``dtype`` (a :class:`gpuquant.QuantDtype`, default ``qint8``), ``symmetric``
  (default True: zero point 0 for signed dtypes, as MegEngine and TensorRT use) and ``axis``
  (None = per-tensor, an int = per-channel along that axis, negative counts from the end).
* State lives in registered buffers, so ``state_dict()`` / ``load_state_dict()`` round-trip
  (per-channel buffers take the channel count of the first tensor, or of the loaded state);
  ``.to(device)`` moves it, but a dtype conversion of the model (``model.half()``,
  ``.to(torch.bfloat16)``) leaves its dtype alone (float32 ranges: in bfloat16 a moving
  average would stall and the qparams change);
  the ``enabled`` switch travels as extra state (key ``_extra_state``).
* ``get_qparams()`` computes scale and zero point on the device in float32 torch ops
  (no ``.item()``, no host sync) with exactly ``torch.ao.quantization``'s formulas
  (contract section 1): min clipped to <= 0, max to >= 0; symmetric
  ``scale = max(-min, max) / ((qmax - qmin) / 2)``, zero point 0 (signed) or
  ``(qmax + qmin + 1) // 2`` (unsigned); asymmetric ``scale = (max - min) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - rne(min / scale), qmin, qmax)``; then ``scale = max(scale,
  float32 eps)``. MinMax observers are bit-identical to ``torch.ao.quantization.MinMaxObserver``
  / ``PerChannelMinMaxObserver``. One documented difference: for *unsigned symmetric* torch
  uses ``(quant_min + quant_max) // 2`` (127 for quint8) when ``quant_min``/``quant_max`` are
  passed explicitly and 128 otherwise; gpuquant always uses the contract's
  ``(qmax + qmin + 1) // 2`` (128 for quint8, 8 for quint4).
* NaN or Inf input raises ``ValueError`` naming the observer, and the state is left as it was
  (never a poisoned scale). So does finite input that would leave a range with no finite
  float32 scale: affine (``symmetric=False``), ``max - min`` overflows float32 once the ends
  pass about +-1.7e38 (``[-2e38, 2e38]``: the scale ``(max - min) / 255`` would be inf); a
  moving average can overflow too. Detecting either costs one scalar device-to-host read per
  recorded batch (the batch min/max and the range they leave are reduced on the device
  first and read together), so ``get_qparams()`` needs no check and no sync.
  ``check_finite=False`` skips that read for hot GPU loops: such a batch (or channel) is then
  dropped on the device, leaving the state unchanged, and counted in the buffer
  ``nonfinite_batches``. A loaded ``state_dict`` whose range gives no finite scale is refused.
* ``get_qparams()`` before anything was recorded raises ``ValueError`` ("... has not
  observed any data").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .._compile import EagerUnderCompile, eager_under_compile
from .._tensors import keep_dtype
from .._checks import check_bool
from ..distributed import check_group
from ..dtypes import QuantDtype, get_dtype, observed_dtype, qint8
from ..qparams import _SYM_SPAN, QParams

__all__ = ["Observer", "MinMaxObserver", "ExponentialMovingAverageObserver", "HistogramObserver",
           "PassiveObserver", "SyncMinMaxObserver", "SyncExponentialMovingAverageObserver",
           "qparams_from_min_max"]

_EPS = torch.finfo(torch.float32).eps
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@eager_under_compile
def qparams_from_min_max(min_val: torch.Tensor, max_val: torch.Tensor, dtype: QuantDtype,
                         symmetric: bool):
    """Scale (float32) and zero point (int32) from a range, elementwise, on the device.

    The expressions are ``torch.ao.quantization.UniformQuantizationObserverBase.
    _calculate_qparams``'s, written the same way so that they round the same way on the same
    device. ``min_val`` / ``max_val`` are float32 tensors of any (equal) shape; the result has
    that shape. ``dtype``: a :class:`gpuquant.QuantDtype` or its name.

    The arguments are checked, which costs one scalar device-to-host read (the observers
    use the unchecked computation, their state being valid by construction).

    Raises:
        TypeError: min_val / max_val not float32 tensors, a bad dtype, symmetric not a bool.
        ValueError: shapes or devices that differ; NaN or Inf in the range; min > max; a
            range whose scale is not a finite float32 or whose quantized range is not
            (affine: ``max - min`` overflows float32; symmetric:
            ``max(|min|, |max|) * (2 + 2**-21)``, the bound of ``_range_fits``).
    """
    dtype = get_dtype(dtype)
    if not isinstance(symmetric, bool):
        raise TypeError(f"qparams_from_min_max: symmetric must be a bool, got "
                        f"{type(symmetric).__name__} ({symmetric!r})")
    for what, t in (("min_val", min_val), ("max_val", max_val)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"qparams_from_min_max: {what} must be a float32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if min_val.shape != max_val.shape or min_val.device != max_val.device:
        raise ValueError(f"qparams_from_min_max: min_val ({tuple(min_val.shape)}, "
                         f"{min_val.device}) and max_val ({tuple(max_val.shape)}, "
                         f"{max_val.device}) must have the same shape and device")
    fits = _range_fits(min_val, max_val, symmetric) & (min_val <= max_val)
    if not bool(fits.all()):
        _raise_range("qparams_from_min_max", min_val, max_val, fits, symmetric, dtype,
                     "refusing to compute qparams from it")
    return _qparams_from_min_max(min_val, max_val, dtype, symmetric)




def _range_fits(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Where the range ``[lo, hi]`` gives a finite float32 scale whose quantized range
    ``scale * (qmax - qmin)`` is finite too (:class:`~gpuquant.QParams`' rule; elementwise,
    on the device, no host sync): ``lo`` and ``hi`` finite and, affine,
    ``max(hi, 0) - min(lo, 0)`` too (it overflows float32 for finite ends beyond +-1.7e38);
    symmetric, ``max(-lo, hi) * (2 + 2**-21)`` (the scale is amax / ((qmax - qmin) / 2),
    rounded up by up to an ulp, times (qmax - qmin) rounded again: at most that; a magnitude
    past 1.7e38 gave qparams QParams itself refuses). The scale is then at least eps and at
    most float32 max / (qmax - qmin), so its reciprocal and the zero point are finite as
    well."""
    ok = torch.isfinite(lo) & torch.isfinite(hi)
    if symmetric:
        ok &= torch.isfinite(torch.maximum(-lo, hi) * _SYM_SPAN)
    else:
        ok &= torch.isfinite(torch.clamp(hi, min=0.0) - torch.clamp(lo, max=0.0))
    return ok


def _raise_range(name: str, lo: torch.Tensor, hi: torch.Tensor, fits: torch.Tensor,
                 symmetric: bool, dtype: QuantDtype, action: str):
    """The ValueError for a range that gives no finite float32 scale (host reads: error path)."""
    bad = (~fits).reshape(-1).cpu()
    i = int(bad.nonzero()[0])
    lo_v, hi_v = float(lo.reshape(-1)[i]), float(hi.reshape(-1)[i])
    where = "" if lo.dim() == 0 else f" (channel {i}; {int(bad.sum())} channel(s) in all)"
    if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
        why = "it is not finite (NaN or Inf, e.g. a moving average that overflowed float32)"
    elif lo_v > hi_v:
        why = "min > max (no data gives that; torch.ao's observers refuse it too)"
    elif symmetric:
        why = (f"its magnitude max(-min, max) is past 1.7e38, so the symmetric scale times "
               f"the integer range ({dtype.qmax - dtype.qmin} steps) overflows float32; "
               f"rescale the data")
    else:
        why = (f"its width max(max, 0) - min(min, 0) overflows float32 (> 3.4e38), so the "
               f"affine scale (max - min) / {dtype.qmax - dtype.qmin} would be inf; only a "
               f"symmetric range (symmetric=True) or rescaled data can be quantized")
    raise ValueError(f"{name}: the range [min, max] = [{lo_v:.6g}, {hi_v:.6g}]{where} gives no "
                     f"finite float32 scale: {why}; {action}")


def _incoming(state_dict, key: str, current: torch.Tensor) -> torch.Tensor:
    """What loading ``state_dict`` would put in the buffer ``current`` (its entry ``key``, else
    its own value), as float32 on the CPU: checked before anything is copied, so that a
    refused state leaves the observer as it was."""
    t = state_dict.get(key)
    t = current if not isinstance(t, torch.Tensor) else t
    return t.detach().to("cpu", torch.float32)


def _check_loaded_range(name: str, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool,
                        dtype: QuantDtype) -> None:
    """Raise (before the load) for a state whose recorded range gives no finite scale or
    has min > max in some channel; channels never observed (+-inf, or NaN ends) are left
    to the observed flag, as a fresh observer's."""
    if lo.shape != hi.shape or lo.numel() == 0:
        return  # (torch's size checks report it)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    if bool(finite.any()):
        fits = (_range_fits(lo, hi, symmetric) & (lo <= hi)) | ~finite
        if not bool(fits.all()):
            _raise_range(name, lo, hi, fits, symmetric, dtype,
                         "refusing to load it (the observer keeps its state)")


def _qparams_from_min_max(min_val: torch.Tensor, max_val: torch.Tensor, dtype: QuantDtype,
                          symmetric: bool):
    """:func:`qparams_from_min_max` without the checks: no host sync (observers)."""
    qmin, qmax = dtype.qmin, dtype.qmax
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    eps = torch.full((), _EPS, dtype=torch.float32, device=min_val.device)  # a fill, no H2D copy
    if symmetric:
        max_pos = torch.max(-min_neg, max_pos)
        scale = max_pos / (float(qmax - qmin) / 2)
        scale = torch.max(scale, eps)
        zp_value = 0 if dtype.signed else (qmax + qmin + 1) // 2
        zero_point = torch.full(scale.shape, zp_value, dtype=torch.int32, device=scale.device)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.max(scale, eps)
        # int64 so that wide ranges (qint32) cannot overflow before the clamp
        zero_point = qmin - torch.round(min_neg / scale).to(torch.int64)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale, zero_point


def _check_axis(axis) -> Optional[int]:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be None (per-tensor) or an int (per-channel), got "
                        f"{type(axis).__name__} ({axis!r})")
    return axis


class Observer(EagerUnderCompile, nn.Module):
    """Base class of all observers (see the module docstring for the shared conventions).

    Subclasses implement ``_record(x)`` (``x`` a detached float32 tensor with at least one
    element, called under ``torch.no_grad()``) and ``get_qparams()``; they set
    ``self._observed = True`` in ``_record`` once something usable was recorded.

    Args:
        dtype: the quantized dtype the qparams are for (QuantDtype or its name): one of
            ``gpuquant.dtypes.OBSERVED_DTYPES`` (not qint32, the bias's).
        symmetric: symmetric range (zero point fixed) or affine.
        axis: None for per-tensor, an int for per-channel.
        check_finite: raise on NaN/Inf input (one scalar host read per recorded batch);
            False drops non-finite batches on the device instead.

    Raises:
        TypeError: bad argument types.
        ValueError: a dtype outside ``OBSERVED_DTYPES`` (qint32).
    """

    def __init__(self, dtype=qint8, symmetric: bool = True, axis: Optional[int] = None,
                 check_finite: bool = True):
        super().__init__()
        self.dtype = observed_dtype(dtype, type(self).__name__)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__} ({symmetric!r})")
        self.symmetric = symmetric
        self.axis = _check_axis(axis)
        check_bool(check_finite, type(self).__name__, "check_finite")
        self.check_finite = check_finite
        self.enabled = True
        self._observed = False
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64))

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) move the state, never change its dtype
        return super()._apply(keep_dtype(fn), recurse)

    # ------------------------------------------------------------------ switches
    def enable(self) -> "Observer":
        """Record the tensors passing through (the default)."""
        self.enabled = True
        return self

    def disable(self) -> "Observer":
        """Stop recording; the observer then only passes its input through."""
        self.enabled = False
        return self

    @property
    def has_observed(self) -> bool:
        """Whether ``get_qparams()`` has data to work from (host-side flag, no sync)."""
        return self._observed

    # the enabled switch travels in state_dict() (as extra state, not a buffer: it is read
    # on the host every call), so a QAT checkpoint resumes with the same switches
    def get_extra_state(self):
        return {"enabled": self.enabled}

    def set_extra_state(self, state) -> None:
        self.enabled = bool(state["enabled"])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._name()}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{self._name()}: input must be float32, float16 or bfloat16, got {x.dtype}")
        if x.numel() == 0:
            return x
        if x.device != self.nonfinite_batches.device:
            raise ValueError(f"{self._name()}: input is on {x.device} but the observer's state is "
                             f"on {self.nonfinite_batches.device}; move the observer with .to()")
        with torch.no_grad():
            self._record(x.detach().to(torch.float32))
        return x

    def _record(self, x: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not record tensors")

    def get_qparams(self) -> QParams:
        """The qparams for what was recorded so far.

        Raises:
            ValueError: nothing recorded yet.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _name(self) -> str:
        return type(self).__name__

    def _require_observed(self) -> None:
        if not self._observed:
            raise ValueError(f"{self._name()} has not observed any data: call it on a "
                             f"non-empty tensor (an empty one records nothing) or load a "
                             f"state_dict before get_qparams()")

    def _resolve_axis(self, x: torch.Tensor) -> Optional[int]:
        if self.axis is None:
            return None
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"{self._name()}: axis {self.axis} out of range for a tensor of "
                             f"{x.dim()} dimensions; allowed: [{-x.dim()}, {x.dim() - 1}]")
        return self.axis % x.dim()

    def _batch_min_max(self, x: torch.Tensor):
        """Batch min and max (0-d, or one per channel); NaN mapped to -inf / +inf so that it
        survives a MIN/MAX all_reduce and shows as non-finite."""
        axis = self._resolve_axis(x)
        if axis is None:
            mn, mx = torch.aminmax(x)
        else:
            mn, mx = torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
        nan = torch.isnan(mn) | torch.isnan(mx)
        mn = torch.where(nan, torch.full_like(mn, -math.inf), mn)
        mx = torch.where(nan, torch.full_like(mx, math.inf), mx)
        return self._reduce(mn, mx)

    def _reduce(self, mn: torch.Tensor, mx: torch.Tensor):
        """Hook for the Sync* observers (all_reduce across processes)."""
        return mn, mx

    def _prospective_range(self, mn: torch.Tensor, mx: torch.Tensor):
        """Hook: the range ``(lo, hi)`` the qparams would come from once the batch with
        min/max ``mn``/``mx`` is recorded (computed, not stored), or None (nothing to check)."""
        return None

    def _finite_mask(self, mn: torch.Tensor, mx: torch.Tensor, new_range=None) -> torch.Tensor:
        """Which entries of a batch's (min, max) are usable: finite, and leaving a range
        (``new_range``, else :meth:`_prospective_range`) that gives a finite float32 scale;
        raises if check_finite is on, else the unusable entries are dropped and counted."""
        ok = torch.isfinite(mn) & torch.isfinite(mx)
        if new_range is None:
            new_range = self._prospective_range(mn, mx)
        fits = None if new_range is None else _range_fits(*new_range, self.symmetric)
        if self.check_finite:
            if fits is None:
                state = (~ok).any().to(torch.int8)
            else:  # 1: non-finite batch, 2: the range it leaves overflows; still one read
                state = torch.where(ok.all(), (~fits).any().to(torch.int8) * 2,
                                    torch.ones((), dtype=torch.int8, device=ok.device))
            state = int(state)  # the one host read of an observer step
            if state == 1:
                raise ValueError(f"{self._name()}: input contains NaN or Inf; refusing to record "
                                 f"it (the observer's state is unchanged)")
            if state == 2:
                _raise_range(self._name(), *new_range, fits, self.symmetric, self.dtype,
                             "refusing to record this batch (the observer's state is unchanged)")
        else:
            if fits is not None:
                ok = ok & fits
            self.nonfinite_batches += (~ok).any().to(torch.int64)
        return ok

    def extra_repr(self) -> str:
        axis = "" if self.axis is None else f", axis={self.axis}"
        return f"dtype={self.dtype.name}, symmetric={self.symmetric}{axis}"


# --------------------------------------------------------------------------- min / max family
def granularity_mismatch(module, key: str, t, axis, error_msgs: list) -> bool:
    """Whether a loaded state tensor ``t`` (``key``) is of the other granularity than the
    module's (a 1-D per-channel tensor for a per-tensor module, a 0-d one for a per-channel
    module): then a message naming the key and both granularities goes to ``error_msgs``
    (``load_state_dict`` raises it) and the module's tensor must not be resized to it."""
    if not isinstance(t, torch.Tensor) or t.dim() == (0 if axis is None else 1):
        return False
    what = "per-tensor" if t.dim() == 0 else f"{t.dim()}-D"
    error_msgs.append(f"{key}: the state_dict holds {what} state of shape {list(t.shape)} but "
                      f"{type(module).__name__}(axis={axis!r}) is "
                      f"{'per-tensor (0-d state)' if axis is None else 'per-channel (1-D state)'}"
                      f": it was saved from a model built with another qconfig")
    return True


class _RangeObserver(Observer):
    """Observers keeping a running ``min_val`` / ``max_val`` (buffers)."""

    def __init__(self, dtype=qint8, symmetric: bool = True, axis: Optional[int] = None,
                 check_finite: bool = True):
        super().__init__(dtype, symmetric, axis, check_finite)
        shape = (0,) if self.axis is not None else ()
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))

    def _prepare_state(self, mn: torch.Tensor) -> None:
        if self.axis is None:
            return
        if self.min_val.numel() == 0:  # first per-channel batch: size the buffers
            # as normal tensors even when this batch runs under torch.inference_mode (a
            # calibration pass): inference tensors cannot be updated in place afterwards,
            # and the first training step failed
            with torch.inference_mode(False):
                self.min_val = torch.full(mn.shape, math.inf, dtype=mn.dtype, device=mn.device)
                self.max_val = torch.full(mn.shape, -math.inf, dtype=mn.dtype,
                                          device=mn.device)
        elif self.min_val.shape != mn.shape:
            raise ValueError(f"{self._name()}: tensor has {mn.numel()} channels along axis "
                             f"{self.axis} but the observer has seen {self.min_val.numel()}")

    def _record(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_min_max(x)
        new_min, new_max = self._prospective_range(mn, mx)
        ok = self._finite_mask(mn, mx, (new_min, new_max))
        self._prepare_state(mn)
        self.min_val.copy_(torch.where(ok, new_min, self.min_val))
        self.max_val.copy_(torch.where(ok, new_max, self.max_val))
        self._observed = True

    def _prospective_range(self, mn, mx):
        """The state after recording a batch with min/max ``mn``/``mx`` (not stored): what
        :meth:`_finite_mask` checks before anything is written (the fused Triton path calls
        ``_finite_mask(mn, mx)`` too, before sizing per-channel state)."""
        cur_min, cur_max = self.min_val, self.max_val
        if cur_min.shape != mn.shape:
            if self.axis is not None and cur_min.numel() == 0:  # first per-channel batch
                cur_min, cur_max = torch.full_like(mn, math.inf), torch.full_like(mn, -math.inf)
            else:
                self._prepare_state(mn)  # raises: the channel count differs
        return self._combine(mn, mx, cur_min, cur_max)

    def _combine(self, mn, mx, cur_min, cur_max):
        raise NotImplementedError

    def recorded_finite(self) -> bool:
        """Whether some recorded batch was kept: with ``check_finite=False`` a non-finite
        batch is dropped without a host read (counted in ``nonfinite_batches``), so an
        observer whose every batch held NaN / Inf reports ``has_observed`` with its state
        still +-inf (qparams of scale eps). A host read, for conversion; per channel: any
        channel."""
        if not self._observed or self.min_val.numel() == 0:
            return False
        return bool((torch.isfinite(self.min_val) & torch.isfinite(self.max_val)).any())

    def get_qparams(self) -> QParams:
        # the recorded range gives a finite scale (refused in _record, on its host read)
        self._require_observed()
        scale, zp = _qparams_from_min_max(self.min_val, self.max_val, self.dtype, self.symmetric)
        return QParams.trusted(self.dtype, scale, zp, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a state_dict is outside input: its range must give a scale (checked first)
        _check_loaded_range(self._name(), _incoming(state_dict, prefix + "min_val", self.min_val),
                            _incoming(state_dict, prefix + "max_val", self.max_val),
                            self.symmetric, self.dtype)
        for name in ("min_val", "max_val"):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != getattr(self, name).shape:
                # per-channel state resizes to the loaded channel count; per-tensor state
                # into a per-channel observer (or the reverse) is another qconfig's: left
                # to torch's size-mismatch error
                if granularity_mismatch(self, prefix + name, t, self.axis, error_msgs):
                    continue
                setattr(self, name, torch.empty_like(t, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        finite = torch.isfinite(self.min_val) & torch.isfinite(self.max_val)
        self._observed = self.min_val.numel() > 0 and bool(finite.any())


class MinMaxObserver(_RangeObserver):
    """Running minimum and maximum; bit-identical to ``torch.ao.quantization.MinMaxObserver``
    (``axis=None``) and ``PerChannelMinMaxObserver`` (``axis=ch_axis``).

    Args:
        dtype, symmetric, axis, check_finite: see :class:`Observer`.

    Example:
        >>> obs = MinMaxObserver(gpuquant.qint8_narrow, symmetric=True, axis=0)
        >>> obs(conv.weight); qp = obs.get_qparams()
    """

    def _combine(self, mn, mx, cur_min, cur_max):
        return torch.min(mn, cur_min), torch.max(mx, cur_max)


class ExponentialMovingAverageObserver(_RangeObserver):
    """Moving average of the batch min and max.

    The first recorded batch initialises; after that
    ``min = momentum * min + (1 - momentum) * batch_min`` (likewise max), computed as
    ``min + (1 - momentum) * (batch_min - min)``, which is how
    ``torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=1 - momentum)``
    writes it (equal to float32 rounding: torch's constant is a Python double).

    Args:
        momentum: weight of the running value, in [0, 1).
        dtype, symmetric, axis, check_finite: see :class:`Observer`.

    Raises:
        ValueError: momentum outside [0, 1).
    """

    def __init__(self, momentum: float = 0.9, dtype=qint8, symmetric: bool = True,
                 axis: Optional[int] = None, check_finite: bool = True):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"momentum must be a float in [0, 1), got {type(momentum).__name__}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(dtype, symmetric, axis, check_finite)
        self.momentum = float(momentum)

    def _combine(self, mn, mx, cur_min, cur_max):
        c = 1.0 - self.momentum
        # entries never set yet (still +-inf) start from the batch value (no host branch)
        fresh = ~(torch.isfinite(cur_min) & torch.isfinite(cur_max))
        ema_min = cur_min + c * (mn - cur_min)
        ema_max = cur_max + c * (mx - cur_max)
        return torch.where(fresh, mn, ema_min), torch.where(fresh, mx, ema_max)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, " + super().extra_repr()


# --------------------------------------------------------------------------- distributed
def _dist_world(group) -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncMixin:
    """All-reduce the batch min / max (MIN / MAX) over a process group before recording, so
    every process holds the same state; a plain observer when torch.distributed is not
    initialised or the group has one process. NaN is mapped to -inf / +inf before the
    reduction, so a non-finite batch on one process is seen (and raised) on all of them."""

    _given = None  # the all-reduced (min, max) an empty local batch records

    @property
    def group(self):
        """The process group (None: the default one)."""
        ref = self.__dict__.get("_group_ref")
        return None if ref is None else ref.group

    @group.setter
    def group(self, group) -> None:
        from ..distributed import GroupRef  # shared by deepcopy: a ProcessGroup cannot copy
        self.__dict__["_group_ref"] = GroupRef(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An empty local batch still joins the all-reduce (the other processes wait in it;
        # skipping it would pair this process's next call with their current one) and
        # records the global batch, as torch.nn.SyncBatchNorm lets empty ranks take part.
        if (self.enabled and isinstance(x, torch.Tensor) and x.numel() == 0
                and x.dtype in _FLOAT_DTYPES and _dist_world(self.group) > 1):
            with torch.no_grad():
                axis = self._resolve_axis(x)
                shape = () if axis is None else (x.shape[axis],)
                dev = self.nonfinite_batches.device
                mn, mx = self._reduce(torch.full(shape, math.inf, device=dev),
                                      torch.full(shape, -math.inf, device=dev))
                if bool((mn <= mx).all()):  # some process had data (one read, empty only)
                    self._given = (mn, mx)
                    try:
                        self._record(x)
                    finally:
                        self._given = None
            return x
        return super().forward(x)

    def _batch_min_max(self, x: torch.Tensor):
        if self._given is not None:
            return self._given
        return super()._batch_min_max(x)

    def _reduce(self, mn, mx):
        if _dist_world(self.group) <= 1:
            return mn, mx
        import torch.distributed as dist
        mn, mx = mn.contiguous(), mx.contiguous()
        dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.group)
        return mn, mx


class SyncMinMaxObserver(_SyncMixin, MinMaxObserver):
    """:class:`MinMaxObserver` whose batch min / max are all-reduced over ``group`` (default:
    torch.distributed's default group) when running distributed. No host sync besides the
    all_reduce (and the ``check_finite`` read).

    Args:
        group: a torch.distributed process group, or None for the default group.
        dtype, symmetric, axis, check_finite: see :class:`Observer`.
    """

    def __init__(self, dtype=qint8, symmetric: bool = True, axis: Optional[int] = None,
                 check_finite: bool = True, group=None):
        super().__init__(dtype, symmetric, axis, check_finite)
        self.group = check_group(group, type(self).__name__)


class SyncExponentialMovingAverageObserver(_SyncMixin, ExponentialMovingAverageObserver):
    """:class:`ExponentialMovingAverageObserver` with the batch min / max all-reduced over
    ``group`` (see :class:`SyncMinMaxObserver`)."""

    def __init__(self, momentum: float = 0.9, dtype=qint8, symmetric: bool = True,
                 axis: Optional[int] = None, check_finite: bool = True, group=None):
        super().__init__(momentum, dtype, symmetric, axis, check_finite)
        self.group = check_group(group, type(self).__name__)


# --------------------------------------------------------------------------- histogram
class HistogramObserver(Observer):
    """Calibration observer: a histogram of the recorded values and a clipping range chosen
    from it (per-tensor only).

    Symmetric: a histogram of ``|x|`` over ``[0, amax]``; the range is ``[-t, t]``.
    Affine: a histogram of ``x`` over ``[min(x_min, 0), max(x_max, 0)]``; the range ``[lo, hi]``.
    The histogram has ``bins`` bins; when a batch falls outside the current range the range
    grows and the old counts are re-binned assuming a uniform density inside each old bin
    (all on the device, no host sync besides the NaN check).

    Modes:

    * ``"percentile"``: ``t`` = the ``percentile``-th percentile of ``|x|`` (symmetric), or
      ``lo`` / ``hi`` = the ``(100 - percentile)``-th / ``percentile``-th percentiles of ``x``
      (affine), interpolated inside a bin.
    * ``"mse"`` (default): the range minimising the quantization mean squared error of the
      histogram, each bin's count standing at its centre and fake-quantized with the
      candidate range's qparams (NVIDIA pytorch-quantization's ``_compute_amax_mse``;
      PyTorch's HistogramObserver minimises the same L2 error with a greedy search).
      Symmetric: every bin edge from ``bins // 32`` up is a candidate. Affine: a
      ``grid x grid`` search over the lower and upper edge.

    The resulting qparams use the same formulas as :class:`MinMaxObserver` on the chosen range.

    Args:
        dtype, symmetric, check_finite: see :class:`Observer`.
        bins: number of histogram bins (>= 64).
        mode: ``"mse"`` or ``"percentile"``.
        percentile: for ``mode="percentile"``, in (0, 100].
        grid: candidates per edge for the affine MSE search.
        axis: must be None (per-tensor only).

    Raises:
        ValueError: bad mode, percentile, bins or an axis.
    """

    MODES = ("mse", "percentile")

    def __init__(self, dtype=qint8, symmetric: bool = True, axis: Optional[int] = None,
                 check_finite: bool = True, bins: int = 2048, mode: str = "mse",
                 percentile: float = 99.99, grid: int = 96):
        super().__init__(dtype, symmetric, axis, check_finite)
        if self.axis is not None:
            raise ValueError(f"HistogramObserver is per-tensor only, got axis={axis!r}; use "
                             f"MinMaxObserver for per-channel ranges")
        if mode not in self.MODES:
            raise ValueError(f"HistogramObserver mode must be one of {self.MODES}, got {mode!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 64:
            raise ValueError(f"bins must be an int >= 64, got {bins!r}")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        self.bins, self.mode, self.percentile, self.grid = bins, mode, float(percentile), grid
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("hist_lo", torch.zeros((), dtype=torch.float32))
        self.register_buffer("hist_hi", torch.zeros((), dtype=torch.float32))
        self.register_buffer("min_val", torch.full((), math.inf))
        self.register_buffer("max_val", torch.full((), -math.inf))

    # ---------------------------------------------------------------- recording
    def _prospective_range(self, mn, mx):
        """The histogram's range ``(lo, hi)`` after a batch with min/max ``mn``/``mx``."""
        if self.symmetric:
            b_lo = torch.zeros_like(mn)
            b_hi = torch.max(-mn, mx)
        else:
            b_lo, b_hi = torch.clamp(mn, max=0.0), torch.clamp(mx, min=0.0)
        have = torch.isfinite(self.min_val)
        lo = torch.where(have, torch.min(self.hist_lo, b_lo), b_lo)
        hi = torch.where(have, torch.max(self.hist_hi, b_hi), b_hi)
        return lo, hi

    def _record(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_min_max(x)
        # the bins span [lo, hi]: affine, hi - lo must not overflow float32 (checked here)
        lo, hi = self._prospective_range(mn, mx)
        ok = self._finite_mask(mn, mx, (lo, hi))
        if not self.check_finite:  # a dropped batch must still index the bins safely
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        v = x.abs() if self.symmetric else x
        lo = torch.where(ok, lo, self.hist_lo)
        hi = torch.where(ok, hi, self.hist_hi)
        old = self._rebin(lo, hi)
        new = self._counts(v, lo, hi)
        self.histogram.copy_(torch.where(ok, old + new, self.histogram))
        self.hist_lo.copy_(torch.where(ok, lo, self.hist_lo))
        self.hist_hi.copy_(torch.where(ok, hi, self.hist_hi))
        self.min_val.copy_(torch.where(ok, torch.min(self.min_val, mn), self.min_val))
        self.max_val.copy_(torch.where(ok, torch.max(self.max_val, mx), self.max_val))
        self._observed = True

    @staticmethod
    def _width(lo, hi):
        return torch.clamp(hi - lo, min=1e-30)

    def _counts(self, v, lo, hi) -> torch.Tensor:
        nb = self.bins
        w = self._width(lo, hi)
        idx = ((v.reshape(-1) - lo) * (nb / w)).floor().clamp(0, nb - 1).to(torch.int64)
        counts = torch.zeros(nb, dtype=torch.float64, device=v.device)
        counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        return counts

    def _rebin(self, lo, hi) -> torch.Tensor:
        """The current histogram spread over the new range ``[lo, hi]`` (which contains the
        old one): interpolate the old cumulative counts at the new bin edges."""
        nb = self.bins
        dev = self.histogram.device
        cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), self.histogram.cumsum(0)])
        edges = lo.double() + self._width(lo, hi).double() * torch.arange(nb + 1, device=dev,
                                                                             dtype=torch.float64) / nb
        old_lo = self.hist_lo.double()
        old_w = self._width(self.hist_lo, self.hist_hi).double()
        pos = ((edges - old_lo) / old_w * nb).clamp(0, nb)
        i = pos.floor().clamp(max=nb - 1).to(torch.int64)
        frac = pos - i
        f = cum[i] + frac * self.histogram[i]
        return f[1:] - f[:-1]

    # ---------------------------------------------------------------- range choice
    def _bin_edges(self):
        nb = self.bins
        lo = self.hist_lo.double()
        w = self._width(self.hist_lo, self.hist_hi).double()
        return lo + w * torch.arange(nb + 1, device=lo.device, dtype=torch.float64) / nb

    def _percentile_value(self, p: float) -> torch.Tensor:
        """Value below which a fraction ``p`` of the mass lies (float64, 0-d)."""
        edges = self._bin_edges()
        cum = self.histogram.cumsum(0)
        total = cum[-1]
        target = total * p
        # 1-element index tensors throughout: indexing with a 0-d tensor would read it on the host
        i = torch.searchsorted(cum, target.reshape(1)).clamp(max=self.bins - 1)
        prev = torch.where(i > 0, cum.gather(0, (i - 1).clamp(min=0)), torch.zeros_like(cum[:1]))
        cnt = self.histogram.gather(0, i)
        frac = torch.where(cnt > 0, (target - prev) / torch.where(cnt > 0, cnt, 1.0), 0.0)
        e0, e1 = edges.gather(0, i), edges.gather(0, i + 1)
        return (e0 + frac.clamp(0, 1) * (e1 - e0)).reshape(())

    def _mse(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Quantization MSE of the histogram for candidate ranges ``lo``/``hi`` (1-D, float32)."""
        edges = self._bin_edges()
        centers = ((edges[1:] + edges[:-1]) / 2).float()[None, :]
        counts = self.histogram.float()
        out = []
        for k in range(0, lo.numel(), 512):  # bounded memory: 512 x bins at a time
            scale, zp = _qparams_from_min_max(lo[k:k + 512], hi[k:k + 512], self.dtype,
                                              self.symmetric)
            s, z = scale[:, None], zp[:, None].float()
            q = (torch.round(centers * (1.0 / s)) + z).clamp_(self.dtype.qmin, self.dtype.qmax)
            err = (q - z).mul_(s).sub_(centers).double()
            # squared in float64: float32 overflows past |x| ~ 1e19 (inf, then inf * an empty
            # bin's 0 = NaN, and argmin picked the first NaN)
            out.append((err * err) @ counts.double())
        return torch.cat(out) / counts.sum().clamp(min=1)

    def _choose_range(self):
        edges = self._bin_edges()
        if self.symmetric:
            if self.mode == "percentile":
                t = self._percentile_value(self.percentile / 100.0).float()
            else:
                cand = edges[max(1, self.bins // 32):].float()
                err = self._mse(-cand, cand)
                t = cand.gather(0, torch.argmin(err).reshape(1)).reshape(())
            return -t, t
        if self.mode == "percentile":
            tail = (100.0 - self.percentile) / 100.0
            lo = self._percentile_value(tail).float()
            hi = self._percentile_value(1.0 - tail).float()
            return torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        g = self.grid
        nb = self.bins
        li = torch.linspace(0, nb // 2, g, device=edges.device).round().long()
        ri = torch.linspace(nb, nb // 2, g, device=edges.device).round().long()
        lo_c = edges[li].float().clamp(max=0.0)
        hi_c = edges[ri].float().clamp(min=0.0)
        lo_g = lo_c[:, None].expand(g, g).reshape(-1)
        hi_g = hi_c[None, :].expand(g, g).reshape(-1)
        best = torch.argmin(self._mse(lo_g, hi_g)).reshape(1)
        return lo_g.gather(0, best).reshape(()), hi_g.gather(0, best).reshape(())

    def recorded_finite(self) -> bool:
        """Whether some recorded batch was kept: with ``check_finite=False`` a non-finite
        batch is dropped without a host read (counted in ``nonfinite_batches``), so an
        observer whose every batch held NaN / Inf reports ``has_observed`` with an empty
        histogram (qparams of scale eps). A host read, for conversion (as
        ``MinMaxObserver.recorded_finite``)."""
        if not self._observed:
            return False
        return bool(torch.isfinite(self.min_val)) and bool(self.histogram.sum() > 0)

    def get_qparams(self) -> QParams:
        self._require_observed()
        lo, hi = self._choose_range()  # inside the recorded range: a finite scale
        scale, zp = _qparams_from_min_max(lo, hi, self.dtype, self.symmetric)
        return QParams.trusted(self.dtype, scale, zp, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a state_dict is outside input: the bins' range must fit float32 (checked first)
        hist = _incoming(state_dict, prefix + "histogram", self.histogram)
        if bool(torch.isfinite(_incoming(state_dict, prefix + "min_val", self.min_val)).all()) \
                and bool(hist.sum() > 0):
            _check_loaded_range(self._name(), _incoming(state_dict, prefix + "hist_lo",
                                                        self.hist_lo),
                                _incoming(state_dict, prefix + "hist_hi", self.hist_hi),
                                self.symmetric, self.dtype)
        t = state_dict.get(prefix + "histogram")
        if t is not None and t.shape != self.histogram.shape:
            self.histogram = torch.empty_like(t, device=self.histogram.device)
            self.bins = t.numel()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._observed = bool(torch.isfinite(self.min_val)) and bool(self.histogram.sum() > 0)

    def extra_repr(self) -> str:
        extra = f", percentile={self.percentile}" if self.mode == "percentile" else ""
        return super().extra_repr() + f", mode={self.mode!r}, bins={self.bins}{extra}"


# --------------------------------------------------------------------------- passive
class PassiveObserver(Observer):
    """Holds qparams set by the user or learned elsewhere (LSQ / TQT, an imported model);
    records nothing.

    Args:
        dtype: the dtype the qparams must have.
        axis: None or the per-channel axis the qparams must have.
        symmetric: kept for a uniform signature (informational).

    Example:
        >>> obs = PassiveObserver(gpuquant.qint8)
        >>> obs.set_qparams(QParams(gpuquant.qint8, 0.05, 0))
    """

    def __init__(self, dtype=qint8, symmetric: bool = True, axis: Optional[int] = None,
                 check_finite: bool = True):
        super().__init__(dtype, symmetric, axis, check_finite)
        shape = (0,) if self.axis is not None else ()
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("is_set", torch.zeros((), dtype=torch.bool))

    def _record(self, x: torch.Tensor) -> None:
        return None  # passive: nothing to record

    def set_qparams(self, qparams: QParams) -> None:
        """Set the qparams :meth:`get_qparams` returns.

        Raises:
            TypeError: not a QParams.
            ValueError: dtype or axis differ from the observer's.
        """
        if not isinstance(qparams, QParams):
            raise TypeError(f"{self._name()}.set_qparams needs a gpuquant.QParams, got "
                            f"{type(qparams).__name__}")
        if qparams.dtype != self.dtype:
            raise ValueError(f"{self._name()}: qparams dtype {qparams.dtype.name} differs from the "
                             f"observer's {self.dtype.name}")
        if qparams.axis != self.axis:
            raise ValueError(f"{self._name()}: qparams axis {qparams.axis!r} differs from the "
                             f"observer's axis {self.axis!r}")
        dev = self.scale.device
        self.scale = qparams.scale.detach().to(dev, torch.float32).clone()
        self.zero_point = qparams.zero_point.detach().to(dev, torch.int32).clone()
        self.is_set.fill_(True)
        self._observed = True

    def get_qparams(self) -> QParams:
        if not self._observed:
            raise ValueError(f"{self._name()} has not observed any data: its qparams were never "
                             f"set; call set_qparams() (or load a state_dict) first")
        return QParams.trusted(self.dtype, self.scale, self.zero_point, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # validate first (a state_dict is outside input): a refused state leaves this as it was
        is_set = state_dict.get(prefix + "is_set", self.is_set)
        scale = state_dict.get(prefix + "scale", self.scale)
        zp = state_dict.get(prefix + "zero_point", self.zero_point)
        if isinstance(is_set, torch.Tensor) and bool(is_set) and \
                all(isinstance(t, torch.Tensor) for t in (scale, zp)) and \
                (self.axis is None) == (scale.dim() == 0):  # (else torch's size error)
            try:
                QParams(self.dtype, scale.detach().float(), zp.detach(), self.axis)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self._name()}: the state's qparams are invalid: {e}; "
                                 f"refusing to load it (the observer keeps its state)") from None
        mismatch = False
        for name in ("scale", "zero_point"):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != getattr(self, name).shape:
                if granularity_mismatch(self, prefix + name, t, self.axis, error_msgs):
                    mismatch = True
                    continue
                setattr(self, name, torch.empty_like(t, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if mismatch:  # load_state_dict raises the message
            return
        self._observed = bool(self.is_set)
