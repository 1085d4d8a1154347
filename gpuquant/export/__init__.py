"""Export of quantized models for deployment: :func:`to_onnx` writes ONNX in QDQ form
(QuantizeLinear / DequantizeLinear around Conv / Gemm / Add / ...), as onnxruntime and
TensorRT read it and as :mod:`gpuquant.runtime` executes it bit-exactly with NumPy;
:func:`.ort.session` opens one in onnxruntime on the CPU without its int8 saturation on x86
CPUs lacking VNNI."""
from . import ort
from .onnx import OPSET, to_onnx

__all__ = ["to_onnx", "OPSET", "ort"]
