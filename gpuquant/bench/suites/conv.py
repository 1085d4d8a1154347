"""Suite ``conv``: the Triton int8 implicit-GEMM convolution against cuDNN bf16 (GPU only).

Params: ``model`` ("resnet50"), ``batch`` (64; ``--quick``: 64 too, fewer layers) and
``layer``: each distinct convolution of ResNet-50 at 224x224 (named
``c<in>-o<out>-k<k>-s<stride>-h<input size>``, e.g. ``c64-o64-k3-s1-h56``), plus the row
``layer = "all"``: every one of the network's 53 convolutions run back to back (distinct
shapes as often as the network has them), so its time is the network's convolution time.

Providers (same data, interleaved):

* ``gpuquant-triton``: the backend's ``conv2d`` op on channels_last int8 activations with a
  per-channel requantizing epilogue, int8 out (the kernel a quantized ConvBn2d runs);
* ``gpuquant-triton-graph``: the same launches replayed from a CUDA graph: the kernels'
  time alone (the eager row includes whatever of the host's launch time the GPU waits for);
* ``gpuquant-triton-gluon-graph``: the graph row with the sm_90 Gluon main loops switched
  on (:mod:`gpuquant.backends.triton.gemm_sm90`, :mod:`~gpuquant.backends.triton.conv_sm90`):
  the 1x1 stride-1 layers (GEMMs) and the stem's im2col GEMM get the GEMM's, the 3x3 and
  strided 1x1 layers (64 or more channels, zero point 0) the conv's; unavailable off sm_90;
* ``torch-bf16``: ``torch.nn.functional.conv2d`` in bfloat16, channels_last (cuDNN; the
  baseline, what a user would run instead);
* ``torch-bf16-graph``: the same replayed from a CUDA graph: the ``-graph`` rows are
  compared with it (graph against graph; before it existed they were read against the
  eager ``torch-bf16``, whose "all" row includes 53 launches of host time);
* ``gpuquant-cupy-<tier>``: the CuPy backend's ``conv2d`` (hand-written CUDA, ``kernels/``)
  with each tier forced (dp4a, mma75, mma80, sm90); tiers the GPU cannot run, or no CuPy,
  report unavailable.

Throughput: 2 N Ho Wo O (C / groups) KH KW / time, TOPS (TFLOPS for ``torch-bf16``: its
fraction of the ceiling is of the bf16 peak). Target (issue 6): ``all``
>= 1.5x faster than ``torch-bf16``.

``exact_vs_numpy``: the Triton (and CuPy) output of every layer on input set 0 against the
NumPy backend's ``conv2d``: dtype and shape of the whole output, values of the first and the
last image (images are independent; NumPy takes ~1.5 s an image for the 53 layers, computed
once a case and shared by the providers).

At least 10 timed calls a provider and case (``Suite.min_reps``; the ``all`` row's ~10 ms
would get few from the GPU's 0.1 s quick budget).

Run on a GPU: ``gpuquant bench conv --out bench/results/<device-slug>``.
"""
from __future__ import annotations

from collections import Counter
from typing import List, NamedTuple

import torch
import torch.nn.functional as F

from ...dtypes import qint8
from ...functional.requant import make_requant
from ..harness import (Case, Provider, ProviderUnavailable, Suite, cuda_graph_of, exact_rows,
                       sample_rows)

BATCH = 64


class ConvSpec(NamedTuple):
    c_in: int
    h: int          # input height = width
    c_out: int
    k: int
    stride: int
    pad: int

    @property
    def name(self) -> str:
        return f"c{self.c_in}-o{self.c_out}-k{self.k}-s{self.stride}-h{self.h}"

    @property
    def h_out(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    def ops(self, batch: int) -> float:
        return 2.0 * batch * self.h_out ** 2 * self.c_out * self.c_in * self.k ** 2


def resnet50_convs(image: int = 224) -> List[ConvSpec]:
    """Every convolution of one ResNet-50 (v1.5: stride on the 3x3) forward, in order."""
    convs = [ConvSpec(3, image, 64, 7, 2, 3)]
    h = (convs[0].h_out + 2 - 3) // 2 + 1  # max pool 3, stride 2, pad 1
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            mid = ConvSpec(planes, h, planes, 3, s, 1)
            convs += [ConvSpec(inplanes, h, planes, 1, 1, 0), mid,
                      ConvSpec(planes, mid.h_out, planes * 4, 1, 1, 0)]
            if b == 0:
                convs.append(ConvSpec(inplanes, h, planes * 4, 1, s, 0))  # downsample
            inplanes, h = planes * 4, mid.h_out
    return convs


def distinct_convs(image: int = 224) -> List[ConvSpec]:
    return list(dict.fromkeys(resnet50_convs(image)))


QUICK_LAYERS = ("c3-o64-k7-s2-h224", "c64-o64-k3-s1-h56", "c256-o64-k1-s1-h56",
                "c256-o256-k3-s1-h14")


def _layer_inputs(spec: ConvSpec, batch: int, device: str, seed_shift: int = 0):
    x = torch.randint(-128, 128, (batch, spec.c_in, spec.h, spec.h), dtype=torch.int8)
    w = torch.randint(-127, 128, (spec.c_out, spec.c_in, spec.k, spec.k), dtype=torch.int8)
    bias = torch.randint(-2 ** 14, 2 ** 14, (spec.c_out,), dtype=torch.int32)
    w_scale = (torch.rand(spec.c_out, dtype=torch.float64) * 0.9 + 0.1) * 0.01
    kk = spec.c_in * spec.k ** 2
    out_scale = 0.02 * float(w_scale.median()) * 74.0 * 73.0 * kk ** 0.5 / 60.0
    rq = make_requant(0.02, w_scale, out_scale, 0, qint8)
    return {"spec": spec, "x": x.to(device).contiguous(memory_format=torch.channels_last),
            "w": w.to(device), "bias": bias.to(device), "rq": rq, "zp": 0}


def make_inputs(specs: List[ConvSpec], batch: int, device: str):
    def inputs(i):
        return [_layer_inputs(s, batch, device) for s in specs]
    return inputs


def _conv_op():
    from ... import backends
    try:
        return backends.get_backend("triton").OPS["conv2d"]
    except ValueError as e:
        raise ProviderUnavailable(str(e)) from None


def _triton(layers, gluon: bool = False):
    """Every layer's ``conv2d``; ``gluon``: with the sm_90 Gluon GEMM main loop switched on
    (the 1x1 stride-1 layers go through the GEMM; off, whatever GPUQUANT_SM90_GEMM says)."""
    op = _conv_op()
    from ...backends.triton import gemm_sm90
    if gluon:
        why = gemm_sm90.unavailable(layers[0]["x"].device)
        if why is not None:
            raise ProviderUnavailable(why)
    calls = [(L["x"], L["zp"], L["w"], L["bias"], (L["spec"].stride,) * 2,
              (L["spec"].pad,) * 2, (1, 1), 1, L["rq"]) for L in layers]

    def run():
        with gemm_sm90.use(gluon):
            return [op(*c) for c in calls]
    return run


def _triton_gluon(layers):
    return _triton(layers, gluon=True)


def _graphed(eager):
    """The provider setup replaying ``eager(layers)``'s launches from a CUDA graph, captured
    once after two eager warm-up calls on a side stream (autotuning, the memoised weights,
    cuDNN's algorithm choice happen there): the kernels' time without the host's (an eager
    row of the 53 layers can be host-bound). ``setup.eager``: ``eager`` itself, which the
    kernel warm-up (:mod:`gpuquant.bench.warm`) runs where no graph can be captured."""
    def setup(layers):
        if layers[0]["x"].device.type != "cuda":
            raise ProviderUnavailable("CUDA graphs need a CUDA device")
        graph, outs = cuda_graph_of(eager(layers), warmup=2)

        def run():
            graph.replay()
            return outs
        return run
    setup.eager = eager
    return setup


def _bf16(layers):
    calls = [(L["x"].to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
              L["w"].to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
              L["spec"]) for L in layers]

    def run():
        return [F.conv2d(x, w, None, s.stride, s.pad) for x, w, s in calls]
    return run


def _reference(L):
    """(images, the NumPy backend's output for them): the first and the last image of the
    layer's input; kept in the layer's input set, so the providers checked share it."""
    if "want" not in L:
        from ... import backends
        ref = backends.get_backend("numpy").OPS["conv2d"]
        s, rows = L["spec"], sample_rows(L["x"].shape[0], 2)
        L["want"] = rows, ref(L["x"][rows.to(L["x"].device)].cpu(), L["zp"], L["w"].cpu(),
                              L["bias"].cpu(), (s.stride,) * 2, (s.pad,) * 2, (1, 1), 1, L["rq"])
    return L["want"]


def _check(layers, outs):
    """Every layer's output against the NumPy backend (:func:`_reference`)."""
    if not isinstance(outs, list) or len(outs) != len(layers):
        return False
    for L, y in zip(layers, outs):
        rows, want = _reference(L)
        if not exact_rows(y, want, rows, L["x"].shape[0]):
            return False
    return True


def _cupy_providers():
    from ...backends.cupy.bench import tier_providers
    return tier_providers("conv2d", check=_check, args_of=lambda layers: [
        (L["x"], L["zp"], L["w"], L["bias"], (L["spec"].stride,) * 2, (L["spec"].pad,) * 2,
         (1, 1), 1, L["rq"]) for L in layers])


def make_case(layer: str, specs: List[ConvSpec], batch: int, device: str,
              model: str = "resnet50") -> Case:
    total_ops = sum(s.ops(batch) for s in specs)
    return Case(params={"model": model, "batch": batch, "layer": layer},
                inputs=make_inputs(specs, batch, device),
                providers={"gpuquant-triton": Provider(_triton, _check),
                           "gpuquant-triton-graph": Provider(_graphed(_triton), _check),
                           "gpuquant-triton-gluon-graph": Provider(_graphed(_triton_gluon),
                                                                   _check),
                           "torch-bf16": Provider(_bf16, unit="TFLOPS"),
                           "torch-bf16-graph": Provider(_graphed(_bf16), unit="TFLOPS"),
                           **_cupy_providers()},
                throughput=lambda p, ms, t=total_ops: (t / (ms * 1e-3) / 1e12, "TOPS"))


def _cases(quick: bool, device: str) -> List[Case]:
    every = resnet50_convs()
    distinct = distinct_convs()
    if quick:
        distinct = [s for s in distinct if s.name in QUICK_LAYERS]
    cases = [make_case(s.name, [s], BATCH, device) for s in distinct]
    cases.append(make_case("all", every, BATCH, device))
    return cases


def layer_counts() -> Counter:
    """How often each distinct layer occurs in one forward (the 'all' row's mix)."""
    return Counter(s.name for s in resnet50_convs())


SUITE = Suite(name="conv", baseline="torch-bf16", cases=_cases, device="cuda", x_param=None,
              min_reps=10,
              description="ResNet-50 convolutions, batch 64: Triton int8 implicit GEMM vs "
                          "cuDNN bf16 channels_last, TOPS")
