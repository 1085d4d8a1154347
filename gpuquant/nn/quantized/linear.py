"""Integer fully connected layers (BatchNorm folded at conversion)."""
from __future__ import annotations

import torch

from ..._checks import positive_int
from .module import WeightedModule, converted_name, quantize_weight_bias

__all__ = ["Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d"]


class Linear(WeightedModule):
    """Integer ``Linear``: ``forward(x)`` with ``x`` int8 / uint8 ``(..., in_features)``."""

    def __init__(self, in_features, out_features, bias=True, input_dtype="qint8",
                 output_dtype="qint8", weight_dtype="qint8_narrow"):
        in_features, out_features = (positive_int(v, name, type(self).__name__) for name, v in
                                     (("in_features", in_features),
                                      ("out_features", out_features)))
        super().__init__((out_features, in_features), bias, input_dtype, output_dtype,
                         weight_dtype)
        self.in_features, self.out_features = in_features, out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}, "
                f"in={self._dtypes['input']}, out={self._dtypes['output']}")

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        """The integer module for a QAT Linear / LinearRelu / LinearBn1d / LinearBnRelu1d."""
        lin = qat_module.linear if hasattr(qat_module, "bn") else qat_module
        w_q, b_q, w_qp, in_qp, out_qp = quantize_weight_bias(qat_module, name)
        m = cls(lin.in_features, lin.out_features, b_q is not None, in_qp.dtype, out_qp.dtype,
                w_qp.dtype)
        return m._load_converted(w_q, b_q, w_qp, in_qp, out_qp,
                                 converted_name(qat_module, name))

    def forward(self, x):
        return self.run(x)

    def run(self, x, epilogue: str = "", *extra):
        """The integer linear of ``x``, or a fused form of it (see ``Conv2d.run``)."""
        return self._run_layer("linear", x, epilogue, extra)


class LinearRelu(Linear):
    """Integer ``LinearRelu``."""

    activation = "relu"


class LinearBn1d(Linear):
    """Integer ``LinearBn1d`` (BatchNorm1d folded at conversion)."""

    def run(self, x, epilogue: str = "", *extra):
        if isinstance(x, torch.Tensor) and x.dim() != 2:
            raise ValueError(f"{type(self).__name__} takes (N, in_features) input, got shape "
                             f"{tuple(x.shape)}")
        return super().run(x, epilogue, *extra)


class LinearBnRelu1d(LinearBn1d):
    """Integer ``LinearBnRelu1d``."""

    activation = "relu"


