"""QAT fully connected layers; LinearBn1d folds BatchNorm1d as :mod:`.conv` does."""
from __future__ import annotations

import torch.nn.functional as F

from .. import linear as Float
from .conv import BnFoldedModule, check_foldable_bn
from .module import QATModule

__all__ = ["Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d"]


class Linear(QATModule, Float.Linear):
    """QAT ``Linear``: weight fake-quantized per output feature, output fake-quantized."""

    def folded_weight_bias(self):
        return self.weight, self.bias

    def forward(self, x):
        self._require_qconfig()
        self._note_inputs(x)
        w = self.apply_quant_weight(self.weight)
        y = F.linear(x, w, self.apply_quant_bias(self.bias, x))
        return self.apply_quant_activation(y, self.activation)


class LinearRelu(Linear, Float.LinearRelu):
    """QAT ``LinearRelu``."""


class LinearBn1d(BnFoldedModule, Float.LinearBn1d):
    """QAT ``LinearBn1d``: BatchNorm1d folded into the weights (Krishnamoorthi 2018)."""

    @classmethod
    def from_float_module(cls, float_module):
        check_foldable_bn(float_module.bn, type(float_module).__name__)
        return super().from_float_module(float_module)

    def _inner(self):
        return self.linear

    def _inner_forward(self, x, w, b):
        return F.linear(x, w, b)

    def forward(self, x):
        self._require_qconfig()
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (N, in_features) input, got shape "
                             f"{tuple(x.shape)}")
        return super().forward(x)


class LinearBnRelu1d(LinearBn1d, Float.LinearBnRelu1d):
    """QAT ``LinearBnRelu1d``."""
