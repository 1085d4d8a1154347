"""``permute`` / ``transpose`` between quantized modules (a ShuffleNet channel shuffle, a
round trip through channels-last order) in the ONNX export: Transpose of the int8 tensor,
run byte-identically by gpuquant.runtime and onnxruntime; what the exporter and the runtime
refuse."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import gpuquant.runtime as rt
from gpuquant.export import to_onnx
from gpuquant.quantization import quantize, quantize_qat

from conftest import int8_forward

onnx = pytest.importorskip("onnx")


def _shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class _Shuffle(nn.Module):
    """Plain torch.nn: conv, channel shuffle (view, transpose, view), conv, a permute to
    (N, H, W, C) and back, a permute with its dimensions as a tuple, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 6 * 5, 5)

    def forward(self, x):
        y = self.c2(_shuffle(self.c1(x), 2)).permute(0, 2, 3, 1)
        y = y.permute((0, 3, 1, 2)).transpose(-1, -2)
        return self.fc(torch.flatten(y, 1))


def _int8(model, x):
    torch.manual_seed(0)
    qat = quantize_qat(model, example_inputs=(x,))
    for _ in range(3):
        qat(torch.randn(4, *x.shape[1:]))
    return quantize(qat.eval())


def test_channel_shuffle_and_permutes_export_exactly(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 6)
    q = _int8(_Shuffle(), x)
    path = tmp_path / "shuffle.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the view's sizes hold at 5x6 only (warned)
        to_onnx(q, x, path)
    model = onnx.load(path)
    perms = [list(a.ints) for n in model.graph.node if n.op_type == "Transpose"
             for a in n.attribute if a.name == "perm"]
    assert perms == [[0, 2, 1, 3, 4], [0, 2, 3, 1], [0, 3, 1, 2], [0, 1, 3, 2]]
    sess = rt.load(path)
    for batch in (2, 5, 1):  # (batch 0: torch itself cannot view(b, -1, h, w) nothing)
        xb = torch.randn(batch, 3, 5, 6)
        assert np.array_equal(sess.run(xb.numpy()), int8_forward(q, xb)), batch
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    # onnxruntime requantizes the convs in float (within a step of gpuquant's bytes); the
    # transposes themselves only move codes
    step = float(q.fc.output_scale)
    assert np.abs(got - int8_forward(q, x)).max() <= 2 * step + 1e-6


class _BatchMove(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.c(x).transpose(0, 1)


def test_a_transpose_of_the_batch_dimension_is_refused(tmp_path):
    x = torch.randn(2, 3, 4, 4)
    q = _int8(_BatchMove(), x)
    with pytest.raises(NotImplementedError, match=r"moves the batch dimension .*\[1, 0, 2, 3\]"):
        to_onnx(q, x, tmp_path / "m.onnx")


def test_runtime_refuses_a_transpose_not_in_gpuquants_form(tmp_path):
    x = torch.randn(2, 3, 5, 6)
    q = _int8(_Shuffle(), x)
    path = tmp_path / "shuffle.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_onnx(q, x, path)
    for bad in ([1, 0, 2, 3], [0, 0, 1, 2], []):
        model = onnx.load(path)
        node = next(n for n in model.graph.node if n.op_type == "Transpose" and
                    len(next(a for a in n.attribute if a.name == "perm").ints) == 4)
        del node.attribute[:]
        if bad:
            node.attribute.append(onnx.helper.make_attribute("perm", bad))
        onnx.save(model, tmp_path / "bad.onnx")
        with pytest.raises(rt.RuntimeFormatError, match="keep the batch dimension first"):
            rt.load(tmp_path / "bad.onnx")
