"""QAT fully connected layers; LinearBn1d folds BatchNorm1d as :mod:`.conv` does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distributed import batch_mean_var
from .. import linear as Float
from ..conv import apply_activation
from .conv import bn_fold_params, check_foldable_bn, update_bn_running_stats
from .module import QATModule

__all__ = ["Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d"]


class Linear(QATModule, Float.Linear):
    """QAT ``Linear``: weight fake-quantized per output feature, output fake-quantized."""

    def folded_weight_bias(self):
        return self.weight, self.bias

    def forward(self, x):
        self._require_qconfig()
        self._note_inputs(x)
        y = F.linear(x, self.apply_quant_weight(self.weight), self.bias)
        return self.apply_quant_activation(apply_activation(y, self.activation))


class LinearRelu(Linear, Float.LinearRelu):
    """QAT ``LinearRelu``."""


class LinearBn1d(QATModule, Float.LinearBn1d):
    """QAT ``LinearBn1d``: BatchNorm1d folded into the weights (Krishnamoorthi 2018)."""

    def _init_qat(self) -> None:
        super()._init_qat()
        self.bn_frozen = False

    @classmethod
    def from_float_module(cls, float_module):
        check_foldable_bn(float_module.bn, type(float_module).__name__)
        return super().from_float_module(float_module)

    def freeze_bn_stats(self, freeze: bool = True) -> "LinearBn1d":
        """Use (and stop updating) the running statistics while training; returns the module."""
        self.bn_frozen = bool(freeze)
        return self

    def get_extra_state(self):  # bn_frozen travels in state_dict()
        return {"bn_frozen": self.bn_frozen}

    def set_extra_state(self, state) -> None:
        self.bn_frozen = bool(state["bn_frozen"])

    def folded_weight_bias(self):
        gamma, beta, mean, sigma = bn_fold_params(self.bn)
        scale = gamma / sigma
        b = self.linear.bias if self.linear.bias is not None else torch.zeros_like(mean)
        return self.linear.weight * scale.reshape(-1, 1), beta + (b - mean) * scale

    def forward(self, x):
        self._require_qconfig()
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (N, in_features) input, got shape "
                             f"{tuple(x.shape)}")
        self._note_inputs(x)
        lin, bn = self.linear, self.bn
        if self.training and not self.bn_frozen:
            y0 = F.linear(x, lin.weight)
            n = y0.size(0)
            if n < 2:
                raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                                 f"when training, got input shape {tuple(x.shape)}")
            mean, var, n = batch_mean_var(y0, (0,), bn)  # global batch under SyncBatchNorm
            gamma, beta, _, sigma = bn_fold_params(bn)
            sigma_b = torch.sqrt(var + bn.eps)
            w = self.apply_quant_weight(lin.weight * (gamma / sigma).reshape(-1, 1))
            y = F.linear(x, w) * (sigma / sigma_b) + (beta - gamma * mean / sigma_b)
            b = lin.bias.detach() if lin.bias is not None else 0.0
            update_bn_running_stats(bn, mean + b, var, n)
            if lin.bias is not None:  # exact (zero) gradient for the cancelled bias: DDP
                y = y + 0.0 * lin.bias  # needs every parameter used; y is unchanged
        else:
            w, b = self.folded_weight_bias()
            y = F.linear(x, self.apply_quant_weight(w), b)
        return self.apply_quant_activation(apply_activation(y, self.activation))


class LinearBnRelu1d(LinearBn1d, Float.LinearBnRelu1d):
    """QAT ``LinearBnRelu1d``."""
