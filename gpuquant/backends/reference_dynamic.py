"""Reference (plain torch) definitions of the dynamic-quantization ops (transformers, W8A8).

Registered into the reference backend's ``OPS`` (see the end of
:mod:`gpuquant.backends.reference`). Every backend computes these ops with the same
signatures; integer outputs and scales are the same bytes on every backend, float outputs
agree to float32 rounding (``linear_dynamic``: the same bytes too when the backend evaluates
the epilogue in the order written here without FMA contraction).

Op signatures (inputs are validated in :mod:`gpuquant.functional.dynamic`):

quantize_per_token(x, qmin, qmax) -> (q, scale)
    ``x`` float32/float16/bfloat16 (M, K), K >= 1; ``q`` int8 (M, K), ``scale`` float32 (M,).
    Per row, in float32 (IEEE division, no FMA)::

        absmax = max_j |x_j|
        scale  = max(absmax / qmax, eps)          eps = float32 machine epsilon
        inv    = 1 / scale
        q_j    = clamp(rne(x_j * inv), qmin, qmax)

    (``qmax`` = 127 for ``qint8`` and ``qint8_narrow``: the largest |x| maps to +-127.)
    A row holding NaN or Inf has no scale: it gets ``scale = NaN`` and ``q = 0``, so
    ``linear_dynamic`` returns NaN for it (never finite garbage).

linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype) -> y (M, N) of ``out_dtype``
    ``xq`` int8 (M, K), ``x_scale`` float32 (M,), ``wq`` int8 (N, K), ``w_scale`` float32
    (N,), ``bias`` float32 (N,) or None. ``acc = xq @ wq.T`` exactly in int32, then in float32,
    left to right, each step rounded::

        y = float(acc) * x_scale[m] * w_scale[n] + bias[n]

    and one rounding to ``out_dtype``.

linear_weight_only(x, wq, w_scale, bias) -> y (M, N) of ``x.dtype``
    ``x`` float (M, K), ``wq`` int8 (N, K); ``y = (x @ wq.T) * w_scale[n] + bias[n]`` with a
    float32 accumulator (the int8 weights are exact in every float dtype); the accumulation
    order is the backend's, so backends agree to float32 rounding of a K-term sum.
"""
from __future__ import annotations

import torch

__all__ = ["quantize_per_token", "linear_dynamic", "linear_weight_only", "OPS", "EPS"]

EPS = torch.finfo(torch.float32).eps


def quantize_per_token(x, qmin, qmax):
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=1) if xf.shape[0] else xf.new_zeros((0,))
    # a tensor divisor: CUDA divides by a host scalar as a reciprocal multiply (1 ulp off)
    scale = torch.clamp(absmax / torch.full_like(absmax, float(qmax)), min=EPS)
    inv = 1.0 / scale
    q = torch.round(xf * inv[:, None]).clamp_(qmin, qmax)
    bad = ~torch.isfinite(xf).all(dim=1)
    if bool(bad.any()):
        scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
        q[bad] = 0
    return q.to(torch.int8), scale


def int_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of int8 matrices, exact, as int64 (through float64: exact below 2^53)."""
    return (a.to(torch.float64) @ b.to(torch.float64).t()).round().to(torch.int64)


def linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype):
    acc = int_matmul_nt(xq, wq).to(torch.int32)  # fits int32: K checked by the caller
    y = acc.to(torch.float32) * x_scale.to(torch.float32)[:, None]
    y = y * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return y.to(out_dtype)


def linear_weight_only(x, wq, w_scale, bias):
    with torch.autocast(x.device.type, enabled=False):  # the definition: float32 always
        y = (x.to(torch.float32) @ wq.to(torch.float32).t()) * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return y.to(x.dtype)


OPS = {
    "quantize_per_token": quantize_per_token,
    "linear_dynamic": linear_dynamic,
    "linear_weight_only": linear_weight_only,
}
