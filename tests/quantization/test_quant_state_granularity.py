"""A QAT state_dict (or gpuquant.distributed checkpoint) saved with per-channel observer /
LSQ / TQT state does not load into a model built with per-tensor ones (or the reverse):
the load raises naming the key, instead of leaving a per-tensor module with a vector of
channel ranges (failing much later, at conversion or in forward, with an unrelated error)."""
from functools import partial

import pytest
import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant import backends
from gpuquant import distributed as gdist
from gpuquant.quantization import (LSQ, TQT, ExponentialMovingAverageObserver, MinMaxObserver,
                                   PassiveObserver, QConfig, quantize_qat)


def _pair(make, x):
    per_channel, per_tensor = make(0), make(None)
    per_channel(x)
    per_tensor(x)
    return per_channel, per_tensor


@pytest.mark.parametrize("make", [
    lambda axis: MinMaxObserver(dtype=gpuquant.qint8_narrow, axis=axis),
    lambda axis: ExponentialMovingAverageObserver(axis=axis),
    lambda axis: LSQ(dtype=gpuquant.qint8_narrow, axis=axis),
    lambda axis: TQT(dtype=gpuquant.qint8_narrow, axis=axis),
], ids=["minmax", "ema", "lsq", "tqt"])
def test_state_of_the_other_granularity_is_refused(make):
    x = torch.randn(5, 7)
    per_channel, per_tensor = _pair(make, x)
    for src, dst, axis in ((per_channel, make(None), None), (per_tensor, make(0), 0)):
        with pytest.raises(RuntimeError, match=rf"axis={axis}\)"):
            dst.load_state_dict(src.state_dict())
    # the same granularity still loads (per-channel state sizes an unsized module)
    for src, axis in ((per_channel, 0), (per_tensor, None)):
        dst = make(axis)
        dst.load_state_dict(src.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(),
                                                     src.state_dict().values())
                   if isinstance(a, torch.Tensor))


def test_passive_observer_state_of_the_other_granularity_is_refused():
    c = int(torch.randint(2, 9, ()))
    src = PassiveObserver(axis=0)
    src.set_qparams(gpuquant.QParams(gpuquant.qint8, torch.rand(c) + 0.1,
                                     torch.zeros(c, dtype=torch.int32), 0))
    dst = PassiveObserver()
    with pytest.raises(RuntimeError, match=r"PassiveObserver\(axis=None\) is per-tensor"):
        dst.load_state_dict(src.state_dict())


class _Net(gnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.conv = gnn.ConvBnRelu2d(3, 4, 3)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def _qconfig(weight_axis):
    return QConfig(weight_observer=partial(MinMaxObserver, dtype=gpuquant.qint8_narrow,
                                           axis=weight_axis),
                   act_observer=partial(MinMaxObserver, dtype=gpuquant.qint8),
                   weight_fake_quant=None, act_fake_quant=None)


def test_checkpoint_of_another_weight_granularity_is_refused(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with backends.use("reference"):
        saved = quantize_qat(_Net().eval(), _qconfig(0))
        saved(x)
        gdist.save_checkpoint(tmp_path / "ckpt.pt", saved, step=1)
        other = quantize_qat(_Net().eval(), _qconfig(None))
        other(x)
        before = {k: v.clone() for k, v in other.state_dict().items()
                  if isinstance(v, torch.Tensor)}
        with pytest.raises(RuntimeError, match="conv.weight_observer.min_val"):
            gdist.load_checkpoint(tmp_path / "ckpt.pt", other, restore_rng=False)
        # the per-tensor observer was not resized to the file's channel vector
        assert other.conv.weight_observer.min_val.shape == before[
            "conv.weight_observer.min_val"].shape == ()
        # the same qconfig loads
        same = quantize_qat(_Net().eval(), _qconfig(0))
        gdist.load_checkpoint(tmp_path / "ckpt.pt", same, restore_rng=False)
        assert torch.equal(same.conv.get_weight_qparams().scale,
                           saved.conv.get_weight_qparams().scale)
