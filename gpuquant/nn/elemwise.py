"""Float elementwise ops and concatenation as modules, so each gets its own output
quantization (one module instance per call site)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .module import Module

__all__ = ["Elemwise", "Concat", "ELEMWISE_METHODS"]

ELEMWISE_METHODS = ("add", "add_relu", "mul")


class Elemwise(Module):
    """``Elemwise("add" | "add_relu" | "mul")``: ``forward(a, b)`` (shapes broadcast).

    Raises:
        ValueError: unknown method.
    """

    def __init__(self, method: str):
        super().__init__()
        if method not in ELEMWISE_METHODS:
            raise ValueError(f"Elemwise method must be one of {ELEMWISE_METHODS}, got {method!r}")
        self.method = method

    def extra_repr(self) -> str:
        return repr(self.method)

    def _float_op(self, a, b):
        if self.method == "mul":
            return a * b
        y = a + b
        return F.relu(y) if self.method == "add_relu" else y

    def forward(self, a, b):
        return self._float_op(a, b)


class Concat(Module):
    """``forward(tensors, dim=0)``: ``torch.cat`` as a module."""

    def forward(self, tensors: Sequence[torch.Tensor], dim: int = 0):
        return torch.cat(list(tensors), dim)
