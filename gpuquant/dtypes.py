"""Quantized dtypes: integer ranges and the plain torch storage dtype that carries them.

gpuquant never uses PyTorch's deprecated quantized tensors (``torch.qint8`` ...):
values live in plain ``torch.int8`` / ``torch.uint8`` / ``torch.int32`` tensors and the
scale and zero point travel beside them in :class:`gpuquant.QParams`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantDtype", "qint8", "qint8_narrow", "quint8", "qint4", "quint4", "qint32",
           "ALL_DTYPES", "OBSERVED_DTYPES", "get_dtype", "observed_dtype"]


@dataclass(frozen=True)
class QuantDtype:
    """An integer quantization range stored in a plain torch integer dtype.

    Attributes:
        name: public name, e.g. ``"qint8"``.
        qmin, qmax: inclusive integer range.
        storage: the torch dtype holding the values.
    """

    name: str
    qmin: int
    qmax: int
    storage: torch.dtype

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin).bit_length()

    def __repr__(self) -> str:  # short form in error messages and reprs
        return f"gpuquant.{self.name}"


qint8 = QuantDtype("qint8", -128, 127, torch.int8)
qint8_narrow = QuantDtype("qint8_narrow", -127, 127, torch.int8)
quint8 = QuantDtype("quint8", 0, 255, torch.uint8)
qint4 = QuantDtype("qint4", -8, 7, torch.int8)
quint4 = QuantDtype("quint4", 0, 15, torch.uint8)
qint32 = QuantDtype("qint32", -(2 ** 31), 2 ** 31 - 1, torch.int32)

ALL_DTYPES = (qint8, qint8_narrow, quint8, qint4, quint4, qint32)
#: the dtypes observers and fake quants take: the activations' and the weights' (the
#: contract's dtype table). qint32 is the bias's, which conversion quantizes from the input
#: and weight scales and nothing observes: a model trained with a qint32 observer or fake
#: quant has no int8 form (quantize refused it only after training).
OBSERVED_DTYPES = (qint8, qint8_narrow, quint8, qint4, quint4)
_BY_NAME = {d.name: d for d in ALL_DTYPES}


def get_dtype(dtype) -> QuantDtype:
    """Return the :class:`QuantDtype` for a QuantDtype or its name.

    Raises:
        TypeError: ``dtype`` is neither a QuantDtype nor a string.
        ValueError: unknown name.
    """
    if isinstance(dtype, QuantDtype):
        return dtype
    if isinstance(dtype, str):
        if dtype in _BY_NAME:
            return _BY_NAME[dtype]
        raise ValueError(f"unknown quantized dtype {dtype!r}; allowed: {sorted(_BY_NAME)}")
    raise TypeError(f"dtype must be a gpuquant.QuantDtype or its name, got {type(dtype).__name__} "
                    f"({dtype!r}); allowed: {sorted(_BY_NAME)}")


def observed_dtype(dtype, who: str) -> QuantDtype:
    """:func:`get_dtype` of the ``dtype`` argument of an observer or fake quant (``who``), one
    of :data:`OBSERVED_DTYPES`.

    Raises:
        TypeError, ValueError: as :func:`get_dtype`; ValueError also for another dtype
            (qint32), naming it and the allowed ones.
    """
    d = get_dtype(dtype)
    if d not in OBSERVED_DTYPES:
        raise ValueError(f"{who}: dtype {d.name} is not an activation or weight dtype (qint32 "
                         f"is the bias's, quantized at conversion, never observed); allowed: "
                         f"{[a.name for a in OBSERVED_DTYPES]}")
    return d
