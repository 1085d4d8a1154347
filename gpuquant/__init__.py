"""gpuquant: quantization for PyTorch on GPUs: QAT, int8 conversion and inference.

Public names: the dtypes, :class:`QuantDtype`, :class:`QParams`, and the subpackages
``functional``, ``quantization``, ``nn``, ``backends``, ``models``.
"""
from .dtypes import QuantDtype, qint4, qint8, qint8_narrow, qint32, quint4, quint8
from .qparams import QParams

__version__ = "0.1.0"

__all__ = ["QuantDtype", "QParams", "qint8", "qint8_narrow", "quint8", "qint4", "quint4",
           "qint32", "__version__"]
