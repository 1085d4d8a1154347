"""Suite ``linear_dynamic``: transformer Linears, W8A8 dynamic and int8 weight-only vs bf16.

Params ``m, n, k`` (tokens, out_features, in_features) at LLM shapes: ``m`` in 1, 16, 128,
2048 (decode to prefill), ``(n, k)`` the projections of 7B-class models: 4096 x 4096
(attention), 11008 x 4096 and 4096 x 11008 (LLaMA MLP up / down), 14336 x 4096 and
4096 x 14336 (Mistral MLP up / down). Activations bfloat16, bias present.

Providers (each times one Linear's forward, bf16 in, bf16 out):

* ``torch-bf16`` (baseline): ``torch.nn.functional.linear`` in bfloat16 (cuBLAS);
* ``gpuquant-triton``: :class:`gpuquant.nn.quantized.linear_dynamic.DynamicLinear` on the
  Triton backend: per-token quantize kernel, then the int8 GEMM with the row x column scale
  + bias epilogue writing bf16 (two launches, everything included);
* ``gpuquant-triton-gluon`` (rows with m >= 128): the same with its GEMM on the sm_90
  Gluon main loop (:mod:`gpuquant.backends.triton.gemm_sm90`, the int8 ``wgmma`` kept in
  flight; tuned per shape; unavailable off sm_90; ``gpuquant-triton`` runs the Triton
  kernel whatever ``GPUQUANT_SM90_GEMM`` says);
* ``gpuquant-triton-w8``: :class:`~gpuquant.nn.quantized.linear_dynamic.WeightOnlyLinear`
  (bf16 x int8 weights, float32 accumulation);
* ``torchao`` / ``torchao-w8``: torchao's int8 dynamic-activation / weight-only
  quantization of the same Linear (``quantize_``, eager: torchao's kernels are meant to be
  fused by ``torch.compile``, whose compile time per shape a lease cannot afford), when
  torchao is importable (on a GPU machine with no network: carried as a wheel, ``make
  wheels``, :mod:`gpuquant.bench.wheels`);
* decode rows (``m <= 16``) also: ``torch-bf16-graph``, ``gpuquant-triton-graph``,
  ``gpuquant-triton-w8-graph``, ``torchao-graph``, ``torchao-w8-graph`` (unavailable if
  torchao's call does not capture): the same call captured once in a CUDA graph (after warm-up
  calls: autotuning happens there) and replayed. A decode step's Linear is a few
  microseconds of GPU time, about what the host spends launching it, so the eager rows can
  measure the host; the graph rows (compared graph against graph) measure the kernels, as
  a serving engine that replays its decode step from a graph runs them.

Throughput: ``2 m n k`` operations per second for every provider (the rows compare
directly), labelled TFLOPS for the rows whose products run on the float tensor cores
(``torch-bf16`` and the weight-only ``*-w8`` rows, which convert the int8 weights to bf16
before the MMA: their fraction of the ceiling is of the bf16 peak) and TOPS for the W8A8
ones (int8 MMA, the int8 peak). ``exact_vs_numpy``: the W8A8 output on input set 0 against the same
module run by the NumPy backend on the CPU (bit-identical by contract); None for the float
paths (weight-only and bf16 accumulate in floating point, in the GPU's order).

Targets (issue 12), on H100 / H200: W8A8 >= 1.5x bf16 at m >= 2048; weight-only >= 1.5x
bf16 at m <= 16.
"""
from __future__ import annotations

import copy

import torch

from ... import backends
from ..harness import Case, Provider, ProviderUnavailable, Suite, cuda_graph_of, exact

_GRAPH_MAX_M = 16  # decode rows: graph-replayed providers too
_NK = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
_M = (1, 16, 128, 2048)
QUICK_NK = _NK[:3]  # --quick's (n, k), also the GPU probe's and linear_prefill's
PREFILL_M = _M[-1]  # the prefill rows' tokens
GLUON_MIN_M = 128  # gemm_sm90.MIN_M (not imported here: the suite loads without Triton)


def _make_inputs(m: int, n: int, k: int, device: str):
    def inputs(i):
        lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        return {"x": x, "lin": lin}
    return inputs


def _torch_bf16():
    def setup(inp):
        x, w, b = inp["x"], inp["lin"].weight.detach(), inp["lin"].bias.detach()
        return lambda: torch.nn.functional.linear(x, w, b)
    return Provider(setup, unit="TFLOPS")  # (its fraction: of the bf16 ceiling)


def _gpuquant(weight_only: bool, gluon: bool = False):
    """``gluon``: W8A8 with the sm_90 Gluon main loop switched on for its GEMM
    (``gpuquant-triton-gluon``; unavailable off sm_90); off, the Triton kernel."""
    from ...nn.quantized.linear_dynamic import DynamicLinear, WeightOnlyLinear

    def setup(inp):
        if "triton" not in backends.available():
            raise ProviderUnavailable("the Triton backend cannot run here")
        from ...backends.triton import gemm_sm90
        x = inp["x"]
        if gluon:  # (its rows are the cases with m >= GLUON_MIN_M)
            why = gemm_sm90.unavailable(x.device)
            if why is not None:
                raise ProviderUnavailable(why)
        cls = WeightOnlyLinear if weight_only else DynamicLinear
        mod = cls.from_float_module(inp["lin"]).eval()
        inp.setdefault("modules", {})[weight_only] = mod

        def run():
            with backends.use("triton"), torch.no_grad(), gemm_sm90.use(gluon):
                return mod(x)
        return run

    def check(inp, out):
        if weight_only:
            return None
        mod = copy.deepcopy(inp["modules"][False]).to("cpu")
        with backends.use("numpy"), torch.no_grad():
            ref = mod(inp["x"].cpu())
        return exact(out, ref)
    # weight-only: bf16 activations times the weights converted to bf16 (float tensor
    # cores): its fraction of the ceiling is of the bf16 peak, not the int8 one
    return Provider(setup, check=check, unit="TFLOPS" if weight_only else None)


def _graphed(provider: Provider, foreign: bool = False) -> Provider:
    """``provider``'s call captured in a CUDA graph (after 3 warm-up calls on a side stream)
    and replayed; its output check, if any, reads the graph's output. ``foreign`` (another
    library's op): a capture that fails makes the row unavailable, with the reason, instead
    of an error of the run (ours must capture: a failure of theirs is theirs)."""
    def setup(inp):
        if inp["x"].device.type != "cuda":
            raise ProviderUnavailable("CUDA graphs need a CUDA device")
        fn = provider.setup(inp)
        try:
            graph, out = cuda_graph_of(fn, warmup=3)
        except RuntimeError as e:
            if not foreign:
                raise
            raise ProviderUnavailable(f"does not capture in a CUDA graph "
                                      f"({str(e).splitlines()[0][:200]})") from None

        def run():
            graph.replay()
            return out
        return run
    return Provider(setup, check=provider.check, unit=provider.unit)


def _torchao(weight_only: bool):
    def setup(inp):
        try:
            from torchao import quantization as tq
        except ImportError as e:
            raise ProviderUnavailable(f"torchao is not installed ({e})") from None
        names = (("Int8WeightOnlyConfig", "int8_weight_only") if weight_only else
                 ("Int8DynamicActivationInt8WeightConfig", "int8_dynamic_activation_int8_weight"))
        make = next((getattr(tq, nm) for nm in names if hasattr(tq, nm)), None)
        if make is None:
            raise ProviderUnavailable(f"this torchao has none of {names}")
        model = torch.nn.Sequential(copy.deepcopy(inp["lin"]))
        tq.quantize_(model, make())
        x = inp["x"]

        def run():
            with torch.no_grad():
                return model(x)
        return run
    return Provider(setup, unit="TFLOPS" if weight_only else None)  # (as _gpuquant's)


def _cases(quick: bool, device: str):
    nk = QUICK_NK if quick else _NK
    ms = (1, PREFILL_M) if quick else _M
    cases = []
    for n, k in nk:
        for m in ms:
            providers = {"torch-bf16": _torch_bf16(), "gpuquant-triton": _gpuquant(False),
                         "gpuquant-triton-w8": _gpuquant(True), "torchao": _torchao(False),
                         "torchao-w8": _torchao(True)}
            if m >= GLUON_MIN_M:
                providers["gpuquant-triton-gluon"] = _gpuquant(False, gluon=True)
            if m <= _GRAPH_MAX_M:
                providers.update({f"{name}-graph": _graphed(providers[name],
                                                            name.startswith("torchao"))
                                  for name in ("torch-bf16", "gpuquant-triton",
                                               "gpuquant-triton-w8", "torchao",
                                               "torchao-w8")})
            cases.append(Case(
                params={"m": m, "n": n, "k": k, "dtype": "bfloat16"},
                inputs=_make_inputs(m, n, k, device),
                providers=providers,
                throughput=lambda p, ms_: (2 * p["m"] * p["n"] * p["k"] / (ms_ * 1e-3) / 1e12,
                                           "TOPS")))
    return cases


SUITE = Suite(name="linear_dynamic", baseline="torch-bf16", cases=_cases, device="cuda",
              x_param="m",
              description="transformer Linear: W8A8 dynamic and int8 weight-only (Triton) vs "
                          "bf16 cuBLAS and torchao, 2mnk TOPS")
