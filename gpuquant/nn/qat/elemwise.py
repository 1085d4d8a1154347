"""QAT elementwise ops and concat: float op, then the output fake-quantized."""
from __future__ import annotations

from .. import elemwise as Float
from .module import QATModule, source_of

__all__ = ["Elemwise", "Concat"]


class Elemwise(QATModule, Float.Elemwise):
    """QAT ``Elemwise``: ``forward(a, b)``."""

    with_weight = False

    def forward(self, a, b):
        self._begin_forward()
        self._note_inputs(a, b)
        if self.method in ("add", "add_relu"):  # the add (and ReLU) go to the fused
            # observe + fake quant, which reads a and b and never writes the sum
            return self.apply_quant_activation(a, "relu" if self.method == "add_relu" else "none",
                                               addend=b)
        return self.apply_quant_activation(self._float_op(a, b))


class Concat(QATModule, Float.Concat):
    """QAT ``Concat``: ``forward(tensors, dim=0)``; the output gets its own qparams."""

    with_weight = False

    def forward(self, tensors, dim: int = 0):
        self._begin_forward()
        tensors = list(tensors)
        self._note_inputs(*tensors)
        self._check_input_dtypes(tensors)
        return self.apply_quant_activation(super().forward(tensors, dim))

    def _check_input_dtypes(self, tensors) -> None:
        """The int8 ``Concat`` takes inputs of one quantized dtype (requantizing them to the
        output's): refuse others at the first step, not after training at ``quantize()``.
        The producers' dtypes are settings (no device sync).

        Raises:
            ValueError: two inputs whose producers quantize to different dtypes (named).
        """
        first = None
        for i, t in enumerate(tensors):
            src = source_of(t)
            q = getattr(src, "act_fake_quant", None)
            d = getattr(q if q is not None else getattr(src, "act_observer", None), "dtype", None)
            if d is None:
                continue
            if first is None:
                first = (i, d, src)
            elif d != first[1]:
                raise ValueError(
                    f"{type(self).__name__}: input {first[0]} ({type(first[2]).__name__}) is "
                    f"{first[1].name} and input {i} ({type(src).__name__}) is {d.name}; the int8 "
                    f"Concat takes inputs of one dtype (it requantizes them to its output's): "
                    f"give their producers one activation dtype (their qconfig)")
