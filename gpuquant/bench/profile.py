"""Where the time of a GPU step goes: ``torch.profiler`` tables of the steps the benchmark
suites time, for reading after a lease.

    python -m gpuquant.bench.profile --out DIR [--what qat_step,int8_forward,conv_all,
                                     linear_prefill] [--model resnet50] [--batch 64]

``qat_step``: one training step of the ``qat_step`` suite (float, then gpuquant QAT; bf16
autocast, channels_last). ``int8_forward``: the ``models`` suite's fused int8 network under
the triton backend. ``conv_all``: the ``conv`` suite's "all" row (resnet50's 53
convolutions, batch 64; ``--model`` / ``--batch`` do not apply), Triton int8 then cuDNN
bf16. ``linear_prefill``: the ``linear_dynamic`` suite's prefill rows (m = 2048, its quick
(n, k); ``--model`` / ``--batch`` do not apply): W8A8 (per-token quantize, then the int8
GEMM), weight-only and bf16 ``F.linear``; its kernel list splits a W8A8 row into its two
kernels and the gap between them (wall time minus the kernels' sum). For each: the wall
time of a step (CUDA events, median of 5 after 3 warm-ups), the GPU time its kernels add
up to, the number of kernel launches, the 25 ops with the most GPU time, the 15 with the
most host time, and for ``int8_forward``, ``conv_all`` and ``linear_prefill`` every kernel
of one step in order with its time (``int8_forward``'s convolutions against
``conv_all``'s, layer by layer). Writes ``DIR/profile-<what>.txt`` and prints it. Needs a
CUDA GPU (exit 1 without one).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List

import torch

from .._paths import out_problem

__all__ = ["main", "profile_step"]

WHATS = ("qat_step", "int8_forward", "conv_all", "linear_prefill")
_TIMELINES = ("int8_forward", "conv_all", "linear_prefill")  # every kernel of a step listed


def _median_ms(step: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def device_summary(events, steps: int):
    """(GPU microseconds, device activities) per step over a profiler's raw ``events``: the
    device-side ones (kernels, memcpy, memset), each counted once by its own time range.
    (The sum of ``self_device_time_total`` over ``key_averages()`` said 31 us per step of two
    256^3 matmuls on an H100 with torch 2.11, where the profiler's own total said 14 us.)"""
    import torch
    cuda = torch.autograd.DeviceType.CUDA
    dev = [e for e in events if getattr(e, "device_type", None) == cuda]
    total = sum(e.time_range.end - e.time_range.start for e in dev)
    return total / steps, len(dev) / steps


def timeline(events, steps: int) -> List[str]:
    """One line per device activity of the first of ``steps`` profiled steps, in start order:
    index, GPU microseconds, name (kernels of the same name, such as the convolutions of a
    network, told apart by their place)."""
    import torch
    cuda = torch.autograd.DeviceType.CUDA
    dev = sorted((e for e in events if getattr(e, "device_type", None) == cuda),
                 key=lambda e: e.time_range.start)
    dev = dev[:len(dev) // steps]
    return [f"{i:4d} {e.time_range.end - e.time_range.start:10.1f} us  {e.name[:90]}"
            for i, e in enumerate(dev)]


def profile_step(title: str, step: Callable[[], object], warmup: int = 3,
                 kernels: bool = False) -> List[str]:
    """Warm ``step`` up, time it, profile two calls; returns the report's lines (with
    ``kernels``, every kernel of one step in order: :func:`timeline`)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    wall = _median_ms(step)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") \
        else "self_cuda_time_total"
    gpu_us, launches = device_summary(prof.events(), steps=2)
    lines = [f"## {title}",
             f"step wall time (CUDA events, median of 5): {wall:.3f} ms",
             f"GPU time of its kernels (profiler, per step): {gpu_us / 1e3:.3f} ms",
             f"kernel launches per step: {launches:g}", "",
             "top 25 by GPU time (2 steps):",
             events.table(sort_by=dev_attr, row_limit=25, max_name_column_width=60), "",
             "top 15 by host time (2 steps):",
             events.table(sort_by="self_cpu_time_total", row_limit=15,
                          max_name_column_width=60), ""]
    if kernels:
        lines += ["every kernel of one step, in order (index, GPU time, name):",
                  *timeline(prof.events(), steps=2), ""]
    return lines


def _qat_steps(model_name: str, batch: int):
    from .suites import qat_step as Q
    params = {"model": model_name, "batch": batch, "resolution": 224, "dtype": "bfloat16",
              "memory_format": "channels_last"}
    inp = Q._make_inputs(params, "cuda")(0)
    for kind in ("float", "gpuquant-qat"):
        yield f"qat_step {kind} {model_name} batch {batch}", Q._provider(kind, params, {}).setup(inp)


def _int8_steps(model_name: str, batch: int):
    from .suites import models as M
    in_ch, size = M.MODELS[model_name]
    x = M.make_inputs(in_ch, size, batch, "cuda")(0)["x"]
    yield (f"int8_forward gpuquant-triton (fused, eager) {model_name} batch {batch}",
           M._triton(model_name, in_ch, size, "cuda")({"x": x}))
    yield (f"int8_forward torch-bf16 (eager) {model_name} batch {batch}",
           M._bf16(model_name, in_ch, size, "cuda", False)({"x": x}))


def _conv_all_steps(model_name: str, batch: int):
    from .suites import conv as C
    layers = C.make_inputs(C.resnet50_convs(), C.BATCH, "cuda")(0)
    yield f"conv_all gpuquant-triton resnet50 batch {C.BATCH}", C._triton(layers)
    yield f"conv_all torch-bf16 resnet50 batch {C.BATCH}", C._bf16(layers)


def _linear_steps(model_name: str, batch: int, device: str = "cuda", nk=None, m=None):
    """The ``linear_dynamic`` suite's prefill rows, each provider's call as the suite sets
    it up (``--model`` / ``--batch`` do not apply; ``nk`` / ``m`` default: the suite's
    quick (n, k) and prefill m)."""
    from .suites import linear_dynamic as LD
    m = m or LD.PREFILL_M
    for n, k in (nk or LD.QUICK_NK):
        inp = LD._make_inputs(m, n, k, device)(0)
        for name, prov in (("gpuquant-triton", LD._gpuquant(False)),
                           ("gpuquant-triton-w8", LD._gpuquant(True)),
                           ("torch-bf16", LD._torch_bf16())):
            yield f"linear_prefill {name} m={m} n={n} k={k}", prov.setup(inp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuquant.bench.profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--what", default=",".join(WHATS), help=f"comma-separated: {WHATS}")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in whats if w not in WHATS]
    if bad or not whats:
        p.error(f"--what: unknown {bad or args.what!r}; known: {list(WHATS)}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    from .suites.models import MODELS
    if args.model not in MODELS:
        p.error(f"--model: unknown {args.model!r}; known: {sorted(MODELS)}")
    why = out_problem(args.out)
    if why is not None:
        p.error(f"argument --out: {why}")
    if not torch.cuda.is_available():
        print("gpuquant.bench.profile: needs a CUDA GPU", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    gens = {"qat_step": _qat_steps, "int8_forward": _int8_steps, "conv_all": _conv_all_steps,
            "linear_prefill": _linear_steps}
    rc = 0
    for what in whats:
        lines: List[str] = []
        try:
            for title, step in gens[what](args.model, args.batch):
                print(f"[profile] {title} ...", flush=True)
                lines += profile_step(title, step, kernels=what in _TIMELINES)
        except Exception as e:  # noqa: BLE001 - report what broke, keep the other profiles
            lines.append(f"FAILED: {type(e).__name__}: {e}")
            rc = 1
        text = "\n".join(lines) + "\n"
        with open(os.path.join(args.out, f"profile-{what}.txt"), "w") as f:
            f.write(text)
        print(text, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
