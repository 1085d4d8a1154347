"""QAT ``Activation``: the float function of the fake-quantized input, then the output
observed and fake-quantized.

The int8 module maps each input code ``q`` to ``quantize(f(dequantize(q)))`` with the QAT
output qparams, computed in float32. QAT computes ``fake_quant(f(x))`` with ``x`` the
producer's fake-quantized output: ``dequantize(q)`` exactly in float32, so the two agree
wherever torch's ``f`` on this device gives the float32 value the table was built with
(conversion builds it on the CPU); a value of ``f`` one float32 step away on another device
can round to the neighbouring code: at most one output step. A half-precision ``x``
(autocast) is ``dequantize(q)`` rounded to 8 or 11 bits: the module takes ``q`` back from it
(the nearest grid point: the rounding is far below half a step) and computes ``f`` in
float32 on ``dequantize(q)`` (straight-through gradient), where ``f`` in bfloat16 put 2-6% of
the codes one step off the table."""
from __future__ import annotations

import torch

from .. import activation as Float
from .module import QATModule, source_of

__all__ = ["Activation"]


class Activation(QATModule, Float.Activation):
    """QAT ``Activation``: ``forward(x)``."""

    with_weight = False

    def forward(self, x):
        self._begin_forward()
        self._note_inputs(x)
        x32 = self._on_grid_float32(x)
        if x32 is None:
            return self.apply_quant_activation(self._float_op(x))
        with torch.autocast(x.device.type, enabled=False):
            return self.apply_quant_activation(self._float_op(x32))

    @staticmethod
    def _on_grid_float32(x):
        """``dequantize(q)`` in float32 for a 16-bit ``x`` on its producer's (enabled) fake
        quant grid, the gradient passed straight through to ``x``; None otherwise (float32:
        already exact; no quantized producer: the float function as is)."""
        if x.dtype not in (torch.float16, torch.bfloat16):
            return None
        src = source_of(x)
        if src is None or not src.act_fake_quant_enabled():
            return None
        qp = src.get_activation_qparams()
        s = qp.scale.to(device=x.device, dtype=torch.float32).reshape(())
        xf = x.float()
        exact = torch.round(xf / s) * s  # (q - zp) * s: the zero point cancels
        return xf + (exact - xf).detach()
