"""Drop-in conversion of activations other than ReLU / ReLU6 into ``gpuquant.nn.Activation``:
torch.nn modules, functions and tensor methods, in-place forms, arguments the int8 form does
not take (float, warned with the reason), hooks, subclasses, disabled modules, QuantStubs
after float ops, and QAT -> int8."""
import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant.nn as gnn
from gpuquant.quantization import quantize, quantize_qat
from gpuquant.quantization.fx import DropInWarning, disable_quantize, prepare_plain

from tests.dropin.dropin_helpers import int8_against_qat, qat_step


def convert(fn, *args, **kw):
    """(``fn(*args, **kw)``, the messages of the DropInWarnings it gave)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in rec if issubclass(w.category, DropInWarning)]


def activations(model):
    """The (kind, negative_slope) of every float, QAT or int8 Activation in ``model``,
    sorted."""
    return sorted((m.kind, m.negative_slope) for m in model.modules()
                  if type(m).__name__ == "Activation" and
                  type(m).__module__.startswith("gpuquant.nn"))


def float_identical(model, x):
    """prepare_plain(model) computes what ``model`` does, bit for bit, in eval and train."""
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,))
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x)), f"train={train}"
    return gm, warned


class Modules(nn.Module):
    """Each activation module after a conv; the ReLU fuses into its conv as before."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        acts = [nn.SiLU(inplace=True), nn.Hardswish(), nn.Hardsigmoid(inplace=True),
                nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Mish(),
                nn.ELU(inplace=True), nn.Softplus(), nn.LeakyReLU(0.2, inplace=True),
                nn.LeakyReLU()]
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in acts)
        self.acts = nn.ModuleList(acts)
        self.last = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.acts[0](self.bn(self.stem(x)))    # ConvBn2d + Activation("silu")
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return self.relu(self.last(x)).mean((2, 3))   # ConvRelu2d, AdaptiveAvgPool2d


MODULE_KINDS = sorted([("silu", 0.01), ("silu", 0.01), ("hardswish", 0.01),
                       ("hardsigmoid", 0.01), ("sigmoid", 0.01), ("tanh", 0.01),
                       ("gelu", 0.01), ("gelu_tanh", 0.01), ("mish", 0.01), ("elu", 0.01),
                       ("softplus", 0.01), ("leaky_relu", 0.2), ("leaky_relu", 0.01)])


class Functions(nn.Module):
    """The functional and method forms, out of place and in place."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(6))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        c = iter(self.convs)
        x = self.stem(x)
        a = F.silu(x) + F.hardswish(x, inplace=False) + F.hardsigmoid(x)
        a = a + torch.sigmoid(x) + x.sigmoid() + torch.tanh(x) + x.tanh()
        a = a + F.gelu(x) + F.gelu(x, approximate="tanh") + F.mish(x)
        a = a + F.elu(x) + F.elu(x, 1.0) + F.softplus(x) + F.softplus(x, beta=1, threshold=20)
        a = a + F.leaky_relu(x) + F.leaky_relu(x, 0.1) + \
            F.leaky_relu(x, negative_slope=0.3)
        # in-place forms: functionalize makes them out of place first
        y = next(c)(a)
        y = F.silu(y, inplace=True)
        y = next(c)(y)
        y.sigmoid_()
        y = next(c)(y)
        y = torch.tanh_(y)
        y = next(c)(y)
        y = F.leaky_relu_(y, 0.05)
        y = next(c)(y)
        y = F.elu_(y)
        y = next(c)(y)
        return F.hardswish(y, inplace=True).mean((2, 3))


FUNCTION_KINDS = sorted(
    [("silu", 0.01), ("hardswish", 0.01), ("hardsigmoid", 0.01)] + [("sigmoid", 0.01)] * 2 +
    [("tanh", 0.01)] * 2 + [("gelu", 0.01), ("gelu_tanh", 0.01), ("mish", 0.01)] +
    [("elu", 0.01)] * 2 + [("softplus", 0.01)] * 2 +
    [("leaky_relu", 0.01), ("leaky_relu", 0.1), ("leaky_relu", 0.3)] +
    [("silu", 0.01), ("sigmoid", 0.01), ("tanh", 0.01), ("leaky_relu", 0.05), ("elu", 0.01),
     ("hardswish", 0.01)])


@pytest.mark.parametrize("cls,kinds", [(Modules, MODULE_KINDS), (Functions, FUNCTION_KINDS)])
def test_activations_swapped_float_identical_qat_int8(cls, kinds):
    torch.manual_seed(0)
    x, target = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    gm, warned = float_identical(cls(), x)
    assert not warned, warned
    assert activations(gm) == kinds
    if cls is Modules:  # the activation after conv + bn gets its own module: no fusion
        assert type(gm.stem) is gnn.ConvBn2d and type(gm.last) is gnn.ConvRelu2d
    assert not [m for m in gm.modules() if type(m).__module__.startswith("torch.nn.modules.a")]

    model = cls()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        qat = quantize_qat(model, example_inputs=(x,))
    for step in range(3):
        qat_step(qat, x, (target + step) % 4, seed=step)
    int8, _ = int8_against_qat(qat, x)
    assert activations(int8) == kinds


class Unsupported(nn.Module):
    """Arguments the int8 Activation does not take: these stay float, named with why."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.elu = nn.ELU(alpha=0.5)
        self.softplus = nn.Softplus(beta=2)
        self.softplus_t = nn.Softplus(threshold=5)

    def forward(self, x):
        x = self.conv(x)
        a = self.elu(x) + self.softplus(x) + self.softplus_t(x)
        a = a + F.elu(x, 0.5) + F.softplus(x, beta=2)
        return a + F.leaky_relu(x, 1.0 / x.size(1)) + F.silu(x, True)


def test_other_arguments_stay_float_with_the_reason():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 5)
    gm, warned = float_identical(Unsupported(), x)
    assert len(warned) == 1
    msg = warned[0]
    assert "6 part(s)" in msg
    assert "module 'elu' (ELU: alpha=0.5: the int8 form takes alpha 1.0 only)" in msg
    assert "module 'softplus' (Softplus: beta=2, threshold=20.0: the int8 form takes beta " \
        "1 and threshold 20 only)" in msg
    assert "module 'softplus_t' (Softplus: beta=1.0, threshold=5: the int8 form" in msg
    assert "F.elu in '<root>' (alpha=0.5: the int8 form takes alpha 1.0 only)" in msg
    assert "F.softplus in '<root>' (beta=2, threshold=20" in msg
    assert "F.leaky_relu in '<root>' (negative_slope is a traced value, the int8 form " \
        "takes a constant)" in msg
    # (F.silu(x, True) hands fx inplace=True by keyword: made out of place, swapped)
    assert activations(gm) == [("silu", 0.01)]


class Special(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = act
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(x)))


class MySiLU(nn.SiLU):
    """Keeps the forward: traced into like any user module, its F.silu swapped."""


class ShiftedSiLU(nn.SiLU):
    """Computes otherwise; of a torch.nn module (so fx keeps it a leaf), yet not a SiLU."""

    def forward(self, x):
        return F.silu(x) - 0.5


ShiftedSiLU.__module__ = "torch.nn.modules.shifted"


def test_hooked_subclassed_and_disabled_modules_stay_as_they_are():
    x = torch.randn(2, 3, 5, 5)
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda m, i, o: None)
    gm, warned = float_identical(Special(hooked), x)
    assert gm.act is hooked and activations(gm) == []
    assert len(warned) == 1 and "module 'act' (SiLU: carries forward hooks" in warned[0]

    gm, warned = float_identical(Special(MySiLU()), x)
    assert not warned and activations(gm) == [("silu", 0.01)]

    gm, warned = float_identical(Special(ShiftedSiLU()), x)
    assert type(gm.act) is ShiftedSiLU and activations(gm) == []
    assert len(warned) == 1 and "module 'act' (ShiftedSiLU: no int8 version)" in warned[0]

    gm, warned = float_identical(Special(disable_quantize(nn.Tanh())), x)
    assert type(gm.act) is nn.Tanh and not warned
    qat, warned = convert(quantize_qat, Special(disable_quantize(nn.Tanh())),
                          example_inputs=(x,))
    qat.train()(x)
    int8 = quantize(qat.eval())
    assert type(int8.act) is nn.Tanh and activations(int8) == []


class AfterFloatOp(nn.Module):
    """An activation whose input comes from a float op gets a QuantStub before it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x).exp()                 # float op: no int8 form
        return self.out(F.gelu(y) * torch.sigmoid(x.mean(1, keepdim=True)))


def test_activation_after_a_float_op_gets_a_quant_stub():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5)
    gm, warned = float_identical(AfterFloatOp(), x)
    assert activations(gm) == [("gelu", 0.01), ("sigmoid", 0.01)]
    assert len(warned) == 1 and ".exp() in '<root>'" in warned[0]
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name in ("gelu", "sigmoid"):
        (src,) = calls[name].args
        assert src.op == "call_module" and type(gm.get_submodule(src.target)) is gnn.QuantStub
    qat, _ = convert(quantize_qat, AfterFloatOp(), example_inputs=(x,))
    qat.train()
    qat(x)
    int8_against_qat(qat, x)


def test_a_module_called_twice_gets_one_activation_a_call_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 1), nn.Hardswish()

        def forward(self, x):
            return self.act(self.conv(x)) + self.act(x.sum(1, keepdim=True))

    gm, _ = float_identical(Twice(), torch.randn(2, 3, 4, 4))
    names = sorted(n for n, m in gm.named_modules() if isinstance(m, gnn.Activation))
    assert names == ["act_1", "act_2"]
    assert Counter(type(m).__name__ for m in gm.modules())["Activation"] == 2
