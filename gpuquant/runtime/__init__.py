"""gpuquant.runtime: run models exported by :func:`gpuquant.export.to_onnx` with NumPy only.

``load(path).run(x)`` executes the QDQ ONNX graph with the contract's integer semantics
(the NumPy backend's torch-free kernels, fixed-point multipliers derived from the stored
scales exactly as the quantized modules derive them): the outputs equal gpuquant's int8
model's byte for byte, on any CPU, without PyTorch (importing this package imports neither
torch nor the rest of gpuquant's torch code). Reading the file needs the ``onnx`` package.

Example:
    >>> sess = gpuquant.runtime.load("model.onnx")
    >>> logits = sess.run(images)            # float32 (or float16) numpy in, numpy out
"""
from __future__ import annotations

import os

from .session import RuntimeFormatError, Session

__all__ = ["load", "Session", "RuntimeFormatError"]


def load(path) -> Session:
    """Load an exported model.

    Args:
        path: an ``.onnx`` file written by :func:`gpuquant.export.to_onnx` (a str or
            ``os.PathLike``), or an ``onnx.ModelProto``.

    Returns:
        A :class:`Session`; ``session.run(x)`` takes and returns NumPy arrays.

    Raises:
        TypeError: ``path`` of the wrong type.
        FileNotFoundError: no such file. IsADirectoryError: ``path`` is a directory.
        ValueError: not a readable ONNX file, or a graph not in gpuquant's QDQ form
            (:class:`RuntimeFormatError`, naming the node and what is expected): a model
            without to_onnx's ``gpuquant.format`` metadata (e.g. onnxruntime's
            ``quantize_static`` output), weights other than int8 with zero points 0 per
            tensor or per output channel (axis 0), an int32 bias whose scale is not
            ``float32(s_x) * s_w``, ``auto_pad``, a QuantizeLinear without its zero point.
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the deploy extra
        raise ImportError("gpuquant.runtime reads ONNX files with the onnx package: "
                          "pip install onnx") from e
    if isinstance(path, onnx.ModelProto):
        return Session(path, "<ModelProto>")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"gpuquant.runtime.load: path must be a str, os.PathLike or "
                        f"onnx.ModelProto, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"gpuquant.runtime.load: {path!r} is a directory, not an "
                                f"ONNX file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gpuquant.runtime.load: no such file {path!r}")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValueError(f"gpuquant.runtime.load: {path!r} is not a valid ONNX model "
                         f"({type(e).__name__}: {e})") from e
    return Session(model, path)
