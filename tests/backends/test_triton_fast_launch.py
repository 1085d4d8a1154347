"""The memoised launch plans of :mod:`gpuquant.backends.triton.launch` hand Triton's launcher
the same arguments as Triton's own launch path (``JITFunction.run`` through the autotuner and
heuristics wrappers), checked on the CPU: the kernels are compiled for sm_90 (PTX, no cubin)
and launched into a recorder by a stand-in CUDA driver (:mod:`gpuquant.backends.triton.standin`).
Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces the jitted kernels)."""
from __future__ import annotations

import pytest

from tests.compiled import run_json

_SCRIPT = r"""
import json
import torch
import gpuquant.backends as backends
from gpuquant.backends.triton import bn_act, conv, dynamic, elementwise, fake_quant, gemm, launch
from gpuquant.backends.triton import observer as tobs
from gpuquant.backends.triton.common import module_tickets
from gpuquant.backends.triton.standin import TensorRecord, standin_cuda
from gpuquant.dtypes import qint8
from gpuquant.functional.requant import make_requant
from gpuquant.quantization import ExponentialMovingAverageObserver, FakeQuantize
torch.manual_seed(0)
CL = torch.channels_last
rq = make_requant(0.02, torch.rand(24, dtype=torch.float64) * 0.01 + 0.001, 0.5, 0, qint8)
x = torch.randint(-128, 128, (2, 64, 9, 9), dtype=torch.int8).contiguous(memory_format=CL)
w = torch.randint(-127, 128, (24, 64, 1, 1), dtype=torch.int8)
xs = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8).contiguous(memory_format=CL)
ws = torch.randint(-127, 128, (24, 3, 7, 7), dtype=torch.int8)
wd = torch.randint(-127, 128, (64, 1, 3, 3), dtype=torch.int8)
rqd = make_requant(0.02, torch.rand(64, dtype=torch.float64) * 0.01 + 0.001, 0.5, 0, qint8)
xf = torch.randn(4, 6, 5, 7)
obs, fqm = ExponentialMovingAverageObserver(0.9, qint8, check_finite=False), FakeQuantize(qint8)
bn, v6 = torch.nn.BatchNorm2d(6), torch.rand(6) + 0.5
zc = torch.randn(4, 6, 5, 8).contiguous(memory_format=CL)
xb, wqd = torch.randn(1, 1024), torch.randint(-127, 128, (96, 1024), dtype=torch.int8)
def tri(f):
    with backends.use("triton"):  # the fused QAT ops take CPU tensors only when chosen
        return f()
from gpuquant.backends.triton import gemm_sm90
xg = torch.randint(-128, 128, (256, 64), dtype=torch.int8)
rq_relu = make_requant(0.02, torch.rand(24, dtype=torch.float64) * 0.01 + 0.001, 0.5, 0, qint8,
                       "relu")
def gluon_gemm():  # the sm_90 Gluon kernel: two TMA descriptors among its arguments
    with gemm_sm90.use(True, config=gemm_sm90.CONFIGS[0]):
        return gemm.qgemm(xg, 0, w.reshape(24, 64), None, rq_relu, w_src=w)
cases = {
    # autotuned + heuristics, callable grid (implicit-GEMM conv, tap loop)
    "conv1x1_s2": lambda: conv.qconv2d(x, 3, w, None, (2, 2), (0, 0), (1, 1), 1, rq),
    # autotuned GEMM (1x1 stride-1 conv path), int8 residual epilogue variant
    # im2col (plain jit) then the GEMM: the 7x7 stem, uint8 input
    "stem_im2col": lambda: conv.qconv2d(xs, 128, ws, None, (2, 2), (3, 3), (1, 1), 1, rq),
    # few channels with an input height / width of 1 (Triton turns an int argument equal
    # to 1 into a constant: the im2col kernel's bounds must still compile)
    "im2col_h1": lambda: conv.qconv2d(xs[:, :, :1], 128, ws[:, :, :1, :3], None, (1, 1),
                                      (0, 1), (1, 1), 1, rq),
    "im2col_w1": lambda: conv.qconv2d(xs[:, :, :, :1], 128, ws[:, :, :3, :1], None, (1, 1),
                                      (1, 0), (1, 1), 1, rq),
    "linear": lambda: gemm.qgemm(x.permute(0, 2, 3, 1).reshape(-1, 64), 0, w.reshape(24, 64),
                                 torch.arange(24, dtype=torch.int32), rq, w_src=w),
    "depthwise": lambda: conv.qconv2d(x, 0, wd, None, (1, 1), (1, 1), (1, 1), 64, rqd),
    # plain jit, tuple grid
    "quantize": lambda: elementwise.quantize(xf, torch.tensor(0.05), torch.tensor(3), -128, 127,
                                             None, torch.int8),
    "fake_quant_fwd": lambda: fake_quant.fake_quant_forward(
        xf, torch.tensor(0.05), torch.tensor(3, dtype=torch.int32), -128, 127, None, True),
    # fused observer (row plan sized for 132 multiprocessors), batch norm + fake quant with
    # its last-program ticket, split-K weight-only decode with per-tile tickets
    "observe_fq": lambda: tri(lambda: tobs.observe_fake_quant(xf, obs, fqm)),
    "bn_act": lambda: tri(lambda: bn_act.bn_act_forward(
        zc, v6, v6, v6 * 1e-5, v6, None, bn.running_mean, bn.running_var,
        bn.num_batches_tracked, 0.1, obs, 1, module_tickets(bn, "cpu"))),
    "weight_only_split": lambda: dynamic.linear_weight_only(xb, wqd, torch.rand(96), None,
                                                            split_k=4),
    "gluon_gemm": gluon_gemm,
}
out = {}
with standin_cuda():
    programs = fake_quant._target_programs(torch.device("cpu"))
def norm(a):
    if isinstance(a, TensorRecord):
        return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
    return [type(a).__name__, a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)]
def as_plan_passes(triton_launches):
    # what a plan must hand the launcher for these launches of Triton's path: the same
    # list, with each tensor as its data pointer (an int; its alignment is compared)
    return [[k, g, [["pointer", a[-1]] if a[0] == "tensor" else a for a in args]]
            for k, g, args in triton_launches]
def plan_norm(launches, like):
    # a plan's launches normalised as like (as_plan_passes) has them: an int where
    # Triton's path passed a tensor stands for that pointer (its alignment kept)
    out = []
    for i, (k, g, args) in enumerate(launches):
        ref = like[i][2] if i < len(like) else []
        out.append([k, list(g), [["pointer", a % 16] if j < len(ref) and ref[j][0] == "pointer"
                                 and type(a) is int else norm(a) for j, a in enumerate(args)]])
    return out
with standin_cuda() as fk:
    for name, fn in cases.items():
        launch.ENABLED = False
        fn()  # compile and autotune (the autotuner's timing launches are recorded too)
        got = {}
        for mode in ("triton", "plan", "fast"):
            launch.ENABLED = mode != "triton"
            if mode == "plan":
                launch.clear_plans()
            fk.launches.clear()
            fn()
            if mode == "fast":
                got[mode] = plan_norm(fk.launches, want)
            else:  # Triton's path (the "plan" run makes the plans through it)
                got[mode] = [[k, list(g), [norm(a) for a in args]] for k, g, args in fk.launches]
                want = as_plan_passes(got[mode])
        out[name] = {"same": got["fast"] == want and got["plan"] == got["triton"],
                     "pointers": sum(a[0] == "tensor" for l in got["triton"] for a in l[2]),
                     "plans": sum(p is not launch._NO_PLAN for p in launch._PLANS.values()),
                     "launches": len(got["fast"]), "nargs": [len(l[2]) for l in got["fast"]],
                     "triton": got["triton"], "fast": got["fast"]}
from gpuquant.bench import autotune_choices
out["autotune"] = autotune_choices()
out["programs"] = programs
print("JSON" + json.dumps(out, default=str))
"""


def test_fast_launch_passes_the_launcher_what_triton_would(tmp_path):
    pytest.importorskip("triton")
    out = run_json(_SCRIPT, tmp_path / "triton_cache", GPUQUANT_TRITON_TUNE="quick")
    # what the benchmark runner writes next to each GPU suite: the config chosen per shape
    tuned = out.pop("autotune")
    assert out.pop("programs") == 4 * 132  # reduction grids sized as on an H100 / H200
    assert any(t.startswith("conv [sm90] key=") and "PIPE_TAPS: False" in t for t in tuned), tuned
    assert any(t.startswith("gemm [sm90] key=") for t in tuned), tuned
    assert out["gluon_gemm"]["triton"][0][0] == "_qgemm_sm90_kernel"
    for name, r in out.items():
        assert r["launches"] >= 1, (name, r)
        assert r["same"], (name, r["triton"], r["fast"])
        assert r["pointers"] >= 1, name  # tensors reach the launcher as their addresses
        assert r["plans"] == r["launches"], (name, r["plans"])  # every launch from a plan


def test_qat_step_host_time_runs_on_the_standin(tmp_path):
    """gpuquant.backends.triton.standin.qat_host_time: a resnet18 QAT training step on the
    stand-in driver (launches recorded, convolutions by shape) gives a host time and the
    step's Triton launches (none for the float step)."""
    pytest.importorskip("triton")
    script = ("import json\n"
              "from gpuquant.backends.triton.standin import qat_host_time\n"
              "r = qat_host_time('resnet18', reps=1)\n"
              "print('JSON' + json.dumps(r))\n")
    r = run_json(script, tmp_path / "triton_cache")
    (ms_f, n_f), (ms_q, n_q) = r["float"], r["gpuquant-qat"]
    assert n_f == 0 and n_q > 100 and ms_f > 0 and ms_q > 0


def test_layer_host_time_runs_on_the_standin(tmp_path):
    """gpuquant.backends.triton.standin.layer_host_time: host time a layer of the float,
    one-node QAT (with and without layer plans) and three-node QAT Conv+BN+ReLU forms (the
    compiled launcher a no-op), and the op and switch it toggles are restored afterwards."""
    pytest.importorskip("triton")
    script = ("import json\n"
              "from gpuquant.backends.triton import OPS, launch, qat_layer\n"
              "from gpuquant.backends.triton.standin import layer_host_time\n"
              "r = layer_host_time(layers=2, reps=2)\n"
              "r['restored'] = OPS['conv_bn_act_train'] is qat_layer.conv_bn_act_train "
              "and launch.REPLAYS is True\n"
              "print('JSON' + json.dumps(r))\n")
    r = run_json(script, tmp_path / "triton_cache")
    assert r.pop("restored") is True
    assert set(r) == {"float", "qat", "qat-no-replays", "qat-three-node"}
    assert all(v > 0 for v in r.values())


def test_fake_quant_host_time_runs_on_the_standin(tmp_path):
    """gpuquant.backends.triton.standin.fake_quant_host_time: host time of the fake_quant
    suite's fwd+bwd call, both granularities, and of PyTorch's per-channel op."""
    pytest.importorskip("triton")
    script = ("import json\n"
              "from gpuquant.backends.triton.standin import fake_quant_host_time\n"
              "print('JSON' + json.dumps(fake_quant_host_time(reps=2)))\n")
    r = run_json(script, tmp_path / "triton_cache")
    assert set(r) == {"per_tensor", "per_channel", "torch per_channel"}
    assert all(v > 0 for v in r.values())


def test_linear_host_time_runs_on_the_standin(tmp_path):
    """gpuquant.backends.triton.standin.linear_host_time: host time of a decode step's
    F.linear and of the W8A8 and weight-only modules (their memoised path)."""
    pytest.importorskip("triton")
    script = ("import json\n"
              "from gpuquant.backends.triton.standin import linear_host_time\n"
              "print('JSON' + json.dumps(linear_host_time(reps=2)))\n")
    r = run_json(script, tmp_path / "triton_cache")
    assert set(r) == {"torch F.linear", "gpuquant-triton (W8A8)", "gpuquant-triton-w8"}
    assert all(v > 0 for v in r.values())


def test_standin_command_under_the_interpreter_is_a_usage_error(monkeypatch, capsys):
    """README: ``env -u TRITON_INTERPRET python -m gpuquant.backends.triton.standin ...``;
    with TRITON_INTERPRET left set (as the test shells have it) the command says so and
    exits 2, instead of a RuntimeError traceback from standin_cuda."""
    pytest.importorskip("triton")
    from gpuquant.backends.triton import common, standin
    monkeypatch.setattr(common, "INTERPRET", True)
    assert standin.main(["--linear"]) == 2
    assert "env -u TRITON_INTERPRET" in capsys.readouterr().err


def test_plans_pass_launch_hooks_only_when_there_is_one_to_call():
    """Triton 3.6 / 3.9 keep an empty HookChain as the launch hooks (never None); a plan
    passes None for it (no metadata built, no call from the launcher), and the chain itself
    once a hook is registered, as Triton's own path would call it."""
    knobs = pytest.importorskip("triton.knobs")
    from gpuquant.backends.triton.launch import _hook
    chain = knobs.HookChain()
    assert _hook(None) is None and _hook(chain) is None
    chain.add(print)
    assert _hook(chain) is chain
    assert _hook(print) is print  # a plain callable (older Triton, or set by hand)


def test_plan_keys_carry_device_kind_and_pass_tensors_as_addresses():
    """A plan hands the launcher each tensor as its address (an int: no data_ptr() call and
    no cuPointerGetAttribute driver call per pointer in the launcher); the key holds the
    tensor's dtype, device kind (a CPU tensor never reuses a CUDA tensor's plan, so
    Triton's own path refuses it) and 16-byte alignment, ints by value, floats not at all."""
    pytest.importorskip("triton")
    import torch

    from gpuquant.backends.triton.launch import _args_key
    t = torch.zeros(8)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    (keyer, key), vals = _args_key((t, 5, 2.5, None, p, t[1:]))
    assert vals == (t.data_ptr(), 5, 2.5, None, p.data_ptr(), t[1:].data_ptr())
    assert all(type(v) is int for v in (vals[0], vals[4], vals[5]))
    assert key == (torch.float32, False, True, 5, None, torch.float16, False,
                   not p.data_ptr() & 15, torch.float32, False, False)
    (keyer2, key2), _ = _args_key((t, 6, 9.0, None, p, t[1:]))
    assert keyer2 is keyer and key2 != key and key2[3] == 6  # one keyer per class tuple
