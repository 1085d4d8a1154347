"""Replays (:func:`gpuquant.backends.triton.launch.replays`) of the QAT layer
(:mod:`gpuquant.backends.triton.qat_layer`) and of per-tensor observe + fake quant calls
(:mod:`gpuquant.backends.triton.observer`: an input stub, a residual add): a step replayed
hands the launchers what the generic path (through :mod:`.launch`'s plans) and Triton's own
launch path hand them, launch for launch, and a change to what the launches derive from is
seen (the step records anew). Checked on the CPU with the kernels
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
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat
from gpuquant.backends.triton import launch
from gpuquant.backends.triton.standin import TensorRecord, standin_cuda
from tests.backends._replay_net import Net
torch.manual_seed(0)
CL = torch.channels_last
q = quantize_qat(Net(), qat_qconfig()).train().to(memory_format=CL)
convs = [q.c0, q.c1, q.c2]
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
    if x.requires_grad:
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
    # the layers' plans (by BatchNorm), then the stub's and the add's (by observer)
    out = []
    for d in [m.bn.__dict__.get("_gpuquant_layer_plans") for m in convs] + \
            [m.act_observer.__dict__.get("_gpuquant_fq_plans") for m in (q.stub, q.add)]:
        out.append(sorted({"none" if p.fwd is None else "off" if p.fwd is False else "replay"
                           for p in (d or {}).values()}))
    return out

changes = [
    ("start", lambda: None),
    ("act_observer_disabled", lambda: q.c0.act_observer.disable()),
    ("weight_reassigned", lambda: setattr(q.c1.conv.weight, "data",
                                          q.c1.conv.weight.data.clone())),
    ("bn_momentum_none", lambda: setattr(q.c2.bn, "momentum", None)),
    ("bn_eps", lambda: setattr(q.c0.bn, "eps", 1e-3)),
    ("ema_momentum", lambda: setattr(q.c2.act_observer, "momentum", 0.5)),
    ("add_ema_momentum", lambda: setattr(q.add.act_observer, "momentum", 0.7)),
    ("add_state_reassigned", lambda: setattr(q.add.act_observer, "min_val",
                                             q.add.act_observer.min_val.clone())),
    ("bf16_autocast", lambda: state.update(autocast=True)),
    ("batch_3", lambda: state.update(
        x=torch.randn(3, 16, 9, 9).contiguous(memory_format=CL).requires_grad_())),
    ("weight_observer_frozen", lambda: q.c2.weight_observer.disable()),
    ("input_without_grad", lambda: state.update(x=state["x"].detach())),
    ("contiguous_input", lambda: state.update(x=state["x"].detach().contiguous()
                                              .requires_grad_())),
    # a half-precision conv bias is cast for the kernels each step: not replayable
    ("bias_half", lambda: setattr(q.c1.conv.bias, "data", q.c1.conv.bias.data.half())),
]
res = {}
with standin_cuda() as fk, backends.use("triton"):
    launch.REPLAYS = False
    step(fk)
    step(fk)  # compiles, launch plans, observer state
    for name, change in changes:
        change()
        launch.ENABLED = False  # Triton's own launch path
        tri, _ = step(fk)
        launch.ENABLED = True
        generic, n_gen = step(fk)
        launch.REPLAYS = True
        recorded, _ = step(fk)
        replayed, n_rep = step(fk)
        launch.REPLAYS = False
        res[name] = {"same": generic == tri and recorded == tri and replayed == tri,
                     "launches": len(tri), "through_launch": [n_gen, n_rep],
                     "plans": plan_states(),
                     "diff": [[a, b] for a, b in zip(tri, replayed) if a != b][:2]}
    qc = copy.deepcopy(q)
    res["copies"] = {"deepcopy_plans": [len(m.bn.__dict__.get("_gpuquant_layer_plans") or {})
                                        for m in (qc.c0, qc.c1, qc.c2)]
                     + [len(qc.add.act_observer.__dict__.get("_gpuquant_fq_plans") or {})],
                     "pickled": len(pickle.dumps(q.c0.bn)) > 0
                     and len(pickle.dumps(q.add.act_observer)) > 0}
print("JSON" + json.dumps(res, default=str))
"""


def test_replayed_steps_launch_what_the_generic_path_launches(tmp_path):
    pytest.importorskip("triton")
    r = run_json(_SCRIPT, tmp_path / "triton_cache")
    copies = r.pop("copies")
    assert copies == {"deepcopy_plans": [0, 0, 0, 0], "pickled": True}
    for name, v in r.items():
        # three layers (six launches a step each), the stub's and the add's observe + fake
        # quant (two each, and the backward's masked gradient: the stub's only where the
        # input needs a gradient)
        masks = 1 if name == "input_without_grad" else 2
        assert v["launches"] == 22 + masks, (name, v["launches"])
        assert v["same"], (name, v["diff"])
        assert v["through_launch"][0] == v["launches"], (name, v)
        # a replayed step launches only the masked gradients through the launch path
        if name == "bias_half":  # that layer's launches take the generic path
            assert v["through_launch"][1] == masks + 6 and "off" in v["plans"][1], v
        else:
            assert v["through_launch"][1] == masks, (name, v)
            assert all("replay" in p for p in v["plans"]), (name, v["plans"])


@pytest.mark.gpu
def test_replayed_steps_equal_the_generic_path_on_the_gpu(monkeypatch):
    """On the device: a QAT network (three Conv+BN layers, a residual add_relu, an input
    stub) trained step after step with replays (from the third step) and without them
    gives equal bytes: outputs, gradients, running statistics, observer states; bf16
    autocast from the fourth step (a new signature)."""
    import copy

    import torch

    from gpuquant.backends.triton import launch
    from tests.backends._replay_net import Net
    from gpuquant.bench.suites.qat_step import qat_qconfig
    from gpuquant.quantization import quantize_qat

    torch.manual_seed(0)
    cl = torch.channels_last
    models = {True: quantize_qat(Net(), qat_qconfig()).train().cuda().to(memory_format=cl)}
    models[False] = copy.deepcopy(models[True])
    for step in range(6):
        x = torch.randn(4, 16, 17, 15, device="cuda").contiguous(memory_format=cl)
        got = {}
        for replays, m in models.items():
            monkeypatch.setattr(launch, "REPLAYS", replays)
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", torch.bfloat16, enabled=step >= 3):
                y = m(xi)
            y.float().square().sum().backward()
            with torch.no_grad():
                for p in m.parameters():  # an SGD step: in place, as optimizers update
                    p -= 1e-3 * p.grad
                    p.grad = None
            got[replays] = [y, xi.grad] + list(m.state_dict().values())
        for a, b in zip(got[True], got[False]):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), step
    m = models[True]
    plans = [p for c in (m.c0, m.c1, m.c2)
             for p in c.bn.__dict__["_gpuquant_layer_plans"].values()]
    plans += [p for o in (m.stub.act_observer, m.add.act_observer)
              for p in o.__dict__["_gpuquant_fq_plans"].values()]
    assert plans and all(p.fwd for p in plans), [p.fwd for p in plans]
