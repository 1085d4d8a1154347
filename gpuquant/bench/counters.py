"""Hardware counters of the conv suite's layers (Nsight Compute), for reading after a lease.

    python -m gpuquant.bench.counters --out DIR [--layers NAME,...] [--ncu PATH]

Why: the Triton int8 convolutions run at about cuDNN bf16's speed where the int8 tensor
cores have twice bf16's peak (bench/README.md NOTES), and event timings alone cannot say
whether a layer waits on L2, on the tensor cores, on issue or on latency. This runs the
``conv`` suite's layers (default: its quick ones) once each under ``ncu``, in one process:

* ``gpuquant-triton``: the config the autotuner chose for the layer;
* for a layer with a tap loop (3x3), the same tile in the pipelined form with its tiles
  copied the other way through the caches (``L1_CACHE`` flipped: 8-byte ``cp.async.ca``
  against 16-byte ``cp.async.cg``), labelled ``gpuquant-triton L1_CACHE=<value>``;
* ``torch-bf16``: cuDNN's channels_last bf16 convolution of the same layer.

Each kernel gets Nsight Compute's SpeedOfLight, MemoryWorkloadAnalysis, Occupancy,
LaunchStats, ComputeWorkloadAnalysis and WarpStateStats sections plus the bytes moved
through L1, L2 and DRAM, the tensor pipes' activity and the warp stall reasons where this
``ncu`` knows those metrics (``--query-metrics``). Autotuning and warm-up run outside the
profiled ranges (``--profile-from-start off``; each profiled call sits between
``cudaProfilerStart`` / ``Stop``), clocks are left alone (``--clock-control none``).
Writes ``DIR/counters.csv`` (ncu's own rows), ``DIR/counters.txt`` (a table: one line a
kernel, the metrics that explain a layer's time) and prints the table. Needs a CUDA GPU and
an ``ncu`` that can read the counters (exit 1 otherwise, with the reason).
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .._paths import out_problem

__all__ = ["main", "find_ncu", "parse_csv", "group_kernels", "summarize", "profile_calls",
           "triton_kernel_names"]

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats",
            "ComputeWorkloadAnalysis", "WarpStateStats")
# raw metrics asked for when this ncu knows them (names differ across versions and chips)
WANTED_METRICS = (
    "l1tex__t_bytes.sum", "lts__t_bytes.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "lts__t_sector_hit_rate.pct",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "sm__inst_executed_pipe_tensor_op_gmma.sum",
    *(f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in (
        "long_scoreboard", "barrier", "wait", "math_pipe_throttle", "mio_throttle",
        "lg_throttle", "short_scoreboard", "not_selected", "selected", "dispatch_stall",
        "no_instruction", "membar", "drain", "sleeping", "branch_resolving", "misc")),
)
# the table's columns: (heading, ncu metric name as the CSV's "Metric Name" gives it)
COLUMNS = (("us", "Duration"), ("SM%", "Compute (SM) Throughput"),
           ("mem%", "Memory Throughput"), ("L1%", "L1/TEX Cache Throughput"),
           ("L2%", "L2 Cache Throughput"), ("DRAM%", "DRAM Throughput"),
           ("L1hit%", "L1/TEX Hit Rate"), ("L2hit%", "L2 Hit Rate"),
           ("occ%", "Achieved Occupancy"), ("regs", "Registers Per Thread"),
           ("cyc/issue", "Warp Cycles Per Issued Instruction"),
           ("issue%", "Issue Slots Busy"),
           ("L1 MB", "l1tex__t_bytes.sum"), ("L2 MB", "lts__t_bytes.sum"),
           ("DRAM rd MB", "dram__bytes_read.sum"), ("DRAM wr MB", "dram__bytes_write.sum"),
           ("gmma%", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
           ("hmma%", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
           ("imma%", "sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
           ("tensor%", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed"),
           ("wgmma inst", "sm__inst_executed_pipe_tensor_op_gmma.sum"))
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
_CALLS_FILE = "counters-calls.json"


def find_ncu(explicit: Optional[str] = None) -> Optional[str]:
    """The ``ncu`` executable: ``explicit``, else the PATH's, else the newest under
    /opt/nvidia/nsight-compute or /usr/local/cuda*/bin; None when there is none."""
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")
                   + glob.glob("/usr/local/cuda*/bin/ncu"))
    return cands[-1] if cands else None


def triton_kernel_names() -> set:
    """The names of gpuquant's Triton kernels (what ncu calls their launches)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
        jitted: tuple = (JITFunction, InterpretedFunction)  # (TRITON_INTERPRET=1)
    except ImportError:  # pragma: no cover
        jitted = (JITFunction,)

    from ..backends import triton as pkg
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # noqa: BLE001 - a module that needs what this machine lacks
            continue
        for v in vars(mod).values():
            fn = v
            while fn is not None and not isinstance(fn, jitted):
                fn = getattr(fn, "fn", None)  # Autotuner / Heuristics wrappers
            if fn is not None:
                names.add(fn.fn.__name__)
    return names


# --------------------------------------------------------------------------- parsing
def parse_csv(text: str) -> List[dict]:
    """ncu's ``--csv`` details rows (one a metric of a kernel launch) -> one dict a launch,
    in launch order: {"id", "kernel", metric name -> (value, unit)}. Lines before the CSV
    header (ncu's own messages, the program's output) are skipped."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    launches: Dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not (row.get("ID") or "").isdigit() or row.get("Metric Name") is None:
            continue  # (a message line of ncu's between the rows)
        k = launches.setdefault(row["ID"], {"id": int(row["ID"]),
                                            "kernel": row.get("Kernel Name", "")})
        name, value = row["Metric Name"], (row.get("Metric Value", ""), row.get("Metric Unit", ""))
        # one name in two sections ("Memory Throughput": % of peak in SpeedOfLight, byte/s in
        # MemoryWorkloadAnalysis): the plain name keeps the percentage, the other its unit
        if name in k and k[name][1] != value[1]:
            if value[1] == "%":
                k[name], value = value, k[name]
            name = f"{name} [{value[1]}]"
        k[name] = value
    return sorted(launches.values(), key=lambda k: k["id"])


def _is_ours(kernel: str, ours: set) -> bool:
    return kernel.split("(")[0].strip() in ours


def group_kernels(launches: List[dict], calls: List[dict],
                  ours: set) -> List[Tuple[dict, List[dict]]]:
    """Pair the profiled launches with the calls that made them. ``calls`` (in order, from
    the profiled process) are {"label", "ours": bool}; consecutive calls alternate between
    gpuquant's kernels and others (the profiled process puts a separator call between two
    of the same kind), so each call is one maximal run of launches of its kind. Raises
    ValueError when the runs do not match the calls."""
    runs: List[List[dict]] = []
    for k in launches:
        kind = _is_ours(k["kernel"], ours)
        if runs and _is_ours(runs[-1][0]["kernel"], ours) == kind:
            runs[-1].append(k)
        else:
            runs.append([k])
    if len(runs) != len(calls) or any(_is_ours(r[0]["kernel"], ours) != c["ours"]
                                      for r, c in zip(runs, calls)):
        raise ValueError(f"{len(runs)} runs of kernels for {len(calls)} profiled calls: "
                         f"{[(r[0]['kernel'][:40], len(r)) for r in runs]}")
    return list(zip(calls, runs))


def _number(v: Tuple[str, str]) -> Optional[float]:
    """A metric's value in its column's unit: durations in us, byte counts in MB."""
    value, unit = v
    try:
        x = float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return None
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
             "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6,  # (ncu 2025's --print-units base)
             "byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}.get(unit, 1.0)
    return x * scale


def summarize(groups: List[Tuple[dict, List[dict]]]) -> List[str]:
    """The table: a line a kernel (its call's label, the kernel's name, the COLUMNS that
    were measured), then each kernel's three largest warp stall reasons."""
    groups = [(c, run) for c, run in groups if c["label"] != "separator"]
    present = [(h, m) for h, m in COLUMNS
               if any(m in k for _, run in groups for k in run)]
    head = ["call", "kernel"] + [h for h, _ in present]
    rows = [head]
    stalls = []
    for call, run in groups:
        for k in run:
            cells = [call["label"], k["kernel"].split("(")[0][:40]]
            for _, m in present:
                x = _number(k[m]) if m in k else None
                cells.append("-" if x is None else f"{x:.4g}")
            rows.append(cells)
            st = sorted(((_number(v) or 0.0, name[len(STALL_PREFIX):].split("_per_")[0])
                         for name, v in k.items() if name.startswith(STALL_PREFIX)),
                        reverse=True)[:3]
            if st:
                stalls.append(f"{call['label']} / {cells[1]}: "
                              + ", ".join(f"{n} {x:.2f}" for x, n in st))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    if stalls:
        lines += ["", "largest warp stall reasons (cycles a warp waits per issued "
                      "instruction, by reason):", *stalls]
    return lines


# --------------------------------------------------------------------------- profiled process
def other_copy_form(cfg, k: int):
    """For a layer with a tap loop (``k`` > 1), ``cfg``'s tile in the pipelined form with
    its tiles copied the other way through the caches (``L1_CACHE`` flipped); else None."""
    import triton
    if k <= 1:
        return None
    return triton.Config({**cfg.kwargs, "PIPE_TAPS": True,
                          "L1_CACHE": not cfg.kwargs.get("L1_CACHE", False)},
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _configs_for(kern, key_before: set):
    """The autotune cache entries the last call added: [(key, config)]."""
    return [(k, c) for k, c in kern.cache.items() if k not in key_before]


def profile_calls(layer_names: Sequence[str], device: str = "cuda", batch: Optional[int] = None,
                  profiler=None, sync=None) -> List[dict]:
    """The profiled process's work: for each layer, tune and warm it, then one call of each
    variant (module docstring) between ``profiler.start()`` / ``stop()`` (CUDA's by
    default), a separator call between two of gpuquant's. Returns the calls in order,
    {"label", "ours"} (what :func:`group_kernels` pairs with ncu's rows). ``device``,
    ``batch``, ``profiler`` and ``sync`` are the test's handles (the stand-in driver runs it
    on the CPU)."""
    import torch

    from .suites import conv as C
    from ..backends.triton import conv as tconv
    from ..backends.triton.launch import clear_plans

    profiler = torch.cuda.profiler if profiler is None else profiler
    sync = torch.cuda.synchronize if sync is None else sync
    specs = {s.name: s for s in C.distinct_convs()}
    kern = tconv._conv_kernel(tconv.arch_family(torch.device(device)))  # (the family the
    # conv launcher asks for: the stand-in driver sets it)
    calls: List[dict] = []
    sep_input = torch.ones(8, device=device)

    def one_profiled_call(fn) -> None:
        sync()
        profiler.start()
        fn()
        sync()
        profiler.stop()

    def profiled(label: str, ours: bool, fn) -> None:
        """One call of ``fn`` (after one unprofiled call) between profiler start / stop."""
        if ours and calls and calls[-1]["ours"]:  # two of ours in a row: a torch kernel
            one_profiled_call(lambda: sep_input.add_(1))  # between them (group_kernels)
            calls.append({"label": "separator", "ours": False})
        fn()
        one_profiled_call(fn)
        calls.append({"label": label, "ours": ours})

    for name in layer_names:
        spec = specs[name]
        L = C.make_inputs([spec], C.BATCH if batch is None else batch, device)(0)
        run = C._triton(L)
        before = set(kern.cache)
        run()
        run()  # tuned and warm
        sync()
        chosen = _configs_for(kern, before)
        profiled(f"{name} gpuquant-triton", True, run)
        for key, cfg in chosen:
            other = other_copy_form(cfg, spec.k)
            if other is None:
                continue
            kern.cache[key] = other
            clear_plans()  # (a launch plan holds the kernel of the config it met)
            try:
                run()  # compiled outside the profiled range
                profiled(f"{name} gpuquant-triton L1_CACHE={other.kwargs['L1_CACHE']}", True,
                         run)
            finally:
                kern.cache[key] = cfg
                clear_plans()
        profiled(f"{name} torch-bf16", False, C._bf16(L))
        print(f"[counters] {name}: chosen "
              f"{[str(c) for _, c in chosen] or 'im2col + GEMM (no conv config)'}", flush=True)
    return calls


def _inner(out: str, layer_names: Sequence[str]) -> int:
    """Runs under ncu: :func:`profile_calls`, the calls written for the driver."""
    calls = profile_calls(layer_names)
    with open(os.path.join(out, _CALLS_FILE), "w") as f:
        json.dump(calls, f)
    return 0


# --------------------------------------------------------------------------- driver
def _known_metrics(ncu: str) -> Optional[set]:
    """The metric base names this ncu lists for the GPU (None if it cannot say)."""
    try:
        r = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return {tok for line in r.stdout.splitlines() for tok in line.split()[:1]}


def ncu_command(ncu: str, out: str, layers: Sequence[str], metrics: Sequence[str]) -> List[str]:
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off",
           "--target-processes", "application-only", "--csv", "--print-units", "base",
           "--log-file", os.path.join(out, "counters.csv")]
    for s in SECTIONS:
        cmd += ["--section", s]
    if metrics:
        cmd += ["--metrics", ",".join(metrics)]
    return cmd + [sys.executable, "-m", "gpuquant.bench.counters", "--inner", "--out", out,
                  "--layers", ",".join(layers)]


def main(argv=None) -> int:
    from .suites import conv as C
    p = argparse.ArgumentParser(prog="python -m gpuquant.bench.counters",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default=",".join(C.QUICK_LAYERS),
                   help="comma-separated conv suite layer names (default: its quick ones)")
    p.add_argument("--ncu", default=None, help="the ncu executable (default: found)")
    p.add_argument("--reread", action="store_true",
                   help="no profiling: rewrite counters.txt from the counters.csv and "
                        "counters-calls.json already in --out (a lease's, after a change "
                        "to the table; needs no GPU)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = [s.name for s in C.distinct_convs()]
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    bad = [x for x in layers if x not in known]
    if bad or not layers:
        p.error(f"--layers: unknown {bad or args.layers!r}; known: {known}")
    why = out_problem(args.out)
    if why is not None:
        p.error(f"argument --out: {why}")
    os.makedirs(args.out, exist_ok=True)
    if args.inner:
        return _inner(args.out, layers)
    import torch
    report = os.path.join(args.out, "counters.txt")

    def fail(why: str) -> int:
        if not args.reread:  # (a reread leaves the lease's own report as it was)
            with open(report, "w") as f:
                f.write(f"counters: {why}\n")
        print(f"gpuquant.bench.counters: {why}", file=sys.stderr)
        return 1
    if args.reread:
        csv_path = os.path.join(args.out, "counters.csv")
        if not os.path.exists(csv_path):
            return fail(f"--reread: no {csv_path}")
        with open(csv_path) as f:
            launches = parse_csv(f.read())
        return _write_report(args.out, launches, report, fail, "(reread from counters.csv)")
    if not torch.cuda.is_available():
        return fail("needs a CUDA GPU")
    ncu = find_ncu(args.ncu)
    if ncu is None:
        where = args.ncu or "PATH, /opt/nvidia/nsight-compute, /usr/local/cuda*/bin"
        return fail(f"no ncu found ({where})")
    names = _known_metrics(ncu)
    metrics = [m for m in WANTED_METRICS if names is not None and m.split(".")[0] in names]
    cmd = ncu_command(ncu, args.out, layers, metrics)
    print("[counters] " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(args.out, "counters-ncu.log"), "w") as f:
        f.write(r.stdout + "\n--- stderr ---\n" + r.stderr)
    csv_path = os.path.join(args.out, "counters.csv")
    text = open(csv_path).read() if os.path.exists(csv_path) else ""
    launches = parse_csv(text)
    if r.returncode != 0 or not launches:
        tail = (r.stderr or r.stdout or text).strip().splitlines()[-5:]
        return fail(f"ncu exit {r.returncode}, {len(launches)} kernels profiled: "
                    + " | ".join(tail))
    return _write_report(args.out, launches, report, fail,
                         f"{ncu} (metrics asked beyond the sections: {len(metrics)} of "
                         f"{len(WANTED_METRICS)} known to this ncu)")


def _write_report(out: str, launches: List[dict], report: str, fail, how: str) -> int:
    """counters.txt from ncu's launches and the profiled calls (``out``'s
    counters-calls.json); ``fail(why)`` when they cannot be paired."""
    try:
        with open(os.path.join(out, _CALLS_FILE)) as f:
            calls = json.load(f)
    except (OSError, ValueError) as e:
        return fail(f"no profiled calls ({_CALLS_FILE}): {e}")
    try:
        groups = group_kernels(launches, calls, triton_kernel_names())
    except ValueError as e:
        return fail(str(e))
    lines = [f"# counters: {len(launches)} kernels, {how}", "",
             "us: kernel time under ncu (caches flushed before each kernel: slower than the "
             "suite's timings); %: of peak; MB: bytes through each level", "",
             *summarize(groups)]
    out_text = "\n".join(lines) + "\n"
    with open(report, "w") as f:
        f.write(out_text)
    print(out_text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
