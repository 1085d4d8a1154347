"""Dynamic (per-token) quantization ops on NumPy: quantize_per_token, linear_dynamic (W8A8),
linear_weight_only. Numerics: :mod:`gpuquant.backends.reference_dynamic`.

The integer product uses the exact float32-BLAS GEMM of :mod:`.gemm` (``exact_matmul`` with
the same prepacked weight cache as the static ``linear``); the epilogue runs in float32
NumPy, one rounding per operation in the defined order (NumPy never contracts to FMA), so
``quantize_per_token`` and ``linear_dynamic`` give the reference's bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..reference_dynamic import EPS
from . import common
from .gemm import _pack_linear, exact_matmul, xmax_of

__all__ = ["quantize_per_token", "linear_dynamic", "linear_weight_only", "OPS"]

_EPS32 = np.float32(EPS)


def _float32_array(x: torch.Tensor) -> np.ndarray:
    # bfloat16 / float16 -> float32 is exact; NumPy has no bfloat16
    return common.to_numpy(x if x.dtype == torch.float32 else x.to(torch.float32))


def quantize_per_token(x, qmin, qmax):
    xa = _float32_array(x)
    m = xa.shape[0]
    if m == 0:
        return (torch.empty(x.shape, dtype=torch.int8),
                torch.empty((0,), dtype=torch.float32))
    with np.errstate(invalid="ignore", over="ignore"):  # rows with NaN / Inf: fixed below
        absmax = np.abs(xa).max(axis=1)
        scale = np.maximum(absmax / np.float32(qmax), _EPS32)
        inv = np.float32(1.0) / scale
        r = np.clip(np.rint(xa * inv[:, None]), qmin, qmax)
        bad = ~np.isfinite(xa).all(axis=1)
        if bad.any():
            scale[bad] = np.nan
            r[bad] = 0
        q = r.astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale.astype(np.float32, copy=False))


def linear_dynamic(xq, x_scale, wq, w_scale, bias, out_dtype):
    xa = common.to_numpy(xq)
    m, n = xa.shape[0], wq.shape[0]
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype)
    pw = common.WEIGHTS.get(wq, "linear", lambda: _pack_linear(wq))
    acc = exact_matmul(xa.astype(np.float32), pw, xmax_of(xa, 0))  # exact integers
    y = acc.astype(np.int32).astype(np.float32)  # the int32 accumulator, rounded once to f32
    y *= common.to_numpy(x_scale)[:, None]
    y *= common.to_numpy(w_scale)[None, :]
    if bias is not None:
        y += common.to_numpy(bias)[None, :]
    return torch.from_numpy(y).to(out_dtype)


def linear_weight_only(x, wq, w_scale, bias):
    xa = _float32_array(x)
    w = common.WEIGHTS.get(wq, "weight_only_f32",
                           lambda: np.ascontiguousarray(common.to_numpy(wq).T, dtype=np.float32))
    y = xa @ w
    y *= common.to_numpy(w_scale)[None, :]
    if bias is not None:
        y += common.to_numpy(bias)[None, :]
    return torch.from_numpy(y).to(x.dtype)


OPS = {
    "quantize_per_token": quantize_per_token,
    "linear_dynamic": linear_dynamic,
    "linear_weight_only": linear_weight_only,
}
