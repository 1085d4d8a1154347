"""Drop-in conversion of timm's BatchNorm + activation modules (``BatchNormAct2d``,
``SyncBatchNormAct`` of ``timm.layers.norm_act``): taken as a plain BatchNorm (the same
tensors, at the same path) followed by its ``drop`` and ``act`` children, so Conv + BN folds
and the activation fuses (ReLU) or is swapped (Activation). timm is not installed here: the
classes below reproduce the behaviour (batch norm of the base class, then drop, then act)
under timm's module name."""
import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant
import gpuquant.backends as backends
import gpuquant.nn as gnn
from gpuquant.nn.qat import QATModule
from gpuquant.quantization import quantize, quantize_qat
from gpuquant.quantization.fx import DropInWarning, disable_quantize, prepare_plain

from tests.dropin.dropin_helpers import INT8_BACKEND, int8_against_qat, qat_step


def _norm_act_init(self, num_features, act_layer, apply_act, drop_layer, **kw):
    self.drop = drop_layer() if drop_layer is not None else nn.Identity()
    self.act = act_layer(inplace=True) if apply_act else nn.Identity()


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d, then ``self.drop``, then ``self.act`` (as timm's computes)."""

    def __init__(self, num_features, act_layer=nn.ReLU, apply_act=True, drop_layer=None,
                 **kw):
        super().__init__(num_features, **kw)
        _norm_act_init(self, num_features, act_layer, apply_act, drop_layer)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class SyncBatchNormAct(nn.SyncBatchNorm):
    def __init__(self, num_features, act_layer=nn.ReLU, apply_act=True, drop_layer=None,
                 **kw):
        super().__init__(num_features, **kw)
        _norm_act_init(self, num_features, act_layer, apply_act, drop_layer)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = SyncBatchNormAct.__module__ = "timm.layers.norm_act"


class Net(nn.Module):
    """timm-style blocks: conv -> norm_act with ReLU, SiLU, no act, momentum None, a
    SyncBatchNormAct, and a norm_act after an add (no conv before: BN then act, unfolded)."""

    def __init__(self, norm_act=BatchNormAct2d):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm_act(8)                                       # ReLU
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = norm_act(8, act_layer=nn.SiLU, momentum=None)     # SiLU, cumulative
        self.conv_pw = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = norm_act(8, apply_act=False)                      # no act
        self.bn4 = norm_act(8, act_layer=nn.Hardswish)               # after an add
        self.conv_head = nn.Conv2d(8, 16, 1, bias=False)
        self.bn5 = SyncBatchNormAct(16)                              # sync, ReLU
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        y = self.bn3(self.conv_pw(self.bn2(self.conv_dw(x))))
        x = self.bn4(x + y)
        x = self.bn5(self.conv_head(x))
        return self.fc(x.mean((2, 3)))


NET_KINDS = {"QuantStub": 2, "ConvBnRelu2d": 2, "ConvBn2d": 2, "Activation": 2,
             "Elemwise": 1, "AdaptiveAvgPool2d": 1, "Linear": 1, "DequantStub": 2}


def convert(fn, *args, **kw):
    """(``fn(*args, **kw)``, the messages of the DropInWarnings it gave)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in rec if issubclass(w.category, DropInWarning)]


def settled(model, x):
    """``model`` with running statistics away from their initial values."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.3 * torch.randn_like(x))
    return model


def gnn_kinds(model):
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, gnn.Module))


def test_norm_act_folds_and_computes_as_the_model():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = settled(Net(), x)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    gm, warned = convert(prepare_plain, model, (x,))
    # the BatchNorm after the add stays float (no int8 form); everything else quantizes
    assert len(warned) == 1 and "1 part(s)" in warned[0] and \
        "module 'bn4' (BatchNorm2d: no int8 version)" in warned[0], warned
    assert gnn_kinds(gm) == NET_KINDS
    assert type(gm.conv_stem) is gnn.ConvBnRelu2d and type(gm.conv_head) is gnn.ConvBnRelu2d
    assert type(gm.conv_dw) is gnn.ConvBn2d and type(gm.conv_pw) is gnn.ConvBn2d
    assert gm.bn2.act.kind == "silu" and gm.bn4.act.kind == "hardswish"
    # the fused modules hold plain BatchNorms on the model's own Parameter / buffer objects
    assert type(gm.conv_stem.bn) is nn.BatchNorm2d and type(gm.conv_head.bn) is nn.SyncBatchNorm
    for name in ("bn1", "bn2", "bn3", "bn4", "bn5"):
        bn = getattr(model, name)
        assert getattr(gm, name).weight is bn.weight
        assert getattr(gm, name).running_var is bn.running_var
        assert getattr(gm, name).num_batches_tracked is bn.num_batches_tracked
    assert gm.conv_stem.bn.weight is model.bn1.weight and gm.conv_dw.bn.momentum is None
    assert not list(gm.conv_dw.bn.children())  # the act runs after the fused module
    # the model itself is unchanged: its classes, children and state_dict keys
    assert type(model.bn1) is BatchNormAct2d and type(model.bn2.act) is nn.SiLU
    assert model.bn2.act.inplace and list(model.state_dict()) == keys
    # bit for bit, in eval and in train mode (batch statistics, running ones updated alike)
    for train in (False, True, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x)), train
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    assert int(model.bn2.num_batches_tracked) == int(ref.bn2.num_batches_tracked) == 5


def test_state_dict_keys_under_the_norm_act_paths_stay():
    """The plain BatchNorm sits at the module's path with the same tensors: every key of
    the model under those paths is in the converted models' state_dicts (as a BatchNorm
    fused into a conv keeps its own name beside the fused one's), and loading pretrained
    values there reaches the fused modules."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    pretrained = settled(Net(), x).state_dict()
    bn_keys = [k for k in pretrained if k.startswith(("bn1.", "bn2.", "bn3.", "bn4.", "bn5."))]
    model = Net()
    gm, _ = convert(prepare_plain, model, (x,))
    qat, _ = convert(quantize_qat, Net(), example_inputs=(x,))
    for converted in (gm, qat):
        sd = converted.state_dict()
        assert set(bn_keys) <= set(sd)
        missing, unexpected = converted.load_state_dict({k: pretrained[k] for k in bn_keys},
                                                        strict=False)
        assert not unexpected
        assert torch.equal(converted.conv_stem.bn.running_var, pretrained["bn1.running_var"])
        assert torch.equal(converted.conv_head.bn.weight, pretrained["bn5.weight"])
    # the view left at 'bn2' (holding the act) and the BatchNorm folded into conv_dw stay one
    # BatchNorm when .to() puts new buffer tensors in place
    qat.to(torch.float64)
    assert qat.bn2 is not qat.conv_dw.bn and qat.bn2.running_var is qat.conv_dw.bn.running_var
    assert qat.bn2.running_var.dtype == torch.float64 and qat.bn2.weight is qat.conv_dw.bn.weight
    # ... and the model's own module too, as a plain BatchNorm the converted model holds is
    gm.to(torch.float64)
    assert gm.conv_stem.bn.running_mean is gm.bn1.running_mean is model.bn1.running_mean


def test_norm_act_qat_trains_and_converts_to_int8():
    torch.manual_seed(2)
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    model = settled(Net(), x)
    qat, warned = convert(quantize_qat, model, example_inputs=(x,))
    assert len(warned) == 1
    assert Counter(type(m).__name__ for m in qat.modules() if isinstance(m, QATModule)) == \
        NET_KINDS
    before = model.conv_stem.weight.detach().clone()
    for step in range(3):
        qat_step(qat, x, (target + step) % 4, seed=step)
    assert not torch.equal(model.conv_stem.weight, before)  # the model's own Parameter
    int8, _ = int8_against_qat(qat, x)
    # the second names of the BatchNorms folded whole go, as a plain BatchNorm's do
    assert not [k for k in int8.state_dict() if k.startswith(("bn1.", "bn3.", "bn5."))]


def test_norm_act_int8_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    qat, _ = convert(quantize_qat, settled(Net(), x), example_inputs=(x,))
    qat.train()(x)
    int8 = quantize(qat.eval())
    gpuquant.save(int8, tmp_path / "net.safetensors")
    skeleton, _ = convert(prepare_plain, Net(), (x,))
    loaded = gpuquant.load(tmp_path / "net.safetensors", skeleton)
    with backends.use(INT8_BACKEND), torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = norm
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.out(self.bn(self.conv(x)))


def _renamed(module: str, name: str):
    cls = type(name, (BatchNormAct2d,), {})
    cls.__module__ = module
    return cls


@pytest.mark.parametrize("cls", [_renamed("mylib.layers", "BatchNormAct2d"),
                                 _renamed("timm.layers.norm_act", "BatchNormAct")])
def test_only_timm_classes_of_those_names_are_recognised(cls):
    """Another library's BatchNormAct2d (or a timm class of another name) may compute
    otherwise: traced as any module (its in-place write of num_batches_tracked keeps it
    whole and float)."""
    x = torch.randn(2, 3, 5, 5)
    model = settled(Block(cls(4)), x)
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,))
    assert type(gm.bn) is cls and type(gm.conv) is gnn.Conv2d
    assert len(warned) == 1 and f"module 'bn' ({cls.__name__}: not traceable" in warned[0]
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x))


def test_hooked_or_disabled_norm_act_stays_whole():
    x = torch.randn(2, 3, 5, 5)
    hooked = BatchNormAct2d(4)
    hooked.register_forward_pre_hook(lambda m, i: None)
    gm, warned = convert(prepare_plain, Block(hooked), (x,))
    assert gm.bn is hooked and type(gm.conv) is gnn.Conv2d
    assert len(warned) == 1 and \
        "module 'bn' (BatchNormAct2d: carries forward pre-hooks" in warned[0]

    off = disable_quantize(BatchNormAct2d(4, act_layer=nn.SiLU))
    model = settled(Block(off), x)
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,))
    assert gm.bn is off and not warned
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x))


def test_norm_act_with_a_dropout_and_alone():
    """A configured drop layer runs between the BatchNorm and the act (so the ReLU does not
    fuse into the conv; a standalone ReLU stays float); a model that is one norm_act alone
    computes BN then act."""
    torch.manual_seed(4)
    x = torch.randn(4, 3, 5, 5)
    gelu = lambda inplace: nn.GELU()  # noqa: E731
    model = settled(Block(BatchNormAct2d(4, act_layer=gelu,
                                         drop_layer=lambda: nn.Dropout(0.0))), x)
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,))
    assert not warned
    assert type(gm.conv) is gnn.ConvBn2d and type(gm.bn.drop) is nn.Dropout
    assert gm.bn.act.kind == "gelu"
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x))

    lone = settled(BatchNormAct2d(3, act_layer=lambda inplace: nn.Tanh()), x)
    ref = copy.deepcopy(lone)
    gm, warned = convert(prepare_plain, lone, (x,))
    assert len(warned) == 1 and "(BatchNorm2d: no int8 version)" in warned[0]
    assert activations_in(gm) == ["tanh"]
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x))


def activations_in(model):
    return [m.kind for m in model.modules() if isinstance(m, gnn.Activation)]


def test_norm_act_called_twice():
    """One norm_act module at two call sites: both expanded (one plain BatchNorm at its
    path, shared, as a plain BatchNorm2d called twice is)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn = BatchNormAct2d(4, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn(self.a(x)) + F.relu(self.bn(self.b(x)))

    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 4)
    model = settled(Twice(), x)
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,))
    assert type(gm.bn) is nn.BatchNorm2d and activations_in(gm) == ["silu", "silu"]
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x))
