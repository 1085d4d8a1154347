"""Triton inference ops: the int8 tensor-core GEMM / conv family and the elementwise and
pooling kernels a quantized network needs, with the signatures of
:mod:`gpuquant.backends.reference` (the readable definition; same bytes).

Beyond the reference ops, ``OPS`` holds the fused kernels of :mod:`gpuquant.backends.fused`
(run by the front-ends ``gpuquant.functional.conv2d_add`` etc. through
:func:`gpuquant.backends.fused_op`; each equals its composition of base ops, bit for bit):

* ``conv2d_add(x, x_zp, w, bias, stride, padding, dilation, groups, rq, residual, p)``
  == ``add(conv2d(x, ...), residual, p)`` (the residual add of a ResNet block in the
  conv's epilogue; the conv output is the add's first operand);
* ``linear_add(x, x_zp, w, bias, rq, residual, p)`` == ``add(linear(...), residual, p)``;
* ``conv2d_dequant(x, x_zp, w, bias, stride, padding, dilation, groups, rq, scale)`` and
  ``linear_dequant(x, x_zp, w, bias, rq, scale)`` == ``dequantize(op(...), scale,
  rq.zero_point)`` as float32 (a network's last layer);
* ``linear_int32(x, x_zp, w, bias)`` / ``conv2d_int32(...)`` without ``rq``: the bare int32
  accumulator ``sum((x - x_zp) * w) + bias`` (benchmarks, custom epilogues).
"""
from __future__ import annotations

from .common import scalar_float
from .fake_quant import on_tensor_device
from .conv import qconv2d
from .elementwise import OPS as _ELEMENTWISE_OPS
from .gemm import qgemm

__all__ = ["OPS", "conv2d", "linear"]


def _linear(x, x_zp, w, bias, rq, **kw):
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    y = qgemm(x2d, int(x_zp), w, bias, rq, w_src=w, **kw)
    return y.reshape(*x.shape[:-1], w.shape[0])


def conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq):
    """Quantized conv2d, int8/uint8 NCHW-logical (channels_last) -> rq.dtype, channels_last."""
    return qconv2d(x, int(x_zp), w, bias, stride, padding, dilation, groups, rq)


def linear(x, x_zp, w, bias, rq):
    """Quantized linear: x (..., K) int8/uint8, w (N, K) int8 -> (..., N) rq.dtype."""
    return _linear(x, x_zp, w, bias, rq)


def conv2d_add(x, x_zp, w, bias, stride, padding, dilation, groups, rq, residual, p):
    return qconv2d(x, int(x_zp), w, bias, stride, padding, dilation, groups, rq,
                   residual=residual, add_params=p)


def linear_add(x, x_zp, w, bias, rq, residual, p):
    return _linear(x, x_zp, w, bias, rq, residual=residual.reshape(-1, w.shape[0]),
                   add_params=p)


def _scale_value(scale) -> float:
    return scalar_float(scale)  # a GPU scale is read once, then memoised


def conv2d_dequant(x, x_zp, w, bias, stride, padding, dilation, groups, rq, scale):
    return qconv2d(x, int(x_zp), w, bias, stride, padding, dilation, groups, rq,
                   out_mode="float", deq_scale=_scale_value(scale),
                   deq_zero_point=rq.zero_point)


def linear_dequant(x, x_zp, w, bias, rq, scale):
    return _linear(x, x_zp, w, bias, rq, out_mode="float", deq_scale=_scale_value(scale),
                   deq_zero_point=rq.zero_point)


def conv2d_int32(x, x_zp, w, bias, stride, padding, dilation, groups):
    return qconv2d(x, int(x_zp), w, bias, stride, padding, dilation, groups, None,
                   out_mode="int32")


def linear_int32(x, x_zp, w, bias):
    return _linear(x, x_zp, w, bias, None, out_mode="int32")


OPS = {
    "conv2d": conv2d, "linear": linear,
    "conv2d_add": conv2d_add, "linear_add": linear_add,
    "conv2d_dequant": conv2d_dequant, "linear_dequant": linear_dequant,
    "conv2d_int32": conv2d_int32, "linear_int32": linear_int32,
}
OPS.update(_ELEMENTWISE_OPS)
# every launcher on its input's GPU (a model on cuda:1 while cuda:0 is current)
OPS = {name: on_tensor_device(fn) for name, fn in OPS.items()}
