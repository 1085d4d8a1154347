"""Hooks a user registers on a model that goes QAT -> int8: the fused BatchNorm-folded
QAT modules refuse hooks on their inner layer (their forward never calls it), and
quantize() carries the QAT modules' forward hooks to the int8 modules (as torch.ao's
convert does; they had been dropped without a word)."""
import warnings

import pytest
import torch

import gpuquant.nn as gnn
from gpuquant.quantization import quantize, quantize_qat


class Net(gnn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.c, self.dq = gnn.QuantStub(), gnn.ConvBnRelu2d(3, 4, 3), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.c(self.q(x)))


class Head(gnn.Module):
    """QuantStub -> Linear(n_in, n_out) as ``fc`` -> DequantStub."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.q, self.fc, self.dq = gnn.QuantStub(), gnn.Linear(n_in, n_out), gnn.DequantStub()

    def forward(self, x):
        return self.dq(self.fc(self.q(x)))


def test_quantize_carries_forward_hooks_to_the_int8_modules():
    torch.manual_seed(0)
    m = Net()
    fired = []
    m.c.register_forward_hook(lambda mod, i, o: fired.append(("c", type(mod).__name__)))
    m.dq.register_forward_pre_hook(lambda mod, i: fired.append(("dq", type(mod).__name__)))
    qat = quantize_qat(m)
    qat(torch.randn(2, 3, 8, 8))
    assert [f[0] for f in fired] == ["c", "dq"]
    fired.clear()
    int8 = quantize(qat.eval(), inplace=False)
    int8(torch.randn(2, 3, 8, 8))
    assert fired == [("c", type(int8.c).__name__), ("dq", type(int8.dq).__name__)]
    assert type(int8.c).__module__.startswith("gpuquant.nn.quantized")
    # the QAT model (inplace=False) keeps its own
    fired.clear()
    qat(torch.randn(2, 3, 8, 8))
    assert [f[0] for f in fired] == ["c", "dq"]


@pytest.mark.parametrize("how", ["prune", "weight_norm", "spectral_norm"])
def test_weight_hooks_on_a_fused_modules_inner_layer_are_refused(how):
    """A weight-recomputing hook on ConvBnRelu2d's conv never ran in QAT (the forward folds
    the BatchNorm and calls neither submodule): a legacy weight_norm / spectral_norm weight
    silently never trained, a pruned conv failed at the second backward. Refused at the
    first forward, naming the hook and the way out."""
    torch.manual_seed(0)
    m = Net()
    if how == "prune":
        torch.nn.utils.prune.l1_unstructured(m.c.conv, "weight", amount=0.3)
    elif how == "weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(m.c.conv)
    else:
        torch.nn.utils.spectral_norm(m.c.conv)
    qat = quantize_qat(m)
    with pytest.raises(ValueError, match=r"ConvBnRelu2d: its conv \(\w+\) recompute the weight "
                                         r"in forward hooks.*parametrizations"):
        qat(torch.randn(2, 3, 8, 8))


def test_other_hooks_on_a_fused_modules_inner_layers_are_warned_once():
    """A per-layer profiler hooks every leaf, inner conv and bn too: those hooks cannot fire
    (the fused forward calls neither), which is warned once per module, not refused."""
    torch.manual_seed(0)
    qat = quantize_qat(Net())
    fired = []
    qat.c.conv.register_forward_hook(lambda mod, i, o: fired.append("conv"))
    qat.c.bn.register_forward_pre_hook(lambda mod, i: fired.append("bn"))
    with pytest.warns(UserWarning, match=r"ConvBnRelu2d: forward hooks or pre-hooks on its "
                                         r"conv \(.*\), bn \(.*\) do not fire"):
        qat(torch.randn(2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qat(torch.randn(2, 3, 8, 8))
    assert fired == []


def test_parametrized_inner_conv_still_trains():
    """torch.nn.utils.parametrizations (no hooks: a property) is the way that works."""
    torch.manual_seed(0)
    m = Net()
    torch.nn.utils.parametrizations.weight_norm(m.c.conv)
    qat = quantize_qat(m)
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    before = m.c.conv.parametrizations.weight.original1.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        qat(torch.randn(2, 3, 8, 8)).square().sum().backward()
        opt.step()
    assert not torch.equal(qat.c.conv.parametrizations.weight.original1, before)


@pytest.mark.parametrize("stage", ["float", "qat"])
def test_parametrized_linear_is_refused_with_the_way_out(stage):
    """weight_norm on a gpuquant Linear: the error said 'type ParametrizedLinear has no QAT
    version in the mapping; pass mapping=...', which does not help."""
    m = Head(4, 3)
    if stage == "float":
        torch.nn.utils.parametrizations.weight_norm(m.fc)
        with pytest.raises(TypeError, match=r"quantize_qat: module 'fc' \(ParametrizedLinear\) "
                                            r"has parametrized \['weight'\].*remove_parametriz"):
            quantize_qat(m)
        return
    qat = quantize_qat(m)
    qat(torch.randn(2, 4))
    torch.nn.utils.parametrizations.weight_norm(qat.fc)
    with pytest.raises(TypeError, match=r"quantize: module 'fc' \(ParametrizedLinear\) has "
                                        r"parametrized \['weight'\]"):
        quantize(qat.eval())


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm"])
def test_quantize_leaves_weight_recomputing_hooks_behind(how):
    """A legacy weight_norm / spectral_norm Linear trains in QAT through its pre-hook; the
    int8 Linear holds the weight it computed, and has none of weight_g / weight_orig: the
    carried hook had failed its first call (found by review)."""
    torch.manual_seed(0)
    m = Head(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        getattr(torch.nn.utils, how)(m.fc)
    qat = quantize_qat(m)
    x = torch.randn(3, 6)
    qat(x)
    qat.eval()
    from gpuquant.quantization import disable_observer
    disable_observer(qat)
    y_qat = qat(x)
    int8 = quantize(qat)  # (in place: torch cannot deepcopy a legacy weight_norm module)
    assert not int8.fc._forward_pre_hooks
    step = float(int8.fc.output_scale) if hasattr(int8.fc, "output_scale") else 1.0
    assert float((int8(x) - y_qat).abs().max()) <= step * 1.01
