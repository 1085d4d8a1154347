"""QAT pooling: the output keeps the input's qparams (as the integer ops do).

Max pooling of values on the integer grid stays on it. Average pooling does not; when its
input is fake-quantized, the QAT module rounds the average exactly as the integer op will
(the reference backend's integer average on the recovered integers: TFLite rounding, half
away from zero) with a straight-through gradient, so QAT and int8 agree bit for bit.
"""
from __future__ import annotations

import torch

from .. import pooling as Float
from .module import QATModule, source_of, tag_output

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


class _PassQParams(QATModule):
    with_weight = False
    with_act = False

    def _pool(self, x):  # the float op
        raise NotImplementedError

    def _int_pool(self, q, zp, qp):  # the integer op on recovered integers
        return None

    def forward(self, x):
        self._note_inputs(x)
        src = source_of(x)
        y = self._pool(x)
        if src is not None and src.act_fake_quant_enabled() and x.dim() in (3, 4):
            qp = src.get_activation_qparams()
            if x.dim() == 3:  # unbatched (C, H, W): as the batch of 1, as the integer op
                yq = self._snap(x[None], y[None], qp)
                yq = None if yq is None else yq[0]
            else:
                yq = self._snap(x, y, qp)
            if yq is not None:
                y = y + (yq - y).detach()  # straight-through
        return tag_output(y, src)

    def _snap(self, x, y, qp):
        s = qp.scale.to(x.device).float()
        # the zero point stays a device tensor: int() of it would be a host sync a step on
        # CUDA (and break CUDA-graph capture of the training step)
        zp = qp.zero_point.to(device=x.device, dtype=torch.int32)
        q = torch.round(x.detach().float() / s).to(torch.int32) + zp
        qy = self._int_pool(q, zp, qp)
        if qy is None:
            return None
        return ((qy.to(torch.int32) - zp).float() * s).to(y.dtype)


class MaxPool2d(_PassQParams, Float.MaxPool2d):
    """QAT ``MaxPool2d``."""

    @classmethod
    def from_float_module(cls, float_module):
        if getattr(float_module, "return_indices", False):
            raise ValueError("MaxPool2d with return_indices=True has no int8 form (the "
                             "integer op returns the pooled values only)")
        return super().from_float_module(float_module)

    def _pool(self, x):
        return Float.MaxPool2d.forward(self, x)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class AvgPool2d(_PassQParams, Float.AvgPool2d):
    """QAT ``AvgPool2d`` (integer rounding of the average, see the module docstring)."""

    def _pool(self, x):
        return Float.AvgPool2d.forward(self, x)

    def _int_pool(self, q, zp, qp):
        from ...backends import reference as ref
        k = _pair(self.kernel_size)
        st = _pair(self.stride if self.stride is not None else self.kernel_size)
        return ref.avg_pool2d(q, zp, k, st, _pair(self.padding), self.ceil_mode,
                              self.count_include_pad, self.divisor_override, qp.qmin, qp.qmax)


class AdaptiveAvgPool2d(_PassQParams, Float.AdaptiveAvgPool2d):
    """QAT ``AdaptiveAvgPool2d`` (integer rounding of the average)."""

    def _pool(self, x):
        return Float.AdaptiveAvgPool2d.forward(self, x)

    def _int_pool(self, q, zp, qp):
        from ...backends import reference as ref
        return ref.adaptive_avg_pool2d(q, zp, resolve_output_size(self.output_size, q.shape),
                                       qp.qmin, qp.qmax)


def resolve_output_size(output_size, shape):
    """``AdaptiveAvgPool2d``'s output size with None entries taken from ``shape`` (N, C, H, W)."""
    oh, ow = _pair(output_size)
    return (shape[-2] if oh is None else int(oh), shape[-1] if ow is None else int(ow))
