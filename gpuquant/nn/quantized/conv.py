"""Integer convolutions: int8 weights (symmetric, per output channel), int32 bias,
fixed-point requantization with the activation fused into the clamp."""
from __future__ import annotations

from ..._checks import int_pair, positive_int
from .module import WeightedModule, converted_name, quantize_weight_bias

__all__ = ["Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d", "ConvBnRelu62d",
           "quantize_weight_bias"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _explicit_padding(conv) -> tuple:
    """torch's string paddings as numbers: 'valid' -> 0, 'same' -> half the dilated kernel
    (when that is symmetric)."""
    return _padding_pair(conv.padding, conv.kernel_size, conv.dilation)


def _padding_pair(padding, kernel_size, dilation) -> tuple:
    """:func:`_explicit_padding` of the arguments themselves."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    pads = []
    for k, d in zip(_pair(kernel_size), _pair(dilation)):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError(f"padding='same' with kernel {kernel_size} and "
                                      f"dilation {dilation} pads asymmetrically, which the "
                                      f"int8 convolution does not support; pad explicitly")
        pads.append(total // 2)
    return tuple(pads)


def _geometry(v, name: str, minimum: int) -> tuple:
    """A stride / padding / dilation argument as a pair of ints >= ``minimum``."""
    return int_pair(v, name, "Conv2d", minimum)


class Conv2d(WeightedModule):
    """Integer ``Conv2d``: ``forward(x)`` with ``x`` int8 / uint8 ``(N, C, H, W)``, or
    unbatched ``(C, H, W)`` as ``torch.nn.Conv2d`` takes it (run as a batch of 1, the same
    bytes; the output without the batch dimension).

    Built by :meth:`from_qat_module` (or :func:`gpuquant.quantization.quantize`); the
    constructor makes an empty module of the right shapes (for ``load_state_dict``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, input_dtype="qint8", output_dtype="qint8",
                 weight_dtype="qint8_narrow"):
        kh, kw = _pair(kernel_size)
        in_channels, out_channels, groups, kh, kw = (
            positive_int(v, name, "Conv2d") for name, v in (
                ("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                ("kernel height", kh), ("kernel width", kw)))
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must be divisible by groups ({groups})")
        super().__init__((out_channels, in_channels // groups, kh, kw), bias, input_dtype,
                         output_dtype, weight_dtype)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride, self.dilation = _geometry(stride, "stride", 1), _geometry(dilation,
                                                                               "dilation", 1)
        # torch's 'valid' / 'same' as numbers, as conversion stores them
        self.padding = _geometry(_padding_pair(padding, (kh, kw), self.dilation), "padding", 0)
        self.groups = int(groups)

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
        return m._load_converted(w_q, b_q, w_qp, in_qp, out_qp,
                                 converted_name(qat_module, name))

    def forward(self, x):
        return self.run(x)

    def run(self, x, epilogue: str = "", *extra):
        """The integer conv of ``x``, or a fused form of it (:mod:`.fused`): ``epilogue``
        ``"add"`` (``extra``: residual, add params) or ``"dequant"`` (``extra``: scale).
        The layer's checks run once per input shape (:meth:`_run_layer`)."""
        return self._run_layer("conv2d", x, epilogue, extra,
                               (self.stride, self.padding, self.dilation, self.groups))


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
