"""Dynamic (per-token) quantization ops for transformer Linears: input checks, then dispatch.

* :func:`quantize_per_token`: symmetric int8 per row, scales computed on the fly;
* :func:`linear_dynamic`: W8A8 int8 GEMM with int32 accumulation and a float epilogue
  ``acc * x_scale[m] * w_scale[n] + bias[n]`` written in the activations' float dtype;
* :func:`linear_weight_only`: float activations times int8 weights, scale in the epilogue.

The numerics are defined in :mod:`gpuquant.backends.reference_dynamic`. All three accept
any leading dimensions (``(..., K)``) and an empty batch (zero rows gives zero rows, as
``torch.nn.Linear`` does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._compile import eager_under_compile
from ..backends.registry import get_op
from ..dtypes import QuantDtype, get_dtype, qint8, qint8_narrow
from .integer import check_accumulator_range

__all__ = ["quantize_per_token", "linear_dynamic", "linear_weight_only",
           "ACT_DTYPES", "WEIGHT_DTYPES", "max_in_features"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: activation dtypes of the dynamic path (symmetric int8)
ACT_DTYPES = (qint8, qint8_narrow)
#: weight dtypes (symmetric int8, per output channel)
WEIGHT_DTYPES = (qint8_narrow, qint8)


def _check_dtype(dtype, allowed, what: str) -> QuantDtype:
    """A dtype argument of the dynamic path: one of ``allowed`` (gpuquant dtypes), given as
    the dtype or its name; ``torch.qint8`` (what users of PyTorch's ``quantize_dynamic``
    pass) is read as ``gpuquant.qint8``, the same range.

    Raises:
        TypeError: not a dtype or a name; ValueError: another dtype. The message names
            ``what``, the value and only the ``allowed`` dtypes."""
    if dtype is getattr(torch, "qint8", None):
        dtype = qint8
    names = [a.name for a in allowed]
    try:
        d = get_dtype(dtype)
    except TypeError:
        raise TypeError(f"{what} must be one of {names} (a gpuquant dtype, its name, or "
                        f"torch.qint8), got {dtype!r} ({type(dtype).__name__})") from None
    except ValueError:
        raise ValueError(f"{what} must be one of {names}, got {dtype!r}") from None
    if d not in allowed:
        raise ValueError(f"{what} must be one of {names}, got {d.name}")
    return d


def _check_float(x, what: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {what} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_vec(v, n: int, dtype: torch.dtype, device, what: str, op: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype != dtype:
        raise TypeError(f"{op}: {what} must be {dtype}, got {v.dtype}")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{op}: {what} must have shape ({n},), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{op}: {what} is on {v.device} but the input is on {device}")
    return v.contiguous()


def _check_scales(s: torch.Tensor, what: str, op: str, nan_ok: bool = False) -> None:
    """Scales must be finite and > 0 (or NaN where ``nan_ok``: the per-token scale
    :func:`quantize_per_token` gives a token holding NaN or Inf, whose output row is NaN);
    checked on CPU tensors (on a GPU the check would synchronise every call: device scales
    are checked where they are made, as Requant's)."""
    if s.device.type == "cpu" and s.numel():
        ok = torch.isfinite(s) & (s > 0)
        if nan_ok:
            ok |= torch.isnan(s)
        if not bool(ok.all()):
            raise ValueError(f"{op}: {what} must be finite and > 0"
                             f"{' (or NaN: a token holding NaN / Inf)' if nan_ok else ''}, got "
                             f"{s[~ok][:4].tolist()}")


def max_in_features(act_dtype=qint8, weight_dtype=qint8_narrow) -> int:
    """Largest ``in_features`` (K) whose int32 accumulator cannot overflow."""
    a = _check_dtype(act_dtype, ACT_DTYPES, "max_in_features: act_dtype")
    w = _check_dtype(weight_dtype, WEIGHT_DTYPES, "max_in_features: weight_dtype")
    per_k = max(-a.qmin, a.qmax) * max(-w.qmin, w.qmax)
    return (2 ** 31 - 1) // per_k


@eager_under_compile
def quantize_per_token(x: torch.Tensor, dtype=qint8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per token (row of the last dimension).

    ``scale = max(max_j |x_j| / 127, eps)`` in float32, ``q = clamp(rne(x * (1 / scale)),
    qmin, qmax)``; identical bytes on every backend. A row holding NaN or Inf gets scale NaN
    and q = 0, so the W8A8 output of that token is NaN (no host-side check, no sync).

    Args:
        x: float32 / float16 / bfloat16 tensor ``(..., K)``, K >= 1.
        dtype: ``gpuquant.qint8`` (default) or ``gpuquant.qint8_narrow``.

    Returns:
        ``(q, scale)``: int8 of ``x``'s shape, float32 of shape ``x.shape[:-1]``.

    Raises:
        TypeError: x is not a float tensor; dtype of the wrong kind.
        ValueError: x is 0-d or has K = 0; dtype is not a signed int8 dtype.

    Example:
        >>> q, s = quantize_per_token(torch.randn(2, 7, 64))   # q: (2, 7, 64) int8, s: (2, 7)
    """
    op = "quantize_per_token"
    _check_float(x, "x", op)
    d = _check_dtype(dtype, ACT_DTYPES, f"{op}: dtype")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension (K >= 1), got shape "
                         f"{tuple(x.shape)}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    if x2.shape[0] == 0:
        return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
                torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))
    q, s = get_op("quantize_per_token", x2)(x2, d.qmin, d.qmax)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@eager_under_compile
def linear_dynamic(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                   w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   out_dtype: torch.dtype = torch.float32, act_dtype=qint8,
                   weight_dtype=qint8_narrow) -> torch.Tensor:
    """W8A8 linear: ``(xq @ wq.T)`` exactly in int32, then ``acc * x_scale * w_scale + bias``
    in float32, written as ``out_dtype``.

    Args:
        xq: int8 ``(..., K)`` activations (from :func:`quantize_per_token`).
        x_scale: float32 ``xq.shape[:-1]``: one scale per row, finite and > 0, or NaN for a
            row :func:`quantize_per_token` found NaN / Inf in (its output row is NaN).
            Checked on CPU tensors only: on CUDA the check would read the scales back to
            the host every call, so a negative, zero or infinite scale there is not refused
            and scales (or flips the sign of) its output row.
        wq: int8 ``(N, K)`` weights, symmetric per output channel.
        w_scale: float32 ``(N,)``.
        bias: float32 ``(N,)`` or None (added in float).
        out_dtype: float32, float16 or bfloat16.
        act_dtype, weight_dtype: the integer ranges of ``xq`` / ``wq``, used to refuse K
            whose worst case could overflow int32 (no data is read for the check).

    Returns:
        ``out_dtype`` tensor of shape ``(..., N)``.

    Raises:
        TypeError: wrong tensor dtypes.
        ValueError: shape mismatches, devices differ, K = 0, or K > :func:`max_in_features`
            (the int32 accumulator could overflow); a w_scale not finite and > 0, or an
            x_scale neither that nor NaN (checked on CPU tensors: on a GPU the check would
            synchronise every call).
    """
    return _linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype, act_dtype, weight_dtype,
                           check_x_scale=True)


def _linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype, act_dtype, weight_dtype, *,
                    check_x_scale: bool) -> torch.Tensor:
    """:func:`linear_dynamic`, its ``x_scale`` values checked only where ``check_x_scale``:
    the dynamic Linears pass scales valid by construction (``quantize_per_token``'s, or a
    checked ``act_scale``), read back for nothing (and left unwritten by the host-time
    stand-in backend, which computes nothing)."""
    op = "linear_dynamic"
    for t, what in ((xq, "xq"), (wq, "wq")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(f"{op}: {what} must be int8, got {t.dtype}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    a = _check_dtype(act_dtype, ACT_DTYPES, f"{op}: act_dtype")
    w = _check_dtype(weight_dtype, WEIGHT_DTYPES, f"{op}: weight_dtype")
    if wq.dim() != 2:
        raise ValueError(f"{op}: wq must be 2-D (N, K), got shape {tuple(wq.shape)}")
    n, k = wq.shape
    if xq.dim() == 0 or xq.shape[-1] != k:
        raise ValueError(f"{op}: xq must have shape (..., {k}) to match wq {tuple(wq.shape)}, got "
                         f"{tuple(xq.shape)}")
    if wq.device != xq.device:
        raise ValueError(f"{op}: wq is on {wq.device} but xq is on {xq.device}")
    check_accumulator_range(k, a, 0, max(-w.qmin, w.qmax), 0, op=op)
    if not isinstance(x_scale, torch.Tensor) or x_scale.shape != xq.shape[:-1]:
        raise ValueError(f"{op}: x_scale must be a tensor of shape {tuple(xq.shape[:-1])}, got "
                         f"{getattr(x_scale, 'shape', type(x_scale).__name__)}")
    m = xq.numel() // k
    xs = _check_vec(x_scale.reshape(m), m, torch.float32, xq.device, "x_scale", op)
    if check_x_scale:
        _check_scales(xs, "x_scale", op, nan_ok=True)
    ws = _check_vec(w_scale, n, torch.float32, xq.device, "w_scale", op)
    _check_scales(ws, "w_scale", op)
    b = None if bias is None else _check_vec(bias, n, torch.float32, xq.device, "bias", op)
    out_shape = tuple(xq.shape[:-1]) + (n,)
    if m == 0:
        return torch.empty(out_shape, dtype=out_dtype, device=xq.device)
    x2 = xq.reshape(m, k).contiguous()
    y = get_op("linear_dynamic", x2)(x2, xs, wq.contiguous(), ws, b, out_dtype)
    return y.reshape(out_shape)


@eager_under_compile
def linear_weight_only(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int8 linear: ``(x @ wq.T) * w_scale + bias`` with a float32 accumulator,
    output in ``x``'s dtype.

    Args:
        x: float32 / float16 / bfloat16 ``(..., K)``.
        wq: int8 ``(N, K)``; w_scale float32 ``(N,)``; bias float32 ``(N,)`` or None.

    Raises:
        TypeError: wrong tensor dtypes.
        ValueError: shape mismatches, devices differ, K = 0; a w_scale not finite and > 0
            (checked on CPU tensors).
    """
    op = "linear_weight_only"
    _check_float(x, "x", op)
    if not isinstance(wq, torch.Tensor) or wq.dtype != torch.int8 or wq.dim() != 2:
        raise TypeError(f"{op}: wq must be a 2-D int8 tensor (N, K), got "
                        f"{getattr(wq, 'dtype', type(wq).__name__)} "
                        f"{tuple(getattr(wq, 'shape', ()))}")
    n, k = wq.shape
    if k == 0:
        raise ValueError(f"{op}: K (in_features) must be >= 1, got wq of shape {tuple(wq.shape)}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must have shape (..., {k}) to match wq {tuple(wq.shape)}, got "
                         f"{tuple(x.shape)}")
    if wq.device != x.device:
        raise ValueError(f"{op}: wq is on {wq.device} but x is on {x.device}")
    ws = _check_vec(w_scale, n, torch.float32, x.device, "w_scale", op)
    _check_scales(ws, "w_scale", op)
    b = None if bias is None else _check_vec(bias, n, torch.float32, x.device, "bias", op)
    out_shape = tuple(x.shape[:-1]) + (n,)
    m = x.numel() // k
    if m == 0:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(m, k).contiguous()
    return get_op("linear_weight_only", x2)(x2, wq.contiguous(), ws, b).reshape(out_shape)
