"""Fake-quantization modules and the one function QAT modules call.

* :class:`FakeQuantize`: fake-quantizes with the qparams it is given (an observer's);
  :func:`gpuquant.functional.fake_quant` (straight-through estimator).
* :class:`LSQ`: learned step size (Esser et al. 2019, "Learned Step Size Quantization"), with
  the paper's gradient scale ``g = 1 / sqrt(numel * qmax)`` (contract section 1),
  ``numel`` the elements of the whole tensor, per-tensor and per-channel alike, as torch's
  ``_LearnableFakeQuantize`` computes it. Gradients are those of
  ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine`` (the
  outside reference).
* :class:`TQT`: trained quantization thresholds (Jain et al. 2019): a learned ``log2 t``,
  power-of-two scale ``2**ceil(log2 t) / (qmax + 1)``, zero point 0, gradients per the
  paper (straight-through on ``ceil`` and ``round``).
* :func:`apply_fake_quant_with_observer`: observer, then fake quant (MegEngine's
  ``_apply_fakequant_with_observer``).

Initialisation of the learned scales (a decision): LSQ and TQT take their first value from
the first qparams they are given, i.e. from the observer that precedes them in a QConfig
(a MinMax or moving-average range: close to optimal for a pretrained network and identical
to what a plain :class:`FakeQuantize` run would have used), and learn from there. With no
qparams at hand (``init="data"``, or none given), LSQ uses the paper's
``2 * mean(|x|) / sqrt(qmax)`` and TQT ``log2(max |x|)`` (per channel where ``axis`` is set).
Run one forward pass before building the optimizer's state: per-channel parameters take
their channel count then (the Parameter object stays the same).

Backend ops (optional fused kernels; this module's torch code is the definition):

``lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor) -> y``
    ``x`` float32/16/bf16 of any shape; ``scale`` float32, 0-d (``axis`` None) or 1-D of
    ``x.shape[axis]`` (``axis`` a non-negative int), positive; ``zero_point`` float32 of the
    same shape (the forward uses ``clamp(rne(zero_point), qmin, qmax)``); ``grad_factor`` a
    Python float. ``y`` in ``x.dtype`` equals ``fake_quant`` with that scale and rounded zero
    point. Differentiable in ``x``, ``scale`` and ``zero_point`` with torch's learnable
    fake-quant gradients: ``r = rne(x * (1/scale) + zp)`` (float32), inside
    ``= qmin <= r <= qmax``; ``dx = dy * inside``; per element
    ``dscale = dy * ((clamp(r) - zp) * scale - x) * (1/scale) * g`` inside, else
    ``dy * (qmin - zp) * g`` below / ``dy * (qmax - zp) * g`` above; ``dzp = -dy * scale * g``
    below or above, else 0; both summed over everything but ``axis``. A NaN ``r`` (a NaN x,
    or a NaN scale / zero point) is neither inside, below nor above: 0 in every gradient.

``tqt_fake_quant(x, log2_t, qmin, qmax, axis) -> y``
    ``log2_t`` float32, 0-d or 1-D along ``axis``; ``s = 2**ceil(log2_t) / (qmax + 1)``
    (the exponent ``ceil(log2_t)`` clamped to [-126, 127]);
    ``y = clamp(rne(x * (1/s)), qmin, qmax) * s`` in ``x.dtype``. Differentiable in ``x``
    (``dy`` where ``qmin <= rne(x/s) <= qmax``) and ``log2_t``
    (``sum dy * s * ln2 * (rne(x/s) - x/s | qmin | qmax)`` inside / below / above; 0 from a
    NaN x, as LSQ; NaN for a NaN ``log2_t``, its scale being NaN).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn

from .._compile import EagerUnderCompile, eager_under_compile
from .._tensors import keep_dtype
from .. import functional as F
from ..backends.registry import find_op, try_op
from ..dtypes import observed_dtype, qint8
from ..qparams import _MIN_SCALE, QParams
from .._checks import check_bool
from .observer import granularity_mismatch

__all__ = ["FakeQuantBase", "FakeQuantize", "LSQ", "TQT", "apply_fake_quant_with_observer",
           "lsq_fake_quant", "tqt_fake_quant"]

_EPS = torch.finfo(torch.float32).eps
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bcast(t: torch.Tensor, axis: Optional[int], ndim: int) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _reduce_to(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Sum ``t`` over every dimension except ``axis`` (all of them for per-tensor)."""
    if axis is None:
        return t.sum()
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dims) if dims else t


# --------------------------------------------------------------------------- LSQ (torch)
class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        nd = x.dim()
        xf = x.float()
        s = _bcast(scale.float(), axis, nd)
        inv = 1.0 / s
        zp = _bcast(torch.round(zero_point.float()).clamp(qmin, qmax), axis, nd)
        q = (torch.round(xf * inv) + zp).clamp(qmin, qmax)
        y = (q - zp) * s
        y = torch.where(torch.isnan(xf), xf, y)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis, grad_factor)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis, g = ctx.args
        nd = x.dim()
        xf, dyf = x.float(), dy.float()
        s = _bcast(scale.float(), axis, nd)
        inv = 1.0 / s
        zp = _bcast(torch.round(zero_point.float()).clamp(qmin, qmax), axis, nd)
        r = torch.round(zp + xf * inv)  # as torch's learnable kernels: rne(zp + x * inv)
        # a NaN r (a NaN x) is neither inside, below nor above: no gradient from there
        below, above, inside = r < qmin, r > qmax, (r >= qmin) & (r <= qmax)
        dx = dyf * inside
        xfq = (r.clamp(qmin, qmax) - zp) * s
        ds_in = dyf * (xfq - xf) * inv * g
        zero = torch.zeros_like(dyf)
        ds_out = torch.where(below, dyf * (qmin - zp), torch.where(above, dyf * (qmax - zp),
                                                                   zero)) * g
        dscale = torch.where(inside, ds_in, ds_out)
        dzp = torch.where(below | above, dyf * (-1) * s * g, zero)
        dscale = _reduce_to(dscale, axis).reshape(scale.shape).to(scale.dtype)
        dzp = _reduce_to(dzp, axis).reshape(zero_point.shape).to(zero_point.dtype)
        return (dx.to(x.dtype), dscale if ctx.needs_input_grad[1] else None,
                dzp if ctx.needs_input_grad[2] else None, None, None, None, None)


def _bad_scale(s: torch.Tensor) -> torch.Tensor:
    """Where a float32 scale is unusable (QParams' rule): NaN, Inf, <= 0, or a reciprocal
    ``1 / scale`` that is not a finite float32 (scale below ~2.94e-39)."""
    s = s.detach().float()
    return ~torch.isfinite(s) | (s <= 0) | ~torch.isfinite(1.0 / s)


_NO_SCALE = "gives no usable scale (finite, > 0, with a finite float32 reciprocal)"


def _scale_error(what: str, s: torch.Tensor, bad: torch.Tensor) -> str:
    """The text naming the bad scale values (host reads: error path only)."""
    return (f"{what} must be finite and > 0 with a finite float32 reciprocal "
            f"(in [{_MIN_SCALE:.3g}, 3.4e38]), got {s.detach()[bad].flatten()[:4].tolist()} "
            f"(at {int(bad.sum())} position(s))")


def _check_learned_args(fn: str, x, params: dict, qmin, qmax, axis):
    """The argument checks of the public learned fake-quant functions (the Triton op's own,
    plus the Python-number arguments), before any backend is chosen, so every backend
    refuses the same inputs. No host sync. Returns ``axis`` (None or non-negative)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} ({v!r})")
    if not qmin <= qmax:
        raise ValueError(f"{fn}: need qmin <= qmax, got {qmin}, {qmax}")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"{fn}: axis must be None or an int, got {type(axis).__name__} "
                            f"({axis!r})")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"{fn}: axis {axis} out of range for {x.dim()}-d x; allowed "
                             f"[{-x.dim()}, {x.dim() - 1}]")
        axis = axis % x.dim()  # (a negative axis counts from the end, as in torch)
    want = 1 if axis is None else x.shape[axis]
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a float tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        if p.device != x.device:
            raise ValueError(f"{fn}: {name} is on {p.device}, x on {x.device}")
        if p.numel() != want or (axis is not None and p.dim() != 1):
            raise ValueError(f"{fn}: {name} must have {want} value(s) "
                             f"({'0-d' if axis is None else f'(C,) along axis {axis}'}), got "
                             f"shape {tuple(p.shape)}")
    return axis


@eager_under_compile
def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                   qmax: int, axis: Optional[int], grad_factor: float) -> torch.Tensor:
    """LSQ fake quantization (signature and gradients in the module docstring); runs the
    backend op ``"lsq_fake_quant"`` where one is registered for ``x``'s device, else the torch
    definition here.

    The arguments are checked first, on every backend alike; the check of the values of
    ``scale`` and ``zero_point`` costs one scalar device-to-host read (:class:`LSQ`, whose
    scale is valid by construction, calls the unchecked form: no host sync).

    Raises:
        TypeError: x not a float32/float16/bfloat16 tensor; scale or zero_point not float
            tensors; qmin, qmax, axis not ints; grad_factor not a number.
        ValueError: qmin > qmax; axis out of range (None or in [-x.dim(), x.dim() - 1]);
            scale / zero_point of the wrong shape or device; a scale that is not finite and
            > 0 with a finite float32 reciprocal; a non-finite zero point or grad_factor.
    """
    fn = "lsq_fake_quant"
    axis = _check_learned_args(fn, x, {"scale": scale, "zero_point": zero_point}, qmin, qmax,
                               axis)
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real):
        raise TypeError(f"{fn}: grad_factor must be a float, got {type(grad_factor).__name__} "
                        f"({grad_factor!r})")
    if not math.isfinite(grad_factor):
        raise ValueError(f"{fn}: grad_factor must be finite, got {grad_factor!r}")
    bad = _bad_scale(scale)
    zp_bad = ~torch.isfinite(zero_point.detach())
    if bool(bad.any() | zp_bad.any()):  # the one host read
        if bool(bad.any()):
            raise ValueError(f"{fn}: {_scale_error('scale', scale, bad)}")
        raise ValueError(f"{fn}: zero_point must be finite, got "
                         f"{zero_point.detach()[zp_bad].flatten()[:4].tolist()}")
    return _lsq_fake_quant(x, scale, zero_point, int(qmin), int(qmax), axis, float(grad_factor))


def _lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor):
    """:func:`lsq_fake_quant` without the checks (the LSQ module: no host sync)."""
    op = find_op("lsq_fake_quant", x)
    if op is not None:
        return op(x, scale, zero_point, qmin, qmax, axis, grad_factor)
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)


# --------------------------------------------------------------------------- TQT (torch)
_MIN_NORMAL = 2.0 ** -126  # float32's smallest normal number: its reciprocal is finite


def _tqt_scale(log2_t: torch.Tensor, qmax: int) -> torch.Tensor:
    """``2**ceil(log2_t) / (qmax + 1)`` with the exponent clamped to [-126, 127] and the
    scale to at least 2**-126 (a NaN kept), as the Triton kernels build it from exponent
    bits: every learned ``log2_t`` gives a scale with a finite reciprocal. (A ``log2_t`` past
    127 had given an Inf scale, NaN outputs, here and a finite one there; one below about
    -119 a scale whose reciprocal is Inf, and 0 * Inf at x = 0.)"""
    s = torch.exp2(torch.ceil(log2_t.float()).clamp(-126.0, 127.0)) / float(qmax + 1)
    return s.clamp_min(_MIN_NORMAL)


def _tqt_checked_scale(log2_t: torch.Tensor, qmax: int) -> torch.Tensor:
    """The scale ``2**ceil(log2_t) / (qmax + 1)`` unclamped, for the checks (of the
    functional op's arguments, an initial threshold, a loaded state, a conversion): Inf
    where ``ceil(log2_t) > 127`` (no float32 power of two), 0 where it is below 2**-126
    (a threshold the clamps of :func:`_tqt_scale` would move)."""
    c = torch.ceil(log2_t.detach().float())
    s = torch.exp2(c.clamp(max=127.0)) / float(qmax + 1)
    return torch.where(c > 127, torch.inf, torch.where(s < _MIN_NORMAL, 0.0, s))


class _TQTFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log2_t, qmin, qmax, axis):
        nd = x.dim()
        xf = x.float()
        s = _bcast(_tqt_scale(log2_t, qmax), axis, nd)
        inv = 1.0 / s  # exact: s is a power of two
        r = torch.round(xf * inv)
        y = r.clamp(qmin, qmax) * s
        y = torch.where(torch.isnan(xf), xf, y)
        ctx.save_for_backward(x, log2_t)
        ctx.args = (qmin, qmax, axis)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, log2_t = ctx.saved_tensors
        qmin, qmax, axis = ctx.args
        nd = x.dim()
        xf, dyf = x.float(), dy.float()
        s = _bcast(_tqt_scale(log2_t, qmax), axis, nd)
        inv = 1.0 / s
        v = xf * inv
        r = torch.round(v)
        # a NaN r (a NaN x) is neither inside, below nor above: no gradient from there
        below, above, inside = r < qmin, r > qmax, (r >= qmin) & (r <= qmax)
        dx = dyf * inside
        inner = torch.where(inside, r - v, torch.where(below, torch.full_like(v, qmin),
                                                        torch.where(above, torch.full_like(
                                                            v, qmax), torch.zeros_like(v))))
        dl = _reduce_to(dyf * inner * s * math.log(2.0), axis).reshape(log2_t.shape)
        return dx.to(x.dtype), (dl.to(log2_t.dtype) if ctx.needs_input_grad[1] else None), \
            None, None, None


@eager_under_compile
def tqt_fake_quant(x: torch.Tensor, log2_t: torch.Tensor, qmin: int, qmax: int,
                   axis: Optional[int]) -> torch.Tensor:
    """TQT fake quantization (signature and gradients in the module docstring); runs the
    backend op ``"tqt_fake_quant"`` where one is registered, else the torch definition.

    The arguments are checked first, on every backend alike; the check of the scale
    ``2**ceil(log2_t) / (qmax + 1)`` costs one scalar device-to-host read (:class:`TQT`
    calls the unchecked form: no host sync).

    Raises:
        TypeError: x not a float32/float16/bfloat16 tensor; log2_t not a float tensor; qmin,
            qmax, axis not ints.
        ValueError: qmin > qmax; qmax < 0; axis out of range (None or in [-x.dim(),
            x.dim() - 1]); log2_t of the wrong shape or device; a log2_t whose scale is not
            finite and > 0 with a finite float32 reciprocal (NaN, or log2_t beyond about
            +-120).
    """
    fn = "tqt_fake_quant"
    axis = _check_learned_args(fn, x, {"log2_t": log2_t}, qmin, qmax, axis)
    if qmax < 0:  # (no threshold: the scale 2**ceil(log2_t) / (qmax + 1) is inf or negative)
        raise ValueError(f"{fn}: qmax must be >= 0 (the scale is 2**ceil(log2_t) / "
                         f"(qmax + 1)), got qmax={qmax}")
    s = _tqt_checked_scale(log2_t, int(qmax))
    bad = _bad_scale(s)
    if bool(bad.any()):  # the one host read
        raise ValueError(f"{fn}: log2_t {log2_t.detach()[bad].flatten()[:4].tolist()} gives "
                         f"{_scale_error('a scale 2**ceil(log2_t) / (qmax + 1) that', s, bad)}")
    return _tqt_fake_quant(x, log2_t, int(qmin), int(qmax), axis)


def _tqt_fake_quant(x, log2_t, qmin, qmax, axis):
    """:func:`tqt_fake_quant` without the checks (the TQT module: no host sync)."""
    op = find_op("tqt_fake_quant", x)
    if op is not None:
        return op(x, log2_t, qmin, qmax, axis)
    return _TQTFakeQuant.apply(x, log2_t, qmin, qmax, axis)


# --------------------------------------------------------------------------- modules
class FakeQuantBase(EagerUnderCompile, nn.Module):
    """Base of the fake-quant modules: ``forward(x, qparams) -> tensor``; when disabled,
    ``forward`` returns ``x`` unchanged. ``get_qparams()`` returns learned qparams (LSQ, TQT)
    or None (qparams come from the observer).

    Args:
        dtype: the quantized dtype simulated: one of ``gpuquant.dtypes.OBSERVED_DTYPES`` (not
            qint32, the bias's).

    Raises:
        ValueError: another dtype (qint32), or an unknown name; TypeError: not a dtype.
    """

    def __init__(self, dtype=qint8):
        super().__init__()
        self.dtype = observed_dtype(dtype, type(self).__name__)
        self.enabled = True

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) move learned scales (float32) but keep their
        # dtype: the qparams stay float32 and small optimizer steps are not rounded away
        return super()._apply(keep_dtype(fn), recurse)

    def enable(self) -> "FakeQuantBase":
        self.enabled = True
        return self

    def disable(self) -> "FakeQuantBase":
        self.enabled = False
        return self

    # the enabled switch travels in state_dict() (extra state: read on the host every call)
    def get_extra_state(self):
        return {"enabled": self.enabled}

    def set_extra_state(self, state) -> None:
        self.enabled = bool(state["enabled"])

    def get_qparams(self) -> Optional[QParams]:
        return None

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: input must be float32, float16 or bfloat16, "
                            f"got {x.dtype}")

    def _check_qparams(self, qparams) -> None:
        if not isinstance(qparams, QParams):
            raise TypeError(f"{type(self).__name__}: qparams must be a gpuquant.QParams, got "
                            f"{type(qparams).__name__}")
        if qparams.dtype != self.dtype:
            raise ValueError(f"{type(self).__name__} simulates {self.dtype.name} but got qparams "
                             f"for {qparams.dtype.name} (observer and fake quant of a QConfig "
                             f"must agree)")

    def extra_repr(self) -> str:
        return f"dtype={self.dtype.name}, enabled={self.enabled}"


class FakeQuantize(FakeQuantBase):
    """Fake-quantize with the given qparams (an observer's):
    :func:`gpuquant.functional.fake_quant`, straight-through gradient.

    Args:
        dtype: the quantized dtype; the qparams passed to ``forward`` must have it.

    Raises (forward):
        TypeError: qparams is not a QParams; ValueError: its dtype differs.
    """

    def forward(self, x: torch.Tensor, qparams: QParams) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_qparams(qparams)
        return F.fake_quant(x, qparams)


class _LearnedBase(FakeQuantBase):
    """Shared plumbing of LSQ / TQT: an ``initialized`` buffer (with a host mirror) and
    per-channel parameters sized on first use or on load."""

    INITS = ("qparams", "data")

    def __init__(self, dtype, axis, init):
        super().__init__(dtype)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be None or an int, got {type(axis).__name__} ({axis!r})")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        self.axis = axis
        self.init = init
        self._initialized = False
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _param_shape(self):
        return () if self.axis is None else (0,)

    def _resolve_axis(self, x: torch.Tensor) -> Optional[int]:
        if self.axis is None:
            return None
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"{type(self).__name__}: axis {self.axis} out of range for a tensor "
                             f"of {x.dim()} dimensions; allowed: [{-x.dim()}, {x.dim() - 1}]")
        return self.axis % x.dim()

    def _check_channels(self, x: torch.Tensor, axis: Optional[int], p: torch.Tensor) -> None:
        if axis is not None and p.numel() != x.shape[axis]:
            raise ValueError(f"{type(self).__name__}: tensor has {x.shape[axis]} channels along "
                             f"axis {self.axis} but the learned parameters have {p.numel()}")

    def _usable_qparams(self, qparams, x) -> Optional[QParams]:
        if qparams is None or self.init == "data":
            return None
        self._check_qparams(qparams)
        if qparams.axis is not None and self.axis is None or \
                qparams.axis is None and self.axis is not None:
            raise ValueError(f"{type(self).__name__}(axis={self.axis!r}) cannot start from qparams "
                             f"with axis={qparams.axis!r}")
        qparams.check_tensor(x)
        return qparams

    def _prepare(self, x: torch.Tensor, qparams, learned: str) -> Optional[int]:
        """Start of ``forward``: check ``x``, initialise on first use (from ``qparams`` or the
        data), check the channels of the parameter ``learned``; returns the resolved axis."""
        self._check_input(x)
        axis = self._resolve_axis(x)
        if not self._initialized:
            qp = self._usable_qparams(qparams, x)
            if qp is None and (x.numel() == 0 or not bool(torch.isfinite(x.detach()).all())):
                # (once: the first call) a NaN / Inf or empty batch would start the learned
                # parameter at NaN or Inf for good
                raise ValueError(f"{type(self).__name__}: the first input initialises "
                                 f"{learned} from the data, and it "
                                 f"{'is empty' if x.numel() == 0 else 'contains NaN or Inf'}; "
                                 f"start it on a finite, non-empty batch (or from qparams)")
            self._initialize(x, axis, qp)
        self._check_channels(x, axis, getattr(self, learned))
        return axis

    def _check_start(self, scale: torch.Tensor, learned: str, source: str) -> None:
        """Refuse an initial (effective) scale that is not a finite float32 with a finite
        float32 reciprocal (QParams' rule), before anything is set: the module then stays
        uninitialised. One host read, on the first call only."""
        bad = _bad_scale(scale)
        if bool(bad.any()):
            raise ValueError(f"{type(self).__name__}: initialising {learned} from {source} gives "
                             f"a scale that float32 cannot use: "
                             f"{_scale_error('the scale', scale.detach().float(), bad)}; start it "
                             f"from data of smaller magnitude (or from valid qparams)")

    def _set(self, name: str, value: torch.Tensor) -> None:
        p = getattr(self, name)
        # a normal tensor even when the first call runs under torch.inference_mode (a
        # calibration pass): an inference tensor as the learned parameter failed every
        # training step after it
        with torch.inference_mode(False):
            p.data = value.detach().to(p.device, torch.float32).reshape(
                () if self.axis is None else (-1,)).clone()

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized = True

    def _learned_problem(self, values=None) -> Optional[str]:
        """What makes the learned values unusable ("log2_t [-140.0] (at 1 position(s)) gives
        no usable scale ..."), or None: those of ``values(name)`` (a state being loaded), by
        default the module's own (a conversion's check: training drove them there, NaN or
        past float32; host reads)."""
        values = values or (lambda name: getattr(self, name).detach())
        for what, vals, bad, why in self._loaded_problems(values):
            if bool(bad.any()):
                return (f"{what} {vals.cpu()[bad.cpu()].flatten()[:4].tolist()} (at "
                        f"{int(bad.sum())} position(s)) {why}")
        return None

    def set_qparams(self, qparams: QParams) -> None:
        """Start the learned parameters from ``qparams`` now, as the first qparams given to
        ``forward`` would (MegEngine's ``set_qparams``;
        :func:`~gpuquant.quantization.reset_qconfig` carries trained qparams over with it).

        Raises:
            TypeError: not a QParams.
            ValueError: another dtype, per-tensor against per-channel, or a scale float32
                cannot use.
        """
        self._check_qparams(qparams)
        if (qparams.axis is None) != (self.axis is None):
            raise ValueError(f"{type(self).__name__}(axis={self.axis!r}) cannot start from "
                             f"qparams with axis={qparams.axis!r}")
        self._initialize(None, self.axis, qparams)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        init = state_dict.get(prefix + "initialized", self.initialized)
        if isinstance(init, torch.Tensor) and init.numel() == 1 and bool(init):
            # a state_dict is outside input: refuse learned values forward cannot use (a
            # diverged run's NaN scale, a log2_t past float32) before anything is copied
            def incoming(name):
                t = state_dict.get(prefix + name)
                return (t if isinstance(t, torch.Tensor) else getattr(self, name)).detach()
            why = self._learned_problem(incoming)
            if why is not None:
                raise ValueError(f"{type(self).__name__}: the state's {why}; refusing to load "
                                 f"it (the module keeps its state)")
        for name, t in list(self.named_parameters(recurse=False)) + \
                list(self.named_buffers(recurse=False)):
            src = state_dict.get(prefix + name)
            if src is not None and src.shape != t.shape:
                if name != "initialized" and granularity_mismatch(self, prefix + name, src,
                                                                  self.axis, error_msgs):
                    continue  # another qconfig's state: torch's size-mismatch error too
                t.data = torch.empty_like(src, device=t.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._initialized = bool(self.initialized)


class _ScaleMagnitude(torch.autograd.Function):
    """LSQ's scale as the forward uses it, ``max(|scale|, eps)``, with the gradient of
    ``|scale|`` passed through the clamp (-g where scale < 0, else g): below eps the
    clamp's own gradient, 0, had left a scale there for good (torch's
    ``_LearnableFakeQuantize`` clamps ``scale.data`` instead, keeping the gradient too)."""

    @staticmethod
    def forward(ctx, scale):
        ctx.save_for_backward(scale)
        return scale.abs().clamp_min(_EPS)

    @staticmethod
    def backward(ctx, g):
        scale, = ctx.saved_tensors
        return torch.where(scale < 0, -g, g)


class LSQ(_LearnedBase):
    """Learned step size quantization (Esser et al. 2019); LSQ+-style learned zero point when
    ``symmetric=False``.

    The forward pass is :func:`gpuquant.functional.fake_quant` with the learned scale
    (``|scale|``, at least float32 eps) and rounded zero point; gradients are torch's
    learnable fake-quant ones with ``grad_factor = 1 / sqrt(numel * qmax)`` (``numel`` = the
    elements of the whole tensor, per-channel too, as the contract and torch's
    ``_LearnableFakeQuantize`` have it; ``grad_scaling=False`` gives 1).

    Args:
        dtype: quantized dtype.
        axis: None (per-tensor) or the channel axis (weights: 0).
        symmetric: True keeps the zero point fixed (0 signed, ``(qmax + qmin + 1) // 2``
            unsigned); False learns it.
        init: ``"qparams"`` (from the first qparams given to ``forward``; the paper's data init
            when none are given) or ``"data"`` (always the paper's ``2 mean|x| / sqrt(qmax)``).
        grad_scaling: apply the paper's gradient scale.

    Example:
        >>> fq = LSQ(gpuquant.qint8_narrow, axis=0)
        >>> y = fq(w, observer.get_qparams())   # first call initialises the scale
    """

    def __init__(self, dtype=qint8, axis: Optional[int] = None, symmetric: bool = True,
                 init: str = "qparams", grad_scaling: bool = True):
        super().__init__(dtype, axis, init)
        check_bool(symmetric, type(self).__name__, "symmetric")
        check_bool(grad_scaling, type(self).__name__, "grad_scaling")
        self.symmetric = symmetric
        self.grad_scaling = grad_scaling
        self.scale = nn.Parameter(torch.ones(self._param_shape()))
        zp0 = torch.zeros(self._param_shape())
        if symmetric:
            self.register_buffer("zero_point", zp0)
        else:
            self.zero_point = nn.Parameter(zp0)

    def _fixed_zero_point(self) -> int:
        d = self.dtype
        return 0 if d.signed else (d.qmax + d.qmin + 1) // 2

    def _initialize(self, x: torch.Tensor, axis, qparams: Optional[QParams]) -> None:
        with torch.no_grad():
            if qparams is not None:
                s, source = qparams.scale, "the qparams"
                zp = qparams.zero_point.float()
                if self.symmetric:
                    zp = torch.full_like(zp, self._fixed_zero_point())
            else:
                a = x.detach().float().abs()
                mean = a.mean() if axis is None else a.movedim(axis, 0).reshape(x.shape[axis], -1).mean(1)
                s = torch.clamp(2.0 * mean / math.sqrt(self.dtype.qmax), min=_EPS)
                source = "the data (2 * mean|x| / sqrt(qmax), in float32)"
                zp = torch.full_like(s, self._fixed_zero_point())
            # the scale as forward uses it (_effective_scale)
            self._check_start(s.float().abs().clamp_min(_EPS), "scale", source)
            self._set("scale", s)
            self._set("zero_point", zp)
        self._mark_initialized()

    def _effective_scale(self) -> torch.Tensor:
        return _ScaleMagnitude.apply(self.scale)

    def forward(self, x: torch.Tensor, qparams: Optional[QParams] = None) -> torch.Tensor:
        if not self.enabled:
            return x
        axis = self._prepare(x, qparams, "scale")
        d = self.dtype
        # the contract's g = 1 / sqrt(numel * qmax): the whole tensor's elements, per-channel
        # too (torch's _LearnableFakeQuantize: X.numel()), not one channel's
        g = 1.0 / math.sqrt(max(x.numel(), 1) * d.qmax) if self.grad_scaling else 1.0
        return _lsq_fake_quant(x, self._effective_scale(), self.zero_point, d.qmin, d.qmax, axis,
                               g)

    def _loaded_problems(self, incoming):
        """(name, values, where unusable, why) of a state's learned values (a load's
        check, before anything is copied)."""
        s = incoming("scale").float()
        zp = incoming("zero_point").float()
        return (("scale", s, _bad_scale(s.abs().clamp_min(_EPS)) | torch.isnan(s), _NO_SCALE),
                ("zero_point", zp, ~torch.isfinite(zp), "is not finite"))

    def get_qparams(self) -> Optional[QParams]:
        """The learned qparams (no host sync), or None before initialisation."""
        if not self._initialized:
            return None
        d = self.dtype
        zp = torch.round(self.zero_point.detach()).clamp(d.qmin, d.qmax).to(torch.int32)
        return QParams.trusted(d, self._effective_scale().detach(), zp, self.axis)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", axis={self.axis}, symmetric={self.symmetric}"


class TQT(_LearnedBase):
    """Trained quantization thresholds (Jain et al. 2019): learned ``log2_t``, power-of-two
    scale ``2**ceil(log2_t) / (qmax + 1)`` (``2**(bits-1)`` for signed dtypes, ``2**bits``
    unsigned), zero point 0.

    Args:
        dtype: quantized dtype (signed for tensors of both signs; unsigned for non-negative
            ones, e.g. after ReLU).
        axis: None or the channel axis.
        init: ``"qparams"``: ``log2_t = log2(scale * max(qmax - zp, zp - qmin))`` of the first
            qparams given (the observed range), else ``log2(max|x|)``; ``"data"``: always the
            latter.
    """

    def __init__(self, dtype=qint8, axis: Optional[int] = None, init: str = "qparams"):
        super().__init__(dtype, axis, init)
        self.log2_t = nn.Parameter(torch.zeros(self._param_shape()))

    def _initialize(self, x: torch.Tensor, axis, qparams: Optional[QParams]) -> None:
        d = self.dtype
        with torch.no_grad():
            if qparams is not None:
                zp = qparams.zero_point.float()
                amax = qparams.scale.float() * torch.max(d.qmax - zp, zp - d.qmin)
                source = "the qparams (threshold scale * max(qmax - zp, zp - qmin))"
            else:
                a = x.detach().float().abs()
                amax = a.amax() if axis is None else a.movedim(axis, 0).reshape(x.shape[axis], -1).amax(1)
                source = "the data (threshold max|x|)"
            log2_t = torch.log2(torch.clamp(amax, min=_EPS * (d.qmax + 1)))
            self._check_start(_tqt_checked_scale(log2_t, d.qmax), "log2_t", source)
            self._set("log2_t", log2_t)
        self._mark_initialized()

    def forward(self, x: torch.Tensor, qparams: Optional[QParams] = None) -> torch.Tensor:
        if not self.enabled:
            return x
        axis = self._prepare(x, qparams, "log2_t")
        return _tqt_fake_quant(x, self.log2_t, self.dtype.qmin, self.dtype.qmax, axis)

    def _loaded_problems(self, incoming):
        """(name, values, where unusable, why) of a state's learned values (a load's
        check, before anything is copied)."""
        t = incoming("log2_t").float()
        return (("log2_t", t, _bad_scale(_tqt_checked_scale(t, self.dtype.qmax)), _NO_SCALE),)

    def get_qparams(self) -> Optional[QParams]:
        """The power-of-two qparams (no host sync), or None before initialisation."""
        if not self._initialized:
            return None
        scale = _tqt_scale(self.log2_t.detach(), self.dtype.qmax)
        return QParams.trusted(self.dtype, scale, torch.zeros_like(scale, dtype=torch.int32),
                               self.axis)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", axis={self.axis}"


# --------------------------------------------------------------------------- the QAT hook
def _check_quantizer_args(x, fake_quant, observer, addend) -> None:
    """Argument checks of :func:`apply_fake_quant_with_observer` (host-side only: no sync)."""
    fn = "apply_fake_quant_with_observer"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    for what, m, kind in (("fake_quant", fake_quant, "a fake-quant module (FakeQuantize, LSQ, "
                                                     "TQT: a FakeQuantBase)"),
                          ("observer", observer, "an observer module (an Observer)")):
        if m is not None and not (isinstance(m, nn.Module) and hasattr(m, "get_qparams")):
            raise TypeError(f"{fn}: {what} must be None or {kind}, got {type(m).__name__} "
                            f"({m!r:.60})")
    if addend is not None:
        if not isinstance(addend, torch.Tensor):
            raise TypeError(f"{fn}: addend must be None or a torch.Tensor, got "
                            f"{type(addend).__name__}")
        try:  # (torch.broadcast_shapes costs the host ~50 us: not for a residual's add)
            if x.shape != addend.shape:
                torch.broadcast_shapes(x.shape, addend.shape)
        except RuntimeError:
            raise ValueError(f"{fn}: addend of shape {tuple(addend.shape)} does not broadcast "
                             f"with x of shape {tuple(x.shape)}") from None


@eager_under_compile
def apply_fake_quant_with_observer(x: torch.Tensor, fake_quant: Optional[FakeQuantBase],
                                   observer, relu: bool = False,
                                   addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Observe ``x``, then fake-quantize it: the one function QAT modules call.

    ``observer(x)`` records (if it is enabled); then, if ``fake_quant`` is present and
    enabled, ``fake_quant(x, qparams)`` with ``fake_quant.get_qparams()`` (learned: LSQ, TQT)
    or else ``observer.get_qparams()``. Either may be None (a QConfig field left empty).
    ``relu=True`` applies ``torch.relu`` to ``x`` first, and ``addend`` is added before that
    (``x + addend``); a fused backend op may fold either into its passes.

    Raises:
        TypeError: ``x`` or ``addend`` not a tensor; ``fake_quant`` / ``observer`` neither
            None nor a module with ``get_qparams`` (a FakeQuantBase / an Observer).
        ValueError: ``addend``'s shape does not broadcast with ``x``'s; fake quantization
            needs qparams but there is no observer, or the observer has not observed anything
            (e.g. disabled from the start, or only empty inputs so far).
    """
    _check_quantizer_args(x, fake_quant, observer, addend)
    # ---- FUSED FAST PATH: the single place for it (Triton issue) ------------------------
    # A backend op "observe_fake_quant" (try_op("observe_fake_quant", x, ...)) may record the
    # batch statistics and fake-quantize in one pass, for the observer / fake-quant pairs it
    # supports, when both are present and enabled; it must leave the observer's state and
    # the output exactly as the calls below would. The calls below are the definition.
    # ---------------------------------------------------------------------------------------
    if observer is not None and fake_quant is not None and isinstance(x, torch.Tensor):
        more = {} if addend is None else {"addend": addend}
        y = try_op("observe_fake_quant", x, x, observer, fake_quant, relu=relu, **more)
        if y is not None:  # None: no such op, or a pair the op does not handle
            return y
    if addend is not None:
        x = x + addend
    if relu:
        x = torch.relu(x)
    if observer is not None:
        x = observer(x)
    if fake_quant is None or not fake_quant.enabled:
        return x
    qparams = fake_quant.get_qparams()
    if qparams is None:
        if observer is None:
            if isinstance(fake_quant, _LearnedBase):
                return fake_quant(x, None)  # data initialisation
            raise ValueError(f"{type(fake_quant).__name__} needs qparams but no observer was "
                             f"given (QConfig observer field is None)")
        # an empty first batch: say so (an observer without the flag reports for itself)
        if x.numel() == 0 and not getattr(observer, "has_observed", True):
            raise ValueError(f"{type(observer).__name__} has not observed any data: its input "
                             f"was empty (shape {tuple(x.shape)}) and an empty tensor records "
                             f"nothing; run a non-empty batch first")
        qparams = observer.get_qparams()
        if isinstance(fake_quant, _LearnedBase) and fake_quant.init != "data":
            _check_kept_a_batch(observer, fake_quant)
    return fake_quant(x, qparams)


def _check_kept_a_batch(observer, fake_quant) -> None:
    """Before a learned fake quant (not yet initialised: its first call) starts from
    ``observer``'s qparams: refuse an observer that kept no batch. With
    ``check_finite=False`` a NaN / Inf batch is dropped on the device and the observer still
    reports ``has_observed``, its qparams those of an empty range (scale eps), from which the
    learned scale would start and never recover. One host read, on the first call only."""
    kept = getattr(observer, "recorded_finite", None)
    if kept is None or kept():
        return
    raise ValueError(f"{type(fake_quant).__name__}: the first input initialises its learned "
                     f"qparams from {type(observer).__name__}'s, but the observer has kept no "
                     f"batch: every batch it saw held NaN or Inf (dropped under "
                     f"check_finite=False; nonfinite_batches = "
                     f"{int(observer.nonfinite_batches)}); start it on a finite batch")
