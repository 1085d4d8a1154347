"""The machine's own limits, measured in the same run as the suites.

GPU: device copy bandwidth (``Tensor.copy_`` of a large buffer, bytes read + written),
int8 matrix peak (``torch._int_mm``, cuBLASLt, int32 accumulation) and bf16 matrix peak
(``torch.matmul``). CPU: memory copy bandwidth and float32 GEMM (``torch.matmul``, MKL /
OpenBLAS), the CPU's best vendor matrix path.

A ceiling's value is the throughput at the 20th-percentile time of its repeats (a peak,
less sensitive to a busy moment than the median). Each ceiling is
``{"value": float, "unit": str, "what": str}`` and applies to the
throughput units of its *kind* (see :data:`KIND_OF_UNIT`): a row's fraction of the ceiling
is its throughput divided by the ceiling of its unit's kind, after unit scaling. The
ceilings go into each results file's header, so the fraction can be recomputed from the
JSON alone (``readme_table`` does).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from .harness import Case, RunConfig, run_case

__all__ = ["measure_ceilings", "fraction_of_ceiling", "KIND_OF_UNIT", "UNIT_SCALE"]

#: throughput unit -> kind of ceiling it is compared with
KIND_OF_UNIT = {"GB/s": "bandwidth", "TB/s": "bandwidth",
                "GOPS": "int8", "TOPS": "int8",
                "GFLOPS": "float", "TFLOPS": "float"}
#: throughput unit -> its size in base units per second
UNIT_SCALE = {"GB/s": 1e9, "TB/s": 1e12, "GOPS": 1e9, "TOPS": 1e12, "GFLOPS": 1e9, "TFLOPS": 1e12}


def _copy_case(device: str, nbytes: int) -> Case:
    n = nbytes // 4

    def inputs(i):
        return torch.empty(n, dtype=torch.float32, device=device).uniform_(), \
            torch.empty(n, dtype=torch.float32, device=device)

    def setup(inp):
        src, dst = inp
        return lambda: dst.copy_(src)

    return Case({"bytes": n * 4}, inputs, {"copy": setup},
                lambda p, ms: (2 * p["bytes"] / (ms * 1e-3) / 1e9, "GB/s"))


def _mm_case(device: str, size: int, dtype: torch.dtype, provider: str, unit: str) -> Case:
    scale = 1e12 if unit.startswith("T") else 1e9

    def inputs(i):
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device)
            # cuBLASLt int8 wants the second operand column-major ("TN")
            b = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device).t()
            return a, b
        return (torch.randn(size, size, dtype=dtype, device=device),
                torch.randn(size, size, dtype=dtype, device=device))

    def setup(inp):
        a, b = inp
        if dtype == torch.int8:
            return lambda: torch._int_mm(a, b)
        return lambda: torch.matmul(a, b)

    return Case({"m": size, "n": size, "k": size}, inputs, {provider: setup},
                lambda p, ms: (2 * p["m"] * p["n"] * p["k"] / (ms * 1e-3) / scale, unit))


def measure_ceilings(device: str, quick: bool = False) -> Dict[str, Dict[str, Any]]:
    """Measure the ceilings of ``device`` (``"cpu"`` or ``"cuda"``): kind -> ceiling.

    Returns e.g. ``{"bandwidth": {"value": 3021.4, "unit": "GB/s", "what": "copy 1 GiB"},
    "int8": {...TOPS...}, "float": {...TFLOPS...}}`` on the GPU; on the CPU ``bandwidth``
    and ``float`` (float32 GEMM, which also serves as the CPU's ``int8`` ceiling: no vendor
    int8 GEMM is reachable from torch on the CPU).
    """
    cfg = RunConfig.for_run(quick, device)
    cfg.max_input_sets = 1
    out: Dict[str, Dict[str, Any]] = {}

    def one(kind, case, what):
        res = run_case("ceilings", case, device, cfg)
        if res.errors or not res.rows:
            raise RuntimeError(f"measuring the {kind} ceiling on {device} failed: {res.errors}")
        row = res.rows[0]
        # a peak: the throughput at the 20th-percentile time (the median would let a busy
        # moment of a shared machine lower the ceiling every row is compared with)
        value, unit = case.throughput(dict(case.params), row["p20_ms"])
        out[kind] = {"value": float(value), "unit": unit, "what": what}

    if device == "cuda":
        # full sizes even when quick (a GPU measures them in milliseconds): 4096^3 runs
        # below the 8192^3 peak, which overstated every "of ceiling" of a quick run
        cfg.budget_s = 0.05 if quick else 0.3
        nbytes = 1 << 30
        one("bandwidth", _copy_case(device, nbytes), f"device copy of {nbytes >> 20} MiB")
        size = 8192
        one("int8", _mm_case(device, size, torch.int8, "torch-int-mm", "TOPS"),
            f"torch._int_mm int8 {size}^3")
        one("float", _mm_case(device, size, torch.bfloat16, "torch-bf16", "TFLOPS"),
            f"torch.matmul bf16 {size}^3")
    elif device == "cpu":
        cfg.budget_s = 0.1 if quick else 0.5
        nbytes = 1 << (26 if quick else 28)
        one("bandwidth", _copy_case(device, nbytes), f"memory copy of {nbytes >> 20} MiB")
        size = 512 if quick else 1024
        one("float", _mm_case(device, size, torch.float32, "torch", "GFLOPS"),
            f"torch.matmul float32 {size}^3")
        out["int8"] = dict(out["float"], what=out["float"]["what"] + " (CPU: float32 GEMM peak)")
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return out


def fraction_of_ceiling(throughput: Optional[float], unit: str,
                        ceilings: Optional[Mapping[str, Mapping[str, Any]]]) -> Optional[float]:
    """``throughput`` (in ``unit``) as a fraction of the ceiling of that unit's kind, or None
    where no ceiling applies (e.g. ``images/s``) or none was measured."""
    if throughput is None or not ceilings:
        return None
    kind = KIND_OF_UNIT.get(unit)
    if kind is None or kind not in ceilings:
        return None
    c = ceilings[kind]
    if c.get("unit") not in UNIT_SCALE or not c.get("value"):
        return None
    return throughput * UNIT_SCALE[unit] / (c["value"] * UNIT_SCALE[c["unit"]])
