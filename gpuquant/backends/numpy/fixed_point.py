"""Fixed-point requantization (TFLite ``MultiplyByQuantizedMultiplier``) vectorised in NumPy.

``y = clamp(zp + RDBPOT(SRDHM(sat32(acc << l), M), e), lo, hi)`` two ways, same bytes:

* :func:`requant_int64`: the TFLite steps in int64, for any multiplier and shift.
* :func:`requant_fast`: float32 with an exact fix-up, for accumulators out of a float GEMM.
  Derivation (``e = max(rshift, 0)``, ``M >= 0``): ``SRDHM(a, M) = floor((a M + 2^30) / 2^31)``
  (the +-2^30 nudge with truncation is a round-half-up) and ``RDBPOT(s, e)`` rounds half
  away from zero, ``floor((s + 2^(e-1) - [s < 0]) / 2^e)``; nested floors merge, so
  ``y = floor(V + 1/2)`` with ``V = X + sign(acc) d + zp``, ``X = acc M 2^-(31+e)``,
  ``d = 2^-(e+1)`` (0 for ``e = 0``); ``s < 0`` iff ``acc < 0`` except ``acc = -1, M = 2^30``
  where both give 0. The fast path evaluates ``V`` in float32 (``V'``, five roundings of
  relative size 2^-24) with a rigorous bound ``|V' - V| < w`` (about 2^-12) for every
  element whose ``V`` lies near the clamp range, takes ``rint(V')``, and recomputes exactly
  in integers only the elements with ``|V' - rint(V')| >= 1/2 - w`` (about ``2w`` of them).
  Clamping ``V'`` to ``[lo, hi]`` first is safe: an element far outside stays outside.

Timing (AMD EPYC, one core, per-channel): int64 path ~4 ns/output (per-channel shifts are
slow in NumPy), fast path ~1 ns/output (64 K-element chunks that stay in L2).
"""
from __future__ import annotations

import weakref

import numpy as np

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
_PARAMS = {}  # id(Requant) -> (weakref, signature, Params)


class Params:
    """Host-side arrays of a :class:`~gpuquant.functional.requant.Requant`, broadcast along
    the last axis (the channel axis of NHWC / (..., N) data) or scalars."""

    __slots__ = ("m", "rshift", "zp", "lo", "hi", "np_dtype", "r", "d", "e", "left",
                 "r32", "d32", "dz32", "has_d", "float_ok32", "thr", "_b32", "_b64", "_tiles",
                 "_fold", "big")

    def __init__(self, multiplier, rshift, zero_point: int, qmin: int, qmax: int, np_dtype):
        self.m = np.asarray(multiplier, dtype=np.int64)
        self.rshift = np.asarray(rshift, dtype=np.int64)
        self.zp, self.lo, self.hi = int(zero_point), int(qmin), int(qmax)
        self.np_dtype = np_dtype
        e = np.maximum(self.rshift, 0)
        self.e = e
        self.left = np.maximum(-self.rshift, 0)
        # fast path constants: V = acc * r + sign(acc) * d + zp
        self.r = self.m.astype(np.float64) * np.exp2(-(31.0 + self.rshift.astype(np.float64)))
        self.d = np.where(e > 0, np.exp2(-(e + 1.0)), 0.0)
        self.r32 = self.r.astype(np.float32)
        self.d32 = self.d.astype(np.float32)  # powers of two: exact
        self.has_d = bool((self.d > 0).any())
        self.dz32 = (self.d + self.zp).astype(np.float32)  # rounded for e > 15: in the bound
        # r must be a normal float32 for the relative error bound
        self.float_ok32 = bool(((self.r == 0) | (self.r > 2.0 ** -100)).all())
        # Error bound of V' (float32) for every element whose exact V can land within one
        # step of [lo, hi]: there |X| <= L + 1; u = fl(acc + b) is one rounding, the product
        # with r32 (itself rounded) two, "+ t" and "+ zp" one each, all relative 2^-24:
        # |V' - V| <= 2^-24 (4 |X| + |V|) (+ O(2^-48)); 25% margin. Elements beyond stay
        # beyond (relative error), so the clamp gives the exact result for them.
        big = max(abs(self.lo - self.zp), abs(self.hi - self.zp)) + 3
        # (+ |zp| + 1 for the rounding of the constant d + zp of the fused-ReLU form)
        w = 1.25 * _EPS32 * (4.0 * big + max(abs(self.lo), abs(self.hi)) + abs(self.zp) + 3.0)
        if w >= 2.0 ** -8:  # wide output ranges (int32): float32 cannot bound them; exact path
            self.float_ok32 = False
            w = 0.25
        thr = np.float32(0.5 - w)
        while float(thr) > 0.5 - w:  # round the threshold down, never up
            thr = np.nextafter(thr, np.float32(0))
        self.thr = thr
        self.big = big
        self._b32 = self._b64 = self._fold = None
        self._tiles = {}

    def tiled(self, name: str, v: np.ndarray, rows: int, c: int):
        """``v`` (per channel, or a scalar) repeated to ``(rows, c)``: NumPy runs same-shape
        operands as one flat loop, while broadcasting a (c,) vector costs an inner-loop call
        per row (measured ~2x slower for c = 64..512)."""
        if np.ndim(v) == 0:
            return v
        key = (name, id(v), rows, c)
        t = self._tiles.get(key)
        if t is None:
            if len(self._tiles) > 16:
                self._tiles.clear()
            t = self._tiles[key] = (v, np.ascontiguousarray(np.broadcast_to(v, (rows, c))))
        return t[1]

    def folded(self, bias):
        """``(K, thr)`` of the bias-folded float32 form ``V' = fl(fl(acc * r) + K)`` with
        ``K = fl32(b r + d + zp)`` per channel, or None where it does not apply.

        It skips the ``acc + bias`` pass and the ``sign(acc) d`` term, so it needs a constant
        ``d`` term: a fused ReLU (``lo >= zp``: every negative accumulator ends at ``lo``
        whatever the sign of ``d``, as in the unfolded form) or ``d = 0``. Error bound for
        every element whose exact ``V`` lies near ``[lo, hi]`` (``|X| <= big``), with
        ``B = max |b r|`` (so ``|acc r| <= big + B``): the rounded ``r32`` and the product
        ``(2 eps + 2^-53 + eps^2) (big + B)`` (a float64 ``acc`` is multiplied in float64,
        then rounded once more to float32), the constant ``eps (B + |zp| + 1)``, the final
        add ``eps (max(|lo|, |hi|) + 2)``; ``w`` takes 2 (big + B) + B + max(|lo|, |hi|) +
        |zp| + 4 with a 25% margin (the 2^-53 and eps^2 terms are far inside it). A large
        ``B`` (a bias that cancels a huge accumulator) falls back to the unfolded form.
        """
        if not self.float_ok32 or not (self.lo >= self.zp or not self.has_d):
            return None
        f = self._fold
        if f is not None and f[0] is bias:
            return f[1]
        if bias is None:
            k64 = self.d + self.zp
            bmax = 0.0
        else:
            br = np.asarray(bias, dtype=np.float64) * self.r
            k64 = br + self.d + self.zp
            bmax = float(np.abs(br).max(initial=0.0)) * (1.0 + 2.0 ** -40)
        res = None
        if bmax <= 2.0 ** 16:
            w = 1.25 * _EPS32 * (2.0 * (self.big + bmax) + bmax + max(abs(self.lo), abs(self.hi))
                                 + abs(self.zp) + 4.0)
            if w < 2.0 ** -8:
                thr = np.float32(0.5 - w)
                while float(thr) > 0.5 - w:  # round the threshold down, never up
                    thr = np.nextafter(thr, np.float32(0))
                k32 = np.asarray(k64, dtype=np.float32)
                res = (k32 if k32.ndim else np.float32(k32), thr)
        self._fold = (bias, res)
        return res

    def bias_small(self, bias: np.ndarray) -> bool:
        """Whether every bias value is exact in float32 (|b| <= 2^24)."""
        return self.bias32(bias) is not None and self._b32[2]

    def bias64(self, bias: np.ndarray) -> np.ndarray:
        if self._b64 is None or self._b64[0] is not bias:
            self._b64 = (bias, np.asarray(bias, dtype=np.float64))
        return self._b64[1]

    def bias32(self, bias: np.ndarray) -> np.ndarray:
        if self._b32 is None or self._b32[0] is not bias:
            self._b32 = (bias, np.asarray(bias, dtype=np.float32),
                         bool(np.abs(bias).max(initial=0) <= 2 ** 24))
        return self._b32[1]

    @classmethod
    def from_requant(cls, rq) -> "Params":
        """Params of a Requant, cached per Requant object (modules keep theirs for life)."""
        from . import common
        sig = (rq.multiplier, common.version(rq.multiplier), rq.rshift, common.version(rq.rshift),
               rq.zero_point, rq.qmin, rq.qmax, rq.dtype)
        hit = _PARAMS.get(id(rq))
        if hit is not None and hit[0]() is rq:
            h = hit[1]  # unrolled: a generator over the 8 fields costs ~4 us a call
            if (h[0] is sig[0] and h[1] == sig[1] and h[2] is sig[2] and h[3] == sig[3]
                    and h[4] == sig[4] and h[5] == sig[5] and h[6] == sig[6] and h[7] == sig[7]):
                return hit[2]
        p = cls(rq.multiplier.cpu().numpy(), rq.rshift.cpu().numpy(), rq.zero_point, rq.qmin,
                rq.qmax, common.np_dtype(rq.dtype.storage))
        if len(_PARAMS) > 4096:
            _PARAMS.clear()
        try:
            _PARAMS[id(rq)] = (weakref.ref(rq), sig, p)
        except TypeError:  # not weak-referenceable: no caching
            pass
        return p

    def along(self, axis: int, ndim: int) -> "Params":
        """The same params with per-channel arrays shaped to broadcast along ``axis``."""
        if self.m.ndim == 0:
            return self
        shape = [1] * ndim
        shape[axis] = -1
        p = object.__new__(Params)
        for name in Params.__slots__:
            v = getattr(self, name)
            setattr(p, name, v.reshape(shape) if isinstance(v, np.ndarray) and v.ndim == 1 else v)
        return p


def mbqm_int64(acc: np.ndarray, m, rshift) -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier on int64 arrays holding int32 values (exact)."""
    m = np.asarray(m, dtype=np.int64)
    rshift = np.asarray(rshift, dtype=np.int64)
    left = np.maximum(-rshift, 0)
    e = np.maximum(rshift, 0)
    x = np.clip(np.left_shift(acc.astype(np.int64, copy=False), left), INT32_MIN, INT32_MAX)
    # SRDHM: (x*M + nudge) / 2^31 truncating == floor((x*M + 2^30) / 2^31) since M >= 0
    x = x * m
    x += 1 << 30
    x >>= 31
    # RDBPOT: round half away from zero
    mask = (np.int64(1) << e) - 1
    thr = (mask >> 1) + (x < 0)
    rem = x & mask
    x >>= e
    x += rem > thr
    return x


def requant_int64(acc: np.ndarray, p: Params, out: np.ndarray = None) -> np.ndarray:
    """Exact requantization of int32-valued ``acc`` (any integer dtype) with ``p``."""
    y = np.asarray(mbqm_int64(acc, p.m, p.rshift))  # (0-d arithmetic gives a scalar)
    np.clip(y, p.lo - p.zp, p.hi - p.zp, out=y)
    if out is None:
        out = np.empty_like(y, dtype=p.np_dtype)  # keeps y's memory order
    np.add(y, p.zp, out=out, casting="unsafe")
    return out


_EPS32 = 2.0 ** -24
_CHUNK = 1 << 16
_TILE_MAX_C = 512  # wider rows: broadcasting is nearly as fast and touches no extra memory


def _mbqm_int(a: int, m: int, rshift: int) -> int:
    """One accumulator through MultiplyByQuantizedMultiplier, in Python ints (exact)."""
    left, e = max(-rshift, 0), max(rshift, 0)
    x = min(max(a << left, INT32_MIN), INT32_MAX)
    x = (x * m + (1 << 30)) >> 31           # SRDHM for M >= 0 (see the module docstring)
    mask = (1 << e) - 1
    return (x >> e) + ((x & mask) > (mask >> 1) + (x < 0))


def _fixup(acc, bias, p: Params, out: np.ndarray, flat: np.ndarray) -> None:
    """Exact requantization of the elements at flat indices ``flat`` of the 2-D (channels
    last) ``acc`` / ``out``: Python ints for a few dozen (gathered with one fancy index per
    array, ~1 us an element), one int64 NumPy pass for more."""
    ix = np.divmod(flat, acc.shape[1])
    ch = ix[-1]
    if len(flat) <= 64:
        accs = acc[ix].tolist()
        bs = [0] * len(flat) if bias is None else (
            np.broadcast_to(bias, ch.shape) if np.ndim(bias) == 0 else bias[ch]).tolist()
        ms = (p.m[ch] if p.m.ndim else np.broadcast_to(p.m, ch.shape)).tolist()
        shs = (p.rshift[ch] if p.rshift.ndim else np.broadcast_to(p.rshift, ch.shape)).tolist()
        zp, lo, hi = p.zp, p.lo, p.hi
        res = []
        for a, b, m, sh in zip(accs, bs, ms, shs):
            v = min(max(int(round(a)) + int(b), INT32_MIN), INT32_MAX)
            res.append(min(max(_mbqm_int(v, int(m), int(sh)) + zp, lo), hi))
        out[ix] = res
        return
    a = np.rint(np.asarray(acc[ix], dtype=np.float64)).astype(np.int64)
    if bias is not None:
        a += bias[ch] if bias.ndim else bias
    a = np.clip(a, INT32_MIN, INT32_MAX)
    m = p.m[ch] if p.m.ndim else p.m
    sh = p.rshift[ch] if p.rshift.ndim else p.rshift
    y = mbqm_int64(a, m, sh)
    out[ix] = np.clip(y, p.lo - p.zp, p.hi - p.zp) + p.zp


def requant_fast(acc: np.ndarray, p: Params, out: np.ndarray, bias=None) -> None:
    """Requantize ``acc + bias`` into ``out`` (int8/uint8 array of ``acc``'s shape).

    Args:
        acc: float32 / float64 array of exact integers, channels on the last axis (float32
            values must be exact, i.e. below 2^24, as a single-block float32 GEMM gives).
        p: the requantization, per channel along the last axis or per tensor.
        out: destination.
        bias: None or an int64 array (channels) / scalar.
    """
    if acc.size == 0:
        return
    if not p.float_ok32:
        a = np.asarray(acc, dtype=np.float64)
        if bias is not None:
            a = a + bias
        np.clip(a, INT32_MIN, INT32_MAX, out=a)
        requant_int64(a.astype(np.int64), p, out=out)
        return
    if not out.flags.c_contiguous:
        tmp = np.empty(out.shape, out.dtype)
        requant_fast(acc, p, tmp, bias)
        out[...] = tmp
        return
    c = acc.shape[-1] if acc.ndim else 1
    acc2, out2 = acc.reshape(-1, c), out.reshape(-1, c)
    fold = p.folded(bias)
    if fold is not None:
        _requant_folded(acc2, p, out2, bias, fold)
        return
    # u = fl32(acc + bias) with ONE rounding: a float32 add when both are exact in float32,
    # else the sum in float64 (exact) rounded once to float32
    bvec = None
    if bias is not None:
        bvec = p.bias32(bias) if (acc.dtype == np.float32 and p.bias_small(bias)) \
            else p.bias64(bias)
    rows = acc2.shape[0]
    # L2-sized chunks: 4 float32 scratch arrays of 64 K elements stay in cache
    step = max(1, _CHUNK // c)
    n0 = min(step, rows)
    u_buf = np.empty((n0, c), np.float32)
    y_buf = np.empty((n0, c), np.float32)
    # With a fused ReLU (lo >= zp) every acc < 0 ends at lo whatever the sign of d, so
    # "+ sign(acc) d + zp" becomes one per-channel constant: 2 passes fewer (10 instead of 12)
    relu_like = p.lo >= p.zp
    t_buf = np.empty((n0, c), np.float32) if p.has_d and not relu_like else None
    bad_buf = np.empty((n0, c), bool)
    zp, lo, hi, thr = np.float32(p.zp), np.float32(p.lo), np.float32(p.hi), p.thr
    flagged = []
    r_t = p.tiled("r", p.r32, n0, c)
    d_t = p.tiled("d", p.d32, n0, c)
    c_t = p.tiled("c", p.dz32, n0, c) if relu_like else zp
    b_t = None if bvec is None else p.tiled("b", bvec, n0, c)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        k = r1 - r0
        u, y, bad = u_buf[:k], y_buf[:k], bad_buf[:k]
        a = acc2[r0:r1]
        if b_t is not None:
            np.add(a, b_t[:k] if np.ndim(b_t) == 2 else b_t, out=u, casting="same_kind")
        else:
            np.copyto(u, a, casting="same_kind")
        rk = r_t[:k] if np.ndim(r_t) == 2 else r_t
        if t_buf is not None:
            t = t_buf[:k]
            np.copysign(d_t[:k] if np.ndim(d_t) == 2 else d_t, u, out=t)
            u *= rk
            u += t
        else:
            u *= rk
        u += c_t[:k] if np.ndim(c_t) == 2 else c_t
        np.clip(u, lo, hi, out=u)
        np.rint(u, out=y)
        np.copyto(out2[r0:r1], y, casting="unsafe")
        u -= y
        np.abs(u, out=u)
        np.greater_equal(u, thr, out=bad)
        if bad.any():
            flagged.append(np.flatnonzero(bad) + r0 * c)
    if flagged:  # one exact pass over every flagged element of every chunk
        _fixup(acc2, bias, p, out2, np.concatenate(flagged))


_max = np.maximum.reduce
_clip = np._core.umath.clip if hasattr(np, "_core") else np.core.umath.clip
_min = np.minimum.reduce


FEW_ROWS = 4


def _folded_chunk(a, r, k, lo, hi, thr, out, u=None, y=None):
    """One chunk of the folded form: ``u = a * r + k``, clamp to ``[lo, hi]``, ``y = rint(u)``
    stored into ``out``; returns the flat indices whose ``|u - y| >= thr`` (they need the
    exact fix-up) or None. ``u`` / ``y``: scratch arrays of ``a``'s shape, or None to
    allocate (a float64 ``a`` is then computed in float64: only more precise than the
    bound)."""
    u = np.multiply(a, r, out=u, casting="same_kind")
    u += k
    _clip(u, lo, hi, out=u)  # the ufunc: np.clip's wrapper costs ~5 us a call
    y = np.rint(u, out=y)
    np.copyto(out, y, casting="unsafe")
    u -= y
    if _max(u, axis=None) >= thr or _min(u, axis=None) <= -thr:
        np.abs(u, out=u)
        return np.flatnonzero(u >= thr)
    return None


def requant_few(acc2, p: Params, out2, bias, fold) -> None:
    """:func:`_requant_folded` for a GEMV's few output rows (``fold`` = ``p.folded(bias)``,
    not None): one :func:`_folded_chunk` without scratch arrays, tiles or a chunk loop
    (9.8 -> 6.3 us for 768 outputs, where the call overhead is the cost)."""
    if acc2.size == 0:  # an empty batch: nothing to write (and no reduction of nothing)
        return
    k32, thr = fold
    bad = _folded_chunk(acc2, p.r32, k32, np.float32(p.lo), np.float32(p.hi), thr, out2)
    if bad is not None:
        _fixup(acc2, bias, p, out2, bad)


def _requant_folded(acc2, p: Params, out2, bias, fold) -> None:
    """:func:`requant_fast` for a bias-folded ``p`` (see :meth:`Params.folded`): per chunk
    ``u = acc * r + K``, clamp, ``y = rint(u)``, store, ``t = u - y`` and two read-only
    reductions decide whether any ``|t| >= thr`` needs the exact fix-up: 7 passes where the
    unfolded form takes 10 (no bias add, no abs / compare / any unless something is flagged)."""
    k32, thr = fold
    rows, c = acc2.shape
    step = max(1, _CHUNK // c)
    if rows <= FEW_ROWS and rows < step:
        requant_few(acc2, p, out2, bias, fold)
        return
    n0 = min(step, rows)
    u_buf = np.empty((n0, c), np.float32)
    y_buf = np.empty((n0, c), np.float32)
    lo, hi = np.float32(p.lo), np.float32(p.hi)
    if n0 >= 8 and c < _TILE_MAX_C:  # same-shape operands: one flat loop (Params.tiled)
        r_t, k_t = p.tiled("r", p.r32, n0, c), p.tiled("k", k32, n0, c)
    else:        # a few rows: broadcasting the (c,) vectors costs nothing, tiles would
        r_t, k_t = p.r32, k32
    r_2d = isinstance(r_t, np.ndarray) and r_t.ndim == 2
    k_2d = isinstance(k_t, np.ndarray) and k_t.ndim == 2
    flagged = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        kk = r1 - r0
        bad = _folded_chunk(acc2[r0:r1], r_t[:kk] if r_2d else r_t, k_t[:kk] if k_2d else k_t,
                            lo, hi, thr, out2[r0:r1], u_buf[:kk], y_buf[:kk])
        if bad is not None:
            flagged.append(bad + r0 * c)
    if flagged:  # one exact pass over every flagged element of every chunk
        _fixup(acc2, bias, p, out2, np.concatenate(flagged))
