"""QAT stubs: QuantStub observes and fake-quantizes the float input; DequantStub passes."""
from __future__ import annotations

import torch

from .. import stubs as Float
from .module import QATModule, _entry, restore_entry, tag_output


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
        self._note_inputs(x)  # (conversion refuses a quantized producer: int8 data here)
        before = _entry(x) if isinstance(x, torch.Tensor) else None
        y = self.apply_quant_activation(x)
        if y is x or (isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor)
                      and _storage_ptr(y) == _storage_ptr(x)):
            # no fake quant (calibration, or it is disabled): the output would be the input's
            # memory, whose producer tag a second stub on another slice of the same input
            # overwrites (and which that stub would read as its producer); the input keeps
            # its tag, a copy carries this stub's qparams alone
            restore_entry(x, before)
            y = tag_output(y.clone(), self)
        return y


class DequantStub(QATModule, Float.DequantStub):
    """QAT ``DequantStub``: the identity on values (records its producer for conversion).
    Its output is a copy: the producer's tag stays with the quantized memory, so a module
    reading the dequantized value counts as fed by a float op (conversion refuses a
    quantized module there, naming it, where the int8 model would get float input)."""

    with_weight = False
    with_act = False

    def forward(self, x):
        self._note_inputs(x)
        return x.clone() if isinstance(x, torch.Tensor) else x
