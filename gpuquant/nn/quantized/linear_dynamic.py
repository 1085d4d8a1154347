"""Integer Linears for transformers, float in and float out (drop-in for ``torch.nn.Linear``).

* :class:`DynamicLinear` (W8A8 dynamic): int8 symmetric per-output-channel weights;
  activations quantized per token (each row of the last dimension) on the fly, symmetric
  int8; int32 accumulation; epilogue ``acc * x_scale * w_scale + bias`` in float32; output in
  the input's float dtype.
* :class:`WeightOnlyLinear`: float activations, int8 per-channel weights, scale applied in
  the GEMM's epilogue (memory-bound decode).
* :class:`StaticActLinear`: W8A8 with one calibrated activation scale per tensor (the static
  mode, e.g. after SmoothQuant); same GEMM as the dynamic one.

All accept any leading dimensions, keep float biases, and run on the current backend
(:mod:`gpuquant.backends`). They hold buffers only (no parameters); their forward is the
same in training and eval mode (no dropout, no statistics), so a model holding them may be
put in training mode (``model.train()`` for adapters trained over a frozen int8 base).
Built by :func:`gpuquant.quantization.quantize_dynamic` (or ``from_float_module`` /
``from_qat_module``).

Buffers keep their dtypes through module casts: ``model.half()`` / ``.to(torch.bfloat16)``
(as HuggingFace users cast whole models) move them but leave the int8 weights int8 and
``weight_scale``, ``bias``, ``input_smoothing`` and ``act_scale`` float32 (the epilogue adds
the bias in float32); only the activations follow the input's dtype.

Gradients (frozen int8 base under a trainable adapter, e.g. LoRA): when grad is enabled
and the input requires grad, every backend gives the same straight-through gradient
``grad_x = grad_y @ W`` with ``W = weight * weight_scale[:, None]`` (the dequantized
weight), computed in float32 and returned in the input's dtype: the activation
quantization is passed straight through, the weights get no gradient (they are buffers).
Without grad the integer op runs as is, at no extra cost. The attention math of
:class:`DynamicMultiheadAttention` is ordinary float32 torch and differentiates as usual;
in training mode it applies the converted MHA's attention dropout, as torch does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...backends.reference_dynamic import EPS
from ..._compile import EagerUnderCompile
from ..._tensors import keep_dtype, version as _version
from ...backends import registry
from ...backends.registry import get_op
from ...dtypes import QuantDtype, qint8, qint8_narrow
from ...qparams import _MIN_SCALE
from ...functional.dynamic import (ACT_DTYPES, WEIGHT_DTYPES, _check_dtype, _linear_dynamic,
                                   linear_weight_only,
                                   max_in_features, quantize_per_token)
from ..attention import AttentionOverProjections, mha_supported, require_supported
from ..module import Module
from ..qat.linear_dynamic import DynamicLinear as QATDynamicLinear
from ..qat.linear_dynamic import DynamicMultiheadAttention as QATDynamicMHA

__all__ = ["DynamicLinear", "WeightOnlyLinear", "StaticActLinear", "DynamicMultiheadAttention",
           "quantize_weight_per_channel",
           "per_channel_weight_scale", "keep_off_torch_fast_path"]


def _dequantize(wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 (N, K) weight stands for: ``wq * w_scale[:, None]``."""
    return wq.to(torch.float32) * w_scale[:, None]


def _check_weight_2d(weight) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} "
                        f"{tuple(getattr(weight, 'shape', ()))}")


def per_channel_weight_scale(weight: torch.Tensor,
                             dtype: QuantDtype = qint8_narrow) -> torch.Tensor:
    """Symmetric per-output-channel scales of a (N, K) float weight, as
    ``torch.ao.quantization.PerChannelMinMaxObserver`` (qscheme per_channel_symmetric) computes
    them: ``max(max|w_n| / ((qmax - qmin) / 2), eps)`` in float32.

    Raises:
        TypeError: weight is not a 2-D float tensor.
        ValueError: dtype is not a signed int8 dtype.
    """
    _check_weight_2d(weight)
    dtype = _check_dtype(dtype, WEIGHT_DTYPES, "weight dtype")
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    # a tensor divisor, not a Python float: on CUDA, PyTorch divides by a host scalar as a
    # multiplication by its reciprocal (up to one ulp off the division the CPU does), so
    # the same weight quantized on a GPU got other scales than on the CPU (seen on an H200)
    half_range = torch.full_like(absmax, float(dtype.qmax - dtype.qmin) / 2)
    return torch.clamp(absmax / half_range, min=EPS)


def quantize_weight_per_channel(weight: torch.Tensor, dtype=qint8_narrow, scale=None):
    """(N, K) float weight -> (int8 weight, float32 scale (N,)), zero point 0.

    ``q = clamp(rne(w * (1 / scale[n])), qmin, qmax)``. ``scale`` defaults to
    :func:`per_channel_weight_scale`.

    Raises:
        TypeError: weight is not a 2-D float tensor; a given scale is not a float tensor.
        ValueError: dtype is not a signed int8 dtype; a given scale of the wrong shape, or
            not finite and > 0 with a finite float32 reciprocal (as QParams' scales).
    """
    _check_weight_2d(weight)
    d = _check_dtype(dtype, WEIGHT_DTYPES, "weight dtype")
    if bool(torch.isnan(weight).any()) or bool(torch.isinf(weight).any()):
        raise ValueError("weight contains NaN or Inf, which have no int8 value")
    if scale is not None and (not isinstance(scale, torch.Tensor)
                              or not scale.is_floating_point()):
        raise TypeError(f"scale must be a float tensor of shape ({weight.shape[0]},), got "
                        f"{getattr(scale, 'dtype', type(scale).__name__)}")
    s = per_channel_weight_scale(weight, d) if scale is None else scale.detach().to(torch.float32)
    if s.shape != (weight.shape[0],):
        raise ValueError(f"scale must have shape ({weight.shape[0]},), got {tuple(s.shape)}")
    if scale is not None:  # 0, NaN or a subnormal (1 / s = inf) made +-127 / 0 / NaN silently
        bad = ~(s.cpu() >= _MIN_SCALE) | ~torch.isfinite(s.cpu())
        if bool(bad.any()):
            raise ValueError(f"scale must be finite and > 0 with a finite float32 reciprocal "
                             f"(>= {_MIN_SCALE:.3g}), got {s.cpu()[bad][:4].tolist()} at "
                             f"{int(bad.sum())} channel(s)")
    w = weight.detach().to(torch.float32)
    q = torch.round(w * (1.0 / s)[:, None]).clamp_(d.qmin, d.qmax).to(torch.int8)
    return q, s.contiguous()


def _check_linear(mod, what: str) -> None:
    if not isinstance(mod, torch.nn.Linear):
        raise TypeError(f"{what} needs a torch.nn.Linear (or subclass), got {type(mod).__name__}")


def _check_qat(mod, what: str) -> None:
    """``mod`` must be the QAT Linear whose dtypes the conversion reads (a float Linear has
    none: convert it with ``from_float_module``)."""
    if not isinstance(mod, QATDynamicLinear):
        raise TypeError(f"{what} needs a gpuquant.nn.qat.linear_dynamic.DynamicLinear, got "
                        f"{type(mod).__module__}.{type(mod).__qualname__} (a float Linear "
                        f"converts with from_float_module)")


def _one_value(v, what: str) -> torch.Tensor:
    """``v`` (a number, or a tensor / sequence of one element) as a 0-d float32 CPU tensor
    (float32 first, so the checks see the value the module will hold: 1e-50 is 0 there).

    Raises:
        TypeError: not a number, tensor or sequence of numbers.
        ValueError: other than exactly one value.
    """
    if isinstance(v, (bool, str)):
        raise TypeError(f"{what} must be a number or a one-element tensor, got "
                        f"{type(v).__name__} {v!r}")
    try:
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v,
                            dtype=torch.float32, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be a number or a one-element tensor, got "
                        f"{type(v).__name__}") from None
    if t.numel() != 1:
        raise ValueError(f"{what} must be exactly one value (per tensor, not per channel), "
                         f"got {t.numel()} values (shape {tuple(t.shape)})")
    return t.reshape(()).clone()  # (never the caller's storage)


class _StraightThroughInt8Linear(torch.autograd.Function):
    """``y = compute(x)`` on the current backend's integer op; backward: the straight-through
    gradient ``grad_x = grad_y @ dequantize(wq, w_scale)`` in float32, returned in ``x``'s
    dtype, and none for the frozen int8 weight. Defined once here, so every backend gives the
    same gradient (the ops themselves build no autograd graph)."""

    @staticmethod
    def forward(ctx, x, compute, wq, w_scale):
        ctx.save_for_backward(wq, w_scale)
        ctx.x_dtype = x.dtype
        return compute(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        wq, w_scale = ctx.saved_tensors
        grad_x = grad_y.to(torch.float32) @ _dequantize(wq, w_scale)
        return grad_x.to(ctx.x_dtype), None, None, None


_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Int8WeightLinear(EagerUnderCompile, Module):
    """Shared state: int8 ``weight`` (N, K), float32 ``weight_scale`` (N,), float32 ``bias``
    (N,) or None, optional float32 ``input_smoothing`` (K,) multiplied into the input first
    (SmoothQuant's 1/s when it could not be folded into the previous layer).

    Subclasses define ``_int8_linear(x, wq, w_scale, bias, out_dtype)``, the integer
    computation; ``forward`` adds the checks, the float (debug) mode and the gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_dtype=qint8_narrow, device=None):
        super().__init__()
        for v, what in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be an int >= 1, got {v!r}")
        wd = _check_dtype(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
        self.in_features, self.out_features, self.weight_dtype = in_features, out_features, wd
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("input_smoothing", None)
        self.quantize_enabled = True
        self._fast: dict = {}
        self.train(False)

    def _load_from_linear(self, linear: torch.nn.Linear, wq=None, ws=None):
        if wq is None:
            wq, ws = quantize_weight_per_channel(linear.weight, self.weight_dtype)
        dev = linear.weight.device
        self.weight = wq.to(dev)
        self.weight_scale = ws.to(dev)
        if linear.bias is not None:
            self.bias = linear.bias.detach().to(torch.float32).clone()
        smooth = getattr(linear, "input_smoothing", None)
        if smooth is not None:
            self.input_smoothing = smooth.detach().to(torch.float32).clone()
        return self

    def _apply(self, fn, recurse=True):
        # module casts (.half(), .to(torch.bfloat16), .double()) move the buffers but keep
        # their dtypes: int8 weights, float32 scales and bias (the kernels take only those);
        # the original tensor is moved, never a rounded copy cast back
        self._fast.clear()  # (its closures hold the buffers: a moved module must let go)
        return super()._apply(keep_dtype(fn), recurse)

    # state_dict: the buffers, plus the dtype names as extra state; an input_smoothing
    # present in the state dict but not in this module is taken over
    def get_extra_state(self):
        state = {"weight_dtype": self.weight_dtype.name}
        if hasattr(self, "act_dtype"):
            state["act_dtype"] = self.act_dtype.name
        return state

    def set_extra_state(self, state) -> None:
        self.weight_dtype = _check_dtype(state["weight_dtype"], WEIGHT_DTYPES, "weight_dtype")
        if "act_dtype" in state:
            self.act_dtype = _check_dtype(state["act_dtype"], ACT_DTYPES, "act_dtype")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._fast.clear()
        key = prefix + "input_smoothing"
        if key in state_dict and self.input_smoothing is None:
            self.input_smoothing = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_quantize_enabled(self, enabled: bool = True):
        """False: run the float computation with the dequantized weights (for debugging and
        error measurement); True (default): the integer kernels."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.quantize_enabled = enabled
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the integers stand for: ``weight * weight_scale[:, None]``."""
        return _dequantize(self.weight, self.weight_scale)

    def _prepare(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16,
                                                               torch.bfloat16):
            raise TypeError(f"{type(self).__name__} takes a float32/float16/bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input must have shape (..., "
                             f"{self.in_features}), got {tuple(x.shape)}")
        if self.input_smoothing is not None:
            return x.to(torch.float32) * self.input_smoothing
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The decode fast path: a memoised call of the backend op(s) for this input dtype,
        # device and backend choice, made after a full call (every check) while the
        # module's buffers stay the same objects at the same version. It skips the
        # functional front end's checks of the module's own tensors and the op lookup: a
        # decode step's Linear is a few microseconds of GPU time, so the host's Python is
        # what an eager step pays (bench: linear_dynamic, stand-in: ``--linear``).
        if (x.__class__ is torch.Tensor and self.quantize_enabled
                and not (x.requires_grad and torch.is_grad_enabled())):
            hit = self._fast.get((x.dtype, x.device, registry._explicit(), registry.verifying()))
            if hit is not None and x.dim() and x.shape[-1] == self.in_features:
                stamp, run = hit
                if stamp != self._stamp():  # buffers replaced or edited: every memo is stale
                    self._fast.clear()     # (and would keep the old tensors alive)
                elif x.numel():
                    shape = x.shape
                    y = run(x.reshape(-1, self.in_features).contiguous())
                    return y.reshape(shape[:-1] + (self.out_features,))
        y = self._linear(x)
        if (x.__class__ is torch.Tensor and self.quantize_enabled
                and self.input_smoothing is None and x.dtype in _FAST_DTYPES):
            run = self._fast_run(x.device, x.dtype)
            if run is not None:
                key = (x.dtype, x.device, registry._explicit(), registry.verifying())
                if len(self._fast) > 8:
                    self._fast.clear()
                self._fast[key] = (self._stamp(), run)
        return y

    def _stamp(self) -> tuple:
        """What the fast path's memo depends on: the buffers' identities and versions, and
        the activation dtype."""
        vals = tuple(self._buffers.values())
        try:  # (C-level loops: this runs on every call)
            versions = tuple([t._version for t in vals if t is not None])
        except RuntimeError:  # inference tensors carry no version counter
            versions = tuple([_version(t) for t in vals])
        return self.__dict__.get("act_dtype"), tuple(map(id, vals)), versions

    def __getstate__(self):
        state = super().__getstate__()
        state["_fast"] = {}  # closures: rebuilt on the first call after unpickling
        return state

    def __setstate__(self, state):
        state.setdefault("_fast", {})
        super().__setstate__(state)

    def _buffers_contiguous(self) -> bool:
        """The memo holds the buffers themselves (a contiguous copy could go stale: edits an
        inference tensor or ``.data`` make are invisible to the version stamp)."""
        return all(t is None or t.is_contiguous() for t in
                   (self.weight, self.weight_scale, self.bias))

    def _fast_run(self, device, dtype):
        """``run(x2)`` -> (M, N) output for a contiguous (M, K) input of ``dtype`` on
        ``device`` (M >= 1), calling the current backend's op(s) with this module's
        tensors, already checked by the full call that just ran; None: no fast path."""
        return None

    def _linear(self, x: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """The forward with only the weight's output rows ``rows`` (DynamicMultiheadAttention's
        q / k / v parts of its packed in-projection); None: all of them."""
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x = self._prepare(x)
        wq, ws, b = self.weight, self.weight_scale, self.bias
        if rows is not None:
            wq, ws, b = self._rows(rows)
        if not self.quantize_enabled:
            return F.linear(x.to(torch.float32), _dequantize(wq, ws), b).to(out_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _StraightThroughInt8Linear.apply(
                x, lambda t: self._int8_linear(t, wq, ws, b, out_dtype), wq, ws)
        return self._int8_linear(x, wq, ws, b, out_dtype)

    def _rows(self, rows: slice):
        """``(weight, weight_scale, bias)`` restricted to the output rows ``rows``: the same
        view objects from call to call while the buffers stay the same objects at the same
        version (memoised beside the fast path). The backends key their prepacked weights on
        the tensor object (the NumPy backend's float32 GEMM copy): a new view each call
        repacked the weight on every cross-attention projection (17x a 768-wide one)."""
        key = ("rows", rows.start, rows.stop, rows.step)
        stamp = self._stamp()
        hit = self._fast.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        b = self.bias
        parts = (self.weight[rows], self.weight_scale[rows], None if b is None else b[rows])
        if len(self._fast) > 8:
            self._fast.clear()
        self._fast[key] = (stamp, parts)
        return parts

    def _int8_linear(self, x, wq, w_scale, bias, out_dtype):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_dtype={self.weight_dtype.name}"
                + (", smoothed" if self.input_smoothing is not None else ""))


class DynamicLinear(_Int8WeightLinear):
    """W8A8 dynamic Linear: per-token int8 activations, per-channel int8 weights.

    Args:
        in_features, out_features, bias: as ``torch.nn.Linear``.
        act_dtype: ``gpuquant.qint8`` (default) or ``qint8_narrow`` (both use scale
            ``absmax / 127`` per token).
        weight_dtype: ``gpuquant.qint8_narrow`` (default) or ``qint8``.

    Raises:
        ValueError: sizes < 1, unsupported dtypes, or ``in_features`` above
            :func:`gpuquant.functional.dynamic.max_in_features` (int32 overflow).

    Example:
        >>> q = DynamicLinear.from_float_module(torch.nn.Linear(64, 32)).eval()
        >>> y = q(torch.randn(2, 7, 64))      # (2, 7, 32) float32
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_dtype=qint8,
                 weight_dtype=qint8_narrow, device=None):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        ad = _check_dtype(act_dtype, ACT_DTYPES, "act_dtype")
        self.act_dtype = ad
        k_max = max_in_features(ad, self.weight_dtype)
        if in_features > k_max:
            raise ValueError(f"in_features={in_features} could overflow the int32 accumulator "
                             f"({ad.name} x {self.weight_dtype.name}); at most {k_max} fits")

    @classmethod
    def from_float_module(cls, linear: torch.nn.Linear, act_dtype=qint8,
                          weight_dtype=qint8_narrow) -> "DynamicLinear":
        """Quantize a float ``torch.nn.Linear`` (weights per channel, symmetric)."""
        _check_linear(linear, "DynamicLinear.from_float_module")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, act_dtype,
                weight_dtype, device=linear.weight.device)
        return m._load_from_linear(linear)

    @classmethod
    def from_qat_module(cls, qat) -> "DynamicLinear":
        """Convert a :class:`gpuquant.nn.qat.linear_dynamic.DynamicLinear`: same integers and
        scales its fake-quant used, so outputs agree to float32 rounding.

        Raises:
            TypeError: ``qat`` is not that QAT module (a float Linear: ``from_float_module``).
        """
        _check_qat(qat, "DynamicLinear.from_qat_module")
        m = cls(qat.in_features, qat.out_features, qat.bias is not None, qat.act_dtype,
                qat.weight_dtype, device=qat.weight.device)
        wq, ws = quantize_weight_per_channel(qat.weight, qat.weight_dtype)
        return m._load_from_linear(qat, wq, ws)

    def _int8_linear(self, x, wq, w_scale, bias, out_dtype):
        xq, xs = quantize_per_token(x, self.act_dtype)
        return _linear_dynamic(xq, xs, wq, w_scale, bias, out_dtype, self.act_dtype,
                               self.weight_dtype, check_x_scale=False)

    def _fast_run(self, device, dtype):
        if type(self)._int8_linear is not DynamicLinear._int8_linear:
            return None  # (StaticActLinear: its own quantization)
        if not self._buffers_contiguous():
            return None
        quant, gemm = get_op("quantize_per_token", device), get_op("linear_dynamic", device)
        qmin, qmax = self.act_dtype.qmin, self.act_dtype.qmax
        wq, ws, b = self.weight, self.weight_scale, self.bias

        def run(x2):
            xq, xs = quant(x2, qmin, qmax)
            return gemm(xq, xs, wq, ws, b, dtype)
        return run

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_dtype={self.act_dtype.name} (per token)"


class StaticActLinear(DynamicLinear):
    """W8A8 Linear with one static (calibrated) activation scale per tensor, float output.

    ``act_scale`` (float32 0-d buffer) quantizes every token the same way; otherwise as
    :class:`DynamicLinear` (the same GEMM and epilogue). A token holding NaN or Inf gives a
    NaN output row on every backend, as in :class:`DynamicLinear` (its scale is NaN and its
    integers 0, as ``quantize_per_token`` does; no host-side check). Pair with SmoothQuant
    (:func:`gpuquant.quantization.smoothquant.smooth_quant`) for transformers.

    Raises:
        TypeError: ``act_scale`` neither a number nor a tensor.
        ValueError: as :class:`DynamicLinear`; ``act_scale`` not exactly one value, not
            finite or not > 0 (in float32).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_dtype=qint8,
                 weight_dtype=qint8_narrow, act_scale: float = 1.0, device=None):
        super().__init__(in_features, out_features, bias, act_dtype, weight_dtype, device)
        s = _one_value(act_scale, "act_scale")
        # the kernels quantize with the float32 reciprocal: below ~2.94e-39 it is inf, 0 * inf
        # is NaN, and the backends' clamps make different integers of NaN (0 / -128)
        if not (0 < float(s) < float("inf") and float(1.0 / s.float()) < float("inf")):
            raise ValueError(f"act_scale must be finite and > 0 with a finite float32 "
                             f"reciprocal (>= {_MIN_SCALE:.3g}), got {float(s)!r}")
        self.register_buffer("act_scale", s.to(device))

    @classmethod
    def from_float_module(cls, linear: torch.nn.Linear, act_absmax=None, act_dtype=qint8,
                          weight_dtype=qint8_narrow) -> "StaticActLinear":
        """``act_absmax``: the largest |input| seen in calibration (a float or 0-d tensor);
        the scale is ``max(act_absmax / 127, eps)``.

        Raises:
            TypeError: act_absmax neither a number nor a tensor.
            ValueError: act_absmax missing, not exactly one value, negative or not finite.
        """
        _check_linear(linear, "StaticActLinear.from_float_module")
        if act_absmax is None:
            raise ValueError("StaticActLinear.from_float_module needs act_absmax (from calibration:"
                             " gpuquant.quantization.calibrate_linear_inputs)")
        a = float(_one_value(act_absmax, "act_absmax"))
        if not (a >= 0 and a != float("inf")):
            raise ValueError(f"act_absmax must be finite and >= 0, got {a!r}")
        ad = _check_dtype(act_dtype, ACT_DTYPES, "act_dtype")
        scale = max(torch.tensor(a, dtype=torch.float32) / float(ad.qmax), torch.tensor(EPS))
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, ad,
                weight_dtype, act_scale=float(scale), device=linear.weight.device)
        return m._load_from_linear(linear)

    def _quantize_static(self, x: torch.Tensor):
        """``x`` (..., K) -> (int8 of x's shape, float32 scale per token of x.shape[:-1])."""
        d = self.act_dtype
        x2 = x.reshape(-1, self.in_features).contiguous()
        bad = ~torch.isfinite(x2).all(dim=1)
        xs = torch.where(bad, float("nan"), self.act_scale)
        if x2.shape[0]:
            zp = torch.zeros((), dtype=torch.int32, device=x.device)
            xq = get_op("quantize", x2)(x2, self.act_scale, zp, d.qmin, d.qmax, None, torch.int8)
            xq.masked_fill_(bad[:, None], 0)  # whatever the backend made of NaN / Inf
        else:
            xq = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        return xq.reshape(x.shape), xs.reshape(x.shape[:-1])

    def _int8_linear(self, x, wq, w_scale, bias, out_dtype):
        xq, xs = self._quantize_static(x)
        return _linear_dynamic(xq, xs, wq, w_scale, bias, out_dtype, self.act_dtype,
                               self.weight_dtype, check_x_scale=False)

    def extra_repr(self) -> str:
        return (_Int8WeightLinear.extra_repr(self) +
                f", act_dtype={self.act_dtype.name} (static, scale={float(self.act_scale):.4g})")


class WeightOnlyLinear(_Int8WeightLinear):
    """Int8 weight-only Linear: float activations, int8 per-channel weights, float32
    accumulation, output in the input's dtype.

    Example:
        >>> q = WeightOnlyLinear.from_float_module(torch.nn.Linear(64, 32)).eval()
    """

    @classmethod
    def from_float_module(cls, linear: torch.nn.Linear,
                          weight_dtype=qint8_narrow) -> "WeightOnlyLinear":
        _check_linear(linear, "WeightOnlyLinear.from_float_module")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_dtype,
                device=linear.weight.device)
        return m._load_from_linear(linear)

    @classmethod
    def from_qat_module(cls, qat) -> "WeightOnlyLinear":
        """Convert a :class:`gpuquant.nn.qat.linear_dynamic.DynamicLinear` (its weight dtype).

        Raises:
            TypeError: ``qat`` is not that QAT module (a float Linear: ``from_float_module``).
        """
        _check_qat(qat, "WeightOnlyLinear.from_qat_module")
        return cls.from_float_module(qat, qat.weight_dtype)

    def _int8_linear(self, x, wq, w_scale, bias, out_dtype):
        return linear_weight_only(x, wq, w_scale, bias).to(out_dtype)

    def _fast_run(self, device, dtype):
        if not self._buffers_contiguous():
            return None
        gemm = get_op("linear_weight_only", device)
        wq, ws, b = self.weight, self.weight_scale, self.bias
        return lambda x2: gemm(x2, wq, ws, b)


class DynamicMultiheadAttention(AttentionOverProjections):
    """``torch.nn.MultiheadAttention`` with W8A8 dynamic (or weight-only) int8 projections.

    ``torch.nn.MultiheadAttention`` cannot take a swapped ``out_proj``: its forward reads
    ``in_proj_weight`` and ``out_proj.weight`` directly (``out_proj`` is a
    ``NonDynamicallyQuantizableLinear`` for that reason), so the whole module is replaced. The
    packed ``in_proj`` (3E x E; one GEMM for self-attention, row slices for cross-attention)
    and ``out_proj`` are int8; the attention itself (scores, softmax, weighted sum) stays in
    float32, as in PyTorch's MHA math path. Supported: ``embed_dim == kdim == vdim``, no
    ``add_bias_kv`` / ``add_zero_attn``, torch's own forward (not a subclass's)
    (:func:`supports` says; ``quantize_dynamic`` leaves other MHAs float and logs which).

    Training mode (adapters trained over the frozen int8 projections) computes as eval mode
    except for attention dropout: with ``dropout`` > 0 (taken over from the converted MHA)
    the attention weights are dropped out after the softmax, as torch's math path does (the
    returned weights are the dropped ones, as torch's); eval mode never drops.

    Forward arguments and results are those of ``torch.nn.MultiheadAttention.forward``
    (attention weights in the query's dtype, as torch returns them), with torch's shape
    checks made before any projection. A query whose keys are all masked gets NaN, the
    softmax of all -inf, as torch's math path gives it (with ``need_weights=True``, or float
    masks); torch's fused path for a lone boolean mask without weights gives zeros there
    instead.

    Args:
        embed_dim, num_heads, dropout, bias: as ``torch.nn.MultiheadAttention``, in its
            order; the rest keyword-only (torch's fifth is ``add_bias_kv``).
        batch_first, device: as ``torch.nn.MultiheadAttention``.
        act_dtype, weight_dtype: as :class:`DynamicLinear`.
        weight_only: :class:`WeightOnlyLinear` projections instead of W8A8.

    Raises:
        ValueError: sizes < 1, ``embed_dim`` not divisible by ``num_heads``, unsupported
            dtypes, ``dropout`` outside [0, 1]; in ``forward``, inputs or masks of the wrong
            shape (the message names the shape received and the one expected).
        TypeError: ``bias``, ``batch_first`` or ``weight_only`` not a bool; in ``forward``,
            query / key / value not tensors, masks neither bool nor float.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 *, batch_first: bool = False, device=None, act_dtype=qint8,
                 weight_dtype=qint8_narrow, weight_only: bool = False):
        super().__init__()
        for v, what in ((embed_dim, "embed_dim"), (num_heads, "num_heads")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be an int >= 1, got {v!r}")
        for v, what in ((bias, "bias"), (batch_first, "batch_first"),
                        (weight_only, "weight_only")):
            if not isinstance(v, bool):
                raise TypeError(f"{what} must be a bool, got {type(v).__name__} ({v!r})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        if weight_only:
            def proj(n):
                return WeightOnlyLinear(embed_dim, n, bias, weight_dtype, device)
        else:
            def proj(n):
                return DynamicLinear(embed_dim, n, bias, act_dtype, weight_dtype, device)
        self.in_proj, self.out_proj = proj(3 * embed_dim), proj(embed_dim)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.train(False)

    supports = staticmethod(mha_supported)  # None if an MHA can be converted, else why

    @classmethod
    def from_float_module(cls, mha: torch.nn.MultiheadAttention, act_dtype=qint8,
                          weight_dtype=qint8_narrow, weight_only: bool = False):
        """Convert ``mha``.

        Raises:
            TypeError: not a MultiheadAttention.
            ValueError: an unsupported configuration (the message says which).
        """
        require_supported(mha, "DynamicMultiheadAttention cannot convert this module")
        e = mha.embed_dim
        dev = mha.in_proj_weight.device
        lin_in = torch.nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device=dev)
        with torch.no_grad():
            lin_in.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                lin_in.bias.copy_(mha.in_proj_bias)
        m = cls(e, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                batch_first=bool(mha.batch_first), device=dev, act_dtype=act_dtype,
                weight_dtype=weight_dtype, weight_only=weight_only)
        cls_proj = type(m.in_proj)
        args = (weight_dtype,) if weight_only else (act_dtype, weight_dtype)
        m.in_proj = cls_proj.from_float_module(lin_in, *args)
        m.out_proj = cls_proj.from_float_module(mha.out_proj, *args)
        return m

    @classmethod
    def from_qat_module(cls, qat):
        """Convert the QAT attention of :func:`gpuquant.quantization.prepare_dynamic_qat`
        (:class:`gpuquant.nn.qat.linear_dynamic.DynamicMultiheadAttention`): its two QAT
        Linears as :meth:`DynamicLinear.from_qat_module` (or :class:`WeightOnlyLinear`'s)
        convert them, the rest (heads, batch_first, dropout) as it is.

        Raises:
            TypeError: ``qat`` is not that QAT module.
        """
        if not isinstance(qat, QATDynamicMHA):
            raise TypeError(f"DynamicMultiheadAttention.from_qat_module needs the QAT "
                            f"DynamicMultiheadAttention (prepare_dynamic_qat), got "
                            f"{type(qat).__name__}")
        p = qat.in_proj
        m = cls(qat.embed_dim, qat.num_heads, qat.dropout, p.bias is not None,
                batch_first=bool(qat.batch_first), device=p.weight.device,
                act_dtype=p.act_dtype, weight_dtype=p.weight_dtype, weight_only=p.weight_only)
        cls_proj = WeightOnlyLinear if p.weight_only else DynamicLinear
        m.in_proj, m.out_proj = (cls_proj.from_qat_module(q) for q in (p, qat.out_proj))
        return m

    def _project(self, x, part: int):
        e = self.embed_dim
        return self.in_proj._linear(x, slice(part * e, (part + 1) * e))


def keep_off_torch_fast_path(model: torch.nn.Module) -> torch.nn.Module:
    """Keep torch's fused Transformer paths away from the int8 modules of this file.

    ``torch.nn.TransformerEncoderLayer`` (eval, no grad, batch_first) may call
    ``torch._transformer_encoder_layer_fwd`` with its submodules' ``weight`` tensors (int8
    buffers here), and ``torch.nn.TransformerEncoder`` may turn a padded batch into a nested
    tensor, which the int8 Linears do not take. For every encoder layer holding one of these
    modules this sets ``activation_relu_or_gelu = 0`` (read only to choose the fused path; the
    layer's ordinary forward applies ``activation`` itself), and for every encoder holding
    such layers ``use_nested_tensor = False`` (what torch's ``__init__`` decides for layers
    that cannot take the fast path); also for layers holding QAT or smoothed Linears (any
    Linear with its own forward: the fused path reads ``weight`` and skips it). Called by
    ``quantize_dynamic``, ``prepare_dynamic_qat``, ``smooth_quant``,
    ``quantize_static_linear`` and ``gpuquant.load``; returns ``model``.
    """
    def changed(m):  # a module the fused path would bypass: int8, QAT, smoothed
        return isinstance(m, (_Int8WeightLinear, AttentionOverProjections)) or (
            isinstance(m, torch.nn.Linear) and type(m).forward is not torch.nn.Linear.forward)

    def holds_int8(mod):
        return any(changed(m) for m in mod.modules())
    for m in model.modules():
        if isinstance(m, torch.nn.TransformerEncoderLayer) and holds_int8(m):
            m.activation_relu_or_gelu = 0
        elif isinstance(m, torch.nn.TransformerEncoder) and holds_int8(m):
            m.use_nested_tensor = False
    return model
