"""A quantized conv / linear fused with the module that consumes its output, for inference.

Built by :func:`gpuquant.quantization.fuse_epilogues` from a converted model (never by
``quantize`` itself); each holds the two original modules (their parameters and buffers
unchanged) and runs them as one fused integer op of :mod:`gpuquant.functional.integer`, in
one kernel where the backend has it (Triton), as the two ops otherwise. The bytes are those
of the unfused pair on every backend.

* :class:`ConvAdd`: ``add(producer(x), other)`` (or ``add(other, producer(x))``), the residual
  addition of a ResNet / MobileNetV2 block in the conv's epilogue: the conv's int8 output is
  never written to memory and read back.
* :class:`ConvDequant`: ``dequant(producer(x))``, a network's last layer writing float32.
"""
from __future__ import annotations

from .conv import Conv2d
from .elemwise import Elemwise
from .linear import Linear
from .module import QuantizedModule
from .stubs import DequantStub, float_layout

__all__ = ["ConvAdd", "ConvDequant"]

_PRODUCERS = (Conv2d, Linear)


def _check_producer(producer, who: str) -> None:
    if not isinstance(producer, _PRODUCERS):
        raise TypeError(f"{who}: producer must be a quantized Conv2d or Linear module, got "
                        f"{type(producer).__name__}")


class ConvAdd(QuantizedModule):
    """``forward(x, other)`` = ``add(producer(x), other)`` when ``operand == 0``, else
    ``add(other, producer(x))``, with ``add`` an ``Elemwise("add" | "add_relu")``."""

    def __init__(self, producer, add, operand: int = 0):
        super().__init__()
        _check_producer(producer, "ConvAdd")
        if not isinstance(add, Elemwise) or add.method not in ("add", "add_relu"):
            raise TypeError(f"ConvAdd: add must be a quantized Elemwise('add' | 'add_relu'), got "
                            f"{type(add).__name__}{'(' + repr(add.method) + ')' if isinstance(add, Elemwise) else ''}")
        if isinstance(operand, bool) or operand not in (0, 1):
            raise ValueError(f"ConvAdd: operand must be 0 or 1 (which input of the add the "
                             f"producer's output is), got {operand!r}")
        self.producer = producer
        self.add = add
        self.operand = int(operand)

    def extra_repr(self) -> str:
        return f"operand={self.operand}"

    def forward(self, x, other):
        self._check_mode()
        dev = self.producer.weight.device
        self.add._check_input(other, "b" if self.operand == 0 else "a", dev)
        return self.producer.run(x, "add", other, self.add.params(dev, swap=self.operand == 1))


class ConvDequant(QuantizedModule):
    """``forward(x)`` = ``dequant(producer(x))`` as float32, ``dequant`` a quantized
    ``DequantStub`` whose input qparams are the producer's output qparams."""

    def __init__(self, producer, dequant):
        super().__init__()
        _check_producer(producer, "ConvDequant")
        if not isinstance(dequant, DequantStub):
            raise TypeError(f"ConvDequant: dequant must be a quantized DequantStub, got "
                            f"{type(dequant).__name__}")
        if not matching_qparams(producer, dequant):
            raise ValueError("ConvDequant: the DequantStub's input qparams differ from the "
                             "producer's output qparams; they cannot be fused")
        self.producer = producer
        self.dequant = dequant

    def forward(self, x):
        self._check_mode()
        dev = self.producer.weight.device
        scale = self._cached("scale", dev, lambda: float(self.dequant.input_scale))
        # as the DequantStub
        return self.dequant.as_out_dtype(float_layout(self.producer.run(x, "dequant", scale)))


def matching_qparams(producer, dequant) -> bool:
    """Whether ``dequant`` reads ``producer``'s output with the producer's own qparams (dtype,
    scale, zero point): the condition for :class:`ConvDequant`."""
    return (producer._dtypes.get("output") == dequant._dtypes.get("input")
            and dequant.input_scale.numel() == 1
            and float(producer.output_scale) == float(dequant.input_scale)
            and int(producer.output_zero_point) == int(dequant.input_zero_point))
