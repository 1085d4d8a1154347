"""gpuquant: quantization for PyTorch on GPUs: QAT, int8 conversion and inference.

Public names: the dtypes, :class:`QuantDtype`, :class:`QParams`, ``save`` / ``load``, and
the subpackages ``functional``, ``quantization``, ``nn``, ``backends``, ``models``,
``export``, ``runtime``.

The names are resolved lazily (PEP 562) so that ``import gpuquant.runtime`` (the NumPy
deployment runtime) does not import torch; ``from gpuquant import QParams, qint8`` and
``gpuquant.qint8`` work as usual.
"""
import importlib as _importlib

__version__ = "0.1.0"

# public name -> the module defining it (imported on first access)
_LAZY = {"QuantDtype": ".dtypes", "qint8": ".dtypes", "qint8_narrow": ".dtypes",
         "quint8": ".dtypes", "qint4": ".dtypes", "quint4": ".dtypes", "qint32": ".dtypes",
         "QParams": ".qparams", "save": ".serialization", "load": ".serialization"}

__all__ = ["QuantDtype", "QParams", "qint8", "qint8_narrow", "quint8", "qint4", "quint4",
           "qint32", "save", "load", "__version__"]


_SUBPACKAGES = ("functional", "quantization", "nn", "backends", "models", "export", "runtime")


def __getattr__(name):
    if name in _SUBPACKAGES:  # ``import gpuquant; gpuquant.runtime.load(...)``
        return _importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'gpuquant' has no attribute {name!r}")
    value = getattr(_importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
