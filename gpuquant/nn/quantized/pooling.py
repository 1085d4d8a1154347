"""Integer pooling; the output keeps the input's qparams."""
from __future__ import annotations

import torch

from ...dtypes import get_dtype
from ...functional import integer
from ..qat.pooling import resolve_output_size
from .module import QuantizedModule, placeholder_qparams

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


class _Pool(QuantizedModule):
    _ARGS = ()

    def __init__(self, input_dtype="qint8", **kwargs):
        super().__init__()
        missing = [k for k in self._ARGS if k not in kwargs]
        unknown = sorted(set(kwargs) - set(self._ARGS))
        if missing or unknown:
            raise TypeError(f"{type(self).__name__}: takes input_dtype and the arguments "
                            f"{self._ARGS}, all given (from_qat_module passes them); missing "
                            f"{missing}, unknown {unknown}")
        for k in self._ARGS:
            setattr(self, k, kwargs[k])
        if get_dtype(input_dtype).storage not in (torch.int8, torch.uint8):
            raise ValueError(f"{type(self).__name__}: input_dtype must be stored in 8 bits, "
                             f"got {get_dtype(input_dtype).name}")
        self._set_qparams("input", placeholder_qparams(input_dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in self._ARGS)

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        (qp,) = qat_module.input_qparams(name)
        if qp.per_channel or qp.dtype.storage not in (torch.int8, torch.uint8):
            raise ValueError(f"{cls.__name__} {name!r}: input must be a per-tensor 8-bit "
                             f"activation, got {qp}")
        m = cls(qp.dtype, **{k: getattr(qat_module, k) for k in cls._ARGS})
        m._set_qparams("input", qp)
        return m

    def _range(self):
        d = get_dtype(self._dtypes["input"])
        return int(self.input_zero_point), d.qmin, d.qmax


class MaxPool2d(_Pool):
    """Integer ``MaxPool2d``."""

    _ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

    def forward(self, x):
        self._check_input(x)
        if self.return_indices:
            raise NotImplementedError("quantized MaxPool2d does not return indices")
        return integer.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                  self.ceil_mode)


class AvgPool2d(_Pool):
    """Integer ``AvgPool2d`` (TFLite rounding, PyTorch's divisor)."""

    _ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")

    def forward(self, x):
        self._check_input(x)
        zp, lo, hi = self._cached("range", x.device, self._range)
        return integer.avg_pool2d(x, zp, self.kernel_size, self.stride, self.padding,
                                  self.ceil_mode, self.count_include_pad, self.divisor_override,
                                  lo, hi)


class AdaptiveAvgPool2d(_Pool):
    """Integer ``AdaptiveAvgPool2d``."""

    _ARGS = ("output_size",)

    def forward(self, x):
        self._check_input(x)
        zp, lo, hi = self._cached("range", x.device, self._range)
        return integer.adaptive_avg_pool2d(x, zp, resolve_output_size(self.output_size, x.shape),
                                           lo, hi)
