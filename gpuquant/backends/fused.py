"""Fused inference ops, defined as compositions of the base ops (the definition every fused
kernel must match bit for bit).

* ``conv2d_add(x, x_zp, w, bias, stride, padding, dilation, groups, rq, residual, p)``
  == ``add(conv2d(x, ...), residual, p)``: a residual block's add in the conv's epilogue,
  the conv output being the add's first operand;
* ``linear_add(x, x_zp, w, bias, rq, residual, p)`` == ``add(linear(...), residual, p)``;
* ``conv2d_dequant(x, x_zp, w, bias, stride, padding, dilation, groups, rq, scale)`` and
  ``linear_dequant(x, x_zp, w, bias, rq, scale)`` == ``dequantize(op(...), scale,
  rq.zero_point)`` as float32 (a network's last layer feeding its ``DequantStub``).

A backend with kernels of its own for them (Triton: the epilogue of its int8 GEMM / conv)
lists them in ``OPS``; :func:`compose` builds them from any backend's base ops (the NumPy
oracle registers those, so ``GPUQUANT_VERIFY=1`` checks the fused kernels too), and
:mod:`gpuquant.functional.integer` composes the base ops of whichever backend runs when the
chosen backend has no fused kernel.
"""
from __future__ import annotations

import torch

__all__ = ["FUSED_OPS", "compose"]

FUSED_OPS = ("conv2d_add", "linear_add", "conv2d_dequant", "linear_dequant")


def _scale_tensor(scale) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(torch.float32).reshape(())
    return torch.tensor(float(scale), dtype=torch.float32)


def compose(ops) -> dict:
    """The fused ops as compositions of ``ops["conv2d"]``, ``ops["linear"]``, ``ops["add"]``
    and ``ops["dequantize"]`` (``ops``: any mapping from op name to callable)."""
    def conv2d_add(x, x_zp, w, bias, stride, padding, dilation, groups, rq, residual, p):
        y = ops["conv2d"](x, x_zp, w, bias, stride, padding, dilation, groups, rq)
        return ops["add"](y, residual, p)

    def linear_add(x, x_zp, w, bias, rq, residual, p):
        return ops["add"](ops["linear"](x, x_zp, w, bias, rq), residual, p)

    def _dequant(y, rq, scale):
        s = _scale_tensor(scale).to(y.device)
        z = torch.tensor(int(rq.zero_point), dtype=torch.int32, device=y.device)
        return ops["dequantize"](y, s, z, None)

    def conv2d_dequant(x, x_zp, w, bias, stride, padding, dilation, groups, rq, scale):
        y = ops["conv2d"](x, x_zp, w, bias, stride, padding, dilation, groups, rq)
        return _dequant(y, rq, scale)

    def linear_dequant(x, x_zp, w, bias, rq, scale):
        return _dequant(ops["linear"](x, x_zp, w, bias, rq), rq, scale)

    return {"conv2d_add": conv2d_add, "linear_add": linear_add,
            "conv2d_dequant": conv2d_dequant, "linear_dequant": linear_dequant}
