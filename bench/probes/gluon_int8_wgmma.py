"""Probe: does the sm_90 Gluon main loop (``gpuquant/backends/triton/gemm_sm90.py``: the
int8 ``wgmma`` kept in flight) beat the Triton kernel, and by how much, per tile?

Triton's ``tl.dot`` never makes a dot with an int32 accumulator asynchronous (rule 2.1 of
its MMAv3 pipeliner; ``triton_int8_wgmma_waits.py``), so gpuquant's int8 GEMM drains the
tensor cores every K step and hides it only with a second CTA a multiprocessor. The Gluon
path issues ``warpgroup_mma(is_async=True)`` and waits for all but one group itself, with
the same epilogues. It is off by default (``GPUQUANT_SM90_GEMM=gluon`` switches it on)
until measurements like these show where it wins. This probe forces each tile of
``gemm_sm90.CONFIGS`` and prints, per shape:

* the bare int32 GEMM (``linear_int32``): ``torch._int_mm``, the Triton kernel (autotuned)
  and each Gluon tile, every output checked against ``torch._int_mm`` with
  ``torch.equal`` (a ragged 333 x 520 x 1040 first: masks and TMA's zero fill);
* at the W8A8 prefill shapes (m = 2048, issue 12): the whole dynamic Linear's GEMM
  (``linear_dynamic``, bf16 out) on the Triton kernel and on the Gluon path (tuned), the
  two outputs compared with ``torch.equal``;
* resnet50's 3x3 layers at batch 64 (issue 6's conv rows): the Triton conv kernel against
  each config of the Gluon implicit-GEMM conv (``conv_sm90.py``) forced, outputs compared
  with ``torch.equal``.

Times: ``triton.testing.do_bench`` medians of one call replayed from a CUDA graph (the
kernels' time; the L2 cleared before each run), the W8A8 rows eager too. Without a GPU,
``--compile-only`` compiles every tile for sm_90 and prints what the PTX holds::

    env -u TRITON_INTERPRET python bench/probes/gluon_int8_wgmma.py --compile-only
    python bench/probes/gluon_int8_wgmma.py [--shapes 4096x4096x4096,...] [--reps 40]
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import triton

from gpuquant.bench.warm import GLUON_PROBE_SHAPES as SHAPES  # (its kernels are prebuilt)


def _compiled_ok(what, fn, sig, const, warps, needs=()) -> bool:
    """Compile one Gluon kernel for sm_90 and print what its PTX holds: the int8 wgmma, one
    group kept in flight, TMA, within 227 KiB (and each of ``needs`` in the PTX)."""
    from gpuquant.backends.triton.inspect_ptx import compile_gluon, wgmma_facts
    try:
        k = compile_gluon(fn, sig, const, 90, warps)
    except Exception as e:  # report every config, then fail
        print(f"{what}: compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False
    f, shared = wgmma_facts(k.asm["ptx"]), k.metadata.shared
    ok = (any(".s32.s8.s8" in x for x in f["mma"]) and 1 in f["waits"] and f["tma"]
          and shared <= 232448 and all(n in k.asm["ptx"] for n in needs))
    print(f"{what}: {' '.join(f['mma'])}; wait_group {f['waits']}; TMA {f['tma']}; "
          f"shared {shared // 1024} KiB{'' if ok else '  <-- NOT async int8 / too big'}")
    return ok


def compile_only() -> int:
    from gpuquant.backends.triton import conv_sm90 as C
    from gpuquant.backends.triton import gemm_sm90 as S
    print(f"triton {triton.__version__}, sm_90, compiled without a GPU")
    bad = 0
    for cfg in S.CONFIGS:
        for form in ("int32", "scaled_bf16"):
            bad += not _compiled_ok(f"{cfg} {form}", S._qgemm_sm90_kernel,
                                    *S.signature(cfg, form), cfg[3])
    for cfg in C.CONFIGS:  # the implicit-GEMM conv: 3x3, requantized without an activation
        bad += not _compiled_ok(f"conv {cfg}", C._qconv_sm90_kernel, *C.signature(cfg, "folded"),
                                cfg[3], needs=("cp.async.cg.shared.global",))
    return 1 if bad else 0


def _bench(fn, reps, graph: bool = True):
    """Median ms of ``fn``: replayed from a CUDA graph (``graph``: the kernels' time, the
    host's launch path out of it: the Gluon path's Python launch costs more than the Triton
    kernel's memoised plan, which would hide a kernel difference at the m = 2048 shapes),
    or called eagerly (host included, as the linear_dynamic suite's rows are)."""
    from triton.testing import do_bench

    from gpuquant.bench.harness import cuda_graph_of
    fn()  # compiles and tunes outside the capture
    if not graph:
        return do_bench(fn, warmup=10, rep=reps, return_mode="median")
    g, _ = cuda_graph_of(fn, warmup=1)
    return do_bench(g.replay, warmup=10, rep=reps, return_mode="median")


def on_gpu(shapes, reps: int) -> int:
    import torch
    from gpuquant import backends
    from gpuquant.backends.triton import gemm_sm90 as S

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    ops = backends.get_backend("triton").OPS
    bad = 0
    for m, n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(m * 7 + n * 3 + k)
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        ref = torch._int_mm(a, b.t())
        zero = torch.zeros(n, dtype=torch.int32, device="cuda")
        tops = 2 * m * n * k * 1e-9  # / ms = TOPS
        t_mm = _bench(lambda: torch._int_mm(a, b.t()), reps)
        with S.use(False):
            tri_ok = bool(torch.equal(ops["linear_int32"](a, 0, b, zero), ref))
            t_tri = _bench(lambda: ops["linear_int32"](a, 0, b, zero), reps)
        print(f"\nm={m} n={n} k={k}: torch._int_mm {t_mm * 1e3:.1f} us "
              f"({tops / t_mm:.0f} TOPS); gpuquant-triton bare {t_tri * 1e3:.1f} us "
              f"({tops / t_tri:.0f} TOPS, exact {tri_ok})")
        bad += not tri_ok
        for cfg in S.CONFIGS:
            bad += not _forced_row(f"gluon {cfg}", S.use(True, config=cfg),
                                   lambda: ops["linear_int32"](a, 0, b, zero), ref, reps, tops,
                                   {"triton": t_tri, "int_mm": t_mm})
        if m == 2048:  # W8A8 prefill: the dynamic Linear's GEMM with its scaled epilogue
            xs = torch.rand(m, device="cuda") * 0.01 + 1e-3
            ws = torch.rand(n, device="cuda") * 0.01 + 1e-3
            fb = torch.randn(n, device="cuda")
            args = (a, xs, b, ws, fb, torch.bfloat16)
            times = {}
            for on in (False, True):
                with S.use(on):
                    y = ops["linear_dynamic"](*args)
                    times[on] = [_bench(lambda: ops["linear_dynamic"](*args), reps, graph)
                                 for graph in (True, False)]
                if not on:
                    y_tri = y
            same = bool(torch.equal(y_tri, y))
            bad += not same
            (gt, et), (gg, eg) = times[False], times[True]
            print(f"  W8A8 GEMM (scaled bf16 epilogue): graph triton {gt * 1e3:.1f} us, gluon "
                  f"(tuned) {gg * 1e3:.1f} us, {gt / gg:.2f}x; eager {et * 1e3:.1f} / "
                  f"{eg * 1e3:.1f} us, {et / eg:.2f}x; same bytes {same}")
    bad += conv_on_gpu(reps)
    print(f"\ngluon tiles chosen: {S._TUNED['sm90'].cache} {S._TUNED['sm90-conv'].cache}")
    return 1 if bad else 0


def conv_on_gpu(reps: int) -> int:
    """resnet50's 3x3 layers at batch 64 (GLUON_CONV_PROBE_LAYERS): the Triton conv kernel
    (tuned) against each Gluon conv config forced, outputs compared with torch.equal, times
    from CUDA graphs. Returns the number of failures."""
    import torch
    from gpuquant import backends
    from gpuquant.backends.triton import conv_sm90 as C
    from gpuquant.backends.triton import gemm_sm90 as S
    from gpuquant.bench.warm import GLUON_CONV_PROBE_LAYERS, gluon_conv_probe_call
    op = backends.get_backend("triton").OPS["conv2d"]
    bad = 0
    for layer in GLUON_CONV_PROBE_LAYERS:
        args, ops = gluon_conv_probe_call(layer, "cuda")
        tops = ops * 1e-9  # / ms = TOPS
        with S.use(False):
            ref = op(*args)
            t_tri = _bench(lambda: op(*args), reps)
        print(f"\nconv {layer} (batch, C, H, O, k, stride, pad): triton {t_tri * 1e3:.1f} us "
              f"({tops / t_tri:.0f} TOPS)")
        for cfg in C.CONFIGS:
            if layer[1] % cfg[2] == 0:
                bad += not _forced_row(f"gluon conv {cfg}", _both(S.use(True), C.force(cfg)),
                                       lambda: op(*args), ref, reps, tops, {"triton": t_tri})
    return bad


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def _forced_row(what, forcing, run, ref, reps, tops, baselines) -> bool:
    """One forced Gluon tile: ``run()`` inside the ``forcing`` context, its output compared
    with ``ref`` (torch.equal), timed from a CUDA graph; prints its time, TOPS and speedup
    over each of ``baselines`` (name: ms). False where it failed or differed."""
    import torch
    with forcing:
        try:
            out = run()
            torch.cuda.synchronize()
        except Exception as e:  # report every tile, then fail
            print(f"  {what}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return False
        exact = bool(torch.equal(out, ref))
        t = _bench(run, reps)
    print(f"  {what}: {t * 1e3:.1f} us ({tops / t:.0f} TOPS), "
          + ", ".join(f"{b / t:.2f}x {name}" for name, b in baselines.items())
          + f", exact {exact}")
    return exact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    p.add_argument("--reps", type=int, default=40, help="milliseconds of timed runs a row")
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
