"""The measuring core: suites, cases, providers, timers, interleaved repeats, input rotation.

Nothing here knows about any particular op; suites (``gpuquant/bench/suites/*.py``) describe
what to run with :class:`Suite`, :class:`Case` and :class:`Provider`, and
:func:`run_case` turns a case into result rows (contract section 3).

How a case is measured (:func:`run_case`):

1. ``case.inputs(i)`` builds input set ``i`` (fresh random data, the torch seed set per set);
   as many sets are built as fit a memory budget (up to 8, 4 with ``quick``), so that timed
   calls cycle through inputs and caches do not flatter small sizes. On the GPU the L2
   cache is also flushed before every timed call, as ``triton.testing.do_bench`` does.
2. Each provider's ``setup(inputs)`` runs once per set (untimed: packing, conversion) and
   returns the zero-argument callable that is timed. Its first call on every set is an
   untimed warm-up (compilation, weights packed on first use); the output of the one on
   set 0 goes to the provider's ``check`` for ``exact_vs_numpy``.
3. Then 2-3 timed calls estimate each provider's time; the repeat count fills a time budget
   (0.2 s a provider with ``quick`` on the CPU, 1 s otherwise; 0.1 s / 0.5 s on the GPU),
   at least 5 calls (more where the suite asks: ``Suite.min_reps``); a GPU head start
   (``Suite.gpu_head_start_ms``) counts in each call's share of that budget.
4. Timed calls are interleaved: the repeats are split into rounds (up to 100 on the CPU,
   10 on the GPU), each round runs every provider in turn (the order rotating from round
   to round), so drift in clocks or machine load hits all providers alike. On the GPU the
   events are read once at the end, so launches run ahead of the device as in ``do_bench``.
5. Median, 20th and 80th percentile of the per-call times, in milliseconds; the case's
   ``throughput(params, ms)`` turns the median into the unit users quote.

Failures: a provider that raises (in setup, its warm-up, its check or a timed call) is
recorded in the case's ``errors`` and left out of the rest of the case; the others keep
their rows. After a CUDA out-of-memory error what the failed call held is given back first
(:func:`error_text`). An exception building the case's inputs propagates: the caller
(``gpuquant bench``) records it for the case and goes on with the next one.

Timers: ``time.perf_counter`` around each call on the CPU; CUDA events around each call on
the GPU, read once after the last round (the launches run ahead of the device, as in
``do_bench``, so the events time the kernels). We time with our own events rather than
``triton.testing.do_bench`` because ``do_bench`` measures one function at a time and so
cannot interleave providers; the method is the same (events per call, L2 flush, median and
quantiles).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import platform
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Suite", "Case", "Provider", "ProviderUnavailable", "Timing", "RunConfig", "run_case",
           "CaseResult", "error_text", "params_key", "pair_rows", "device_name", "device_slug",
           "ROW_FIELDS", "HEADER_FIELDS", "percentile", "cuda_graph_of", "sample_rows", "exact",
           "exact_rows"]

#: The keys of every result row, in order (contract section 3).
ROW_FIELDS = ("suite", "case", "provider", "params", "median_ms", "p20_ms", "p80_ms",
              "throughput", "unit", "exact_vs_numpy")
#: The keys every results file starts with (contract section 3); gpuquant adds ``triton_tune``,
#: ``host``, ``suite``, ``baseline``, ``quick``, ``ceilings``, ``errors`` and ``unavailable``
#: after them (the contract names the keys every file has, not a closed set;
#: :func:`gpuquant.bench.run_bench` says what each added one holds).
HEADER_FIELDS = ("device", "torch", "triton", "cupy", "gpuquant", "date", "command")

_PARAM_TYPES = (bool, int, float, str)


class ProviderUnavailable(Exception):
    """Raised by a provider's ``setup`` when it cannot run here (a missing package, an op a
    backend does not implement yet). The harness reports it once and leaves the provider out;
    it is not an error. Anything else a provider raises is an error."""


@dataclass
class Provider:
    """One implementation of a case's work.

    Attributes:
        setup: ``setup(inputs) -> run``: untimed preparation for one input set; returns the
            zero-argument callable that is timed. Raise :class:`ProviderUnavailable` if the
            provider cannot run here.
        check: optional ``check(inputs, output) -> True | False | None``, called with set 0's
            inputs and ``run()``'s return value; True/False say whether the output equals the
            NumPy oracle bit for bit (``exact_vs_numpy``), None that the question does not
            apply. Without ``check`` the row records None. Compare with :func:`exact` /
            :func:`exact_rows` (dtype and shape too), and look past the first image: an
            error in the last tile of a kernel shows only there (:func:`sample_rows`).
        unit: optional unit of this provider's rows in place of the case's (same value):
            a bf16 provider in an int8 suite says ``"TFLOPS"``, so its fraction of the
            ceiling is taken against the float ceiling, not the int8 one.
    """

    setup: Callable[[Any], Callable[[], Any]]
    check: Optional[Callable[[Any, Any], Optional[bool]]] = None
    unit: Optional[str] = None


@dataclass
class Case:
    """One point of a suite: fixed params, several providers doing the same work.

    Attributes:
        params: the case's numbers and names as separate JSON scalars, e.g.
            ``{"m": 4096, "n": 4096, "k": 4096}``; rows of different providers pair up by
            equal params.
        inputs: ``inputs(i) -> input set``: builds the ``i``-th fresh random input set (any
            object: a tuple or dict of tensors). The harness seeds torch before each call.
        providers: name -> :class:`Provider` (or a bare ``setup`` callable). Names follow the
            contract: ``gpuquant-<backend>``, ``torch``, ``torch-int-mm``, ``numpy-float32``...
        throughput: ``throughput(params, median_ms) -> (value, unit)``, the unit users quote
            (``GB/s`` elementwise, ``TOPS`` int8 GEMM/conv, ``TFLOPS`` float, ``images/s``).
            A unit with a measured ceiling (see :mod:`gpuquant.bench.ceilings`) gets a
            fraction-of-ceiling column.
        name: the row's ``case`` label; default ``k=v`` pairs of the params.
    """

    params: Dict[str, Any]
    inputs: Callable[[int], Any]
    providers: Mapping[str, Union[Provider, Callable[[Any], Callable[[], Any]]]]
    throughput: Callable[[Dict[str, Any], float], Tuple[float, str]]
    name: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.params, dict) or not self.params:
            raise TypeError(f"Case.params must be a non-empty dict, got {self.params!r}")
        for k, v in self.params.items():
            if not isinstance(k, str) or not isinstance(v, _PARAM_TYPES):
                raise TypeError(f"Case.params must map str to bool/int/float/str (JSON scalars); "
                                f"got {k!r}: {v!r}")
        if not self.providers:
            raise ValueError(f"Case {self.params} has no providers")
        self.providers = {n: p if isinstance(p, Provider) else Provider(p)
                          for n, p in self.providers.items()}
        for n, p in self.providers.items():
            if not isinstance(n, str) or not n:
                raise TypeError(f"provider names must be non-empty strings, got {n!r}")
            if not callable(p.setup):
                raise TypeError(f"provider {n!r}: setup must be callable, got {p.setup!r}")
        if self.name is None:
            self.name = " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Suite:
    """A named list of cases with a baseline provider.

    Attributes:
        name: the suite's name (``gpuquant bench NAME``).
        baseline: the provider every ratio is taken against (what a user would pick
            instead, e.g. ``torch`` or ``torch-int-mm``).
        cases: ``cases(quick, device) -> list[Case]``; ``device`` is ``"cpu"`` or
            ``"cuda"``, ``quick`` asks for small sizes (all CPU suites together under
            2 minutes on 2 cores).
        device: ``"cuda"`` (needs a GPU: skipped on the CPU), ``"cpu"`` (always the CPU,
            e.g. the NumPy backend) or ``"any"`` (the GPU where there is one, else the CPU).
        x_param: the param plotted on the x axis (default: the numeric param with the most
            distinct values).
        description: one line for the report.
        min_reps: at least this many timed calls per provider and case (the harness's
            default, :attr:`RunConfig.min_reps`, is 5), for suites whose calls are slow enough
            that the time budget alone would give a handful (a 30 ms training step gets 5
            calls from the GPU's 0.1 s quick budget).
        gpu_head_start_ms: a GPU-side wait (``torch.cuda._sleep``) enqueued before each
            timed call's L2 flush, so a call whose host submission takes up to about this
            long is timed on the GPU's work alone whatever the provider before it left in
            the queue (a provider that synchronises the host drains it, and the next one's
            submission was timed: the fake_quant suite's per-channel rows, bench NOTES).
            Longer host times still show. Default 0: none.
    """

    name: str
    baseline: str
    cases: Callable[[bool, str], List[Case]]
    device: str = "cuda"
    x_param: Optional[str] = None
    description: str = ""
    min_reps: Optional[int] = None
    gpu_head_start_ms: float = 0.0

    def __post_init__(self):
        if self.device not in ("cuda", "cpu", "any"):
            raise ValueError(f"Suite {self.name!r}: device must be 'cuda', 'cpu' or 'any', "
                             f"got {self.device!r}")
        if not callable(self.cases):
            raise TypeError(f"Suite {self.name!r}: cases must be callable (quick, device) -> "
                            f"list[Case], got {self.cases!r}")
        if self.min_reps is not None and (not isinstance(self.min_reps, int)
                                          or self.min_reps < 1):
            raise ValueError(f"Suite {self.name!r}: min_reps must be a positive int, got "
                             f"{self.min_reps!r}")
        if (isinstance(self.gpu_head_start_ms, bool)
                or not isinstance(self.gpu_head_start_ms, (int, float))
                or not 0 <= self.gpu_head_start_ms <= 10):
            raise ValueError(f"Suite {self.name!r}: gpu_head_start_ms must be a number of ms "
                             f"in [0, 10], got {self.gpu_head_start_ms!r}")

    @property
    def needs_gpu(self) -> bool:
        return self.device == "cuda"

    def run_device(self, cuda_available: bool) -> Optional[str]:
        """The device this suite runs on here, or None if it needs a GPU and there is none."""
        if self.device == "cpu":
            return "cpu"
        if cuda_available:
            return "cuda"
        return None if self.device == "cuda" else "cpu"

    def run_config(self, quick: bool, device: str) -> "RunConfig":
        """:meth:`RunConfig.for_run` with this suite's ``min_reps``."""
        cfg = RunConfig.for_run(quick, device)
        if self.min_reps is not None:
            cfg.min_reps = max(cfg.min_reps, self.min_reps)
            cfg.max_reps = max(cfg.max_reps, cfg.min_reps)
        return cfg


# ---------------------------------------------------------------------------------- stats
def cuda_graph_of(fn: Callable[[], Any], warmup: int) -> Tuple[Any, Any]:
    """``(graph, outputs)``: ``fn`` captured in a CUDA graph after ``warmup`` eager calls on a
    side stream (autotuning and memoised parameters happen there, outside the capture);
    ``graph.replay()`` reruns its kernels into ``outputs``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-call times of one provider in one case, in milliseconds."""

    times_ms: List[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p20_ms(self) -> float:
        return percentile(self.times_ms, 0.2)

    @property
    def p80_ms(self) -> float:
        return percentile(self.times_ms, 0.8)


# ---------------------------------------------------------------------------------- timers
class _CpuTimer:
    """perf_counter around each call."""

    head_start_ms = 0.0  # (no GPU-side wait before a call)

    def time_call(self, fn: Callable[[], Any], sink: Timing) -> None:
        t0 = time.perf_counter()
        fn()
        sink.times_ms.append((time.perf_counter() - t0) * 1e3)

    def sync(self) -> None:
        pass


class _CudaTimer:
    """CUDA events around each call, L2 flushed before it; read at :meth:`sync`.

    ``event``, ``synchronize`` and ``flush`` default to the real CUDA ones; tests pass fakes
    to exercise the bookkeeping on the CPU. ``head_start_ms``: how long ``head_start``'s
    wait lasts on the GPU (untimed, but device time every call costs: :func:`run_case`
    counts it in the repeats' budget)."""

    def __init__(self, event=None, synchronize=None, flush=None, head_start=None,
                 head_start_ms: float = 0.0):
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or torch.cuda.synchronize
        self._head_start = head_start  # enqueues a GPU-side wait (Suite.gpu_head_start_ms)
        self.head_start_ms = float(head_start_ms) if head_start is not None else 0.0
        if flush is None:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            l2 = int(getattr(props, "L2_cache_size", 0) or 0)
            # twice the L2, at least 256 MB (as triton's do_bench), zeroed before each call
            buf = torch.empty(max(2 * l2, 256 * 2 ** 20), dtype=torch.int8, device="cuda")
            flush = buf.zero_
        self._flush = flush
        self._pending: List[Tuple[Any, Any, Timing]] = []

    def time_call(self, fn: Callable[[], Any], sink: Timing) -> None:
        if self._head_start is not None:
            self._head_start()
        self._flush()
        start, end = self._event(), self._event()
        start.record()
        fn()
        end.record()
        self._pending.append((start, end, sink))

    def sync(self) -> None:
        self._synchronize()
        for start, end, sink in self._pending:
            sink.times_ms.append(start.elapsed_time(end))
        self._pending.clear()


def _gpu_sleep(ms: float):
    """A callable enqueuing about ``ms`` of GPU-side spinning (``torch.cuda._sleep`` takes
    cycles: their rate is measured once here, with events)."""
    probe = 1 << 20
    torch.cuda._sleep(probe)  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    cycles = max(1, int(probe * ms / max(start.elapsed_time(end), 1e-6)))
    return lambda: torch.cuda._sleep(cycles)


def make_timer(device: str, gpu_head_start_ms: float = 0.0):
    if device == "cuda":
        return _CudaTimer(head_start=_gpu_sleep(gpu_head_start_ms) if gpu_head_start_ms > 0
                          else None, head_start_ms=gpu_head_start_ms)
    if device == "cpu":
        return _CpuTimer()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


# ---------------------------------------------------------------------------------- inputs
def _nbytes(obj) -> int:
    """Bytes of all tensors / arrays inside ``obj`` (nested tuples, lists, dicts; a module's
    parameters and buffers: ``linear_dynamic``'s input sets hold their weights in one)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(_nbytes(t) for t in (*obj.parameters(), *obj.buffers()))
    if hasattr(obj, "nbytes") and not isinstance(obj, (str, bytes)):
        try:
            return int(obj.nbytes)
        except (TypeError, ValueError):
            return 0
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _seed_for(params: Mapping[str, Any], i: int) -> int:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    return (int.from_bytes(h[:4], "little") + 7919 * i) % (2 ** 31)


@dataclass
class RunConfig:
    """Knobs of :func:`run_case` (the defaults are what ``gpuquant bench`` uses)."""

    budget_s: float = 1.0          # timed seconds per provider per case
    min_reps: int = 5
    max_reps: int = 5000
    rounds: int = 10               # interleaving rounds (CPU: fine-grained, see for_run)
    max_input_sets: int = 8
    input_bytes: int = 512 * 2 ** 20   # all input sets of a case together (memory cap)
    rotate_bytes: int = 64 * 2 ** 20   # stop adding sets once this much is in rotation

    def __post_init__(self):
        for k in ("min_reps", "max_reps", "rounds", "max_input_sets"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RunConfig: {k} must be an int >= 1, got {v!r}")
        if self.min_reps > self.max_reps:
            raise ValueError(f"RunConfig: min_reps ({self.min_reps}) > max_reps "
                             f"({self.max_reps})")
        if not (isinstance(self.budget_s, (int, float)) and self.budget_s >= 0):
            raise ValueError(f"RunConfig: budget_s must be a number >= 0, got "
                             f"{self.budget_s!r}")

    @classmethod
    def for_run(cls, quick: bool, device: str) -> "RunConfig":
        if device == "cuda":
            free = torch.cuda.mem_get_info()[0]
            return cls(budget_s=0.1 if quick else 0.5, max_input_sets=4 if quick else 8,
                       input_bytes=min(free // 4, 8 * 2 ** 30), rotate_bytes=256 * 2 ** 20)
        # 100 rounds: a load burst on a shared machine hits every provider's calls alike
        return cls(budget_s=0.2 if quick else 1.0, max_input_sets=4 if quick else 8,
                   input_bytes=(256 if quick else 1024) * 2 ** 20, rounds=100)


def _build_input_sets(case: Case, cfg: RunConfig) -> List[Any]:
    sets = []
    total = 0
    for i in range(cfg.max_input_sets):
        torch.manual_seed(_seed_for(case.params, i))
        s = case.inputs(i)
        sets.append(s)
        total += _nbytes(s)
        per = total / len(sets)
        if total >= cfg.rotate_bytes or total + per > cfg.input_bytes:
            break
    return sets


# ---------------------------------------------------------------------------------- exactness
def sample_rows(n: int, k: int = 8) -> torch.Tensor:
    """Indices along dim 0 an ``exact_vs_numpy`` check compares where the whole output would
    cost the CPU oracle too much: the first, the last and evenly spaced ones between (at
    most ``k``, at least 2 where ``n`` allows: the last image is where a kernel's partial
    tile goes wrong)."""
    return torch.unique(torch.linspace(0, n - 1, min(n, max(k, 2))).round().long())


def exact(got: Any, want: torch.Tensor) -> bool:
    """``got`` equals ``want`` bit for bit, with the same dtype and shape (``torch.equal``
    alone promotes: an int32 output equals its int8 oracle)."""
    return (isinstance(got, torch.Tensor) and got.dtype == want.dtype
            and got.shape == want.shape and bool(torch.equal(got.cpu(), want.cpu())))


def exact_rows(got: Any, want: torch.Tensor, rows: torch.Tensor, n: int) -> bool:
    """``got`` has ``n`` rows (dim 0) and its ``rows`` (:func:`sample_rows`) are ``want``,
    the oracle's output for those rows, as :func:`exact` says."""
    return (isinstance(got, torch.Tensor) and got.dim() > 0 and got.shape[0] == n
            and exact(got[rows.to(got.device)], want))


# ---------------------------------------------------------------------------------- run
@dataclass
class CaseResult:
    rows: List[Dict[str, Any]]
    unavailable: Dict[str, str]          # provider -> reason
    errors: Dict[str, str]               # provider -> "ExcType: message"


def error_text(e: BaseException) -> str:
    """``"ExcType: message"``, as errors are recorded. After a CUDA out-of-memory error it
    first gives back what it can, so that the providers and cases after it do not fail for
    want of memory: the failed call's finished frames are cleared (their tensors freed) and
    ``torch.cuda.empty_cache()`` returns the allocator's cached blocks. The caller drops its
    own references to the failed work before calling."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        torch.cuda.empty_cache()
    return f"{type(e).__name__}: {e}"


def _prepare(prov: Provider, sets: List[Any], timer) -> Tuple[List[Callable[[], Any]],
                                                               Optional[bool], Timing]:
    """A provider's untimed part: ``(timed callables one per set, exact_vs_numpy, repeat
    estimate)``."""
    fns = []
    exact_vs_numpy = None
    est = Timing()
    for j, inp in enumerate(sets):
        fn = prov.setup(inp)
        if not callable(fn):
            raise TypeError(f"setup returned {type(fn).__name__}, expected a callable")
        out = fn()  # first call on every set: warm-up (compilation, packed weights)
        if j == 0 and prov.check is not None:  # ... and the exactness check
            exact_vs_numpy = prov.check(inp, out)
            if exact_vs_numpy is not None and not isinstance(exact_vs_numpy, bool):
                raise TypeError(f"check returned {exact_vs_numpy!r}, expected True, False or "
                                f"None")
        del out
        fns.append(fn)
    # the repeat estimate from warm calls only: a first call that packs a weight or
    # compiles would inflate it, and fewer repeats mean fewer calls in a row per
    # round, each colder (on the CPU the same linear read 0.79x that way, 0.94x this way)
    for k in range(max(2, min(len(fns), 3))):
        timer.time_call(fns[(k + 1) % len(fns)], est)
    timer.sync()
    return fns, exact_vs_numpy, est


def run_case(suite_name: str, case: Case, device: str, cfg: RunConfig,
             timer=None) -> CaseResult:
    """Measure every provider of ``case`` on ``device``; returns its rows (contract section 3).

    A provider whose ``setup`` raises :class:`ProviderUnavailable` is left out (reported in
    ``unavailable``); any other exception in its setup, warm-up, check or timed calls is
    recorded in ``errors`` and the provider is left out (from the rounds still to run, if it
    failed there); the other providers keep running and get their rows. An exception from
    ``case.inputs`` propagates (no provider can run without inputs).
    """
    timer = timer or make_timer(device)
    sets = _build_input_sets(case, cfg)
    runs: Dict[str, List[Callable[[], Any]]] = {}
    exact_vs_numpy: Dict[str, Optional[bool]] = {}
    unavailable: Dict[str, str] = {}
    errors: Dict[str, str] = {}
    estimates: Dict[str, Timing] = {}
    for name, prov in case.providers.items():
        try:
            runs[name], exact_vs_numpy[name], estimates[name] = _prepare(prov, sets, timer)
        except ProviderUnavailable as e:
            unavailable[name] = str(e)
        except Exception as e:  # noqa: BLE001 - reported as an error row-less provider
            errors[name] = error_text(e)
    if device == "cuda":
        torch.cuda.synchronize()

    # the repeats that fill the budget, from the warm-up times; a GPU head start
    # (Suite.gpu_head_start_ms) is device time every timed call costs too, untimed: counted
    # here, or a 10 us call with a 0.3 ms head start ran 5000 times, 31x its budget
    reps: Dict[str, int] = {}
    timings: Dict[str, Timing] = {n: Timing() for n in runs}
    head_ms = float(getattr(timer, "head_start_ms", 0.0) or 0.0)
    for name, est in estimates.items():
        per_call_s = (max(statistics.median(est.times_ms), 1e-4) + head_ms) / 1e3
        reps[name] = int(min(cfg.max_reps, max(cfg.min_reps, cfg.budget_s / per_call_s)))

    n_rounds = max(1, min(cfg.rounds, min(reps.values()) if reps else 1))
    counters = {n: 0 for n in runs}
    # the garbage collector off while timing, as timeit does: a collection triggered by the
    # autograd objects of a fwd+bwd call otherwise lands in whichever call runs then (on an
    # H200 the fake_quant fwd+bwd rows had medians 2-10x their p20)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for r in range(n_rounds):
            live = list(runs)  # in the case's order, less the providers that failed
            if not live:
                break
            for name in live[r % len(live):] + live[:r % len(live)]:
                share = reps[name] * (r + 1) // n_rounds - reps[name] * r // n_rounds
                fns = runs[name]
                try:
                    for _ in range(share):
                        timer.time_call(fns[counters[name] % len(fns)], timings[name])
                        counters[name] += 1
                except Exception as e:  # noqa: BLE001 - recorded; the others go on
                    del runs[name], timings[name], fns
                    errors[name] = error_text(e)
        # one sync at the end: on the GPU the launches run ahead of the device (as in
        # do_bench), so the events time the kernels, not the host's launch latency
        timer.sync()
    finally:
        if gc_was_on:
            gc.enable()

    rows = []
    for name in runs:
        t = timings[name]
        med = t.median_ms
        value, unit = case.throughput(dict(case.params), med)
        unit = case.providers[name].unit or unit
        rows.append({"suite": suite_name, "case": case.name, "provider": name,
                     "params": dict(case.params), "median_ms": med, "p20_ms": t.p20_ms,
                     "p80_ms": t.p80_ms, "throughput": float(value), "unit": str(unit),
                     "exact_vs_numpy": exact_vs_numpy.get(name)})
    return CaseResult(rows, unavailable, errors)


# ---------------------------------------------------------------------------------- pairing
def params_key(params: Mapping[str, Any]) -> str:
    """A canonical, hashable form of a params dict (key order does not matter)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def pair_rows(rows: Sequence[Mapping[str, Any]]) -> List[Tuple[Dict[str, Any], Dict[str, Mapping[str, Any]]]]:
    """Group rows by (suite, params): ``[(params, {provider: row}), ...]`` in first-seen order.

    Rows of different providers pair up when their ``params`` are equal (the ``case`` label
    is not used). Two rows of the same provider with equal params raise ValueError.
    """
    groups: Dict[Tuple[str, str], Tuple[Dict[str, Any], Dict[str, Mapping[str, Any]]]] = {}
    for row in rows:
        key = (row["suite"], params_key(row["params"]))
        params, by_provider = groups.setdefault(key, (dict(row["params"]), {}))
        if row["provider"] in by_provider:
            raise ValueError(f"two rows of provider {row['provider']!r} with params "
                             f"{row['params']} in suite {row['suite']!r}")
        by_provider[row["provider"]] = row
    return list(groups.values())


# ---------------------------------------------------------------------------------- device
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """``torch.cuda.get_device_name()`` for ``"cuda"``, the CPU model for ``"cpu"``."""
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    if device == "cpu":
        return _cpu_model()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def device_slug(device: str, name: Optional[str] = None, machine: Optional[str] = None) -> str:
    """Folder name under ``bench/results/``: ``cpu-x86`` / ``cpu-arm`` for CPUs, the
    sanitised GPU name (``nvidia-h100-80gb-hbm3``) for GPUs."""
    if device == "cpu":
        m = (machine or platform.machine()).lower()
        if m in ("x86_64", "amd64", "i386", "i686", "x86"):
            return "cpu-x86"
        if m in ("aarch64", "arm64") or m.startswith("arm"):
            return "cpu-arm"
        return "cpu-" + (re.sub(r"[^a-z0-9]+", "-", m).strip("-") or "unknown")
    if device == "cuda":
        if name is None and not torch.cuda.is_available():  # (torch's AssertionError there)
            raise ValueError("device_slug('cuda'): no CUDA device here; pass name= (the GPU's "
                             "name) to get its folder without one")
        name = name if name is not None else device_name("cuda")
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
