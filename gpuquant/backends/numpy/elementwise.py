"""quantize / dequantize / requantize, and TFLite integer add, mul and concat, in NumPy.

Elementwise integer ops work on the integers in their memory order (NHWC for channels_last
activations); add and mul of int8 / uint8 inputs turn each input's rescaling into a
256-entry lookup table (the input has only 256 values), computed exactly in int64.
"""
from __future__ import annotations

import numpy as np
import torch

from . import common
from .fixed_point import Params, mbqm_int64, requant_int64


def _bcast(a: np.ndarray, axis, ndim: int) -> np.ndarray:
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def quantize(x, scale, zero_point, qmin, qmax, axis, out_dtype):
    xf = common.to_numpy(x.float() if x.dtype != torch.float32 else x)
    inv = np.float32(1.0) / common.to_numpy(scale.float())          # IEEE float32 division
    r = np.multiply(xf, _bcast(inv, axis, xf.ndim))
    np.rint(r, out=r)                                                # round half to even
    r += _bcast(common.to_numpy(zero_point).astype(np.float32), axis, xf.ndim)
    np.clip(r, qmin, qmax, out=r)
    return torch.from_numpy(r.astype(common.np_dtype(out_dtype)))


def dequantize(q, scale, zero_point, axis):
    qn = common.to_numpy(q)
    v = np.subtract(qn, _bcast(common.to_numpy(zero_point).astype(np.int32), axis, qn.ndim),
                    dtype=np.int32).astype(np.float32)
    v *= _bcast(common.to_numpy(scale.float()), axis, qn.ndim)
    return torch.from_numpy(v)


def requantize(acc, rq, axis=None):
    a = common.to_numpy(acc)
    p = Params.from_requant(rq)
    if rq.per_channel and axis is not None:
        p = p.along(axis % a.ndim, a.ndim)
    return torch.from_numpy(requant_int64(a, p))


def _storage_values(dtype) -> np.ndarray:
    """The value of each of the 256 bit patterns of an int8 / uint8 storage byte."""
    u = np.arange(256, dtype=np.uint8)
    return u.view(np.int8).astype(np.int64) if dtype == np.int8 else u.astype(np.int64)


def _as_bytes(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8) if a.dtype == np.int8 else a


def _views(*ts):
    """NumPy views in NHWC order when every tensor is 4-D, else in logical order."""
    if all(t.dim() == 4 for t in ts):
        return [common.nhwc(t) for t in ts], True
    return [common.to_numpy(t) for t in ts], False


def _wrap(y: np.ndarray, nhwc: bool) -> torch.Tensor:
    return common.from_nhwc(y) if nhwc else torch.from_numpy(np.ascontiguousarray(y))


def add(a, b, p):
    (an, bn), nhwc = _views(a, b)
    lut_a = mbqm_int64((_storage_values(an.dtype) - p.a_zero_point) << p.left_shift,
                       p.a_multiplier, p.a_rshift)
    lut_b = mbqm_int64((_storage_values(bn.dtype) - p.b_zero_point) << p.left_shift,
                       p.b_multiplier, p.b_rshift)
    total = np.add(lut_a[_as_bytes(an)], lut_b[_as_bytes(bn)])
    return _wrap(requant_int64(total, Params.from_requant(p.out)), nhwc)


def mul(a, a_zp, b, b_zp, rq):
    (an, bn), nhwc = _views(a, b)
    prod = np.subtract(an, int(a_zp), dtype=np.int64) * np.subtract(bn, int(b_zp), dtype=np.int64)
    return _wrap(requant_int64(prod, Params.from_requant(rq)), nhwc)


_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def concat(xs, zero_points, rqs, dim, out_dtype):
    views, nhwc = _views(*xs)
    nd = xs[0].dim()
    d = dim % nd
    axis = _NHWC_AXIS[d] if nhwc else d
    odt = common.np_dtype(out_dtype)
    parts = []
    for v, zp, rq in zip(views, zero_points, rqs):
        if rq is None:
            parts.append(v.astype(odt))
        else:
            parts.append(requant_int64(np.subtract(v, int(zp), dtype=np.int64),
                                       Params.from_requant(rq)))
    return _wrap(np.concatenate(parts, axis=axis), nhwc)
