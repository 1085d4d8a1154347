"""QAT fully connected layers; LinearBn1d folds BatchNorm1d as :mod:`.conv` does."""
from __future__ import annotations

import torch.nn.functional as F

from .. import linear as Float
from .conv import BnFoldedModule, check_foldable_bn, wrong_input_size
from .module import QATModule, check_tensor_input

__all__ = ["Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d"]


class Linear(QATModule, Float.Linear):
    """QAT ``Linear``: weight fake-quantized per output feature, output fake-quantized."""

    def folded_weight_bias(self):
        return self.weight, self.bias

    def forward(self, x):
        self._begin_forward()
        # before any state is touched (the producer noted, the observers), as the int8
        # linear refuses it; shapes only, no device sync
        check_tensor_input(self, x)
        if x.dim() < 1:
            raise ValueError(f"{type(self).__name__}: x must have at least one dimension "
                             f"(..., in_features), got a 0-d tensor")
        if x.shape[-1] != self.in_features:
            raise wrong_input_size(self, x, -1, "features", self.in_features, "in_features")
        self._note_inputs(x)
        w = self.apply_quant_weight(self.weight)
        y = F.linear(x, w, self.apply_quant_bias(self.bias, x))
        return self.apply_quant_activation(y, self.activation)


class LinearRelu(Linear, Float.LinearRelu):
    """QAT ``LinearRelu``."""


class LinearBn1d(BnFoldedModule, Float.LinearBn1d):
    """QAT ``LinearBn1d``: BatchNorm1d folded into the weights (Krishnamoorthi 2018)."""

    _IN_SIZE, _IN_WHAT = "in_features", "features"

    @classmethod
    def from_float_module(cls, float_module):
        check_foldable_bn(float_module.bn, type(float_module).__name__)
        return super().from_float_module(float_module)

    def _inner(self):
        return self.linear

    def _inner_forward(self, x, w, b):
        return F.linear(x, w, b)

    def forward(self, x):
        self._begin_forward()
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (N, in_features) input, got shape "
                             f"{tuple(x.shape)}")
        return super().forward(x)


class LinearBnRelu1d(LinearBn1d, Float.LinearBnRelu1d):
    """QAT ``LinearBnRelu1d``."""
