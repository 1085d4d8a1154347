"""Exact int8 matrix products on float32 BLAS, and the linear op.

NumPy has no fast integer matmul (an int32 ``@`` runs hundreds of times slower than sgemm),
so the integer product runs as float32 sgemm on ``x - zp`` (|.| <= 255) and int8 weights
(|w| <= 128). Every partial sum BLAS can form, in any order and with FMA, is an integer of
magnitude at most ``sum_k |x_k - zp| |w_k|``; while that stays <= 2^24 each one is exactly
representable and the float32 result is the exact integer. The reduction is cut into the
fewest equal K blocks for which ``max|x - zp| * max_n sum_{k in block} |w_kn| <= 2^24``
(data dependent: one block for typical layers; never more than ceil(K / 512)), and blocks
are summed in float64 (exact below 2^53).

Measured (AMD EPYC, 2 cores, OpenBLAS): (512, 4096) @ (4096, 1024): one sgemm 31.7 ms,
eight 512-blocks summed in float64 28.9 ms, dgemm 49.0 ms: float32 blocks win.
"""
from __future__ import annotations

import math
import mmap

import numpy as np

from .fixed_point import FEW_ROWS, Params, requant_few, requant_fast

F32_EXACT = float(2 ** 24)


def _huge_page_size() -> int:
    """The transparent huge page size (Linux reports it; 2 MiB on x86-64 and on ARM64 with
    4 KiB pages, 512 MiB with 64 KiB pages, where no weight is that large)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


_HUGE_PAGE = _huge_page_size()


def huge_page_array(a: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous copy of ``a`` as ``dtype`` whose whole huge-page extents (2 MiB on
    x86-64) lie on transparent huge pages where the OS offers them (Linux ``madvise``;
    elsewhere, or for data smaller than one huge page, a plain copy).

    A GEMV / small-M GEMM streams its float32 weight once per call from L3 or DRAM; on 4 KiB
    pages every 4 KiB of weight costs a TLB miss and a page walk. Measured (AMD EPYC, one
    core, 8 rotating 768 x 768 weights, a front-end call between GEMVs): 61 -> 36 us a
    GEMV. The mapping is one huge page longer than the data (virtual only: untouched pages
    cost no memory) so that it contains aligned extents; only the extents the data fills
    completely are advised, the rest is advised against huge pages (under THP "always" the
    tail would otherwise take a whole huge page), so no memory is wasted.
    """
    dtype = np.dtype(dtype)
    nbytes = a.size * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_PAGE or advice is None:
        return np.ascontiguousarray(a, dtype=dtype)
    try:
        # private anonymous memory (Python's default anonymous map is shared memory, which
        # THP leaves on small pages)
        mm = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        off = (-np.frombuffer(mm, np.uint8, count=1).ctypes.data) % _HUGE_PAGE
        full = nbytes // _HUGE_PAGE * _HUGE_PAGE
        mm.madvise(advice, off, full)
        no_huge = getattr(mmap, "MADV_NOHUGEPAGE", None)
        if no_huge is not None:  # THP "always": the tail must not take a whole huge page
            mm.madvise(no_huge, off + full, len(mm) - off - full)
    except (OSError, ValueError):  # no anonymous maps or no THP: plain memory
        return np.ascontiguousarray(a, dtype=dtype)
    out = np.frombuffer(mm, np.uint8, count=nbytes, offset=off).view(dtype).reshape(a.shape)
    np.copyto(out, a, casting="unsafe")
    return out


class PackedWeight:
    """An int8 weight as float32 ``(G, K, N)`` GEMM operand plus what block sizing needs.
    The float32 copies live on huge pages (:func:`huge_page_array`)."""

    def __init__(self, w_gkn: np.ndarray):
        self.w = huge_page_array(w_gkn, np.float32)
        absw = np.abs(w_gkn.astype(np.int16)).astype(np.uint8)  # |w| <= 128
        self._absw = absw
        self.k = w_gkn.shape[1]
        self.colsum_max = int(absw.sum(axis=1, dtype=np.int64).max()) if absw.size else 0
        # largest column 2-norm (exact sum of squares in int64, sqrt rounded up a little)
        sq = (w_gkn.astype(np.int64) ** 2).sum(axis=1).max() if absw.size else 0
        self.wnorm_max = math.sqrt(float(sq)) * (1.0 + 2.0 ** -40)
        self._blocks = {}
        self._wt = None

    def wt(self) -> np.ndarray:
        """The ``(N, K)`` float32 transpose of a one-group weight, built on first use."""
        if self._wt is None:
            self._wt = huge_page_array(self.w[0].T, np.float32)
        return self._wt

    def blocks(self, xmax: int):
        """K ranges whose partial sums are exact in float32 for ``|x - zp| <= xmax``."""
        got = self._blocks.get(xmax)
        if got is not None:
            return got
        k = self.k
        if xmax * self.colsum_max <= F32_EXACT or k <= 1:
            ranges = [(0, k)]
        else:
            nb = max(2, -(-xmax * self.colsum_max // int(F32_EXACT)))
            while True:
                kb = -(-k // nb)
                starts = np.arange(0, k, kb)
                worst = int(np.add.reduceat(self._absw, starts, axis=1, dtype=np.int64).max())
                if xmax * worst <= F32_EXACT:
                    break
                nb += 1
            ranges = [(int(s), int(min(s + kb, k))) for s in starts]
        self._blocks[xmax] = ranges
        return ranges


def _cauchy_schwarz_fits(a: np.ndarray, pw: "PackedWeight") -> bool:
    """Whether one float32 block is exact for this data: every partial sum of a dot product
    is at most ``sum_k |a_k w_k| <= ||a|| ||w||`` (Cauchy-Schwarz), far below the
    ``max|a| * sum_k |w_k|`` bound for real data (ReLU activations, He-initialised weights:
    one block instead of three at K = 4096). ``||a||^2`` is summed in float32 (non-negative
    terms: relative error below K 2^-24, covered by the margin)."""
    if pw.wnorm_max == 0.0 or a.size == 0:
        return True
    sq = float(np.einsum("...k,...k->...", a, a).max())
    k = a.shape[-1]
    return math.sqrt(sq * (1.0 + k * 2.0 ** -22)) * pw.wnorm_max * (1.0 + 2.0 ** -40) <= F32_EXACT


def norm_fits(sq_bound: float, pw: "PackedWeight") -> bool:
    """Whether rows with ``||a||^2 <= sq_bound`` (an upper bound, margin included) keep every
    partial sum exact in one float32 block (Cauchy-Schwarz, as :func:`_cauchy_schwarz_fits`)."""
    return math.sqrt(sq_bound) * pw.wnorm_max * (1.0 + 2.0 ** -40) <= F32_EXACT


def exact_matmul(a: np.ndarray, pw: PackedWeight, xmax: int, sq_bound=None,
                 narrow: bool = False) -> np.ndarray:
    """``a @ pw.w`` exactly: ``a`` float32 ``(G, P, K)`` (or ``(P, K)`` when G = 1) holding
    integers with ``|a| <= xmax``; ``sq_bound``: None or an upper bound of every row's
    ``||a||^2`` known to the caller (a convolution bounds it from its input's pixels, ~9x
    cheaper than the per-row sums of the im2col tile); ``narrow``: ``a`` is 2-D with few
    rows, run the product as ``(w^T a^T)^T`` (see :func:`linear_rows`); the result is then
    the transposed view of an ``(N, P)`` array. Returns float32 (one block) or float64
    exact integers (any summation order is exact under the block rule)."""
    w = pw.w if a.ndim == 3 else pw.w[0]
    ranges = pw.blocks(xmax)
    if len(ranges) > 1 and sq_bound is not None and norm_fits(sq_bound, pw):
        ranges = [(0, pw.k)]
    if len(ranges) > 1 and _cauchy_schwarz_fits(a, pw):
        ranges = [(0, pw.k)]
    if narrow and a.ndim == 2:
        wt, at = pw.wt(), a.T
        if len(ranges) == 1:
            return np.matmul(wt, at).T
        k0, k1 = ranges[0]
        acc = np.matmul(wt[:, k0:k1], at[k0:k1]).astype(np.float64)
        part = None
        for k0, k1 in ranges[1:]:
            part = np.matmul(wt[:, k0:k1], at[k0:k1], out=part)
            acc += part
        return acc.T
    if len(ranges) == 1:
        return np.matmul(a, w)
    k0, k1 = ranges[0]
    acc = np.matmul(a[..., k0:k1], w[..., k0:k1, :]).astype(np.float64)
    part = None
    for k0, k1 in ranges[1:]:
        part = np.matmul(a[..., k0:k1], w[..., k0:k1, :], out=part)
        acc += part
    return acc


def to_f32(x: np.ndarray, zp: int, out: np.ndarray = None) -> np.ndarray:
    """``x - zp`` as float32 (exact). Zero point 0 is a plain conversion: 0.21 vs 0.41 ms
    for 2 M uint8 values on one EPYC core."""
    if zp == 0:
        if out is None:
            return x.astype(np.float32)
        np.copyto(out, x, casting="unsafe")
        return out
    return np.subtract(x, np.float32(zp), out=out, dtype=np.float32)


def xmax_of(x: np.ndarray, zp: int) -> int:
    """max |x - zp| over the data (an empty input gives 0)."""
    if x.size == 0:
        return 0
    if x.dtype == np.uint8 and zp == 0:  # one reduction instead of two
        return int(x.max())
    return max(abs(int(x.min()) - zp), abs(int(x.max()) - zp))


_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def range_xmax(dtype, zp: int) -> int:
    """max ``|x - zp|`` over the whole range of an int8 / uint8 ``dtype``."""
    lo, hi = _RANGE[np.dtype(dtype)]
    return max(zp - lo, hi - zp)


def block_xmax(x: np.ndarray, zp: int, pw: PackedWeight) -> int:
    """A bound of ``|x - zp|`` for :func:`exact_matmul`: the whole range of ``x``'s dtype
    when that already needs only one exact block (typical layers: no pass over the data,
    ~1.4 us of a 30 us GEMV at m = 1), else the data's own :func:`xmax_of`."""
    full = range_xmax(x.dtype, zp)
    if len(pw.blocks(full)) == 1:
        return full
    return xmax_of(x, zp)


def pack_linear(wn: np.ndarray) -> PackedWeight:
    """The GEMM operand of an int8 ``(N, K)`` linear weight array."""
    return PackedWeight(np.ascontiguousarray(wn).T[None])  # (1, K, N)


def _pack_linear(w) -> PackedWeight:
    """:func:`pack_linear` of a CPU torch int8 weight (duck-typed: no torch import here)."""
    return pack_linear(w.detach().contiguous().numpy())


# rows of a linear processed together: keeps the float64 requant temporaries in L2
_LINEAR_ROWS = 256
_NARROW_MIN = 2  # m = 1 is a GEMV either way: no second (N, K) copy of the weight for it
_NARROW_MAX = 128


class LinearPlan:
    """What a linear layer's calls share: the packed weight, the requantization, the int64
    bias and the bias-folded requantization constants (None where they do not apply)."""

    __slots__ = ("pw", "p", "b", "fold", "n", "_gemv")

    def __init__(self, pw: PackedWeight, p: Params, b=None):
        self.pw, self.p, self.b = pw, p, b
        self.fold = p.folded(b)
        self.n = pw.w.shape[-1]
        self._gemv = {}

    def gemv_ok(self, dtype, zp: int) -> bool:
        """Whether inputs of ``dtype`` with zero point ``zp`` take the GEMV form: one exact
        float32 block over the dtype's whole range and the folded requantization."""
        got = self._gemv.get((dtype, zp))
        if got is None:
            got = self._gemv[(dtype, zp)] = (
                self.fold is not None and len(self.pw.blocks(range_xmax(dtype, zp))) == 1)
        return got


def run_linear(xa: np.ndarray, zp: int, plan: LinearPlan) -> np.ndarray:
    """:func:`linear_rows` with a :class:`LinearPlan`. Up to ``FEW_ROWS`` rows (a GEMV)
    that :meth:`LinearPlan.gemv_ok` admits run as one float32 product and
    :func:`~.fixed_point.requant_few`: ~10 NumPy calls in all, where the GEMV itself takes
    only ~30-80 us and every call of Python around it counts (m = 1: the general path's
    bookkeeping cost as much as a third of the GEMV)."""
    if xa.shape[0] <= FEW_ROWS and plan.gemv_ok(xa.dtype, zp):
        acc = np.matmul(to_f32(xa, zp), plan.pw.w[0])
        out = np.empty(acc.shape, plan.p.np_dtype)
        requant_few(acc, plan.p, out, plan.b, plan.fold)
        return out
    return linear_rows(xa, zp, plan.pw, plan.p, plan.b)


def linear_rows(xa: np.ndarray, zp: int, pw: PackedWeight, p: Params, b=None) -> np.ndarray:
    """Integer linear on NumPy arrays: ``xa`` int8 / uint8 ``(rows, K)``, ``pw`` the packed
    ``(N, K)`` weight, ``p`` the requantization, ``b`` None or int64 ``(N,)``.
    Returns ``(rows, N)`` of ``p.np_dtype``."""
    n = pw.w.shape[-1]
    xmax = block_xmax(xa, zp, pw)
    rows = xa.shape[0]
    out = np.empty((rows, n), dtype=p.np_dtype)
    step = max(_LINEAR_ROWS, 1)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        a = to_f32(xa[r0:r1], zp)
        # A few rows: OpenBLAS runs W^T (N, K) @ a^T (K, P) (the weight as the wide left
        # operand, a^T passed by its transpose flag, no copy) faster than a @ W: one core,
        # (64, 1024) x 1024: 1.42 vs 1.62 ms; (8, 1024) x 1024: 0.36 vs 0.55 ms; (128, 1024)
        # x 1024: 2.84 vs 3.04 ms; within 5% either way elsewhere, but (256, 4096) chunks of
        # an m = 512 linear lost 10% with the transposing copy: up to 128 rows only.
        narrow = _NARROW_MIN <= r1 - r0 <= _NARROW_MAX
        acc = exact_matmul(a, pw, xmax, narrow=narrow)
        if narrow:  # one transposing copy (~40 us for 64 x 1024) beats strided requant reads
            acc = np.ascontiguousarray(acc)
        requant_fast(acc, p, out[r0:r1], b)
    return out
