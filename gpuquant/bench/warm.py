"""Compile the GPU suites' Triton kernels before they are timed, on the CPU, in parallel.

    python -m gpuquant.bench.warm --suites models,conv,gemm,linear_dynamic --jobs 14

A lent GPU machine starts with an empty Triton cache, and the autotuner compiles every
candidate config of every shape one after another in the benchmark's own process (about
5 s for a 3x3 convolution config): on a short lease most of a stage's time went to
compiling (bench/README.md, NOTES). Compiling needs no GPU. Each worker process here runs
with the GPU hidden, inside :func:`gpuquant.backends.triton.standin.standin_cuda` with
``cubin=True`` and the triton backend chosen: every ``gpuquant-triton*`` provider
(``gpuquant-qat*`` for ``qat_step``, whose convolutions are replaced by their output's shape,
:class:`_ShapeConv`; not the CUDA-graph rows) of every ``--quick`` case of the named suites
is set up on CPU tensors and called once, so the
autotuner compiles each candidate config, through the ``ptxas`` Triton ships, into
Triton's cache directory (``TRITON_CACHE_DIR``, shared by the workers; Triton writes its
entries atomically), while the launches are only recorded. The cache keys are the ones the
GPU process computes (same source, Triton build, target ``sm_90``, options, argument
specialisation, and the quick config lists chosen for 132 multiprocessors): the suites
then find their kernels compiled. A key that differs (another GPU family, another Triton)
costs nothing but the warm-up's CPU time.

``--suites weight_only_tiles`` (not a suite; :func:`work_list`) compiles every weight-only
GEMM config forced, at the launches of the GPU probe and of the every-tile GPU test: the
prebuilt cache (:mod:`.tcache`) includes them. ``--suites gluon_tiles`` likewise compiles the
sm_90 Gluon GEMM's configs forced at the Gluon probe's and GPU tests' launches; and in every
worker an untuned Gluon problem (the suites' ``gpuquant-triton-gluon*`` rows) compiles each
config the GPU's tuning will time (``gemm_sm90.STANDIN_COMPILES_ALL``).

The lease runner (:mod:`gpuquant.bench.lease`) starts this in the background, at low CPU
priority, while the GPU tests run. Cases are dealt to workers round-robin in the order of
``--suites``; ``--budget`` stops the workers after that many seconds (what they compiled stays).
Prints one line per worker when it ends: cases done, failures (a failure only means that
case is not warmed), seconds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

from .suites.linear_dynamic import PREFILL_M, QUICK_NK

__all__ = ["main", "work_list"]

DEFAULT_SUITES = ("models", "conv", "gemm", "linear_dynamic", "fake_quant", "qat_step")


def _warmed(suite: str, provider: str) -> bool:
    """The providers whose kernels are warmed: gpuquant's Triton ones (not CUDA-graph rows:
    the same kernels as their eager twins; a graph row without one is warmed through the
    eager function its setup carries, :func:`_warm_setup`)."""
    if provider.endswith("-graph"):
        return False
    return provider.startswith("gpuquant-qat" if suite == "qat_step" else "gpuquant-triton")


def _warm_setup(suite: str, name: str, providers: dict):
    """The setup to warm ``name`` with, or None: its own (:func:`_warmed`), or for a CUDA-graph
    row of gpuquant's with no eager twin in the case (the conv suite's Gluon row) the eager
    setup its graph replays (``setup.eager``: the stand-in cannot capture a graph)."""
    prov = providers[name]
    if _warmed(suite, name):
        return prov.setup
    twin = name[:-len("-graph")]
    if name.endswith("-graph") and twin not in providers and _warmed(suite, twin):
        return getattr(prov.setup, "eager", None)
    return None


class _ShapeConv:
    """``torch.nn.functional.conv2d`` replaced by its output's shape, dtype (bf16 under
    autocast, as the real convolution) and layout, forward and backward (and the fused QAT
    layer's convolution backward, :func:`gpuquant.backends.triton.qat_layer.conv2d_backward`):
    a QAT step on the CPU then costs nothing but its Triton launches (recorded, not run) and
    small ops."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        class Conv(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b, stride, padding, dilation, groups):
                def pair(v):
                    return (v, v) if isinstance(v, int) else tuple(v)
                (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
                kh, kw = w.shape[-2:]
                ho = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
                wo = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
                dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") \
                    else x.dtype
                x, w = x.to(dt), w.to(dt)  # autocast's casts: the real convolution's work
                ctx.like = (x, w, b)
                return torch.empty((x.shape[0], w.shape[0], ho, wo), dtype=dt,
                                   memory_format=torch.channels_last)

            @staticmethod
            def backward(ctx, gy):
                x, w, b = ctx.like
                return (torch.empty_like(x), torch.empty_like(w),
                        None if b is None else torch.empty_like(b), None, None, None, None)

        from ..backends.triton import qat_layer

        def conv_backward(gz, x, w, stride, padding, dilation, groups, need_x):
            return (torch.empty_like(x) if need_x else None), torch.empty_like(w)

        self._F, self._real = F, F.conv2d
        self._layer, self._real_bwd = qat_layer, qat_layer.conv2d_backward
        F.conv2d = lambda x, w, b=None, stride=1, padding=0, dilation=1, groups=1: \
            Conv.apply(x, w, b, stride, padding, dilation, groups)
        qat_layer.conv2d_backward = conv_backward
        return self

    def __exit__(self, *exc):
        self._F.conv2d = self._real
        self._layer.conv2d_backward = self._real_bwd


# Not a suite: every weight-only GEMM config forced, as the GPU probe
# (bench/probes/decode_fq_probe.py, parts decode and prefill) and the every-tile GPU test
# (tests/transformers/test_dynamic_gpu.py) launch them: ~150 kernels that a lease would
# otherwise compile one after another while the GPU waits. `make tcache` warms them too.
WEIGHT_ONLY_TILES = "weight_only_tiles"
WO_PROBE_SHAPES = QUICK_NK  # (n, k): the linear_dynamic suite's quick ones
WO_PROBE_PREFILL_M = PREFILL_M
WO_TEST_N = 1000


def weight_only_test_shapes(tile) -> list:
    """(m, k, split_k) the every-tile GPU test runs ``tile`` on (n = WO_TEST_N): whole and
    ragged K, split and not; one row for a GEMV tile."""
    if tile[0] == 1:
        return [(1, 2050, 1), (1, 4096, 3)]
    return [(37, 2050, 1), (300, 4096, 1), (5, 4096, 3)]


def weight_only_probe_launches(part: str, n: int, k: int, sms: int) -> list:
    """(m, split_k, tile, w_a) the probe forces on (n, k): ``decode`` (m = 1): every 16-row
    and GEMV tile at half, once and twice the heuristic's split; ``prefill`` (m = 2048):
    every tile of 64 rows or more, unsplit, plain and transposed."""
    from ..backends.triton import dynamic as D
    if part == "decode":
        split0 = D.weight_only_split_k(1, n, k, sms)
        return [(1, s, t, w) for t, w in D.weight_only_forms() if t[0] in (1, 16) and not w
                for s in sorted({max(1, split0 // 2), split0, split0 * 2})]
    if part == "prefill":
        return [(WO_PROBE_PREFILL_M, 1, t, w) for t, w in D.weight_only_forms() if t[0] >= 64]
    raise ValueError(f"weight_only_probe_launches: part must be 'decode' or 'prefill', got "
                     f"{part!r}")


def _weight_only_launches(sms: int = 132) -> list:
    """(m, n, k, split_k, tile, w_a, dtype name) of :data:`WEIGHT_ONLY_TILES`' work: the
    probe's launches (bf16) and the every-tile test's (bf16 and float32)."""
    from ..backends.triton.dynamic import weight_only_forms
    out = [(m, n, k, s, t, w, "bfloat16") for part in ("decode", "prefill")
           for n, k in WO_PROBE_SHAPES
           for m, s, t, w in weight_only_probe_launches(part, n, k, sms)]
    out += [(m, WO_TEST_N, k, s, t, w, dt) for t, w in weight_only_forms()
            for dt in ("bfloat16", "float32") for m, k, s in weight_only_test_shapes(t)]
    return out


def _warm_weight_only(idx: int) -> None:
    """Launch one of :func:`_weight_only_launches` on CPU tensors (inside the stand-in)."""
    import torch

    from ..backends.triton import dynamic as D
    m, n, k, split, tile, w_a, dt = _weight_only_launches()[idx]
    D.linear_weight_only(torch.zeros(m, k, dtype=getattr(torch, dt)),
                         torch.zeros(n, k, dtype=torch.int8), torch.ones(n), torch.zeros(n),
                         split_k=split, tile=tile, w_a=w_a)


GLUON_TILES = "gluon_tiles"
# (m, n, k) of the Gluon probe (bench/probes/gluon_int8_wgmma.py): a ragged shape first (M, N
# and the K tail not multiples of any tile; n and k multiples of 8 for torch._int_mm, its
# reference), then issue 6's gemm rows and issue 12's W8A8 prefill rows (m = 2048)
GLUON_PROBE_SHAPES = [(333, 520, 1040), (4096, 4096, 4096), (8192, 8192, 8192),
                      (2048, 4096, 4096), (2048, 11008, 4096), (2048, 4096, 11008)]
# (m, n, k) of the every-config GPU test (tests/backends/test_triton_gemm_sm90.py): ragged
# (M, N and the K tail past every tile) and deep; and of its tuned-path test
GLUON_TEST_SHAPES = ((333, 520, 1040), (256, 384, 4096))
GLUON_TUNED_SHAPE = (512, 768, 2048)


def _gluon_requant(n: int, k: int, activation: str, big: bool, g):
    """A per-channel qint8 Requant whose outputs spread over the range for an accumulator of
    ``k`` random int8 products; ``big``: every other channel's multiplier >= 1 (negative
    rshifts: the general form)."""
    import torch

    from .. import qint8
    from ..functional.requant import make_requant
    w_scale = torch.rand(n, dtype=torch.float64, generator=g) * 0.9 + 0.1
    if big:
        w_scale[::2] *= 2.0 ** torch.randint(3, 9, (len(w_scale[::2]),), generator=g).double()
    out_scale = 0.02 * float(w_scale.median()) * 60.0 * k ** 0.5  # ~ +-60 output steps
    zp = int(torch.randint(-10, 11, (), generator=g))
    return make_requant(0.02, w_scale, out_scale, zp, qint8, activation)


def gluon_test_calls(m: int, n: int, k: int, seed: int = 0) -> list:
    """``(what, op, args)`` on CPU tensors: the triton backend's int8 Linear ops in every
    epilogue form the Gluon kernel takes (requantized with a ReLU: the folded form with the
    tie rule dropped; without one: folded, split epilogue; with negative rshifts: the
    general form, split; a fused residual add; dequantized; bare int32), and the W8A8
    Linear in bf16 / fp16 / fp32 with and without bias: 13 GEMMs. The every-config GPU
    test runs these against the NumPy oracle, and :data:`GLUON_TILES` compiles them."""
    import torch

    from .. import qint8
    from ..functional.requant import make_add_params
    g = torch.Generator().manual_seed(seed * 1009 + m * 7 + n * 3 + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    b = torch.randint(-5000, 5000, (n,), dtype=torch.int32, generator=g)
    relu = _gluon_requant(n, k, "relu", False, g)
    plain = _gluon_requant(n, k, "none", False, g)
    big = _gluon_requant(n, k, "relu6", True, g)
    res = torch.randint(-128, 128, (m, n), dtype=torch.int8, generator=g)
    p = make_add_params(0.04, plain.zero_point, 0.05, 3, 0.06, -2, qint8)
    xs = torch.rand(m, generator=g) * 0.1 + 0.01
    ws = torch.rand(n, generator=g) * 0.1 + 0.01
    fb = torch.randn(n, generator=g)
    scale = torch.tensor(0.03)
    out = [("linear relu", "linear", (x, 3, w, b, relu)),
           ("linear_dequant relu", "linear_dequant", (x, 3, w, b, relu, scale)),
           ("linear_int32", "linear_int32", (x, 3, w, b)),
           ("linear folded", "linear", (x, 3, w, b, plain)),
           ("linear general", "linear", (x, 3, w, b, big)),
           ("linear_add", "linear_add", (x, 3, w, b, plain, res, p)),
           ("linear_dequant folded", "linear_dequant", (x, 3, w, b, plain, scale))]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for bias in (fb, None):
            out.append((f"linear_dynamic {dt} bias {bias is not None}", "linear_dynamic",
                        (x, xs, w, ws, bias, dt)))
    return out


# (batch, C, H, W, O, kernel, stride, padding, dilation) of the Gluon conv's GPU test: a
# 3x3 layer with ragged output channels and pixels, a strided one with 128 channels, a
# strided 1x1 (resnet50's downsampling), a dilated one, a 5x5 on a non-square image
GLUON_CONV_TEST_LAYERS = ((2, 64, 14, 14, 96, 3, 1, 1, 1), (3, 128, 15, 15, 64, 3, 2, 1, 1),
                          (2, 64, 16, 16, 40, 1, 2, 0, 1), (1, 64, 20, 20, 64, 3, 1, 2, 2),
                          (2, 64, 12, 9, 32, 5, 1, 2, 1))


# (batch, C, H, O, kernel, stride, padding) of the Gluon probe's conv part: resnet50's 3x3
# layers at batch 64 (each stage's stride-1 layer, and the strided one of stage 2)
GLUON_CONV_PROBE_LAYERS = ((64, 64, 56, 64, 3, 1, 1), (64, 128, 56, 128, 3, 2, 1),
                           (64, 128, 28, 128, 3, 1, 1), (64, 256, 14, 256, 3, 1, 1),
                           (64, 512, 7, 512, 3, 1, 1))


def gluon_conv_probe_call(layer, device="cpu") -> tuple:
    """``(args, ops)`` of the Gluon probe's conv on ``layer`` (one of
    :data:`GLUON_CONV_PROBE_LAYERS`): the triton ``conv2d`` op's arguments (random int8
    channels_last activations, zero point 0, a per-channel requantization without an
    activation, as the conv suite's: its Triton kernels are warmed there) on ``device``, and
    the operations of one call."""
    import torch

    from .. import qint8
    from ..functional.requant import make_requant
    nb, c, h, o, k, st, pad = layer
    g = torch.Generator().manual_seed(nb + c + h + o + k + st)
    x = torch.randint(-128, 128, (nb, c, h, h), dtype=torch.int8, generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (o, c, k, k), dtype=torch.int8, generator=g).to(device)
    b = torch.randint(-5000, 5000, (o,), dtype=torch.int32, generator=g).to(device)
    w_scale = torch.rand(o, dtype=torch.float64, generator=g) * 0.9 + 0.1
    rq = make_requant(0.02, w_scale, 0.02 * float(w_scale.median()) * 60.0 * (c * k * k) ** 0.5,
                      0, qint8)
    ho = (h + 2 * pad - k) // st + 1
    return (x, 0, w, b, (st, st), (pad, pad), (1, 1), 1, rq), 2 * nb * ho * ho * o * c * k * k


def gluon_conv_test_calls(layer, seed: int = 0) -> list:
    """``(what, op, args)`` on CPU tensors: the triton backend's int8 conv ops on ``layer``
    (one of :data:`GLUON_CONV_TEST_LAYERS`; zero point 0, channels_last) in every epilogue
    form the Gluon conv takes (requantized with a ReLU, without one, with negative rshifts,
    a fused residual add, dequantized, bare int32): 6 convolutions. The Gluon conv's GPU
    test runs these against the NumPy oracle, and :data:`GLUON_TILES` compiles them."""
    import torch

    from .. import qint8
    from ..functional.requant import make_add_params
    nb, c, h, w_, o, k, st, pad, dil = layer
    g = torch.Generator().manual_seed(seed * 1009 + nb * c * h * w_ + o * k + st + pad * dil)
    x = torch.randint(-128, 128, (nb, c, h, w_), dtype=torch.int8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (o, c, k, k), dtype=torch.int8, generator=g)
    b = torch.randint(-5000, 5000, (o,), dtype=torch.int32, generator=g)
    kk = c * k * k
    relu, plain = _gluon_requant(o, kk, "relu", False, g), _gluon_requant(o, kk, "none", False, g)
    big = _gluon_requant(o, kk, "relu6", True, g)
    ho = (h + 2 * pad - dil * (k - 1) - 1) // st + 1
    wo = (w_ + 2 * pad - dil * (k - 1) - 1) // st + 1
    res = torch.randint(-128, 128, (nb, o, ho, wo), dtype=torch.int8, generator=g)
    res = res.contiguous(memory_format=torch.channels_last)
    p = make_add_params(0.04, plain.zero_point, 0.05, 3, 0.06, -2, qint8)
    geo = (x, 0, w, b, (st, st), (pad, pad), (dil, dil), 1)
    return [("conv2d relu", "conv2d", geo + (relu,)),
            ("conv2d folded", "conv2d", geo + (plain,)),
            ("conv2d general", "conv2d", geo + (big,)),
            ("conv2d_add", "conv2d_add", geo + (plain, res, p)),
            ("conv2d_dequant", "conv2d_dequant", geo + (relu, torch.tensor(0.03))),
            ("conv2d_int32", "conv2d_int32", geo)]


def _gluon_launches() -> list:
    """``(part, config index, m, n, k)`` of :data:`GLUON_TILES`' work, every config: the
    probe's bare int32 GEMM (forced) and W8A8 GEMM at m = 2048 (tuned; every config, whatever
    the tuning mode), the every-config GPU test's calls, the tuned-path test's W8A8 GEMM (the
    tests tune in full);
    and ``("conv" | "conv_probe", config index, layer index, 0, 0)``: the Gluon conv's GPU
    test and its probe part, each config on the layers whose channels its block divides."""
    from ..backends.triton import conv_sm90
    from ..backends.triton.gemm_sm90 import CONFIGS
    shapes = {"int32": GLUON_PROBE_SHAPES, "test": GLUON_TEST_SHAPES,
              "w8a8": [s for s in GLUON_PROBE_SHAPES if s[0] == 2048] + [GLUON_TUNED_SHAPE]}
    out = [(part, c, m, n, k) for part in ("int32", "w8a8", "test")
           for c in range(len(CONFIGS)) for m, n, k in shapes[part]]
    # the Gluon conv's test: each config on each layer whose channels its BLOCK_K divides
    return out + [(part, c, i, 0, 0) for part, layers in (("conv", GLUON_CONV_TEST_LAYERS),
                                                          ("conv_probe", GLUON_CONV_PROBE_LAYERS))
                  for c, cfg in enumerate(conv_sm90.CONFIGS)
                  for i, layer in enumerate(layers) if layer[1] % cfg[2] == 0]


def _warm_gluon(idx: int) -> None:
    """Launch one of :func:`_gluon_launches` on CPU tensors (inside the stand-in), its config
    forced."""
    import torch

    from ..backends import get_backend
    from ..backends.triton import gemm_sm90 as S
    part, c, m, n, k = _gluon_launches()[idx]
    ops = get_backend("triton").OPS
    if part in ("conv", "conv_probe"):
        from ..backends.triton import conv_sm90
        calls = gluon_conv_test_calls(GLUON_CONV_TEST_LAYERS[m]) if part == "conv" else \
            [(None, "conv2d", gluon_conv_probe_call(GLUON_CONV_PROBE_LAYERS[m])[0])]
        with S.use(True), conv_sm90.force(conv_sm90.CONFIGS[c]):
            for _, op, args in calls:
                ops[op](*args)
        return
    with S.use(True, config=S.CONFIGS[c]):
        if part == "test":
            for _, op, args in gluon_test_calls(m, n, k):
                ops[op](*args)
            return
        # zeros: the probe's values do not change what compiles
        a, b = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
        if part == "int32":
            ops["linear_int32"](a, 0, b, torch.zeros(n, dtype=torch.int32))
        else:
            ops["linear_dynamic"](a, torch.ones(m), b, torch.ones(n),
                                  None if (m, n, k) == GLUON_TUNED_SHAPE else torch.ones(n),
                                  torch.bfloat16)


def work_list(suites: Sequence[str]) -> List[Tuple[str, int]]:
    """``(suite, case index)`` of every quick case of ``suites`` (CPU-built); for
    :data:`WEIGHT_ONLY_TILES`, an index into its launches."""
    from .suites import load_suite
    out = []
    for name in suites:
        n = len(_weight_only_launches()) if name == WEIGHT_ONLY_TILES else \
            len(_gluon_launches()) if name == GLUON_TILES else \
            len(load_suite(name).cases(True, "cpu"))
        out += [(name, i) for i in range(n)]
    return out


def _warm_cases(items: Sequence[Tuple[str, int]]) -> Tuple[int, int]:
    """Run in a worker: (cases done, provider failures)."""
    import contextlib

    import torch

    from .. import backends
    from ..backends.triton import gemm_sm90
    from ..backends.triton.standin import standin_cuda
    from .harness import ProviderUnavailable
    from .suites import load_suite
    from .tcache import KEY_ENV, patch_triton_key
    torch.set_num_threads(1)
    key = os.environ.get(KEY_ENV)
    if key:  # building a cache for another machine's Triton build (:mod:`.tcache`)
        patch_triton_key(key)
    gemm_sm90.STANDIN_COMPILES_ALL = True  # the Gluon rows' tuning candidates
    done = failed = 0
    cache = {}
    tiles = {WEIGHT_ONLY_TILES: _warm_weight_only, GLUON_TILES: _warm_gluon}
    with standin_cuda(cubin=True), backends.use("triton"):
        for name, idx in items:
            if name in tiles:
                try:
                    tiles[name](idx)
                    done += 1
                except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                    print(f"warm: {name} {idx}: {type(e).__name__}: {str(e)[:200]}",
                          file=sys.stderr)
                    failed += 1
                continue
            if name not in cache:
                cache[name] = load_suite(name).cases(True, "cpu")
            case = cache[name][idx]
            try:
                inputs = case.inputs(0)
            except Exception as e:  # noqa: BLE001 - a case we cannot build here is skipped
                print(f"warm: {name} {case.name}: inputs: {type(e).__name__}: {e}",
                      file=sys.stderr)
                failed += 1
                continue
            for pname in case.providers:
                setup = _warm_setup(name, pname, case.providers)
                if setup is None:
                    continue
                try:
                    with _ShapeConv() if name == "qat_step" else contextlib.nullcontext():
                        setup(inputs)()
                except ProviderUnavailable:
                    pass
                except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                    print(f"warm: {name} {case.name} {pname}: {type(e).__name__}: "
                          f"{str(e)[:200]}", file=sys.stderr)
                    failed += 1
            done += 1
    return done, failed


def _worker(argv: Sequence[str]) -> int:
    items = [(s.split(":")[0], int(s.split(":")[1])) for s in argv]
    t0 = time.time()
    done, failed = _warm_cases(items)
    print(f"warm worker: {done}/{len(items)} cases, {failed} failures, "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuquant.bench.warm",
                                description="compile the GPU suites' Triton kernels ahead, "
                                            "on the CPU, in parallel")
    p.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                   help="comma-separated suite names (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="worker processes (default: CPUs - 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="stop the workers after this many seconds")
    p.add_argument("--nice", type=int, default=19, help="CPU priority of the workers")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.budget is not None and not args.budget > 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    suites = [s for s in args.suites.split(",") if s]
    if not suites:
        p.error(f"--suites: no suite named in {args.suites!r}")
    try:
        items = work_list(suites)
    except ValueError as e:
        p.error(f"--suites: {e}")
    jobs = min(args.jobs, len(items)) or 1
    shares = [items[i::jobs] for i in range(jobs)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # workers never touch the GPU
    env.setdefault("GPUQUANT_TRITON_TUNE", "quick")
    t0 = time.time()
    nice = (lambda: os.nice(args.nice)) if args.nice and hasattr(os, "nice") else None
    procs = [subprocess.Popen([sys.executable, "-m", "gpuquant.bench.warm", "--worker"]
                              + [f"{n}:{i}" for n, i in share], env=env, preexec_fn=nice)
             for share in shares if share]
    print(f"warm: {len(items)} cases of {', '.join(suites)} on {len(procs)} workers",
          flush=True)
    rc = 0
    for proc in procs:
        left = None if args.budget is None else max(0.0, args.budget - (time.time() - t0))
        try:
            rc |= proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 1
    print(f"warm: done in {time.time() - t0:.0f} s (exit {rc})", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
