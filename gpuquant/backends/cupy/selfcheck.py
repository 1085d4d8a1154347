"""A tier's first run on a GPU, in a child process: ``python -m gpuquant.backends.cupy.selfcheck
<tier>`` runs a few linear and conv2d cases with the tier forced and compares every byte with
the NumPy backend; exit status 0 when all match, 4 when one differs, 2 when it cannot run
here (no CUDA, no CuPy, a device that cannot run the tier), 3 when a case raised (a compile
error, a CUDA fault), 64 for a usage error; 1 is Python's own for an uncaught exception (an
import that failed), a crash too.

Why a child process: a kernel never run on hardware (the ``wgmma`` tier was written without
a GPU) may fault, and a CUDA fault is sticky: every later CUDA call of that process fails.
The benchmark providers and the GPU tests of an unvalidated tier (``dispatch.OPT_IN_TIERS``)
go through :func:`check_isolated` first, so one bad kernel costs its own rows, not a lease's
whole run.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from typing import Tuple

__all__ = ["check_isolated", "run_cases", "main"]

# (lead shape, K, N) and (n, c, h, w, o, (kh, kw), stride, padding, dilation, groups):
# several block tiles each way, K past several stages, padding, a 3-channel first layer
LINEAR_CASES = [((300,), 1040, 520), ((9,), 48, 16), ((129,), 4096, 257)]
# (every other conv case takes int8 input, zero point -3; the last is grouped, 16 channels a
# group: the group offsets of the tensor-core tiers)
CONV_CASES = [(2, 64, 14, 14, 272, (3, 3), 1, 1, 1, 1), (2, 3, 23, 19, 64, (7, 7), 2, 3, 1, 1),
              (1, 256, 7, 7, 512, (1, 1), 1, 0, 1, 1), (2, 64, 9, 11, 96, (3, 3), 2, 1, 1, 4)]


def run_cases(tier: str, device: str = "cuda") -> Tuple[int, str]:
    """(mismatching cases, report) of the cases above through the cupy backend with ``tier``
    forced, against the NumPy backend (the contract's oracle)."""
    import torch

    from ... import backends
    from ...dtypes import get_dtype
    from ...functional.requant import make_requant
    cupy_b = backends.get_backend("cupy")
    ref = backends.get_backend("numpy").OPS
    gen = torch.Generator().manual_seed(2026)
    saved = os.environ.get("GPUQUANT_CUPY_TIER")
    os.environ["GPUQUANT_CUPY_TIER"] = tier  # (restored below: the caller's process)
    try:
        return _compare(tier, device, cupy_b, ref, gen, make_requant, get_dtype)
    finally:
        if saved is None:
            os.environ.pop("GPUQUANT_CUPY_TIER", None)
        else:
            os.environ["GPUQUANT_CUPY_TIER"] = saved


def _compare(tier, device, cupy_b, ref, gen, make_requant, get_dtype) -> Tuple[int, str]:
    import torch
    bad, lines = 0, []
    for i, (lead, k, n) in enumerate(LINEAR_CASES):
        x_dtype = (torch.uint8, torch.int8)[i % 2]
        lo, hi = (0, 255) if x_dtype == torch.uint8 else (-128, 127)
        x = torch.randint(lo, hi + 1, lead + (k,), generator=gen).to(x_dtype)
        w = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        bias = torch.randint(-20000, 20001, (n,), generator=gen).to(torch.int32)
        s_w = torch.rand(n, generator=gen, dtype=torch.float64) * 0.01 + 0.001
        rq = make_requant(0.02, s_w.float(), 0.02 * 0.005 * 60.0 * k ** 0.5 / 40, 3,
                          get_dtype("quint8" if i % 2 == 0 else "qint8"), "relu" if i else "none")
        x_zp = 7 if x_dtype == torch.uint8 else -3
        want = ref["linear"](x, x_zp, w, bias, rq)
        got = cupy_b.OPS["linear"](x.to(device), x_zp, w.to(device), bias.to(device),
                                   rq.to(device)).cpu()
        ok = torch.equal(got, want)
        bad += not ok
        lines.append(f"linear {lead + (k,)} x ({n}, {k}) {x_dtype}: "
                     f"{'ok' if ok else f'{(got != want).sum().item()} bytes differ'}")
    for i, (nb, c, h, wd, o, ks, st, pad, dil, groups) in enumerate(CONV_CASES):
        x_dtype = (torch.uint8, torch.int8)[i % 2]
        lo, hi = (0, 255) if x_dtype == torch.uint8 else (-128, 127)
        x_zp = 100 if x_dtype == torch.uint8 else -3
        x = torch.randint(lo, hi + 1, (nb, c, h, wd), generator=gen).to(x_dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randint(-127, 128, (o, c // groups) + ks, generator=gen).to(torch.int8)
        bias = torch.randint(-20000, 20001, (o,), generator=gen).to(torch.int32)
        s_w = torch.rand(o, generator=gen, dtype=torch.float64) * 0.01 + 0.001
        kk = c // groups * ks[0] * ks[1]
        rq = make_requant(0.02, s_w.float(), 0.02 * 0.005 * 60.0 * kk ** 0.5 / 40, 128,
                          get_dtype("quint8"), ("none", "relu", "relu6")[i % 3])
        args = (st, pad, dil, groups)
        want = ref["conv2d"](x, x_zp, w, bias, *args, rq)
        got = cupy_b.OPS["conv2d"](x.to(device), x_zp, w.to(device), bias.to(device), *args,
                                   rq.to(device)).cpu()
        ok = torch.equal(got, want)
        bad += not ok
        lines.append(f"conv2d {(nb, c, h, wd)} {x_dtype} -> {o}, k{ks} s{st} p{pad} g{groups}: "
                     f"{'ok' if ok else f'{(got != want).sum().item()} bytes differ'}")
    return bad, "\n".join(lines)


@functools.lru_cache(maxsize=None)
def check_isolated(tier: str, timeout: float = 300.0) -> Tuple[bool, str]:
    """(passed, report) of ``python -m gpuquant.backends.cupy.selfcheck <tier>`` in a child
    process (once a process and tier). Never raises for what the child does: a fault, a
    mismatch, a timeout or a missing device all come back as ``(False, why)``."""
    cmd = [sys.executable, "-m", "gpuquant.backends.cupy.selfcheck", tier]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the {tier} tier's self-check did not finish in {timeout:.0f} s"
    out = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        return True, out
    return False, (f"the {tier} tier's self-check exited with status {r.returncode} "
                   f"(4: bytes differ from NumPy, 2: cannot run here, 1, 3 or other: it "
                   f"crashed):\n"
                   f"{out[-3000:]}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from . import dispatch
    if len(argv) != 1 or argv[0] not in dispatch.TIERS:
        print(f"usage: python -m gpuquant.backends.cupy.selfcheck <tier>; tiers: "
              f"{list(dispatch.TIERS)}", file=sys.stderr)
        return 64  # (EX_USAGE: not 2, "cannot run here")
    tier = argv[0]
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    from . import is_available
    ok, reason = is_available()
    if not ok:
        print(f"cupy backend unavailable: {reason}", file=sys.stderr)
        return 2
    cap = torch.cuda.get_device_capability()
    if not dispatch.runs_tier(tier, cap):
        print(f"this device ({cap[0]}.{cap[1]}) cannot run tier {tier!r}", file=sys.stderr)
        return 2
    try:
        bad, report = run_cases(tier)
        torch.cuda.synchronize()
    except Exception:  # a compile error or a CUDA fault: not a byte mismatch (status 4)
        traceback.print_exc()
        print(f"tier {tier}: the self-check crashed (above)", file=sys.stderr)
        return 3
    print(f"{torch.cuda.get_device_name()} tier {tier}: "
          f"{'all bytes equal NumPy' if not bad else f'{bad} case(s) differ'}\n{report}")
    return 4 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
