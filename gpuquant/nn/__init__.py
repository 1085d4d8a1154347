"""Float modules, fused where quantization fuses them; :mod:`.qat` and :mod:`.quantized`
hold the QAT and integer versions under the same class names."""
from .activation import Activation
from .conv import ConvBn2d, ConvBnRelu2d, ConvBnRelu62d, Conv2d, ConvRelu2d, ConvRelu62d
from .elemwise import Concat, Elemwise
from .linear import Linear, LinearBn1d, LinearBnRelu1d, LinearRelu
from .module import Module
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .stubs import DequantStub, QuantStub
from .upsample import Upsample

__all__ = ["Module", "Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d",
           "ConvBnRelu62d", "Linear", "LinearRelu", "LinearBn1d", "LinearBnRelu1d", "Elemwise",
           "Concat", "Activation", "QuantStub", "DequantStub", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d", "Upsample"]
