"""Where a network enters and leaves the quantized domain."""
from __future__ import annotations

from .module import Module

__all__ = ["QuantStub", "DequantStub"]


class QuantStub(Module):
    """Identity in float; observes and fake-quantizes in QAT; float -> int8 when quantized."""

    def forward(self, x):
        return x


class DequantStub(Module):
    """Identity in float and QAT; int8 -> float32 when quantized."""

    def forward(self, x):
        return x
