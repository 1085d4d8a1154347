"""quantize / dequantize / requantize, and TFLite integer add, mul and concat, in NumPy.

Elementwise integer ops work on the integers in their memory order (NHWC for channels_last
activations); add and mul of int8 / uint8 inputs turn each input's rescaling into a
256-entry lookup table (the input has only 256 values), computed exactly in int64.
"""
from __future__ import annotations

import numpy as np

from .fixed_point import Params, mbqm_int64, requant_int64


def _bcast(a: np.ndarray, axis, ndim: int) -> np.ndarray:
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


_F32_EXACT = 2 ** 24  # float32 holds every integer of magnitude up to this


def quantize_array(xf: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int,
                   qmax: int, axis, np_dtype) -> np.ndarray:
    """``clamp(rne(x * (1 / scale)) + zp, qmin, qmax)`` of a float32 array (contract 1).

    The add and the clamp are exact: in float32 for ranges within +-2^24, in float64 where
    the range (qint32: zero points and 2^31 - 1) holds integers float32 does not."""
    inv = np.float32(1.0) / np.asarray(scale, dtype=np.float32)      # IEEE float32 division
    # (np.asarray: the product of 0-d arrays is a NumPy scalar, which out= cannot take)
    r = np.asarray(np.multiply(xf, _bcast(inv, axis, np.ndim(xf)), dtype=np.float32))
    np.rint(r, out=r)                                                # round half to even
    if max(-qmin, qmax) > _F32_EXACT:
        r = r.astype(np.float64)
    r += _bcast(np.asarray(zero_point).astype(r.dtype), axis, r.ndim)
    np.clip(r, qmin, qmax, out=r)
    return r.astype(np_dtype)


def dequantize_array(qn: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                     axis) -> np.ndarray:
    """``(q - zp) * scale`` in float32 (``q - zp`` in int64 for int32 ``q``: it may not fit)."""
    wide = np.int64 if qn.dtype.itemsize >= 4 else np.int32
    v = np.asarray(np.subtract(qn, _bcast(np.asarray(zero_point).astype(wide), axis, np.ndim(qn)),
                               dtype=wide), dtype=np.float32)  # an array for 0-d q too
    v *= _bcast(np.asarray(scale, dtype=np.float32), axis, np.ndim(qn))
    return v


def _storage_values(dtype) -> np.ndarray:
    """The value of each of the 256 bit patterns of an int8 / uint8 storage byte."""
    u = np.arange(256, dtype=np.uint8)
    return u.view(np.int8).astype(np.int64) if dtype == np.int8 else u.astype(np.int64)


def _as_bytes(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8) if a.dtype == np.int8 else a


def add_arrays(an: np.ndarray, bn: np.ndarray, p, p_out: Params) -> np.ndarray:
    """TFLite integer add of int8 / uint8 arrays (broadcasting); ``p`` holds ``left_shift``
    and the per-input ``*_zero_point``, ``*_multiplier``, ``*_rshift`` (an ``AddParams``),
    ``p_out`` the output requantization."""
    lut_a = mbqm_int64((_storage_values(an.dtype) - p.a_zero_point) << p.left_shift,
                       p.a_multiplier, p.a_rshift)
    lut_b = mbqm_int64((_storage_values(bn.dtype) - p.b_zero_point) << p.left_shift,
                       p.b_multiplier, p.b_rshift)
    total = np.add(lut_a[_as_bytes(an)], lut_b[_as_bytes(bn)])
    return requant_int64(total, p_out)


def mul_arrays(an: np.ndarray, a_zp: int, bn: np.ndarray, b_zp: int, p: Params) -> np.ndarray:
    """TFLite integer mul: ``requant((a - zp_a) * (b - zp_b))``."""
    prod = np.subtract(an, int(a_zp), dtype=np.int64) * np.subtract(bn, int(b_zp), dtype=np.int64)
    return requant_int64(prod, p)


def concat_arrays(arrays, zero_points, params, axis: int, np_dtype) -> np.ndarray:
    """Concatenate along ``axis``, each input requantized by its ``Params`` (None: copied)."""
    parts = []
    for v, zp, p in zip(arrays, zero_points, params):
        if p is None:
            parts.append(v.astype(np_dtype))
        else:
            parts.append(requant_int64(np.subtract(v, int(zp), dtype=np.int64), p))
    return np.concatenate(parts, axis=axis)


def lookup_array(q: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[q - storage_min]``: each int8 / uint8 code through a 256-entry table (int8:
    entry ``q + 128``; uint8: entry ``q``), in ``q``'s memory order, ``table``'s dtype."""
    if q.dtype == np.int8:
        idx = q.view(np.uint8) ^ np.uint8(0x80)  # q + 128 without widening
    else:
        idx = q
    return np.take(table, idx)
