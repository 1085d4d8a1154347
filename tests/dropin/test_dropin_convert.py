"""Drop-in conversion of plain torch.nn models (gpuquant.quantization.fx): each fusion
pattern, float equality of the converted graph, QAT -> int8 on the NumPy backend,
unsupported and untraceable parts, disable_quantize, bad input."""
import copy
import inspect
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant.backends as backends
import gpuquant.models as M
import gpuquant.nn as gnn
import gpuquant.nn.quantized as qnn
from gpuquant.nn.qat import QATModule
from gpuquant.quantization import disable_observer, quantize, quantize_qat
from gpuquant.models import settle_bn
from gpuquant.quantization.fx import (DropInWarning, disable_quantize, needs_dropin,
                                      prepare_plain)

from tests.dropin.dropin_helpers import INT8_BACKEND, qat_step
from tests.int8_vs_qat import capture, check_modules


class Patterns(nn.Module):
    """Every pattern the converter fuses, written the ways float code writes them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.d = nn.Conv2d(16, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc1 = nn.Linear(32, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)                        # ConvBnRelu2d (Sequential, ReLU inplace)
        y = self.a_bn(self.a(x))                # ConvBn2d (attributes) ...
        y += x                                  # ... += and torch.relu: add_relu
        y = torch.relu(y)
        z = F.relu(self.b(y), inplace=True)     # ConvRelu2d
        w = F.relu6(self.c(y))                  # ConvRelu62d (depthwise)
        u = self.d(torch.cat([z, w], dim=1))    # Concat, Conv2d
        u = torch.add(u, z)                     # add
        u = u * w                               # mul
        u = F.max_pool2d(u, 2)                  # MaxPool2d (functional)
        u = F.avg_pool2d(u, 2, ceil_mode=True) + self.pool(u)   # AvgPool2d, AdaptiveAvgPool2d
        u = u.view(u.size(0), -1)               # a view of an int8 channels_last tensor
        u = F.relu(self.bn1d(self.fc1(self.drop(u))))   # LinearBnRelu1d
        u = self.fc2(u).relu()                  # LinearRelu (method)
        return self.fc3(u)                      # Linear


PATTERN_KINDS = {"QuantStub": 1, "ConvBnRelu2d": 1, "ConvBn2d": 1, "Elemwise": 4,
                 "ConvRelu2d": 1, "ConvRelu62d": 1, "Concat": 1, "Conv2d": 1, "MaxPool2d": 1,
                 "AvgPool2d": 1, "AdaptiveAvgPool2d": 1, "LinearBnRelu1d": 1,
                 "LinearRelu": 1, "Linear": 1, "DequantStub": 1}


def dropin_warnings(fn, *args, **kwargs):
    """(``fn(*args, **kwargs)``, the messages of the DropInWarnings it gave)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in rec if issubclass(w.category, DropInWarning)]


def qat_then_int8(model, x):
    """quantize_qat(model) on example x, then quantize: (QAT eval output, int8 output)."""
    qat = quantize_qat(model, example_inputs=(x,))
    with torch.no_grad():
        y_qat = qat.eval()(x)
    int8 = quantize(qat)
    with backends.use(INT8_BACKEND):
        return y_qat, int8(x)


def gnn_kinds(model):
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, gnn.Module))


@pytest.mark.parametrize("with_examples", [True, False])
def test_patterns_fused_float_identical(with_examples):
    model = settle_bn(Patterns(), torch.randn(8, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        gm = prepare_plain(model, (x,) if with_examples else None)
    assert gnn_kinds(gm) == PATTERN_KINDS
    assert sorted(m.method for m in gm.modules() if isinstance(m, gnn.Elemwise)) == \
        ["add", "add", "add_relu", "mul"]
    assert not needs_dropin(gm)
    # the same float computation: the fused float modules run conv, bn, relu unfused
    gm.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), ref(x))
    # train mode too (batch statistics, running statistics updated alike); dropout off
    gm.train(), ref.train()
    gm.drop.p = ref.drop.p = 0.0
    assert torch.equal(gm(x), ref(x))
    assert torch.equal(getattr(gm.stem, "0").bn.running_var, ref.stem[1].running_var)
    # the new modules hold the original Parameter objects
    assert gm.a.conv.weight is model.a.weight and gm.a.bn is model.a_bn
    assert gm.fc2.weight is model.fc2.weight


def test_patterns_qat_int8():
    model = settle_bn(Patterns(), torch.randn(8, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        qat = quantize_qat(model, example_inputs=(x,))
    assert Counter(type(m).__name__ for m in qat.modules() if isinstance(m, QATModule)) == \
        PATTERN_KINDS
    qat_step(qat, x, torch.tensor([0, 1, 2, 3]), seed=0)
    y_qat, cap = capture(qat, x)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(qat)
    assert isinstance(int8.quant, qnn.QuantStub) and isinstance(int8.fc3, qnn.Linear)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    check_modules(qat_modules, int8, cap, INT8_BACKEND)
    # relative L2 gap measured 0-0.029 over 8 seeds (shallow network)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.08


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.mean() > 0.5:
            return x * 0.5
        return x - 0.25


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(8), nn.ReLU())
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        x = torch.sort(x, dim=1).values         # a custom op without an int8 form
        x = self.gate(x)                        # untraceable submodule
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_unsupported_parts_stay_float_with_one_warning():
    model = settle_bn(WithUnsupported(), torch.randn(8, 3, 7, 7))
    gate = model.gate
    x = torch.randn(2, 3, 7, 7)
    qat, msgs = dropin_warnings(quantize_qat, model, example_inputs=(x,))
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "2 part(s)" in msg and ".sort()" not in msg and "torch.sort" in msg
    assert "'gate' (Gate: not traceable" in msg and "control flow" in msg
    assert "test_dropin_convert.py" in msg and "x.mean() > 0.5" in msg
    assert qat.gate is gate  # kept whole, float
    code = qat.code
    assert code.index("dequant") < code.index("sort") < code.index("gate") < \
        code.index("quant_1")
    qat_step(qat, x, torch.tensor([1, 3]), seed=0)
    y_qat, cap = capture(qat, x)
    qat_modules = dict(qat.named_modules())
    int8 = quantize(qat)
    assert int8.gate is gate
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    check_modules(qat_modules, int8, cap, INT8_BACKEND)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.03  # measured 0-0.0064, 8 seeds


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y


def test_untraceable_model_error_says_where_and_what_to_do():
    with pytest.raises(ValueError) as ei:
        quantize_qat(UntraceableRoot(), example_inputs=(torch.randn(1, 3, 8, 8),))
    msg = str(ei.value)
    assert "UntraceableRoot" in msg and "'<root>'" in msg
    assert "symbolically traced variables cannot be used as inputs to control flow" in msg
    line = inspect.getsourcelines(UntraceableRoot.forward)[1] + 2
    assert f"test_dropin_convert.py:{line}: if y.sum() > 0:" in msg
    assert "disable_quantize" in msg and "submodule" in msg


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 100:  # untraceable too: a disabled module is not traced into
            x = x / 2
        return torch.relu(self.bn(self.conv(x)))


class GBlock(gnn.Module):
    """A user container deriving gpuquant.nn.Module (has .disable_quantize())."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x)


class WithBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.gblock = GBlock()
        self.tail = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.tail(self.gblock(self.block(F.relu(self.head(x)))))


def test_disable_quantize_keeps_submodules_float():
    model = settle_bn(WithBlocks(), torch.randn(4, 3, 6, 6))
    disable_quantize(model.block)
    model.gblock.disable_quantize()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)  # deliberate float: no warning
        qat = quantize_qat(model, example_inputs=(x,))
    assert type(qat.block.conv) is nn.Conv2d and type(qat.gblock.conv) is nn.Conv2d
    assert type(qat.head).__name__ == "ConvRelu2d" and isinstance(qat.head, QATModule)
    qat_step(qat, x, torch.zeros(2, 6, 6, dtype=torch.long), seed=0)
    with torch.no_grad():
        y_qat = qat.eval()(x)
    int8 = quantize(qat)
    assert type(int8.block.conv) is nn.Conv2d and type(int8.gblock.conv) is nn.Conv2d
    assert isinstance(int8.head, qnn.ConvRelu2d) and isinstance(int8.tail, qnn.Conv2d)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02  # measured 0-0.003, 8 seeds


def test_needs_dropin_rule():
    assert not needs_dropin(M.digits_net())
    assert not needs_dropin(gnn.ConvBn2d(3, 4, 3))
    assert needs_dropin(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert needs_dropin(nn.Linear(3, 4))
    assert not needs_dropin(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU()))
    assert not needs_dropin(disable_quantize(nn.Sequential(nn.Conv2d(3, 4, 3))))
    assert needs_dropin(nn.Sequential(gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3),
                                      nn.Conv2d(4, 4, 1)))


def test_shared_module_two_call_sites_and_multiple_inputs_outputs():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, a, b):
            ya, yb = F.relu(self.conv(a)), self.conv(b)
            return {"sum": ya + yb, "a": ya}, yb.mean()

    model = Shared()
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    qat, msgs = dropin_warnings(quantize_qat, model, example_inputs=(a, b))
    assert len(msgs) == 1 and ".mean() in '<root>'" in msgs[0]
    assert type(qat.conv_1).__name__ == "ConvRelu2d" and type(qat.conv_2).__name__ == "Conv2d"
    assert qat.conv_1.weight is qat.conv_2.weight is model.conv.weight
    assert isinstance(qat.quant_a, QATModule) and isinstance(qat.quant_b, QATModule)
    with torch.no_grad():
        qat.eval()(a, b)
    int8 = quantize(qat)
    with backends.use(INT8_BACKEND):
        (d, m) = int8(a, b)
    with torch.no_grad():
        dq, mq = qat(a, b)
    assert set(d) == {"sum", "a"} and d["sum"].dtype == torch.float32
    assert m.dim() == 0 and abs(float(m - mq)) <= 0.05


def test_inplace_false_leaves_the_model_alone():
    model = Patterns().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y0 = model(x)
    qat = quantize_qat(model, inplace=False, example_inputs=(x,))
    assert type(model.a) is nn.Conv2d and qat.a.conv.weight is not model.a.weight
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_bad_input():
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        quantize_qat(Patterns(), example_inputs={"x": torch.randn(1, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"example_inputs \(shapes \[\(1, 5, 8, 8\)\]\) do not "
                                         r"run through the traced model"):
        quantize_qat(Patterns(), example_inputs=(torch.randn(1, 5, 8, 8),))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_plain("resnet")
    with pytest.raises(TypeError, match="value must be a bool"):
        disable_quantize(nn.ReLU(), 1)

class _BadCat(nn.Module):
    """Concatenates a 3x3 convolution's output with a 1x1's: no input runs through it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_example_inputs_that_do_not_run_raise_without_printing(capfd):
    """example_inputs the traced model cannot run: the ValueError was right, but torch's
    ShapeProp printed the whole traceback to stderr first (traceback.print_exc in its
    run_node) and the message named only the node ('ShapeProp error for: node=...'). Now
    nothing is printed, and the message names the module and the real error."""
    x = torch.randn(2, 3, 8, 8)
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"example_inputs \(shapes \[\(1, 5, 8, 8\)\]\) do not "
                                         r"run through the traced model at module 'stem.0' "
                                         r"\(Conv2d\): RuntimeError: .*expected input\[1, 5, "
                                         r"8, 8\] to have 3 channels"):
        quantize_qat(Patterns(), example_inputs=(torch.randn(1, 5, 8, 8),))
    with pytest.raises(ValueError, match=r"do not run through the traced model at "
                                         r"torch.cat in '<root>': RuntimeError: Sizes of "
                                         r"tensors must match"):
        quantize_qat(_BadCat(), example_inputs=(torch.randn(2, 3, 8, 7),))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[:500]
    model = Patterns()
    qat = quantize_qat(model, example_inputs=(x,))  # a good example still converts
    assert any(isinstance(m, QATModule) for m in qat.modules())



def test_save_load_round_trip(tmp_path):
    """gpuquant.save / load with the converted float model as the skeleton (float islands'
    weights travel in the file too)."""
    import gpuquant
    model = settle_bn(WithBlocks(), torch.randn(4, 3, 6, 6))
    disable_quantize(model.block)
    x = torch.randn(2, 3, 6, 6)
    qat = quantize_qat(model, example_inputs=(x,))
    with torch.no_grad():
        qat.eval()(x)
    int8 = quantize(qat)
    gpuquant.save(int8, tmp_path / "m.safetensors")
    skeleton = WithBlocks()
    disable_quantize(skeleton.block)
    loaded = gpuquant.load(tmp_path / "m.safetensors",
                           model=prepare_plain(skeleton, (x,)))
    with backends.use(INT8_BACKEND):
        assert torch.equal(loaded(x), int8(x))
    # the float model itself as the skeleton would load and then fail on its first call
    # (its forward has no stubs): refused at load, naming prepare_plain; so is no skeleton
    with pytest.raises(ValueError, match="converted from plain torch.nn .*prepare_plain"):
        gpuquant.load(tmp_path / "m.safetensors", model=WithBlocks())
    with pytest.raises(ValueError, match="prepare_plain"):
        gpuquant.load(tmp_path / "m.safetensors")


def test_save_load_of_a_copied_conversion(tmp_path):
    """quantize(inplace=False) deep-copies the drop-in GraphModule, whose copy torch.fx
    names "GraphModule": the file still records the model's own class name, so the
    documented skeleton (prepare_plain of the float model), or a deep copy of it, loads it."""
    import copy

    import gpuquant
    x = torch.randn(2, 3, 6, 6)
    qat = quantize_qat(settle_bn(WithBlocks(), torch.randn(4, 3, 6, 6)), example_inputs=(x,))
    with torch.no_grad():
        qat.eval()(x)
    int8 = quantize(qat, inplace=False)
    assert type(int8).__name__ == "GraphModule"  # what torch.fx's deepcopy does
    gpuquant.save(int8, tmp_path / "m.safetensors")
    for skeleton in (prepare_plain(WithBlocks(), (x,)),
                     copy.deepcopy(prepare_plain(WithBlocks(), (x,)))):
        loaded = gpuquant.load(tmp_path / "m.safetensors", model=skeleton)
        with backends.use(INT8_BACKEND):
            assert torch.equal(loaded(x), int8(x))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()                   # mutates y: later reads of y see the ReLU
        z = self.conv2(y)
        z.add_(y)                   # z += y without rebinding
        w = self.conv3(z)
        w.clamp_(max=0.5)           # in place, no int8 form: stays float, out of place
        return w + z


def test_inplace_ops_functionalized():
    model = InPlace().eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    gm, msgs = dropin_warnings(prepare_plain, copy.deepcopy(model), (x,))
    assert len(msgs) == 1 and "1 part(s)" in msgs[0] and ".clamp()" in msgs[0]
    assert type(gm.conv) is gnn.ConvRelu2d  # y.relu_() fused into the convolution
    assert [m.method for m in gm.modules() if isinstance(m, gnn.Elemwise)] == ["add", "add"]
    with torch.no_grad():
        assert torch.equal(gm(x), want)
    y_qat, y8 = qat_then_int8(gm, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02  # measured 0-0.0019, 8 seeds


class SpatialMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.conv(x))
        a = self.fc(y.mean((2, 3)))                           # (N, C)
        b = self.fc2(torch.mean(y, [-1, -2], keepdim=True).flatten(1))
        return a + b, y.mean(1)                                # y.mean(1): a float op


@pytest.mark.parametrize("with_examples", [True, False])
def test_spatial_mean_is_global_average_pooling(with_examples):
    model = SpatialMean().eval()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        want = model(x)
    gm, msgs = dropin_warnings(prepare_plain, copy.deepcopy(model),
                               (x,) if with_examples else None)
    # without example inputs the rank is unknown: negative dims are not taken for H, W
    parts = 1 if with_examples else 2
    assert len(msgs) == 1 and f"{parts} part(s)" in msgs[0] and ".mean() in '<root>'" in msgs[0]
    assert gnn_kinds(gm)["AdaptiveAvgPool2d"] == 3 - parts
    with torch.no_grad():
        got = gm(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # mean vs pool: rounding
    y_qat, y8 = qat_then_int8(gm, x)
    assert float((y8[0] - y_qat[0]).norm() / y_qat[0].norm()) <= 0.02  # measured <= 0.004


class CopyingReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        y = F.relu(self.conv(x)).permute(0, 2, 3, 1)   # NHWC view, not contiguous
        return self.fc(self.drop(y.reshape(y.size(0), -1)))   # reshape copies


def test_copying_reshape_and_training_dropout_keep_the_producer():
    """A reshape that copies and a training-mode dropout write new tensors; quantize still
    finds the Linear's input qparams (the ReLU conv's) after training passes only."""
    model = CopyingReshape()
    x = torch.randn(2, 3, 5, 5)
    qat = quantize_qat(model, example_inputs=(x,))
    assert "keep_producer" in qat.code
    qat_step(qat, x, torch.tensor([0, 2]), seed=0)
    conv_scale = qat.conv.get_activation_qparams().scale
    disable_observer(qat)
    int8 = quantize(qat, inplace=False)  # no eval pass: only the training one recorded
    assert torch.equal(int8.fc.input_scale, conv_scale)
    with torch.no_grad():
        y_qat = qat.eval()(x)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02  # measured 0, 8 seeds


class DetachedBranch(nn.Module):
    """A stop-gradient (what drop-in conversion suggests for a no_grad block in forward)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.head(y.detach()) + torch.detach(y)


def test_detach_passes_quantized_values_through():
    """``.detach()`` / ``torch.detach`` of a quantized value is a pass-through op, as a
    view is: no dequantize / quantize pair around it in the int8 model; in training it
    still stops the gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    qat = quantize_qat(DetachedBranch(), example_inputs=(x,))
    qat(x).sum().backward()
    assert qat.conv.weight.grad is None and qat.head.weight.grad is not None
    disable_observer(qat)
    int8 = quantize(qat.eval(), inplace=False)
    stubs = [n for n, m in int8.named_modules() if type(m).__name__ in ("QuantStub",
                                                                         "DequantStub")]
    assert len(stubs) == 2, stubs  # the input's and the output's only
    with torch.no_grad():
        y_qat = qat(x)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02


def test_a_lone_layer():
    x = torch.randn(3, 6)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        want = layer(x)
    qat = quantize_qat(layer, example_inputs=(x,))
    assert type(getattr(qat, "0")).__name__ == "Linear" and isinstance(getattr(qat, "0"),
                                                                       QATModule)
    with torch.no_grad():
        y_qat = qat.eval()(x)
    int8 = quantize(qat)
    with backends.use(INT8_BACKEND):
        y8 = int8(x)
    assert float((y_qat - want).norm() / want.norm()) <= 0.03  # measured 0.004-0.0096
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02   # measured 0, 8 seeds
