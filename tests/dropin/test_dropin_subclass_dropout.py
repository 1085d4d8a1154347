"""Drop-in conversion of subclasses of torch.nn layers that keep their forward, and of the
functional dropout idiom ``F.dropout(x, p, self.training)``."""
import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant.backends as backends
from gpuquant.nn.qat import QATModule
from gpuquant.quantization import disable_observer, quantize, quantize_qat
from gpuquant.quantization.fx import DropInWarning, needs_dropin, prepare_plain
from tests.dropin.dropin_helpers import INT8_BACKEND, qat_step
from tests.int8_vs_qat import capture, check_modules


class MyConv(nn.Conv2d):      # a project's own wrapper class, forward untouched
    pass


class MyBN(nn.BatchNorm2d):
    pass


class MyLinear(nn.Linear):
    pass


class MyBN1d(nn.BatchNorm1d):
    pass


class Layers(nn.Module):
    """Conv+BN+ReLU, Conv+ReLU, Conv, Linear+BN1d+ReLU, Linear, of the given classes."""

    def __init__(self, conv=nn.Conv2d, bn=nn.BatchNorm2d, linear=nn.Linear, bn1d=nn.BatchNorm1d):
        super().__init__()
        self.a = conv(3, 8, 3, padding=1, bias=False)
        self.a_bn = bn(8)
        self.b = conv(8, 8, 3, padding=1)
        self.c = conv(8, 8, 1)
        self.fc1 = linear(8, 16)
        self.fc1_bn = bn1d(16)
        self.fc2 = linear(16, 4)

    def forward(self, x):
        x = F.relu(self.a_bn(self.a(x)))
        x = self.c(F.relu(self.b(x)))
        x = x.mean((2, 3))
        return self.fc2(F.relu(self.fc1_bn(self.fc1(x))))


LAYER_KINDS = {"QuantStub": 1, "ConvBnRelu2d": 1, "ConvRelu2d": 1, "Conv2d": 1,
               "AdaptiveAvgPool2d": 1, "LinearBnRelu1d": 1, "Linear": 1, "DequantStub": 1}


def qat_kinds(model):
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, QATModule))


def no_dropin_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        return fn(*args, **kwargs)


def test_subclasses_keeping_forward_are_quantized_like_the_base_classes():
    torch.manual_seed(0)
    plain = Layers()
    sub = Layers(MyConv, MyBN, MyLinear, MyBN1d)
    sub.load_state_dict(plain.state_dict())
    assert needs_dropin(sub)
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    # the converted float graph computes what the model does, bit for bit
    ref = copy.deepcopy(sub).eval()
    gm = no_dropin_warning(prepare_plain, copy.deepcopy(sub), (x,)).eval()
    with torch.no_grad():
        assert torch.equal(gm(x), ref(x))

    qats = [no_dropin_warning(quantize_qat, m, example_inputs=(x,)) for m in (plain, sub)]
    for qat in qats:
        assert qat_kinds(qat) == LAYER_KINDS
        assert not needs_dropin(qat)
    # the subclass instances are reused in place (weights, BN buffers): same objects
    assert isinstance(qats[1].a.conv, MyConv) and isinstance(qats[1].a.bn, MyBN)
    assert isinstance(qats[1].fc1.bn, MyBN1d)
    outs = []
    for qat in qats:
        qat_step(qat, x, target, seed=0)
        y_qat, cap = capture(qat, x)
        qat_modules = dict(qat.named_modules())
        int8 = quantize(qat)
        with backends.use(INT8_BACKEND):
            y8 = int8(x)
        check_modules(qat_modules, int8, cap, INT8_BACKEND)
        assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.05
        outs.append((y_qat, y8))
    # the subclass model is the plain one: same QAT output, same int8 output
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


class OnlySubclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = MyConv(3, 8, 3, padding=1), MyConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_model_of_subclass_layers_only():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    qat = no_dropin_warning(quantize_qat, OnlySubclasses(), example_inputs=(x,))
    assert qat_kinds(qat) == {"QuantStub": 1, "ConvRelu2d": 1, "Conv2d": 1, "DequantStub": 1}
    qat.train()
    qat(x)   # a training pass: observers record
    with torch.no_grad():
        y_qat = qat.eval()(x)
    int8 = quantize(qat)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    # a lone subclass layer too
    lone = no_dropin_warning(quantize_qat, MyLinear(6, 3), example_inputs=(torch.randn(2, 6),))
    assert isinstance(getattr(lone, "0"), QATModule)


class OtherConv(nn.Conv2d):
    """Keeps forward but computes otherwise (its own _conv_forward): not a Conv2d to us."""

    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, w.abs(), b)


def test_subclass_changing_the_computation_is_not_swapped():
    assert not needs_dropin(OtherConv(3, 4, 1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), OtherConv(4, 4, 1))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(DropInWarning, match="conv2d"):
        gm = prepare_plain(copy.deepcopy(model), (x,))
    with torch.no_grad():
        assert torch.equal(gm(x), want)


class FDropout(nn.Module):
    """The torchvision / timm head: ``F.dropout(x, p, self.training)``."""

    def __init__(self, fn="F"):
        super().__init__()
        self.fn = fn
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.a(x)), 1), 1)
        if self.fn == "F":
            x = F.dropout(x, 0.5, self.training)
        elif self.fn == "F_kw":
            x = F.dropout(x, p=0.5, training=self.training, inplace=True)
        else:
            x = torch.dropout(x, 0.5, self.training)
        return self.fc(x)


class ModuleDropout(nn.Module):
    """The same with ``nn.Dropout``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.a(x)), 1), 1)
        return self.fc(self.drop(x))


@pytest.mark.parametrize("fn", ["F", "F_kw", "torch"])
def test_functional_dropout_follows_train_eval_and_is_dropped_in_int8(fn):
    torch.manual_seed(0)
    model = FDropout(fn)
    twin = ModuleDropout()
    twin.load_state_dict(model.state_dict())
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])

    # the converted float graph: an nn.Dropout(0.5) module, the same computation as the model
    ref = copy.deepcopy(model)
    gm = no_dropin_warning(prepare_plain, copy.deepcopy(model), (x,))
    drops = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5 and not drops[0].inplace
    for train in (True, False):
        gm.train(train), ref.train(train)
        torch.manual_seed(3)
        y = gm(x)
        torch.manual_seed(3)
        assert torch.equal(y, ref(x))

    qats = [no_dropin_warning(quantize_qat, m, example_inputs=(x,)) for m in (model, twin)]
    outs = []
    for qat in qats:
        qat_step(qat, x, target, seed=0)   # training-mode dropout
        qat.eval()
        disable_observer(qat)
        with torch.no_grad():
            y_qat = qat(x)
            assert torch.equal(qat(x), y_qat)   # eval: no dropout
        int8 = quantize(qat)
        with backends.use(INT8_BACKEND):
            y8 = int8(x)
        assert y8.dtype == torch.float32
        assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.05
        outs.append((y_qat, y8))
    # F.dropout behaves as nn.Dropout, in training (same mask) and after
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
