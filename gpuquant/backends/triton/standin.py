"""A stand-in CUDA driver: Triton's real launch path on a machine without a GPU.

Inside :func:`standin_cuda` the kernels are compiled for ``sm_<cc>`` (TTIR -> PTX; no cubin,
``ptxas`` is skipped, unless ``cubin=True``), "loaded" without a device, and every launch is
recorded instead of run, with the arguments Triton's launcher receives. CPU tensors stand
for device tensors (their data pointers are what the launcher would get). Nothing is
computed: outputs hold whatever ``torch.empty`` gave. Three uses:

* CI checks that :mod:`.launch`'s plans hand the launcher exactly what Triton's own path does
  (``tests/backends/test_triton_fast_launch.py``);
* warming a GPU machine's Triton cache on its CPU cores (:mod:`gpuquant.bench.warm`,
  ``cubin=True``);
* the host time of launches, i.e. what the GPU's host CPU spends in Python per kernel::

      env -u TRITON_INTERPRET python -m gpuquant.backends.triton.standin resnet50

  prints an eager int8 forward's host time with Triton's launch path and with launch
  plans (``GPUQUANT_TRITON_TUNE=quick`` keeps the first call's compiles short); with
  ``--qat resnet50`` the float and QAT training steps' (:func:`qat_host_time`); with
  ``--layer`` a QAT Conv+BN+ReLU layer's against the float one's (:func:`layer_host_time`);
  with ``--fake-quant`` the fake-quant op's (:func:`fake_quant_host_time`); with
  ``--linear`` a decode step's dynamic / weight-only Linear against ``F.linear``
  (:func:`linear_host_time`).

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces the jitted kernels).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

__all__ = ["standin_cuda", "StandInDriver", "TensorRecord", "host_time", "qat_host_time",
           "layer_host_time", "fake_quant_host_time", "linear_host_time"]


_LAUNCHES: list = []


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return ("module", 1, 64, 0, 1024)  # module, function, registers, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class TensorRecord(tuple):
    """What a launch saw of a tensor argument: (dtype, shape, strides, data pointer)."""

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorRecord":
        return cls((t.dtype, tuple(t.shape), t.stride(), t.data_ptr()))

    dtype = property(lambda self: self[0])
    shape = property(lambda self: self[1])

    def stride(self):
        return self[2]

    def data_ptr(self):
        return self[3]


class StandInDriver:
    """The parts of Triton's CUDA driver its JIT, autotuner and launcher use; ``launches``
    holds (kernel name, grid, launcher arguments after the metadata, tensors as
    :class:`TensorRecord`) per launch."""

    def __init__(self, cc: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", cc, 32)
        # one list for every instance: a kernel compiled under an earlier stand-in keeps
        # the launcher it was given, and records into this list too
        _LAUNCHES.clear()
        self.launches = launches = _LAUNCHES
        self.utils = _Utils()

        class Launcher:
            def __init__(self, src, metadata):
                self.name = getattr(getattr(src, "fn", None), "__name__", str(src))

            def __call__(self, gx, gy, gz, stream, function, packed_metadata,
                         launch_metadata, enter_hook, exit_hook, *args):
                if not (gx < 2 ** 31 and gy <= 65535 and gz <= 65535):
                    raise RuntimeError(f"{self.name}: grid {(gx, gy, gz)} is past CUDA's "
                                       f"limits (x < 2^31, y and z <= 65535)")
                # tensors as records: holding them would keep the launch's outputs
                # referenced (autograd then copies a gradient it could have taken)
                launches.append((self.name, (gx, gy, gz),
                                 tuple(TensorRecord.of(a) if isinstance(a, torch.Tensor)
                                       else a for a in args)))
        self.launcher_cls = Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kw):  # every autotune config "takes" 1 ms
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16)

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def standin_cuda(cc: int = 90, family: str = "sm90", cubin: bool = False, sms: int = 132):
    """Within: Triton's active driver is a :class:`StandInDriver` (yielded), the launchers
    choose ``family``'s configs and size grids for ``sms`` multiprocessors, and the triton
    backend takes CPU tensors. Everything is restored on exit.

    ``cubin`` False (measuring host time, checking launch arguments): no cubin is built
    (``ptxas`` skipped) and Triton's cache is a private temporary directory, so the empty
    binaries never land where a real launch could load them (``GPUQUANT_STANDIN_CACHE``
    names a directory to use instead, kept across calls and processes: the test suite's
    stand-in runs share their compiles through it; never a real Triton cache). True
    (warming the cache for a GPU machine, :mod:`gpuquant.bench.warm`): real sm_``cc``
    cubins, built by the ``ptxas`` Triton ships, into the usual cache
    (``TRITON_CACHE_DIR``), keyed exactly as a launch on the GPU keys them."""
    import tempfile

    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import driver

    from ... import backends
    from .. import registry
    from . import conv, depthwise, dynamic, fake_quant, gemm, observer
    from .common import INTERPRET, triton_cache_dir
    if INTERPRET:
        raise RuntimeError("standin_cuda needs TRITON_INTERPRET unset (the interpreter "
                           "replaces the jitted kernels)")
    saved = [(m, "arch_family", m.arch_family) for m in (conv, gemm, depthwise, dynamic)]
    saved += [(m, "_target_programs", m._target_programs) for m in (fake_quant, observer)]
    real_cubin, real_avail = CUDABackend.make_cubin, torch.cuda.is_available
    fake = StandInDriver(cc)
    was_loaded, why_not = registry._loaded.get("triton"), registry._unavailable.pop("triton", None)
    shared = None if cubin else os.environ.get("GPUQUANT_STANDIN_CACHE") or None
    private = None if cubin or shared else tempfile.TemporaryDirectory(prefix="gpuquant-standin-")
    cache = contextlib.nullcontext() if cubin else triton_cache_dir(shared or private.name)
    with cache:  # cubin False: the stand-in's own cache (above)
        try:
            if not cubin:
                CUDABackend.make_cubin = lambda self, src, metadata, *a, **k: b""
            for m, name, _ in saved:
                if name == "arch_family":
                    setattr(m, name, lambda dev: family)
                else:  # reduction grids as on the GPU (4 programs a multiprocessor)
                    setattr(m, name, lambda device: 4 * sms)
            torch.cuda.is_available = lambda: True  # the backend loads as on a GPU machine
            mod = backends.get_backend("triton")
            torch.cuda.is_available = real_avail
            saved.append((mod, "DEVICES", mod.DEVICES))
            mod.DEVICES = frozenset({"cpu", "cuda"})
            driver.set_active(fake)
            yield fake
        finally:
            torch.cuda.is_available = real_avail
            CUDABackend.make_cubin = real_cubin
            if private is not None:
                private.cleanup()
            for m, name, v in saved:
                setattr(m, name, v)
            driver._active = None  # back to the default (created on next use)
            if was_loaded is None:  # the backend's availability as it was: no GPU here
                registry._loaded.pop("triton", None)
            if why_not is not None:
                registry._unavailable["triton"] = why_not


def _best_seconds(fn, reps: int, rounds: int = 5) -> float:
    """Seconds a call of ``fn``: the best of ``rounds`` timings of ``reps`` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def host_time(model: str = "resnet50", size: int = 64, batch: int = 1, reps: int = 10):
    """{plans: ms} of one eager int8 ``model`` forward's host time, launch plans off / on
    (best of 5 x ``reps``), and the number of launches a forward."""
    from ... import backends
    from ...bench.suites.models import _int8_model
    from . import launch
    net = _int8_model(model, 3, size, "cpu")
    x = torch.randn(batch, 3, size, size)
    out, enabled = {}, launch.ENABLED
    with standin_cuda() as fake, torch.no_grad(), backends.use("triton"):
        net(x)  # compiles and autotunes every kernel once
        fake.launches.clear()
        net(x)
        out["launches"] = len(fake.launches)
        for plans in (False, True):
            launch.ENABLED = plans
            net(x)
            out[plans] = _best_seconds(lambda: net(x), reps) * 1e3
        launch.ENABLED = enabled
    return out


def qat_host_time(model: str = "resnet50", kinds=("float", "gpuquant-qat"), reps: int = 3,
                  narrow: bool = True):
    """{provider: (ms, Triton launches)} of one training step of the ``qat_step`` suite's
    providers at batch 2, 32x32, bf16 autocast: the Triton launches counted, then the
    compiled kernels' launcher a no-op, the convolutions replaced by their output's shape
    (:class:`gpuquant.bench.warm._ShapeConv`), one thread, the garbage collector off (as the
    benchmark times). ``narrow``: the model at 1/8 of its width (same layers and launches),
    so the CPU compute of the SGD update and the weights' casts (25 M parameters at full
    width) is small and what is left is the host's work a step. A kind ending in
    ``-no-replays``: that provider with replays (:func:`.launch.replays`) off. Best of 5 x
    ``reps``, the kinds' timings interleaved."""
    import gc

    from ... import backends
    from ...bench.suites import qat_step as Q
    from ...bench.warm import _ShapeConv
    from . import launch as L
    params = {"model": model, "batch": 2, "resolution": 32, "dtype": "bfloat16"}
    inp = Q._make_inputs(params, "cpu")(0)
    build, threads = Q._gpuquant_model, torch.get_num_threads()
    Q._gpuquant_model = lambda name: build(name, narrow=narrow)
    torch.set_num_threads(1)
    try:
        with standin_cuda() as fake, backends.use("triton"), _ShapeConv():
            steps, launcher = {}, None
            for kind in kinds:  # "...-no-replays": that provider, replays off
                L.REPLAYS = not kind.endswith(_NO_REPLAYS)
                step = Q._provider(kind.removesuffix(_NO_REPLAYS), params, {}).setup(inp)
                step()
                step()
                fake.launches.clear()
                step()
                steps[kind] = (step, L.REPLAYS, len(fake.launches))
            plans = [p for p in L._PLANS.values() if p is not L._NO_PLAN]
            launcher = type(plans[0][0].run) if plans else None
            if launcher is not None:
                record, launcher.__call__ = launcher.__call__, lambda *a: None
            gc.collect()
            gc.disable()
            best = dict.fromkeys(kinds, float("inf"))
            try:
                for _ in range(5):  # the kinds interleaved: this machine's noise is slow
                    for kind, (step, on, _) in steps.items():
                        L.REPLAYS = on
                        best[kind] = min(best[kind], _best_seconds(step, reps, rounds=1))
            finally:
                gc.enable()
                if launcher is not None:
                    launcher.__call__ = record
            out = {kind: (best[kind] * 1e3, steps[kind][2]) for kind in kinds}
    finally:
        Q._gpuquant_model = build
        torch.set_num_threads(threads)
        L.REPLAYS = True
    return out


_NO_REPLAYS = "-no-replays"


def layer_host_time(layers: int = 8, reps: int = 200) -> dict:
    """{form: host microseconds a layer} of a training step (forward + backward, grads set
    to None) through a chain of ``layers`` ``ConvBnRelu2d(16, 16, 1)`` at batch 2, 4x4, for
    the float layer, the QAT layer (one autograd node: ``conv_bn_act_train``, its steps
    replayed from layer plans), the same without replays, and the QAT layer in its
    three-node form (that op declined). The compiled kernels' launcher is a
    no-op here, so what is timed is Python, PyTorch's dispatch (and its CPU compute of the
    tiny tensors, one thread) and the launch path, not the stand-in's recording. Best of
    9 x ``reps``, GC off."""
    import copy
    import gc

    from ... import backends
    from ... import nn as gnn
    from ...bench.suites.qat_step import qat_qconfig
    from ...quantization import quantize_qat
    from . import OPS
    from . import launch as L
    torch.manual_seed(0)
    cl = torch.channels_last
    f = torch.nn.Sequential(*[gnn.ConvBnRelu2d(16, 16, 1) for _ in range(layers)])
    f = f.train().to(memory_format=cl)
    q = quantize_qat(copy.deepcopy(f), qat_qconfig()).train().to(memory_format=cl)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=cl)
    out = {}
    one_node = OPS["conv_bn_act_train"]
    with standin_cuda(), backends.use("triton"):
        def step(m):
            for p in m.parameters():
                p.grad = None
            m(x).sum().backward()
        for _ in range(2):  # compiles, plans, observer state
            step(q)
        launcher = type(next(p for p in L._PLANS.values() if p is not L._NO_PLAN)[0].run)
        record, launcher.__call__ = launcher.__call__, lambda *a: None
        gc.collect()
        gc.disable()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the tiny CPU ops: no thread-pool hand-offs
        try:
            for form, m in (("float", f), ("qat", q), ("qat-no-replays", q),
                            ("qat-three-node", q)):
                OPS["conv_bn_act_train"] = (lambda *a, **k: None) if form.endswith("node") \
                    else one_node
                L.REPLAYS = form != "qat-no-replays"
                step(m)
                out[form] = _best_seconds(lambda: step(m), reps, rounds=9) / layers * 1e6
        finally:
            gc.enable()
            torch.set_num_threads(threads)
            OPS["conv_bn_act_train"] = one_node
            L.REPLAYS = True
            launcher.__call__ = record
    return out


def fake_quant_host_time(reps: int = 1000) -> dict:
    """{granularity: host microseconds} of the ``fake_quant`` suite's ``gpuquant-triton``
    fwd+bwd call (:func:`.fake_quant.fake_quant`, then ``torch.autograd.grad``) on a
    (2, 64, 4, 4) channels_last tensor, the compiled launcher a no-op; and of PyTorch's
    per-channel op the same way (its CPU compute of 2048 elements included). Best of
    7 x ``reps``, one thread."""
    from .fake_quant import fake_quant
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    qp = {"per_tensor": (torch.tensor(0.02), torch.tensor(128, dtype=torch.int32), 0, 255, None),
          "per_channel": (torch.rand(64) * 0.02 + 0.005, torch.zeros(64, dtype=torch.int32),
                          -128, 127, 1)}
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with standin_cuda():
        from . import launch as L

        def run(fq):
            return lambda: torch.autograd.grad(fq(xg), xg, g)
        calls = {k: run(lambda t, a=a: fake_quant(t, *a)) for k, a in qp.items()}
        s, z = qp["per_channel"][:2]
        calls["torch per_channel"] = run(
            lambda t: torch.fake_quantize_per_channel_affine(t, s, z, 1, -128, 127))
        for fn in calls.values():
            fn()  # compiles
        launcher = type(next(p for p in L._PLANS.values() if p is not L._NO_PLAN)[0].run)
        record, launcher.__call__ = launcher.__call__, lambda *a: None
        try:
            for name, fn in calls.items():
                out[name] = _best_seconds(fn, reps, rounds=7) * 1e6
        finally:
            launcher.__call__ = record
            torch.set_num_threads(threads)
    return out


def linear_host_time(reps: int = 2000) -> dict:
    """{provider: host microseconds} of the ``linear_dynamic`` suite's decode call (one token,
    bf16, no grad, backend chosen outside the call) for ``torch.nn.functional.linear`` and
    the W8A8 dynamic and weight-only modules (memoised path), on a 64 x 64 Linear, the
    compiled launcher a no-op; the first two calls (compiles, memo) untimed. Best of
    7 x ``reps``, one thread, GC off."""
    import gc

    from ... import backends
    from ...nn.quantized.linear_dynamic import DynamicLinear, WeightOnlyLinear
    from . import launch as L
    lin = torch.nn.Linear(64, 64).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    w, b = lin.weight.detach(), lin.bias.detach()
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with standin_cuda(), torch.no_grad(), backends.use("triton"):
        mods = {"gpuquant-triton (W8A8)": DynamicLinear.from_float_module(lin).eval(),
                "gpuquant-triton-w8": WeightOnlyLinear.from_float_module(lin).eval()}
        for m in mods.values():
            m(x)
            m(x)
        launcher = type(next(p for p in L._PLANS.values() if p is not L._NO_PLAN)[0].run)
        record, launcher.__call__ = launcher.__call__, lambda *a: None
        gc.collect()
        gc.disable()
        try:
            out["torch F.linear"] = _best_seconds(
                lambda: torch.nn.functional.linear(x, w, b), reps, rounds=7) * 1e6
            for name, m in mods.items():
                out[name] = _best_seconds(lambda m=m: m(x), reps, rounds=7) * 1e6
        finally:
            gc.enable()
            launcher.__call__ = record
            torch.set_num_threads(threads)
    return out


_USAGE = """usage: python -m gpuquant.backends.triton.standin [MODEL ...]
       python -m gpuquant.backends.triton.standin --qat [MODEL ...] | --layer | --fake-quant | --linear

Host time of gpuquant's launches with a stand-in CUDA driver (no GPU): an eager int8 forward
of each MODEL (gpuquant.models builders; default resnet50), a QAT training step (--qat), one
QAT Conv+BN+ReLU layer (--layer), the fake-quant op (--fake-quant), a decode-step Linear
(--linear). Run with TRITON_INTERPRET unset."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    from ... import models
    flags = ("--qat", "--layer", "--fake-quant", "--linear")
    bad = [a for a in argv if a.startswith("-") and (a not in flags or a != argv[0])] + \
        [a for a in argv if not a.startswith("-") and a not in models._BUILDERS]
    if bad:
        print(f"standin: unknown argument {bad[0]!r}; models: {sorted(models._BUILDERS)}\n"
              f"{_USAGE}", file=sys.stderr)
        return 2
    from . import common
    if common.INTERPRET:  # standin_cuda would raise: say how to run it instead
        print("standin: TRITON_INTERPRET is set (the interpreter replaces the jitted kernels); "
              "run: env -u TRITON_INTERPRET python -m gpuquant.backends.triton.standin "
              f"{' '.join(argv)}".rstrip(), file=sys.stderr)
        return 2
    if argv and argv[0] == "--linear":
        for name, us in linear_host_time().items():
            print(f"decode Linear (1 x 64 x 64, bf16), {name}: host {us:.1f} us")
        return 0
    if argv and argv[0] == "--fake-quant":
        for name, us in fake_quant_host_time().items():
            print(f"fake_quant fwd+bwd, {name}: host {us:.0f} us")
        return 0
    if argv and argv[0] == "--layer":
        for form, us in layer_host_time().items():
            print(f"ConvBnRelu2d {form}: host {us:.0f} us a layer (forward + backward)")
        return 0
    if argv and argv[0] == "--qat":
        for model in argv[1:] or ["resnet50"]:
            kinds = ("float", "gpuquant-qat", "gpuquant-qat" + _NO_REPLAYS)
            for kind, (ms, n) in qat_host_time(model, kinds).items():
                print(f"{model}: {kind} training step, host {ms:.1f} ms ({n} Triton launches)")
        return 0
    for model in argv or ["resnet50"]:
        r = host_time(model)
        print(f"{model}: eager int8 forward, host time {r[False]:.2f} ms with Triton's launch "
              f"path, {r[True]:.2f} ms with launch plans ({r['launches']} launches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
