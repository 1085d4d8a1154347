"""QAT (fake-quant) modules under the float modules' names; built by
:func:`gpuquant.quantization.quantize_qat` through ``from_float_module``."""
from .activation import Activation
from .conv import ConvBn2d, ConvBnRelu2d, ConvBnRelu62d, Conv2d, ConvRelu2d, ConvRelu62d
from .elemwise import Concat, Elemwise
from .linear import Linear, LinearBn1d, LinearBnRelu1d, LinearRelu
from .module import QATModule
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .stubs import DequantStub, QuantStub
from .upsample import Upsample

__all__ = ["QATModule", "Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d",
           "ConvBnRelu62d", "Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d", "Elemwise",
           "Concat", "Activation", "QuantStub", "DequantStub", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d", "Upsample"]
