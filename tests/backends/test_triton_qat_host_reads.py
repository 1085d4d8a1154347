"""The QAT training step reads no tensor value back to the host (CI guard, CPU).

On CUDA every ``.item()`` / ``int(t)`` / ``bool(t)`` of a device tensor stalls the launch
queue until the GPU catches up, and makes the step impossible to capture in a CUDA graph
(the ``gpuquant-qat-graph`` rows of the qat_step suite). Here the step runs on the triton
backend (the interpreter on CPU) under a dispatch mode that records every scalar read made
outside the interpreter's own kernel emulation: the fused observers (check_finite=False),
the BN fold, fake quant, pooling's integer snap, the running statistics, SGD."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpuquant.backends as backends
import gpuquant.nn as gnn
from gpuquant.bench.suites.qat_step import qat_qconfig
from gpuquant.quantization import quantize_qat

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="counts reads around the Triton interpreter (CPU machines)"),
]

_READS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero")


class _Reads(TorchDispatchMode):
    def __init__(self, inside):
        super().__init__()
        self.inside, self.hits = inside, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside[0] and name in _READS:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


class _Net(gnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = gnn.QuantStub()
        self.c1 = gnn.ConvBnRelu2d(3, 8, 3, padding=1)
        self.c2 = gnn.ConvBn2d(8, 8, 3, padding=1)
        self.add = gnn.Elemwise("add_relu")
        self.pool = gnn.MaxPool2d(2)
        self.avg = gnn.AvgPool2d(2)
        self.gap = gnn.AdaptiveAvgPool2d(1)
        self.fc = gnn.LinearBnRelu1d(8, 8)
        self.out = gnn.Linear(8, 4)
        self.dq = gnn.DequantStub()

    def forward(self, x):
        y = self.c1(self.quant(x))
        y = self.avg(self.pool(self.add(self.c2(y), y)))
        return self.dq(self.out(self.fc(torch.flatten(self.gap(y), 1))))


def test_qat_training_step_reads_nothing_back(monkeypatch):
    import triton.runtime.interpreter as interp
    inside = [0]
    run = interp.InterpretedFunction.run

    def counted(self, *a, **k):  # the interpreter reads kernel arguments: not ours
        inside[0] += 1
        try:
            return run(self, *a, **k)
        finally:
            inside[0] -= 1
    monkeypatch.setattr(interp.InterpretedFunction, "run", counted)
    torch.manual_seed(0)
    model = quantize_qat(_Net(), qat_qconfig()).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (4,))
    reads = _Reads(inside)
    with backends.use("triton"):
        for step in range(3):  # the first step sizes per-channel state: not counted
            if step == 1:
                reads.__enter__()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()
        reads.__exit__(None, None, None)
    assert reads.hits == [], f"host reads in the QAT step: {reads.hits}"
