"""QuantizedModule: the base of the integer (inference-only) modules.

Quantized activations between modules are plain int8 / uint8 tensors (channels_last for
4-D); each quantized module stores, from conversion, the qparams of its inputs and of its
output as buffers (``<name>_scale``, ``<name>_zero_point``; the dtype names in the module's
extra state), so ``state_dict`` round-trips exactly. Fixed-point requantization parameters
are derived from those buffers once (cached per device, rebuilt after ``load_state_dict``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ...dtypes import get_dtype
from ...qparams import QParams
from ..module import Module

__all__ = ["QuantizedModule", "placeholder_qparams"]


def placeholder_qparams(dtype) -> QParams:
    """Scale 1 and a mid-range zero point: what an empty module holds until
    ``from_qat_module`` or ``load_state_dict`` sets the real qparams."""
    d = get_dtype(dtype)
    return QParams(d, 1.0, 0 if d.signed else (d.qmin + d.qmax + 1) // 2)


class QuantizedModule(Module):
    """Base of ``gpuquant.nn.quantized``: inference only (``train(True)`` raises)."""

    def __init__(self):
        super().__init__()
        self.training = False
        self._dtypes: Dict[str, str] = {}
        self._cache: dict = {}

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is a quantized (int8, inference-only) "
                               f"module and cannot be put in training mode; train the QAT model "
                               f"(gpuquant.quantization.quantize_qat) and convert it again")
        return super().train(False)

    def _check_mode(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is a quantized (inference-only) module but "
                               f"its training flag is set; call .eval()")

    # ------------------------------------------------------------------ qparams as buffers
    def _set_qparams(self, name: str, qp: QParams) -> None:
        self._dtypes[name] = qp.dtype.name
        scale = qp.scale.detach().to(torch.float32).clone()
        zp = qp.zero_point.detach().to(torch.int32).clone()
        for suffix, t in (("scale", scale), ("zero_point", zp)):
            key = f"{name}_{suffix}"
            if key in self._buffers:
                self._buffers[key] = t.to(self._buffers[key].device) \
                    if self._buffers[key] is not None else t
            else:
                self.register_buffer(key, t)
        self._cache.clear()

    def _qparams(self, name: str) -> QParams:
        scale = getattr(self, f"{name}_scale")
        zp = getattr(self, f"{name}_zero_point")
        return QParams(self._dtypes[name], scale, zp, axis=0 if scale.dim() == 1 else None)

    def _cached(self, key, device, build):
        k = (key, str(device))
        v = self._cache.get(k)
        if v is None:
            v = build()
            if hasattr(v, "to"):
                v = v.to(device)
            self._cache[k] = v
        return v

    def _zp(self, name: str, device) -> int:
        """The zero point ``name`` as a Python int (read from the buffer once: no host sync
        per call)."""
        return self._cached(("zp", name), device, lambda: int(getattr(self, f"{name}_zero_point")))

    def _bounds(self, device) -> dict:
        """``max |weight|`` and ``max |bias|`` as ints for the accumulator-range check."""
        def build():
            b = getattr(self, "bias", None)
            w = self.weight.to(torch.int32)  # int8 abs(-128) would wrap
            return {"w_absmax": int(w.abs().max()) if w.numel() else 0,
                    "bias_absmax": int(b.to(torch.int64).abs().max())
                    if b is not None and b.numel() else 0}
        return dict(self._cached("bounds", device, build))

    def get_extra_state(self):
        return {"dtypes": dict(self._dtypes)}

    def set_extra_state(self, state) -> None:
        self._dtypes = {k: get_dtype(v).name for k, v in state["dtypes"].items()}
        self._cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ input checks
    def _check_input(self, x, name: str = "input", device: Optional[torch.device] = None):
        """x must be the int8 / uint8 storage of the stored input dtype, on ``device``."""
        self._check_mode()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        dt = get_dtype(self._dtypes[name])
        if x.dtype != dt.storage:
            hint = (" (float input: put a gpuquant.nn.QuantStub first)"
                    if x.dtype.is_floating_point else "")
            raise TypeError(f"{type(self).__name__}: expects a {dt.name} activation stored as "
                            f"{dt.storage}, got {x.dtype}{hint}")
        if device is not None and x.device != device:
            raise ValueError(f"{type(self).__name__}: input is on device {x.device} but the "
                             f"module's weights are on {device}; move one of them")

    @staticmethod
    def _as_layout(y: torch.Tensor) -> torch.Tensor:
        return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y

    @classmethod
    def from_qat_module(cls, qat_module, name: str = ""):
        raise NotImplementedError
