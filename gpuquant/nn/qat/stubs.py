"""QAT stubs: QuantStub observes and fake-quantizes the float input; DequantStub passes."""
from __future__ import annotations

from .. import stubs as Float
from .module import QATModule

__all__ = ["QuantStub", "DequantStub"]


class QuantStub(QATModule, Float.QuantStub):
    """QAT ``QuantStub``: its activation qparams quantize the network's input."""

    with_weight = False

    def forward(self, x):
        self._require_qconfig()
        return self.apply_quant_activation(x)


class DequantStub(QATModule, Float.DequantStub):
    """QAT ``DequantStub``: identity (records its producer for conversion)."""

    with_weight = False
    with_act = False

    def forward(self, x):
        self._note_inputs(x)
        return x
