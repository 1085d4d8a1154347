"""Integer convolutions: int8 weights (symmetric, per output channel), int32 bias,
fixed-point requantization with the activation fused into the clamp."""
from __future__ import annotations

import torch

from ... import functional as GF
from ...dtypes import qint32
from ...functional import integer
from ...qparams import QParams
from .module import QuantizedModule, placeholder_qparams

__all__ = ["Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d", "ConvBnRelu62d",
           "quantize_weight_bias"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _explicit_padding(conv) -> tuple:
    """torch's string paddings as numbers: 'valid' -> 0, 'same' -> half the dilated kernel
    (when that is symmetric)."""
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(_pair(conv.kernel_size), _pair(conv.dilation)):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(f"padding='same' with kernel {conv.kernel_size} and "
                                      f"dilation {conv.dilation} pads asymmetrically, which the "
                                      f"int8 convolution does not support; pad explicitly")
        pads.append(total // 2)
    return tuple(pads)


def quantize_weight_bias(qat_module, name: str):
    """(int8 weight, int32 bias or None, weight QParams (per output channel), input QParams,
    output QParams) of a QAT conv / linear, BN folded with its running statistics.

    ``b_q = rne(b / (s_x * s_w[c]))`` computed in float64.

    Raises:
        ValueError: qparams of the wrong kind (per-channel activations, asymmetric weights,
            a 16/32-bit activation dtype) or a bias outside int32.
    """
    who = f"module {name!r} ({type(qat_module).__name__})" if name else type(qat_module).__name__
    in_qp = qat_module.input_qparams(name)[0]
    out_qp = qat_module.get_activation_qparams()
    w_qp = qat_module.get_weight_qparams()
    for what, qp in (("input", in_qp), ("output", out_qp)):
        if qp.per_channel:
            raise ValueError(f"{who}: {what} activations must be quantized per tensor, got "
                             f"per-channel qparams")
        if qp.dtype.storage not in (torch.int8, torch.uint8):
            raise ValueError(f"{who}: {what} dtype {qp.dtype.name} is not an 8-bit activation "
                             f"dtype (int8 / uint8 storage)")
    if w_qp.dtype.storage != torch.int8 or bool((w_qp.zero_point != 0).any()):
        raise ValueError(f"{who}: weights must be symmetric signed (int8 storage, zero point 0), "
                         f"got {w_qp}")
    with torch.no_grad():
        w, b = qat_module.folded_weight_bias()
        w = w.detach().float()
        o = w.shape[0]
        if w_qp.per_channel:
            if w_qp.resolve_axis(w.dim()) != 0:
                raise ValueError(f"{who}: per-channel weight qparams must be along the output "
                                 f"channel (axis 0), got axis {w_qp.axis}")
        else:
            w_qp = QParams(w_qp.dtype, w_qp.scale.reshape(1).expand(o).clone(),
                           torch.zeros(o, dtype=torch.int32), axis=0)
        w_qp = QParams(w_qp.dtype, w_qp.scale.to(w.device), w_qp.zero_point.to(w.device), 0)
        w_q = GF.quantize(w, w_qp)
        b_q = None
        if b is not None:
            s = in_qp.scale.double().cpu() * w_qp.scale.double().cpu()
            r = torch.round(b.detach().double().cpu() / s)
            if bool((r.abs() > qint32.qmax).any()):
                raise ValueError(f"{who}: the bias does not fit int32 in units of s_x * s_w "
                                 f"(max |b / (s_x s_w)| = {float(r.abs().max()):.3g})")
            b_q = r.to(torch.int32).to(w.device)
    return w_q, b_q, w_qp, in_qp, out_qp


class Conv2d(QuantizedModule):
    """Integer ``Conv2d``: ``forward(x)`` with ``x`` int8 / uint8 ``(N, C, H, W)``.

    Built by :meth:`from_qat_module` (or :func:`gpuquant.quantization.quantize`); the
    constructor makes an empty module of the right shapes (for ``load_state_dict``).
    """

    activation = "none"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, input_dtype="qint8", output_dtype="qint8",
                 weight_dtype="qint8_narrow"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kh, kw,
                                                   dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.int32) if bias else None)
        ones = torch.ones(out_channels)
        self._set_qparams("weight", QParams(weight_dtype, ones, torch.zeros(out_channels,
                                                                            dtype=torch.int32), 0))
        self._set_qparams("input", placeholder_qparams(input_dtype))
        self._set_qparams("output", placeholder_qparams(output_dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"activation={self.activation}, "
                f"in={self._dtypes['input']}, out={self._dtypes['output']}")

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        """The integer module for a QAT conv (any of the Conv / ConvBn forms)."""
        conv = qat_module.conv if hasattr(qat_module, "bn") else qat_module
        w_q, b_q, w_qp, in_qp, out_qp = quantize_weight_bias(qat_module, name)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                _explicit_padding(conv),
                conv.dilation, conv.groups, b_q is not None, in_qp.dtype, out_qp.dtype,
                w_qp.dtype)
        m.to(w_q.device)
        m.weight = w_q
        if b_q is not None:
            m.bias = b_q
        m._set_qparams("weight", w_qp)
        m._set_qparams("input", in_qp)
        m._set_qparams("output", out_qp)
        return m

    def requant(self, device):
        def build():
            out = self._qparams("output")
            return GF.make_requant(self.input_scale, self.weight_scale, float(out.scale),
                                   int(out.zero_point), out.dtype, self.activation)
        return self._cached("rq", device, build)

    def forward(self, x):
        self._check_input(x, "input", self.weight.device)
        return integer.conv2d(x, self._zp("input", x.device), self.weight, self.bias, self.stride,
                              self.padding, self.dilation, self.groups, self.requant(x.device),
                              **self._bounds(x.device))


class ConvRelu2d(Conv2d):
    """Integer ``ConvRelu2d`` (ReLU as the clamp at the output zero point)."""

    activation = "relu"


class ConvRelu62d(Conv2d):
    """Integer ``ConvRelu62d``."""

    activation = "relu6"


class ConvBn2d(Conv2d):
    """Integer ``ConvBn2d`` (BatchNorm folded at conversion)."""


class ConvBnRelu2d(ConvRelu2d):
    """Integer ``ConvBnRelu2d``."""


class ConvBnRelu62d(ConvRelu62d):
    """Integer ``ConvBnRelu62d``."""
