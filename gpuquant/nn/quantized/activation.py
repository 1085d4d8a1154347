"""Integer ``Activation``: each input code through a 256-entry table.

The table is ``quantize(f(dequantize(q)), output qparams)`` for every storage value ``q`` of
the input, computed once on the CPU in float32 with the library's own quantize and
dequantize (contract section 1) and torch's ``f``, and cached per device; the op itself is a
byte gather (:func:`gpuquant.functional.lookup`), so every backend gives the same bytes."""
from __future__ import annotations

import torch

from ... import functional as GF
from ...dtypes import get_dtype
from ...qparams import QParams
from ..activation import activation_fn, check_kind, check_slope
from .elemwise import _check_act_qparams
from .module import QuantizedModule, placeholder_qparams

__all__ = ["Activation", "activation_table"]


def activation_table(kind: str, input_qparams: QParams, output_qparams: QParams,
                     negative_slope: float = 0.01) -> torch.Tensor:
    """The int8 / uint8 table (256 entries, the output's storage dtype, on the CPU) of
    ``kind`` from ``input_qparams`` to ``output_qparams``: entry ``q - storage_min`` is
    ``quantize(f(dequantize(q)))``. Codes outside a narrower input dtype's range (4-bit) get
    entries too, computed the same way, so that no code indexes outside the table.

    Raises:
        ValueError: unknown kind, or qparams that are not per-tensor 8-bit-stored ones.
    """
    f = activation_fn(kind, negative_slope)
    for what, qp in (("input", input_qparams), ("output", output_qparams)):
        if not isinstance(qp, QParams):
            raise TypeError(f"activation_table: {what}_qparams must be a gpuquant.QParams, got "
                            f"{type(qp).__name__}")
        _check_act_qparams(qp, "activation_table", what)
    storage = input_qparams.dtype.storage
    lo = -128 if storage == torch.int8 else 0
    codes = torch.arange(lo, lo + 256, dtype=torch.int32)
    scale = input_qparams.scale.detach().to("cpu", torch.float32).reshape(())
    zp = input_qparams.zero_point.detach().to("cpu", torch.int32).reshape(())
    x = (codes - zp).to(torch.float32) * scale          # dequantize, as the contract defines it
    with torch.no_grad():
        y = f(x)
    out = QParams(output_qparams.dtype, output_qparams.scale.detach().cpu(),
                  output_qparams.zero_point.detach().cpu())
    return GF.quantize(y, out).contiguous()


class Activation(QuantizedModule):
    """Integer ``Activation(kind)``: ``forward(x)`` maps each code of the int8 / uint8 input
    through the table of ``kind`` built from the input's and the output's qparams."""

    def __init__(self, kind: str, negative_slope: float = 0.01, input_dtype="qint8",
                 output_dtype="qint8"):
        super().__init__()
        self.kind = check_kind(kind)
        self.negative_slope = check_slope(negative_slope)
        for name, dt in (("input", input_dtype), ("output", output_dtype)):
            d = get_dtype(dt)
            if d.storage not in (torch.int8, torch.uint8):
                raise ValueError(f"Activation: {name}_dtype must be stored in 8 bits, got "
                                 f"{d.name}")
            self._set_qparams(name, placeholder_qparams(d))

    def extra_repr(self) -> str:
        d = self._dtypes
        slope = f", negative_slope={self.negative_slope}" if self.kind == "leaky_relu" else ""
        return f"{self.kind!r}{slope}, input={d['input']}, out={d['output']}"

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        who = f"module {name!r} ({type(qat_module).__name__})" if name else \
            type(qat_module).__name__
        (qp,) = qat_module.input_qparams(name)
        out = qat_module.get_activation_qparams()
        _check_act_qparams(qp, who, "input")
        _check_act_qparams(out, who, "output")
        m = cls(qat_module.kind, qat_module.negative_slope, qp.dtype, out.dtype)
        m._set_qparams("input", qp)
        m._set_qparams("output", out)
        return m

    def table(self, device) -> torch.Tensor:
        """The 256-entry table on ``device`` (rebuilt when a qparam buffer, ``kind`` or
        ``negative_slope`` changes)."""
        return self._cached(("table", self.kind, self.negative_slope), device,
                            lambda: activation_table(
            self.kind, self._qparams("input"), self._qparams("output"), self.negative_slope))

    def forward(self, x):
        self._check_input(x)
        return GF.lookup(x, self.table(x.device))
