"""``gpuquant bench``: providers side by side, JSON + markdown + PNG per suite.

Run ``gpuquant bench [SUITE ...] [--quick] [--out DIR]``: each suite writes
``DIR/<suite>.json`` (contract section 3), ``DIR/<suite>.md`` (ratios to the baseline
provider, fraction of the ceilings measured in the same run) and ``DIR/<suite>.png``.

Writing a suite
---------------
A suite is a module ``gpuquant/bench/suites/<name>.py`` defining ``SUITE``, plus one line
in ``gpuquant/bench/suites/__init__.py`` (``"<name>": ("gpuquant.bench.suites.<name>",
"cuda" | "cpu" | "any")``). A case has params (JSON scalars: rows pair up by them), a
function building one fresh random input set, and providers; a provider's ``setup(inputs)``
does the untimed preparation and returns the zero-argument callable that is timed::

    import torch
    from gpuquant.bench import Case, Provider, ProviderUnavailable, Suite

    def _cases(quick, device):
        cases = []
        for n in ([2 ** 16, 2 ** 20] if quick else [2 ** 16, 2 ** 20, 2 ** 24]):
            def inputs(i, n=n):                       # torch is seeded per set
                return torch.randn(n, device=device)

            def relu_torch(x):                        # untimed set-up ...
                return lambda: torch.relu(x)          # ... returns the timed call

            def relu_ours(x):
                try:
                    from gpuquant.backends.triton.relu import relu
                except ImportError as e:              # not here: left out, not an error
                    raise ProviderUnavailable(str(e))
                return lambda: relu(x)

            cases.append(Case(
                params={"op": "relu", "dtype": "float32", "numel": n},
                inputs=inputs,
                providers={"torch": relu_torch,
                           "gpuquant-triton": Provider(relu_ours,
                               check=lambda x, y: bool(torch.equal(y, torch.relu(x))))},
                throughput=lambda p, ms: (8 * p["numel"] / ms / 1e6, "GB/s")))
        return cases

    SUITE = Suite(name="relu", baseline="torch", cases=_cases, device="cuda")

Conventions: provider names as the contract gives them (``gpuquant-<backend>``, ``torch``,
``torch-int-mm``, ``torch-bf16``, ``numpy-float32``...); ``check(inputs, output)`` returns
True/False for ``exact_vs_numpy`` (output equal to the NumPy oracle on set 0, dtype and
shape included: ``harness.exact``; where the oracle is too slow for the whole output, on
sampled images that include the last: ``harness.sample_rows``, ``harness.exact_rows``) or
None; a suite of slow calls (a training step) raises ``Suite(min_reps=...)``;
throughput in ``GB/s`` (elementwise: bytes read + written), ``TOPS`` (int8 GEMM/conv,
2*m*n*k), ``TFLOPS`` (float), ``images/s`` (models): the first three get a
fraction-of-ceiling column. ``--quick`` sizes must keep every CPU-capable suite together
under 2 minutes on a 2-core machine. ``gpuquant/bench/suites/quant.py`` is a complete
example.
"""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .harness import (Case, Provider, ProviderUnavailable, Suite, device_name, device_slug,
                      error_text, make_timer, pair_rows, params_key, run_case)

__all__ = ["run_bench", "Suite", "Case", "Provider", "ProviderUnavailable", "pair_rows",
           "params_key", "device_name", "device_slug", "environment", "triton_tune"]


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional package: recorded as None
        return None


def triton_tune() -> Optional[str]:
    """The Triton kernels' autotune mode, ``GPUQUANT_TRITON_TUNE`` as they read it ("full"
    or "quick"; the variable's text if they would refuse it); None without Triton."""
    try:
        from ..backends.triton.common import tune_mode
    except ImportError:
        return None
    try:
        return tune_mode()
    except ValueError:
        return os.environ.get("GPUQUANT_TRITON_TUNE")


def environment(device: str, command: str) -> Dict[str, Any]:
    """The header of a results file (contract section 3, then gpuquant's own keys)."""
    from .. import __version__
    return {"device": device_name(device), "torch": torch.__version__,
            "triton": _version("triton"), "cupy": _version("cupy"), "gpuquant": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "triton_tune": triton_tune(),
            "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "python": platform.python_version(), "machine": platform.machine(),
                     # the BLAS / OpenMP pools NumPy and torch use (read at their import):
                     # CPU timings on a small machine depend on them
                     "thread_env": {v: os.environ.get(v) for v in _THREAD_VARS}}}


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _log(msg: str) -> None:
    print(msg, flush=True)


def parse_where(text: Optional[str]) -> Dict[str, List[str]]:
    """``"model=resnet50,batch=64|256"`` -> {"model": ["resnet50"], "batch": ["64", "256"]}
    (a case is kept when each named param's value, as a string, is one of the listed)."""
    where: Dict[str, List[str]] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, vals = part.partition("=")
        if not sep or not key.strip() or not vals.strip():
            raise ValueError(f"--where: expected NAME=VALUE[|VALUE...], got {part!r}")
        where.setdefault(key.strip(), []).extend(v.strip() for v in vals.split("|"))
    return where


class UsageError(ValueError):
    """A command line ``gpuquant bench`` cannot run (exit status 2), e.g. a ``--where`` param
    the suite lacks."""


def _select(suite: Suite, cases: List[Case], where: Dict[str, List[str]],
            skip: Sequence[str]) -> List[Case]:
    if where:
        names = set().union(*(c.params for c in cases)) if cases else set()
        unknown = sorted(set(where) - names)
        if unknown:
            raise UsageError(f"--where: suite {suite.name!r} has no param {unknown[0]!r}; its "
                             f"params: {sorted(names)}")
        kept = [c for c in cases
                if all(str(c.params.get(k)) in vs for k, vs in where.items())]
        if cases and not kept:  # (nothing to measure: the suite's files are left as they are)
            values = {k: sorted({str(c.params.get(k)) for c in cases}) for k in where}
            raise UsageError(f"--where: no case of suite {suite.name!r} matches; the values "
                             f"there: {values}")
        cases = kept
    for c in cases:
        for prov in skip:
            if prov != suite.baseline:
                c.providers.pop(prov, None)
    return cases


def _argument_problem(names, devices, skip, where, quick: bool, cuda: bool) -> Optional[str]:
    """Why ``skip`` names a provider none of the suites ``names`` has (a typo would run it),
    or ``where`` cannot apply to one of them (a param it lacks, no case matching), or None:
    checked before anything is measured. Reads only the case lists (inputs are built
    lazily)."""
    from . import suites as registry
    known, baselines = set(), {}
    for name in names:
        dev = {"cpu": "cpu", "cuda": "cuda", "any": "cuda" if cuda else "cpu"}[devices[name]]
        try:
            suite = registry.load_suite(name)
            cases = suite.cases(quick, dev)
        except Exception:  # noqa: BLE001 - the suite's own run reports it
            return None
        for c in cases:
            known |= set(c.providers) - {suite.baseline}
        baselines[suite.baseline] = name
        if where:
            try:
                _select(suite, cases, where, ())
            except UsageError as e:
                return str(e)
    base = sorted(s for s in set(skip) - known if s in baselines)
    if base:  # (skipped, it would be measured all the same: the ratios are against it)
        return (f"--skip: {base[0]!r} is suite {baselines[base[0]]!r}'s baseline, always "
                f"measured (the ratios are against it)")
    unknown = sorted(set(skip) - known - set(baselines))
    if skip and unknown:
        return (f"--skip: no suite run here has a provider {unknown[0]!r}; "
                f"providers: {sorted(known | set(baselines))}")
    return None


def _run_suite(suite: Suite, device: str, quick: bool, command: str,
               ceilings: Dict[str, Any], partial: Optional[str] = None,
               where: Optional[Dict[str, List[str]]] = None,
               skip: Sequence[str] = ()) -> Dict[str, Any]:
    """The suite's results document. A case whose inputs (or anything else outside its
    providers) raise is recorded in ``errors`` and left out; the next case runs."""
    cfg = suite.run_config(quick, device)
    cases = suite.cases(quick, device)
    if not isinstance(cases, list) or not all(isinstance(c, Case) for c in cases):
        raise TypeError(f"suite {suite.name!r}: cases() must return a list of Case")
    cases = _select(suite, cases, where or {}, skip)
    doc = environment(device, command)
    doc.update({"suite": suite.name, "baseline": suite.baseline, "quick": bool(quick),
                "ceilings": ceilings, "errors": [], "unavailable": {}, "rows": []})
    for i, case in enumerate(cases):
        try:
            res = run_case(suite.name, case, device, cfg,
                           timer=make_timer(device, suite.gpu_head_start_ms))
        except Exception as e:  # noqa: BLE001 - its inputs failed: recorded, next case
            _error(doc, f"{suite.name} [{case.name}]: {error_text(e)}")
        else:
            for prov, why in res.unavailable.items():
                if prov not in doc["unavailable"]:
                    doc["unavailable"][prov] = why
                    _log(f"  {suite.name}: provider {prov} unavailable here: {why}")
            for prov, err in res.errors.items():
                _error(doc, f"{suite.name} [{case.name}] {prov}: {err}")
            doc["rows"] += res.rows
            times = ", ".join(f"{r['provider']} {r['median_ms']:.4g} ms" for r in res.rows)
            _log(f"  [{suite.name} {i + 1}/{len(cases)}] {case.name}: {times}")
        if partial:  # the rows so far, in case the run is cut short (bench.lease)
            from .report import write_json
            write_json(dict(doc, partial=True), partial)
    return doc


def _error(doc: Dict[str, Any], line: str) -> None:
    doc["errors"].append(line)
    _log(f"  ERROR {line}")


def autotune_choices() -> List[str]:
    """One line per problem the Triton kernels were autotuned for in this process: kernel,
    autotune key (shape), the config chosen (tile, PIPE_TAPS for the conv, warps, stages)."""
    lines = []
    tri = "gpuquant.backends.triton."
    tables = [(m, t) for m, t in (("gemm", "_TUNED"), ("conv", "_TUNED"), ("depthwise", "_TUNED"),
                                   ("dynamic", "_WO_KERNELS"), ("gemm_sm90", "_TUNED"))
              if tri + m in sys.modules]  # only kernels this process imported
    for mod, table in tables:
        for fam, kern in getattr(sys.modules[tri + mod], table).items():
            for key, cfg in sorted(getattr(kern, "cache", {}).items(), key=str):
                lines.append(f"{mod} [{fam}] key={key}: {cfg}")
    return lines


def _write_autotune_choices(path: str) -> List[str]:
    lines = autotune_choices()
    if not lines:
        return []
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [path]


def run_bench(suites: Sequence[str] = (), quick: bool = False, out: str = "bench/results/local",
              command: str = "gpuquant bench", cuda_available: Optional[bool] = None,
              save_each_case: bool = False, where: Optional[str] = None,
              skip: Sequence[str] = ()) -> int:
    """Run benchmark suites and write ``out/<suite>.{json,md,png}``.

    Args:
        suites: suite names; empty runs every written suite (GPU ones skipped without a GPU).
        quick: small sizes and short time budgets.
        out: output folder (created).
        command: the command line recorded in the results.
        cuda_available: override GPU detection (None: ``torch.cuda.is_available()``).
        save_each_case: also write ``out/<suite>.partial.json`` after every case (removed
            once the suite's files are written), so a run cut short keeps what it measured.
        where: keep only the cases whose params match, e.g. ``"model=resnet50,batch=64|256"``
            (see :func:`parse_where`; a param the suite lacks is an error).
        skip: providers to leave out (never the baseline), e.g. ``["torch-bf16-compile"]``.

    Each ``<suite>.json`` holds, besides contract section 3's keys: ``triton_tune`` (the
    kernels' autotune mode, :func:`triton_tune`), ``host``, ``suite``, ``baseline``,
    ``quick``, ``ceilings``, ``errors`` (one line per failed provider or case) and
    ``unavailable`` (provider -> why it could not run here); the markdown's notes repeat
    the last three.

    Returns:
        0 when every suite ran clean; 1 when a provider, a case or a whole suite failed (the
        other suites still run) or an output differed from the NumPy oracle; 2 for an
        unknown or unwritten suite name, a ``--where`` a suite cannot apply or a ``--skip``
        no suite has (checked before anything is measured); 3 when every suite named needs
        a CUDA GPU and there is none (nothing measured).
    """
    from . import report, suites as registry
    from .ceilings import measure_ceilings

    if isinstance(suites, str):
        suites = [suites]
    try:
        where_map = parse_where(where)
    except ValueError as e:
        print(f"gpuquant bench: {e}", file=sys.stderr)
        return 2
    skip = [p.strip() for p in (skip.split(",") if isinstance(skip, str) else skip) if p.strip()]
    names = list(dict.fromkeys(suites)) if suites else registry.written()
    try:
        devices = {n: registry.suite_device(n) for n in names}
    except ValueError as e:
        print(f"gpuquant bench: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() if cuda_available is None else bool(cuda_available)
    from .._paths import out_problem
    why = out_problem(out)
    if why is None and (skip or where_map):
        why = _argument_problem(names, devices, skip, where_map, quick, cuda)
    if why is not None:  # before anything is measured
        print(f"gpuquant bench: {why}", file=sys.stderr)
        return 2
    if not suites:
        missing = [n for n in registry.registered() if n not in names]
        if missing:
            _log(f"suites not written yet: {', '.join(missing)}")
    t_start = time.perf_counter()
    ceilings: Dict[str, Dict[str, Any]] = {}
    docs = []
    failed = []
    for name in names:
        dev = {"cpu": "cpu", "cuda": "cuda" if cuda else None,
               "any": "cuda" if cuda else "cpu"}[devices[name]]
        if dev is None:
            _log(f"suite {name} needs a CUDA GPU: skipped")
            continue
        t0 = time.perf_counter()
        partial = None
        if save_each_case:
            os.makedirs(out, exist_ok=True)
            partial = os.path.join(out, f"{name}.partial.json")
        try:
            suite = registry.load_suite(name)
            if dev not in ceilings:
                _log(f"measuring ceilings on {dev} ...")
                ceilings[dev] = measure_ceilings(dev, quick=quick)
                for kind, c in ceilings[dev].items():
                    _log(f"  ceiling {kind}: {c['value']:.4g} {c['unit']} ({c['what']})")
            _log(f"suite {name} on {device_name(dev)} ({dev}), baseline {suite.baseline}")
            doc = _run_suite(suite, dev, quick, command, ceilings[dev], partial, where_map,
                             skip)
            paths = report.write_all(doc, out, x_param=suite.x_param)
        except UsageError as e:
            print(f"gpuquant bench: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - recorded; the next suite still runs
            failed.append(f"{name}: {error_text(e)}")
            _log(f"  ERROR suite {name} failed: {failed[-1]}")
            continue
        if dev == "cuda":
            paths += _write_autotune_choices(os.path.join(out, f"{name}.autotune.txt"))
        if partial and os.path.exists(partial):
            os.remove(partial)
        _log(f"suite {name}: {len(doc['rows'])} rows in {time.perf_counter() - t0:.1f} s -> "
             f"{', '.join(paths)}")
        docs.append(doc)
        inexact = [r for r in doc["rows"] if r["exact_vs_numpy"] is False]
        failed += doc["errors"] + [f"{name} [{r['case']}] {r['provider']}: output differs "
                                   f"from the NumPy oracle" for r in inexact]
    _log(f"\nsummary ({time.perf_counter() - t_start:.1f} s, results in {os.path.abspath(out)}):")
    for line in report.summary_lines(docs):
        _log(line)
    if not docs:
        _log("  no suite ran")
    if suites and not docs and not failed and not cuda:  # named, and all need a GPU
        _log("every suite named needs a CUDA GPU: nothing was measured (exit status 3)")
        return 3
    if failed:
        _log(f"\n{len(failed)} problem(s):")
        for f in failed:
            _log(f"  {f}")
        return 1
    return 0
