"""QAT pooling: the output keeps the input's qparams (as the integer ops do).

Max pooling of values on the integer grid stays on it. Average pooling does not; when its
input is fake-quantized, the QAT module rounds the average exactly as the integer op will
(the reference backend's integer average on the recovered integers: TFLite rounding, half
away from zero) with a straight-through gradient, so QAT and int8 agree bit for bit.

Each module refuses, before noting its input, what the integer op refuses, in its words
(:func:`gpuquant.functional.integer.max_pool2d` and the others): an input that is not 4-D
``(N, C, H, W)`` or 3-D unbatched ``(C, H, W)``, and a window that leaves no output (torch
raised a RuntimeError there, the int8 model a ValueError).
"""
from __future__ import annotations

import torch

from ...functional.integer import _pair as _int_pair, _pool_window
from .. import pooling as Float
from .module import QATModule, check_image_input, source_of, tag_output

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _PassQParams(QATModule):
    with_weight = False
    with_act = False

    def _pool(self, x):  # the float op
        raise NotImplementedError

    def _int_pool(self, q, zp, qp):  # the integer op on recovered integers
        return None

    def _check_input(self, x) -> None:
        """Refuse an input the integer op refuses (shapes only: no device sync).

        Raises:
            TypeError: not a tensor. ValueError: not 3-D / 4-D (naming the module and the
            shape).
        """
        check_image_input(self, x)

    def forward(self, x):
        self._check_input(x)
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


def check_window(module, x, kernel_size, stride, padding, dilation=1,
                 ceil_mode: bool = False) -> None:
    """Refuse a window that leaves no output (no channels; the padded input smaller than the
    dilated kernel, by more than ``stride - 1`` in ceil_mode; an empty plane) by the integer
    pools' own rule and words (:func:`gpuquant.functional.integer._pool_window`), the
    module's name in place of the op's. ``x`` is 3-D or 4-D; shapes only (no device sync).

    Raises:
        ValueError: naming ``module``, the input size, the padding and the kernel.
    """
    who = type(module).__name__
    _pool_window(x if x.dim() == 4 else x.unsqueeze(0), kernel_size, stride, padding, who,
                 _int_pair(dilation, "dilation", who), ceil_mode)


class MaxPool2d(_PassQParams, Float.MaxPool2d):
    """QAT ``MaxPool2d``."""

    def _check_input(self, x) -> None:
        super()._check_input(x)
        check_window(self, x, self.kernel_size, self.stride, self.padding, self.dilation,
                     bool(self.ceil_mode))

    @classmethod
    def from_float_module(cls, float_module):
        if getattr(float_module, "return_indices", False):
            raise ValueError("MaxPool2d with return_indices=True has no int8 form (the "
                             "integer op returns the pooled values only)")
        return super().from_float_module(float_module)

    def _pool(self, x):
        return Float.MaxPool2d.forward(self, x)


class AvgPool2d(_PassQParams, Float.AvgPool2d):
    """QAT ``AvgPool2d`` (integer rounding of the average, see the module docstring)."""

    def _check_input(self, x) -> None:
        super()._check_input(x)
        check_window(self, x, self.kernel_size, self.stride, self.padding, 1,
                     bool(self.ceil_mode))

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

    def _check_input(self, x) -> None:
        super()._check_input(x)
        if x.shape[-2] == 0 or x.shape[-1] == 0:  # (as the integer op: no window to average;
            # torch's float op gave NaN)
            raise ValueError(f"{type(self).__name__}: input spatial size must be non-empty, got "
                             f"shape {tuple(x.shape)}")

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
