"""quantize, dequantize, fake_quant: the float <-> integer boundary (contract section 1)."""
from __future__ import annotations

import torch

from .._compile import eager_under_compile
from ..backends.registry import get_op
from ..qparams import QParams

__all__ = ["quantize", "dequantize", "fake_quant"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STORAGE_RANGE = {t: (torch.iinfo(t).min, torch.iinfo(t).max)
                  for t in (torch.int8, torch.uint8, torch.int32)}


def _check_float(x, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")


def _check_qparams(qparams, fn: str) -> None:
    if not isinstance(qparams, QParams):
        raise TypeError(f"{fn}: qparams must be a gpuquant.QParams, got {type(qparams).__name__}")


def _on(qparams: QParams, x: torch.Tensor):
    s, z = qparams.scale, qparams.zero_point
    if s.device != x.device:
        s, z = s.to(x.device), z.to(x.device)
    return s, z


@eager_under_compile
def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Float -> integer: ``clamp(rne(x * (1/scale)) + zero_point, qmin, qmax)``.

    Args:
        x: float32 / float16 / bfloat16 tensor (math in float32).
        qparams: per-tensor, or per-channel along ``qparams.axis`` of ``x``.

    Returns:
        A tensor of ``qparams.dtype.storage`` (int8, uint8 or int32), ``x``'s shape.

    Raises:
        TypeError: x not a float tensor, qparams not QParams.
        ValueError: axis out of range or channel count mismatch; NaN in a CPU ``x`` (it has
            no integer value; not checked on CUDA, where the check would be a host sync on
            every call: there NaN becomes whatever integer the kernel's clamp gives).

    Example:
        >>> q = gpuquant.functional.quantize(torch.randn(4, 8), QParams(gpuquant.qint8, 0.02))
    """
    _check_float(x, "quantize")
    _check_qparams(qparams, "quantize")
    axis = qparams.check_tensor(x)
    if not x.is_cuda and bool(torch.isnan(x).any()):
        # (CPU only: on a GPU the check would read a flag back every call, stalling the
        # launch queue and ruling out CUDA graphs; NaN there gets whatever int the kernel's
        # clamp makes of it)
        raise ValueError("quantize: x contains NaN, which has no quantized value")
    s, z = _on(qparams, x)
    d = qparams.dtype
    return get_op("quantize", x)(x, s, z, d.qmin, d.qmax, axis, d.storage)


@eager_under_compile
def dequantize(q: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Integer -> float32: ``(q - zero_point) * scale``.

    Raises:
        TypeError: q is not an integer tensor of the qparams' storage dtype.
        ValueError: axis out of range or channel count mismatch; in a CPU ``q`` of a dtype
            narrower than its storage (qint4, quint4, qint8_narrow), a value outside the
            dtype's range (not checked on CUDA: a host sync every call).
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"dequantize: q must be a torch.Tensor, got {type(q).__name__}")
    _check_qparams(qparams, "dequantize")
    d = qparams.dtype
    if q.dtype != d.storage:
        raise TypeError(f"dequantize: q has dtype {q.dtype} but {d.name} is stored "
                        f"as {d.storage}")
    axis = qparams.check_tensor(q)
    if not q.is_cuda and q.numel() and (d.qmin, d.qmax) != _STORAGE_RANGE.get(d.storage):
        bad = (q < d.qmin) | (q > d.qmax)
        if bool(bad.any()):  # (CPU only, as quantize's NaN check)
            raise ValueError(f"dequantize: q holds {q[bad].flatten()[:4].tolist()} (at "
                             f"{int(bad.sum())} position(s)), outside {d.name}'s range "
                             f"[{d.qmin}, {d.qmax}]")
    s, z = _on(qparams, q)
    return get_op("dequantize", q)(q, s, z, axis)


@eager_under_compile
def fake_quant(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable with the
    straight-through estimator (gradient passes where the unclamped value is in range).

    Bit-identical to ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` for float32. NaN in gives NaN out.

    Raises:
        TypeError, ValueError: as :func:`quantize`.
    """
    _check_float(x, "fake_quant")
    _check_qparams(qparams, "fake_quant")
    axis = qparams.check_tensor(x)
    s, z = _on(qparams, x)
    d = qparams.dtype
    return get_op("fake_quant", x)(x, s, z, d.qmin, d.qmax, axis)
