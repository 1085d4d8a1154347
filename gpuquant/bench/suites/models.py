"""Suite ``models``: whole quantized networks on the Triton backend against bf16 PyTorch
(GPU only).

Params: ``model`` (``resnet50``, ``mobilenet_v2``, 224x224 images, 1000 classes) and
``batch`` (1, 64, 256; ``--quick``: 1 and 64).

Providers (same float images in, logits out, interleaved):

* ``gpuquant-triton``: the int8 network (``gpuquant.models`` -> ``quantize_qat`` ->
  one calibration pass -> ``quantize`` -> ``fuse_epilogues``) on the GPU under
  ``backends.use("triton")``: quantize stub, int8 conv / linear with fused requantization,
  each residual add in the epilogue of the conv before it, the last linear writing float
  logits, integer pools; no host round trip, no float fallback;
* ``torch-bf16``: the same float network in bfloat16, channels_last, eager (the baseline);
* ``torch-bf16-compile``: that network through ``torch.compile`` (left out where compiling
  fails);
* ``torch-bf16-bnfold`` / ``torch-bf16-bnfold-graph``: the bf16 network with each
  convolution's BatchNorm folded into its weights and bias (in float32, then cast), eager
  and as a CUDA graph: what a user deploying bf16 would run, and what the int8 network does
  (its BatchNorms are folded too). ``torch-bf16`` keeps the baseline the targets name; these
  rows say how much of the int8 network's lead is the folding;
* ``gpuquant-triton-graph`` / ``torch-bf16-graph``: the int8 and the bf16 eager networks
  captured once in a CUDA graph (after three warm-up calls: autotuning and every memo happen
  there) and replayed, each call copying its images into the graph's input: no host
  overhead or launch gaps, what a serving stack runs. The eager int8 network spends about
  1.3 ms of Python per ResNet-50 forward outside the kernels (measured on the CPU with
  zero-cost ops, before Triton's own launch cost), which a batch-1 or even batch-64 run can
  be bound by; the graph rows show the kernels' speed.

The networks are built once per model (random weights; BatchNorm statistics from one
training-mode pass so activations are realistic) and reused across batches; building,
calibration and compilation are untimed. Throughput: images/s. Target (issue 6): resnet50
batch 64 ``gpuquant-triton`` >= 1.5x ``torch-bf16``.

``exact_vs_numpy``: the Triton logits (fused network) on input set 0 against the unfused
int8 network on the CPU under ``backends.use("numpy")``: dtype and shape of the whole
output, values of the first and the last image (images are independent; ~0.3 s for two
ResNet-50 images in NumPy, computed once a case and shared by the providers).

At least 15 timed calls a provider and case (``Suite.min_reps``: a batch-64 forward of
10-40 ms would get 5 from the GPU's 0.1 s quick budget).

Run on a GPU: ``gpuquant bench models --out bench/results/<device-slug>``.
"""
from __future__ import annotations

import contextlib
import copy
import types
from typing import Dict, List

import torch

from ..harness import (Case, Provider, ProviderUnavailable, Suite, cuda_graph_of, exact_rows,
                       sample_rows)

MODELS = {"resnet50": (3, 224), "mobilenet_v2": (3, 224)}
BATCHES = [1, 64, 256]
QUICK_BATCHES = [1, 64]

_BUILT: Dict[tuple, dict] = {}


def build(name: str, in_ch: int, size: int, num_classes: int = 1000) -> dict:
    """Float, int8 (CPU) networks for ``name``, memoised: {"float", "int8"}."""
    key = (name, in_ch, size, num_classes)
    if key not in _BUILT:
        from ... import backends
        with backends.use(None):  # the CPU's own backends, also inside the warm-up's
            _BUILT[key] = _build(name, in_ch, size, num_classes)  # use("triton")
    return _BUILT[key]


def _build(name: str, in_ch: int, size: int, num_classes: int) -> dict:
    from ... import models
    from ...quantization import disable_observer, quantize, quantize_qat
    torch.manual_seed(0)
    fp = models.settle_bn(getattr(models, name)(num_classes=num_classes),
                          torch.randn(4, in_ch, size, size)).eval()
    float_copy = copy.deepcopy(fp)
    qat = quantize_qat(fp).eval()
    with torch.no_grad():
        qat(torch.randn(4, in_ch, size, size))  # calibration: the observers record
    disable_observer(qat)
    return {"float": float_copy, "int8": quantize(qat).eval()}


def make_inputs(in_ch: int, size: int, batch: int, device: str):
    def inputs(i):
        return {"x": torch.randn(batch, in_ch, size, size).to(device)}
    return inputs


def _int8_model(name, in_ch, size, device):
    """The fused int8 network on ``device`` (built once)."""
    built = build(name, in_ch, size)
    key = ("int8-on", device)
    if key not in built:
        from ...quantization import fuse_epilogues
        built[key] = fuse_epilogues(copy.deepcopy(built["int8"])).to(device)
    return built[key]


def _bf16_model(name, in_ch, size, device, compile_: bool, example=None,
                bn_fold: bool = False):
    """The bf16 channels_last network on ``device``, eager or through ``torch.compile``
    (compiled on ``example``, untimed), with ``bn_fold`` its convolutions' BatchNorms folded
    (:func:`fold_batch_norms`); ProviderUnavailable where compiling fails."""
    built = build(name, in_ch, size)
    key = ("bf16-compile" if compile_ else "bf16", bn_fold, device)
    if key not in built:
        model = copy.deepcopy(built["float"])
        if bn_fold:
            model = fold_batch_norms(model)
        model = model.to(device=device, dtype=torch.bfloat16)
        model = model.to(memory_format=torch.channels_last).eval()
        if compile_:
            try:
                # dynamic=False: one network serves every batch of the suite, and after
                # its first batch Dynamo would recompile it with a symbolic batch size
                # (automatic dynamic shapes): the later batches' rows timed that graph
                model = torch.compile(_traceable(model), dynamic=False)
                with torch.no_grad():
                    model(example)  # compiles here, untimed
            except Exception as e:  # noqa: BLE001 - any compile failure: leave it out
                built[key] = None
                raise ProviderUnavailable(f"torch.compile failed: {type(e).__name__}: "
                                          f"{e}") from None
        built[key] = model
    if built[key] is None:
        raise ProviderUnavailable("torch.compile failed (see the first case)")
    return built[key]


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (float32, in place) with every ``gpuquant.nn`` Conv+BN module's BatchNorm
    folded into its convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``, inference
    statistics) and replaced by an identity; returned in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ...nn.conv import ConvBn2d
    model.eval()
    for m in model.modules():
        if isinstance(m, ConvBn2d) and isinstance(m.bn, torch.nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            m.bn = torch.nn.Identity()
    return model


def _traceable(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the forwards Dynamo is kept out of given back their own code.

    ``gpuquant.models``' networks and blocks run eagerly under ``torch.compile``
    (``gpuquant._compile.eager_under_compile``, for their QAT and int8 forms, whose modules
    Dynamo cannot trace): compiling the float network as it is compiled nothing, and the
    ``torch-bf16-compile`` rows timed the eager network under that name. Each such module of
    this float copy gets its class's undecorated forward as its own (the wrapper keeps it as
    ``__wrapped__``); the float layers inside are plain torch. (``keep_producer``, a no-op on
    a float network, stays a graph break before the classifier.)"""
    for m in model.modules():
        fwd = type(m).forward
        inner = getattr(fwd, "__wrapped__", None)
        if getattr(fwd, "_gq_eager", False) and inner is not None:
            m.forward = types.MethodType(inner, m)
    return model


def _bf16_input(x):
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _triton_ctx():
    from ... import backends
    return backends.use("triton")


def _need_triton():
    from ... import backends
    if "triton" not in backends.available():
        raise ProviderUnavailable("the triton backend cannot run here")


def _triton(name, in_ch, size, device):
    def setup(inp):
        _need_triton()
        model, x = _int8_model(name, in_ch, size, device), inp["x"]

        def run():
            with torch.no_grad(), _triton_ctx():
                return model(x)
        return run
    return setup


def _check(name, in_ch, size):
    def check(inp, out):
        if "want" not in inp:  # kept in the input set: the providers checked share it
            from ... import backends
            model = build(name, in_ch, size)["int8"]
            rows = sample_rows(inp["x"].shape[0], 2)  # the first and the last image
            with torch.no_grad(), backends.use("numpy"):
                inp["want"] = rows, model(inp["x"][rows.to(inp["x"].device)].cpu())
        rows, want = inp["want"]
        return exact_rows(out, want, rows, inp["x"].shape[0])
    return check


def _bf16(name, in_ch, size, device, compile_: bool, bn_fold: bool = False):
    def setup(inp):
        x = _bf16_input(inp["x"])
        model = _bf16_model(name, in_ch, size, device, compile_, x, bn_fold)

        def run():
            with torch.no_grad():
                return model(x)
        return run
    return setup


_GRAPHS: Dict[tuple, tuple] = {}


def _graphed(tag, get_model, prep, ctx):
    """Setup of a provider that replays one CUDA graph of ``get_model()`` per input shape:
    captured after three warm-up calls on a side stream (autotuning and every memo happen
    there), each timed call copies its input into the graph's static input and replays."""
    def setup(inp):
        x = prep(inp["x"])
        if x.device.type != "cuda":
            raise ProviderUnavailable("CUDA graphs need a CUDA device")
        model = get_model(x)
        key = (tag, id(model), tuple(x.shape))
        if key not in _GRAPHS:
            static_x = x.clone()

            def forward():
                with torch.no_grad(), ctx():
                    return model(static_x)
            graph, static_y = cuda_graph_of(forward, warmup=3)
            _GRAPHS[key] = (graph, static_x, static_y)
        graph, static_x, static_y = _GRAPHS[key]

        def run():
            static_x.copy_(x)
            graph.replay()
            return static_y
        return run
    return setup


def _triton_graph(name, in_ch, size, device):
    def get_model(x):
        _need_triton()
        return _int8_model(name, in_ch, size, device)
    return _graphed("int8", get_model, lambda x: x, _triton_ctx)


def _bf16_graph(name, in_ch, size, device, bn_fold: bool = False):
    return _graphed("bf16", lambda x: _bf16_model(name, in_ch, size, device, False, x,
                                                   bn_fold),
                    _bf16_input, contextlib.nullcontext)


def make_case(name: str, batch: int, device: str) -> Case:
    in_ch, size = MODELS[name]
    return Case(params={"model": name, "batch": batch},
                inputs=make_inputs(in_ch, size, batch, device),
                providers={
                    "gpuquant-triton": Provider(_triton(name, in_ch, size, device),
                                                _check(name, in_ch, size)),
                    "torch-bf16": Provider(_bf16(name, in_ch, size, device, False)),
                    "torch-bf16-compile": Provider(_bf16(name, in_ch, size, device, True)),
                    "gpuquant-triton-graph": Provider(_triton_graph(name, in_ch, size, device),
                                                      _check(name, in_ch, size)),
                    "torch-bf16-graph": Provider(_bf16_graph(name, in_ch, size, device)),
                    "torch-bf16-bnfold": Provider(_bf16(name, in_ch, size, device, False,
                                                        bn_fold=True)),
                    "torch-bf16-bnfold-graph": Provider(_bf16_graph(name, in_ch, size, device,
                                                                    bn_fold=True)),
                },
                throughput=lambda p, ms: (p["batch"] / (ms * 1e-3), "images/s"))


def _cases(quick: bool, device: str) -> List[Case]:
    return [make_case(name, b, device) for name in MODELS
            for b in (QUICK_BATCHES if quick else BATCHES)]


SUITE = Suite(name="models", baseline="torch-bf16", cases=_cases, device="cuda",
              x_param="batch", min_reps=15,
              description="whole networks: int8 on Triton vs bf16 eager / torch.compile, "
                          "images/s")
