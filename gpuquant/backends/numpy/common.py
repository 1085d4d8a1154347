"""Plumbing shared by the NumPy op families: torch <-> NumPy views and a prepacked-weight cache.

Quantized activations are NCHW-shaped torch tensors in channels_last memory: ``nhwc(x)`` is
a zero-copy NHWC NumPy view of them, and ``from_nhwc(a)`` wraps an NHWC array back as a
channels_last NCHW tensor, again without a copy.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from ..._tensors import version

_NP = {torch.int8: np.int8, torch.uint8: np.uint8, torch.int32: np.int32,
       torch.int64: np.int64, torch.float32: np.float32, torch.float64: np.float64}


def np_dtype(dt: torch.dtype):
    return _NP[dt]


def nhwc(x: torch.Tensor) -> np.ndarray:
    """NHWC NumPy array of an NCHW tensor (a view for channels_last memory)."""
    return x.detach().permute(0, 2, 3, 1).numpy()


def from_nhwc(a: np.ndarray) -> torch.Tensor:
    """NCHW channels_last tensor sharing ``a``'s (NHWC) memory."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy() if x.requires_grad else x.numpy()  # detach: ~0.4 us a call


def from_numpy(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


# --------------------------------------------------------------------------- weight cache
class WeightCache:
    """Prepacked forms of constant weight tensors (float32 GEMM matrices, |w| block sums).

    Quantized models call conv/linear with the same int8 weight tensor every time; like
    fbgemm's prepacked weights, the float32 (K, N) layout is built once. Entries are keyed
    by the tensor's identity and checked against its data pointer, shape, strides and
    in-place version counter, so a tensor modified in place, assigned anew or freed is never
    served stale. Not seen: edits PyTorch itself does not count, i.e. writes through
    ``w.data`` (a separate version counter) and writes to an inference tensor inside
    ``torch.inference_mode``; edit quantized weights under ``torch.no_grad()`` on the tensor
    itself, or assign a new tensor (docs/NUMERICS.md, "Caches").
    """

    def __init__(self, max_entries: int = 256):
        self._d = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, w: torch.Tensor, kind: str, build):
        key = (id(w), kind)
        sig = (w.data_ptr(), w.shape, w.stride(), version(w), w.dtype)
        with self._lock:
            hit = self._d.get(key)
        if hit is not None and hit[0] == sig and hit[1]() is w:
            return hit[2]
        value = build()
        with self._lock:
            if len(self._d) >= self._max:
                self._d.pop(next(iter(self._d)))
            self._d[key] = (sig, weakref.ref(w, lambda _r, k=key: self._d.pop(k, None)), value)
        return value

    def clear(self):
        with self._lock:
            self._d.clear()


WEIGHTS = WeightCache()
