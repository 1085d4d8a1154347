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
(:mod:`gpuquant.backends`). They hold buffers only (no parameters) and refuse training
mode. Built by :func:`gpuquant.quantization.quantize_dynamic` (or ``from_float_module`` /
``from_qat_module``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backends.reference_dynamic import EPS
from ...backends.registry import get_op
from ...dtypes import QuantDtype, get_dtype, qint8, qint8_narrow
from ...functional.dynamic import (ACT_DTYPES, WEIGHT_DTYPES, _check_dtype, linear_dynamic,
                                   linear_weight_only,
                                   max_in_features, quantize_per_token)
from ..module import Module

__all__ = ["DynamicLinear", "WeightOnlyLinear", "StaticActLinear", "DynamicMultiheadAttention",
           "quantize_weight_per_channel",
           "per_channel_weight_scale"]


def per_channel_weight_scale(weight: torch.Tensor,
                             dtype: QuantDtype = qint8_narrow) -> torch.Tensor:
    """Symmetric per-output-channel scales of a (N, K) float weight, as
    ``torch.ao.quantization.PerChannelMinMaxObserver`` (qscheme per_channel_symmetric) computes
    them: ``max(max|w_n| / ((qmax - qmin) / 2), eps)`` in float32."""
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
        TypeError: weight is not a 2-D float tensor.
        ValueError: dtype is not a signed int8 dtype; a given scale of the wrong shape.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} "
                        f"{tuple(getattr(weight, 'shape', ()))}")
    d = _check_dtype(dtype, WEIGHT_DTYPES, "weight dtype")
    if bool(torch.isnan(weight).any()) or bool(torch.isinf(weight).any()):
        raise ValueError("weight contains NaN or Inf, which have no int8 value")
    s = per_channel_weight_scale(weight, d) if scale is None else scale.detach().to(torch.float32)
    if s.shape != (weight.shape[0],):
        raise ValueError(f"scale must have shape ({weight.shape[0]},), got {tuple(s.shape)}")
    w = weight.detach().to(torch.float32)
    q = torch.round(w * (1.0 / s)[:, None]).clamp_(d.qmin, d.qmax).to(torch.int8)
    return q, s.contiguous()


def _check_linear(mod, what: str) -> None:
    if not isinstance(mod, torch.nn.Linear):
        raise TypeError(f"{what} needs a torch.nn.Linear (or subclass), got {type(mod).__name__}")


class _Int8WeightLinear(Module):
    """Shared state: int8 ``weight`` (N, K), float32 ``weight_scale`` (N,), float32 ``bias``
    (N,) or None, optional float32 ``input_smoothing`` (K,) multiplied into the input first
    (SmoothQuant's 1/s when it could not be folded into the previous layer)."""

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

    # state_dict: the buffers, plus the dtype names as extra state; an input_smoothing
    # present in the state dict but not in this module is taken over
    def get_extra_state(self):
        state = {"weight_dtype": self.weight_dtype.name}
        if hasattr(self, "act_dtype"):
            state["act_dtype"] = self.act_dtype.name
        return state

    def set_extra_state(self, state) -> None:
        self.weight_dtype = get_dtype(state["weight_dtype"])
        if "act_dtype" in state:
            self.act_dtype = get_dtype(state["act_dtype"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
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
        return self.weight.to(torch.float32) * self.weight_scale[:, None]

    def _prepare(self, x: torch.Tensor):
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is an inference module; call .eval() "
                               f"(train the QAT version, gpuquant.nn.qat.linear_dynamic)")
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

    def _float_forward(self, x, out_dtype):
        return F.linear(x.to(torch.float32), self.dequantized_weight(), self.bias).to(out_dtype)

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
        scales its fake-quant used, so outputs agree to float32 rounding."""
        _check_linear(qat, "DynamicLinear.from_qat_module")
        m = cls(qat.in_features, qat.out_features, qat.bias is not None, qat.act_dtype,
                qat.weight_dtype, device=qat.weight.device)
        wq, ws = quantize_weight_per_channel(qat.weight, qat.weight_dtype)
        return m._load_from_linear(qat, wq, ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x = self._prepare(x)
        if not self.quantize_enabled:
            return self._float_forward(x, out_dtype)
        xq, xs = quantize_per_token(x, self.act_dtype)
        return linear_dynamic(xq, xs, self.weight, self.weight_scale, self.bias, out_dtype,
                              self.act_dtype, self.weight_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_dtype={self.act_dtype.name} (per token)"


class StaticActLinear(DynamicLinear):
    """W8A8 Linear with one static (calibrated) activation scale per tensor, float output.

    ``act_scale`` (float32 0-d buffer) quantizes every token the same way; otherwise as
    :class:`DynamicLinear` (the same GEMM and epilogue). Pair with SmoothQuant
    (:func:`gpuquant.quantization.smoothquant.smooth_quant`) for transformers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_dtype=qint8,
                 weight_dtype=qint8_narrow, act_scale: float = 1.0, device=None):
        super().__init__(in_features, out_features, bias, act_dtype, weight_dtype, device)
        s = torch.as_tensor(act_scale, dtype=torch.float32, device=device).reshape(())
        if not bool(torch.isfinite(s)) or float(s) <= 0:
            raise ValueError(f"act_scale must be finite and > 0, got {float(s)!r}")
        self.register_buffer("act_scale", s)

    @classmethod
    def from_float_module(cls, linear: torch.nn.Linear, act_absmax=None, act_dtype=qint8,
                          weight_dtype=qint8_narrow) -> "StaticActLinear":
        """``act_absmax``: the largest |input| seen in calibration (a float or 0-d tensor);
        the scale is ``max(act_absmax / 127, eps)``.

        Raises:
            ValueError: act_absmax missing, negative or not finite.
        """
        _check_linear(linear, "StaticActLinear.from_float_module")
        if act_absmax is None:
            raise ValueError("StaticActLinear.from_float_module needs act_absmax (from calibration:"
                             " gpuquant.quantization.calibrate_linear_inputs)")
        a = float(act_absmax)
        if not (a >= 0 and a != float("inf")):
            raise ValueError(f"act_absmax must be finite and >= 0, got {a!r}")
        ad = get_dtype(act_dtype)
        scale = max(torch.tensor(a, dtype=torch.float32) / float(ad.qmax), torch.tensor(EPS))
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, ad,
                weight_dtype, act_scale=float(scale), device=linear.weight.device)
        return m._load_from_linear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x = self._prepare(x)
        if not self.quantize_enabled:
            return self._float_forward(x, out_dtype)
        k = self.in_features
        x2 = x.reshape(-1, k).contiguous()
        d = self.act_dtype
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        xq = get_op("quantize", x2)(x2, self.act_scale, zp, d.qmin, d.qmax, None, torch.int8) \
            if x2.shape[0] else torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        xs = self.act_scale.expand(x2.shape[0]).contiguous()
        y = linear_dynamic(xq, xs, self.weight, self.weight_scale, self.bias, out_dtype, d,
                           self.weight_dtype)
        return y.reshape(tuple(x.shape[:-1]) + (self.out_features,))

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
        _check_linear(qat, "WeightOnlyLinear.from_qat_module")
        return cls.from_float_module(qat, qat.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x = self._prepare(x)
        if not self.quantize_enabled:
            return self._float_forward(x, out_dtype)
        return linear_weight_only(x, self.weight, self.weight_scale, self.bias).to(out_dtype)


class DynamicMultiheadAttention(Module):
    """``torch.nn.MultiheadAttention`` (inference) with W8A8 dynamic (or weight-only) int8
    projections.

    ``torch.nn.MultiheadAttention`` cannot take a swapped ``out_proj``: its forward reads
    ``in_proj_weight`` and ``out_proj.weight`` directly (``out_proj`` is a
    ``NonDynamicallyQuantizableLinear`` for that reason), so the whole module is replaced. The
    packed ``in_proj`` (3E x E; one GEMM for self-attention, row slices for cross-attention)
    and ``out_proj`` are int8; the attention itself (scores, softmax, weighted sum) stays in
    float32, as in PyTorch's MHA math path. Supported: ``embed_dim == kdim == vdim``, no
    ``add_bias_kv`` / ``add_zero_attn`` (:func:`supports` says; ``quantize_dynamic`` leaves
    other MHAs float and logs which). Dropout is inference-off.

    Forward arguments and results are those of ``torch.nn.MultiheadAttention.forward``.
    """

    def __init__(self, in_proj, out_proj, num_heads: int, batch_first: bool):
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.embed_dim = out_proj.in_features
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.batch_first = batch_first
        self.train(False)

    @staticmethod
    def supports(mha: torch.nn.MultiheadAttention) -> Optional[str]:
        """None if ``mha`` can be converted, else the reason it cannot."""
        if not isinstance(mha, torch.nn.MultiheadAttention):
            return f"not a torch.nn.MultiheadAttention ({type(mha).__name__})"
        if not mha._qkv_same_embed_dim:
            return "kdim / vdim differ from embed_dim (separate q/k/v projection weights)"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        return None

    @classmethod
    def from_float_module(cls, mha: torch.nn.MultiheadAttention, act_dtype=qint8,
                          weight_dtype=qint8_narrow, weight_only: bool = False):
        """Convert ``mha``.

        Raises:
            TypeError: not a MultiheadAttention.
            ValueError: an unsupported configuration (the message says which).
        """
        why = cls.supports(mha)
        if why is not None:
            raise (TypeError if not isinstance(mha, torch.nn.MultiheadAttention) else ValueError)(
                f"DynamicMultiheadAttention cannot convert this module: {why}")
        e = mha.embed_dim
        lin_in = torch.nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None,
                                 device=mha.in_proj_weight.device)
        with torch.no_grad():
            lin_in.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                lin_in.bias.copy_(mha.in_proj_bias)
        def conv(lin):
            if weight_only:
                return WeightOnlyLinear.from_float_module(lin, weight_dtype)
            return DynamicLinear.from_float_module(lin, act_dtype, weight_dtype)
        return cls(conv(lin_in), conv(mha.out_proj), mha.num_heads, mha.batch_first)

    def _project(self, x, part: int):
        p = self.in_proj
        e = self.embed_dim
        lo, hi = part * e, (part + 1) * e
        b = None if p.bias is None else p.bias[lo:hi]
        x = p._prepare(x)
        if isinstance(p, WeightOnlyLinear):
            return linear_weight_only(x, p.weight[lo:hi], p.weight_scale[lo:hi], b)
        xq, xs = quantize_per_token(x, p.act_dtype)
        return linear_dynamic(xq, xs, p.weight[lo:hi], p.weight_scale[lo:hi], b, x.dtype,
                              p.act_dtype, p.weight_dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.training:
            raise RuntimeError("DynamicMultiheadAttention is an inference module; call .eval()")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, N, E) as in torch's functional MHA
        tgt_len, bsz, e = query.shape
        src_len = key.shape[0]
        h, d = self.num_heads, self.head_dim
        out_dtype = query.dtype
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        q = q.to(torch.float32).reshape(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.to(torch.float32).reshape(src_len, bsz * h, d).transpose(0, 1)
        v = v.to(torch.float32).reshape(src_len, bsz * h, d).transpose(0, 1)
        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, q.device)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, q.device).reshape(bsz, 1, 1, src_len)
            kpm = kpm.expand(bsz, h, 1, src_len).reshape(bsz * h, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        scores = torch.bmm(q * (1.0 / d ** 0.5), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tgt_len * bsz, e).to(out_dtype)
        out = self.out_proj(out).reshape(tgt_len, bsz, e)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = None
        if need_weights:
            weights = attn.reshape(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


def _additive(mask: torch.Tensor, device) -> torch.Tensor:
    """A boolean (True = masked) or float mask as a float32 additive mask."""
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(mask, float("-inf"))
    return mask.to(torch.float32)
