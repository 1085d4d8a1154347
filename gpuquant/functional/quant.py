"""quantize, dequantize, fake_quant: the float <-> integer boundary (contract section 1)."""
from __future__ import annotations

import torch

from .._compile import eager_under_compile
from ..backends.registry import get_op
from ..qparams import QParams

__all__ = ["quantize", "dequantize", "fake_quant"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        ValueError: axis out of range or channel count mismatch.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"dequantize: q must be a torch.Tensor, got {type(q).__name__}")
    _check_qparams(qparams, "dequantize")
    if q.dtype != qparams.dtype.storage:
        raise TypeError(f"dequantize: q has dtype {q.dtype} but {qparams.dtype.name} is stored "
                        f"as {qparams.dtype.storage}")
    axis = qparams.check_tensor(q)
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
