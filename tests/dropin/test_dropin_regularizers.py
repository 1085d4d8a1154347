"""Training-only regularizers in plain models (drop path / stochastic depth, DropBlock):
modules without state whose eval-mode forward is the identity pass int8 tensors through as
``nn.Dropout`` does, where they were float islands (their forward reads ``self.training``,
which kept them whole and float); QAT trains with them active, the int8 model and the ONNX
export run them as the identity."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant.nn as gnn
from gpuquant.quantization import quantize_qat
from gpuquant.quantization.fx import DropInWarning, is_eval_identity, prepare_plain
from tests.dropin.dropin_helpers import int8_against_qat, qat_step


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Per-sample residual-branch drop, written as model zoos write it."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


def stochastic_depth(x, p: float, mode: str, training: bool = True):
    """torchvision's form: a free function that torch.fx does not trace into."""
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * noise.div_(1 - p)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p, mode="row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class StochasticDepthRow(nn.Module):
    """torchvision's form: the mode and probability as attributes, an early return."""

    def __init__(self, p, mode="row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)


class DropBlock(nn.Module):
    def __init__(self, p, block=3):
        super().__init__()
        self.p, self.block = p, block

    def forward(self, x):
        if not self.training:
            return x
        gamma = self.p / self.block ** 2
        mask = (torch.rand_like(x[:, :1]) < gamma).float()
        mask = 1 - F.max_pool2d(mask, self.block, 1, self.block // 2)
        return x * mask * mask.numel() / mask.sum().clamp(min=1)


class Net(nn.Module):
    """Residual blocks whose branches end in each regularizer (SiLU convs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), reg)
            for reg in (DropPath(0.2), StochasticDepthRow(0.2), DropBlock(0.1),
                        StochasticDepth(0.1)))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.stem(x)
        for b in self.branches:
            y = y + b(y)
        return self.fc(y.mean((2, 3)))


def test_regularizers_are_recognised_and_others_are_not():
    for m in (DropPath(0.2), StochasticDepthRow(0.1), DropBlock(0.1), DropPath(0.0),
              StochasticDepth(0.2)):
        assert is_eval_identity(m), type(m).__name__
        assert m.training  # (the check leaves the mode as it was)

    class Keeps(DropPath):  # stores its input, counts its calls: the probe leaves no trace
        calls = 0

        def forward(self, x):
            self.seen = x
            self.calls += 1
            return super().forward(x)

    k = Keeps(0.1)
    assert is_eval_identity(k) and not hasattr(k, "seen") and k.calls == 0
    hooked = DropPath(0.1)
    hooked.register_forward_hook(lambda mod, i, o: o * 2)
    assert not is_eval_identity(hooked)  # its hook would run on the int8 tensor
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got int"):
        is_eval_identity(3)

    class Doubles(nn.Module):
        def forward(self, x):
            return x if self.training else 2 * x

    class WithParam(DropPath):
        def __init__(self):
            super().__init__(0.1)
            self.w = nn.Parameter(torch.ones(1))

    class TwoInputs(nn.Module):
        def forward(self, x, y=None):
            return x

    for m in (Doubles(), WithParam(), TwoInputs(), nn.ReLU(), gnn.QuantStub()):
        assert not is_eval_identity(m), type(m).__name__


def test_no_float_island_qat_trains_with_the_drops_int8_runs_the_identity(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        gm = prepare_plain(model, example_inputs=(x,))
        qat = quantize_qat(model, example_inputs=(x,))
    assert "dequant" not in "".join(n for n, _ in gm.named_modules() if n.startswith("branches"))
    # training: the drops are active (two calls differ), eval: the identity
    qat.train()
    torch.manual_seed(1)
    a = qat(x)
    torch.manual_seed(2)
    assert not torch.equal(a, qat(x))
    for step in range(3):
        qat_step(qat, x, torch.tensor([0, 1, 2, 3]), seed=step)
    int8, _ = int8_against_qat(qat, x)
    pytest.importorskip("onnx")
    from gpuquant.export import to_onnx
    import gpuquant.runtime as rt
    path = tmp_path / "net.onnx"
    to_onnx(int8, x, path)
    with torch.no_grad():
        want = int8(x).numpy()
    assert np.array_equal(rt.load(path).run(x.numpy()), want)
