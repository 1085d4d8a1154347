"""Tensor helpers shared across the package (no torch import needed to call them)."""
from __future__ import annotations

__all__ = ["version"]


def version(t) -> int:
    """``t._version``, the in-place version counter that caches key on; -1 for an inference
    tensor (made under ``torch.inference_mode``: it has none, so callers key on identity and
    storage only), -2 for None or anything that is not a tensor."""
    try:
        return t._version
    except RuntimeError:
        return -1
    except AttributeError:
        return -2
