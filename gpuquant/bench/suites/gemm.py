"""Suite ``gemm``: the Triton int8 tensor-core GEMM against cuBLAS (GPU only).

Params: ``m, n, k`` from 1 to 8192: squares 256 ... 8192, small M (1, 16: the decode-like
shapes ``torch._int_mm`` refuses), unaligned sizes (K or N not a multiple of 8, which
``torch._int_mm`` refuses too) and a few rectangular LLM-like shapes. ``--quick``: a subset.

Providers (same int8 operands, interleaved):

* ``gpuquant-triton``: the backend's ``linear`` op: ``x`` (m, k) int8 times ``w`` (n, k)
  int8 with the fused epilogue (+ int32 bias, per-channel fixed-point requantization,
  int8 out), the kernel a quantized Linear / 1x1 conv runs;
* ``gpuquant-triton-bare``: the same kernel writing the bare int32 accumulator
  (``linear_int32``), to price the epilogue;
* ``gpuquant-triton-gluon-bare`` (m >= 128): the bare GEMM on the sm_90 Gluon main loop
  (:mod:`gpuquant.backends.triton.gemm_sm90`: the int8 ``wgmma`` kept in flight, tuned per
  shape), beside the Triton kernel's; unavailable off sm_90 (the ``gpuquant-triton*`` rows
  run the Triton kernel whatever ``GPUQUANT_SM90_GEMM`` says);
* ``torch-int-mm``: ``torch._int_mm(x, w.t())`` (cuBLASLt int8 -> int32; the baseline);
  unavailable where it refuses the shape (m <= 16, k or n not a multiple of 8);
* ``torch-bf16``: ``x_bf16 @ w_bf16.t()`` (what a user would run instead of int8);
* ``gpuquant-cupy-<tier>``: the CuPy backend's ``linear`` (hand-written CUDA, ``kernels/``)
  with each tier forced (dp4a, mma75, mma80, sm90; m <= 8 runs its GEMV kernel on every tier);
  tiers the GPU cannot run, or no CuPy, report unavailable.

Throughput: 2 m n k / time, TOPS for the int8 providers, TFLOPS for ``torch-bf16`` (the same
count; the unit picks the ceiling its fraction is of: int8 or bf16). Targets (issue 6) at m, n, k >= 4096: ``gpuquant-triton`` >= 1.0x
``torch-int-mm``; on H100 >= 60% of the 1979 dense int8 TOPS at 8192^3; the epilogue costs
<= 5% over bare.

``exact_vs_numpy``: dtype and shape of the whole output of input set 0, values on a sample
of 8 rows, the first and the last included (rows are independent): the requantized output
against the NumPy backend's ``linear`` on the same rows; the int32 outputs (bare,
``torch._int_mm``) against the exact int64 product in NumPy. ``torch-bf16``:
None (not an integer op).

Run on a GPU: ``gpuquant bench gemm --out bench/results/<device-slug>``.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

from ...dtypes import qint8
from ...functional.requant import make_requant
from ..harness import Case, Provider, ProviderUnavailable, Suite, exact_rows, sample_rows

SQUARES = [256, 512, 1024, 2048, 4096, 8192]
SHAPES: List[Tuple[int, int, int]] = (
    [(s, s, s) for s in SQUARES]
    + [(1, 4096, 4096), (16, 4096, 4096), (1, 8192, 8192), (16, 8192, 8192),
       (64, 4096, 4096)]                                    # small M (decode-like)
    + [(1000, 1000, 1000), (4095, 4097, 4093), (4096, 4096, 4100), (33, 4097, 4095),
       (8191, 8191, 8191)]                                  # unaligned
    + [(8192, 4096, 14336), (8192, 14336, 4096), (4096, 1024, 4096)]  # LLM-like rectangles
)
QUICK_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1000, 1000, 1000), (4095, 4097, 4093),
                (4096, 4096, 4096), (8192, 8192, 8192)]
SAMPLE_ROWS = 8
GLUON_MIN_M = 128  # gemm_sm90.MIN_M (not imported here: the suite loads without Triton)


def _triton_ops():
    from ... import backends
    try:
        return backends.get_backend("triton").OPS
    except ValueError as e:
        raise ProviderUnavailable(str(e)) from None


def make_inputs(m: int, n: int, k: int, device: str):
    def inputs(i):
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        bias = torch.randint(-2 ** 16, 2 ** 16, (n,), dtype=torch.int32)
        w_scale = (torch.rand(n, dtype=torch.float64) * 0.9 + 0.1) * 0.01
        # a random accumulator (std ~ 74 * 73 * sqrt(k)) lands around +-60 output steps
        out_scale = 0.02 * float(w_scale.median()) * 74.0 * 73.0 * k ** 0.5 / 60.0
        rq = make_requant(0.02, w_scale, out_scale, 0, qint8)
        return {"x": x.to(device), "w": w.to(device), "bias": bias.to(device), "rq": rq}
    return inputs


def _check_requant(inp, out):
    from ... import backends
    m = inp["x"].shape[0]
    idx = sample_rows(m, SAMPLE_ROWS)
    x = inp["x"][idx.to(inp["x"].device)].cpu()
    want = backends.get_backend("numpy").OPS["linear"](x, 0, inp["w"].cpu(), inp["bias"].cpu(),
                                                       inp["rq"])
    return exact_rows(out, want, idx, m)


def _exact_int32(inp, idx, with_bias):
    x = inp["x"][idx.to(inp["x"].device)].cpu().numpy().astype(np.int64)
    acc = x @ inp["w"].cpu().numpy().astype(np.int64).T
    if with_bias:
        acc = acc + inp["bias"].cpu().numpy().astype(np.int64)
    return acc


def _check_int32(inp, out, with_bias):
    """The int32 (m, n) output's sampled rows against the exact int64 product."""
    m, n = inp["x"].shape[0], inp["w"].shape[0]
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.int32
            and tuple(out.shape) == (m, n)):
        return False
    idx = sample_rows(m, SAMPLE_ROWS)
    got = out[idx.to(out.device)].cpu().numpy().astype(np.int64)
    return bool(np.array_equal(got, _exact_int32(inp, idx, with_bias)))


def _check_bare(inp, out):
    return _check_int32(inp, out, True)


def _check_int_mm(inp, out):
    return _check_int32(inp, out, False)


def _on_path(fn, gluon: bool = False):
    """``fn`` with the sm_90 Gluon main loop switched on (``gluon``) or off, whatever
    GPUQUANT_SM90_GEMM says: the ``gpuquant-triton*`` rows are the Triton kernel's."""
    from ...backends.triton import gemm_sm90

    def run():
        with gemm_sm90.use(gluon):
            return fn()
    return run


def _triton_requant(inp):
    op = _triton_ops()["linear"]
    x, w, b, rq = inp["x"], inp["w"], inp["bias"], inp["rq"]
    return _on_path(lambda: op(x, 0, w, b, rq))


def _triton_bare(inp, gluon: bool = False):
    """The bare int32 GEMM; ``gluon``: on the sm_90 Gluon main loop (tuned per shape),
    unavailable off sm_90."""
    op = _triton_ops()["linear_int32"]
    x, w, b = inp["x"], inp["w"], inp["bias"]
    if gluon:
        from ...backends.triton import gemm_sm90
        why = gemm_sm90.unavailable(x.device)
        if why is not None:
            raise ProviderUnavailable(why)
    return _on_path(lambda: op(x, 0, w, b), gluon)


def _gluon_bare(inp):
    return _triton_bare(inp, gluon=True)


def _int_mm(inp):
    x, w = inp["x"], inp["w"]
    m, k = x.shape
    n = w.shape[0]
    if m <= 16 or k % 8 or n % 8:
        raise ProviderUnavailable(f"torch._int_mm refuses m={m}, n={n}, k={k} (needs m > 16, "
                                  f"k and n multiples of 8)")
    wt = w.t()  # (k, n), column-major: the layout cuBLASLt's int8 kernels take
    return lambda: torch._int_mm(x, wt)


def _bf16(inp):
    xb, wb = inp["x"].to(torch.bfloat16), inp["w"].to(torch.bfloat16)
    return lambda: xb @ wb.t()


def _cupy_providers() -> Dict[str, Provider]:
    from ...backends.cupy.bench import tier_providers
    return tier_providers("linear", check=_check_requant,
                          args_of=lambda inp: (inp["x"], 0, inp["w"], inp["bias"], inp["rq"]))


def _throughput(p, ms):
    return 2.0 * p["m"] * p["n"] * p["k"] / (ms * 1e-3) / 1e12, "TOPS"


def make_case(m: int, n: int, k: int, device: str) -> Case:
    """One GEMM case with every provider (``device``: where the tensors live)."""
    providers = {"gpuquant-triton": Provider(_triton_requant, _check_requant),
                 "gpuquant-triton-bare": Provider(_triton_bare, _check_bare),
                 "torch-int-mm": Provider(_int_mm, _check_int_mm),
                 "torch-bf16": Provider(_bf16, unit="TFLOPS"), **_cupy_providers()}
    if m >= GLUON_MIN_M:
        providers["gpuquant-triton-gluon-bare"] = Provider(_gluon_bare, _check_bare)
    return Case(params={"m": m, "n": n, "k": k}, inputs=make_inputs(m, n, k, device),
                providers=providers, throughput=_throughput)


def _cases(quick: bool, device: str) -> List[Case]:
    return [make_case(m, n, k, device) for m, n, k in (QUICK_SHAPES if quick else SHAPES)]


SUITE = Suite(name="gemm", baseline="torch-int-mm", cases=_cases, device="cuda", x_param="m",
              description="int8 GEMM: Triton (requantizing epilogue / bare int32) vs "
                          "torch._int_mm and bf16, TOPS")


def shape_classes() -> Dict[str, List[Tuple[int, int, int]]]:
    """The shapes grouped as the issue names them (for the report and the tests)."""
    return {"small_m": [s for s in SHAPES if s[0] <= 16],
            "unaligned": [s for s in SHAPES if s[1] % 8 or s[2] % 8],
            "large": [s for s in SHAPES if min(s) >= 4096]}
