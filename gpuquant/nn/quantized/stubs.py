"""Integer stubs: QuantStub quantizes the float input, DequantStub dequantizes the output."""
from __future__ import annotations

import torch

from ... import functional as GF
from .module import QuantizedModule, placeholder_qparams

__all__ = ["QuantStub", "DequantStub"]


class QuantStub(QuantizedModule):
    """float32 / float16 / bfloat16 -> int8 / uint8 (channels_last for 4-D) with the
    qparams observed in QAT."""

    def __init__(self, output_dtype="qint8"):
        super().__init__()
        qp = placeholder_qparams(output_dtype)
        if qp.dtype.storage not in (torch.int8, torch.uint8):
            raise ValueError(f"QuantStub: output_dtype must have 8-bit storage (qint8, quint8 or "
                             f"their narrow / 4-bit forms), got {qp.dtype.name}")
        self._set_qparams("output", qp)

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        fed = [s for slot in qat_module.__dict__.get("_input_sources", ()) for s in slot
               if s is not None and not getattr(s, "quantize_disabled", False)]  # (float)
        if fed:
            raise ValueError(f"QuantStub {name!r}: its input is the quantized output of a "
                             f"{type(fed[0]).__name__}, which the int8 model hands it as "
                             f"int8 data; a QuantStub takes float input: remove it, or put "
                             f"a DequantStub before it")
        qp = qat_module.get_activation_qparams()
        if qp.per_channel or qp.dtype.storage not in (torch.int8, torch.uint8):
            raise ValueError(f"QuantStub {name!r}: needs per-tensor 8-bit qparams, got {qp}")
        m = cls(qp.dtype)
        m._set_qparams("output", qp)
        return m

    def forward(self, x):
        """Quantize ``x`` with the observed qparams.

        Raises:
            TypeError: ``x`` is not a float ``torch.Tensor`` (a NumPy array is named as one,
                with its dtype: convert it with ``torch.from_numpy``), or its dtype is not
                float32 / float16 / bfloat16 (:func:`gpuquant.functional.quantize`'s).
        """
        self._check_mode()
        if not isinstance(x, torch.Tensor):
            mod = type(x).__module__
            kind = type(x).__name__ if mod == "builtins" else f"{mod}.{type(x).__name__}"
            if mod == "numpy" and hasattr(x, "dtype"):  # (without importing numpy)
                conv = "torch.from_numpy(x)" if type(x).__name__ == "ndarray" else \
                    "torch.tensor(x)"
                kind += f" ({x.dtype}); convert with {conv}"
            raise TypeError(f"QuantStub: expects a float torch.Tensor (float32, float16 or "
                            f"bfloat16), got {kind}")
        if not x.is_floating_point():
            raise TypeError(f"QuantStub: expects a float tensor (float32, float16 or bfloat16), "
                            f"got {x.dtype}")
        qp = self._cached("qp", x.device, lambda: self._qparams("output"))
        return self._as_layout(GF.quantize(x, qp))


_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DequantStub(QuantizedModule):
    """int8 / uint8 -> float32 with the qparams of the module that produced the input; in the
    model's float dtype once it is cast (``model.half()``, ``.to(torch.bfloat16)``), as the
    float modules after it are (the value is dequantized in float32, then rounded once)."""

    def __init__(self, input_dtype="qint8"):
        super().__init__()
        self._set_qparams("input", placeholder_qparams(input_dtype))
        # follows the model's floating casts (the scales keep float32); not in state_dict
        self.register_buffer("_float", torch.empty(0), persistent=False)

    def out_dtype(self) -> torch.dtype:
        """The float dtype of the output: float32, or the model's after a floating cast."""
        t = self._buffers.get("_float")  # (absent in modules pickled by older releases)
        return torch.float32 if t is None else t.dtype

    def as_out_dtype(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (dequantized, float32) in :meth:`out_dtype`: this stub's and the fused
        ``ConvDequant``'s output."""
        dt = self.out_dtype()
        return y if dt == torch.float32 else y.to(dt)

    def set_out_dtype(self, dtype: torch.dtype) -> "DequantStub":
        """Answer in ``dtype`` (float32, float16 or bfloat16), as a cast of the model does:
        ``quantize()`` of a QAT model cast before conversion, ``gpuquant.load``.

        Raises:
            ValueError: another dtype.
        """
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"DequantStub: the output dtype must be one of "
                             f"{[str(d) for d in _OUT_DTYPES]}, got {dtype!r}")
        self._float = torch.empty(0, dtype=dtype, device=self.input_scale.device)
        return self

    # the output dtype travels in state_dict (extra state) where it is not float32: a model
    # cast before saving answers in that dtype once loaded
    def get_extra_state(self):
        state = super().get_extra_state()
        if self.out_dtype() != torch.float32:
            state["out_dtype"] = str(self.out_dtype()).replace("torch.", "")
        return state

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        name = state.get("out_dtype", "float32")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"DequantStub: the state_dict's out_dtype {name!r} is not one of "
                             f"{[str(d).replace('torch.', '') for d in _OUT_DTYPES]}")
        self.set_out_dtype(dtype)

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        (qp,) = qat_module.input_qparams(name)
        m = cls(qp.dtype)
        m._set_qparams("input", qp)
        return m

    def forward(self, x):
        self._check_input(x, "input")
        qp = self._cached("qp", x.device, lambda: self._qparams("input"))
        return self.as_out_dtype(float_layout(GF.dequantize(x, qp)))


def float_layout(y):
    """A float result leaving the int8 part of a network in the layout the float and QAT
    models give (contiguous NCHW, or CHW for an unbatched conv's output), not the int8
    activations' channels_last: float code after it (``y.view(y.size(0), -1)``) runs on all
    three unchanged."""
    return y.contiguous() if y.dim() in (3, 4) else y
