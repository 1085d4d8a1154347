"""The Triton backend: CUDA tensors on the GPU; CPU tensors through the interpreter
(``TRITON_INTERPRET=1``, how CI checks every kernel).

Kernel families live one a file; each exports ``OPS`` (op name -> launcher) and this
package merges them:

* ``fake_quant.py``: fused fake-quant + STE, fused observers, LSQ / TQT (QAT);
* ``inference.py``: int8 GEMM / conv_bias and the rest of a quantized network.
* ``dynamic.py``: per-token quantize, W8A8 dynamic and int8 weight-only GEMM (transformers).
"""
from __future__ import annotations

import importlib
import os

NAME = "triton"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = frozenset({"cpu"}) if _INTERPRET else frozenset({"cuda"})
# On the GPU Triton is the fastest backend; the interpreter is for checking, never preferred.
PRIORITY = {"cuda": 20, "cpu": -10}

_FAMILIES = ("fake_quant", "inference", "dynamic")


def is_available():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if not _INTERPRET:
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return True, ""


def _collect_ops():
    ops = {}
    for fam in _FAMILIES:
        try:
            mod = importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as e:  # a family not written yet; other import errors raise
            if e.name != f"{__name__}.{fam}":
                raise
            continue
        ops.update(mod.OPS)
    return ops


OPS = _collect_ops()
