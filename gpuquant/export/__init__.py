"""Export of quantized models for deployment: :func:`to_onnx` writes ONNX in QDQ form
(QuantizeLinear / DequantizeLinear around Conv / Gemm / Add / ...), as onnxruntime and
TensorRT read it and as :mod:`gpuquant.runtime` executes it bit-exactly with NumPy."""
from .onnx import OPSET, to_onnx

__all__ = ["to_onnx", "OPSET"]
