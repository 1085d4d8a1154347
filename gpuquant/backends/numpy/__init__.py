"""The NumPy backend: the bit-exact integer CPU path (x86 and ARM alike) and the oracle the
GPU backends are checked against.

Same ops and signatures as :mod:`gpuquant.backends.reference` (the definition), except
``fake_quant`` (QAT stays on torch). Only NumPy runs in the hot path: torch tensors are
viewed as NumPy arrays without copies (NHWC for channels_last activations) and the results
wrapped back. Integer conv / linear run exactly on float32 BLAS (:mod:`.gemm`), with
TFLite's fixed-point requantization evaluated in float32 under a proven error bound plus an
exact integer fix-up of the few outputs near a rounding step (:mod:`.fixed_point`).
Measured against NumPy float32, fbgemm and torch: ``bench/results/cpu-x86/``.

Families: ``gemm.py`` (exact matmul, linear), ``conv.py`` (im2col, 1x1, depthwise),
``elementwise.py`` (quantize, dequantize, add, mul, concat), ``pool.py``, ``fixed_point.py``
(requantization): torch-free kernels on NumPy arrays, shared with :mod:`gpuquant.runtime`;
``ops.py`` wraps them as the ops on torch tensors (``OPS``, loaded on first use so that this
package imports without torch).
"""
from __future__ import annotations

NAME = "numpy"
DEVICES = frozenset({"cpu"})
PRIORITY = 10


def is_available():
    try:
        import numpy  # noqa: F401
    except ImportError as e:  # pragma: no cover - numpy is a hard dependency
        return False, f"numpy is not installed ({e})"
    return True, ""


def __getattr__(name):
    if name == "OPS":  # the torch-facing ops (imports torch)
        from .ops import OPS
        globals()["OPS"] = OPS  # later lookups skip __getattr__ and the import machinery
        return OPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
