"""CPU probe (no GPU needed): does Triton keep an int8 ``wgmma`` in flight across K steps on
sm_90 with any of its knobs? Compiles a plain int8 GEMM main loop for sm_90 with pointer
loads or TMA tensor descriptors, with and without ``tl.range(..., warp_specialize=True)``,
and prints from the PTX: the MMA instruction, the ``wgmma.wait_group`` counts in the loop
(0: the tensor cores drain every K step), whether TMA loads (``cp.async.bulk.tensor``) and
warp specialization (``setmaxnreg``) appear. The same loops in float16 with a float32
accumulator are the control.

    env -u TRITON_INTERPRET python bench/probes/triton_int8_wgmma_waits.py

Triton 3.6 (the GPU machines'), 2026-11-26: every int8 variant waits with ``wait_group 0``
only; the float16 control with TMA descriptors gets ``wait_group 1`` in its loop (one MMA
group kept in flight), with pointer loads ``0`` too. TMA appears with descriptors, warp
specialization never on sm_90 (bench/README.md NOTES).
"""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _gemm_tma(X, W, Y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              WS: tl.constexpr, ACC_F32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    xd = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    if ACC_F32:
        acc = tl.zeros((BM, BN), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.int32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=4, warp_specialize=WS):
        a = xd.load([pid_m * BM, k * BK])
        b = wd.load([pid_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
    om, on = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    tl.store(Y + om[:, None] * N + on[None, :], acc)


@triton.jit
def _gemm_ptr(X, W, Y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              WS: tl.constexpr, ACC_F32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    om, on = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    ok = tl.arange(0, BK)
    if ACC_F32:
        acc = tl.zeros((BM, BN), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.int32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=4, warp_specialize=WS):
        a = tl.load(X + om[:, None] * K + (k * BK + ok)[None, :])
        b = tl.load(W + on[:, None] * K + (k * BK + ok)[None, :])
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
    tl.store(Y + om[:, None] * N + on[None, :], acc)


def report(fn, ws: bool, int8: bool) -> str:
    sig = {"X": "*i8" if int8 else "*fp16", "W": "*i8" if int8 else "*fp16",
           "Y": "*i32" if int8 else "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr",
           "ACC_F32": "constexpr"}
    const = {"BM": 128, "BN": 256, "BK": 128 if int8 else 64, "WS": ws, "ACC_F32": not int8}
    name = f"{fn.__name__:10s} {'int8' if int8 else 'fp16'} warp_specialize={ws!s:5s}"
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8, "num_stages": 4})
    except Exception as e:  # noqa: BLE001 -- a variant Triton refuses is a finding too
        return f"{name}: does not compile ({str(e).splitlines()[-1][:120]})"
    ptx = c.asm["ptx"]
    mma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
    waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)))
    return (f"{name}: {mma[0] if mma else 'no wgmma'}; wait_group {','.join(waits)}; "
            f"TMA loads {len(re.findall('cp.async.bulk.tensor', ptx))}; "
            f"setmaxnreg {len(re.findall('setmaxnreg', ptx))}")


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, 128x256 tile, 8 warps, 4 stages")
    for fn in (_gemm_ptr, _gemm_tma):
        for ws in (False, True):
            print(report(fn, ws, True))
    for fn in (_gemm_ptr, _gemm_tma):
        print(report(fn, False, False), "(control)")


if __name__ == "__main__":
    main()
