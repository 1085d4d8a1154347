"""QAT Linears for the transformer serving modes of :mod:`gpuquant.nn.quantized.linear_dynamic`.

:class:`DynamicLinear` (a ``torch.nn.Linear`` subclass, so optimizers, ``state_dict`` and
HuggingFace code see an ordinary Linear) fake-quantizes, in float32:

* the weight per output channel, symmetric, scale ``max|w_n| / ((qmax - qmin) / 2)``
  recomputed from the current weight each step (what conversion will use);
* the input per token, symmetric, scale ``max(max_j |x_j| / 127, eps)`` (what the int8
  kernel computes at serving time); skipped with ``weight_only=True``.

Gradients: straight-through estimator (``gpuquant.functional.fake_quant``) for the input and
the weight; the scales are treated as constants (no gradient flows through the absmax).
Forward equals the quantized module's to float32 rounding: the integers and scales are the
same, only the order of the float32 sum differs.

Under autocast (mixed-precision training) with ``qint8_narrow`` weights (the default), the
forward is the converted module's own int8 computation instead (:class:`_ServedForward`):
the per-token quantization of the input and the weight's per-channel one, then the int8
GEMM with its float32 epilogue, so the output equals the served module's bit for bit on
every backend and the GEMM runs on int8 tensor cores. The backward's two GEMMs run in the
autocast dtype, as autocast runs a float Linear's. (The float32 composition above forced
three float32 GEMMs a step under autocast: without TF32, PyTorch's default, an H100's
float32 peak is 67 TFLOPS, where the bf16 GEMM measured 787 TFLOPS on this repository's
H200 runs.) Without autocast, or with ``qint8`` weights (scale ``max / 127.5``, not the
per-token op's), the float32 composition runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from ..._compile import EagerUnderCompile
from ..._tensors import keep_dtype_of
from ...backends.registry import try_op
from ...backends.reference_dynamic import EPS
from ...dtypes import qint8, qint8_narrow
from ...functional.dynamic import (ACT_DTYPES, WEIGHT_DTYPES, _check_dtype, _linear_dynamic,
                                  linear_weight_only, max_in_features, quantize_per_token)
from ...functional.quant import fake_quant
from ...qparams import QParams
from ..attention import AttentionOverProjections, require_supported
from ..module import Module

__all__ = ["DynamicLinear", "DynamicConv1D", "DynamicMultiheadAttention",
           "fake_quant_per_token", "is_hf_conv1d"]


def fake_quant_per_token(x: torch.Tensor, dtype=qint8) -> torch.Tensor:
    """Per-token symmetric fake quantization in float32 (STE backward): dequantize of
    :func:`gpuquant.functional.dynamic.quantize_per_token`, bit for bit.

    Args:
        x: float tensor ``(..., K)``, K >= 1.
        dtype: ``gpuquant.qint8`` or ``qint8_narrow``.

    Returns:
        float32 tensor of ``x``'s shape.

    Raises:
        TypeError: x is not a float tensor.
        ValueError: K = 0 or an unsupported dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"fake_quant_per_token: x must be a float tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    d = _check_dtype(dtype, ACT_DTYPES, "dtype")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fake_quant_per_token: x needs a non-empty last dimension, got shape "
                         f"{tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x2.to(torch.float32).reshape(x.shape)
    return _fake_quant_rows(x2, float(d.qmax), d).reshape(x.shape)


def fake_quant_weight_per_channel(w: torch.Tensor, dtype=qint8_narrow) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of a (N, K) weight, float32, STE."""
    d = _check_dtype(dtype, WEIGHT_DTYPES, "fake_quant_weight_per_channel: dtype")
    return _fake_quant_rows(w, float(d.qmax - d.qmin) / 2, d)


def _fake_quant_rows(x2: torch.Tensor, divisor: float, d) -> torch.Tensor:
    """Each row of the (M, K) float ``x2`` fake-quantized symmetrically in float32 with the
    scale ``max(max|row| / divisor, EPS)`` (STE; the scale a constant): the backend's
    one-launch op ``fake_quant_rows`` where it has one and takes the case (Triton), else
    this definition, whose bytes that op reproduces."""
    y = try_op("fake_quant_rows", x2, x2, divisor, d.qmin, d.qmax, EPS)
    if y is not None:
        return y
    x32 = x2.to(torch.float32)
    with torch.no_grad():
        amax = x32.abs().amax(dim=1)  # divided by a tensor: as the int8 kernels, on any device
        scale = torch.clamp(amax / torch.full_like(amax, divisor), min=EPS)
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=x2.device)
    return fake_quant(x32, QParams.trusted(d, scale, zp, axis=0))


def _dequantized(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q * s[:, None]).to(dtype)`` (int8 rows times float32 row scales) in one pass: the
    product is computed in float32 and rounded once as it is stored (3 bytes an element
    for bfloat16, where the product and the cast moved 11)."""
    return torch.mul(q, s[:, None], out=torch.empty(q.shape, dtype=dtype, device=q.device))


class _ServedForward(torch.autograd.Function):
    """The QAT Linear under autocast (``qint8_narrow`` weights): forward, the serving module's
    int8 computation itself (:func:`~gpuquant.functional.dynamic.quantize_per_token` of the
    input and, rows being output channels, of the weight: ``max|w_n| / 127`` and the clamp
    to [-127, 127] are the per-channel quantization conversion applies; then
    ``linear_dynamic``, or ``linear_weight_only`` with ``act`` None), so its output is the
    converted module's, bit for bit, and its GEMM runs on int8 tensor cores. Backward,
    straight through the fake quants: ``grad_y @ w_fq`` and ``grad_y^T @ x_fq`` in the
    autocast dtype ``cdt``, as autocast runs a float Linear's backward, where the
    float32 composition ran two float32 GEMMs. Per-token and ``qint8_narrow`` scales keep
    every finite value inside the integer range, so the straight-through mask is 1 except
    on rows the quantization found NaN or Inf in (scale NaN): those pass no gradient.
    Saved: the int8 input and weight and their scales (1 byte an element, not the float32
    fake-quantized input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, act, cdt):
        k = x.shape[-1]
        wq, ws = quantize_per_token(weight, qint8_narrow)
        x2 = x.reshape(-1, k)
        if act is None:
            y = linear_weight_only(x2, wq, ws, bias).to(out_dtype)
            saved = (x2, wq, ws)
        else:
            xq, xs = quantize_per_token(x2, act)
            y = _linear_dynamic(xq, xs, wq, ws, bias, out_dtype, act, qint8_narrow,
                                check_x_scale=False)
            saved = (xq, xs, wq, ws)
        ctx.save_for_backward(*saved)
        ctx.act, ctx.cdt, ctx.x_shape, ctx.x_dtype = act, cdt, x.shape, x.dtype
        ctx.w_dtype = weight.dtype
        return y.reshape(tuple(x.shape[:-1]) + (wq.shape[0],))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        cdt, f32 = ctx.cdt, torch.float32
        if ctx.act is None:
            x_fq, wq, ws = ctx.saved_tensors
            x_fq, keep = x_fq.to(cdt), None
        else:
            xq, xs, wq, ws = ctx.saved_tensors
            x_fq = _dequantized(xq, xs, cdt)
            keep = torch.isfinite(xs)[:, None]
        w_fq = _dequantized(wq, ws, cdt)
        g = gy.reshape(-1, wq.shape[0])
        gc = g.to(cdt)
        zero = torch.zeros((), dtype=cdt, device=g.device)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # (the masks in the GEMM's dtype, then the cast)
            gx = gc @ w_fq
            if keep is not None:
                gx = torch.where(keep, gx, zero)
            gx = gx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = torch.where(torch.isfinite(ws)[:, None], gc.t() @ x_fq, zero).to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0, dtype=f32)  # (no float32 copy of grad_y first)
        return gx, gw, gb, None, None, None


def weight_not_a_parameter(linear: torch.nn.Linear):
    """Why ``linear``'s weight is no parameter a QAT Linear could share and train, or None:
    an uninitialized lazy Linear (``torch.nn.LazyLinear`` before its first forward), or a
    weight computed at each forward (``torch.nn.utils.prune``'s ``weight_orig * weight_mask``,
    refreshed by a pre-hook the swap would drop)."""
    w = linear._parameters.get("weight")
    if isinstance(w, torch.nn.parameter.UninitializedParameter):
        return ("the Linear is lazy and not yet initialized (in_features unknown); run one "
                "forward pass first")
    if w is None:
        return ("its weight is not a parameter but computed at each forward (pruned with "
                "torch.nn.utils.prune?), which the QAT Linear cannot share; make it permanent "
                "first (torch.nn.utils.prune.remove)")
    return None


class DynamicLinear(EagerUnderCompile, torch.nn.Linear, Module):
    """Fake-quant Linear for the W8A8 dynamic (or int8 weight-only) serving mode.

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        act_dtype: ``gpuquant.qint8`` (default) or ``qint8_narrow``.
        weight_dtype: ``gpuquant.qint8_narrow`` (default) or ``qint8``.
        weight_only: fake-quantize the weight only (for :class:`WeightOnlyLinear` serving).

    Attributes:
        fake_quant_enabled: False makes the module compute exactly as ``torch.nn.Linear``.

    Raises:
        ValueError: unsupported dtypes, or in_features that could overflow int32.

    Example:
        >>> qat = DynamicLinear.from_float_module(torch.nn.Linear(64, 32))
        >>> qat(torch.randn(4, 64)).sum().backward()
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 act_dtype=qint8, weight_dtype=qint8_narrow, weight_only=False):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_dynamic(act_dtype, weight_dtype, weight_only)

    def _init_dynamic(self, act_dtype, weight_dtype, weight_only):
        ad = _check_dtype(act_dtype, ACT_DTYPES, "act_dtype")
        wd = _check_dtype(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
        if not isinstance(weight_only, bool):
            raise TypeError(f"weight_only must be a bool, got {type(weight_only).__name__}")
        if not weight_only and self.in_features > max_in_features(ad, wd):
            raise ValueError(f"in_features={self.in_features} could overflow the int32 "
                             f"accumulator; at most {max_in_features(ad, wd)} fits")
        self.act_dtype, self.weight_dtype, self.weight_only = ad, wd, weight_only
        self.fake_quant_enabled = True

    @classmethod
    def from_float_module(cls, linear: torch.nn.Linear, act_dtype=qint8,
                          weight_dtype=qint8_narrow, weight_only=False) -> "DynamicLinear":
        """The QAT version of ``linear``, sharing its weight and bias parameters.

        Raises:
            TypeError: not a ``torch.nn.Linear``.
            ValueError: ``linear`` is parametrized (``torch.nn.utils.parametrize``, e.g.
                ``weight_norm``) or pruned (``torch.nn.utils.prune``): its weight is computed
                at each read, not a parameter to share (the QAT module held a frozen copy
                that training never updated); a lazy Linear not yet initialized.
        """
        fn = "DynamicLinear.from_float_module"
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{fn} needs a torch.nn.Linear, got {type(linear).__name__}")
        if parametrize.is_parametrized(linear):
            raise ValueError(f"{fn}: the Linear is parametrized (torch.nn.utils.parametrize): "
                             f"its weight is computed from other parameters, which the QAT "
                             f"Linear cannot share; remove the parametrization first "
                             f"(parametrize.remove_parametrizations)")
        why = weight_not_a_parameter(linear)
        if why is not None:
            raise ValueError(f"{fn}: {why}")
        qat = cls.__new__(cls)
        torch.nn.Module.__init__(qat)
        qat.in_features, qat.out_features = linear.in_features, linear.out_features
        qat.weight = linear.weight
        qat.bias = linear.bias
        smooth = getattr(linear, "input_smoothing", None)
        if smooth is not None:
            qat.register_buffer("input_smoothing", smooth)
        qat.training = linear.training
        qat._init_dynamic(act_dtype, weight_dtype, weight_only)
        return qat

    def _apply(self, fn, recurse=True):
        # SmoothQuant's factors stay float32 (up to 1e5: past float16's range) under .half()
        return super()._apply(keep_dtype_of(fn, [getattr(self, "input_smoothing", None)]),
                              recurse)

    def enable_fake_quant(self, enabled: bool = True) -> "DynamicLinear":
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.fake_quant_enabled = enabled
        return self

    def disable_fake_quant(self) -> "DynamicLinear":
        return self.enable_fake_quant(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.weight, self.bias)

    def _forward(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """The forward with ``weight`` / ``bias`` (this module's, or some of their output
        rows: the QAT attention's q / k / v parts of its packed in-projection; per-channel
        scales make a row's fake quant the same either way)."""
        smooth = getattr(self, "input_smoothing", None)
        if not self.fake_quant_enabled:
            if smooth is not None:
                x = (x.to(torch.float32) * smooth).to(x.dtype)
            return F.linear(x, weight, bias)
        out_dtype = x.dtype
        xf = x if smooth is None else x.to(torch.float32) * smooth
        b = None if bias is None else bias.to(torch.float32)
        dev = x.device.type
        if self.weight_dtype == qint8_narrow and torch.is_autocast_enabled(dev):
            # the serving module's int8 computation forward, the autocast dtype backward
            return _ServedForward.apply(xf, weight, b, out_dtype,
                                        None if self.weight_only else self.act_dtype,
                                        torch.get_autocast_dtype(dev))
        if self.weight_only:
            xf = xf.to(torch.float32)
        else:  # (float32 out; the row op reads a bf16 / fp16 x itself: no cast pass first)
            xf = fake_quant_per_token(xf, self.act_dtype)
        w = fake_quant_weight_per_channel(weight, self.weight_dtype)
        # float32 (under autocast too, for qint8 weights): the served int8 module's epilogue
        # is float32, and the two must agree to float32 rounding
        with torch.autocast(dev, enabled=False):
            return F.linear(xf, w.float(), b).to(out_dtype)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else f"act {self.act_dtype.name} per token"
        return super().extra_repr() + f", {mode}, weight {self.weight_dtype.name} per channel"


def is_hf_conv1d(mod) -> bool:
    """HuggingFace's ``Conv1D`` (GPT-2 / GPT): ``y = x @ weight + bias`` with weight
    (in, out), a Linear with its weight transposed. Recognised by name and shape, without
    importing ``transformers``."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "nf", None), int)
            and isinstance(getattr(mod, "nx", None), int) and isinstance(w, torch.Tensor)
            and tuple(w.shape) == (mod.nx, mod.nf))


class DynamicConv1D(EagerUnderCompile, Module):
    """QAT version of HuggingFace's ``Conv1D`` (GPT-2 / GPT: ``y = x @ weight + bias`` with
    ``weight`` (in, out), a Linear with its weight stored transposed) for the dynamic serving
    mode: :class:`DynamicLinear`'s forward (same fake quants, same autocast path) over
    ``weight.t()``. It shares the ``Conv1D``'s ``weight`` and ``bias`` parameters (same
    ``state_dict`` keys and shapes), so an optimizer made for the float model trains them,
    and :func:`gpuquant.quantization.quantize_dynamic` converts it as it converts a float
    ``Conv1D``. Made by :func:`gpuquant.quantization.prepare_dynamic_qat` (the ``Conv1D`` is
    recognised by its ``nf`` / ``nx`` attributes; ``transformers`` is never imported).

    Raises:
        ValueError: ``in_features`` (``nx``) that could overflow the int32 accumulator.
    """

    _forward = DynamicLinear._forward
    _init_dynamic = DynamicLinear._init_dynamic
    enable_fake_quant = DynamicLinear.enable_fake_quant
    disable_fake_quant = DynamicLinear.disable_fake_quant

    @classmethod
    def from_float_module(cls, conv1d, act_dtype=qint8, weight_dtype=qint8_narrow,
                          weight_only: bool = False) -> "DynamicConv1D":
        """The QAT version of the ``Conv1D`` ``conv1d``, sharing its parameters."""
        if not is_hf_conv1d(conv1d):
            raise TypeError(f"DynamicConv1D.from_float_module needs a HuggingFace Conv1D "
                            f"(a class named Conv1D with nf, nx and a weight of shape "
                            f"(nx, nf)), got {type(conv1d).__name__}")
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.nf, m.nx = conv1d.nf, conv1d.nx
        m.in_features, m.out_features = conv1d.nx, conv1d.nf
        m.weight, m.bias = conv1d.weight, conv1d.bias
        m.training = conv1d.training
        m._init_dynamic(act_dtype, weight_dtype, weight_only)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else f"act {self.act_dtype.name} per token"
        return (f"nx={self.nx}, nf={self.nf}, bias={self.bias is not None}, {mode}, weight "
                f"{self.weight_dtype.name} per channel")


class DynamicMultiheadAttention(AttentionOverProjections):
    """QAT version of ``torch.nn.MultiheadAttention`` for the dynamic serving mode: what
    :func:`gpuquant.quantization.prepare_dynamic_qat` swaps an MHA for, and what
    :func:`gpuquant.quantization.quantize_dynamic` then converts to the served
    :class:`gpuquant.nn.quantized.linear_dynamic.DynamicMultiheadAttention`.

    Its packed in-projection and its out-projection are QAT :class:`DynamicLinear` modules
    (per-token input and per-channel weight fake quants, straight-through gradients; under
    autocast the served int8 computation itself) that share the converted MHA's parameters
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), so an
    optimizer made for the float model trains them. The attention itself (scores, softmax,
    attention dropout in training mode, the weighted sum) is the served module's forward
    (:class:`gpuquant.nn.attention.AttentionOverProjections`); forward
    arguments, results and checks are ``torch.nn.MultiheadAttention.forward``'s. Supported:
    what the served module supports (:func:`gpuquant.nn.attention.mha_supported`).

    Its ``state_dict`` has ``torch.nn.MultiheadAttention``'s keys (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), and it loads them: a float
    checkpoint loads into the QAT model and a QAT checkpoint into the float one.

    Raises:
        ValueError, TypeError: as ``torch.nn.MultiheadAttention`` and :class:`DynamicLinear`.

    Example:
        >>> mha = DynamicMultiheadAttention.from_float_module(torch.nn.MultiheadAttention(64, 4))
        >>> out, _ = mha(q, k, v)   # trains; quantize_dynamic converts it
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 *, batch_first: bool = False, device=None, act_dtype=qint8,
                 weight_dtype=qint8_narrow, weight_only: bool = False):
        super().__init__()
        mha = torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias,
                                          batch_first=batch_first, device=device)
        self._take(mha, act_dtype, weight_dtype, weight_only)

    @classmethod
    def from_float_module(cls, mha: torch.nn.MultiheadAttention, act_dtype=qint8,
                          weight_dtype=qint8_narrow, weight_only: bool = False):
        """The QAT version of ``mha``, sharing its parameters.

        Raises:
            TypeError: not a ``torch.nn.MultiheadAttention``.
            ValueError: a configuration the served module does not take (the message says
                which).
        """
        require_supported(mha, "DynamicMultiheadAttention (QAT) cannot take this module")
        m = cls.__new__(cls)
        AttentionOverProjections.__init__(m)
        m._take(mha, act_dtype, weight_dtype, weight_only)
        return m

    def _take(self, mha, act_dtype, weight_dtype, weight_only):
        e = mha.embed_dim
        # a shell Linear holding the MHA's packed in-projection parameters (no storage of
        # its own), for DynamicLinear.from_float_module to share
        shell = torch.nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device="meta")
        shell.weight = mha.in_proj_weight
        shell.bias = mha.in_proj_bias
        self.in_proj = DynamicLinear.from_float_module(shell, act_dtype, weight_dtype,
                                                       weight_only)
        self.out_proj = DynamicLinear.from_float_module(mha.out_proj, act_dtype, weight_dtype,
                                                        weight_only)
        self.embed_dim, self.num_heads = e, mha.num_heads
        self.head_dim = e // mha.num_heads
        self.batch_first, self.dropout = bool(mha.batch_first), float(mha.dropout)
        self.train(mha.training)
        # state_dict keys as torch's MHA names them: checkpoints move between the two
        # (the public hook methods where torch has them, else the private ones they wrap)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_state_dict_post_hook(_mha_keys_out)
            self.register_load_state_dict_pre_hook(_mha_keys_in)
        else:  # pragma: no cover - older torch
            self._register_state_dict_hook(_mha_keys_out)
            self._register_load_state_dict_pre_hook(_mha_keys_in, with_module=True)

    def _project(self, x, part: int):
        e, p = self.embed_dim, self.in_proj
        rows = slice(part * e, (part + 1) * e)
        return p._forward(x, p.weight[rows], None if p.bias is None else p.bias[rows])


_MHA_KEYS = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))


def _mha_keys_out(module, state_dict, prefix, local_metadata):
    for ours, torchs in _MHA_KEYS:
        if prefix + ours in state_dict:
            state_dict[prefix + torchs] = state_dict.pop(prefix + ours)


def _mha_keys_in(module, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs):
    for ours, torchs in _MHA_KEYS:
        if prefix + torchs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + torchs)
