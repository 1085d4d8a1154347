"""The QAT layer's plans (:mod:`gpuquant.backends.triton.qat_layer`): a step replayed from a
plan hands the launchers what the layer's generic path (through :mod:`.launch`'s plans) and
Triton's own launch path hand them, launch for launch, and a change to what the layer's
launches derive from is seen (the step records anew). Checked on the CPU with the kernels
compiled for sm_90 and launched into the stand-in driver's recorder
(:mod:`gpuquant.backends.triton.standin`), in a subprocess without TRITON_INTERPRET: the
interpreter cannot run a replay (it has no compiled launcher), and its runs of the same
layer check the numbers (``test_triton_qat_layer.py``)."""
from __future__ import annotations

import pytest

from tests.compiled import run_json

_SCRIPT = r"""
import contextlib, copy, json, pickle
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from gpuquant import backends
from gpuquant import nn as gnn
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat
from gpuquant.backends.triton import launch, qat_layer
from gpuquant.backends.triton.standin import TensorRecord, standin_cuda
torch.manual_seed(0)
CL = torch.channels_last
f = torch.nn.Sequential(gnn.ConvBnRelu2d(16, 24, 1),
                        gnn.ConvBn2d(24, 24, 3, 2, 1, groups=24, bias=True),
                        gnn.ConvBnRelu62d(24, 8, 3, padding=2, dilation=2))
q = quantize_qat(f, qat_qconfig()).train().to(memory_format=CL)
state = {"x": torch.randn(2, 16, 9, 9).contiguous(memory_format=CL).requires_grad_(),
         "autocast": False}
positions = []

class KeepAlive(TorchDispatchMode):
    # every tensor an op makes lives until the step ends: no address is reused within a
    # step, so one address is one tensor in each mode's launches
    def __init__(self):
        super().__init__()
        self.kept = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept.append(out)
        return out

def names():
    d = {t.data_ptr(): n for n, t in list(q.named_parameters()) + list(q.named_buffers())}
    for n, m in q.named_modules():
        tk = m.__dict__.get("_gpuquant_tickets")
        if tk is not None:
            d[tk.data_ptr()] = n + ".tickets"
    d[state["x"].data_ptr()] = "x"
    return d

def canon(launches):
    # each pointer as the name of a lasting tensor (parameter, buffer, tickets, input), else
    # as the order in which it first appears; which arguments are tensors is learnt from
    # Triton's path (TensorRecord there, an address in the others)
    if not launch.ENABLED:
        positions[:] = [{j for j, a in enumerate(args) if isinstance(a, TensorRecord)}
                        for _, _, args in launches]
    nm, ids, out = names(), {}, []
    for (k, g, args), pos in zip(launches, positions):
        row = []
        for j, a in enumerate(args):
            if j in pos:
                p = a if type(a) is int else a.data_ptr()
                row.append(nm.get(p) or ids.setdefault(p, "new%d" % len(ids)))
            else:
                row.append(a if isinstance(a, (int, float, bool, str, type(None))) else repr(a))
        out.append([k, list(g), row])
    return out

def step(fk):
    fk.launches.clear()
    x = state["x"]
    x.grad = None
    for p in q.parameters():
        p.grad = None
    ac = torch.autocast("cpu", torch.bfloat16) if state["autocast"] else contextlib.nullcontext()
    with launch.recording() as through_launch, KeepAlive():
        with ac:
            y = q(x)
        y.float().sum().backward()
        got = canon(fk.launches)
    return got, len(through_launch)

def plan_states():
    out = []
    for m in q:
        plans = m.bn.__dict__.get("_gpuquant_layer_plans") or {}
        out.append(sorted({"none" if p.fwd is None else "off" if p.fwd is False else "replay"
                           for p in plans.values()}))
    return out

changes = [
    ("start", lambda: None),
    ("act_observer_disabled", lambda: q[0].act_observer.disable()),
    ("weight_reassigned", lambda: setattr(q[1].conv.weight, "data",
                                          q[1].conv.weight.data.clone())),
    ("bn_momentum_none", lambda: setattr(q[2].bn, "momentum", None)),
    ("bn_eps", lambda: setattr(q[0].bn, "eps", 1e-3)),
    ("ema_momentum", lambda: setattr(q[2].act_observer, "momentum", 0.5)),
    ("bf16_autocast", lambda: state.update(autocast=True)),
    ("batch_3", lambda: state.update(
        x=torch.randn(3, 16, 9, 9).contiguous(memory_format=CL).requires_grad_())),
    ("weight_observer_frozen", lambda: q[2].weight_observer.disable()),
    ("contiguous_input", lambda: state.update(x=state["x"].detach().contiguous()
                                              .requires_grad_())),
    # a half-precision conv bias is cast for the kernels each step: not replayable
    ("bias_half", lambda: setattr(q[1].conv.bias, "data", q[1].conv.bias.data.half())),
]
res = {}
with standin_cuda() as fk, backends.use("triton"):
    qat_layer.PLANS = False
    step(fk)
    step(fk)  # compiles, launch plans, observer state
    for name, change in changes:
        change()
        launch.ENABLED = False  # Triton's own launch path
        tri, _ = step(fk)
        launch.ENABLED = True
        generic, n_gen = step(fk)
        qat_layer.PLANS = True
        recorded, _ = step(fk)
        replayed, n_rep = step(fk)
        qat_layer.PLANS = False
        res[name] = {"same": generic == tri and recorded == tri and replayed == tri,
                     "launches": len(tri), "through_launch": [n_gen, n_rep],
                     "plans": plan_states(),
                     "diff": [[a, b] for a, b in zip(tri, replayed) if a != b][:2]}
    qc = copy.deepcopy(q)
    res["copies"] = {"deepcopy_plans": [len(m.bn.__dict__.get("_gpuquant_layer_plans") or {})
                                        for m in qc],
                     "pickled": len(pickle.dumps(q[0].bn)) > 0}
print("JSON" + json.dumps(res, default=str))
"""


def test_replayed_steps_launch_what_the_generic_path_launches(tmp_path):
    pytest.importorskip("triton")
    r = run_json(_SCRIPT, tmp_path / "triton_cache")
    copies = r.pop("copies")
    assert copies == {"deepcopy_plans": [0, 0, 0], "pickled": True}
    for name, v in r.items():
        assert v["launches"] == 18, (name, v)  # three layers, six launches a step each
        assert v["same"], (name, v["diff"])
        assert v["through_launch"][0] == 18, (name, v)
        if name == "bias_half":  # that layer's launches take the generic path
            assert v["through_launch"][1] == 6 and "off" in v["plans"][1], v
        else:  # a replayed step launches nothing through the launch path
            assert v["through_launch"][1] == 0, (name, v)
            assert all("replay" in p for p in v["plans"]), (name, v["plans"])


@pytest.mark.gpu
def test_replayed_steps_equal_the_generic_path_on_the_gpu(monkeypatch):
    """On the device: a QAT network trained step after step with layer plans (replays from
    the third step) and without them gives equal bytes: outputs, gradients, running
    statistics, observer states; bf16 autocast from the fourth step (a new signature)."""
    import copy

    import torch

    import gpuquant.nn as gnn
    from gpuquant.backends.triton import qat_layer
    from gpuquant.bench.suites.qat_step import qat_qconfig
    from gpuquant.quantization import quantize_qat
    torch.manual_seed(0)
    cl = torch.channels_last
    f = torch.nn.Sequential(gnn.ConvBnRelu2d(16, 24, 1),
                            gnn.ConvBn2d(24, 24, 3, 2, 1, groups=24, bias=True),
                            gnn.ConvBnRelu62d(24, 8, 3, padding=2, dilation=2))
    models = {True: quantize_qat(f, qat_qconfig()).train().cuda().to(memory_format=cl)}
    models[False] = copy.deepcopy(models[True])
    for step in range(6):
        x = torch.randn(4, 16, 17, 15, device="cuda").contiguous(memory_format=cl)
        got = {}
        for plans, m in models.items():
            monkeypatch.setattr(qat_layer, "PLANS", plans)
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", torch.bfloat16, enabled=step >= 3):
                y = m(xi)
            y.float().square().sum().backward()
            with torch.no_grad():
                for p in m.parameters():  # an SGD step: in place, as optimizers update
                    p -= 1e-3 * p.grad
                    p.grad = None
            got[plans] = [y, xi.grad] + list(m.state_dict().values())
        for a, b in zip(got[True], got[False]):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), step
    kinds = {("replay" if p.fwd else str(p.fwd)) for m in models[True]
             for p in m.bn.__dict__["_gpuquant_layer_plans"].values()}
    assert kinds == {"replay"}, kinds
