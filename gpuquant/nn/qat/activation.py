"""QAT ``Activation``: the float function of the fake-quantized input, then the output
observed and fake-quantized.

The int8 module maps each input code ``q`` to ``quantize(f(dequantize(q)))`` with the QAT
output qparams, and QAT computes ``fake_quant(f(x))`` with ``x = dequantize(q)`` exactly
(the producer's fake quant); so the two agree wherever torch's ``f`` on this device gives
the float32 value the table was built with (conversion builds it on the CPU). A value of
``f`` one float32 step away on another device can round to the neighbouring code: at most
one output step."""
from __future__ import annotations

from .. import activation as Float
from .module import QATModule

__all__ = ["Activation"]


class Activation(QATModule, Float.Activation):
    """QAT ``Activation``: ``forward(x)``."""

    with_weight = False

    def forward(self, x):
        self._begin_forward()
        self._note_inputs(x)
        return self.apply_quant_activation(self._float_op(x))
