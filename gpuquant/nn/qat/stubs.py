"""QAT stubs: QuantStub observes and fake-quantizes the float input; DequantStub passes."""
from __future__ import annotations

import torch

from .. import stubs as Float
from .module import QATModule, tag_output


def _storage_ptr(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None

__all__ = ["QuantStub", "DequantStub"]


class QuantStub(QATModule, Float.QuantStub):
    """QAT ``QuantStub``: its activation qparams quantize the network's input."""

    with_weight = False

    def forward(self, x):
        self._begin_forward()
        y = self.apply_quant_activation(x)
        if y is x or (isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor)
                      and _storage_ptr(y) == _storage_ptr(x)):
            # no fake quant (calibration, or it is disabled): the output would be the input's
            # memory, whose producer tag a second stub on another slice of the same input
            # overwrites; a copy carries this stub's qparams alone
            y = tag_output(y.clone(), self)
        return y


class DequantStub(QATModule, Float.DequantStub):
    """QAT ``DequantStub``: identity (records its producer for conversion)."""

    with_weight = False
    with_act = False

    def forward(self, x):
        self._note_inputs(x)
        return x
