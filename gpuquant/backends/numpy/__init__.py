"""The NumPy backend: the bit-exact integer CPU path (x86 and ARM alike) and the oracle the
GPU backends are checked against.

Same ops and signatures as :mod:`gpuquant.backends.reference` (the definition), except
``fake_quant`` (QAT stays on torch). Only NumPy runs in the hot path: torch tensors are
viewed as NumPy arrays without copies (NHWC for channels_last activations) and the results
wrapped back. Integer conv / linear run exactly on float32 BLAS (:mod:`.gemm`), with
fixed-point requantization vectorised in float64 / int64 (:mod:`.fixed_point`).

Families: ``gemm.py`` (exact matmul, linear), ``conv.py`` (im2col, 1x1, depthwise),
``elementwise.py`` (quantize, dequantize, requantize, add, mul, concat), ``pool.py``.
"""
from __future__ import annotations

from . import conv, elementwise, gemm, pool

NAME = "numpy"
DEVICES = frozenset({"cpu"})
PRIORITY = 10


def is_available():
    try:
        import numpy  # noqa: F401
    except ImportError as e:  # pragma: no cover - numpy is a hard dependency
        return False, f"numpy is not installed ({e})"
    return True, ""


OPS = {
    "quantize": elementwise.quantize,
    "dequantize": elementwise.dequantize,
    "requantize": elementwise.requantize,
    "conv2d": conv.conv2d,
    "linear": gemm.linear,
    "add": elementwise.add,
    "mul": elementwise.mul,
    "concat": elementwise.concat,
    "max_pool2d": pool.max_pool2d,
    "avg_pool2d": pool.avg_pool2d,
    "adaptive_avg_pool2d": pool.adaptive_avg_pool2d,
}

# dynamic (per-token) quantization ops for transformers (their own family file)
from .dynamic import OPS as _DYNAMIC_OPS  # noqa: E402

OPS.update(_DYNAMIC_OPS)
