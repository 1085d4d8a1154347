"""Integer (inference-only) modules under the float modules' names; built by
:func:`gpuquant.quantization.quantize` through ``from_qat_module``. They compute through
:mod:`gpuquant.functional`'s integer ops on the current backend."""
from .activation import Activation
from .conv import ConvBn2d, ConvBnRelu2d, ConvBnRelu62d, Conv2d, ConvRelu2d, ConvRelu62d
from .elemwise import Concat, Elemwise
from .fused import ConvAdd, ConvDequant
from .linear import Linear, LinearBn1d, LinearBnRelu1d, LinearRelu
from .module import QuantizedModule
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .stubs import DequantStub, QuantStub
from .upsample import Upsample

__all__ = ["QuantizedModule", "Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d",
           "ConvBnRelu62d", "Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d", "Elemwise",
           "Concat", "Activation", "QuantStub", "DequantStub", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d", "Upsample",
           "ConvAdd", "ConvDequant"]
