"""Shared helpers of the deployment tests: small calibrated int8 models, the runtime's byte
check, and a Python without torch to run the runtime in."""
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import torch

import gpuquant
import gpuquant.nn as gnn
from gpuquant.quantization import (MinMaxObserver, QConfig, calibration_qconfig, quantize,
                                   quantize_qat)

# min/max calibration (fast: the histogram observer's MSE search costs seconds per model)
int8_calibration_qconfig = QConfig(
    weight_observer=calibration_qconfig.weight_observer,
    act_observer=partial(MinMaxObserver, dtype=gpuquant.qint8, symmetric=True),
    weight_fake_quant=None, act_fake_quant=None)

# asymmetric uint8 activations (nonzero zero points end to end)
uint8_calibration_qconfig = QConfig(
    weight_observer=calibration_qconfig.weight_observer,
    act_observer=partial(MinMaxObserver, dtype=gpuquant.quint8, symmetric=False),
    weight_fake_quant=None, act_fake_quant=None)


class ZooNet(gnn.Module):
    """Every exported op: conv (+ReLU, +ReLU6, depthwise, dilated, strided, no bias), max /
    average / adaptive pooling, residual add, add_relu, mul, concat, flatten, linear."""

    def __init__(self, c=6):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.c1 = gnn.ConvBnRelu2d(3, c, 3, padding=1, bias=False)
        self.c2 = gnn.ConvRelu62d(c, c, 3, padding=1, groups=c)
        self.c3 = gnn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.add = gnn.Elemwise("add")
        self.mul = gnn.Elemwise("mul")
        self.add_relu = gnn.Elemwise("add_relu")
        self.cat = gnn.Concat()
        self.mp = gnn.MaxPool2d(3, 2, 1)
        self.ap = gnn.AvgPool2d(2, 2, padding=1, count_include_pad=False)
        self.c4 = gnn.ConvBn2d(3 * c, 8, 1, stride=1)
        self.gap = gnn.AdaptiveAvgPool2d((1, 1))
        self.fc = gnn.LinearRelu(8, 12)
        self.fc2 = gnn.Linear(12, 5)
        self.dequant = gnn.DequantStub()

    def forward(self, x):
        x = self.c1(self.quant(x))
        y = self.c2(x)
        z = self.c3(y)
        a = self.add(z, x)
        m = self.mul(y, z)
        r = self.add_relu(a, m)
        x = self.cat([r, y, z], 1)
        x = self.ap(self.mp(x))
        x = self.gap(self.c4(x))
        x = torch.flatten(x, 1)
        return self.dequant(self.fc2(self.fc(x)))


def calibrated(model, shape, qconfig=int8_calibration_qconfig, batches=3, seed=0):
    """quantize_qat + calibration on random batches + quantize -> the int8 model."""
    g = torch.Generator().manual_seed(seed)
    q = quantize_qat(model.eval(), qconfig)
    with torch.no_grad():
        for _ in range(batches):
            q(torch.randn(*shape, generator=g))
    return quantize(q)


REPO = Path(__file__).resolve().parents[2]

# a fresh Python in which importing torch fails: what runs after it (with numpy as np and
# gpuquant.runtime as rt) proves the runtime needs no torch
_NO_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"import of {name} blocked by the test")

    sys.meta_path.insert(0, _NoTorch())
    import numpy as np
    import gpuquant.runtime as rt
""")


def run_without_torch(body: str, cwd, *args) -> subprocess.CompletedProcess:
    """``body`` (after the torch-blocking preamble) in a fresh Python, in ``cwd``, with the
    repository on the path and ``args`` as its argv[1:]."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(body), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def runtime_bytes(model, path, xs) -> None:
    """gpuquant.runtime's output for each of ``xs`` == the int8 model's on NumPy, byte for
    byte."""
    import gpuquant.runtime as rt
    from gpuquant import backends
    sess = rt.load(path)
    for x in xs:
        with backends.use("numpy"), torch.no_grad():
            want = model(x).numpy()
        got = sess.run(x.numpy())
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), int((got != want).sum())
