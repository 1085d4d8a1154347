"""Probe: does an int8 GEMM that keeps its ``wgmma`` in flight beat gpuquant's Triton kernel
on sm_90?

Triton's ``tl.dot`` never makes a dot with an int32 accumulator asynchronous (its MMAv3
pipeliner, ``WGMMAPipeline.cpp`` rule 2.1; ``triton_int8_wgmma_waits.py`` shows the
``wgmma.wait_group 0`` after every K step), so gpuquant's int8 GEMM drains the tensor cores
once a K step and hides it only by running two CTAs a multiprocessor. Gluon, Triton's
lower-level dialect (``triton.experimental.gluon``, in Triton 3.6 and 3.9), issues
``warpgroup_mma(..., is_async=True)`` and ``warpgroup_mma_wait(num_outstanding=1)`` itself.
This probe is the smallest such kernel: TMA loads into a ring of ``STAGES`` shared-memory
buffers (one mbarrier each), one asynchronous ``wgmma`` group kept in flight while the next
tile's copy is issued, the int32 accumulator stored as is (``C = A B^T``, A (M, K) and
B (N, K) int8 row-major: the layout of gpuquant's activations and weights). It answers one
question before anything is built on it: how much faster than the Triton kernel, at the
shapes of issue 6 (gemm 4096^3, 8192^3) and issue 12 (W8A8 prefill, m = 2048)?

Gluon kernels do not run under ``TRITON_INTERPRET``; on a machine without a GPU the probe
compiles them for sm_90 and prints what the PTX holds::

    env -u TRITON_INTERPRET python bench/probes/gluon_int8_wgmma.py --compile-only

On a GPU (H100 / H200): every config is checked for exact equality with ``torch._int_mm``
first, then timed (median of CUDA-event runs, the L2 cleared before each) beside
gpuquant's Triton bare GEMM (``linear_int32``, autotuned) and ``torch._int_mm``::

    python bench/probes/gluon_int8_wgmma.py [--shapes 4096x4096x4096,...] [--reps 50]
"""
from __future__ import annotations

import argparse
import re
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES): the Triton kernel's sm_90 pick for these
# shapes is 128x128x128, 4 warps, 3 stages (two CTAs a multiprocessor), so that tile is the
# first; then one-CTA tiles with two warpgroups, which async wgmma should feed better.
CONFIGS = [
    (128, 128, 128, 4, 3),
    (128, 128, 128, 4, 4),
    (128, 256, 128, 8, 3),
    (128, 256, 64, 8, 5),
    (256, 128, 128, 8, 3),
]
GROUP_M = 8
# the TMA copy into shared memory: async_copy_global_to_shared in Triton 3.6, async_load in 3.9
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# a ragged shape first (M, N and the K tail not multiples of any tile: masks and TMA's zero
# fill; n and k multiples of 8 for torch._int_mm, the reference), then issue 6's gemm rows
# and issue 12's W8A8 prefill rows
SHAPES = [(333, 520, 1040), (4096, 4096, 4096), (8192, 8192, 8192), (2048, 4096, 4096),
          (2048, 11008, 4096), (2048, 4096, 11008)]
# wgmma's N for 8-bit integer operands (the ISA allows multiples of 16 from 16 to 256 above
# 8 and 24; Triton's Gluon lowering takes at most 224 for int8), largest first
_INT8_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)


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
def _gemm_s8_async(a_desc, b_desc, C, M, N, K, stride_cm,
                   STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]

    # grouped tile order (GROUP row blocks share their B tiles in L2), as gpuquant's kernels
    pid = gl.program_id(0)
    grid_m = gl.cdiv(M, BM)
    grid_n = gl.cdiv(N, BN)
    in_group = GROUP * grid_n
    first_m = (pid // in_group) * GROUP
    group_rows = gl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
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
    k_tiles = gl.cdiv(K, BK)  # the K tail reads TMA's zero fill

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
        # one group in flight: after this wait the previous step's wgmma has read its stage,
        # (kt - 1) % STAGES, which the copy of tile kt + STAGES - 1 may now overwrite
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

    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    ptrs = C + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
    gl.store(ptrs, acc, mask=(rows < M)[:, None] & (cols < N)[None, :])


def _layouts(bm, bn, bk):
    a = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    b = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    return a, b


def gemm_s8(a, b, config=CONFIGS[0], out=None):
    """``a (M, K) @ b (N, K)^T`` in int32 on a CUDA GPU with compute capability 9.x."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bm, bn, bk, warps, stages = config
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise TypeError(f"gemm_s8 takes 2-D int8 tensors, got {a.dtype} {tuple(a.shape)} "
                        f"and {b.dtype} {tuple(b.shape)}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb or k % 16:
        raise ValueError(f"K must agree and be a multiple of 16 (TMA rows of 16 bytes), got "
                         f"{k} and {kb}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(m, n, dtype=torch.int32, device=a.device) if out is None else out
    la, lb = _layouts(bm, bn, bk)
    ad = TensorDescriptor(a, [m, k], [k, 1], [bm, bk], la)
    bd = TensorDescriptor(b, [n, k], [k, 1], [bn, bk], lb)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_s8_async[grid](ad, bd, out, m, n, k, out.stride(0), STAGES=stages, GROUP=GROUP_M,
                         num_warps=warps)
    return out


def compile_sm90(config):
    """(ptx, shared bytes) of one config compiled for sm_90 without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    bm, bn, bk, warps, stages = config
    la, lb = _layouts(bm, bn, bk)
    sig = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{la!r}>",
           "b_desc": f"tensordesc<i8[{bn}, {bk}],{lb!r}>",
           "C": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_cm": "i32",
           "STAGES": "constexpr", "GROUP": "constexpr", "num_warps": "constexpr"}
    consts = {"STAGES": stages, "GROUP": GROUP_M, "num_warps": warps}
    src = GluonASTSource(_gemm_s8_async, sig, consts)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps})
    return ck.asm["ptx"], ck.metadata.shared


def ptx_facts(ptx: str) -> dict:
    mma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
    waits = [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return {"mma": mma, "waits": sorted(set(waits)),
            "tma": "cp.async.bulk.tensor" in ptx, "mbarrier": "mbarrier.try_wait" in ptx}


def compile_only() -> int:
    print(f"triton {triton.__version__}, sm_90, compiled without a GPU")
    bad = 0
    for cfg in CONFIGS:
        try:
            ptx, shared = compile_sm90(cfg)
        except Exception as e:  # report every config, then fail
            print(f"{cfg}: compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            bad += 1
            continue
        f = ptx_facts(ptx)
        ok = (any(".s32.s8.s8" in x for x in f["mma"]) and 1 in f["waits"] and f["tma"]
              and shared <= 232448)
        bad += not ok
        print(f"{cfg}: {' '.join(f['mma'])}; wait_group {f['waits']}; TMA {f['tma']}; "
              f"shared {shared // 1024} KiB{'' if ok else '  <-- NOT async int8 / too big'}")
    return 1 if bad else 0


def _bench(fn, reps):
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=reps, return_mode="median")


def on_gpu(shapes, reps: int) -> int:
    import torch
    from gpuquant import backends

    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}")
    linear_int32 = backends.get_backend("triton").OPS["linear_int32"]
    bad = 0
    for m, n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(m * 7 + n * 3 + k)
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        ref = torch._int_mm(a, b.t())
        zero = torch.zeros(n, dtype=torch.int32, device="cuda")
        tops = 2 * m * n * k * 1e-9
        t_mm = _bench(lambda: torch._int_mm(a, b.t()), reps)
        got = linear_int32(a, 0, b, zero)
        tri_ok = bool(torch.equal(got, ref))
        t_tri = _bench(lambda: linear_int32(a, 0, b, zero), reps)
        print(f"\nm={m} n={n} k={k}: torch._int_mm {t_mm * 1e3:.1f} us "
              f"({tops / t_mm:.0f} TOPS); gpuquant-triton bare {t_tri * 1e3:.1f} us "
              f"({tops / t_tri:.0f} TOPS, exact {tri_ok})")
        for cfg in CONFIGS:
            out = torch.empty(m, n, dtype=torch.int32, device="cuda")
            try:
                gemm_s8(a, b, cfg, out)
                torch.cuda.synchronize()
            except Exception as e:
                print(f"  {cfg}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                bad += 1
                continue
            exact = bool(torch.equal(out, ref))
            bad += not exact
            t = _bench(lambda: gemm_s8(a, b, cfg, out), reps)
            print(f"  gluon {cfg}: {t * 1e3:.1f} us ({tops / t:.0f} TOPS), "
                  f"{t_tri / t:.2f}x triton, {t_mm / t:.2f}x int_mm, exact {exact}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    p.add_argument("--reps", type=int, default=50, help="milliseconds of timed runs a row")
    a = p.parse_args(argv)
    if a.compile_only:
        return compile_only()
    import torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("needs an sm_90 GPU (H100 / H200); --compile-only checks the PTX without one")
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    return on_gpu(shapes, a.reps)


if __name__ == "__main__":
    sys.exit(main())
