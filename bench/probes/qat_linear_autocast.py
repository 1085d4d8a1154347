"""GPU probe (one short lease): a transformer QAT Linear's training step under bf16 autocast.
Prints a report; not a benchmark suite.

    python bench/probes/qat_linear_autocast.py [--tokens 4096] [--reps 20]

For each (N, K) of the ``linear_dynamic`` suite's LLM shapes, a forward + backward of one
Linear at ``tokens`` rows, bf16 input, CUDA events, median of ``reps`` calls (each synchronised):

* ``float``: ``torch.nn.Linear`` under autocast (bf16 GEMMs, the float training step);
* ``qat``: ``prepare_dynamic_qat``'s Linear under autocast, which runs the served int8
  computation forward (per-token quantize, int8 GEMM) and bf16 GEMMs backward;
* ``qat-f32``: the same module with autocast off, i.e. the float32 composition (fake
  quants, three float32 GEMMs) that also ran under autocast before 2026-11-27.

Also checks, once per shape, that the ``qat`` output equals the converted module's.
"""
import argparse
import copy

import torch

from gpuquant.bench.profile import _median_ms as median_ms  # events, a sync a call

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _median_ms(fn, reps):
    for _ in range(3):  # warm: compiles, autotuning, the allocator
        fn()
    return median_ms(fn, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qat_linear_autocast: needs a CUDA device")
    from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, tokens {args.tokens}")
    print("| n | k | float ms | qat ms | qat-f32 ms | qat / float | qat-f32 / float | "
          "qat == served |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for n, k in SHAPES:
        lin = torch.nn.Linear(k, n, device="cuda")
        qat = prepare_dynamic_qat(copy.deepcopy(torch.nn.Sequential(lin)))[0]
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        g = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)

        def step(m, autocast=True):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    y = m(x)
                y.backward(g)
            return run
        t = {"float": _median_ms(step(lin), args.reps),
             "qat": _median_ms(step(qat), args.reps),
             "qat-f32": _median_ms(step(qat, False), max(3, args.reps // 4))}
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = qat(x)
            same = torch.equal(y, quantize_dynamic(copy.deepcopy(torch.nn.Sequential(qat)))[0](x))
        print(f"| {n} | {k} | {t['float']:.3f} | {t['qat']:.3f} | {t['qat-f32']:.3f} | "
              f"{t['qat'] / t['float']:.2f}x | {t['qat-f32'] / t['float']:.2f}x | {same} |")


if __name__ == "__main__":
    main()
