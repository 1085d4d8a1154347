"""Base class of every gpuquant module (float, QAT and quantized).

A float :class:`Module` carries two pieces of quantization state:

* ``qconfig``: ``None`` (use the one given to :func:`gpuquant.quantization.quantize_qat`), or a
  :class:`gpuquant.quantization.QConfig` that overrides it for this module and everything
  under it;
* ``quantize_disabled``: set by :meth:`Module.disable_quantize`, keeps this module (and
  everything under it) float through ``quantize_qat`` and ``quantize``.

Both are plain class-level defaults, so subclasses of ``torch.nn`` layers need no extra
``__init__`` call.
"""
from __future__ import annotations

import torch

__all__ = ["Module"]


class Module(torch.nn.Module):
    """Base of gpuquant's float, QAT and quantized modules (also usable for containers).

    Example:
        >>> class Net(gpuquant.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.quant, self.conv = gpuquant.nn.QuantStub(), gpuquant.nn.ConvRelu2d(3, 8, 3)
        ...     def forward(self, x):
        ...         return self.conv(self.quant(x))
    """

    qconfig = None
    quantize_disabled = False

    def disable_quantize(self, value: bool = True) -> "Module":
        """Keep this module and every module under it as they are (float stays float)
        through :func:`~gpuquant.quantization.quantize_qat` and
        :func:`~gpuquant.quantization.quantize`; returns the module.

        Put a ``DequantStub`` before and a ``QuantStub`` after a float island inside a
        quantized network, as the quantized neighbours exchange int8 tensors. Marked in a
        QAT model (after ``quantize_qat``), a QAT module keeps its quantizers there and
        ``quantize`` turns it back into its float class, with its trained weights.

        Raises:
            TypeError: ``value`` is not a bool.
        """
        if not isinstance(value, bool):
            raise TypeError(f"disable_quantize(value) takes a bool, got {type(value).__name__} "
                            f"({value!r})")
        for m in self.modules():
            if isinstance(m, Module):
                m.quantize_disabled = value
        return self
