"""Drop-in conversion edge cases: in-place writes through views (refused), advanced
indexing (a copy), optional forward parameters, padding='same' with an even kernel, keyword
calls of layers, the example_inputs count, and the rollback of a submodule that read a
Parameter before failing to trace, layers carrying hooks or parametrizations,
no_grad blocks and in-place writes to buffers in forward."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401 -- torch.nn.utils.prune (not imported by torch)

import gpuquant.backends as backends
import gpuquant.nn.qat as qat_nn
from gpuquant.quantization import disable_observer, quantize, quantize_qat
from gpuquant.quantization.fx import DropInWarning, prepare_plain

from tests.dropin.dropin_helpers import INT8_BACKEND


def convert(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in rec if issubclass(w.category, DropInWarning)]


def qat_then_int8(qat, x):
    qat.train()
    qat(x)
    qat.eval()
    with torch.no_grad():
        y_qat = qat(x)
    int8 = quantize(copy.deepcopy(qat))
    with backends.use(INT8_BACKEND), torch.no_grad():
        y8 = int8(x)
    return y_qat, y8


# ------------------------------------------------------------- 1. in-place writes via views
class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)


class ViewRelu(TwoConvs):
    def forward(self, x):
        y = self.a(x)
        F.relu(y[:, :4], inplace=True)
        return self.b(y)


class ViewAdd(TwoConvs):
    def forward(self, x):
        y = self.a(x)
        z = y[:, 4:]
        z += 1.0                      # fx records z + 1.0: the write to y is not in the graph
        return self.b(y)


class StaleView(TwoConvs):
    def forward(self, x):
        y = self.a(x)
        v = y.view(y.shape)
        y.relu_()                     # v sees it too
        return self.b(v)


class ChunkMul(TwoConvs):
    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, 1)
        p.mul_(2.0)
        return self.b(y)


@pytest.mark.parametrize("cls, op", [(ViewRelu, "F.relu(..., inplace=True)"),
                                     (ViewAdd, "'+='"), (StaleView, "'.relu_()'"),
                                     (ChunkMul, "'.mul_()'")])
@pytest.mark.parametrize("with_examples", [True, False])
def test_inplace_write_through_a_view_is_refused(cls, op, with_examples):
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="in-place") as e:
        prepare_plain(cls(), (x,) if with_examples else None)
    msg = str(e.value)
    assert op in msg and "test_dropin_edge_cases.py:" in msg and "shares memory" in msg


class ViewOnly(TwoConvs):        # the view is the only value read afterwards: exact
    def forward(self, x):
        y = self.a(x)
        z = y[:, :8]
        z.relu_()
        return self.b(z)


class SliceAfter(TwoConvs):      # views made after the write read the written value
    def forward(self, x):
        y = self.a(x)
        y.relu_()
        z = y[:, :4]
        return self.b(torch.cat([z, y[:, 4:]], 1))


class SameTensor(TwoConvs):      # ident is the same tensor as y: it sees the += too
    def forward(self, x):
        y = self.a(x)
        ident = y
        y += self.b(y)
        n = y.size(1)
        n += 0                        # an int: rebound, not written
        return self.b(ident)[:, :n] + y


@pytest.mark.parametrize("cls", [ViewOnly, SliceAfter, SameTensor])
@pytest.mark.parametrize("with_examples", [True, False])
def test_inplace_ops_without_live_aliases_stay_exact(cls, with_examples):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = model(x)
    gm, _ = convert(prepare_plain, copy.deepcopy(model), (x,) if with_examples else None)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), want)


# ------------------------------------------------------------------- 2. advanced indexing
class AdvIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[:, [0, 2, 4]] + y[:, torch.tensor([1, 3, 5])]


def test_advanced_indexing_keeps_the_producer():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    qat, msgs = convert(quantize_qat, AdvIndex(), example_inputs=(x,))
    assert not msgs and qat.code.count("keep_producer(") == 2
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02


# ------------------------------------------------------------- 3. optional forward params
class Optional_(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, residual=None, scale: float = 1.0):
        y = self.conv(x)
        if residual is not None:
            y = y + residual
        if scale != 1.0:              # control flow on a constant default: traced at 1.0
            y = y * scale
        return y


@pytest.mark.parametrize("with_examples", [True, False])
def test_unsupplied_optional_parameters_are_traced_at_their_default(with_examples):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = Optional_().eval()
    with torch.no_grad():
        want = model(x)
    gm, msgs = convert(prepare_plain, copy.deepcopy(model), (x,) if with_examples else None)
    assert not msgs and "def forward(self, x, residual = None, scale = 1.0)" in gm.code
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), want)
    with pytest.raises(ValueError, match="Optional_.forward: parameter 'residual' was fixed "
                                         "at its default None .* got a tensor of shape "
                                         r"\(2, 8, 6, 6\); to keep it an input, give it in "
                                         "example_inputs"):
        gm(x, torch.randn(2, 8, 6, 6))
    with pytest.raises(ValueError, match="parameter 'scale' was fixed at its default 1.0 .* "
                                         "got 2.0"):
        gm(x, None, 2.0)
    assert torch.equal(gm(x, None, 1.0), gm(x))  # the default itself, given: fine
    qat, _ = convert(quantize_qat, copy.deepcopy(model), example_inputs=(x,) if with_examples
                     else None)
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02


def test_supplied_optional_parameter_stays_an_input():
    x, r = torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6)
    model = Optional_().eval()
    with torch.no_grad():
        want = model(x, r)
    gm, _ = convert(prepare_plain, copy.deepcopy(model), (x, r))
    with torch.no_grad():
        assert torch.equal(gm.eval()(x, r), want)


# ---------------------------------------------------------------- 6. example_inputs count
def test_example_inputs_count_is_checked():
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(TypeError, match=r"example_inputs hold 4 value\(s\), which "
                                        r"Optional_.forward\(x, residual=None, scale: float"):
        quantize_qat(Optional_(), example_inputs=(x, x, 1.0, "junk"))
    with pytest.raises(TypeError, match=r"example_inputs hold 3 value\(s\), which "
                                        r"Conv2d.forward\(input: torch.Tensor\)"):
        quantize_qat(nn.Conv2d(3, 8, 3), example_inputs=(x, x, "junk"))

    class TwoArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x, k: int):
            return self.conv(x) * k
    with pytest.raises(TypeError, match=r"example_inputs hold 1 value\(s\), which "
                                        r"TwoArgs.forward\(x, k: int\)"):
        quantize_qat(TwoArgs(), example_inputs=(x,))


# ---------------------------------------------------------- 4. padding='same', even kernel
class SameEven(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 4, padding="same")
        self.c2 = nn.Conv2d(8, 8, 3, padding="same")   # odd kernel: symmetric, quantized
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c2(self.c(x))).mean((2, 3)))


def test_same_padding_with_even_kernel_stays_float_warned():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    qat, msgs = convert(quantize_qat, SameEven(), example_inputs=(x,))
    assert len(msgs) == 1 and "module 'c' (Conv2d: padding='same'" in msgs[0] and \
        "pads asymmetrically" in msgs[0]
    assert type(qat.c) is nn.Conv2d and isinstance(qat.c2, qat_nn.ConvRelu2d)
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02


# ------------------------------------------------------------------- 5. keyword calls
class KwCalls(nn.Module):
    def __init__(self, kw):
        super().__init__()
        self.kw = kw
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if self.kw:
            y = F.relu(self.bn(input=self.conv(input=x)))
            return self.fc(input=torch.flatten(y.mean((2, 3), keepdim=True), 1))
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1))


def test_keyword_calls_are_quantized_like_positional_ones():
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    pos, msgs_pos = convert(quantize_qat, KwCalls(False), example_inputs=(x,))
    torch.manual_seed(0)
    kw, msgs_kw = convert(quantize_qat, KwCalls(True), example_inputs=(x,))
    assert not msgs_pos and not msgs_kw
    assert isinstance(kw.conv, qat_nn.ConvBnRelu2d) and isinstance(kw.fc, qat_nn.Linear)
    assert kw.code.replace("kw", "") == pos.code.replace("kw", "")
    y_pos, y8_pos = qat_then_int8(pos, x)
    y_kw, y8_kw = qat_then_int8(kw, x)
    assert torch.equal(y_pos, y_kw) and torch.equal(y8_pos, y8_kw)


# ------------------------------------------------------- 7. rollback after a Parameter read
class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))

    def forward(self, x):
        y = x * self.scale           # a get_attr node, then the trace fails: rolled back
        if y.mean() > 0:
            return y
        return -y


class ParamAfterRollback(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv(x))) * self.gate.scale


@pytest.mark.parametrize("with_examples", [True, False])
def test_parameter_read_by_a_rolled_back_submodule(with_examples):
    torch.manual_seed(0)
    model = ParamAfterRollback().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    gm, msgs = convert(prepare_plain, copy.deepcopy(model), (x,) if with_examples else None)
    assert len(msgs) == 1 and "module 'gate' (Gate: not traceable" in msgs[0]
    gm.graph.lint()
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), want)


# ------------------------------------------------------------- qconfig attributes, traced
def test_qconfig_on_containers_and_fused_layers_survives_the_trace():
    """A qconfig attribute on a plain container applies to everything the rewrite puts in
    it (fused layers, its stubs' users), and one on a Conv fused with its BatchNorm to the
    fused layer, as in a gpuquant.nn model; the rest gets the global one."""
    from gpuquant.quantization import ema_fakequant_qconfig, ema_lowbit_fakequant_qconfig
    low = ema_lowbit_fakequant_qconfig
    m = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                      nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                      nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    m[1].qconfig = low          # a container's
    m[0][0].qconfig = low       # a Conv fused with its BatchNorm
    x = torch.randn(1, 3, 6, 6)
    qat, _ = convert(quantize_qat, m, ema_fakequant_qconfig, example_inputs=(x,))
    got = {n: mod.qconfig is low for n, mod in qat.named_modules()
           if isinstance(mod, qat_nn.QATModule) and n not in ("quant", "dequant")}
    assert got == {"0.0": True, "1.0": True, "1.2": True, "2.0": False}, got
    assert "qconfig" not in m[0].__dict__ and "qconfig" not in m[2][0].__dict__  # untouched
    root = nn.Sequential(nn.Conv2d(3, 2, 1))
    root.qconfig = low          # the model's own: the whole GraphModule
    qat, _ = convert(quantize_qat, root, ema_fakequant_qconfig, example_inputs=(x,))
    assert all(mod.qconfig is low for mod in qat.modules()
               if isinstance(mod, qat_nn.QATModule))


# ------------------------------------------------------- forward depending on train / eval
class EvalSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if not self.training:         # fx would freeze the branch of the mode it traced in
            y = y.softmax(1)
        return y


class DropPath(nn.Module):
    def forward(self, x):
        if self.training:
            return x * torch.rand_like(x[:, :1, :1, :1]).ge(0.5).to(x.dtype) * 2.0
        return x


class DropPathShape(nn.Module):
    def forward(self, x):  # untraceable in train mode only (torch.rand of a traced size)
        if self.training:
            return x * torch.rand(x.shape[0], 1, 1, 1).ge(0.5).to(x.dtype) * 2.0
        return x


class DropPathBlock(nn.Module):
    def __init__(self, drop_path=DropPath):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop_path = drop_path()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(x + self.drop_path(F.dropout(self.conv(x), 0.1, self.training)))


@pytest.mark.parametrize("drop_path", [DropPath, DropPathShape])
@pytest.mark.parametrize("train", [True, False])
def test_forward_depending_on_the_mode_is_not_frozen(train, drop_path):
    """fx runs forward once: ``if self.training:`` would be frozen at the mode of the trace
    (the eval QAT model and the int8 model silently kept the training branch). The model's
    own forward is refused; a submodule that is the identity in eval (a drop path) is a
    pass-through leaf (following train / eval, int8 tensors through it as through
    nn.Dropout), other mode-dependent submodules stay float leaves (test below)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"differently in train and eval mode.*\.softmax\(\)"):
        quantize_qat(EvalSoftmax().train(train), example_inputs=(x,))
    model = DropPathBlock(drop_path).train(train)
    x = torch.randn(2, 4, 6, 6)
    qat, msgs = convert(quantize_qat, copy.deepcopy(model), example_inputs=(x,))
    assert msgs == []
    assert type(qat.drop_path) is drop_path
    assert isinstance(qat.conv, qat_nn.Conv2d)  # the block is quantized
    assert not hasattr(model, "_tensor_constant1")  # the second trace leaves nothing behind
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    disable_observer(qat)
    with torch.no_grad():
        assert torch.equal(qat(x), y_qat)  # eval: no path dropped


class TrainScale(nn.Module):
    def forward(self, x):  # not the identity in eval: a float leaf following the mode
        return x * (2.0 if self.training else 0.5)


def test_a_mode_dependent_submodule_other_than_a_regularizer_stays_float():
    model = DropPathBlock(TrainScale)
    x = torch.randn(2, 4, 6, 6)
    qat, msgs = convert(quantize_qat, copy.deepcopy(model), example_inputs=(x,))
    assert len(msgs) == 1
    assert "module 'drop_path' (TrainScale: not traceable" in msgs[0]
    assert "differently in train and eval mode" in msgs[0]
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02


# ------------------------------------------------- a layer's parameters read by the forward
class ReadsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))).mean((2, 3))
        y = self.fc(y) + F.linear(y, self.fc.weight) * self.conv.weight.abs().mean()
        return self.head(y)


@pytest.mark.parametrize("with_examples", [True, False])
def test_layer_whose_parameters_the_forward_reads_stays_float(with_examples):
    """``self.conv.weight`` read beside the call of ``self.conv``: fused with its BatchNorm
    the conv's weight moved to ``conv.conv.weight`` (the conversion crashed: 'references
    nonexistent attribute'), and an int8 ``fc`` would have handed out int8 weights."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = ReadsWeights().eval()
    with torch.no_grad():
        want = model(x)
    qat, msgs = convert(quantize_qat, copy.deepcopy(model),
                        example_inputs=(x,) if with_examples else None)
    assert len(msgs) == 1
    assert "module 'conv' (Conv2d: its weight also read directly" in msgs[0]
    assert "module 'fc' (Linear: its weight also read directly" in msgs[0]
    assert isinstance(qat.head, qat_nn.Linear)  # the others are quantized as usual
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    gm, _ = convert(prepare_plain, copy.deepcopy(model), (x,) if with_examples else None)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), want)


# ------------------------------------------------------ dtype / value reads of int8 values
class ReadsDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x, mask):
        y = self.a(x)
        m = mask.to(y.dtype)          # masks follow the activations' dtype
        return self.c(y) * m, y[0, 1, 2, 3].item(), y.is_floating_point()


def test_dtype_and_value_reads_of_quantized_values_see_the_float_value():
    """``mask.to(y.dtype)``, ``y[...].item()`` read from the int8 tensor gave an int8 mask
    (the int8 model crashed in the QuantStub after it, or computed in int8), the raw integer
    and False; they read the dequantized value now, as QAT does."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 3, 4, 5), torch.rand(2, 1, 4, 5) > 0.3
    qat, msgs = convert(quantize_qat, ReadsDtype(), example_inputs=(x, mask))
    qat.train()
    qat(x, mask)
    qat.eval()
    with torch.no_grad():
        y_qat, item_qat, fp_qat = qat(x, mask)
    int8 = quantize(copy.deepcopy(qat))
    with backends.use(INT8_BACKEND), torch.no_grad():
        y8, item8, fp8 = int8(x, mask)
    assert y8.dtype == torch.float32 and float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    assert isinstance(item8, float) and item8 == item_qat and item8 != 0.0
    assert fp8 is True and fp_qat is True


# ------------------------------------------------ layers carrying hooks or parametrizations
class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.mid = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.mid(F.relu(self.bn(self.conv(x))))
        return self.head(F.relu(self.fc(y.mean((2, 3)))))


def test_layers_with_hooks_or_parametrizations_stay_float():
    """A pruned conv (torch.nn.utils.prune: a forward pre-hook computing ``weight``) folded
    with its BatchNorm trained on the stale ``weight`` tensor (its ``weight_orig`` never
    moved), a weight_norm (parametrized) Linear swapped alone crashed at the first forward
    with "'Linear' object has no attribute 'weight'", and a user's forward hook on a layer
    never fired. Such layers stay as they are (float, named in the warning); the rest is
    quantized."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = Hooked()
    torch.nn.utils.prune.l1_unstructured(model.conv, "weight", amount=0.5)
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    seen = []
    model.mid.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.eval()
    with torch.no_grad():
        want = model(x)
    before = model.conv.weight_orig.detach().clone()
    qat, msgs = convert(quantize_qat, model, example_inputs=(x,))
    assert len(msgs) == 1
    assert "module 'conv' (Conv2d: carries forward pre-hooks (L1Unstructured)" in msgs[0]
    assert "module 'fc' (ParametrizedLinear: carries parametrizations of weight" in msgs[0]
    assert "module 'mid' (Conv2d: carries forward hooks" in msgs[0]
    assert isinstance(qat.head, qat_nn.Linear)
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    seen.clear()
    qat(x).pow(2).mean().backward()
    opt.step()
    assert seen == [(2, 4, 6, 6)]
    assert not torch.equal(model.conv.weight_orig, before)  # the pruned weight trains
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    gm, _ = convert(prepare_plain, model, (x,))
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model.eval()(x))
    assert not torch.equal(want, model(x))  # (it trained)


# ------------------------------------------------------------ grad-mode blocks in forward
class _Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            return self.t(x)


class StopGrad(nn.Module):
    def __init__(self, in_root):
        super().__init__()
        self.in_root = in_root
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.teacher = _Teacher()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.in_root:
            with torch.no_grad():
                t = self.teacher.t(x)
        else:
            t = self.teacher(x)
        return self.fc((F.relu(self.c(x)) + t).mean((2, 3)))


def test_no_grad_block_in_forward_is_not_dropped():
    """torch.fx records no grad mode: a ``with torch.no_grad():`` block (a teacher branch, a
    stop-gradient) was traced as ordinary ops, and the QAT model silently trained through
    it. In a submodule the module stays float (warned, it keeps its block); in the model's
    own forward the conversion is refused, naming the line."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    qat, msgs = convert(quantize_qat, StopGrad(in_root=False), example_inputs=(x,))
    assert len(msgs) == 1 and "module 'teacher' (_Teacher: not traceable" in msgs[0]
    assert "no_grad" in msgs[0]
    qat.train()(x).sum().backward()
    assert qat.teacher.t.weight.grad is None and qat.c.weight.grad is not None
    y_qat, y8 = qat_then_int8(qat, x)
    assert float((y8 - y_qat).norm() / y_qat.norm()) <= 0.02
    with pytest.raises(ValueError, match=r"(?s)forward of the model itself.*no_grad.*"
                                         r"\.detach\(\).*test_dropin_edge_cases.py"):
        quantize_qat(StopGrad(in_root=True), example_inputs=(x,))
    with torch.no_grad():  # converting under no_grad is no block in the forward
        quantize_qat(nn.Sequential(nn.Conv2d(3, 4, 1)), example_inputs=(x,))


# ---------------------------------------------- in-place writes to parameters / buffers
class _RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.zeros(1, 3, 1, 1))

    def forward(self, x):
        self.mu.mul_(0.9).add_(0.1 * x.mean((0, 2, 3), keepdim=True).detach())
        return x - self.mu


class _Reassigns(_RunningMean):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        self.mu = 0.9 * self.mu + 0.1 * x.mean((0, 2, 3), keepdim=True).detach()
        return self.c(x - self.mu)


class WritesState(nn.Module):
    def __init__(self, in_root):
        super().__init__()
        self.in_root = in_root
        self.pre = _RunningMean()
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.in_root:
            self.pre.mu += 0.1 * x.mean((0, 2, 3), keepdim=True).detach()
            y = x - self.pre.mu
        else:
            y = self.pre(x)
        z = torch.zeros(1, 4, 1, 1).add_(1.0)  # a fresh tensor written in place: no state
        return self.fc((self.c(y) * z).mean((2, 3)))


def test_inplace_write_to_a_buffer_in_forward_is_not_dropped():
    """``self.mu.mul_(0.9).add_(...)`` in forward: functionalizing made it out of place, so
    the buffer was never updated (silently); ``self.mu += ...`` failed with a KeyError from
    the second trace, and left a torch.fx Proxy in the model's buffer. In a submodule the
    module stays float (warned, it updates its buffer as written); in the model's own forward
    the conversion is refused naming the line, the model untouched."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4) + 3
    model = WritesState(in_root=False)
    qat, msgs = convert(quantize_qat, copy.deepcopy(model), example_inputs=(x,))
    assert len(msgs) == 1 and "module 'pre' (_RunningMean: not traceable" in msgs[0]
    assert "buffer 'pre.mu'" in msgs[0]
    model.train()
    qat.train()
    for _ in range(2):
        model(x)
        qat(x)
    assert torch.equal(qat.pre.mu, model.pre.mu) and bool((model.pre.mu > 0.5).all())
    model = WritesState(in_root=True)
    with pytest.raises(ValueError, match=r"(?s)forward of the model itself.*buffer 'pre.mu'"
                                         r".*test_dropin_edge_cases.py"):
        quantize_qat(model, example_inputs=(x,))
    assert type(model.pre.mu) is torch.Tensor and not model.pre.mu.any()
    # assigned instead of written in place: the same (fx left its Proxy in the buffer)
    model = nn.Sequential(_Reassigns(), nn.Conv2d(3, 4, 1))
    qat, msgs = convert(quantize_qat, model, example_inputs=(x,))
    assert len(msgs) == 1 and \
        "assigns a traced value to, or writes in place, the model's '0.mu'" in msgs[0]
    assert type(model[0].mu) is torch.Tensor and not model[0].mu.any()  # the example pass too
    qat(x)
    assert bool((qat.get_submodule("0").mu > 0.2).all())
    model = _Reassigns()
    with pytest.raises(ValueError, match=r"forward of the model itself.*'mu'"):
        quantize_qat(model, example_inputs=(x,))
    assert type(model.mu) is torch.Tensor
    # the example pass leaves buffers as they were; lazy ones it materializes
    lazy = quantize_qat(nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d()),
                        example_inputs=(x,))
    assert lazy(x).shape == (2, 4, 4, 4)


class _SyncNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.c(x))).mean((2, 3))
        return self.head(F.relu(self.bn1(self.fc(y))))


def test_sync_batchnorm_fuses_and_the_int8_model_drops_the_fused_batchnorms_names():
    """convert_sync_batchnorm before quantize_qat (a DDP script's order) left conv and Linear
    unfused, their SyncBatchNorm and ReLU float between stubs (warned as 'no int8 version').
    They fuse now, as BatchNorm2d / 1d do (the fused module syncs its statistics). And the
    int8 drop-in model kept every fused BatchNorm at its own name too (fx's unused-module
    sweep sees a module once): float tensors nothing runs, in state_dict and saved files."""
    from gpuquant.models import settle_bn
    from gpuquant.nn.qat import ConvBnRelu2d, LinearBnRelu1d
    from tests.int8_vs_qat import capture, check_modules
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(settle_bn(_SyncNet(), x))
    assert type(model.bn) is nn.SyncBatchNorm
    with backends.use("reference"):
        qat, warned = convert(quantize_qat, model, example_inputs=(x,))
        assert not warned, warned
        assert type(qat.c) is ConvBnRelu2d and type(qat.fc) is LinearBnRelu1d
        assert qat.c.bn is model.bn and qat.fc.bn is model.bn1
        opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
        F.cross_entropy(qat.train()(x), torch.arange(8) % 4).backward()
        opt.step()
        y, cap = capture(qat, x)
        qat_modules = dict(qat.named_modules())
        int8 = quantize(copy.deepcopy(qat))
    check_modules(qat_modules, int8, cap, INT8_BACKEND)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in int8.modules())
    assert not hasattr(int8, "bn") and not hasattr(int8, "bn1")
    assert not [k for k in int8.state_dict() if k.startswith(("bn.", "bn1."))]
    assert hasattr(qat, "bn")  # the QAT model keeps the alias (a script may freeze it by name)


def test_numpy_example_inputs_named():
    """A NumPy example gave a ValueError printing the whole array (14 KB) without saying a
    tensor is needed."""
    with pytest.raises(TypeError, match=r"^quantize_qat: example_inputs\[0\] is a numpy.ndarray, "
                                        r"not a torch.Tensor; pass torch.from_numpy\(...\)$"):
        quantize_qat(nn.Sequential(nn.Conv2d(3, 4, 3)), example_inputs=(torch.randn(2, 3, 8, 8)
                                                                        .numpy(),))


class _Counts(nn.Module):
    """Buffers written in place with untraced (constant) arguments: fx runs such an op on
    the real tensor and records no node."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.register_buffer("steps", torch.zeros(1))
        self.register_buffer("mu", torch.ones(1))

    def forward(self, x):
        self.steps += 1
        self.mu.mul_(0.9)
        return self.c(x) * self.mu


class _HoldsCounts(nn.Module):
    def __init__(self):
        super().__init__()
        self.b, self.c = _Counts(), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.c(self.b(x))


def test_inplace_write_to_a_buffer_with_constant_arguments_is_not_dropped():
    """DROPIN.md's own examples, self.steps += 1 and self.mu.mul_(0.9), converted silently:
    the update was dropped (the buffer gone from the converted model, or frozen) and the
    two traces had run it on the real buffer (mu 0.81 before any call). Now, as with traced
    arguments: a submodule stays float (warned, updating its buffers), the model's own
    forward is refused, and the buffers keep their values through the conversion."""
    x = torch.randn(2, 3, 4, 4)
    model = _HoldsCounts()
    qat, msgs = convert(quantize_qat, copy.deepcopy(model), example_inputs=(x,))
    assert len(msgs) == 1 and "module 'b' (_Counts: not traceable" in msgs[0]
    assert "'b.steps'" in msgs[0] and "'b.mu'" in msgs[0]
    assert float(qat.b.steps) == 0 and float(qat.b.mu) == 1  # (the example pass: as were)
    for _ in range(3):
        model(x)
        qat(x)
    assert float(qat.b.steps) == float(model.b.steps) == 3
    assert torch.equal(qat.b.mu, model.b.mu)
    root = _Counts()
    with pytest.raises(ValueError, match=r"forward of the model itself.*'steps', 'mu'"):
        quantize_qat(root, example_inputs=(x,))
    assert float(root.steps) == 0 and float(root.mu) == 1


class _ViewA(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.register_buffer("steps", base[:1])

    def forward(self, x):
        self.steps += 1
        return self.c(x)


class _ViewB(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.register_buffer("other", base[1:])

    def forward(self, x):
        return self.c(x) + self.other


def test_buffer_sharing_storage_with_a_written_one_is_not_named():
    """Buffers that are views of one storage share a version counter: a submodule writing
    its own (kept float, warned) made the root's snapshot see the other's version move and
    refuse the model's own forward, naming a buffer nothing writes (found by review).
    Values decide now: the write was restored, so the root converts."""
    base = torch.zeros(2)
    model = nn.Sequential(_ViewA(base), _ViewB(base))
    qat, msgs = convert(quantize_qat, model, example_inputs=(torch.randn(2, 3, 4, 4),))
    assert len(msgs) == 1 and "module '0' (_ViewA: not traceable" in msgs[0]
    assert "'0.steps'" in msgs[0] and "other" not in msgs[0]
    assert not base.any()


class _FrozenBatchNorm2d(nn.Module):  # torchvision.ops.misc.FrozenBatchNorm2d
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), v))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * \
            (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


def test_forward_computing_with_buffers_is_warned():
    """A torchvision FrozenBatchNorm2d: fx computed its scale and shift from the buffers at
    conversion and the converted model held them as constants, the buffers gone from its
    state_dict, so pretrained values loaded afterwards were silently ignored (found by the
    model-zoo audit). Warned now, naming the buffers; a buffer an op takes as it is stays a
    live get_attr and is not named (test_buffer_sharing_storage_with_a_written_one_...)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _FrozenBatchNorm2d(4), nn.ReLU())
    qat, msgs = convert(quantize_qat, model.eval(), example_inputs=(torch.randn(2, 3, 6, 6),))
    frozen = [m for m in msgs if "computes with the values of its buffers" in m]
    assert len(frozen) == 1
    assert "['1.bias', '1.running_mean', '1.running_var', '1.weight']" in frozen[0]
    assert "before quantize_qat" in frozen[0]
    sd = qat.state_dict()  # (what the warning says)
    assert not any(f"1.{b}" in sd for b in ("weight", "bias", "running_mean", "running_var"))
