"""Integer elementwise ops (TFLite add / mul) and concat."""
from __future__ import annotations


import torch

from ... import functional as GF
from ..._checks import positive_int
from ...functional.requant import Requant, activation_range
from ...dtypes import get_dtype
from ...multipliers import single_rounding_multiplier
from ...functional import integer
from ...qparams import QParams
from ..elemwise import ELEMWISE_METHODS
from .module import QuantizedModule, placeholder_qparams

__all__ = ["Elemwise", "Concat"]


def single_rounding_requant(in_scale: float, out_scale: float, out_zp: int, out_dtype,
                            activation: str = "none"):
    """A per-tensor :class:`Requant` for ``real = in_scale / out_scale`` that rounds once.

    ``make_requant`` normalises the multiplier into [2^30, 2^31) with a right shift; for
    small accumulators (a concat input is one int8 value, a product of two at most 2^16)
    that rounds twice (``SaturatingRoundingDoublingHighMul`` to an integer, then the shift),
    an error of up to half an output step (30% of a concat's outputs off by one step at a
    scale ratio of 1/3). For ``real`` in [2^-11, 0.5) this keeps ``rshift = 0`` and
    ``multiplier = round(real * 2^31)`` (>= 2^20: relative precision 2^-21), so the one
    rounding is the doubling high multiply's: the same integer formula, applied by every
    backend unchanged."""
    dtype = get_dtype(out_dtype)
    mult = single_rounding_multiplier(float(in_scale) / float(out_scale))
    if mult is None:
        return GF.make_requant(in_scale, 1.0, out_scale, out_zp, dtype, activation)
    lo, hi = activation_range(dtype, float(out_scale), int(out_zp), activation)
    return Requant(torch.tensor(mult[0], dtype=torch.int32), torch.tensor(mult[1], dtype=torch.int32),
                   int(out_zp), lo, hi, dtype)


def _default_qp(dt):
    return placeholder_qparams(dt)


def _check_act_qparams(qp: QParams, who: str, what: str) -> None:
    if qp.per_channel or qp.dtype.storage not in (torch.int8, torch.uint8):
        raise ValueError(f"{who}: {what} must be a per-tensor 8-bit activation, got {qp}")


class Elemwise(QuantizedModule):
    """Integer ``Elemwise("add" | "add_relu" | "mul")``: ``forward(a, b)``."""

    def __init__(self, method: str, a_dtype="qint8", b_dtype="qint8", output_dtype="qint8"):
        super().__init__()
        if method not in ELEMWISE_METHODS:
            raise ValueError(f"Elemwise method must be one of {ELEMWISE_METHODS}, got {method!r}")
        self.method = method
        self._set_qparams("a", _default_qp(a_dtype))
        self._set_qparams("b", _default_qp(b_dtype))
        self._set_qparams("output", _default_qp(output_dtype))

    def extra_repr(self) -> str:
        d = self._dtypes
        return f"{self.method!r}, a={d['a']}, b={d['b']}, out={d['output']}"

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        who = f"module {name!r} ({type(qat_module).__name__})" if name else \
            type(qat_module).__name__
        qa, qb = qat_module.input_qparams(name)
        out = qat_module.get_activation_qparams()
        for what, qp in (("input a", qa), ("input b", qb), ("output", out)):
            _check_act_qparams(qp, who, what)
        m = cls(qat_module.method, qa.dtype, qb.dtype, out.dtype)
        m._set_qparams("a", qa)
        m._set_qparams("b", qb)
        m._set_qparams("output", out)
        return m

    def params(self, device, swap: bool = False):
        """The integer op's parameters on ``device``; ``swap``: an add's parameters with the
        operands exchanged (``add(b, a)``: the same bytes, since each operand is rescaled on
        its own; what a fused conv + add needs when the conv output is the add's ``b``)."""
        def build():
            a, b, out = self._qparams("a"), self._qparams("b"), self._qparams("output")
            if swap:
                if self.method == "mul":
                    raise ValueError("Elemwise.params: swap applies to add / add_relu only")
                a, b = b, a
            if self.method == "mul":
                return single_rounding_requant(float(a.scale.double() * b.scale.double()),
                                               float(out.scale), int(out.zero_point), out.dtype)
            act = "relu" if self.method == "add_relu" else "none"
            return GF.make_add_params(float(a.scale), int(a.zero_point), float(b.scale),
                                      int(b.zero_point), float(out.scale), int(out.zero_point),
                                      out.dtype, act)
        return self._cached(("params", bool(swap)), device, build)

    def forward(self, a, b):
        self._check_input(a, "a")
        self._check_input(b, "b", a.device)
        p = self.params(a.device)
        if self.method == "mul":
            return integer.mul(a, self._zp("a", a.device), b, self._zp("b", a.device), p)
        return integer.add(a, b, p)


class Concat(QuantizedModule):
    """Integer ``Concat``: ``forward(tensors, dim=0)``; inputs requantized to the output's
    qparams in integers (copied where they already have them)."""

    def __init__(self, num_inputs: int = 1, input_dtype="qint8", output_dtype="qint8"):
        super().__init__()
        self.num_inputs = positive_int(num_inputs, "num_inputs", "Concat")
        self._set_qparams("input", QParams(input_dtype, torch.ones(self.num_inputs),
                                           torch.zeros(self.num_inputs, dtype=torch.int32)
                                           + int(placeholder_qparams(input_dtype).zero_point), 0))
        self._set_qparams("output", _default_qp(output_dtype))

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        who = f"module {name!r} ({type(qat_module).__name__})" if name else \
            type(qat_module).__name__
        ins = qat_module.input_qparams(name)
        out = qat_module.get_activation_qparams()
        _check_act_qparams(out, who, "output")
        for i, qp in enumerate(ins):
            _check_act_qparams(qp, who, f"input {i}")
            if qp.dtype != ins[0].dtype:
                raise ValueError(f"{who}: all inputs must share one dtype, got {ins[0].dtype.name} "
                                 f"and {qp.dtype.name}")
        m = cls(len(ins), ins[0].dtype, out.dtype)
        m._set_qparams("input", QParams(ins[0].dtype, torch.stack([q.scale.cpu() for q in ins]),
                                        torch.stack([q.zero_point.cpu() for q in ins]), 0))
        m._set_qparams("output", out)
        return m

    def params(self, device):
        def build():
            out = self._qparams("output")
            s_out, z_out = float(out.scale), int(out.zero_point)
            rqs = []
            for s, z in zip(self.input_scale.tolist(), self.input_zero_point.tolist()):
                same = (torch.tensor(s, dtype=torch.float32) == out.scale.cpu()) and z == z_out \
                    and self._dtypes["input"] == self._dtypes["output"]
                rqs.append(None if same else single_rounding_requant(
                    s, s_out, z_out, out.dtype).to(device))
            return rqs, [int(z) for z in self.input_zero_point.tolist()]
        return self._cached("params", device, build)

    def forward(self, tensors, dim: int = 0):
        tensors = list(tensors)
        if len(tensors) != self.num_inputs:
            raise ValueError(f"Concat was converted for {self.num_inputs} inputs, got "
                             f"{len(tensors)}")
        for t in tensors:
            self._check_input(t, "input", tensors[0].device)
        rqs, zps = self.params(tensors[0].device)
        return integer.concat(tensors, zps, rqs, dim, self._qparams("output").dtype)
