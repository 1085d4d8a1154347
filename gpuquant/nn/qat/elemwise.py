"""QAT elementwise ops and concat: float op, then the output fake-quantized."""
from __future__ import annotations

from .. import elemwise as Float
from .module import QATModule

__all__ = ["Elemwise", "Concat"]


class Elemwise(QATModule, Float.Elemwise):
    """QAT ``Elemwise``: ``forward(a, b)``."""

    with_weight = False

    def forward(self, a, b):
        self._require_qconfig()
        self._note_inputs(a, b)
        if self.method in ("add", "add_relu"):  # the add (and ReLU) go to the fused
            # observe + fake quant, which reads a and b and never writes the sum
            return self.apply_quant_activation(a, "relu" if self.method == "add_relu" else "none",
                                               addend=b)
        return self.apply_quant_activation(self._float_op(a, b))


class Concat(QATModule, Float.Concat):
    """QAT ``Concat``: ``forward(tensors, dim=0)``; the output gets its own qparams."""

    with_weight = False

    def forward(self, tensors, dim: int = 0):
        self._require_qconfig()
        tensors = list(tensors)
        self._note_inputs(*tensors)
        return self.apply_quant_activation(super().forward(tensors, dim))
