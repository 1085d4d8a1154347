"""Hooks a user registers on a model that goes QAT -> int8: the fused BatchNorm-folded
QAT modules refuse hooks on their inner layer (their forward never calls it), and
quantize() carries the QAT modules' forward hooks to the int8 modules (as torch.ao's
convert does; they had been dropped without a word)."""
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


@pytest.mark.parametrize("how", ["capture", "prune", "weight_norm", "bn-hook"])
def test_hooks_on_a_fused_modules_inner_layer_are_refused(how):
    """A hook on ConvBnRelu2d's conv or bn never ran in QAT (the forward folds the
    BatchNorm and calls neither): a capture hook silently, a pruned conv failed at the
    second backward. Refused at the first forward, naming the submodule and the way out."""
    torch.manual_seed(0)
    m = Net()
    if how == "capture":
        m.c.conv.register_forward_hook(lambda mod, i, o: None)
    elif how == "prune":
        torch.nn.utils.prune.l1_unstructured(m.c.conv, "weight", amount=0.3)
    elif how == "weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(m.c.conv)
    else:
        m.c.bn.register_forward_pre_hook(lambda mod, i: None)
    qat = quantize_qat(m)
    with pytest.raises(ValueError, match=r"ConvBnRelu2d: forward hooks or pre-hooks on its "
                                         r"(conv|bn) \(.*\).*parametrizations"):
        qat(torch.randn(2, 3, 8, 8))


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
    class Head(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.fc, self.dq = gnn.QuantStub(), gnn.Linear(4, 3), gnn.DequantStub()

        def forward(self, x):
            return self.dq(self.fc(self.q(x)))

    m = Head()
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
