"""The NumPy backend's ops on torch tensors (the signatures of
:mod:`gpuquant.backends.reference`): views of the tensors as NumPy arrays (NHWC for
channels_last activations, no copies), the torch-free array kernels of :mod:`.conv`,
:mod:`.gemm`, :mod:`.elementwise` and :mod:`.pool`, and the results wrapped back.

The array kernels import no torch, so :mod:`gpuquant.runtime` executes exported models with
the very same code.
"""
from __future__ import annotations

import functools
import weakref

import numpy as np
import torch

from . import common, conv as _conv, elementwise as _ew, gemm as _gemm, pool as _pool
from .fixed_point import Params, requant_int64

__all__ = ["OPS"]


def _bias(bias):
    return None if bias is None else common.WEIGHTS.get(
        bias, "bias", lambda: common.to_numpy(bias).astype(np.int64))


def quantize(x, scale, zero_point, qmin, qmax, axis, out_dtype):
    xf = common.to_numpy(x.float() if x.dtype != torch.float32 else x)
    return torch.from_numpy(_ew.quantize_array(xf, common.to_numpy(scale.float()),
                                               common.to_numpy(zero_point), qmin, qmax, axis,
                                               common.np_dtype(out_dtype)))


def dequantize(q, scale, zero_point, axis):
    return torch.from_numpy(_ew.dequantize_array(common.to_numpy(q), common.to_numpy(scale.float()),
                                                 common.to_numpy(zero_point), axis))


def requantize(acc, rq, axis=None):
    a = common.to_numpy(acc)
    p = Params.from_requant(rq)
    if rq.per_channel and axis is not None:
        p = p.along(axis % a.ndim, a.ndim)
    return torch.from_numpy(requant_int64(a, p))


def conv2d(x, x_zp, w, bias, stride, padding, dilation, groups, rq):
    wn = common.to_numpy(w.contiguous())
    out = _conv.conv2d_nhwc(common.nhwc(x), int(x_zp), wn, _bias(bias), stride, padding,
                            dilation, groups, Params.from_requant(rq),
                            lambda kind, build: common.WEIGHTS.get(w, kind, build))
    return common.from_nhwc(out)


_PLANS = {}  # (id(w), id(bias), id(rq)) -> (refs, signature, LinearPlan)


def _linear_plan(w, bias, rq) -> "_gemm.LinearPlan":
    """The :class:`~.gemm.LinearPlan` of a layer, cached per (weight, bias, Requant) object
    triple and checked against each one's storage and in-place version (one lookup where
    the weight cache, the bias cache and the Requant cache took one each: ~4 us cold)."""
    m, sh = rq.multiplier, rq.rshift
    ver = common.version
    sig = (w.data_ptr(), ver(w), w.shape, w.stride(),
           None if bias is None else (bias.data_ptr(), ver(bias), bias.shape),
           ver(m), ver(sh), rq.zero_point, rq.qmin, rq.qmax, rq.dtype)
    key = (id(w), id(bias), id(rq))
    hit = _PLANS.get(key)
    if hit is not None:
        (wr, br, rr, m0, sh0), sig0, plan = hit
        if (sig0 == sig and wr() is w and rr() is rq and m0 is m and sh0 is sh
                and (bias is None or br() is bias)):
            return plan
    plan = _gemm.LinearPlan(common.WEIGHTS.get(w, "linear", lambda: _gemm._pack_linear(w)),
                            Params.from_requant(rq), _bias(bias))
    if len(_PLANS) >= 1024:
        _PLANS.clear()
    drop = lambda _r, k=key: _PLANS.pop(k, None)  # noqa: E731
    try:
        refs = (weakref.ref(w, drop), None if bias is None else weakref.ref(bias, drop),
                weakref.ref(rq, drop), m, sh)
    except TypeError:  # an object without weak references: no caching
        return plan
    _PLANS[key] = (refs, sig, plan)
    return plan


def linear(x, x_zp, w, bias, rq):
    plan = _linear_plan(w, bias, rq)
    xa = common.to_numpy(x)  # NumPy reshapes: a torch reshape costs ~2 us each way
    out = _gemm.run_linear(xa.reshape(-1, xa.shape[-1]), int(x_zp), plan)
    return torch.from_numpy(out.reshape(xa.shape[:-1] + (plan.n,)))


def _views(*ts):
    """NumPy views in NHWC order when every tensor is 4-D, else in logical order."""
    if all(t.dim() == 4 for t in ts):
        return [common.nhwc(t) for t in ts], True
    return [common.to_numpy(t) for t in ts], False


def _wrap(y: np.ndarray, nhwc: bool) -> torch.Tensor:
    if nhwc:
        return common.from_nhwc(y)
    # (np.ascontiguousarray makes a 0-d array 1-d)
    return torch.from_numpy(np.ascontiguousarray(y).reshape(np.shape(y)))


def add(a, b, p):
    (an, bn), nhwc = _views(a, b)
    return _wrap(_ew.add_arrays(an, bn, p, Params.from_requant(p.out)), nhwc)


def mul(a, a_zp, b, b_zp, rq):
    (an, bn), nhwc = _views(a, b)
    return _wrap(_ew.mul_arrays(an, a_zp, bn, b_zp, Params.from_requant(rq)), nhwc)


def lookup(x, table):
    (xn,), nhwc = _views(x)
    return _wrap(_ew.lookup_array(xn, common.to_numpy(table.contiguous())), nhwc)


_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def concat(xs, zero_points, rqs, dim, out_dtype):
    views, nhwc = _views(*xs)
    d = dim % xs[0].dim()
    axis = _NHWC_AXIS[d] if nhwc else d
    params = [None if rq is None else Params.from_requant(rq) for rq in rqs]
    return _wrap(_ew.concat_arrays(views, zero_points, params, axis, common.np_dtype(out_dtype)),
                 nhwc)


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
    return common.from_nhwc(_pool.max_pool2d_nhwc(common.nhwc(x), kernel_size, stride, padding,
                                                  dilation, ceil_mode))


def avg_pool2d(x, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override, qmin, qmax):
    return common.from_nhwc(_pool.avg_pool2d_nhwc(common.nhwc(x), zero_point, kernel_size, stride,
                                                  padding, ceil_mode, count_include_pad,
                                                  divisor_override, qmin, qmax))


def adaptive_avg_pool2d(x, zero_point, output_size, qmin, qmax):
    return common.from_nhwc(_pool.adaptive_avg_pool2d_nhwc(common.nhwc(x), zero_point,
                                                           output_size, qmin, qmax))


def gather_hw(x, ih, iw):
    return common.from_nhwc(_pool.gather_hw_nhwc(common.nhwc(x), common.to_numpy(ih),
                                                 common.to_numpy(iw)))


OPS = {
    "quantize": quantize,
    "dequantize": dequantize,
    "requantize": requantize,
    "conv2d": conv2d,
    "linear": linear,
    "add": add,
    "mul": mul,
    "lookup": lookup,
    "concat": concat,
    "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "adaptive_avg_pool2d": adaptive_avg_pool2d,
    "gather_hw": gather_hw,
}

# dynamic (per-token) quantization ops for transformers (their own family file)
from .dynamic import OPS as _DYNAMIC_OPS  # noqa: E402

OPS.update(_DYNAMIC_OPS)

# fused inference ops as compositions of the ops above: the oracle for the fused kernels of
# the GPU backends (GPUQUANT_VERIFY=1 checks them against these)
from ..fused import compose as _compose  # noqa: E402

OPS.update(_compose(OPS))


def _eager_only(name, fn):
    """``fn`` (NumPy code on tensors' memory), kept out of graph capture:

    * under ``torch.jit.trace`` it would be recorded as a constant (the traced model then
      ignores its input): refused with a clear error;
    * under ``torch.compile`` dynamo would trace the NumPy calls on fake tensors and fail
      deep inside torch: refused with a clear error instead (torch versions that graph-break
      on the raise run the op eagerly, where ``is_compiling()`` is False)."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        if torch.jit.is_tracing():
            raise NotImplementedError(
                f"numpy backend op {name!r} cannot be recorded by torch.jit.trace (it computes "
                f"in NumPy: the trace would hold this call's result as a constant); to "
                f"deploy an int8 model use gpuquant.export.to_onnx or gpuquant.save")
        if _is_compiling():
            raise NotImplementedError(
                f"numpy backend op {name!r} cannot run inside torch.compile (it computes in "
                f"NumPy); compile the model under gpuquant.backends.use('reference'), or "
                f"leave the int8 modules out of the compiled region (torch.compiler.disable)")
        return fn(*args, **kwargs)
    return op


def _is_compiling() -> bool:
    f = getattr(torch.compiler, "is_compiling", None)
    return bool(f()) if f is not None else False


OPS = {name: _eager_only(name, fn) for name, fn in OPS.items()}
