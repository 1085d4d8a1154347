"""The int8 GEMM of :mod:`.gemm` for sm_90 (H100 / H200) with its ``wgmma`` asynchronous,
written in Gluon (``triton.experimental.gluon``, Triton 3.6 and 3.9).

Why a second main loop. Triton's ``tl.dot`` never makes a dot with an int32 accumulator
asynchronous (its MMAv3 pipeliner, ``WGMMAPipeline.cpp``, "rule 2.1"), so :mod:`.gemm`'s
kernel ends every K step with ``wgmma.wait_group 0``: the tensor cores drain once a step,
hidden only when a second CTA shares the multiprocessor. Here the loop is written out:
TMA copies (``cp.async.bulk.tensor``) into a ring of ``STAGES`` shared-memory buffers with
one mbarrier each, ``warpgroup_mma(..., is_async=True)`` and
``warpgroup_mma_wait(num_outstanding=1)``: one MMA group runs while the next tile's copy is
issued into the stage the previous group has finished reading.

What is shared. The epilogues are :mod:`.gemm`'s own ``@triton.jit`` functions
(:func:`.gemm.quant_epilogue`: bias, fixed-point requantization, ReLU clamp, residual add,
int8 / float / int32 out; :func:`.gemm.scaled_epilogue`: the W8A8 row x column scales and
float bias), called on the accumulator in its MMA layout, with the epilogue tensors
:func:`.gemm.qgemm` / :func:`.dynamic.linear_dynamic` built: the same arithmetic, so the
same bytes (the GPU tests check every tile against the NumPy oracle, byte for byte).

When it runs. Only where it applies: an sm_90 device, int8 activations (uint8 ones take
the Triton kernel's xor), K-contiguous rows 16-byte aligned (TMA; :func:`.gemm.align_k` pads
K to a multiple of 16 before), at least :data:`MIN_M` rows (smaller problems are the
decode-sized GEMMs the Triton kernel's small tiles serve), any epilogue (those whose
whole-tile form spills run on each half of the columns in turn, :func:`epi_split`), and
only while it is switched on: ``GPUQUANT_SM90_GEMM=gluon`` (read at each call) or
:func:`use`; off by default until the benchmarks (``gpuquant-triton-gluon`` rows) show it
faster on the GPU. Gluon kernels do not run under ``TRITON_INTERPRET``: CI compiles every
config for sm_90 and checks the PTX and registers
(``tests/backends/test_triton_gemm_sm90.py``); the GPU tests run it.

Tile choice: per problem (shape and epilogue), every config (``GPUQUANT_TRITON_TUNE=quick``:
the first three) is timed once on the problem's own tensors with CUDA events and the
fastest kept (:data:`_TUNED`, read by the bench's autotune log); during a CUDA graph capture
the first config is used untimed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading

import torch
import triton

from .common import LAUNCH_OPTS, cdiv, tune_mode
from .launch import launch

try:  # Gluon's Hopper dialect (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma,
                                                                  warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
except Exception:  # noqa: BLE001 - absent, or an API this code does not know (Triton 3.6
    AVAILABLE = False  # and 3.9 have it): then the Triton kernel runs everywhere

__all__ = ["AVAILABLE", "CONFIGS", "MIN_M", "enabled", "use", "unavailable", "applies",
           "qgemm_sm90"]

ENV = "GPUQUANT_SM90_GEMM"
MIN_M = 128
GROUP_M = 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES), in the order quick tuning tries them: the
# Triton kernel's usual sm_90 pick (two CTAs a multiprocessor at 96 KiB), then one-CTA
# tiles on two warpgroups, then a 64-column tile for narrow layers
CONFIGS = [
    (128, 128, 128, 4, 3),
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 4, 4),
    (128, 256, 64, 8, 5),
    (128, 64, 128, 4, 4),
]
# wgmma's N for 8-bit integer operands that Gluon's lowering takes, largest first
_INT8_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)

_local = threading.local()


def enabled() -> bool:
    """Whether eligible GEMMs take this path: :func:`use` if set in this thread, else
    ``GPUQUANT_SM90_GEMM`` ("gluon" on; "triton", empty or unset off; anything else is an
    error)."""
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    v = os.environ.get(ENV, "").strip().lower()
    if v not in ("", "triton", "gluon"):
        raise ValueError(f"{ENV} must be 'gluon' or 'triton', got {v!r}")
    return v == "gluon" and AVAILABLE


@contextlib.contextmanager
def use(on: bool = True, config=None):
    """Within the block (this thread), route eligible sm_90 GEMMs here (``on``) or not,
    whatever the environment says (the bench's ``gpuquant-triton-gluon`` providers); with
    ``config`` (one of :data:`CONFIGS`) every such GEMM runs that tile, untuned (the GPU
    tests' forced configs)."""
    if not isinstance(on, bool):
        raise TypeError(f"use() takes a bool, got {type(on).__name__}")
    if on and not AVAILABLE:
        raise ValueError("this Triton has no Gluon Hopper dialect (needs Triton >= 3.5)")
    if config is not None and tuple(config) not in CONFIGS:
        raise ValueError(f"config must be one of gemm_sm90.CONFIGS {CONFIGS}, got {config!r}")
    prev = getattr(_local, "forced", None), getattr(_local, "config", None)
    _local.forced, _local.config = on, None if config is None else tuple(config)
    try:
        yield
    finally:
        _local.forced, _local.config = prev


def unavailable(device) -> "str | None":
    """Why this path cannot run on ``device`` (a torch.device or tensor's device), or None:
    the bench's ``gpuquant-triton-gluon`` providers' reason for an unavailable row."""
    if not AVAILABLE:
        return "this Triton has no Gluon Hopper dialect (needs Triton >= 3.5)"
    from . import gemm  # (its arch_family: the stand-in driver's family on CPU tensors too)
    device = torch.device(device)
    if gemm.arch_family(device) != "sm90":
        return f"the Gluon int8 main loop is for sm_90 (H100 / H200), not {device}"
    return None


def applies(family: str, x2d: torch.Tensor, w2d: torch.Tensor) -> bool:
    """Whether this GEMM (after :func:`.gemm.align_k`) runs here: any epilogue."""
    if family != "sm90" or not enabled():
        return False
    return (x2d.dtype == torch.int8 and w2d.dtype == torch.int8 and x2d.shape[0] >= MIN_M
            and x2d.shape[1] % 16 == 0 and x2d.stride(1) == 1 and w2d.stride(1) == 1
            and x2d.stride(0) % 16 == 0 and w2d.stride(0) % 16 == 0
            and x2d.data_ptr() % 16 == 0 and w2d.data_ptr() % 16 == 0)


if AVAILABLE:
    from .gemm import grouped_tile, quant_epilogue, scaled_epilogue

    # the TMA copy into shared memory: async_copy_global_to_shared in Triton 3.6, async_load
    # in 3.9 (where the old name raises)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.constexpr_function
    def _warps_per_cta(block_m, num_warps):
        # the [4, 1] warpgroup atom, doubled along M while a warp still gets its own 16 rows
        w = [4, 1]
        while w[0] * w[1] != num_warps:
            if block_m > 16 * w[0]:
                w[0] *= 2
            else:
                w[1] *= 2
        return w

    @gluon.constexpr_function
    def _instr_n(block_m, block_n, num_warps):
        n_reps = triton.cdiv(num_warps, triton.cdiv(block_m, 16))
        max_n = max(block_n // n_reps, 8)
        for n in _INT8_N:
            if n <= max_n and block_n % n == 0:
                return n
        raise ValueError(f"no int8 wgmma N fits BLOCK_N={block_n}")

    @gluon.jit
    def _qgemm_sm90_kernel(a_desc, b_desc, BIAS, MULT, RSHIFT, EPI, RES, Y, M, N, K,
                           stride_ym, stride_rm, deq_scale,
                           OUT_MODE: gl.constexpr, HAS_RES: gl.constexpr,
                           RES_MODE: gl.constexpr, RQ_MODE: gl.constexpr,
                           STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr,
                           EPI_SPLIT: gl.constexpr):
        """A (M, K) and B (N, K) int8 through TMA descriptors; the other arguments as
        :func:`.gemm._qgemm_kernel`'s (OUT_MODE 3: MULT, RSHIFT, RES hold the column scales,
        the row scales and the float bias)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]

        pid_m, pid_n = grouped_tile(gl.program_id(0), M, N, BM, BN, GROUP)  # (.gemm's order)
        off_m = pid_m * BM
        off_n = pid_n * BN

        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BM, num_warps),
            instr_shape=[16, _instr_n(BM, BN, num_warps), 32])
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        k_tiles = gl.cdiv(K, BK)  # a K tail reads TMA's zero fill: adds nothing

        for i in gl.static_range(STAGES - 1):  # prologue: STAGES - 1 tiles in flight
            pred = i < k_tiles
            mbarrier.expect(ready.index(i), nbytes, pred=pred)
            _tma_load(a_desc, [off_m, i * BK], ready.index(i), a_ring.index(i), pred=pred)
            _tma_load(b_desc, [off_n, i * BK], ready.index(i), b_ring.index(i), pred=pred)

        acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma)
        for kt in range(k_tiles):
            s = kt % STAGES
            mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
            acc = warpgroup_mma(a_ring.index(s), b_ring.index(s).permute((1, 0)), acc,
                                is_async=True)
            # one group in flight: after this wait the previous step's group has read its
            # stage, (kt - 1) % STAGES, which the copy of tile kt + STAGES - 1 now refills
            acc, _a, _b = warpgroup_mma_wait(num_outstanding=1,
                                             deps=(acc, a_ring.index(s), b_ring.index(s)))
            nxt = kt + STAGES - 1
            ns = nxt % STAGES
            pred = nxt < k_tiles
            mbarrier.expect(ready.index(ns), nbytes, pred=pred)
            _tma_load(a_desc, [off_m, nxt * BK], ready.index(ns), a_ring.index(ns), pred=pred)
            _tma_load(b_desc, [off_n, nxt * BK], ready.index(ns), b_ring.index(ns), pred=pred)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        mma_epilogue(acc, off_m, off_n, M, N, BIAS, MULT, RSHIFT, EPI, deq_scale, Y,
                     stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, RES_MODE, RQ_MODE,
                     EPI_SPLIT)

    @gluon.jit
    def mma_epilogue(acc, off_m, off_n, M, N, BIAS, MULT, RSHIFT, EPI, deq_scale, Y,
                     stride_ym, RES, stride_rm, OUT_MODE: gl.constexpr, HAS_RES: gl.constexpr,
                     RES_MODE: gl.constexpr, RQ_MODE: gl.constexpr, EPI_SPLIT: gl.constexpr):
        """The (BM, BN) accumulator tile at (off_m, off_n), in its MMA layout, through
        :mod:`.gemm`'s epilogue (the GEMM's and :mod:`.conv_sm90`'s kernels): the scaled
        float form (OUT_MODE 3), or the requantizing one, on each half of the columns in
        turn where ``EPI_SPLIT`` is 2 (.gemm's split; here the column indices are made in
        the halves' own layout)."""
        BM: gl.constexpr = acc.shape[0]
        BN: gl.constexpr = acc.shape[1]
        mma: gl.constexpr = acc.type.layout
        if OUT_MODE == 3:
            offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            scaled_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, MULT, RSHIFT, RES, Y,
                            stride_ym, HAS_RES)
        elif EPI_SPLIT == 2:
            a0, a1 = gl.split(gl.permute(gl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            half: gl.constexpr = a0.type.layout
            hm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, half))
            hn = off_n + gl.arange(0, BN // 2, layout=gl.SliceLayout(0, half))
            quant_epilogue(a0, hm, hn, hm < M, hn < N, BIAS, MULT, RSHIFT,
                           EPI, deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, 1,
                           RES_MODE, RQ_MODE)
            hn = hn + BN // 2
            quant_epilogue(a1, hm, hn, hm < M, hn < N, BIAS, MULT, RSHIFT,
                           EPI, deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, 1,
                           RES_MODE, RQ_MODE)
        else:
            offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            quant_epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, BIAS, MULT, RSHIFT,
                           EPI, deq_scale, Y, stride_ym, RES, stride_rm, OUT_MODE, HAS_RES, 1,
                           RES_MODE, RQ_MODE)


@functools.lru_cache(maxsize=None)
def shared_layouts(bm: int, bn: int, bk: int):
    """The NVMMA shared layouts (swizzled for wgmma) of the A and B tiles (once a tile)."""
    return (gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8),
            gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))


# The epilogue forms, (OUT_MODE, RQ_MODE, HAS_RES, RES_MODE, Y): the bare int32
# accumulator, W8A8's scaled float (HAS_RES: its bias), the requantizations (ReLU-folded,
# plain, folded, general with the left shift), a fused residual add, the dequantized float.
EPILOGUE_FORMS = {"int32": (2, 0, False, 0, "*i32"), "scaled_bf16": (3, 0, True, 0, "*bf16"),
                  "relu_folded": (0, 3, False, 0, "*i8"), "plain": (0, 1, False, 0, "*i8"),
                  "folded": (0, 2, False, 0, "*i8"), "general": (0, 0, False, 0, "*i8"),
                  "residual": (0, 2, True, 11, "*i8"), "float": (1, 1, False, 0, "*fp32")}


def epi_split(out_mode: int, rq_mode: int, has_res: bool) -> int:
    """``EPI_SPLIT``: 2 (the epilogue on each half of the tile's columns in turn) for the
    requantizations whose whole-tile epilogue spills: the folded form without a ReLU
    (RQ_MODE 2), the general one (0) and any fused residual add (ptxas sm_90, Triton 3.6:
    8-632 bytes a thread on these tiles whole, none split); 1 otherwise (fewer registers:
    202 against 226 for the ReLU-folded form on the 128x128 tile)."""
    return 2 if out_mode in (0, 1) and (has_res or rq_mode in (0, 2)) else 1


def signature(config, form: str = "int32"):
    """(signature, constexprs) of :func:`_qgemm_sm90_kernel` for ``config`` and one of
    :data:`EPILOGUE_FORMS`: what the launcher specializes for aligned tensors, for compiling
    without a GPU (:func:`.inspect_ptx.compile_gluon`)."""
    bm, bn, bk, warps, stages = config
    out_mode, rq_mode, has_res, res_mode, y = EPILOGUE_FORMS[form]
    la, lb = shared_layouts(bm, bn, bk)
    scaled = out_mode == 3
    folded = rq_mode >= 2
    sig = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{la!r}>",
           "b_desc": f"tensordesc<i8[{bn}, {bk}],{lb!r}>",
           "BIAS": "*fp32" if scaled else ("*i64" if folded else "*i32"),
           "MULT": "*fp32" if scaled else "*i32",
           "RSHIFT": "*fp32" if scaled else ("*i64" if folded else "*i32"),
           "EPI": "*fp32" if scaled else "*i64",
           "RES": "*fp32" if scaled else ("*i8" if has_res else y), "Y": y,
           "M": "i32", "N": "i32", "K": "i32", "stride_ym": "i32", "stride_rm": "i32",
           "deq_scale": "fp32"}
    const = {"OUT_MODE": out_mode, "HAS_RES": has_res, "RES_MODE": res_mode,
             "RQ_MODE": rq_mode, "STAGES": stages, "GROUP": GROUP_M, "num_warps": warps,
             "EPI_SPLIT": epi_split(out_mode, rq_mode, has_res)}
    return sig, const


class _Choices:
    """The tile chosen per problem: ``cache`` maps the key to the config, as Triton's
    autotuner does (the bench's autotune log reads it)."""

    def __init__(self):
        self.cache = {}


_TUNED = {"sm90": _Choices()}


def _descriptor(t, rows: int, k: int, block: list, layout):
    """Gluon's host ``TensorDescriptor`` of the row-major (rows, k) int8 ``t``, made without
    its ``__post_init__`` checks (~10 us of host a descriptor, two a GEMM): :func:`applies`
    checked what they do (16-byte aligned base and row stride, unit column stride, rows and
    k > 0) and the blocks are :data:`CONFIGS`' powers of two; fields with a default (the
    padding; Triton 3.9's tf32 rounding) keep it."""
    d = object.__new__(TensorDescriptor)
    for f in _DESCRIPTOR_DEFAULTS:
        setattr(d, f.name, f.default)
    d.base, d.shape, d.strides, d.block_shape, d.layout = t, [rows, k], [t.stride(0), 1], \
        block, layout
    return d


_DESCRIPTOR_DEFAULTS = [f for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING] if AVAILABLE else []
# set by the warm-up (:mod:`gpuquant.bench.warm`): on the stand-in driver an untuned problem
# compiles every config the GPU's tuning would time, not only the one it launches
STANDIN_COMPILES_ALL = False
STATS = {"launches": 0}  # this path's launches in this process (the GPU tests check it ran)


def _launch(cfg, x2d, w2d, rest, meta):
    STATS["launches"] += 1
    bm, bn, bk, warps, stages = cfg
    m, k = x2d.shape
    n = w2d.shape[0]
    la, lb = shared_layouts(bm, bn, bk)
    ad = _descriptor(x2d, m, k, [bm, bk], la)
    bd = _descriptor(w2d, n, k, [bn, bk], lb)
    grid = (cdiv(m, bm) * cdiv(n, bn),)  # (triton.cdiv is a slow constexpr_function here)
    launch(_qgemm_sm90_kernel, grid, ad, bd, *rest, STAGES=stages, GROUP=GROUP_M,
           num_warps=warps, **meta, **LAUNCH_OPTS)


def _time(run, reps: int = 5) -> float:
    """Milliseconds a call of ``run()`` (one launch), CUDA events over ``reps`` warm calls."""
    run()  # compiles; the timed runs below are warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def pick(table: dict, key, configs: list, run, on_device: bool, aliased: bool):
    """The config for problem ``key``: ``table``'s, or the fastest of ``configs`` (quick
    tuning: the first three) timed on the problem's own tensors (``run(config)`` launches
    it), kept in ``table``. Not timed, and not kept, the first config: off the device (the
    stand-in driver's CPU tensors; under the warm-up every candidate is launched there, so
    compiled, as the GPU's tuning will), inside a CUDA graph capture, or where the output
    overwrites what the kernel reads (``aliased``: each timed run would read the previous
    one's output)."""
    cfg = table.get(key)
    if cfg is not None:
        return cfg
    cands = configs if tune_mode() == "full" else configs[:3]
    if not on_device:
        if STANDIN_COMPILES_ALL:
            for c in cands:
                run(c)
        return configs[0]
    if aliased or torch.cuda.is_current_stream_capturing():
        return configs[0]
    # (every config fits sm_90's 227 KiB of shared memory: the CI compile test checks it)
    times = {c: _time(lambda c=c: run(c)) for c in cands}
    cfg = table[key] = min(times, key=times.get)
    return cfg


def qgemm_sm90(x2d, w2d, b, mult, rsh, epi, res, out, deq_scale: float, out_mode: int,
               has_res: bool, res_mode: int, rq_mode: int) -> torch.Tensor:
    """``out = epilogue(x2d @ w2d^T)`` with :func:`.gemm.qgemm`'s epilogue tensors (internal:
    the caller checked :func:`applies`)."""
    m, k = x2d.shape
    n = w2d.shape[0]
    rest = (b, mult, rsh, epi, res, out, m, n, k, out.stride(0), res.stride(0),
            float(deq_scale))
    meta = {"OUT_MODE": out_mode, "HAS_RES": has_res, "RES_MODE": res_mode,
            "RQ_MODE": rq_mode, "EPI_SPLIT": epi_split(out_mode, rq_mode, has_res)}
    cfg = getattr(_local, "config", None)  # forced (use(config=))
    if cfg is None:
        key = (m, n, k, out_mode, has_res, res_mode, rq_mode, out.dtype, b.dtype)
        cfg = pick(_TUNED["sm90"].cache, key, CONFIGS,
                   lambda c: _launch(c, x2d, w2d, rest, meta), x2d.is_cuda,
                   has_res and res.data_ptr() == out.data_ptr())
    _launch(cfg, x2d, w2d, rest, meta)
    return out
