"""Suite ``qat_step``: one training step (forward, loss, backward, SGD update) of a float
network against the same network under QAT (GPU only).

Params: ``model`` (``resnet50``, ``mobilenet_v2``), ``batch`` 64, ``resolution`` 224, bf16
autocast, channels_last input and weights.

Providers:

* ``float``: the float model of :mod:`gpuquant.models` (the baseline);
* ``gpuquant-qat``: the same model after :func:`gpuquant.quantization.quantize_qat` with the
  ``ema_fakequant_qconfig`` settings (weights qint8_narrow per output channel, MinMax;
  activations qint8 per tensor, moving average 0.9) and ``check_finite=False``, so that the
  step has no host synchronisation (the default ``check_finite=True`` reads one flag per
  observer per step to raise on NaN / Inf). On CUDA the fake-quant ops run on the triton
  backend automatically: a folded Conv+BN layer is one autograd node
  (``conv_bn_act_train``): its convolution plus the fused weight fold + observe + fake
  quant and the fused batch norm + activation + observe + fake quant, three launches
  forward and three backward; residual adds go into ``observe_fake_quant``'s kernels
  (the ``gpuquant-qat*`` rows are unavailable on CUDA where the triton backend cannot run
  or another is chosen: the automatic choice would time another backend's ops unsaid);
* ``gpuquant-qat-exact``: the same with Conv+BN trained in the two-convolution form
  (:func:`gpuquant.quantization.set_bn_fold` "exact"; the default is "single", one
  convolution a layer);
* ``gpuquant-qat-bn-frozen``: the same after :func:`gpuquant.quantization.freeze_bn_stats`
  (running statistics, one convolution a layer: the second half of a usual QAT run);
* ``float-graph`` / ``gpuquant-qat-graph``: the float and QAT models with forward and
  backward captured once in CUDA graphs (``torch.cuda.make_graphed_callables``, after three
  eager warm-up steps) and replayed: no host cost a step, so these rows show the kernels'
  time (an H200 profile found the eager QAT step host-bound: 4892 launches a step);
* ``torch-ao-qat``: PyTorch's eager QAT of the same architecture
  (``torchvision.models.quantization.<model>``, ``fuse_model(is_qat=True)``,
  ``get_default_qat_qconfig("x86")``, ``prepare_qat``), while PyTorch ships it; left out
  when torchvision is not installed, and for ``dtype`` bfloat16 (its fused fake-quant
  kernels refuse bf16 under autocast).

Throughput: images/s. Target (issue 5): ``gpuquant-qat`` at most 1.25x the ``float`` step for
resnet50. Each provider builds its model once (untimed) and reuses it for every input set.
At least 15 timed steps a provider and case (``Suite.min_reps``: a 20-40 ms step would get
5 from the GPU's 0.1 s quick budget).

Run on a GPU: ``gpuquant bench qat_step --out bench/results/<device-slug>``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from ..harness import Case, Provider, ProviderUnavailable, Suite

MODELS = ("resnet50", "mobilenet_v2")
NUM_CLASSES = 1000


def case_params(quick: bool, models=MODELS, batch: int = 64, resolution: int = 224,
                dtype: str = "bfloat16") -> List[Dict]:
    """The params of every case (``--quick`` runs the same cases with shorter budgets: the
    model and batch are the point of the suite). ``dtype`` "bfloat16" runs the step under
    bf16 autocast, "float32" without autocast (the CPU test)."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return [{"model": m, "batch": batch, "resolution": resolution, "dtype": dtype,
             "memory_format": "channels_last"} for m in models]


def _gpuquant_model(name: str, narrow: bool = False) -> torch.nn.Module:
    """The model ``name``; ``narrow``: the same layers at 1/8 of the width (the stand-in
    host timing, :func:`gpuquant.backends.triton.standin.qat_host_time`)."""
    from ... import models
    factories = {"resnet50": models.resnet50, "mobilenet_v2": models.mobilenet_v2,
                 "resnet18": models.resnet18}
    if name not in factories:
        raise ValueError(f"unknown model {name!r}; known: {sorted(factories)}")
    if not narrow:
        return factories[name](num_classes=NUM_CLASSES)
    kw = {"width_mult": 0.125} if name.startswith("mobilenet") else {"width": 8}
    return factories[name](num_classes=NUM_CLASSES, **kw)


def qat_qconfig():
    """``ema_fakequant_qconfig`` with ``check_finite=False`` (no host sync in the step)."""
    from ...quantization import ema_fakequant_qconfig
    return ema_fakequant_qconfig.without_host_reads()


def _build_float(name, device):
    return _gpuquant_model(name)


def _build_gpuquant_qat(name, device):
    from ...quantization import quantize_qat
    return quantize_qat(_gpuquant_model(name), qat_qconfig())


def _build_gpuquant_qat_exact(name, device):
    from ...quantization import set_bn_fold
    return set_bn_fold(_build_gpuquant_qat(name, device), "exact")


def _build_gpuquant_qat_bn_frozen(name, device):
    from ...quantization import freeze_bn_stats
    return freeze_bn_stats(_build_gpuquant_qat(name, device))


def _build_torch_ao_qat(name, device):
    try:
        from torchvision.models import quantization as tvq
    except ImportError as e:
        raise ProviderUnavailable(f"torchvision is not installed ({e})")
    import torch.ao.quantization as tq
    builders = {"resnet50": tvq.resnet50, "mobilenet_v2": tvq.mobilenet_v2,
                "resnet18": tvq.resnet18}
    if name not in builders:
        raise ProviderUnavailable(f"no torchvision quantizable {name}")
    model = builders[name](weights=None, quantize=False, num_classes=NUM_CLASSES)
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


BUILDERS: Dict[str, Callable] = {"float": _build_float, "gpuquant-qat": _build_gpuquant_qat,
                                 "gpuquant-qat-exact": _build_gpuquant_qat_exact,
                                 "gpuquant-qat-bn-frozen": _build_gpuquant_qat_bn_frozen,
                                 "torch-ao-qat": _build_torch_ao_qat}
# provider -> (builder, forward and backward replayed from a CUDA graph)
PROVIDERS: Dict[str, tuple] = {"float": ("float", False), "float-graph": ("float", True),
                               "gpuquant-qat": ("gpuquant-qat", False),
                               "gpuquant-qat-graph": ("gpuquant-qat", True),
                               "gpuquant-qat-exact": ("gpuquant-qat-exact", False),
                               "gpuquant-qat-bn-frozen": ("gpuquant-qat-bn-frozen", False),
                               "torch-ao-qat": ("torch-ao-qat", False)}
_GRAPH_WARMUP_STEPS = 3  # eager steps before capture: observers start, autotuning is done


def _need_triton() -> None:
    """The gpuquant rows on CUDA are the triton backend's (the QAT modules pick it
    automatically there): where it cannot run, or another backend is chosen
    (``GPUQUANT_BACKEND``), the automatic choice would quietly give the reference
    backend's plain-torch fake quant (or CuPy's) under the same row name."""
    from ... import backends
    if "triton" not in backends.available():
        raise ProviderUnavailable("the triton backend cannot run here (the QAT step would "
                                  "fall back to another backend)")
    chosen = backends.current()
    if chosen not in (None, "triton"):
        raise ProviderUnavailable(f"backend {chosen!r} is chosen (GPUQUANT_BACKEND), not "
                                  f"triton")


def _provider(kind: str, params: Dict, cache: Dict) -> Provider:
    """A provider whose model and optimizer are built on the first input set and reused.
    Graph providers capture the model's forward and backward once
    (``torch.cuda.make_graphed_callables``, after eager warm-up steps) and replay it: the
    step then costs the host almost nothing, so the row shows the kernels' time."""
    builder, graphed = PROVIDERS[kind]

    def setup(inp):
        x, target = inp["x"], inp["target"]
        if builder == "torch-ao-qat" and params["dtype"] != "float32":
            # its fused observer + fake-quant kernels take float32 only (seen on an H200,
            # torch 2.11: "expected scalar type BFloat16 but found Float" under autocast)
            raise ProviderUnavailable(f"torch.ao's fake-quant kernels take float32 only, not "
                                      f"{params['dtype']} autocast")
        if graphed and x.device.type != "cuda":
            raise ProviderUnavailable("CUDA graphs need a CUDA device")
        if builder.startswith("gpuquant") and x.device.type == "cuda":
            _need_triton()
        amp = params["dtype"] == "bfloat16"
        if "model" not in cache:
            model = BUILDERS[builder](params["model"], x.device)
            model = model.to(x.device).to(memory_format=torch.channels_last).train()
            cache["model"] = model
            cache["opt"] = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        model, opt = cache["model"], cache["opt"]

        def step_with(fwd, autocast_cache=True):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                    enabled=amp, cache_enabled=autocast_cache):
                    out = fwd(x)
                loss = F.cross_entropy(out.float(), target)
                loss.backward()
                opt.step()
                return loss.detach()
            return step

        if not graphed:
            return step_with(model)
        if "graphed" not in cache:
            warm = step_with(model, autocast_cache=False)
            for _ in range(_GRAPH_WARMUP_STEPS):
                warm()
            torch.cuda.synchronize()
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp,
                                cache_enabled=False):
                cache["graphed"] = torch.cuda.make_graphed_callables(model, (x,))
        return step_with(cache["graphed"], autocast_cache=False)
    setup.cache = cache  # the built model and optimizer (tests look at them)
    return Provider(setup)


def _make_inputs(params, device):
    def inputs(i):
        b, r = params["batch"], params["resolution"]
        x = torch.randn(b, 3, r, r, device=device).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, NUM_CLASSES, (b,), device=device)
        return {"x": x, "target": target}
    return inputs


def build_cases(params_list, device) -> List[Case]:
    cases = []
    for p in params_list:
        providers = {kind: _provider(kind, p, {}) for kind in PROVIDERS}
        cases.append(Case(params=dict(p), inputs=_make_inputs(p, device), providers=providers,
                          throughput=lambda q, ms: (q["batch"] / (ms * 1e-3), "images/s")))
    return cases


def _cases(quick: bool, device: str) -> List[Case]:
    return build_cases(case_params(quick), device)


SUITE = Suite(name="qat_step", baseline="float", cases=_cases, device="cuda", x_param="model",
              min_reps=15,
              description="one training step: float vs gpuquant QAT vs torch.ao eager QAT")
