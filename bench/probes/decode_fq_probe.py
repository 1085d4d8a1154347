"""GPU probe (one short lease): weight-only decode and prefill tiles and L2-flush method;
fake-quant fwd+bwd host time. Prints a report; not a benchmark suite (no side-by-side
contract rows).

    python bench/probes/decode_fq_probe.py [--parts fq,decode,prefill,hostprof] [--reps 50]

``decode``: for m = 1 and the three quick (n, k) shapes, bf16: ``F.linear`` against the
weight-only GEMM with the autotuner's choice and with every decode tile (the one-row GEMV
ones included) forced at split K / 2, K, 2 K of the heuristic's, timed per call with CUDA
events after an L2 flush that writes (``buf.zero_()``, as the harness and
``triton.testing.do_bench``: the flushed lines are dirty, and their write-back shares the
timed kernel's bandwidth) or reads (``buf.sum``: clean lines, as a decode step finds the
previous layer's weights). ``prefill``: the same at m = 2048, every prefill tile forced in
the plain form and in the transposed one (``W_A``: the converted weight as the MMA's
register operand), with their TFLOPS. ``fq``: the fake-quant suite's ``gpuquant-triton``
fwd+bwd calls and its ``torch`` per-channel one at 2^20 float32: host microseconds a call
(no sync inside the loop), the per-call time the harness would record, whether a call
synchronises the host, and the profiler's kernel time and launch count a call.
``hostprof``: cProfile on the GPU machine of the host-bound calls (see :func:`host_profile`).
"""
import argparse
import gc
import os
import statistics
import time

import torch


def _flushers():
    buf = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    return {"write": buf.zero_, "read": lambda: buf.sum(dtype=torch.int64)}


def _timed(fn, flush, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = []
    for _ in range(reps):
        flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ev.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3  # us


def _weight_only_calls(m, n, k):
    """(x, packed weight, scale, bias, calls): bf16 ``F.linear`` and the weight-only
    module (autotuned, warmed) on one (m, n, k)."""
    from gpuquant.nn.quantized.linear_dynamic import WeightOnlyLinear
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    mod = WeightOnlyLinear.from_float_module(lin).eval()
    w, b = lin.weight.detach(), lin.bias.detach()
    calls = {"torch-bf16": lambda: torch.nn.functional.linear(x, w, b)}
    with torch.no_grad():
        mod(x)
    calls["module (autotuned)"] = lambda: mod(x)
    return x, mod.weight, mod.weight_scale, mod.bias, calls


def _report(title, calls, reps, flops=None):
    """Each call's median us under both flushes and its speed-up over ``torch-bf16``."""
    flushers = _flushers()
    print(f"\n## {title}; median us of {reps}")
    print(f"{'call':48s} {'write-flush':>12s} {'read-flush':>12s}")
    base = {}
    for name, fn in calls.items():
        try:
            t = {f: _timed(fn, flush, reps) for f, flush in flushers.items()}
        except Exception as e:  # a tile that does not compile or fit: say so, go on
            print(f"{name:48s} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        if name == "torch-bf16":
            base = t
        ratio = " ".join(f"{base[f] / t[f]:.2f}x" for f in t)
        rate = f"  {flops / t['write'] / 1e6:6.0f} TFLOPS" if flops else ""
        print(f"{name:48s} {t['write']:12.1f} {t['read']:12.1f}   vs bf16 {ratio}{rate}")


def decode(reps):
    from gpuquant.backends.triton import dynamic as D
    from gpuquant.backends.triton.common import sm_count
    from gpuquant.bench.warm import WO_PROBE_SHAPES, weight_only_probe_launches
    sms = sm_count()
    for n, k in WO_PROBE_SHAPES:
        x, wq, ws, bias, calls = _weight_only_calls(1, n, k)
        for _, split, tile, _ in weight_only_probe_launches("decode", n, k, sms):
            calls[f"tile {tile} split {split}"] = (
                lambda tile=tile, split=split: D.linear_weight_only(x, wq, ws, bias,
                                                                    split_k=split, tile=tile))
        split0 = D.weight_only_split_k(1, n, k, sms)
        _report(f"decode m=1 n={n} k={k} (heuristic split {split0})", calls, reps)


def prefill(reps):
    from gpuquant.backends.triton import dynamic as D
    from gpuquant.backends.triton.common import sm_count
    from gpuquant.bench.warm import WO_PROBE_PREFILL_M as m
    from gpuquant.bench.warm import WO_PROBE_SHAPES, weight_only_probe_launches
    for n, k in WO_PROBE_SHAPES:
        x, wq, ws, bias, calls = _weight_only_calls(m, n, k)
        for _, split, tile, w_a in weight_only_probe_launches("prefill", n, k, sm_count()):
            calls[f"tile {tile}{' W_A' if w_a else ''}"] = (
                lambda tile=tile, w_a=w_a, split=split: D.linear_weight_only(
                    x, wq, ws, bias, split_k=split, tile=tile, w_a=w_a))
        _report(f"prefill m={m} n={n} k={k}", calls, reps, flops=2 * m * n * k)
        tuned = getattr(D._weight_only_kernel(False), "cache", {})
        print("autotuned:", {str(key): str(cfg) for key, cfg in tuned.items()
                             if tuple(key[:3]) == (m, n, k)})


def fake_quant(reps):
    from gpuquant.bench.suites import fake_quant as F
    calls = {}
    for gran in ("per_tensor", "per_channel"):
        params = {"mode": "fwd+bwd", "granularity": gran, "dtype": "float32", "numel": 2 ** 20}
        inp = F._make_inputs(params, "cuda")(0)
        calls[f"triton {gran}"] = F._triton_setup(inp)
        if gran == "per_channel":
            calls["torch per_channel"] = F._torch_setup(inp)
    flush = _flushers()["write"]
    print(f"\n## fake_quant suite fwd+bwd calls, 2^20 float32; {reps} calls")
    for name, fn in calls.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            sync = "no"
        except RuntimeError as e:
            sync = f"yes ({str(e)[:60]})"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        hosts = {}
        for collect in (True, False):  # the harness times with the garbage collector off
            (gc.enable if collect else gc.disable)()
            host = hosts["gc on" if collect else "gc off"] = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        gc.enable()
        timed = _timed(fn, flush, reps)
        said = "; ".join(f"{k} median {statistics.median(v):7.1f} us (p80 "
                         f"{sorted(v)[int(0.8 * len(v))]:7.1f})" for k, v in hosts.items())
        print(f"{name:22s} host {said}; harness-style {timed:7.1f} us; syncs the host: {sync}")
    from gpuquant.bench.profile import profile_step
    for name, fn in calls.items():  # where the time goes: kernels, launches, host ops
        print("\n".join(profile_step(f"fake_quant fwd+bwd {name}", fn)[:4]))


def host_profile(reps):
    """cProfile of host-bound calls on the GPU machine itself (the stand-in driver on the dev
    CPU cannot show what real CUDA costs the host): the fake-quant suite's per-channel
    fwd+bwd, the conv suite's 53 eager calls, a QAT training step (resnet50, batch 64)."""
    import cProfile
    import pstats

    from gpuquant.bench.suites import conv as C
    from gpuquant.bench.suites import fake_quant as F
    from gpuquant.bench.suites import qat_step as Q
    params = {"mode": "fwd+bwd", "granularity": "per_channel", "dtype": "float32",
              "numel": 2 ** 20}
    calls = {"fake_quant per_channel fwd+bwd": (F._triton_setup(F._make_inputs(params,
                                                                             "cuda")(0)), reps)}
    with torch.no_grad():
        layers = C.make_inputs(C.resnet50_convs(), 64, "cuda")(0)
    calls["conv suite: 53 eager conv2d op calls"] = (C._triton(layers), max(2, reps // 10))
    qp = {"model": "resnet50", "batch": 64, "resolution": 224, "dtype": "bfloat16",
          "memory_format": "channels_last"}
    calls["qat_step gpuquant-qat resnet50 b64"] = (
        Q._provider("gpuquant-qat", qp, {}).setup(Q._make_inputs(qp, "cuda")(0)),
        max(2, reps // 10))
    for name, (fn, n) in calls.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(n):
            fn()
        pr.disable()
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        print(f"\n## host profile: {name}: {host:.3f} ms a call (profiled, {n} calls)")
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(18)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="fq,decode")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    # the lease's suites tune quick; so does the probe (its forced tiles are in `make
    # tcache`'s prebuilt cache, gpuquant.bench.warm's weight_only_tiles)
    os.environ.setdefault("GPUQUANT_TRITON_TUNE", "quick")
    print(torch.cuda.get_device_name(), torch.__version__)
    for part in a.parts.split(","):
        {"fq": fake_quant, "decode": decode, "prefill": prefill,
         "hostprof": host_profile}[part](a.reps)


if __name__ == "__main__":
    main()
